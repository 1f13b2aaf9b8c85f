#!/usr/bin/env bash
# Creates (once) the project's virtualenv and links it at .venv.
#
# torch from PyPI is a multi-GiB CUDA build, so the venv lives in a cache directory
# keyed by the hash of the pinned requirements: a fresh clone on the same machine
# reuses it, and a change of pins builds a new one beside it. The venv gets a
# marker file written only when the install completed, so an interrupted install is
# redone rather than trusted.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
key="$( (cat hack/requirements.txt; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
venv="$cache/venv-$key"

if [[ ! -f "$venv/.complete" ]]; then
    mkdir -p "$cache"
    rm -rf "$venv"
    echo "venv: creating $venv (first run downloads torch; several minutes)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -r hack/requirements.txt
    touch "$venv/.complete"
fi

ln -sfn "$venv" .venv
# The editable install is cheap and binds the shared venv to this checkout.
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || .venv/bin/pip install --quiet --no-deps -e .
