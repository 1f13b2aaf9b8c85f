#!/usr/bin/env bash
# Downloads the wheels an image installs into a wheelhouse under the cache and prints its path.
#
#   wheelhouse.sh operator|worker-cpu|worker-cuda...
#
# The wheelhouse is ${KUBETUNE_CACHE:-~/.cache/kubetune}/wheelhouse/<hash of the lock files>/,
# shared by every checkout on the machine. It holds exactly the files named (with their sha256)
# in hack/images/requirements-<set>.txt, fetched for CPython 3.11 on manylinux x86_64 whatever the
# host is; a `.complete-<set>` marker is written only once a set is all there, so an interrupted
# download is resumed rather than trusted. pip's own cache (~/.cache/pip) makes a new wheelhouse
# after a pin change cheap. The image build mounts the directory read-only; nothing is copied into
# the build context.
set -euo pipefail
cd "$(dirname "$0")/../.."

cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
python="${PYTHON:-python3}"
(($#)) || set -- operator worker-cpu

"$python" hack/images/lock.py --check >&2
key="$(cat hack/images/requirements-*.txt | sha256sum | cut -c1-16)"
dir="$cache/wheelhouse/$key"
mkdir -p "$dir"

for set in "$@"; do
    lock="hack/images/requirements-$set.txt"
    [[ -f "$lock" ]] || { echo "wheelhouse: no $lock" >&2; exit 2; }
    [[ -f "$dir/.complete-$set" ]] && continue
    # The lock's wheels that an earlier wheelhouse holds are hard-linked, not downloaded again
    # (name and version fix the file; pip download checks every hash either way).
    while read -r name version; do
        find "$cache/wheelhouse" -mindepth 2 -maxdepth 2 ! -path "$dir/*" \
            -iname "${name//-/_}-$version-*.whl" -exec cp -n --link {} "$dir/" \; 2>/dev/null || true
    done < <(sed -n 's/^\([^#][^=]*\)==\([^ ]*\) .*/\1 \2/p' "$lock")
    echo "wheelhouse: downloading $set into $dir" >&2
    # The platform lock.py resolved for, so the two never disagree.
    mapfile -t platform < <("$python" hack/images/lock.py --platform-args)
    "$python" -m pip download --quiet --no-deps --require-hashes --dest "$dir" "${platform[@]}" -r "$lock" >&2
    touch "$dir/.complete-$set"
done
echo "$dir"
