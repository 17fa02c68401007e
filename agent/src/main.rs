//! `agent`: serves a main server's declared sources, read-only, to pinned collectors over
//! mutual TLS. It never sees the repository. Logs go to stderr.

mod config;
mod docker;
mod dump;
mod readahead;
mod restore;
mod rsync;
mod server;
mod source;
mod spool;
mod stdio;
mod tls;
mod volume;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
#[command(name = "agent", version, about = "magpie agent: serves read-only sources to the collector")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the sources of the configuration.
    #[command(
        after_help = "Example (as systemd's magpie-agent.service does):\n  agent serve --config /etc/magpie/agent.toml"
    )]
    Serve {
        #[arg(long, default_value = "/etc/magpie/agent.toml")]
        config: PathBuf,
        /// Serve one connection on standard input and output (the SSH transport: the collector
        /// runs this through ssh); nothing but gRPC goes to stdout, logs go to stderr.
        #[arg(long)]
        stdio: bool,
    },
    /// Check the configuration and exit.
    #[command(after_help = "Example:\n  agent check-config --config /etc/magpie/agent.toml")]
    CheckConfig {
        #[arg(long, default_value = "/etc/magpie/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Under journald (which stamps every line itself), no timestamps of our own.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        logs.without_time().init();
    } else {
        logs.init();
    }
    // One crypto provider for the whole process (ring), chosen explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match Cli::parse().command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Serve { config, stdio } => serve(&config, stdio),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check_config(path: &std::path::Path) -> Result<()> {
    let cfg = config::AgentConfig::load(path)?;
    let sources = cfg.validate()?;
    let serving = match &cfg.tls {
        Some(t) => {
            tls::server_config(t)?;
            let (listen, _) = cfg.network()?;
            format!("listening on {listen}")
        }
        None => "over SSH only (serve --stdio)".to_string(),
    };
    println!("{}: ok, {} sources, {serving}", path.display(), sources.len());
    Ok(())
}

fn serve(path: &std::path::Path, over_stdio: bool) -> Result<()> {
    let cfg = config::AgentConfig::load(path)?;
    let sources = cfg.validate()?;
    let name = cfg.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "agent".into())
    });
    // At most four reads or diffs at once: each holds buffers of a few MiB.
    let work = Arc::new(tokio::sync::Semaphore::new(4));
    let spool = Arc::new(spool::Spool::open(&cfg.spool.dir, cfg.spool.max_bytes.0)?);
    // Containers an earlier run held (paused or stopped) and died before resuming: resumed first.
    let hold_record = Arc::new(volume::HoldRecord::new(&spool.dir));
    hold_record.resume_left_over()?;
    let service = server::AgentService {
        name,
        sources: sources.into_iter().map(Arc::new).collect(),
        work,
        // Two dumps at once at most: each loads a database server and fills the spool.
        dumps: Arc::new(tokio::sync::Semaphore::new(2)),
        spool,
        sessions: Default::default(),
        allow_restore: cfg.allow_restore,
        holds: Default::default(),
        hold_record,
    };
    let server = tonic::transport::Server::builder()
        // A collector that vanished without closing its connection is noticed, and the spool
        // of its dump removed, within a minute.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(16)
        .max_concurrent_streams(16)
        // A restore streams files and dumps to us: h2's 64 KiB windows and 16 KiB frames would
        // make the collector wait for a window update every 64 KiB (the collector's own side
        // is set the same way, for pulls).
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .add_service(magpie_proto::v1::agent_server::AgentServer::new(service).max_decoding_message_size(66 << 20));
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    if over_stdio {
        return rt.block_on(async move {
            let (io, closed) = stdio::Stdio::new().context("standard input and output cannot carry the connection")?;
            tracing::info!("agent serving over standard input and output (SSH)");
            // One connection, and the incoming stream stays open while it lasts: a stream that
            // ended would stop the server at once. It stops when the collector hangs up.
            let incoming = tokio_stream::StreamExt::chain(
                tokio_stream::once(Ok::<_, std::io::Error>(io)),
                tokio_stream::pending(),
            );
            server
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = closed.await;
                })
                .await
                .context("gRPC server over standard input and output")
        });
    }
    let (listen, tls_config) = cfg.network()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(tls_config)?));
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!("agent listening on {}", listener.local_addr()?);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: back off instead of spinning.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(15), acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(e)) => tracing::warn!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::warn!("TLS handshake with {peer} timed out"),
                    }
                });
            }
        });
        server
            .serve_with_incoming_shutdown(ReceiverStream::new(rx), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("gRPC server")
    })
}
