//! `collector`: the backup host's side of magpie.

mod certs;
mod client;
mod commands;
mod config;
mod copy;
mod delta;
mod metrics;
mod notify;
mod pull;
mod restore;
mod run;
mod secret;
mod ssh;
mod state;
mod status;

/// jemalloc, not glibc's malloc. A pull allocates and frees buffers of 128 KiB to 16 MiB at
/// hundreds of MB a second (wire segments, decoded frames, chunks, sealed blobs, packs). glibc
/// either keeps them in per-thread heaps (a 2 GB pull peaked at 200 MB) or, with its mmap
/// threshold fixed low as the collector had it, maps and unmaps each one: 2.2 million page
/// faults and 10 s of kernel time on that pull. jemalloc, set up below, reuses freed pages:
/// 0.5 million faults, 5 s of kernel time, about 15% less wall time, the same peak memory
/// (tests/bench).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The one place with `unsafe` code in the workspace.
#[allow(unsafe_code)]
mod malloc_tuning {
    /// jemalloc's options, read before `main` (the prefixed `malloc_conf` symbol). One arena and
    /// no per-thread caches: a pull has a dozen threads, and their caches and arenas only
    /// multiply the memory kept (with them a day-2 pull peaked at 150-159 MB instead of
    /// 138-140 MB, and was no faster). Freed pages go back to the system within 100 ms unused.
    #[unsafe(export_name = "_rjem_malloc_conf")]
    static MALLOC_CONF: &[u8; 59] = b"narenas:1,tcache:false,dirty_decay_ms:100,muzzy_decay_ms:0\0";
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Exit codes (documented in the README).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// `check` found damage, or `--repair` could not save everything.
    pub const DAMAGE: u8 = 1;
    /// Bad command line or configuration (clap uses 2 too).
    pub const USAGE: u8 = 2;
    /// Any other error (I/O, permissions…).
    pub const ERROR: u8 = 3;
    /// `pull`, `run`: some sources (or agents) failed or are stale; the others were committed.
    /// `restore`: a source failed or a check did not pass.
    pub const SOURCES_FAILED: u8 = 4;
    /// `run`: everything was pulled, with warnings (files skipped, a hook that failed…).
    pub const WARNINGS: u8 = 5;
    /// `run`: the report could not be mailed (nobody was told); only damage (1) outranks it.
    pub const MAIL_FAILED: u8 = 6;
    /// No repository at the location given.
    pub const NO_REPOSITORY: u8 = 10;
    /// The passphrase opens no key.
    pub const WRONG_PASSPHRASE: u8 = 11;
    /// Another process holds a conflicting lock.
    pub const LOCKED: u8 = 12;
    /// An object failed verification during a command other than check.
    pub const CORRUPT: u8 = 13;
}

#[derive(Parser, Debug)]
#[command(name = "collector", version, about = "magpie collector: pull-based, encrypted, deduplicated backups")]
pub struct Cli {
    /// Repository directory (overrides `repository` of the configuration).
    #[arg(long, short = 'r', global = true, env = "MAGPIE_REPOSITORY")]
    repo: Option<PathBuf>,
    /// Collector configuration (agents, TLS, repository); needed by `pull`.
    #[arg(long, short = 'c', global = true, env = "MAGPIE_CONFIG")]
    config: Option<PathBuf>,
    /// File whose first line is the passphrase (else $MAGPIE_PASSPHRASE, else the systemd
    /// credential `magpie-passphrase`).
    #[arg(long, global = true)]
    passphrase_file: Option<PathBuf>,
    /// More log output (-v info, -vv debug).
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One crypto provider for the whole process (ring), chosen explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Under journald (which stamps every line itself), no timestamps of our own.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        logs.without_time().init();
    } else {
        logs.init();
    }
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    use repo_format::Error as E;
    for cause in e.chain() {
        if let Some(re) = cause.downcast_ref::<E>() {
            return match re {
                E::NoRepository { .. } => exit::NO_REPOSITORY,
                E::WrongPassphrase { .. } => exit::WRONG_PASSPHRASE,
                E::Locked { .. } => exit::LOCKED,
                E::Corrupt { .. } | E::BlobMissing(_) => exit::CORRUPT,
                E::Invalid(_) | E::SnapshotNotFound(_) | E::AmbiguousSnapshot(_) | E::AlreadyInitialised { .. } => {
                    exit::USAGE
                }
                _ => exit::ERROR,
            };
        }
        if cause.downcast_ref::<commands::UsageError>().is_some() {
            return exit::USAGE;
        }
    }
    exit::ERROR
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
