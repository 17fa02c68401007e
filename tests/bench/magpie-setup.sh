# Shared by the bench scripts: a CA and certificates, an agent serving one path source, and a
# collector pulling it, all on loopback (so by default the wire is not compressed). Source it, then:
#   magpie_setup DIR CORPUS REPOSITORY_TOML   (writes DIR/agent.toml and DIR/collector.toml)
#   magpie_start_agent DIR                    (sets agent_pid)
# Expects $bin (the release binaries' folder).

magpie_setup() {
    local m=$1 corpus=$2 repository=$3
    rm -rf "$m" && mkdir -p "$m"
    "$bin/collector" certs init --dir "$m/pki" >/dev/null
    "$bin/collector" certs issue agent agent --san 127.0.0.1 --dir "$m/pki" >/dev/null
    "$bin/collector" certs issue collector collector --dir "$m/pki" >/dev/null
    local fp port
    fp=$("$bin/collector" certs fingerprint "$m/pki/collector.pem")
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "$m/agent.toml" <<T
listen = "127.0.0.1:$port"
[tls]
cert = "$m/pki/agent.pem"
key = "$m/pki/agent-key.pem"
client_ca = "$m/pki/ca.pem"
allowed_collectors = ["$fp"]
[[source]]
name = "corpus"
kind = "path"
roots = ["$corpus"]
T
    echo "bench passphrase" > "$m/pass"
    cat > "$m/collector.toml" <<T
$repository
passphrase_file = "$m/pass"
cache_dir = "$m/cache"
[tls]
ca = "$m/pki/ca.pem"
cert = "$m/pki/collector.pem"
key = "$m/pki/collector-key.pem"
[[agent]]
name = "bench"
endpoint = "https://127.0.0.1:$port"
T
}

magpie_start_agent() {
    "$bin/agent" serve --config "$1/agent.toml" 2> "$1/agent.log" &
    agent_pid=$!
    sleep 1
}
