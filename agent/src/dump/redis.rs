//! Redis: `redis-cli --rdb`, which has the server write a fresh RDB (a fork: one instant) and
//! streams it over the replication protocol, so the agent needs no access to the server's
//! files. The password travels in `REDISCLI_AUTH`, never as an argument.

use std::process::Command;

use anyhow::{Result, bail};
use magpie_proto::v1::{CheckResult, DumpInfo, TableRows};

use super::process::{self, Limits, Output};
use super::{Conn, RestoreRun, Run, check, now_ns, place_file, tool_version};

#[derive(Debug)]
pub struct Redis {
    pub conn: Conn,
    /// Where the server reads its RDB at start (restores only).
    pub rdb_path: Option<std::path::PathBuf>,
}

impl Redis {
    fn cli(&self, password: &Option<String>) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.env_remove("REDISCLI_AUTH");
        if let Some(pw) = password {
            cmd.env("REDISCLI_AUTH", pw);
        }
        if let Some(s) = &self.conn.socket {
            cmd.arg("-s").arg(s);
        } else {
            cmd.args(["-h", self.conn.host.as_deref().unwrap_or("127.0.0.1")]);
            cmd.args(["-p", &self.conn.port.unwrap_or(6379).to_string()]);
        }
        if let Some(u) = &self.conn.user {
            cmd.args(["--user", u]);
        }
        cmd.arg("--no-auth-warning");
        cmd
    }

    /// `INFO section`, refusing an error answer (redis-cli exits 0 on NOAUTH, WRONGPASS…).
    fn info(&self, password: &Option<String>, section: &str, limits: &Limits<'_>) -> Result<String> {
        let server = format!("Redis at {}", self.conn.describe(6379));
        let mut cmd = self.cli(password);
        cmd.args(["INFO", section]);
        let out = process::run(&format!("connecting to {server}"), cmd, Output::Capture, limits)?;
        let text = String::from_utf8_lossy(&out).replace('\r', "");
        if !text.starts_with('#') && !text.trim().is_empty() {
            bail!("{server}: {}", limits.redact(text.trim()));
        }
        Ok(text)
    }

    /// Keys per database from `INFO keyspace`.
    fn keyspace(&self, password: &Option<String>, limits: &Limits<'_>) -> Result<Vec<TableRows>> {
        Ok(self
            .info(password, "keyspace", limits)?
            .lines()
            .filter_map(|l| {
                let (db, rest) = l.split_once(':')?;
                let keys = rest.split(',').find_map(|kv| kv.strip_prefix("keys="))?.parse().ok()?;
                Some(TableRows { name: db.to_string(), rows: keys })
            })
            .collect())
    }

    /// Put the RDB where the server reads it (the hooks around this stop and start the server).
    pub fn place(&self, run: &RestoreRun<'_>, stopped: bool, warnings: &mut Vec<String>) -> Result<Vec<CheckResult>> {
        let Some(path) = &self.rdb_path else {
            bail!("kind redis needs `rdb_path` in agent.toml to be restored to the agent");
        };
        if !stopped {
            warnings.push(
                "no before hook: a running Redis ignores the restored RDB and overwrites it at shutdown; stop it in `before` and start it in `after`".into(),
            );
        }
        let d = run.dumps.first().ok_or_else(|| anyhow::anyhow!("the snapshot has no RDB"))?;
        (run.progress)(format!("placing the RDB at {}", path.display()));
        place_file(&run.dir.join(&d.path), path)?;
        Ok(vec![check("RDB placed", true, &path.display().to_string())])
    }

    /// After the server started again: its keys per database against the dump's.
    pub fn check_restored(&self, run: &RestoreRun<'_>, limits: &Limits<'_>) -> Vec<CheckResult> {
        let Some(d) = run.dumps.first() else { return Vec::new() };
        let password = self.conn.password().ok().flatten();
        // The server may still be loading the RDB.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut last = String::new();
        while std::time::Instant::now() < deadline {
            match self.keyspace(&password, limits) {
                Ok(keys) if keys == d.tables => return vec![check("keys per database", true, "match the dump's")],
                Ok(keys) => last = format!("{keys:?}, {:?} at the dump", d.tables),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        vec![check("keys per database", false, &last)]
    }

    pub fn dump(&self, run: &Run<'_>, limits: &Limits<'_>) -> Result<Vec<DumpInfo>> {
        let server = format!("Redis at {}", self.conn.describe(6379));
        let password = self.conn.password()?;
        let server_info = self.info(&password, "server", limits)?;
        let version = server_info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("{server}: no redis_version in INFO (is it Redis?)"))?;
        let tables = self.keyspace(&password, limits)?;
        let tool = tool_version(Command::new("redis-cli"), limits)?;
        (run.progress)("saving the RDB".into());
        let start = now_ns();
        let file = run.out.join("dump.rdb");
        let mut cmd = self.cli(&password);
        cmd.arg("--rdb").arg(&file);
        process::run(&format!("redis-cli --rdb ({server})"), cmd, Output::Capture, limits)?;
        let mut magic = [0u8; 5];
        let ok = std::fs::File::open(&file).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok();
        if !ok || &magic != b"REDIS" {
            bail!("{server}: the RDB redis-cli received is not an RDB file");
        }
        Ok(vec![DumpInfo {
            path: "dump.rdb".into(),
            kind: "redis".into(),
            format: "rdb".into(),
            server_version: version,
            tool_version: tool,
            tables,
            rows_exact: false,
            start_ns: start,
            end_ns: now_ns(),
            ..Default::default()
        }])
    }
}
