#!/usr/bin/env bash
# Builds podwire's image (the Dockerfile at the top) on this machine, without a daemon or a
# registry, and only when what goes into it changed:
#
#   1. a Debian bookworm base (minbase, python3) made by mmdebstrap and imported into podman
#      once, as localhost/podwire-base:bookworm: the Dockerfile's BASE_IMAGE here;
#   2. the image, tagged localhost/podwire:<hash> and localhost/podwire:dev, where <hash>
#      covers the Dockerfile, the sources it copies (the .dockerignore lists them) and the base;
#   3. a docker-archive of it, .cache/image/podwire-<hash>.tar, for `ctr images import`.
#
# .cache/image/current says which: REF=, ARCHIVE=, HASH=, as shell assignments.
# podman reads hack/image/containers.conf (runc, the rlimits this machine allows) and keeps
# its images in .cache/image/storage: `eval "$(hack/image.sh env)"` gives a shell the same.
#
#   hack/image.sh          build when needed (setup calls this)
#   hack/image.sh hash     print the hash the sources have now (on the base given, if one is)
#   hack/image.sh inputs   print what the build context holds and the hash covers
#   hack/image.sh env      print the environment podman needs to see these images
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=$root/.cache/image
log() { printf '[image] %s\n' "$*" >&2; }

# What the build context holds: keep in step with .dockerignore (tests/integration/test_image.py
# checks that they agree).
INPUTS=(Dockerfile .dockerignore pyproject.toml README.md agent operator proto sandbox)
BASE_REF=localhost/podwire-base:bookworm
BASE_SUITE=bookworm
BASE_PACKAGES=python3-minimal,ca-certificates
# As Debian's slim images do: no manuals, translations or docs but the licences, in the base
# and in whatever a Dockerfile installs on it later (dpkg keeps these in dpkg.cfg.d).
BASE_DPKG_OPTS=(
  'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/locale/*'
  'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
)
REPO=localhost/podwire
BUILDER_REF=localhost/podwire-builder:cache

podman_env() {
  export CONTAINERS_CONF=$root/hack/image/containers.conf
  export CONTAINERS_STORAGE_CONF=$cache/storage.conf
  mkdir -p "$cache/storage"
  if [[ ! -f $CONTAINERS_STORAGE_CONF ]]; then
    # storage.conf takes no relative paths, so it is written here, for this checkout.
    cat > "$CONTAINERS_STORAGE_CONF.tmp" <<CONF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "/run/podwire-image/$(printf '%s' "$root" | sha256sum | cut -c1-12)"
CONF
    mv "$CONTAINERS_STORAGE_CONF.tmp" "$CONTAINERS_STORAGE_CONF"
  fi
}

source_hash() {
  # Every file of the build context, by path, mode and content; the base by its image ID; and
  # this script, which says how the image is built.
  {
    sha256sum hack/image.sh
    find "${INPUTS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum
    find "${INPUTS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' -perm -u+x -print |
      LC_ALL=C sort
    printf 'base %s\n' "$1"
  } | sha256sum | cut -c1-16
}

seconds_since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

base_image_id() {
  podman image inspect --format '{{.Id}}' "$BASE_REF" 2>/dev/null || true
}

build_base() {
  # The recipe's own hash names the tarball, so a changed recipe makes a new base.
  local recipe tar started
  recipe=$(printf '%s %s minbase %s' "$BASE_SUITE" "$BASE_PACKAGES" "${BASE_DPKG_OPTS[*]}" |
    sha256sum | cut -c1-12)
  tar=$cache/base-$recipe.tar
  if [[ ! -f $tar ]]; then
    started=$(date +%s.%N)
    log "making the Debian $BASE_SUITE base with mmdebstrap (about a minute)"
    local opt dpkgopts=()
    for opt in "${BASE_DPKG_OPTS[@]}"; do dpkgopts+=(--dpkgopt="$opt"); done
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" "${dpkgopts[@]}" \
      --mode=root --format=tar "$BASE_SUITE" "$tar.tmp" >&2
    mv "$tar.tmp" "$tar"
    find "$cache" -maxdepth 1 -name 'base-*.tar' ! -name "base-$recipe.tar" -delete
    log "base made in $(seconds_since "$started") s"
  fi
  if [[ "$(podman image inspect --format '{{index .Labels "podwire.base-recipe"}}' "$BASE_REF" 2>/dev/null)" != "$recipe" ]]; then
    started=$(date +%s.%N)
    podman import --quiet --change "LABEL podwire.base-recipe=$recipe" \
      --change 'CMD ["/bin/bash"]' "$tar" "$BASE_REF" >/dev/null
    log "base imported as $BASE_REF in $(seconds_since "$started") s"
  fi
}

