#!/usr/bin/env bash
# Installs what building and testing magpie needs on Debian: a C toolchain, Rust 1.90 or newer
# with clippy and rustfmt, and the database servers and tools the dump tests start their own
# throwaway instances of (PostgreSQL with pgbench, MariaDB, Redis, an SMTP server, sshd, an S3
# server, a Docker engine), and systemd-analyze for the units in deploy/. Idempotent; run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v curl >/dev/null || need+=(curl ca-certificates)
compgen -G '/usr/lib/postgresql/*/bin/pgbench' >/dev/null || need+=(postgresql postgresql-contrib)
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
command -v mariadb-dump >/dev/null || need+=(mariadb-client)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
# The run tests mail through aiosmtpd (for Debian's own python3) and verify the systemd units.
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need+=(python3-aiosmtpd)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The S3 tests start moto's S3-compatible server (PyPI), through the python3 on PATH.
python3 -c 'import moto.server' 2>/dev/null || python3 -m pip install -q 'moto[server]'
# The SSH transport's tests start their own sshd.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
# The Docker volume tests start their own engine, and build their image from busybox-static.
command -v dockerd >/dev/null || need+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi

rust_ok() {
    command -v cargo >/dev/null || return 1
    local v
    v=$(cargo --version | awk '{print $2}')
    [ "$(printf '%s\n1.90.0\n' "$v" | sort -V | head -n1)" = 1.90.0 ]
}
if ! rust_ok; then
    # Debian's own rustc is older than the 2024 edition needs: use rustup's stable toolchain.
    if ! command -v rustup >/dev/null; then
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    rustup toolchain install stable --profile minimal
    rustup default stable
fi
if command -v rustup >/dev/null; then
    rustup component add clippy rustfmt >/dev/null 2>&1 || true
fi
rust_ok || { echo "install-deps: need Rust 1.90 or newer (cargo --version says $(cargo --version 2>&1))" >&2; exit 1; }
