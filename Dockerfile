# podwire: the agent (the default), the operator and the userspace engine, in one image.
#
#   podman build -t podwire .                     # from the public Debian slim image
#   podman run podwire podwire-operator ...       # the operator (the chart runs it as 65532)
#   podman run --cap-add NET_ADMIN --device /dev/net/tun podwire podwire-engine wg0
#
# BASE_IMAGE is any Debian bookworm; hack/image.sh builds from a base it makes with mmdebstrap,
# where no registry is reachable. The two stages share it, so the virtual environment made in
# the first runs on the interpreter of the second.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-20251229-slim

FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Debian's versions of these follow the base's point release; pinning them would only make the
# build fail when the mirror drops a superseded version. gcc, libssl-dev and python3-dev build
# the engine's native fast path (agent/engine/native, against OpenSSL's libcrypto) in this
# stage only; the image keeps no compiler and needs only libssl3, which python3 brings.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    gcc libc6-dev libssl-dev python3-dev \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
# The runtime's environment has no pip: Debian's pip installs into it from outside.
RUN python3 -m venv --without-pip /opt/podwire
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1
# Behind a proxy that re-signs TLS: its CA bundle, mounted into the build (podman build
# --volume), named here; unset, pip trusts the base's certificates.
ARG PIP_CERT
# The dependencies first, from pyproject.toml alone: a change to the sources reuses this layer,
# here and in the image (so a new image of the same dependencies adds only podwire's layer).
# The Kubernetes client's asyncio twin (kubernetes.aio) is half its size and never imported.
COPY pyproject.toml /src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip3 --python /opt/podwire/bin/python install --only-binary=:all: -r /tmp/requirements.txt \
 && rm -rf /opt/podwire/lib/python3*/site-packages/kubernetes/aio \
 && echo /opt/podwire-app \
    > "$(/opt/podwire/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/podwire-app.pth"

# podwire itself, on its own path (/opt/podwire-app, on the environment's sys.path through the
# .pth above), its commands beside the environment's Python where the agent looks for the engine.
# The native fast path is compiled here; the import check fails the build if it was not (the
# extension is optional for pip, not for the image).
FROM builder AS app
ARG PIP_CERT
COPY . /src
RUN pip3 --python /opt/podwire/bin/python install --no-deps --target /opt/podwire-app /src \
 && mv /opt/podwire-app/bin /opt/podwire-bin \
 && /opt/podwire/bin/python -c 'import podwire.agent.engine._fastpath'

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# python3 for the environment's interpreter; iproute2 (ip) and wireguard-tools (wg) for what the
# agent runs in a node's namespace and for a person debugging one; tini as PID 1 (below).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 iproute2 wireguard-tools tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/podwire /opt/podwire
COPY --from=app /opt/podwire-app /opt/podwire-app
COPY --from=app /opt/podwire-bin/ /opt/podwire/bin/
# WG_PROCESS_FOREGROUND: podwire-engine stays in the foreground as the container's process
# instead of detaching, as it does on a host.
ENV PATH=/opt/podwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WG_PROCESS_FOREGROUND=1
# Each program handles SIGTERM, but only once it has imported its modules and built itself (the
# operator: 1.3-2.2 s after the start when the apiserver does not answer), and the kernel drops
# a signal without a handler sent to PID 1: a pod stopped that early would wait out its whole
# grace period. tini is PID 1 instead: it passes SIGTERM on, so a program still starting simply
# ends, and it reaps orphans. A pod's `args:` runs under it; a `command:` replaces it and runs
# the program as PID 1, which works too, with that window.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["podwire-agent"]
