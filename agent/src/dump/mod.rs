//! Dump sources: consistent dumps of databases, taken the way each database's documentation
//! says is safe, into a spool directory the collector then pulls like a path source.
//!
//! A dump run: the `before` hook, the dumps, the `after` hook (which runs whenever `before` was
//! tried, also when the dump failed), then the size and BLAKE3 of every dump file. Passwords are
//! read from their files at each run, handed to tools through files in the session's private
//! `etc/` directory or the environment (never an argument), and redacted from every message.

mod mariadb;
mod postgres;
pub mod process;
mod redis;
mod sqlite;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use magpie_proto::v1::{CheckResult, DumpInfo, TableRows};

use crate::config::{Databases, SourceConfig};
use process::{Limits, Output};

/// How to take the dumps of one source.
#[derive(Debug)]
pub struct DumpSpec {
    pub engine: Engine,
    pub before: Option<Vec<String>>,
    pub after: Option<Vec<String>>,
    pub hook_timeout: Duration,
    pub timeout: Duration,
    /// SQL run in each restored database; each must answer true.
    pub checks: Vec<String>,
}

#[derive(Debug)]
pub enum Engine {
    Postgres(postgres::Postgres),
    Mariadb(mariadb::Mariadb),
    Sqlite { pattern: String },
    Redis(redis::Redis),
    Command { argv: Vec<String>, filename: String, restore: Option<Vec<String>> },
}

/// How to reach a database server.
#[derive(Debug, Clone, Default)]
pub struct Conn {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub socket: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Conn {
    /// The password, read now (so a rotated password needs no restart).
    fn password(&self) -> Result<Option<String>> {
        let Some(p) = &self.password_file else { return Ok(None) };
        let text =
            std::fs::read_to_string(p).with_context(|| format!("password_file {}: cannot read it", p.display()))?;
        Ok(Some(text.lines().next().unwrap_or_default().to_string()))
    }

    /// "host:port as user", for messages.
    fn describe(&self, default_port: u16) -> String {
        let at = match (&self.socket, &self.host) {
            (Some(s), _) => s.display().to_string(),
            (None, Some(h)) if h.starts_with('/') => h.clone(),
            (None, h) => format!("{}:{}", h.as_deref().unwrap_or("localhost"), self.port.unwrap_or(default_port)),
        };
        match &self.user {
            Some(u) => format!("{at} as {u}"),
            None => at,
        }
    }
}

/// The dumps of one run.
#[derive(Debug, Default)]
pub struct Taken {
    pub dumps: Vec<DumpInfo>,
    pub warnings: Vec<String>,
}

/// What a dump run needs from its caller.
pub struct Run<'a> {
    /// Dump files go here (what the collector pulls).
    pub out: &'a Path,
    /// Credentials files go here (never pulled).
    pub etc: &'a Path,
    pub spool: &'a crate::spool::Spool,
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    pub progress: &'a (dyn Fn(String) + Sync),
}

