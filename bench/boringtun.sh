#!/bin/sh
# bench/boringtun.sh: builds boringtun's CLI from crates.io into .cache/tools/bin, once.
# The throughput benchmark runs it as its setup step; a build that fails leaves boringtun
# out of the table (the benchmark says so) rather than stopping the run.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$root/.cache/tools/bin/boringtun-cli" ]; then
    exit 0
fi
exec nice -n 10 cargo install --locked boringtun-cli --root "$root/.cache/tools" -j 1
