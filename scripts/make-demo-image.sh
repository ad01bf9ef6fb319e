#!/usr/bin/env bash
# Builds demo/disk.img.zst, the small GPT disk that `restore-agent --demo`
# serves: partition 1 is ext4 ("demo-root"), partition 2 is FAT ("DEMO-EFI").
# Needs e2fsprogs, dosfstools, mtools, gdisk and zstd. Run it only to change
# the demo; the result is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

src="$work/root"
mkdir -p "$src/etc" "$src/home/alice/notes" "$src/var/log"
printf 'demo-host\n' > "$src/etc/hostname"
printf 'Welcome to the restore-agent demo.\n' > "$src/etc/motd"
printf 'milk\neggs\nbread\n' > "$src/home/alice/notes/shopping.txt"
printf '# Notes\n\nRestored with restore-agent.\n' > "$src/home/alice/notes/README.md"
seq 1 2000 | sed 's/^/line /' > "$src/var/log/app.log"
ln -s notes/README.md "$src/home/alice/readme-link"
chmod 0600 "$src/home/alice/notes/shopping.txt"
find "$src" -exec touch -h -d '2026-01-01 12:00:00 UTC' {} +

mkfs.ext4 -q -F -L demo-root -d "$src" -E root_owner=0:0 "$work/ext4.img" 8M
truncate -s 6M "$work/fat.img"
mkfs.vfat -n DEMO-EFI "$work/fat.img" >/dev/null
printf 'menuentry demo\n' > "$work/grub.cfg"
MTOOLS_SKIP_CHECK=1 mmd -i "$work/fat.img" ::/EFI ::/EFI/demo
MTOOLS_SKIP_CHECK=1 mcopy -i "$work/fat.img" "$work/grub.cfg" ::/EFI/demo/grub.cfg

disk="$work/disk.img"
truncate -s 16M "$disk"
sgdisk -n 1:2048:+8M -t 1:8300 -c 1:root -n 2:0:+6M -t 2:ef00 -c 2:efi "$disk" >/dev/null
start1=$(sgdisk -i 1 "$disk" | awk '/First sector/ {print $3}')
start2=$(sgdisk -i 2 "$disk" | awk '/First sector/ {print $3}')
dd if="$work/ext4.img" of="$disk" bs=512 seek="$start1" conv=notrunc status=none
dd if="$work/fat.img" of="$disk" bs=512 seek="$start2" conv=notrunc status=none
zstd -q -19 -f "$disk" -o demo/disk.img.zst
ls -l demo/disk.img.zst
