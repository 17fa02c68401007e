#!/usr/bin/env bash
# Pull throughput into an S3-compatible repository (moto's server on loopback) against a
# local-folder repository, from the same agent and corpus, and the requests per GiB stored.
#
#   bash tests/bench/s3-bench.sh [SIZE_MB]        (default 1000; work in $BENCH_DIR or /tmp)
#
# moto is a Python server holding objects in memory: absolute figures say more about it than
# about AWS; the request count per GiB is what carries over.
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mb=${1:-1000}
work=${BENCH_DIR:-$(mktemp -d /tmp/magpie-s3-bench.XXXXXX)}
mkdir -p "$work"
python3 -c 'import moto' 2>/dev/null || python3 -m pip install -q 'moto[server]'
cargo build --release -p magpie-agent -p magpie-collector
bin=$PWD/target/release
. tests/bench/magpie-setup.sh

corpus=$work/corpus
python3 - "$corpus" "$size_mb" <<'PY'
import os, random, shutil, sys
root, budget = sys.argv[1], int(sys.argv[2]) * 1_000_000
rnd = random.Random(42)
shutil.rmtree(root, ignore_errors=True)
os.makedirs(os.path.join(root, "text"))
words = open("/usr/share/common-licenses/GPL-3").read().split()
used, i = 0, 0
while used < budget * 0.4:  # compressible text files
    body = " ".join(rnd.choice(words) for _ in range(rnd.randint(2_000, 200_000))).encode()
    open(os.path.join(root, "text", f"t{i:05}.txt"), "wb").write(body)
    used, i = used + len(body), i + 1
os.makedirs(os.path.join(root, "blobs"))
while used < budget:  # incompressible uploads
    s = rnd.randint(100_000, 8_000_000)
    open(os.path.join(root, "blobs", f"b{i:05}.bin"), "wb").write(rnd.randbytes(s))
    used, i = used + s, i + 1
PY

s3port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m moto.server -H 127.0.0.1 -p "$s3port" 2> "$work/moto.log" &
moto_pid=$!
trap 'kill $moto_pid ${agent_pid:-} 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$s3port" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf -X PUT "http://127.0.0.1:$s3port/bench" >/dev/null
printf 'AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\n' > "$work/s3.credentials"

m=$work/magpie
magpie_setup "$m" "$corpus" "repository = \"$m/repo\""
magpie_start_agent "$m"
sed "s|^repository = .*|repository = \"s3://bench/repo\"|" "$m/collector.toml" > "$m/collector-s3.toml"
printf '[s3]\nendpoint = "http://127.0.0.1:%s"\ncredentials_file = "%s"\n' "$s3port" "$work/s3.credentials" >> "$m/collector-s3.toml"

pull() {
    local config=$1
    "$bin/collector" --config "$config" init --kdf-memory-mib 8 --kdf-iterations 1 >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1
    t0=$(date +%s.%N)
    "$bin/collector" --config "$config" pull --json > "$work/pull.json"
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}
local_s=$(pull "$m/collector.toml")
before=$(grep -c '" [0-9][0-9][0-9] ' "$work/moto.log" || true)
s3_s=$(pull "$m/collector-s3.toml")
requests=$(grep -c '" [0-9][0-9][0-9] ' "$work/moto.log" || true)
stored=$(du -sb "$m/repo" | cut -f1)
python3 - "$size_mb" "$local_s" "$s3_s" "$((requests - before))" "$stored" "$work/moto.log" <<'PY'
import re, sys, collections
size_mb, local_s, s3_s, requests, stored, log = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
kinds = collections.Counter(m.group(1) for m in re.finditer(r'"(GET|PUT|POST|HEAD|DELETE) ', open(log).read()))
gib = stored / 2**30
print(f"corpus {size_mb} MB, repository {stored/1e6:.0f} MB")
print(f"local folder: {local_s:.2f} s ({size_mb/local_s:.0f} MB/s)")
print(f"S3 (moto):    {s3_s:.2f} s ({size_mb/s3_s:.0f} MB/s), {s3_s/local_s:.2f}x the local time, {local_s/s3_s:.2f}x its throughput")
print(f"requests for the S3 pull: {requests} ({requests/gib:.0f} per GiB stored); by method {dict(kinds)}")
PY
