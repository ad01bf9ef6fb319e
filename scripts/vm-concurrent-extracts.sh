#!/usr/bin/env bash
# Boots a file-restore VM (TCG, vhost-device-vsock) serving an ext4 image of
# 30,000 small files in 1,500 directories, runs N whole-volume extractions at
# once, and prints how each ended, the write shortages the agent waited out
# (README.rst, "Concurrent extractions in a small VM"), its peak RSS and the
# time taken.
#
#   scripts/vm-concurrent-extracts.sh [N] [MEMORY_MIB] [TIMEOUT_S]
#
# Defaults: 4 extractions, 128 MiB, 150 s per extraction. Needs a release
# build (cargo build --release), scripts/build-vm-image.sh done, qemu and
# vhost-device-vsock. Everything it makes is under one temporary directory,
# removed at the end.
set -euo pipefail
n=${1:-4}
mem=${2:-128}
timeout_s=${3:-150}
root=$(cd "$(dirname "$0")/.." && pwd)
client=$root/target/release/restore-client
vhost=$(command -v vhost-device-vsock || echo "$HOME/.cargo/bin/vhost-device-vsock")
work=$(mktemp -d)
export RESTORE_AGENT_RUN_DIR=$work/run
mkdir -p "$RESTORE_AGENT_RUN_DIR"
cleanup() {
    "$client" vm stop cx >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work/src" <<'EOF'
import os, random, sys
rng = random.Random(7)
for d in range(1500):
    sub = os.path.join(sys.argv[1], f"d{d:04}", "sub")
    os.makedirs(sub)
    for f in range(20):
        with open(os.path.join(sub, f"f{f:02}.txt"), "wb") as fh:
            fh.write(rng.randbytes(3000))
EOF
truncate -s 400M "$work/img"
PATH=/usr/sbin:/sbin:$PATH mkfs.ext4 -q -F -d "$work/src" "$work/img"

"$client" vm start --name cx --image "disk0=$work/img" --accel tcg \
    --vsock vhost-user --memory "$mem" --image-dir "$root/target/vm" \
    --vhost-device-vsock "$vhost" >/dev/null
echo "VM of $mem MiB: $("$client" --vm cx --output json status |
    python3 -c 'import json,sys; print("streams", json.load(sys.stdin)["streams"])')"
start=$(date +%s.%N)
for i in $(seq "$n"); do
    (
        set +e +o pipefail
        timeout "$timeout_s" "$client" --vm cx extract attached disk0 raw / - \
            2>"$work/err.$i" >"$work/out.$i"
        status=$?
        echo "extract $i: exit $status, $(stat -c %s "$work/out.$i") bytes" \
            "$(head -c 200 "$work/err.$i")"
        rm -f "$work/out.$i"
    ) &
done
wait
end=$(date +%s.%N)
"$client" vm stop cx --keep-logs >/dev/null
grep -h "short of memory\|shortage ended\|writing an answer failed\|peak RSS" \
    "$RESTORE_AGENT_RUN_DIR/cx/console.log" || true
echo "all extractions ended after $(echo "$end - $start" | bc) s"
