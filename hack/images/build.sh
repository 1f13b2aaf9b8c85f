#!/usr/bin/env bash
# Builds the operator and worker images with podman or docker (`make images`; docs/images.md).
#
#   build.sh                  the operator and the CPU worker
#   VARIANT=cuda build.sh     the operator and the CUDA worker (tagged -cuda)
#   BASE_IMAGE=<ref>          build on that image instead of the one base.sh makes from Debian
#   ENGINE=docker|podman      override the choice containers.sh makes
#   IMAGES_BUILD_FLAGS=...    more options for the engine's build (e.g. --no-cache, --pull)
#
# Steps: the base image (once per machine), the wheelhouse (once per lock), then both images
# with the layer cache. Tags: ghcr.io/kubetune/<image>:<version>-<shortsha>[-dirty][-cuda] and
# the moving <version>[-cuda]. Writes _out/images.env (KUBETUNE_OPERATOR_IMAGE=...,
# KUBETUNE_WORKER_IMAGE=...), which the tests and `make demo` read. Prints one line; the
# engines' output goes to a log under the cache.
set -euo pipefail
cd "$(dirname "$0")/../.."

cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
variant="${VARIANT:-cpu}"
registry="${KUBETUNE_IMAGE_REGISTRY:-ghcr.io/kubetune}"
[[ "$variant" == cpu || "$variant" == cuda ]] || { echo "images: VARIANT is cpu or cuda" >&2; exit 2; }
python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
export PYTHON="$python"

eval "$(bash hack/images/containers.sh)"
mkdir -p "$cache/images" _out
log="$cache/images/build.log"
: >"$log"

# run STEP CMD...: CMD's output goes to the log; on failure its tail is shown.
run() {
    local step="$1"; shift
    echo "### $step: $*" >>"$log"
    if ! "$@" >>"$log" 2>&1; then
        echo "images: $step failed; the end of $log:" >&2
        tail -n 25 "$log" >&2
        exit 1
    fi
}
seconds() { echo $((SECONDS - $1)); }
human_size() { numfmt --to=si --suffix=B --format=%.1f "$1"; }

version="$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
revision="$(git rev-parse HEAD)"
tag="$version-$(git rev-parse --short=7 HEAD)"
[[ -z "$(git status --porcelain --untracked-files=no)" ]] || tag="$tag-dirty"
created="$(git log -1 --format=%cI HEAD)"
suffix=""
[[ "$variant" == cpu ]] || suffix="-$variant"

start=$SECONDS
if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE="$(bash hack/images/base.sh 2>>"$log")" \
        || { echo "images: base image failed; see $log" >&2; exit 1; }
fi
base_seconds=$(seconds $start)

start=$SECONDS
wheels="$(bash hack/images/wheelhouse.sh operator "worker-$variant" build 2>>"$log")" \
    || { echo "images: wheelhouse failed; see $log" >&2; tail -n 25 "$log" >&2; exit 1; }
wheel_seconds=$(seconds $start)

# build NAME DOCKERFILE TAG... : builds one image, prints its size. The revision labels are also
# passed as --label, applied when the image is committed: buildah's layer cache reuses a LABEL step
# whose build-arg values changed, so the same tree built at another commit kept the old revision.
build() {
    local name="$1" dockerfile="$2"; shift 2
    local tags=()
    for t in "$@"; do tags+=(--tag "$t"); done
    # shellcheck disable=SC2086 # IMAGES_BUILD_FLAGS is a list of options
    run "$name" "$ENGINE" build --file "$dockerfile" "${tags[@]}" ${IMAGES_BUILD_FLAGS:-} \
        --build-context "wheels=$wheels" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
        --label "org.opencontainers.image.version=$version" \
        --label "org.opencontainers.image.revision=$revision" \
        --label "org.opencontainers.image.created=$created" \
        "${extra_args[@]}" .
}

operator_ref="$registry/operator:$tag"
worker_ref="$registry/worker:$tag$suffix"

start=$SECONDS
extra_args=()
build operator operator/Dockerfile "$operator_ref" "$registry/operator:$version"
operator_seconds=$(seconds $start)

start=$SECONDS
extra_args=(--build-arg "VARIANT=$variant")
build worker worker/Dockerfile "$worker_ref" "$registry/worker:$version$suffix"
worker_seconds=$(seconds $start)

printf 'KUBETUNE_OPERATOR_IMAGE=%s\nKUBETUNE_WORKER_IMAGE=%s\n' "$operator_ref" "$worker_ref" >_out/images.env.tmp
mv _out/images.env.tmp _out/images.env

size() { "$ENGINE" image inspect --format '{{.Size}}' "$1"; }
echo "images: $operator_ref $(human_size "$(size "$operator_ref")") ${operator_seconds}s," \
    "$worker_ref $(human_size "$(size "$worker_ref")") ${worker_seconds}s" \
    "(base ${base_seconds}s, wheelhouse ${wheel_seconds}s; $ENGINE; log $log) -> _out/images.env"