impl DumpSpec {
    pub fn from_config(s: &SourceConfig) -> Result<DumpSpec> {
        let conn = Conn {
            host: s.host.clone(),
            port: s.port,
            socket: s.socket.clone(),
            user: s.user.clone(),
            password_file: s.password_file.clone(),
        };
        if let Some(p) = &conn.password_file
            && !p.is_file()
        {
            bail!("source {:?}: password_file {}: no such file", s.name, p.display());
        }
        let exact = match s.row_counts.as_deref() {
            None | Some("exact") => true,
            Some("estimate") => false,
            Some(other) => bail!("source {:?}: row_counts = {other:?} must be \"exact\" or \"estimate\"", s.name),
        };
        let databases = match &s.databases {
            None => None,
            Some(Databases::All(star)) if star == "*" => None,
            Some(Databases::All(other)) => {
                bail!("source {:?}: databases = {other:?}: give \"*\" or a list of names", s.name)
            }
            Some(Databases::Named(list)) => {
                if list.is_empty() {
                    bail!("source {:?}: databases is an empty list (use \"*\" for all)", s.name);
                }
                if let Some(bad) = list.iter().find(|d| d.is_empty() || d.starts_with('-') || d.contains('\0')) {
                    bail!("source {:?}: database name {bad:?} cannot be dumped safely", s.name);
                }
                Some(list.clone())
            }
        };
        let engine = match s.kind.as_str() {
            "postgres" => Engine::Postgres(postgres::Postgres {
                conn,
                databases,
                globals: s.globals.unwrap_or(true),
                bin_dir: s.bin_dir.clone(),
                exact,
            }),
            "mariadb" => Engine::Mariadb(mariadb::Mariadb { conn, databases, exact }),
            "sqlite" => {
                let pattern = s.path.clone().ok_or_else(|| anyhow!("source {:?}: kind sqlite needs `path`", s.name))?;
                if !pattern.starts_with('/') {
                    bail!("source {:?}: path {pattern:?} must be absolute", s.name);
                }
                glob::Pattern::new(&pattern).with_context(|| format!("source {:?}: path {pattern:?}", s.name))?;
                Engine::Sqlite { pattern }
            }
            "redis" => Engine::Redis(redis::Redis { conn, rdb_path: s.rdb_path.clone() }),
            "command" => {
                let argv = s.command.clone().unwrap_or_default();
                if argv.is_empty() || argv[0].is_empty() {
                    bail!("source {:?}: kind command needs `command = [\"program\", \"arg\", …]`", s.name);
                }
                let filename = s.filename.clone().unwrap_or_else(|| format!("{}.dump", s.name));
                if filename.is_empty() || filename.contains('/') || filename.starts_with('.') {
                    bail!("source {:?}: filename {filename:?} must be a plain file name", s.name);
                }
                Engine::Command { argv, filename, restore: s.restore_command.clone() }
            }
            other => bail!("source {:?}: {other:?} is not a dump kind", s.name),
        };
        for (what, hook) in [("before", &s.before), ("after", &s.after)] {
            if hook.as_ref().is_some_and(|h| h.is_empty() || h[0].is_empty()) {
                bail!("source {:?}: {what} must be a program and its arguments", s.name);
            }
        }
        Ok(DumpSpec {
            engine,
            before: s.before.clone(),
            after: s.after.clone(),
            hook_timeout: Duration::from_secs(s.hook_timeout_secs.unwrap_or(300)),
            timeout: Duration::from_secs(s.timeout_secs.unwrap_or(6 * 3600)),
            checks: s.check.clone().unwrap_or_default(),
        })
    }

    fn secrets(&self) -> Result<Vec<String>> {
        Ok(match &self.engine {
            Engine::Postgres(p) => p.conn.password()?,
            Engine::Mariadb(m) => m.conn.password()?,
            Engine::Redis(r) => r.conn.password()?,
            Engine::Sqlite { .. } | Engine::Command { .. } => None,
        }
        .into_iter()
        .collect())
    }

    /// `body` between the hooks: `before` first (its failure skips `body`), `after` always
    /// once `before` was tried; a failing `after` is a warning (the work itself is done).
    fn with_hooks<T>(
        &self,
        cancelled: &(dyn Fn() -> bool + Sync),
        spool: &crate::spool::Spool,
        progress: &(dyn Fn(String) + Sync),
        secrets: &[String],
        warnings: &mut Vec<String>,
        body: impl FnOnce(&mut Vec<String>) -> Result<T>,
    ) -> Result<T> {
        let hook_limits =
            |cancelled| Limits { deadline: Instant::now() + self.hook_timeout, spool, cancelled, secrets };
        let before = match &self.before {
            Some(argv) => {
                progress("running the before hook".into());
                hook("before hook", argv, &hook_limits(cancelled))
            }
            None => Ok(()),
        };
        let result = before.and_then(|()| body(warnings));
        if let Some(argv) = &self.after {
            progress("running the after hook".into());
            // Not cancelled with the rest: a collector that went away must not leave the service
            // `before` stopped.
            if let Err(e) = hook("after hook", argv, &hook_limits(&|| false)) {
                // The work is done; the operator must still hear that the service may be down.
                tracing::warn!("{e:#}");
                warnings.push(format!("{e:#}"));
            }
        }
        result
    }

