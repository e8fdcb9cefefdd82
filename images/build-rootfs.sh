#!/bin/bash
# Builds the benchmark's "real data": a Debian 12 root filesystem (debootstrap) packed into a
# ~1 GiB raw ext4 image with `mkfs.ext4 -d`, as described in shared/facts.md.
#
# Usage: images/build-rootfs.sh [OUTPUT_IMAGE]
#   OUTPUT_IMAGE   default: $CACHE_DIR/rootfs.img
# Environment:
#   CACHE_DIR      where the unpacked root filesystem and the image live (default: <repo>/.cache,
#                  which is git-ignored). The debootstrap tree is reused when complete.
#   MIRROR         Debian mirror (default http://deb.debian.org/debian)
#   SUITE          default bookworm
#   IMAGE_SIZE     default 1G
#
# Needs root (debootstrap, and mkfs.ext4 -d must read every file), debootstrap and e2fsprogs.
# The first run downloads ~150 MB and takes several minutes; later runs only rebuild the image.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache_dir=${CACHE_DIR:-$repo_root/.cache}
mirror=${MIRROR:-http://deb.debian.org/debian}
suite=${SUITE:-bookworm}
image_size=${IMAGE_SIZE:-1G}
output=${1:-$cache_dir/rootfs.img}
rootfs_dir=$cache_dir/rootfs-$suite
stamp=$rootfs_dir/.debootstrap-complete

# A root disk of a small VM: the base system plus a kernel, ssh and python (no desktop).
packages=linux-image-cloud-amd64,systemd-sysv,openssh-server,python3,ca-certificates,curl,less,vim-tiny

die() { echo "build-rootfs: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and mkfs.ext4 -d need it)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (apt-get install e2fsprogs)"

mkdir -p "$cache_dir"
if [ ! -e "$stamp" ]; then
    rm -rf "$rootfs_dir"
    echo "build-rootfs: debootstrap $suite into $rootfs_dir (several minutes)" >&2
    debootstrap --arch=amd64 --include="$packages" "$suite" "$rootfs_dir" "$mirror" >&2
    # Drop the downloaded .debs: a real root disk does not keep them and they would be
    # incompressible ballast that says nothing about the engine.
    rm -f "$rootfs_dir"/var/cache/apt/archives/*.deb
    touch "$stamp"
fi

tmp_image=$output.tmp.$$
trap 'rm -f "$tmp_image"' EXIT
rm -f "$tmp_image"
truncate -s "$image_size" "$tmp_image"
# Fixed UUID and hash seed so that rebuilds from the same tree give comparable images.
mkfs.ext4 -q -F -L rootfs -U 5f3c8a52-6c1e-4b43-9a3e-2f1d0c7b9e11 \
    -E hash_seed=0b1d2c3e-4f50-4617-8a9b-acbdcedf0011,lazy_itable_init=0,lazy_journal_init=0 \
    -d "$rootfs_dir" "$tmp_image" >&2
mv "$tmp_image" "$output"
trap - EXIT

nonzero_blocks=$(python3 - "$output" <<'PY' 2>/dev/null || echo "?"
import sys
zero = bytes(4096)
n = 0
with open(sys.argv[1], "rb") as f:
    while True:
        b = f.read(4096)
        if not b:
            break
        if b != zero:
            n += 1
print(n)
PY
)
echo "build-rootfs: $output ($image_size, $nonzero_blocks non-zero 4 KiB blocks)" >&2
echo "$output"
