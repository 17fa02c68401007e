#!/usr/bin/env bash
# End-to-end benchmark: magpie (agent + collector over mTLS on loopback) against borg and restic
# (Debian's packages) on the same corpus, day 1, day 2 (a few percent changed), and day 2 again
# unchanged; rsync's wire bytes as the reference for day 2. Prints wall time, peak RSS and CPU
# seconds of every process, repository size and wire bytes, with magpie/peer ratios. magpie runs
# twice: as configured by default (over loopback the wire is not compressed) and as magpie-z with
# `compress = true`, the default for an agent on another host.
#
#   bash tests/bench/pull-bench.sh [SIZE_MB]        (default 2000; work in $BENCH_DIR or /tmp)
#
# Not part of the test suite: timings belong in reports, not assertions.
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mb=${1:-2000}
work=${BENCH_DIR:-$(mktemp -d /tmp/magpie-bench.XXXXXX)}
mkdir -p "$work"
echo "work folder: $work, corpus ~${size_mb} MB"

need=()
command -v borg >/dev/null || need+=(borgbackup)
command -v restic >/dev/null || need+=(restic)
command -v rsync >/dev/null || need+=(rsync)
[ -x /usr/bin/time ] || need+=(time)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
cargo build --release -p magpie-agent -p magpie-collector
bin=$PWD/target/release

corpus=$work/corpus
# ---- the corpus: text, binaries, already-compressed files and a database dump ----------------
python3 - "$corpus" "$size_mb" <<'PY'
import os, random, sys, shutil, zlib
root, size_mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
shutil.rmtree(root, ignore_errors=True)
os.makedirs(root)
budget = size_mb * 1_000_000
def copytree_budget(src, dst, limit):
    used = 0
    for d, _, files in os.walk(src):
        for f in sorted(files):
            p = os.path.join(d, f)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            s = os.path.getsize(p)
            if used + s > limit:
                return used
            t = os.path.join(dst, os.path.relpath(p, src))
            os.makedirs(os.path.dirname(t), exist_ok=True)
            try:
                shutil.copy2(p, t)
            except OSError:
                continue
            used += s
    return used
# System text, man pages (gzip: already compressed) and binaries, up to half the budget.
used = 0
for src, share in [("/usr/share", 0.30), ("/usr/lib/x86_64-linux-gnu", 0.15), ("/usr/bin", 0.05)]:
    used += copytree_budget(src, os.path.join(root, src.strip("/").replace("/", "_")), int(budget * share))
# A database dump as pg_dump writes it (header, DDL, COPY rows), about 30% of the budget.
words = open("/usr/share/common-licenses/GPL-3").read().split()
rows = []
target = int(budget * 0.30)
n = 0
with open(os.path.join(root, "app-db.sql"), "w") as f:
    f.write("--\n-- PostgreSQL database dump\n--\n\n-- Dumped from database version 15.14\n"
            "-- Dumped by pg_dump version 15.14\n\nSET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n\n"
            "CREATE TABLE public.posts (\n    id integer NOT NULL,\n    author text,\n    body text\n);\n\n"
            "COPY public.posts (id, author, body) FROM stdin;\n")
    while f.tell() < target:
        n += 1
        body = " ".join(rnd.choice(words) for _ in range(rnd.randint(10, 80)))
        f.write(f"{n}\tuser{rnd.randint(1, 5000)}\t{body}\n")
    f.write("\\.\n")
# Random binary blobs (uploads), the rest of the budget.
blobs = os.path.join(root, "blobs")
os.makedirs(blobs)
left = budget - sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
i = 0
while left > 0:
    s = min(left, rnd.randint(100_000, 8_000_000))
    with open(os.path.join(blobs, f"blob-{i:05}.bin"), "wb") as f:
        f.write(rnd.randbytes(s))
    left -= s
    i += 1