    /// Load the dump files spooled in `run.dir` into their databases, then check them.
    pub fn restore(&self, run: &RestoreRun<'_>) -> Result<Restored> {
        let secrets = self.secrets()?;
        let mut warnings = Vec::new();
        let limits = Limits {
            deadline: Instant::now() + self.timeout,
            spool: run.spool,
            cancelled: run.cancelled,
            secrets: &secrets,
        };
        let mut checks =
            self.with_hooks(run.cancelled, run.spool, run.progress, &secrets, &mut warnings, |warnings| {
                match &self.engine {
                    Engine::Postgres(p) => p.restore(run, &limits, &self.checks, warnings),
                    Engine::Mariadb(m) => m.restore(run, &limits, &self.checks),
                    Engine::Sqlite { pattern } => sqlite::restore(pattern, run, &self.checks),
                    Engine::Redis(r) => r.place(run, self.before.is_some(), warnings),
                    Engine::Command { restore, .. } => {
                        let Some(argv) = restore else {
                            bail!("kind command needs `restore_command` in agent.toml to be restored to the agent");
                        };
                        let mut out = Vec::new();
                        for d in run.dumps {
                            let mut cmd = Command::new(&argv[0]);
                            cmd.args(&argv[1..]);
                            process::run_stdin(
                                &format!("restore command `{}`", argv[0]),
                                cmd,
                                &run.dir.join(&d.path),
                                &limits,
                            )?;
                            out.push(check(&format!("restore command for {}", d.path), true, "exited 0"));
                        }
                        Ok(out)
                    }
                }
            })?;
        // Checks that need the service the after hook started.
        if let Engine::Redis(r) = &self.engine {
            checks.extend(r.check_restored(run, &limits));
        }
        Ok(Restored { checks, warnings })
    }

    /// Whether a restore of `dumps` could run now, and what it would replace.
    pub fn readiness(
        &self,
        dumps: &[DumpInfo],
        clean: bool,
        force: bool,
        etc: &Path,
        restore_root: Option<&Path>,
    ) -> Readiness {
        let mut r = Readiness::default();
        let secrets = match self.secrets() {
            Ok(s) => s,
            Err(e) => {
                r.problems.push(format!("{e:#}"));
                return r;
            }
        };
        let spool = crate::spool::Spool { dir: etc.to_path_buf(), max_bytes: u64::MAX };
        let never = || false;
        let limits = Limits {
            deadline: Instant::now() + Duration::from_secs(60),
            spool: &spool,
            cancelled: &never,
            secrets: &secrets,
        };
        let result = match &self.engine {
            Engine::Postgres(p) => p.readiness(dumps, clean, force, etc, &limits, &mut r),
            Engine::Mariadb(m) => m.readiness(dumps, clean, force, etc, &limits, &mut r),
            Engine::Sqlite { pattern } => sqlite::readiness(pattern, dumps, restore_root, &mut r),
            Engine::Redis(rd) => {
                match &rd.rdb_path {
                    Some(p) => {
                        r.targets.push(p.display().to_string());
                        if p.exists() {
                            r.overwrites.push(format!("{} (replaced between the hooks)", p.display()));
                        }
                    }
                    None => {
                        r.problems.push("kind redis needs `rdb_path` in agent.toml to be restored to the agent".into())
                    }
                }
                Ok(())
            }
            Engine::Command { restore, .. } => {
                match restore {
                    Some(argv) => r.targets.push(format!("the standard input of `{}`", argv.join(" "))),
                    None => r
                        .problems
                        .push("kind command needs `restore_command` in agent.toml to be restored to the agent".into()),
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            r.problems.push(format!("{e:#}"));
        }
        r
    }

    /// Take the dumps: hooks around them, then size and BLAKE3 of each file.
    pub fn take(&self, run: &Run<'_>) -> Result<Taken> {
        let secrets = self.secrets()?;
        let mut taken = Taken::default();
        let dumped =
            self.with_hooks(run.cancelled, run.spool, run.progress, &secrets, &mut taken.warnings, |warnings| {
                let limits = Limits {
                    deadline: Instant::now() + self.timeout,
                    spool: run.spool,
                    cancelled: run.cancelled,
                    secrets: &secrets,
                };
                match &self.engine {
                    Engine::Postgres(p) => p.dump(run, &limits, warnings),
                    Engine::Mariadb(m) => m.dump(run, &limits, warnings),
                    Engine::Sqlite { pattern } => sqlite::dump(pattern, run, &limits, warnings),
                    Engine::Redis(r) => r.dump(run, &limits),
                    Engine::Command { argv, filename, .. } => command(argv, filename, run, &limits),
                }
            });
        taken.dumps = dumped?;
        for d in &mut taken.dumps {
            let (size, hash) = size_and_hash(&run.out.join(&d.path))?;
            d.size = size;
            d.blake3 = hash.to_vec();
        }
        Ok(taken)
    }
}

/// What a restore of dumps needs from its caller.
pub struct RestoreRun<'a> {
    /// The dump files, spooled and verified.
    pub dir: &'a Path,
    /// Credentials files go here.
    pub etc: &'a Path,
    pub spool: &'a crate::spool::Spool,
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    pub progress: &'a (dyn Fn(String) + Sync),
    pub dumps: &'a [DumpInfo],
    /// Replace what a non-empty database holds (pg_restore --clean, DROP DATABASE).
    pub clean: bool,
    /// Load into a non-empty database as it is.
    pub force: bool,
    pub restore_root: Option<&'a Path>,
}

/// The outcome of a restore of dumps.
#[derive(Debug, Default)]
pub struct Restored {
    pub checks: Vec<CheckResult>,
    pub warnings: Vec<String>,
}

/// Whether a restore could run now.
#[derive(Debug, Default)]
pub struct Readiness {
    pub targets: Vec<String>,
    pub overwrites: Vec<String>,
    pub problems: Vec<String>,
}

/// What a restore does with its target database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbPlan {
    Create,
    Load,
    /// Replace what the dump holds (--clean).
    Clean,
}

