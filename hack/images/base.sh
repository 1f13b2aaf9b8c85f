#!/usr/bin/env bash
# Builds the images' base, Debian bookworm with its Python 3.11 and nothing else, from Debian
# packages with mmdebstrap, so `make images` needs no image registry. Prints its name.
#
# The image is named after a hash of this script, so it is built once per machine and again
# only when the package set changes. BASE_IMAGE=<ref> skips this and uses that image instead
# (for example docker.io/library/debian:bookworm-slim after `apt-get install python3
# python3-venv`, or any image with python3.11 at /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${ENGINE:?run through make images}"

packages="python3,python3-venv,ca-certificates,libgomp1,tzdata"
key="$( (cat "$0"; echo "$packages") | sha256sum | cut -c1-12)"
image="localhost/kubetune/base:bookworm-$key"

if "$ENGINE" image exists "$image" 2>/dev/null \
    || { [[ "$ENGINE" == docker ]] && docker image inspect "$image" >/dev/null 2>&1; }; then
    echo "$image"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "images: building $image with mmdebstrap (about a minute)" >&2
# minbase + the interpreter; docs, man pages and locales are dropped to keep the layer small.
mmdebstrap --quiet --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$tmp/rootfs.tar" >&2
"$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    "$tmp/rootfs.tar" "$image" >&2
echo "$image"
