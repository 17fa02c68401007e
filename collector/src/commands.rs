//! The repository commands: parse, open, run the library command, print its report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use repo_format::backend::LocalBackend;
use repo_format::crypto::KdfParams;
use repo_format::ops::{check, compact, prune, repair};
use repo_format::repofile::tree::{Node, NodeKind};
use repo_format::retention::Policy;
use repo_format::{Id, InitOptions, Repository, Snapshot, Writer, locking};
use serde_json::json;

use crate::{Cli, exit, secret};

/// An error in what the user asked for (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pull the configured agents' sources into the repository: one snapshot per source.
    #[command(
        after_help = "Examples:\n  collector --config /etc/magpie/collector.toml pull\n  collector --config /etc/magpie/collector.toml pull --agent main --source postgres --json"
    )]
    Pull {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only these sources (repeatable).
        #[arg(long = "source")]
        sources: Vec<String>,
        /// Commit dumps even when far smaller than the previous ones (see dump_min_ratio).
        #[arg(long)]
        accept_small_dumps: bool,
        /// Machine-readable summary.
        #[arg(long)]
        json: bool,
    },
    /// The timer's job: pull every source, prune, compact, check and verify a slice of the
    /// packs, flag stale sources, record the status, write metrics and mail the report.
    ///
    /// Exit codes: 0 ok, 5 warnings, 4 sources failed or stale, 3 repository trouble, 1 damage
    /// found, 6 the report could not be mailed.
    #[command(after_help = "Example (from a systemd timer):
  collector --config /etc/magpie/collector.toml run")]
    Run {
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
    },
    /// Could I restore right now? Per source: last good pull, last failure, snapshots, dump
    /// tools; the repository's size, free space, last check and full verification.
    #[command(after_help = "Example:
  collector --config /etc/magpie/collector.toml status --json")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Copy snapshots into another repository (e.g. local to S3 for an off-site copy); what the
    /// target already holds is not stored again, and a snapshot already there is skipped.
    #[command(
        after_help = "Examples:\n  collector --config /etc/magpie/collector.toml copy --to s3://offsite/magpie\n  collector --config /etc/magpie/collector.toml copy --to /mnt/usb/magpie --source postgres"
    )]
    Copy {
        /// The target repository: a directory or s3://bucket/prefix (its [s3] settings from
        /// this configuration); initialised with `collector init` first.
        #[arg(long)]
        to: PathBuf,
        /// The target's passphrase file (default: the source's passphrase).
        #[arg(long)]
        to_passphrase_file: Option<PathBuf>,
        /// Only this agent's snapshots.
        #[arg(long)]
        agent: Option<String>,
        /// Only these sources (repeatable).
        #[arg(long = "source")]
        sources: Vec<String>,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration (for configuration management) and exit: 0, or 2 with one line
    /// naming the file, the key and what is expected.
    #[command(after_help = "Example:\n  collector --config /etc/magpie/collector.toml check-config")]
    CheckConfig,
    /// Make the private CA and the certificates of agents and collectors.
    #[command(
        after_help = "Examples:\n  collector certs init --dir /etc/magpie/certs\n  collector certs issue agent main --san main.example.org --dir /etc/magpie/certs\n  collector certs issue collector backup --dir /etc/magpie/certs\n  collector certs fingerprint /etc/magpie/certs/backup.pem"
    )]
    Certs {
        #[command(subcommand)]
        command: crate::certs::CertsCommand,
    },
    /// Create a new, encrypted repository.
    #[command(
        after_help = "Example:\n  collector --repo /var/lib/magpie/repo --passphrase-file /etc/magpie/passphrase init"
    )]
    Init(InitArgs),
    /// Store a local directory as a snapshot (for seeding and tests; `pull` fetches from agents).
    #[command(
        after_help = "Example:\n  collector --repo /var/lib/magpie/repo import /srv/www --source www --agent main --role data"
    )]
    Import(ImportArgs),
    /// List snapshots, oldest first.
    #[command(
        after_help = "Examples:\n  collector --config /etc/magpie/collector.toml list\n  collector --config /etc/magpie/collector.toml list --json"
    )]
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the entries of a snapshot below PATH.
    #[command(after_help = "Example:\n  collector --config /etc/magpie/collector.toml ls latest srv/www -R")]
    Ls {
        /// Snapshot id (a unique prefix) or `latest`.
        snapshot: String,
        /// Path inside the snapshot.
        path: Option<String>,
        /// List everything below PATH, not just its direct entries.
        #[arg(long, short = 'R')]
        recursive: bool,
    },
    /// Restore sources in dependency order (db, blobs, data, config), onto their agents or
    /// into a directory; the plan and its readiness checks come first.
    #[command(
        after_help = "Examples:\n  collector --config /etc/magpie/collector.toml restore --to-agent --order db,blobs,data --dry-run\n  collector --config /etc/magpie/collector.toml restore --to-agent --order db,blobs,data\n  collector --config /etc/magpie/collector.toml restore --source www --at '2026-11-20 18:00' --target-dir /srv/restore\n  collector --config /etc/magpie/collector.toml restore 3fa2c1 --path 'srv/www/**' --target-dir /tmp/www"
    )]
    Restore(crate::restore::RestoreArgs),
    /// Remove snapshots that the retention policy does not keep (per agent and source).
    #[command(
        after_help = "Example:\n  collector --config /etc/magpie/collector.toml prune --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run"
    )]
    Prune(PruneArgs),
    /// Remove data no snapshot references; repack packs with too much garbage.
    #[command(after_help = "Example:\n  collector --config /etc/magpie/collector.toml compact --max-garbage 10")]
    Compact {
        /// Repack a pack when more than this percentage of it is garbage.
        #[arg(long, default_value_t = 10.0)]
        max_garbage: f64,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Verify the repository's structure (and, with --verify-data, every byte).
    #[command(
        after_help = "Examples:\n  collector --config /etc/magpie/collector.toml check\n  collector --config /etc/magpie/collector.toml check --verify-data --json"
    )]
    Check {
        /// Read, decrypt, decompress and re-hash every blob.
        #[arg(long)]
        verify_data: bool,
        /// Rebuild the index from the packs and report what cannot be saved.
        #[arg(long)]
        repair: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Manage the repository key.
    #[command(
        after_help = "Example:\n  collector --config /etc/magpie/collector.toml key passwd --new-passphrase-file /root/new-passphrase"
    )]
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Remove stale locks (of processes that are gone, or not refreshed for 30 minutes).
    #[command(after_help = "Example:\n  collector --config /etc/magpie/collector.toml unlock")]
    Unlock {
        /// Remove every lock, live or not. Only when you know no other collector runs.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Change the passphrase.
    Passwd {
        /// File whose first line is the new passphrase.
        #[arg(long)]
        new_passphrase_file: PathBuf,
        #[command(flatten)]
        kdf: KdfArgs,
    },
}

