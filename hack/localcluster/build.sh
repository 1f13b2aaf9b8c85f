#!/usr/bin/env bash
# Builds the embedded cluster's binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, etcd, helm) from the Go module proxy into a cache outside the repo.
#
#   build.sh                 build what is missing, then print NAME=PATH lines
#   build.sh --print-paths   only print NAME=PATH lines (exit 1 if something is unbuilt)
#
# Each component lands in its own directory keyed by its version and a hash of its
# inputs (go.mod, go.sum, this script), so a version bump builds beside the old one and
# a second checkout on the same machine reuses the first one's work. A directory is
# renamed into place only once complete: an interrupted build is redone, never trusted.
# GOMODCACHE and GOCACHE live in the same cache so warm rebuilds only relink.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
export GOMODCACHE="${KUBETUNE_GOMODCACHE:-$cache/go/mod}"
export GOCACHE="${KUBETUNE_GOCACHE:-$cache/go/build}"
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

k8s_version="$(cat "$here/k8s/VERSION")"
etcd_version="$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/etcd/go.mod")"
helm_version=v3.22.0

key() { cat "$@" "$here/build.sh" | sha256sum | cut -c1-8; }
k8s_dir="$cache/bin/k8s-$k8s_version-$(key "$here/k8s/go.mod" "$here/k8s/go.sum")"
etcd_dir="$cache/bin/etcd-$etcd_version-$(key "$here/etcd/go.mod" "$here/etcd/go.sum" "$here/etcd/main.go")"
helm_dir="$cache/bin/helm-$helm_version-$(echo "$helm_version" | key)"

print_paths() {
    local missing=0 name dir
    for name in kube-apiserver kube-controller-manager kube-scheduler etcd helm; do
        case "$name" in
            kube-*) dir="$k8s_dir" ;;
            etcd) dir="$etcd_dir" ;;
            helm) dir="$helm_dir" ;;
        esac
        [[ -f "$dir/.complete" ]] || missing=1
        echo "$name=$dir/$name"
    done
    return "$missing"
}

# build_into DIR CMD...: runs CMD with $out set to a scratch directory, then renames it
# to DIR. The scratch directory sits beside DIR so the rename is atomic.
build_into() {
    local dir="$1"; shift
    [[ -f "$dir/.complete" ]] && return 0
    mkdir -p "$(dirname "$dir")"
    out="$(mktemp -d "$dir.tmp.XXXXXX")"
    chmod 755 "$out"
    local start=$SECONDS
    echo "localcluster: building $(basename "$dir") (a cold build takes many minutes)" >&2
    "$@"
    echo "$((SECONDS - start))" >"$out/.build-seconds"
    touch "$out/.complete"
    rm -rf "$dir"
    mv "$out" "$dir"
    echo "localcluster: built $(basename "$dir") in $((SECONDS - start))s" >&2
}

build_k8s() {
    local major="${k8s_version#v}"; major="${major%%.*}"
    local minor="${k8s_version#v*.}"; minor="${minor%%.*}"
    local ldflags="-s -w" pkg
    # Unstamped binaries report v0.0.0-master, which trips Helm's kubeVersion checks.
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    (cd "$here/k8s" && go build -tags selinux,notest -ldflags "$ldflags" -o "$out/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler)
}

build_etcd() {
    (cd "$here/etcd" && go build -ldflags "-s -w" -o "$out/etcd" .)
}

build_helm() {
    # go install @version ignores the surrounding module, so the pin is the version alone.
    GOBIN="$out" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version" \
        "helm.sh/helm/v3/cmd/helm@$helm_version"
}

if [[ "${1:-}" == "--print-paths" ]]; then
    print_paths
    exit
fi
command -v go >/dev/null || { echo "localcluster: Go is required to build the cluster (https://go.dev/dl)" >&2; exit 1; }
build_into "$etcd_dir" build_etcd
build_into "$k8s_dir" build_k8s
build_into "$helm_dir" build_helm
print_paths
