#!/usr/bin/env bash
# Build (and optionally push) the kubealign operator and trainer images, tagged with the package version.
#
# Usage: images/build.sh [--registry REGISTRY] [--push] [--only operator|trainer]
#   REGISTRY defaults to $KUBEALIGN_REGISTRY, else "ghcr.io/kubealign".
#   The tag is pyproject.toml's [project].version, so the chart's appVersion and the images always agree.
# Needs Docker with BuildKit. Nothing secret is passed to the build: the context is filtered by .dockerignore.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
registry="${KUBEALIGN_REGISTRY:-ghcr.io/kubealign}"
push=false
only=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --registry) registry="$2"; shift 2 ;;
        --push) push=true; shift ;;
        --only) only="$2"; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "images/build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "$only" && "$only" != operator && "$only" != trainer ]]; then
    echo "images/build.sh: --only must be 'operator' or 'trainer', got '$only'" >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "images/build.sh: no Docker daemon reachable (docker info failed); build on a machine with Docker" >&2
    exit 1
fi

version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo_root/pyproject.toml")"

for image in operator trainer; do
    if [[ -n "$only" && "$image" != "$only" ]]; then
        continue
    fi
    tag="$registry/kubealign-$image:$version"
    echo "building $tag"
    DOCKER_BUILDKIT=1 docker build \
        --file "$repo_root/images/$image/Dockerfile" \
        --label "org.opencontainers.image.version=$version" \
        --tag "$tag" \
        "$repo_root"
    if [[ "$push" == true ]]; then
        docker push "$tag"
    fi
done
