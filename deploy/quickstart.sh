#!/usr/bin/env bash
# One command on a fresh Debian machine: installs what magpie needs, builds it, and runs the
# timer's job, `collector run`, against the embedded default: an agent on 127.0.0.1 serving one
# folder and a SQLite database, a collector with its own CA and certificates, and an encrypted
# repository in a local directory. It runs, lists the snapshots, shows the restore-readiness
# status, restores everything into a folder and verifies every byte. Run it again and the second
# pull moves only what changed.
#
#   bash deploy/quickstart.sh [FOLDER]       (default /etc; state in ./magpie-demo or $MAGPIE_DEMO_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
folder=$(realpath "${1:-/etc}")
demo=$(realpath -m "${MAGPIE_DEMO_DIR:-$PWD/magpie-demo}")

bash deploy/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release -p magpie-agent -p magpie-collector
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

mkdir -p "$demo"
chmod 700 "$demo"
if [ ! -f "$demo/certs/ca.pem" ]; then
    "$bin/collector" certs init --dir "$demo/certs"
    "$bin/collector" certs issue agent agent --san 127.0.0.1 --dir "$demo/certs"
    "$bin/collector" certs issue collector collector --dir "$demo/certs"
fi
if [ ! -f "$demo/app.sqlite" ]; then
    # A small application database, backed up through SQLite's online backup API.
    /usr/bin/python3 - "$demo/app.sqlite" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
db.executemany("INSERT INTO notes (body) VALUES (?)", [("note %d" % i,) for i in range(1000)])
db.commit()
PY
fi
if [ ! -f "$demo/passphrase" ]; then
    # A random passphrase, readable by its owner only: keep a copy somewhere safe.
    (umask 077; head -c 24 /dev/urandom | base64 > "$demo/passphrase")
fi
port=${MAGPIE_DEMO_PORT:-7443}
cat > "$demo/agent.toml" <<T
listen = "127.0.0.1:$port"
[tls]
cert = "$demo/certs/agent.pem"
key = "$demo/certs/agent-key.pem"
client_ca = "$demo/certs/ca.pem"
allowed_collectors = ["$("$bin/collector" certs fingerprint "$demo/certs/collector.pem")"]
[[source]]
name = "$(basename "$folder")"
kind = "path"
roots = ["$folder"]
role = "config"
category = "server-config"
[[source]]
name = "app-db"
kind = "sqlite"
path = "$demo/app.sqlite"
category = "user-source-data"
[spool]
dir = "$demo/spool"
T
cat > "$demo/collector.toml" <<T
repository = "$demo/repo"
passphrase_file = "$demo/passphrase"
cache_dir = "$demo/cache"
state_dir = "$demo/state"
[retention]
keep_daily = 7
keep_weekly = 4
keep_monthly = 6
[run]
metrics_file = "$demo/magpie.prom"
[tls]
ca = "$demo/certs/ca.pem"
cert = "$demo/certs/collector.pem"
key = "$demo/certs/collector-key.pem"
[[agent]]
name = "localhost"
endpoint = "https://127.0.0.1:$port"
T
"$bin/agent" check-config --config "$demo/agent.toml"
"$bin/agent" serve --config "$demo/agent.toml" 2> "$demo/agent.log" &
agent_pid=$!
trap 'kill $agent_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done

c=("$bin/collector" --config "$demo/collector.toml")
[ -f "$demo/repo/config" ] || "${c[@]}" init
"${c[@]}" run
"${c[@]}" list
"${c[@]}" status || true
rm -rf "$demo/restored"
"${c[@]}" restore --target-dir "$demo/restored"
"${c[@]}" check --verify-data
echo
echo "repository $demo/repo, passphrase $demo/passphrase, agent log $demo/agent.log"
echo "restored into $demo/restored; metrics in $demo/magpie.prom"
echo "look inside: ${c[*]} ls latest -R | head"
