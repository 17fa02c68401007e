#!/usr/bin/env bash
# Installs what building and testing magpie needs on Debian. Idempotent; run as root.
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
if ! command -v cargo >/dev/null; then
    # Debian's own toolchain; magpie needs Rust 1.90 or newer (trixie-backports or rustup).
    need+=(cargo rustc)
fi
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