prune() {
  # Older images of this store and the layers only they used go (a build a minute adds up);
  # one still used by a container stays. The base and the builder stage stay tagged.
  local image
  for image in $(podman images --format '{{.Repository}}:{{.Tag}}' "$REPO"); do
    [[ $image == "$1" || $image == "$REPO:dev" ]] || podman rmi "$image" >/dev/null 2>&1 || true
  done
  podman image prune --force >/dev/null
}

build() {
  local started hash ref archive
  started=$(date +%s.%N)
  build_base
  hash=$(source_hash "$(base_image_id)")
  ref=$REPO:$hash
  archive=$cache/podwire-$hash.tar
  if [[ -f $archive && -f $cache/current ]] && grep -qx "REF=$ref" "$cache/current" &&
    podman image exists "$ref"; then
    log "$ref is current (checked in $(seconds_since "$started") s)"
    return
  fi
  local step
  step=$(date +%s.%N)
  log "building $ref"
  # The machine's CA bundle is lent to the build's steps (on /mnt, which every Debian base has
  # empty, so nothing of it stays in a layer): pip reaches PyPI through whatever TLS-inspecting
  # proxy this machine trusts. The docker format keeps SHELL and STOPSIGNAL, which OCI image
  # configs cannot carry.
  local ca=() certs=/etc/ssl/certs
  if [[ -f $certs/ca-certificates.crt ]]; then
    ca=(--volume "$certs:/mnt:ro" --build-arg PIP_CERT=/mnt/ca-certificates.crt)
  fi
  local args=(--quiet --network host --layers --format docker "${ca[@]}"
    --build-arg BASE_IMAGE="$BASE_REF" --file Dockerfile)
  podman --runtime runc build "${args[@]}" --tag "$ref" --tag "$REPO:dev" . >/dev/null
  # The builder stage (the dependencies, the slow part) tagged too, from the cache at once: a
  # tagged image's layers are what the clean-up below keeps.
  podman --runtime runc build "${args[@]}" --target builder --tag "$BUILDER_REF" . >/dev/null
  log "built in $(seconds_since "$step") s"
  step=$(date +%s.%N)
  rm -f "$archive.tmp"
  podman save --quiet --format docker-archive --output "$archive.tmp" "$ref"
  mv "$archive.tmp" "$archive"
  find "$cache" -maxdepth 1 -name 'podwire-*.tar' ! -name "podwire-$hash.tar" -delete
  printf 'REF=%s\nARCHIVE=%s\nHASH=%s\n' "$ref" "$archive" "$hash" > "$cache/current.tmp"
  mv "$cache/current.tmp" "$cache/current"
  prune "$ref"
  log "saved $archive in $(seconds_since "$step") s ($(du -m "$archive" | cut -f1) MB)"
  log "image ready in $(seconds_since "$started") s: $ref"
}

mkdir -p "$cache"
podman_env
case "${1:-build}" in
  build)
    # One build at a time per checkout (setup and a test may both ask): the second waits, then
    # finds the image current.
    exec 9>"$cache/lock"
    flock 9
    build
    ;;
  hash) source_hash "${2:-$(base_image_id)}" ;;
  inputs) printf '%s\n' "${INPUTS[@]}" ;;
  env) printf 'export CONTAINERS_CONF=%q CONTAINERS_STORAGE_CONF=%q\n' "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF" ;;
  *) echo "usage: $0 [build|hash [BASE_ID]|inputs|env]" >&2; exit 2 ;;
esac
