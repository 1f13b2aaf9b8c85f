#!/usr/bin/env bash
# Builds Kueue's controller (sigs.k8s.io/kueue/cmd/kueue) from the Go module proxy into the
# same cache as build.sh, with the module's own config/ manifests (CRDs, webhook
# configurations, the default controller Configuration) beside it. Opt-in: only the tests
# that run Kueue (ClusterOptions(kueue=True)) call it.
#
#   build-kueue.sh                 build if missing, then print kueue=PATH
#   build-kueue.sh --print-paths   only print kueue=PATH (exit 1 if unbuilt)
#
# Kept apart from build.sh on purpose: build.sh keys its directories on its own text, so
# editing it would rebuild the whole control plane.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
export GOMODCACHE="${KUBETUNE_GOMODCACHE:-$cache/go/mod}"
export GOCACHE="${KUBETUNE_GOCACHE:-$cache/go/build}"
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false ${KUBETUNE_GOFLAGS:-}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

kueue_version=v0.17.0
dir="$cache/bin/kueue-$kueue_version-$(sha256sum <"$here/build-kueue.sh" | cut -c1-8)"

if [[ "${1:-}" == "--print-paths" ]]; then
    echo "kueue=$dir/kueue"
    [[ -f "$dir/.complete" ]]
    exit
fi
command -v go >/dev/null || { echo "localcluster: Go is required to build Kueue (https://go.dev/dl)" >&2; exit 1; }

mkdir -p "$cache/bin"
# One builder at a time: a second caller waits and then finds the directory complete,
# instead of building the same thing and swapping the directory under the first.
exec 9>"$cache/bin/.kueue.lock"
flock 9
if [[ ! -f "$dir/.complete" ]]; then
    out="$(mktemp -d "$dir.tmp.XXXXXX")"
    chmod 755 "$out"
    start=$SECONDS
    echo "localcluster: building kueue $kueue_version (a cold build takes many minutes)" >&2
    # go install @version builds the module with its own go.mod (it has no replace
    # directives), so no wrapper module or go.sum is kept here.
    GOBIN="$out" go install -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version" \
        "sigs.k8s.io/kueue/cmd/kueue@$kueue_version"
    src="$(go mod download -json "sigs.k8s.io/kueue@$kueue_version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    # What Kueue's own kustomize overlay (config/default) is assembled from; the Python side
    # (kubetune/localcluster/kueue.py) applies it with the overlay's name prefix and namespace.
    mkdir -p "$out/config"
    for component in crd webhook internalcert manager; do
        cp -R "$src/config/components/$component" "$out/config/"
    done
    cp "$src/config/default/kustomization.yaml" "$out/config/"
    chmod -R u+w "$out/config"
    echo "$((SECONDS - start))" >"$out/.build-seconds"
    touch "$out/.complete"
    rm -rf "$dir"
    mv "$out" "$dir"
    echo "localcluster: built kueue $kueue_version in $((SECONDS - start))s" >&2
fi
echo "kueue=$dir/kueue"
