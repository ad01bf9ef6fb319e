#!/usr/bin/env bash
# Builds the file-restore VM image into target/vm/:
#   vmlinux         Debian's kernel, uncompressed (QEMU boots it through its
#                   PVH note, seconds faster under TCG than the bzImage)
#   initramfs.cpio  newc archive: the static (musl) agent as /init and the
#                   virtio, vsock, virtio_blk and 9p modules, loaded in order
# Needs: rustup target x86_64-unknown-linux-musl, musl-tools, xz-utils, and
# apt-get access to Debian's linux-image-amd64 (or KERNEL_DEB=/path/to.deb).
# The kernel package is cached in target/vm/cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/vm
cache=$out/cache
mkdir -p "$cache"

# Modules in load order: each after the ones it depends on (from .modinfo).
modules=(
  drivers/virtio/virtio_ring drivers/virtio/virtio
  drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci_legacy_dev
  drivers/virtio/virtio_pci
  net/vmw_vsock/vsock net/vmw_vsock/vmw_vsock_virtio_transport_common
  net/vmw_vsock/vmw_vsock_virtio_transport
  drivers/block/virtio_blk
  net/9p/9pnet net/9p/9pnet_virtio fs/netfs/netfs fs/fscache/fscache fs/9p/9p
)

# 1. The agent, static and stripped.
echo "build-vm-image: building the static agent" >&2
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
  cargo build --locked --release --quiet --target x86_64-unknown-linux-musl --bin restore-agent
agent=target/x86_64-unknown-linux-musl/release/restore-agent

# 2. The kernel package.
deb=${KERNEL_DEB:-}
if [ -z "$deb" ]; then
  deb=$(ls "$cache"/linux-image-*.deb 2>/dev/null | head -n1 || true)
fi
if [ -z "$deb" ]; then
  resolve() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1; }
  pkg=$(resolve)
  if [ -z "$pkg" ]; then
    # A fresh machine may have no package lists yet.
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    pkg=$(resolve)
  fi
  [ -n "$pkg" ] || { echo "build-vm-image: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
  echo "build-vm-image: downloading $pkg" >&2
  (cd "$cache" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  deb=$(ls "$cache"/linux-image-*.deb 2>/dev/null | head -n1 || true)
  [ -n "$deb" ] || { echo "build-vm-image: apt-get download $pkg failed" >&2; exit 1; }
fi
kdir=$cache/kernel
if [ ! -e "$kdir/.unpacked" ] || [ "$deb" -nt "$kdir/.unpacked" ]; then
  rm -rf "$kdir"
  dpkg -x "$deb" "$kdir"
  touch "$kdir/.unpacked"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n1)
moddir=$(ls -d "$kdir"/lib/modules/*/kernel | head -n1)

# 3. vmlinux: the xz stream inside the bzImage.
offset=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1)
[ -n "$offset" ] || { echo "build-vm-image: no xz payload in $vmlinuz" >&2; exit 1; }
# (xz stops reading at the end of the stream: no pipe, so no SIGPIPE to tail)
xz -dc --single-stream < <(tail -c +$((offset + 1)) "$vmlinuz") > "$out/vmlinux.tmp"
[ "$(head -c 4 "$out/vmlinux.tmp" | od -An -c | tr -d ' ')" = '177ELF' ] \
  || { echo "build-vm-image: the payload of $vmlinuz is not an ELF kernel" >&2; exit 1; }
mv "$out/vmlinux.tmp" "$out/vmlinux"

# 4. The initramfs.
paths=()
for m in "${modules[@]}"; do
  f=$moddir/$m.ko
  [ -f "$f" ] || { echo "build-vm-image: module $m.ko not in $deb" >&2; exit 1; }
  paths+=("$f")
done
cargo run --locked --quiet --example mkinitramfs -- "$out/initramfs.cpio.tmp" "$agent" "${paths[@]}"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
echo "build-vm-image: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1)), $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1))" >&2
