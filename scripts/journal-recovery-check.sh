#!/usr/bin/env bash
# Checks the agent's ext journal recovery against the kernel's on journals
# the kernel itself wrote: an ext4 image is mounted (loop, commit=1) and
# written to while the kernel's writeback of metadata is held off, and copied
# after each round, so that each copy is crash-consistent with transactions
# in its journal that are not yet in their home blocks. For each copy:
#   truth    e2fsck -fy on a copy (the kernel's recovery code), mounted
#            read-only;
#   agent    restore-client extract of / through the agent (the image
#            attached with --image), which recovers in memory;
#   on disk  debugfs rdump without recovery, to show what recovery changes.
# The agent's tree must equal the truth. Needs root (mount, sysctl), e2fsprogs
# and release binaries (cargo build --release). Not run by the test suite: it
# changes vm.dirty_writeback_centisecs and vm.dirty_expire_centisecs for a
# few seconds (restored on exit). Usage: scripts/journal-recovery-check.sh
# [ROUNDS]
set -euo pipefail
rounds=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
[ "$(id -u)" = 0 ] || { echo "needs root (mount, sysctl)" >&2; exit 2; }
[ -x "$bin/restore-agent" ] && [ -x "$bin/restore-client" ] \
  || { echo "build first: cargo build --release" >&2; exit 2; }

work=$(mktemp -d /tmp/journal-check.XXXXXX)
writeback=$(cat /proc/sys/vm/dirty_writeback_centisecs)
expire=$(cat /proc/sys/vm/dirty_expire_centisecs)
agent=""
cleanup() {
  echo "$writeback" > /proc/sys/vm/dirty_writeback_centisecs
  echo "$expire" > /proc/sys/vm/dirty_expire_centisecs
  [ -z "$agent" ] || kill "$agent" 2>/dev/null || true
  for m in "$work/mnt" "$work/truth"; do
    mountpoint -q "$m" 2>/dev/null && umount "$m"
  done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
mkdir mnt truth
mkfs.ext4 -q -F -b 4096 fs.img 64M
mount -o loop,commit=1 fs.img mnt
echo 360000 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
for r in $(seq "$rounds"); do
  python3 - "$r" "$work/mnt" <<'PY'
import os, random, shutil, sys
random.seed(int(sys.argv[1]))
root = sys.argv[2]
# files created (each fsynced: a commit), whole directories removed (their
# blocks revoked, then reused), names changed
for _ in range(200):
    d = os.path.join(root, f"d{random.randrange(20)}", f"s{random.randrange(5)}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{random.randrange(1000)}"), "wb") as f:
        f.write(os.urandom(random.choice([10, 3000, 5000, 70000])))
        f.flush()
        os.fsync(f.fileno())
for _ in range(5):
    d = os.path.join(root, f"d{random.randrange(20)}")
    if os.path.isdir(d) and random.random() < 0.5:
        shutil.rmtree(d)
for dirpath, _, files in os.walk(root):
    for n in files:
        if random.random() < 0.1:
            os.rename(os.path.join(dirpath, n), os.path.join(dirpath, n + ".r"))
PY
  sleep 3  # a few commits; the home blocks stay behind
  cp --sparse=always fs.img "snap$r.img"
done
umount mnt
echo "$writeback" > /proc/sys/vm/dirty_writeback_centisecs
echo "$expire" > /proc/sys/vm/dirty_expire_centisecs

failed=0
head -c 24 /dev/urandom | base64 > ticket
chmod 600 ticket
for r in $(seq "$rounds"); do
  img=snap$r.img
  cp --sparse=always "$img" fixed.img
  e2fsck -fy fixed.img > /dev/null 2>&1 || true
  mount -o loop,ro fixed.img truth
  rm -rf ondisk agent.out
  mkdir ondisk
  debugfs -R "rdump / ondisk" "$img" > /dev/null 2>&1
  RUST_LOG=debug "$bin/restore-agent" --listen "unix:$work/agent.sock" --ticket-file ticket \
    --idle-timeout 0 --image "x=$work/$img" 2> agent.log &
  agent=$!
  for _ in $(seq 50); do [ -S agent.sock ] && break; sleep 0.1; done
  "$bin/restore-client" --connect "unix:$work/agent.sock" --ticket-file ticket \
    extract attached x raw / -o agent.out > /dev/null
  kill "$agent"; wait "$agent" || true; agent=""
  replayed=$(grep -o 'journal recovered, [0-9]* blocks' agent.log | head -1 || true)
  stale=$(diff -rq truth ondisk 2>/dev/null | grep -vc lost+found || true)
  if diff -rq --no-dereference truth agent.out > diff.txt 2>&1; then
    echo "round $r: agent = kernel recovery (${replayed:-no recovery}; without it $stale paths differ)"
  else
    echo "round $r: agent DIFFERS from kernel recovery:"; head -20 diff.txt
    failed=1
  fi
  umount truth
done
exit $failed