#[derive(Args, Debug)]
pub struct KdfArgs {
    /// Argon2id memory for the key, in MiB.
    #[arg(long, default_value_t = 64)]
    kdf_memory_mib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = 3)]
    kdf_iterations: u32,
}

impl KdfArgs {
    fn params(&self) -> KdfParams {
        KdfParams {
            memory_kib: self.kdf_memory_mib.max(1) * 1024,
            iterations: self.kdf_iterations.max(1),
            ..KdfParams::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct LockArgs {
    /// Wait this many seconds for a conflicting lock to go before giving up.
    #[arg(long, default_value_t = 0)]
    lock_wait: u64,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Store everything unencrypted (anyone who can read the repository reads your data).
    #[arg(long)]
    unencrypted: bool,
    /// zstd level for new data, 1..=22.
    #[arg(long, default_value_t = repo_format::repository::DEFAULT_COMPRESSION_LEVEL)]
    compression: i32,
    /// Target pack size in MiB.
    #[arg(long, default_value_t = repo_format::repository::DEFAULT_PACK_SIZE / (1024 * 1024))]
    pack_size_mib: u32,
    #[command(flatten)]
    kdf: KdfArgs,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Directory to store.
    dir: PathBuf,
    /// Source name recorded in the snapshot.
    #[arg(long)]
    source: String,
    /// Agent name recorded in the snapshot (default: this host).
    #[arg(long)]
    agent: Option<String>,
    /// Restore role: db, blobs, data or config.
    #[arg(long, default_value = "data")]
    role: String,
    /// Category label, e.g. user-source-data.
    #[arg(long, default_value = "")]
    category: String,
    /// Tags (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only print what would be kept and removed.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Keep all snapshots newer than this interval (e.g. 2d; units H d w m y).
    #[arg(long)]
    keep_within: Option<String>,
    /// Keep the last N snapshots.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    keep_last: i32,
    /// Keep the newest snapshot of each of the last N hours (-1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    keep_hourly: i32,
    /// Keep the newest snapshot of each of the last N days (-1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    keep_daily: i32,
    /// Keep the newest snapshot of each of the last N ISO weeks (-1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    keep_weekly: i32,
    /// Keep the newest snapshot of each of the last N months (-1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    keep_monthly: i32,
    /// Keep the newest snapshot of each of the last N years (-1: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    keep_yearly: i32,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    lock: LockArgs,
}

impl PruneArgs {
    fn policy(&self) -> Result<Policy> {
        let rules = crate::config::Retention {
            keep_within: self.keep_within.clone(),
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
        };
        let p = rules.rules().map_err(|e| usage(format!("--keep-within: {e:#}")))?;
        if p.is_empty() {
            return Err(usage("prune needs at least one --keep-* rule (it would remove every snapshot)"));
        }
        Ok(p)
    }
}

struct Ctx {
    /// A directory, or `s3://bucket/prefix`.
    repo_dir: PathBuf,
    passphrase_file: Option<PathBuf>,
    s3: Option<crate::config::S3Settings>,
}

impl Ctx {
    fn backend(&self) -> Result<Arc<dyn repo_format::backend::Backend>> {
        let location = self.repo_dir.to_string_lossy();
        match repo_format::backend::S3Config::from_url(&location) {
            Some((bucket, prefix)) => {
                let s3 = self.s3.clone().unwrap_or_default();
                Ok(Arc::new(repo_format::backend::S3Backend::new(s3.config(bucket, prefix)?)?))
            }
            None => Ok(Arc::new(LocalBackend::new(&self.repo_dir))),
        }
    }

    fn open(&self) -> Result<Repository> {
        let pass = secret::find(self.passphrase_file.as_deref())?;
        Ok(Repository::open(self.backend()?, pass.as_ref().map(|p| p.as_slice()))?)
    }

    fn open_indexed(&self) -> Result<Repository> {
        let mut repo = self.open()?;
        repo.load_index()?;
        Ok(repo)
    }
}

/// Run one command; returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let config = match &cli.config {
        Some(p) => Some(crate::config::CollectorConfig::load(p).map_err(|e| usage(format!("{e:#}")))?),
        None if matches!(
            cli.command,
            Command::Pull { .. } | Command::Run { .. } | Command::Status { .. } | Command::CheckConfig
        ) || matches!(&cli.command, Command::Restore(a) if a.to_agent) =>
        {
            Some(
                crate::config::CollectorConfig::load(Path::new(crate::config::DEFAULT_PATH))
                    .map_err(|e| usage(format!("{e:#} (give --config FILE)")))?,
            )
        }
        None => None,
    };
    if let Command::Certs { command } = cli.command {
        crate::certs::run(command)?;
        return Ok(exit::OK);
    }
    if let Command::CheckConfig = cli.command {
        let cfg = config.as_ref().expect("loaded above");
        // Loading checked keys and values; these need the files they name.
        for (key, p) in [("tls.ca", &cfg.tls.ca), ("tls.cert", &cfg.tls.cert), ("tls.key", &cfg.tls.key)] {
            if cfg.agents.iter().any(|a| a.endpoint.starts_with("https://")) && !p.is_file() {
                return Err(usage(format!("{key} = {}: no such file", p.display())));
            }
        }
        if let Some((bucket, prefix)) = repo_format::backend::S3Config::from_url(&cfg.repository.to_string_lossy()) {
            cfg.s3.clone().unwrap_or_default().config(bucket, prefix).map_err(|e| usage(format!("{e:#}")))?;
        }
        println!(
            "ok: repository {}, {} agents, {}",
            cfg.repository.display(),
            cfg.agents.len(),
            if cfg.mail.is_some() { "mail configured" } else { "no mail" }
        );
        return Ok(exit::OK);
    }
    let repo_dir = cli
        .repo
        .clone()
        .or_else(|| config.as_ref().map(|c| c.repository.clone()))
        .ok_or_else(|| usage("no repository given: use --repo DIR, MAGPIE_REPOSITORY, or --config FILE"))?;
    let passphrase_file =
        cli.passphrase_file.clone().or_else(|| config.as_ref().and_then(|c| c.passphrase_file.clone()));
    let s3 = config.as_ref().and_then(|c| c.s3.clone());
    let ctx = Ctx { repo_dir, passphrase_file, s3 };
    match cli.command {
        Command::Certs { .. } | Command::CheckConfig => unreachable!("handled above"),
        Command::Pull { agent, sources, accept_small_dumps, json } => {
            let sel = crate::pull::Selection { agent, sources, accept_small_dumps };
            pull_cmd(&ctx, config.as_ref().expect("loaded above"), sel, json)
        }
        Command::Run { json } => crate::run::run(config.as_ref().expect("loaded above"), ctx.open()?, json),
        Command::Status { json } => {
            let state_dir = config.as_ref().expect("loaded above").state_dir.clone();
            crate::status::status(&ctx.open()?, &ctx.repo_dir, &state_dir, json)
        }
        Command::Copy { to, to_passphrase_file, agent, sources, json } => {
            let mut source = ctx.open()?;
            let target_ctx = Ctx {
                repo_dir: to,
                passphrase_file: to_passphrase_file.or_else(|| ctx.passphrase_file.clone()),
                s3: ctx.s3.clone(),
            };
            let mut target = target_ctx.open()?;
            let r = crate::copy::copy(&mut source, &mut target, agent.as_deref(), &sources)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for c in &r.copied {
                    println!("copied {c}");
                }
                println!(
                    "{} snapshots copied, {} already there; {} blobs ({} bytes) added to {}",
                    r.copied.len(),
                    r.skipped,
                    r.blobs_added,
                    r.stored_added,
                    target_ctx.repo_dir.display()
                );
            }
            Ok(exit::OK)
        }
        Command::Init(a) => init(&ctx, &a),
        Command::Import(a) => import(&ctx, &a),
        Command::List { json } => list(&ctx, json),
        Command::Ls { snapshot, path, recursive } => ls(&ctx, &snapshot, path.as_deref().unwrap_or(""), recursive),
        Command::Restore(a) => crate::restore::run(ctx.open()?, config.as_ref(), &a),
        Command::Prune(a) => prune_cmd(&ctx, &a),
        Command::Compact { max_garbage, lock } => compact_cmd(&ctx, max_garbage, &lock),
        Command::Check { verify_data, repair, json, lock } => check_cmd(&ctx, verify_data, repair, json, &lock),
        Command::Key { command: KeyCommand::Passwd { new_passphrase_file, kdf } } => {
            let repo = ctx.open()?;
            let new = secret::read_file(&new_passphrase_file)?;
            repo.change_passphrase(&new, kdf.params())?;
            println!("passphrase changed");
            Ok(exit::OK)
        }
        Command::Unlock { all } => {
            let repo = ctx.open()?;
            let removed = locking::unlock(&repo, all)?;
            for l in &removed {
                println!("removed {}", l.describe());
            }
            if removed.is_empty() {
                println!("no stale locks");
            }
            Ok(exit::OK)
        }
    }
}

