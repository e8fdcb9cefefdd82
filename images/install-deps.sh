#!/bin/bash
# Installs what the VM tests need on a Debian 12 host: QEMU 10 from bookworm-backports (Debian 12's
# own 7.2 is too old and would replace a backports qemu-utils) and the tools the guest build uses.
# Idempotent: does nothing when everything is present. Must run as root to install anything.
set -euo pipefail

need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-storage-daemon >/dev/null \
    || ! command -v qemu-img >/dev/null; then
    need_qemu=1
elif ! qemu-system-x86_64 --version | grep -qE 'version (9|[1-9][0-9])\.'; then
    need_qemu=1
fi

host_pkgs=(cpio busybox-static e2fsprogs fio python3 xz-utils zstd)
missing=()
for p in "${host_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done

if [ "$need_qemu" = 0 ] && [ ${#missing[@]} = 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing: ${missing[*]} $( [ $need_qemu = 1 ] && echo 'qemu 10 (bookworm-backports)'); run as root to install" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if [ "$need_qemu" = 1 ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo 'deb http://deb.debian.org/debian bookworm-backports main' \
            > /etc/apt/sources.list.d/bookworm-backports.list
    fi
fi
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ "$need_qemu" = 1 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils qemu-block-extra
fi
qemu-system-x86_64 --version | head -1
