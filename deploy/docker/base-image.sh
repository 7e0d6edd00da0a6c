#!/bin/sh
# A base image for the Dockerfile where Docker Hub cannot be reached: Debian bookworm bootstrapped (minbase) from the
# apt mirror this machine already uses, with Debian's python3 (3.11), venv, pip and CA certificates, imported as
# IMAGE. Then: make image BASE_IMAGE=IMAGE. Needs root and debootstrap (apt-get install debootstrap).
#   deploy/docker/base-image.sh [IMAGE]        default lm-saes-base:bookworm; an existing IMAGE is kept
set -eu
IMAGE=${1:-lm-saes-base:bookworm}
DOCKER=${DOCKER:-docker}

if $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists; remove it (docker rmi $IMAGE) to bootstrap it again"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

# The first Debian archive among the configured apt sources (one-line and deb822 formats); DEBIAN_MIRROR overrides.
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -Eo 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ')}
[ -n "$mirror" ] || { echo "no Debian mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR" >&2; exit 1; }

rootfs=$(mktemp -d /var/tmp/lm-saes-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "bootstrapping bookworm from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
tar -C "$rootfs" --numeric-owner -c . | $DOCKER import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$IMAGE"
echo "imported $IMAGE"
