#!/usr/bin/env bash
# Builds the images' base, Debian bookworm with its Python 3.11 and nothing else, from Debian
# packages with mmdebstrap, so `make images` needs no image registry. Prints its name.
#
#   base.sh          build the image if it is missing, print its name
#   base.sh --name   only print the name (the Dockerfiles' default BASE_IMAGE; a test compares)
#
# The image is named after a hash of the recipe below (suite, packages, options), so it is built
# once per machine and again only when the recipe changes. build.sh skips this script when
# BASE_IMAGE=<ref> is given (docs/images.md: any image with Python 3.11 and venv at
# /usr/bin/python3, e.g. one built FROM python:3.11-slim-bookworm where a registry is reachable).
set -euo pipefail

suite=bookworm
packages="python3,python3-venv,ca-certificates,libgomp1,tzdata"
# minbase + the interpreter; docs, man pages and locales are dropped to keep the layer small.
options=(
    --variant=minbase --include="$packages"
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
)
changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8')
key="$(printf '%s\n' "$suite" "${options[@]}" "${changes[@]}" | sha256sum | cut -c1-12)"
image="localhost/kubetune/base:$suite-$key"

if [[ "${1:-}" == --name ]]; then
    echo "$image"
    exit 0
fi
: "${ENGINE:?run through make images}"

if "$ENGINE" image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "images: building $image with mmdebstrap (about a minute)" >&2
mmdebstrap --quiet "${options[@]}" "$suite" "$tmp/rootfs.tar" >&2
"$ENGINE" import "${changes[@]}" "$tmp/rootfs.tar" "$image" >&2
echo "$image"