/// The one rule for a target database holding `tables` tables (None: missing): create it, load
/// into it when empty, clean it with --clean, load into it as it is with --force, else refuse.
/// Returns the plan and what the plan will say it overwrites.
fn db_plan(db: &str, tables: Option<u64>, clean: bool, force: bool) -> Result<(DbPlan, Option<String>)> {
    match tables {
        None => Ok((DbPlan::Create, None)),
        Some(0) => Ok((DbPlan::Load, Some(format!("database {db} exists and is empty")))),
        Some(n) if clean => {
            Ok((DbPlan::Clean, Some(format!("database {db}: what the dump holds replaces its {n} tables (--clean)"))))
        }
        Some(n) if force => Ok((DbPlan::Load, Some(format!("database {db}: loaded into its {n} tables (--force)")))),
        Some(n) => bail!(
            "database {db} is not empty ({n} tables): restore with --clean to replace what the dump holds, or --force to load into it as it is"
        ),
    }
}

/// A database's plan in a readiness report: what it overwrites, or why it cannot go ahead.
fn plan_note(r: &mut Readiness, plan: Result<(DbPlan, Option<String>)>) {
    match plan {
        Ok((_, note)) => r.overwrites.extend(note),
        Err(e) => r.problems.push(format!("{e:#}")),
    }
}

pub fn check(name: &str, ok: bool, detail: &str) -> CheckResult {
    CheckResult { name: name.to_string(), ok, detail: detail.to_string() }
}

/// Compare a restored database's row counts with those recorded at the dump. Counts that were
/// not taken in the dump's own snapshot may differ a little; those differences are noted, not
/// failed.
fn row_check(what: &str, recorded: &[TableRows], exact: bool, count: impl Fn(&str) -> Result<u64>) -> CheckResult {
    let mut off = Vec::new();
    for t in recorded {
        match count(&t.name) {
            Ok(n) if n == t.rows => {}
            Ok(n) => off.push(format!("{}: {n} rows, {} at the dump", t.name, t.rows)),
            Err(e) => off.push(format!("{}: {e:#}", t.name)),
        }
    }
    let name = format!("row counts of {what}");
    if off.is_empty() {
        check(&name, true, &format!("{} tables match the dump's metadata", recorded.len()))
    } else {
        check(&name, !exact, &off.join("; "))
    }
}

/// Run the configured SQL checks; each must answer true.
fn sql_checks(what: &str, checks: &[String], query: impl Fn(&str) -> Result<String>) -> Vec<CheckResult> {
    checks
        .iter()
        .map(|sql| {
            let name = format!("{what}: {sql}");
            match query(sql) {
                Ok(a) => {
                    let a = a.trim();
                    check(
                        &name,
                        ["t", "true", "1"].contains(&a.to_ascii_lowercase().as_str()),
                        &format!("answered {a:?}"),
                    )
                }
                Err(e) => check(&name, false, &format!("{e:#}")),
            }
        })
        .collect()
}