PY
day2() {
python3 - "$corpus" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(7)
# The dump: 2% of rows updated (moved to the end, as PostgreSQL does), 1% new rows.
p = os.path.join(root, "app-db.sql")
lines = open(p).read().split("\n")
copy = next(i for i, l in enumerate(lines) if l.startswith("COPY "))
head, body, tail = "\n".join(lines[:copy + 1]), [l for l in lines[copy + 1:] if l and l != "\\."], "\\."
updated = {i for i in range(len(body)) if rnd.random() < 0.02}
moved = [body[i] + " edited" for i in sorted(updated)]
kept = [l for i, l in enumerate(body) if i not in updated]
new = [f"{len(body) + i}\tnew{i}\tfresh row {i}" for i in range(len(body) // 100)]
open(p, "w").write("\n".join([head] + kept + moved + new + [tail, ""]))
# A few blobs added, one rewritten; a few text files edited.
blobs = os.path.join(root, "blobs")
for i in range(5):
    open(os.path.join(blobs, f"new-{i}.bin"), "wb").write(rnd.randbytes(2_000_000))
names = sorted(os.listdir(blobs))
open(os.path.join(blobs, names[0]), "wb").write(rnd.randbytes(3_000_000))
edited = 0
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith((".txt", ".html", ".py")) and rnd.random() < 0.05:
            with open(os.path.join(d, f), "a") as fh:
                fh.write("\nedited on day 2\n")
            edited += 1
PY
}

# ---- magpie ---------------------------------------------------------------------------------
m=$work/magpie
. tests/bench/magpie-setup.sh
magpie_setup "$m" "$corpus" "repository = \"$m/repo\""
"$bin/collector" --config "$m/collector.toml" init >/dev/null
# The same pull with the wire compressed, as the default is for an agent on another host.
mz=$work/magpie-z
mkdir -p "$mz"
sed -e "s#$m/repo#$mz/repo#; s#$m/cache#$mz/cache#" "$m/collector.toml" > "$mz/collector.toml"
echo "compress = true" >> "$mz/collector.toml"
"$bin/collector" --config "$mz/collector.toml" init >/dev/null

export BORG_PASSPHRASE="bench passphrase" RESTIC_PASSWORD="bench passphrase" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
borg init -e repokey-blake2 "$work/borg" >/dev/null
restic init -q -r "$work/restic" >/dev/null
results=$work/results.tsv
: > "$results"

# Steal ticks and all ticks of the machine so far: on a virtual machine the host may take CPU
# from it, which slows whichever tool runs then; the report shows how much it took.
ticks() { awk '/^cpu / {print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

# measure NAME DAY command… : wall seconds, peak RSS (KiB), CPU seconds (user + system) of the
# command and the share of the machine's time stolen meanwhile (%)
measure() {
    local name=$1 day=$2
    shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    read -r steal0 all0 < <(ticks)
    /usr/bin/time -f "%e %M %U %S" -o "$work/time.out" "$@" > "$work/$name-$day.out" 2>&1
    read -r steal1 all1 < <(ticks)
    read -r secs kib user sys < "$work/time.out"
    echo -e "$name\t$day\t$secs\t$kib\t$(python3 -c "print($user + $sys, round(100 * ($steal1 - $steal0) / max(1, $all1 - $all0)))" | tr ' ' '\t')" >> "$results"
}

# Wire bytes a pull reported (its --json output).
wire() { python3 -c 'import json,sys; print(sum(s["wire_bytes"] for s in json.load(open(sys.argv[1]))))' "$1"; }
agent_rss() { grep VmHWM "/proc/$1/status" | awk '{print $2}'; }
# CPU seconds the agent has used so far (it serves every day, so each day is a difference).
# Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name.
agent_cpu() { sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{print ($12 + $13) / hz}'; }

# rsync daemon for wire bytes with -z and deltas, as a pull over the network would have them.
cat > "$work/rsyncd.conf" <<T
use chroot = no
[corpus]
path = $corpus
read only = yes
T
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rsync --daemon --config="$work/rsyncd.conf" --port="$rport" --address=127.0.0.1 --no-detach &
rsync_pid=$!
magpie_start_agent "$m"
trap 'kill $agent_pid $rsync_pid 2>/dev/null || true' EXIT

# Read the corpus once before each day's runs. Every run drops this machine's page cache, but a
# virtual machine's host keeps its own: the first tool to read a changed file waited for the
# host's disk (a 600 MB dump took 1.3 s cold there, 0.4 s after), the later ones did not.
warm_host_cache() { find "$corpus" -type f -print0 | xargs -0 cat > /dev/null; }

for day in day1 day2 day2-again; do
    # After the day's changes, time for the host to write them back: without it the first
    # tool's day-2 run (magpie's) had 6-12% of the machine stolen, the later ones 0-4%.
    [ "$day" = day2 ] && day2 && sync && sleep 20
    warm_host_cache
    cpu0=$(agent_cpu $agent_pid)
    measure magpie "$day" "$bin/collector" --config "$m/collector.toml" pull --json
    echo -e "agent-cpu\t$day\t$(python3 -c "print($(agent_cpu $agent_pid) - $cpu0)")" >> "$results"
    cpu0=$(agent_cpu $agent_pid)
    measure magpie-z "$day" "$bin/collector" --config "$mz/collector.toml" pull --json
    echo -e "agent-cpu-z\t$day\t$(python3 -c "print($(agent_cpu $agent_pid) - $cpu0)")" >> "$results"
    measure borg "$day" borg create --compression zstd,3 "$work/borg::$day" "$corpus"
    measure restic "$day" restic -r "$work/restic" backup -q "$corpus"
    rsync -az --no-whole-file --stats "rsync://127.0.0.1:$rport/corpus/" "$work/rsync-copy/" > "$work/rsync-$day.out"
    wire_r=$(awk '/Total bytes received/ {gsub(",","",$4); print $4}' "$work/rsync-$day.out")
    echo -e "wire\t$day\t$(wire "$work/magpie-$day.out")\t$wire_r\t$(wire "$work/magpie-z-$day.out")" >> "$results"
    echo -e "size\t$day\t$(du -sb "$m/repo" | cut -f1)\t$(du -sb "$work/borg" | cut -f1)\t$(du -sb "$work/restic" | cut -f1)" >> "$results"
done
echo -e "agent-rss\tall\t$(agent_rss $agent_pid)" >> "$results"

python3 - "$results" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
t = collections.defaultdict(dict)
for r in rows:
    t[r[0]][r[1]] = r[2:]
days = ["day1", "day2", "day2-again"]
print(f"{'':12}" + "".join(f"{d:>34}" for d in days))
def line(label, f):
    print(f"{label:12}" + "".join(f"{f(d):>34}" for d in days))
tools = ["magpie", "magpie-z", "borg", "restic"]
for tool in tools:
    line(f"{tool} s/RSS", lambda d: f"{float(t[tool][d][0]):.1f} s, {int(t[tool][d][1])//1024} MiB")
line("CPU s", lambda d: f"{float(t['magpie'][d][2]):.1f}+{float(t['agent-cpu'][d][0]):.1f} / {float(t['borg'][d][2]):.1f} / {float(t['restic'][d][2]):.1f}")
line("CPU s -z", lambda d: f"{float(t['magpie-z'][d][2]):.1f}+{float(t['agent-cpu-z'][d][0]):.1f}")
line("steal %", lambda d: "/".join(t[tool][d][3] for tool in tools))
for m in ["magpie", "magpie-z"]:
    line(f"{m} ratio", lambda d: f"borg {float(t['borg'][d][0])/float(t[m][d][0]):.2f}x, restic {float(t['restic'][d][0])/float(t[m][d][0]):.2f}x")
line("repo bytes", lambda d: "/".join(f"{int(x)/1e6:.0f}" for x in t['size'][d]) + " MB")
line("size ratio", lambda d: f"borg {int(t['size'][d][0])/int(t['size'][d][1]):.2f}, restic {int(t['size'][d][0])/int(t['size'][d][2]):.2f}")
line("wire m/z/rsync", lambda d: f"{int(t['wire'][d][0])/1e6:.1f}/{int(t['wire'][d][2])/1e6:.1f}/{int(t['wire'][d][1] or 0)/1e6:.1f} MB")
print(f"agent peak RSS {int(t['agent-rss']['all'][0])//1024} MiB (magpie s/RSS above is the collector)")
print("(magpie: the default over loopback, wire not compressed; magpie-z: compress = true, as for a remote agent;")
print(" ratios: peer time / magpie time, magpie size / peer size; CPU s: magpie collector+agent / borg / restic;")
print(" steal %: the machine's time its host took meanwhile, magpie/magpie-z/borg/restic)")
PY
