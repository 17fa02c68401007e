//! Redis: `redis-cli --rdb`, which has the server write a fresh RDB (a fork: one instant) and
//! streams it over the replication protocol, so the agent needs no access to the server's
//! files. The password travels in `REDISCLI_AUTH`, never as an argument.

use std::process::Command;

use anyhow::{Result, bail};
use magpie_proto::v1::{DumpInfo, TableRows};

use super::process::{self, Limits, Output};
use super::{Conn, Run, now_ns, tool_version};

#[derive(Debug)]
pub struct Redis {
    pub conn: Conn,
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

    pub fn dump(&self, run: &Run<'_>, limits: &Limits<'_>) -> Result<Vec<DumpInfo>> {
        let server = format!("Redis at {}", self.conn.describe(6379));
        let password = self.conn.password()?;
        let info = |section: &str| -> Result<String> {
            let mut cmd = self.cli(&password);
            cmd.args(["INFO", section]);
            let out = process::run(&format!("connecting to {server}"), cmd, Output::Capture, limits)?;
            let text = String::from_utf8_lossy(&out).replace('\r', "");
            // redis-cli exits 0 on an error reply (NOAUTH, WRONGPASS…): look at the answer.
            if !text.starts_with('#') && !text.trim().is_empty() {
                bail!("{server}: {}", limits.redact(text.trim()));
            }
            Ok(text)
        };
        let server_info = info("server")?;
        let field = |text: &str, key: &str| {
            text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(str::to_string)
        };
        let Some(version) = field(&server_info, "redis_version") else {
            bail!("{server}: no redis_version in INFO (is it Redis?)");
        };
        let keyspace = info("keyspace")?;
        let tables = keyspace
            .lines()
            .filter_map(|l| {
                let (db, rest) = l.split_once(':')?;
                let keys = rest.split(',').find_map(|kv| kv.strip_prefix("keys="))?.parse().ok()?;
                Some(TableRows { name: db.to_string(), rows: keys })
            })
            .collect();
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
