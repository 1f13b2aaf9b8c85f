#!/usr/bin/env bash
# Makes daemonless OCI tooling usable on this machine and prints the environment for it.
#
#   eval "$(bash hack/images/containers.sh)"
#
# Installs podman, buildah, runc, mmdebstrap and skopeo from Debian when no container engine
# is present (root only), and points CONTAINERS_CONF at the project's containers.conf (why each
# setting is needed is written there). With a working docker daemon nothing is installed and
# ENGINE=docker is printed.
set -euo pipefail
cd "$(dirname "$0")/../.."

cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"

if [[ -z "${ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        ENGINE=podman
    fi
fi

if [[ "$ENGINE" == podman ]]; then
    need=()
    for tool in podman buildah runc mmdebstrap; do
        command -v "$tool" >/dev/null || need+=("$tool")
    done
    if ((${#need[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "containers: missing ${need[*]}; install podman, buildah, runc and mmdebstrap" >&2
            exit 1
        fi
        echo "containers: installing podman buildah runc mmdebstrap skopeo from Debian" >&2
        export DEBIAN_FRONTEND=noninteractive
        log="$cache/apt-containers.log"
        mkdir -p "$cache"
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends podman buildah \
            runc mmdebstrap skopeo containernetworking-plugins fuse-overlayfs uidmap ca-certificates; } \
            >"$log" 2>&1; then
            tail -20 "$log" >&2
            exit 1
        fi
    fi
    # One containers.conf for the images and the local cluster's node agent.
    conf="$(pwd)/kubetune/localcluster/nodeagent/containers.conf"
    echo "export CONTAINERS_CONF=$conf"
fi
echo "export ENGINE=$ENGINE"
