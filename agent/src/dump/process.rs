//! Running dump tools and hooks: bounded in time and spool space, cancelled when the collector
//! goes away, killed as a whole process group, their stderr kept (with secrets redacted) for the
//! error message.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use crate::spool::Spool;

/// Stderr kept for the error message (its end: tools say what went wrong last).
const STDERR_TAIL: usize = 8 * 1024;
/// Captured stdout of queries (table lists, versions).
const STDOUT_MAX: usize = 64 << 20;
/// How often the spool is measured while a dump grows.
const SPOOL_POLL: Duration = Duration::from_millis(250);

/// What bounds a run.
pub struct Limits<'a> {
    pub deadline: Instant,
    pub spool: &'a Spool,
    /// True once the collector went away: stop at once.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Strings never to show (passwords).
    pub secrets: &'a [String],
}

impl Limits<'_> {
    /// `text` with every secret replaced.
    pub fn redact(&self, text: &str) -> String {
        self.secrets.iter().filter(|s| !s.is_empty()).fold(text.to_string(), |t, s| t.replace(s.as_str(), "[redacted]"))
    }
}

/// Where a tool's standard output goes.
pub enum Output<'p> {
    /// Into this new file (the dump).
    File(&'p Path),
    /// Captured and returned (a query's answer).
    Capture,
}

/// Run `cmd` to completion within `limits`; returns the captured stdout (empty for a file).
/// A non-zero exit is an error carrying the end of the tool's stderr.
pub fn run(what: &str, cmd: Command, out: Output<'_>, limits: &Limits<'_>) -> Result<Vec<u8>> {
    let (captured, failure, _) = run_with(what, cmd, Stdio::null(), out, limits)?;
    match failure {
        Some(f) => Err(anyhow!(f)),
        None => Ok(captured),
    }
}

/// The same, but a non-zero exit is returned as its message instead of failing (a tool whose
/// errors are expected, like pg_restore loading into a database that has some objects); with
/// the end of its stderr (redacted) either way.
pub fn run_lenient(what: &str, cmd: Command, limits: &Limits<'_>) -> Result<(Option<String>, String)> {
    let (_, failure, stderr) = run_with(what, cmd, Stdio::null(), Output::Capture, limits)?;
    Ok((failure, stderr))
}

/// The same, with the file `input` as the tool's standard input (a dump to load).
pub fn run_stdin(what: &str, cmd: Command, input: &Path, limits: &Limits<'_>) -> Result<Vec<u8>> {
    let f = std::fs::File::open(input).map_err(|e| anyhow!("{what}: cannot open {}: {e}", input.display()))?;
    let (captured, failure, _) = run_with(what, cmd, Stdio::from(f), Output::Capture, limits)?;
    match failure {
        Some(f) => Err(anyhow!(f)),
        None => Ok(captured),
    }
}

/// Run to completion; returns what it printed and, when it exited non-zero, why (the end of its
/// stderr, redacted). Limits crossed are errors.
fn run_with(
    what: &str,
    mut cmd: Command,
    stdin: Stdio,
    out: Output<'_>,
    limits: &Limits<'_>,
) -> Result<(Vec<u8>, Option<String>, String)> {
    cmd.stdin(stdin).stderr(Stdio::piped()).process_group(0);
    match out {
        Output::File(p) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| anyhow!("{what}: cannot create {}: {e}", p.display()))?;
            cmd.stdout(f);
        }
        Output::Capture => {
            cmd.stdout(Stdio::piped());
        }
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{what}: `{program}` not found: install it or give its directory"),
        _ => anyhow!("{what}: cannot start `{program}`: {e}"),
    })?;
    let stderr = child.stderr.take().map(|s| reader(move || tail(s, STDERR_TAIL)));
    let stdout = child.stdout.take().map(|s| reader(move || head(s, STDOUT_MAX)));
    let status = watch(&mut child, limits);
    // A child the tool left behind (a daemon a hook started) may hold the pipes open: wait
    // for the readers a little, not forever.
    let collect = |r: Option<std::sync::mpsc::Receiver<Vec<u8>>>| {
        r.and_then(|r| r.recv_timeout(Duration::from_secs(2)).ok()).unwrap_or_default()
    };
    let err_text = collect(stderr);
    let captured = collect(stdout);
    let status = status.map_err(|why| anyhow!("{what}: {why}"))?;
    // A fast tool can fill the spool between two measurements.
    if let Some(why) = spool_full(limits) {
        bail!("{what}: {why}");
    }
    let text = limits.redact(String::from_utf8_lossy(&err_text).trim());
    if !status.success() {
        let last = text.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
        let why = format!("{what} failed ({status}): {}", if last.is_empty() { "no message on stderr" } else { &last });
        return Ok((captured, Some(why), text));
    }
    Ok((captured, None, text))
}

/// Wait for the child, killing its whole group when a limit is crossed.
fn watch(child: &mut Child, limits: &Limits<'_>) -> Result<std::process::ExitStatus, String> {
    let mut next_measure = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
        let why = if Instant::now() >= limits.deadline {
            Some("timed out; raise timeout_secs (or hook_timeout_secs) if it needs longer".to_string())
        } else if (limits.cancelled)() {
            Some("stopped: the collector went away".to_string())
        } else if Instant::now() >= next_measure {
            next_measure = Instant::now() + SPOOL_POLL;
            spool_full(limits)
        } else {
            None
        };
        if let Some(why) = why {
            kill_group(child);
            return Err(why);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Why the spool is over its bound, if it is.
pub fn spool_full(limits: &Limits<'_>) -> Option<String> {
    (limits.spool.usage() > limits.spool.max_bytes).then(|| {
        format!(
            "the spool ({}) passed spool.max_bytes ({} bytes): raise it or free space",
            limits.spool.dir.display(),
            limits.spool.max_bytes
        )
    })
}

/// SIGKILL the child's process group (a shell's children with it) and reap the child.
pub fn kill_group(child: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Run `read` on a thread of its own; its result arrives on the channel.
fn reader(read: impl FnOnce() -> Vec<u8> + Send + 'static) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read());
    });
    rx
}

/// The last `max` bytes of a stream.
fn tail(mut r: impl Read, max: usize) -> Vec<u8> {
    let mut keep = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        keep.extend_from_slice(&buf[..n]);
        if keep.len() > 2 * max {
            keep.drain(..keep.len() - max);
        }
    }
    if keep.len() > max {
        keep.drain(..keep.len() - max);
    }
    keep
}

/// The first `max` bytes of a stream (the rest is read and dropped so the tool never blocks).
fn head(mut r: impl Read, max: usize) -> Vec<u8> {
    let mut keep = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        let room = max.saturating_sub(keep.len());
        keep.extend_from_slice(&buf[..n.min(room)]);
    }
    keep
}
