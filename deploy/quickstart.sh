#!/usr/bin/env bash
# One-command start on a fresh Debian machine: installs what magpie needs, builds it, and runs the
# main job against the embedded default (a repository in a local directory): stores /etc as a
# snapshot, lists it, and verifies every byte. Safe to run again: each run adds a snapshot.
#
#   bash deploy/quickstart.sh [DIR-TO-BACK-UP]      (default /etc; state goes to ./magpie-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir=${1:-/etc}
demo=${MAGPIE_DEMO_DIR:-$PWD/magpie-demo}

bash deploy/install-deps.sh
cargo build --release -p magpie-collector
collector=$PWD/target/release/collector

mkdir -p "$demo"
chmod 700 "$demo"
if [ ! -f "$demo/passphrase" ]; then
    # A random passphrase, readable by root only: keep a copy somewhere safe.
    head -c 24 /dev/urandom | base64 > "$demo/passphrase"
    chmod 600 "$demo/passphrase"
fi
export MAGPIE_REPOSITORY="$demo/repo"
pass=(--passphrase-file "$demo/passphrase")

[ -f "$demo/repo/config" ] || "$collector" init "${pass[@]}"
"$collector" import "$source_dir" --source "$(basename "$source_dir")" --role config "${pass[@]}"
"$collector" list "${pass[@]}"
"$collector" check --verify-data "${pass[@]}"
echo
echo "repository: $demo/repo   passphrase: $demo/passphrase"
echo "try: $collector ls latest -r $demo/repo --passphrase-file $demo/passphrase"
