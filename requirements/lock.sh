#!/usr/bin/env bash
# Resolve every environment the project builds into requirements/*.txt: exact versions and
# sha256 hashes, from pyproject.toml's ranges and the *.in files here, as PyPI stood at
# LOCK_DATE (uv's --exclude-newer), so the same date always gives the same files.
#
#   requirements/lock.sh UV LOCK_DATE [OUT_DIR]     (make lock; make outdated: a later date)
#
#   dev.txt          the venv of `make venv` / `make test` / CI: server, dev and bench extras
#   server.txt       the CPU image and any CPU server install: the server extra
#   server-cuda.txt  the CUDA image (Python 3.12, as on its Ubuntu 24.04 base): PyPI's torch
#   client.txt       a client-only install (no torch)
#   foreign.txt      Triton's and KServe's clients for the tests (.venv-foreign)
#
# server.txt and client.txt are resolved under dev.txt's pins, and server-cuda.txt under the
# same pins but torch's, so one package has one version wherever the project runs.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=$1 LOCK_DATE=$2 OUT=${3:-requirements}
# torch's CPU wheel: where this machine kind keeps it; elsewhere point TORCH_FIND_LINKS at a
# folder holding the wheel, or at https://download.pytorch.org/whl/cpu/torch/.
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
mkdir -p "$OUT"

# No user or project uv settings, PyPI only (plus torch's CPU wheel where named).
compile() {
    "$UV" pip compile --quiet --no-config --index-url https://pypi.org/simple \
        --generate-hashes --exclude-newer "$LOCK_DATE" --python-platform x86_64-manylinux_2_28 \
        --custom-compile-command "make lock  # LOCK_DATE=$LOCK_DATE" "$@"
}
SERVER=(pyproject.toml requirements/build.in --extra server)

compile --python-version 3.11 --find-links "$TORCH_FIND_LINKS" -c requirements/constraints.in \
    "${SERVER[@]}" --extra dev --extra bench -o "$OUT/dev.txt"
compile --python-version 3.11 --find-links "$TORCH_FIND_LINKS" -c "$OUT/dev.txt" \
    "${SERVER[@]}" -o "$OUT/server.txt"
compile --python-version 3.11 -c "$OUT/dev.txt" pyproject.toml requirements/build.in \
    -o "$OUT/client.txt"

# The CUDA image: dev.txt's pins with the same torch release from PyPI (its CUDA build).
pins=$OUT/.dev-pins.txt  # a fixed name: it is quoted in the lock's annotations
trap 'rm -f "$pins"' EXIT
sed -n -E 's/^([A-Za-z0-9._-]+==[^ +]+)(\+[a-z0-9]+)? .*/\1/p' "$OUT/dev.txt" > "$pins"
compile --python-version 3.12 -c "$pins" "${SERVER[@]}" -o "$OUT/server-cuda.txt"

compile --python-version 3.11 requirements/foreign.in -o "$OUT/foreign.txt"
