#!/bin/bash
# Builds the VM-test guest from Debian packages into a cache directory (default ./.cache/guest,
# never committed): vmlinuz (Debian cloud kernel) and initramfs.cpio (busybox, the virtio modules,
# qemu_fw_cfg, e2fsprogs, fio and their shared libraries, and /files: a set of real files taken from
# Debian packages for the filesystem tests). Idempotent: when the cache matches this script and the
# guest init, it returns at once without touching apt.
#
# Usage: images/build-guest.sh [CACHE_DIR]     (needs: apt-get, dpkg-deb, cpio, busybox-static,
#                                               e2fsprogs, fio on the host; images/install-deps.sh)
# Env: GUEST_FILES_MIB (default 40): total size of the real files.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${1:-$repo/.cache/guest}
files_mib=${GUEST_FILES_MIB:-40}
mkdir -p "$out"
out=$(cd "$out" && pwd)

stamp_input=$(cat "$here/build-guest.sh" "$here/guest/init"; echo "files=$files_mib")
stamp=$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio" ]; then
    echo "guest image up to date in $out"
    exit 0
fi

for tool in apt-get dpkg-deb cpio ldd mke2fs e2fsck fio; do
    command -v "$tool" >/dev/null || { echo "build-guest: missing $tool (run images/install-deps.sh as root)" >&2; exit 1; }
done
busybox=/bin/busybox
file "$busybox" 2>/dev/null | grep -q 'statically linked' || busybox=$(dpkg -L busybox-static | grep -m1 '/bin/busybox$')
[ -x "$busybox" ] || { echo "build-guest: busybox-static missing" >&2; exit 1; }

work="$out/work"
rm -rf "$work"
mkdir -p "$work/debs" "$work/x" "$work/root"
cd "$work/debs"

# The newest 6.1 cloud kernel in the configured apt sources.
kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | cut -d' ' -f1 | sort -V | tail -1)
[ -n "$kpkg" ] || { echo "build-guest: no linux-image-6.1.0-*-cloud-amd64 in apt (apt-get update?)" >&2; exit 1; }
# apt-get download drops privileges to _apt: give it a directory it can write.
chmod 777 "$work/debs"
apt-get download -q "$kpkg" python3.11-doc libpython3.11-stdlib >/dev/null
for deb in *.deb; do dpkg-deb -x "$deb" "$work/x"; done

root="$work/root"
mkdir -p "$root"/{bin,sbin,modules,etc,lib64,lib/x86_64-linux-gnu,proc,sys,dev,tmp,mnt,files}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
kver=${kpkg#linux-image-}
cp "$work/x/boot/vmlinuz-$kver" "$out/vmlinuz.new"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk qemu_fw_cfg; do
    f=$(find "$work/x/lib/modules/$kver" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "build-guest: module $m not in $kpkg" >&2; exit 1; }
    case "$f" in
        *.ko) cp "$f" "$root/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$f" > "$root/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" > "$root/modules/$m.ko" ;;
        *) echo "build-guest: unknown module format $f" >&2; exit 1 ;;
    esac
done

# Host binaries (Debian 12 packages) with every shared library ldd names.
bins=(/sbin/mke2fs /sbin/e2fsck /sbin/tune2fs /sbin/dumpe2fs "$(command -v fio)")
for b in "${bins[@]}"; do
    cp -L "$b" "$root/sbin/"
    ldd "$b" | awk '/=> \//{print $3} /^[[:space:]]*\/lib64\//{print $1}' | while read -r lib; do
        case "$lib" in
            */ld-linux-x86-64.so.2) cp -Ln "$lib" "$root/lib64/" ;;
            *) cp -Ln "$lib" "$root/lib/x86_64-linux-gnu/" ;;
        esac
    done
done
ln -s mke2fs "$root/sbin/mkfs.ext4"
ln -s e2fsck "$root/sbin/fsck.ext4"
cp /etc/mke2fs.conf "$root/etc/"
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"

# Real files: Python documentation and standard library, in a stable order, up to the size cap.
cap=$((files_mib * 1024 * 1024))
(cd "$work/x" && find usr/share/doc/python3.11 usr/lib/python3.11 -type f ! -name '*.gz' | LC_ALL=C sort) \
    | while read -r f; do
        size=$(stat -c %s "$work/x/$f")
        total=$(( ${total:-0} + size ))
        [ "$total" -le "$cap" ] || break
        mkdir -p "$root/files/$(dirname "$f")"
        cp "$work/x/$f" "$root/files/$f"
    done
echo "real files: $(find "$root/files" -type f | wc -l) files, $(du -sb "$root/files" | cut -f1) bytes"

cp "$here/guest/init" "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out/initramfs.cpio.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initramfs.cpio.new" "$out/initramfs.cpio"
echo "$kpkg" > "$out/kernel-package"
echo "$stamp" > "$out/stamp"
rm -rf "$work"
echo "guest image built in $out ($kpkg, initramfs $(du -h "$out/initramfs.cpio" | cut -f1))"