/// Copy `src` next to `dst` under a new random name (created exclusively, never through a
/// symlink), with the owner and mode of the file it will replace (or the owner of its
/// directory, mode 0600, when there is none); returns the staged file's path. The caller renames
/// it over `dst`, or removes it.
fn stage_file(src: &Path, dst: &Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = dst.parent().ok_or_else(|| anyhow!("{} has no directory", dst.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).map_err(|e| anyhow!("no randomness: {e}"))?;
    let tmp = dir.join(format!(".magpie-restore-{}", hex::encode(r)));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc_nofollow())
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        std::io::copy(&mut std::fs::File::open(src)?, &mut f)?;
        let like = std::fs::symlink_metadata(dst).or_else(|_| std::fs::metadata(dir))?;
        std::os::unix::fs::fchown(&f, Some(like.uid()), Some(like.gid()))?;
        let mode = if like.is_file() { like.mode() & 0o7777 } else { 0o600 };
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    Ok(tmp)
}

fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Put `src` at `dst` (staged, then renamed over it).
fn place_file(src: &Path, dst: &Path) -> Result<()> {
    let tmp = stage_file(src, dst)?;
    std::fs::rename(&tmp, dst).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("cannot put the restored file at {}: {e}", dst.display())
    })
}

fn hook(what: &str, argv: &[String], limits: &Limits<'_>) -> Result<()> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    process::run(&format!("{what} `{}`", argv.join(" ")), cmd, Output::Capture, limits).map(|_| ())
}

/// Any command whose standard output is the dump.
fn command(argv: &[String], filename: &str, run: &Run<'_>, limits: &Limits<'_>) -> Result<Vec<DumpInfo>> {
    let start = now_ns();
    (run.progress)(format!("running `{}`", argv.join(" ")));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    process::run(&format!("dump command `{}`", argv[0]), cmd, Output::File(&run.out.join(filename)), limits)?;
    Ok(vec![DumpInfo {
        path: filename.to_string(),
        kind: "command".into(),
        format: "raw".into(),
        start_ns: start,
        end_ns: now_ns(),
        ..Default::default()
    }])
}

fn size_and_hash(p: &Path) -> Result<(u64, [u8; 32])> {
    let f = std::fs::File::open(p).with_context(|| format!("dump file {} is missing", p.display()))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok((h.count(), *h.finalize().as_bytes()))
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// A name the server sent hex-encoded (so no name can break a line- or tab-separated answer).
fn unhex(h: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&hex::decode(h.trim()).context("a name in hex")?).into_owned())
}

/// A database name as a file name: '/', '%', NUL and a leading '.' percent-encoded.
fn file_name(db: &str) -> String {
    let mut out = String::with_capacity(db.len());
    for (i, c) in db.chars().enumerate() {
        match c {
            '/' | '%' | '\0' => out.push_str(&format!("%{:02X}", c as u32)),
            '.' if i == 0 => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    out
}

/// The first version-looking token of a tool's `--version` line ("pg_dump (PostgreSQL) 15.4" → 15.4).
fn version_token(line: &str) -> Option<&str> {
    line.split_whitespace().find(|t| t.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

/// A tool's `--version` output, first line.
fn tool_version(mut cmd: Command, limits: &Limits<'_>) -> Result<String> {
    cmd.arg("--version");
    let what = format!("`{} --version`", cmd.get_program().to_string_lossy());
    let out = process::run(&what, cmd, Output::Capture, limits)?;
    Ok(String::from_utf8_lossy(&out).lines().next().unwrap_or_default().trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_stay_in_their_directory() {
        assert_eq!(file_name("bgs"), "bgs");
        assert_eq!(file_name("../x"), "%2E.%2Fx");
        assert_eq!(file_name("a/b%c"), "a%2Fb%25c");
    }

    #[test]
    fn version_tokens() {
        assert_eq!(version_token("pg_dump (PostgreSQL) 15.19 (Debian 15.19-0+deb12u1)"), Some("15.19"));
        assert_eq!(version_token("redis-cli 7.0.15"), Some("7.0.15"));
    }
}