fn init(ctx: &Ctx, a: &InitArgs) -> Result<u8> {
    let passphrase = if a.unencrypted {
        None
    } else {
        let p = secret::find(ctx.passphrase_file.as_deref())?.ok_or_else(|| {
            usage("init needs a passphrase: --passphrase-file FILE, MAGPIE_PASSPHRASE, or the systemd credential magpie-passphrase (or --unencrypted)")
        })?;
        Some(p.to_vec())
    };
    let opts = InitOptions {
        passphrase,
        kdf: a.kdf.params(),
        compression_level: a.compression,
        pack_size: a.pack_size_mib.saturating_mul(1024 * 1024),
        ..InitOptions::encrypted(Vec::new())
    };
    let repo = Repository::init(ctx.backend()?, &opts)?;
    println!(
        "created {} repository {} at {}",
        if a.unencrypted { "UNENCRYPTED" } else { "encrypted" },
        repo.config().repo_id().short(),
        ctx.repo_dir.display()
    );
    if !a.unencrypted {
        println!("keep the passphrase safe: without it the backups cannot be read");
    }
    Ok(exit::OK)
}

fn import(ctx: &Ctx, a: &ImportArgs) -> Result<u8> {
    let mut repo = ctx.open()?;
    // Lock before reading the index: a compact finishing in between could otherwise delete
    // packs this session then deduplicates against.
    let lock = locking::lock(&repo, false, "collector import", Duration::ZERO)?;
    repo.load_index()?;
    let start = chrono::Utc::now();
    let mut w = Writer::new(&repo, 0);
    let (tree, mut stats) =
        repo_format::fs::import_dir(&mut w, &a.dir).with_context(|| format!("importing {}", a.dir.display()))?;
    let (index, ws) = w.finish()?;
    stats.blobs_added = ws.blobs;
    stats.bytes_added = ws.raw_bytes;
    stats.stored_added = ws.stored_bytes;
    let snap = Snapshot {
        version: repo_format::magic::METADATA_VERSION,
        time_ns: start.timestamp_nanos_opt().unwrap_or_default(),
        end_time_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        host: repo_format::repository::hostname(),
        agent: a.agent.clone().unwrap_or_else(repo_format::repository::hostname),
        source: a.source.clone(),
        source_kind: "path".into(),
        role: a.role.clone(),
        category: a.category.clone(),
        tags: a.tags.clone(),
        tree: tree.0.to_vec(),
        stats: Some(stats.clone()),
        program_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    lock.ensure_held()?;
    let id = repo.save_snapshot(&snap)?;
    if a.json {
        println!(
            "{}",
            json!({"id": id.to_hex(), "files": stats.files, "bytes": stats.bytes, "bytes_added": stats.bytes_added, "stored_added": stats.stored_added})
        );
    } else {
        println!(
            "snapshot {} saved: {} files, {} bytes; added {} blobs, {} bytes ({} stored)",
            id.short(),
            stats.files,
            stats.bytes,
            stats.blobs_added,
            stats.bytes_added,
            stats.stored_added
        );
    }
    Ok(exit::OK)
}

fn snapshot_json(id: &Id, s: &Snapshot) -> serde_json::Value {
    let st = s.stats.clone().unwrap_or_default();
    json!({
        "id": id.to_hex(), "time": s.time().to_rfc3339(), "host": s.host, "agent": s.agent,
        "source": s.source, "source_kind": s.source_kind, "role": s.role, "category": s.category,
        "tags": s.tags, "files": st.files, "bytes": st.bytes, "metadata": s.metadata,
        "dumps": s.dumps.iter().map(|d| json!({
            "path": d.path, "kind": d.kind, "format": d.format, "database": d.database,
            "server_version": d.server_version, "tool_version": d.tool_version,
            "tables": d.tables.iter().map(|t| json!({"name": t.name, "rows": t.rows})).collect::<Vec<_>>(),
            "rows_exact": d.rows_exact, "size": d.size, "blake3": hex::encode(&d.blake3),
            "start": chrono::DateTime::from_timestamp_nanos(d.start_ns).to_rfc3339(),
            "end": chrono::DateTime::from_timestamp_nanos(d.end_ns).to_rfc3339(),
        })).collect::<Vec<_>>(),
    })
}

fn list(ctx: &Ctx, json_out: bool) -> Result<u8> {
    let repo = ctx.open()?;
    let snaps = repo.snapshots()?;
    if json_out {
        let v: Vec<_> = snaps.iter().map(|(id, s)| snapshot_json(id, s)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    println!("{:<8}  {:<25}  {:<16}  {:<16}  {:<6}  {:>12}", "ID", "TIME", "AGENT", "SOURCE", "ROLE", "BYTES");
    for (id, s) in &snaps {
        let local = s.time().with_timezone(&chrono::Local);
        println!(
            "{:<8}  {:<25}  {:<16}  {:<16}  {:<6}  {:>12}",
            id.short(),
            local.format("%Y-%m-%d %H:%M:%S %:z"),
            s.agent,
            s.source,
            s.role,
            s.stats.as_ref().map(|x| x.bytes).unwrap_or(0)
        );
    }
    println!("{} snapshots", snaps.len());
    Ok(exit::OK)
}

fn describe(path: &str, n: &Node) -> String {
    let kind = match n.node_kind() {
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Hardlink => 'h',
        NodeKind::CharDevice => 'c',
        NodeKind::BlockDevice => 'b',
        NodeKind::Fifo => 'p',
        NodeKind::Socket => 's',
        _ => '-',
    };
    let owner = if n.user.is_empty() { n.uid.to_string() } else { n.user.clone() };
    let group = if n.group.is_empty() { n.gid.to_string() } else { n.group.clone() };
    let mtime = chrono::DateTime::from_timestamp_nanos(n.mtime_ns).with_timezone(&chrono::Local);
    let mut line =
        format!("{kind}{:04o} {owner:>8} {group:>8} {:>12} {} {path}", n.mode, n.size, mtime.format("%Y-%m-%d %H:%M"));
    if matches!(n.node_kind(), NodeKind::Symlink | NodeKind::Hardlink) {
        line.push_str(&format!(" -> {}", String::from_utf8_lossy(&n.link_target)));
    }
    line
}

fn ls(ctx: &Ctx, snapshot: &str, path: &str, recursive: bool) -> Result<u8> {
    let repo = ctx.open_indexed()?;
    let id = repo.find_snapshot(snapshot)?;
    let snap = repo.load_snapshot(&id)?;
    let root = Id::from_slice(&snap.tree).context("snapshot has no root tree")?;
    let node = repo_format::fs::lookup(&repo, &root, path)?
        .ok_or_else(|| usage(format!("{path:?} is not in snapshot {}", id.short())))?;
    let base = path.trim_matches('/');
    if node.node_kind() != NodeKind::Dir {
        println!("{}", describe(base, &node));
        return Ok(exit::OK);
    }
    let sub = Id::from_slice(&node.subtree).context("directory without a tree")?;
    let prefix = if base.is_empty() { String::new() } else { format!("{base}/") };
    if recursive {
        repo_format::fs::walk(&repo, &sub, &mut |p, n| {
            println!("{}", describe(&format!("{prefix}{}", String::from_utf8_lossy(p)), n));
            Ok(())
        })?;
    } else {
        for n in repo.read_tree(&sub)?.nodes {
            println!("{}", describe(&format!("{prefix}{}", String::from_utf8_lossy(&n.name)), &n));
        }
    }
    Ok(exit::OK)
}

fn prune_cmd(ctx: &Ctx, a: &PruneArgs) -> Result<u8> {
    let policy = a.policy()?;
    let repo = ctx.open()?;
    let _lock = if a.dry_run {
        None
    } else {
        Some(locking::lock(&repo, true, "collector prune", Duration::from_secs(a.lock.lock_wait))?)
    };
    let plan = prune::plan(&repo, &policy, chrono::Utc::now(), &chrono::Local)?;
    if a.json {
        let v: Vec<_> = plan
            .iter()
            .map(|d| {
                let mut j = snapshot_json(&d.id, &d.snapshot);
                j["keep"] = json!(d.keep.as_ref().map(|r| r.to_string()));
                j
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for d in &plan {
            let t = d.snapshot.time().with_timezone(&chrono::Local);
            println!(
                "{}  {}  {}/{}  {}",
                d.id.short(),
                t.format("%Y-%m-%d %H:%M:%S %a"),
                d.snapshot.agent,
                d.snapshot.source,
                d.keep.as_ref().map(|r| format!("keep ({r})")).unwrap_or_else(|| "removed".into())
            );
        }
    }
    let gone = plan.iter().filter(|d| d.keep.is_none()).count();
    if a.dry_run {
        eprintln!("dry run: {gone} of {} snapshots would be removed", plan.len());
    } else {
        prune::apply(&repo, &plan)?;
        eprintln!("removed {gone} of {} snapshots; run `collector compact` to free their data", plan.len());
    }
    Ok(exit::OK)
}

fn compact_cmd(ctx: &Ctx, max_garbage: f64, lock: &LockArgs) -> Result<u8> {
    if !(0.0..=100.0).contains(&max_garbage) {
        return Err(usage("--max-garbage is a percentage, 0 to 100"));
    }
    let mut repo = ctx.open()?;
    let _lock = locking::lock(&repo, true, "collector compact", Duration::from_secs(lock.lock_wait))?;
    let r = compact::compact(&mut repo, compact::CompactOptions { max_garbage: max_garbage / 100.0 })?;
    println!(
        "compacted: {} packs repacked, {} written, {} deleted, {} blobs removed, {} leftovers of interrupted writes removed, {} bytes freed",
        r.packs_repacked, r.packs_written, r.packs_deleted, r.blobs_removed, r.leftovers_removed, r.bytes_freed
    );
    Ok(exit::OK)
}

fn check_cmd(ctx: &Ctx, verify_data: bool, do_repair: bool, json_out: bool, lock: &LockArgs) -> Result<u8> {
    let mut repo = ctx.open()?;
    let mut code = exit::OK;
    let mut out = serde_json::Map::new();
    if do_repair {
        let _lock = locking::lock(&repo, true, "collector check --repair", Duration::from_secs(lock.lock_wait))?;
        let r = repair::repair(&mut repo, verify_data)?;
        if !json_out {
            println!("repair: rebuilt the index from {} packs", r.packs_indexed);
            for p in &r.unreadable_packs {
                println!("LOST pack with unreadable header: {p}");
            }
            for b in &r.damaged_blobs {
                println!("LOST damaged blob {b}");
            }
            for o in &r.removed {
                println!("removed {o}");
            }
            for (id, paths) in &r.damaged_snapshots {
                println!("snapshot {} cannot be fully restored; missing: {}", id.short(), paths.join(", "));
            }
        }
        out.insert(
            "repair".into(),
            json!({
                "packs_indexed": r.packs_indexed, "unreadable_packs": r.unreadable_packs,
                "damaged_blobs": r.damaged_blobs.iter().map(Id::to_hex).collect::<Vec<_>>(),
                "removed": r.removed,
                "damaged_snapshots": r.damaged_snapshots.iter().map(|(id, p)| json!({"id": id.to_hex(), "paths": p})).collect::<Vec<_>>(),
            }),
        );
        if !r.nothing_lost() {
            code = exit::DAMAGE;
        }
    }
    let _lock = locking::lock(&repo, false, "collector check", Duration::from_secs(lock.lock_wait))?;
    let r = check::check(&mut repo, check::CheckOptions { verify_data, ..Default::default() })?;
    if json_out {
        out.insert(
            "check".into(),
            json!({
                "clean": r.is_clean(), "snapshots": r.snapshots, "packs": r.packs, "blobs": r.blobs, "verified_blobs": r.verified,
                "problems": r.problems.iter().map(|p| json!({"object": p.object, "message": p.message})).collect::<Vec<_>>(),
                "notes": r.notes,
            }),
        );
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for n in &r.notes {
            println!("note: {n}");
        }
        for p in &r.problems {
            println!("DAMAGE {p}");
        }
        println!(
            "{}: {} snapshots, {} packs, {} blobs{}",
            if r.is_clean() { "no damage" } else { "damage found" },
            r.snapshots,
            r.packs,
            r.blobs,
            if verify_data { format!(", {} blobs verified", r.verified) } else { String::new() }
        );
        if !r.is_clean() {
            println!("run `collector check --verify-data --repair` to rebuild the index and list what cannot be saved");
        }
    }
    if !r.is_clean() {
        code = exit::DAMAGE;
    }
    Ok(code)
}

fn pull_cmd(
    ctx: &Ctx,
    cfg: &crate::config::CollectorConfig,
    sel: crate::pull::Selection,
    json_out: bool,
) -> Result<u8> {
    let summaries = crate::pull::pull(cfg, crate::pull::Target::Opening(Box::new(|| ctx.open())), &sel)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        for s in &summaries {
            let name = if s.source.is_empty() { s.agent.clone() } else { format!("{}/{}", s.agent, s.source) };
            match (&s.snapshot, &s.error) {
                (_, Some(e)) => println!("{name}: FAILED: {e}"),
                (Some(id), None) => println!(
                    "{name}: snapshot {} in {:.1}s: {} new, {} changed, {} unchanged, {} failed files; {} bytes read on the agent, {} on the wire, {} added ({} stored){}",
                    &id[..8],
                    s.duration_secs,
                    s.files_new,
                    s.files_changed,
                    s.files_unchanged,
                    s.files_failed,
                    s.bytes_read,
                    s.wire_bytes,
                    s.bytes_added,
                    s.stored_added,
                    if s.warnings.is_empty() { String::new() } else { format!("; {} warnings", s.warnings.len()) }
                ),
                (None, None) => println!("{name}: nothing done"),
            }
            if !s.held.is_empty() {
                println!("  held still during the copy: {}", s.held.join(", "));
            }
            for w in s.warnings.iter().take(20) {
                println!("  warning: {w}");
            }
        }
    }
    Ok(if summaries.iter().any(|s| s.error.is_some()) { exit::SOURCES_FAILED } else { exit::OK })
}
