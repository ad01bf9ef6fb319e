#!/usr/bin/env bash
# Runs the test suite on a fresh machine: installs the system tools the tests
# drive (socat, mkfs tools, partitioners, archivers) when they are missing,
# fetches the OpenRPC meta-schema, then runs `cargo test`. Extra arguments go
# to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A tools=(
  [socat]=socat [mkfs.ext4]=e2fsprogs [mkfs.vfat]=dosfstools [mcopy]=mtools
  [sgdisk]=gdisk [sfdisk]=fdisk [mkntfs]=ntfs-3g [zstd]=zstd [unzip]=unzip
  # XPRESS-compressed chunks for Windows' system-compressed NTFS files
  [wimlib-imagex]=wimtools
  [tar]=tar [node]=nodejs [npm]=npm [script]=bsdutils
  # LVM volume groups for tests/lvm.rs (written on a loop device), XFS
  [pvcreate]=lvm2 [losetup]=mount [mkfs.xfs]=xfsprogs [xfs_db]=xfsprogs
  # btrfs images made from a tree and written by the kernel
  [mkfs.btrfs]=btrfs-progs [btrfs]=btrfs-progs
  # extended attributes and ACLs set on source trees, read back after extraction
  [setfacl]=acl [setfattr]=attr
  # zip listings checked by Python's zipfile; a C shim built for a fault test
  [python3]=python3 [cc]=gcc
  # the VM image and end-to-end VM tests, the Debian package test
  [qemu-system-x86_64]=qemu-system-x86 [musl-gcc]=musl-tools [xz]=xz-utils
  [cpio]=cpio [dh]=debhelper [dpkg-buildpackage]=dpkg-dev
)
missing=()
for cmd in "${!tools[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
    || missing+=("${tools[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  # several tools come from one package
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

if [ -x scripts/fetch-openrpc-meta-schema.sh ]; then
  scripts/fetch-openrpc-meta-schema.sh
fi

# The VM tests need a static (musl) agent and vhost-device-vsock (the
# vhost-user vsock backend; only its Unix-socket mode is ever used).
export PATH="$PATH:$HOME/.cargo/bin"
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl
fi
if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  cargo install --locked --version 0.3.0 vhost-device-vsock
fi

exec cargo test --locked "$@"
