//! `collector pull`: one snapshot per source, sending over the network only what changed.
//!
//! Per source: list the entries; compare each file with the previous snapshot of the same
//! (agent, source) by size, mtime, ctime and inode, and reuse the chunk list of every unchanged
//! file; fetch the rest in batched ReadFiles calls (one compressed stream per call); chunk and
//! store them on an ingest thread; build the trees bottom-up; commit the snapshot last.
//! Nothing is committed for a source whose pull fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use magpie_proto::v1::agent_client::AgentClient;
use magpie_proto::v1::{
    DeltaFrame, DeltaRequest, DumpReady, DumpRequest, Entry, EntryKind, FileFrame, HandshakeRequest, ListRequest,
    ReadFilesRequest, dump_event,
};
use prost::Message;
use repo_format::archive::{ChunkedContent, FileContent, Origin, SmallFiles, StreamRange};
use repo_format::chunker::is_database_content;
use repo_format::repofile::tree::{ChunkRef, Node, NodeKind, Tree, Xattr};
use repo_format::{BlobKind, DumpInfo, Id, Repository, Snapshot, SnapshotStats, TableRows, Writer};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::client::{self, FrameReader};
use crate::config::{AgentEntry, CollectorConfig};
use crate::delta::{self, OldContent, SignatureBuilder, SignatureCache};

/// Files per ReadFiles call, and bytes (by listed size) per call.
const BATCH_FILES: usize = 2000;
const BATCH_BYTES: u64 = 256 << 20;
/// Warnings kept in a snapshot's metadata.
const MAX_WARNINGS: usize = 100;

/// The outcome of one source.
#[derive(Debug, Default, Serialize)]
pub struct SourceSummary {
    pub agent: String,
    pub source: String,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unchanged: u64,
    pub files_failed: u64,
    /// Changed files that travelled as rsync deltas.
    pub files_delta: u64,
    /// File content received from the agent.
    pub bytes_read: u64,
    /// Bytes of ReadFiles payload on the wire (after the agent's compression).
    pub wire_bytes: u64,
    /// Plaintext bytes of new blobs.
    pub bytes_added: u64,
    /// Stored bytes of new blobs.
    pub stored_added: u64,
    pub duration_secs: f64,
    pub warnings: Vec<String>,
    /// docker-volume: containers held still during the copy ("pds-app paused 1.4 s").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// Which agents and sources to pull.
#[derive(Debug, Default)]
pub struct Selection {
    pub agent: Option<String>,
    pub sources: Vec<String>,
    /// Commit dumps even when far smaller than the previous ones.
    pub accept_small_dumps: bool,
}

/// The repository a pull writes to: open already, or opened (its key derived, on purpose slow)
/// while the agents answer the handshake and start listing.
pub enum Target<'a> {
    Open(&'a Repository),
    Opening(Box<dyn FnOnce() -> Result<Repository> + Send + 'a>),
}

/// Pull every selected source of every selected agent. Failures are per source (or per agent
/// when it cannot be reached) and reported in the summaries, never hidden.
pub fn pull(cfg: &CollectorConfig, target: Target<'_>, sel: &Selection) -> Result<Vec<SourceSummary>> {
    if let Some(a) = &sel.agent
        && !cfg.agents.iter().any(|x| &x.name == a)
    {
        return Err(crate::commands::UsageError(format!(
            "no agent {a:?} in the configuration (it has: {})",
            cfg.agents.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
        ))
        .into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let parallel = cfg.max_parallel.max(1);
    std::thread::scope(|s| {
        // The handshakes, the first sources' listings (a cold listing of 47k files took the
        // agent 0.9 s) and the key derivation (about 0.1 s, on its own thread) overlap. A
        // repository that does not open fails the pull at once, whatever the agents do.
        let connecting = async {
            let (failed, jobs) = connect(cfg, sel).await;
            start_listings(&jobs[..parallel.min(jobs.len())]);
            Ok::<_, anyhow::Error>((failed, jobs))
        };
        let opened;
        let (repo, (failed, jobs)) = match target {
            Target::Open(repo) => (repo, rt.block_on(connecting)?),
            Target::Opening(open) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                s.spawn(move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open))
                        .unwrap_or_else(|_| Err(anyhow!("opening the repository panicked")));
                    let _ = tx.send(result);
                });
                let opening = async { rx.await.unwrap_or_else(|_| Err(anyhow!("opening the repository stopped"))) };
                let (repo, connected) = rt.block_on(futures_util::future::try_join(opening, connecting))?;
                opened = repo;
                (&opened, connected)
            }
        };

        // Then the sources, `max_parallel` at a time, each with its own write session.
        let cache = SignatureCache::new(cfg.cache_dir.clone().unwrap_or_else(SignatureCache::default_dir));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..parallel.min(jobs.len().max(1)) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { return };
                        let summary = run_job(&rt, job, &cache, repo);
                        done.lock().expect("results").push((i, summary));
                    }
                });
            }
        });
        let mut done = done.into_inner().expect("results");
        done.sort_by_key(|(i, _)| *i);
        Ok(failed.into_iter().chain(done.into_iter().map(|(_, s)| s)).collect())
    })
}

/// Every selected agent's handshake, which says what sources there are: the summaries of the
/// agents that failed it (a failure is that agent's alone) and the sources to pull. All at once:
/// an agent that does not answer delays no other.
async fn connect<'c>(cfg: &'c CollectorConfig, sel: &Selection) -> (Vec<SourceSummary>, Vec<Job<'c>>) {
    let mut failed = Vec::new();
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let started = Instant::now();
    let selected: Vec<&AgentEntry> =
        cfg.agents.iter().filter(|a| sel.agent.as_ref().is_none_or(|n| n == &a.name)).collect();
    let answers = futures_util::future::join_all(selected.iter().map(|a| handshake(a, cfg))).await;
    for (agent, answer) in selected.into_iter().zip(answers) {
        match answer {
            Err(e) => failed.push(SourceSummary {
                agent: agent.name.clone(),
                error: Some(format!("{e:#}")),
                duration_secs: started.elapsed().as_secs_f64(),
                ..Default::default()
            }),
            Ok((client, hs, clock_skew_ns)) => {
                let hs = Arc::new(hs);
                let wanted: Vec<String> = if !sel.sources.is_empty() {
                    sel.sources.clone()
                } else if !agent.sources.is_empty() {
                    agent.sources.clone()
                } else {
                    hs.sources.iter().map(|s| s.name.clone()).collect()
                };
                jobs.extend(wanted.into_iter().map(|source| Job {
                    agent,
                    client: client.clone(),
                    hs: hs.clone(),
                    clock_skew_ns,
                    source,
                    dumps: DumpPolicy { min_ratio: cfg.dump_min_ratio, accept_small: sel.accept_small_dumps },
                    early: std::sync::Mutex::new(None),
                }));
            }
        }
    }
    (failed, jobs)
}

/// Ask for the listings of `jobs` (the sources pulled first) now, before their pulls start. Not
/// a dump source's: its listing is of the dump the pull has yet to ask for. Not more sources': a
/// listing waiting in memory costs ~150 bytes an entry.
fn start_listings(jobs: &[Job<'_>]) {
    for job in jobs {
        if job.hs.sources.iter().any(|i| i.name == job.source && !i.dump) {
            let started = chrono::Utc::now();
            let listing = list_entries(job.client.clone(), job.agent.name.clone(), job.source.clone(), String::new());
            *job.early.lock().expect("early listing") =
                Some(EarlyListing { started, task: Some(tokio::spawn(listing)) });
        }
    }
}

/// One source to pull.
struct Job<'c> {
    agent: &'c AgentEntry,
    client: AgentClient<Channel>,
    hs: Arc<magpie_proto::v1::HandshakeResponse>,
    /// How far the agent's clock is ahead of this host's (0 when the agent does not say).
    clock_skew_ns: i64,
    source: String,
    dumps: DumpPolicy,
    /// The listing, when it was asked for before the pull of this source started.
    early: std::sync::Mutex<Option<EarlyListing>>,
}

/// A listing under way, and when it was asked for (the snapshot's time: nothing it lists is older).
/// Dropped unused, when its pull failed first, it is called off.
struct EarlyListing {
    started: chrono::DateTime<chrono::Utc>,
    task: Option<tokio::task::JoinHandle<Result<Vec<Entry>>>>,
}

impl EarlyListing {
    fn into_task(mut self) -> tokio::task::JoinHandle<Result<Vec<Entry>>> {
        self.task.take().expect("taken once")
    }
}

impl Drop for EarlyListing {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// When a dump is too small to trust.
#[derive(Debug, Clone, Copy)]
pub struct DumpPolicy {
    /// A dump under this share of the previous dump of the same file fails the pull…
    pub min_ratio: f64,
    /// …unless the operator said it is expected.
    pub accept_small: bool,
}

/// A source on the agent: its name, and for a dump source the session of its spool.
#[derive(Debug, Clone, Copy)]
struct Remote<'a> {
    name: &'a str,
    session: &'a str,
    /// Whether the source's files are database dumps (whatever their first bytes look like).
    dumps: bool,
}

/// A session on the agent: a dump taken into its spool, or a Docker volume whose containers are
/// held still. It lives while this is held: dropping it ends the Dump call, and the agent
/// removes the spool or resumes the containers.
struct DumpHold {
    ready: DumpReady,
    release: mpsc::Sender<DumpRequest>,
    events: tonic::Streaming<magpie_proto::v1::DumpEvent>,
}

/// How long the agent may take to end a session (resuming containers stops and starts them).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

impl DumpHold {
    /// End the session now and wait for the agent to confirm, with how long it held containers.
    async fn release(mut self) -> Result<magpie_proto::v1::DumpReleased> {
        let _ = self.release.send(DumpRequest { release: true, ..Default::default() }).await;
        loop {
            match tokio::time::timeout(RELEASE_WAIT, self.events.message()).await {
                Ok(Ok(Some(e))) => match e.event {
                    Some(dump_event::Event::Released(r)) => return Ok(r),
                    Some(dump_event::Event::Progress(line)) => tracing::info!("{line}"),
                    _ => {}
                },
                Ok(Ok(None)) => bail!("the agent ended the session without confirming its end"),
                Ok(Err(s)) => bail!("the agent's session ended with an error: {}", s.message()),
                Err(_) => bail!("the agent did not confirm the session's end within {}s", RELEASE_WAIT.as_secs()),
            }
        }
    }
}

/// Have the agent take a source's dumps; returns once they wait in its spool.
async fn take_dump(client: &mut AgentClient<Channel>, agent: &AgentEntry, source: &str) -> Result<DumpHold> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(DumpRequest { source: source.to_string(), release: false }).await.expect("a fresh channel");
    let failed = |s: tonic::Status| anyhow!("agent {}: {}", agent.name, s.message());
    let mut events = client.dump(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(failed)?.into_inner();
    while let Some(event) = events.message().await.map_err(failed)? {
        match event.event {
            Some(dump_event::Event::Progress(line)) => tracing::info!("{}/{source}: {line}", agent.name),
            Some(dump_event::Event::Ready(ready)) => return Ok(DumpHold { ready, release: tx, events }),
            Some(dump_event::Event::Released(_)) | None => {}
        }
    }
    bail!("agent {}: the dump of {source} ended without a result", agent.name)
}

/// Every dump file arrived whole and is the file the agent described.
fn verify_dump_files(dumps: &[magpie_proto::v1::DumpInfo], entries: &[Entry], results: &Fetches) -> Result<()> {
    for d in dumps {
        let idx = entries
            .iter()
            .position(|e| e.path == d.path.as_bytes())
            .ok_or_else(|| anyhow!("dump file {} is missing from the agent's spool", d.path))?;
        match results.get(&idx) {
            Some((Ok(c), _)) if c.blake3.as_slice() == d.blake3 && c.size == d.size => {}
            Some((Err(e), _)) => bail!("dump file {} could not be read: {e}", d.path),
            _ => bail!("dump file {} does not match what the agent dumped (size or BLAKE3)", d.path),
        }
    }
    Ok(())
}

/// Refuse a dump far smaller than the previous dump of the same file, or a dump file the
/// previous snapshot had and this one lacks (a database or SQLite store gone).
fn check_dump_sizes(
    dumps: &[magpie_proto::v1::DumpInfo],
    previous: Option<&Snapshot>,
    policy: DumpPolicy,
) -> Result<()> {
    let Some(prev) = previous else { return Ok(()) };
    let mut trouble = Vec::new();
    for p in &prev.dumps {
        match dumps.iter().find(|d| d.path == p.path) {
            None => trouble.push(format!("dump {} of the previous snapshot is missing", p.path)),
            Some(d) if (d.size as f64) < policy.min_ratio * p.size as f64 => trouble.push(format!(
                "dump {} is {} bytes, {:.0}% of the previous one ({} bytes)",
                d.path,
                d.size,
                100.0 * d.size as f64 / p.size.max(1) as f64,
                p.size
            )),
            Some(_) => {}
        }
    }
    if trouble.is_empty() {
        return Ok(());
    }
    if policy.accept_small {
        for t in &trouble {
            tracing::warn!("{t}; accepted as asked");
        }
        return Ok(());
    }
    bail!("{}: if that is expected, pull again with --accept-small-dumps (or lower dump_min_ratio)", trouble.join("; "))
}

/// The repository's record of a volume (the wire's message, field by field).
fn volume_info(v: &magpie_proto::v1::VolumeInfo) -> repo_format::repofile::snapshot::VolumeInfo {
    repo_format::repofile::snapshot::VolumeInfo {
        name: v.name.clone(),
        driver: v.driver.clone(),
        labels: v.labels.clone().into_iter().collect(),
        containers: v.containers.clone(),
        mode: v.mode.clone(),
        held: Vec::new(),
    }
}

/// The repository's record of a dump (the wire's message, field by field).
fn dump_info(d: &magpie_proto::v1::DumpInfo) -> DumpInfo {
    DumpInfo {
        path: d.path.clone(),
        kind: d.kind.clone(),
        format: d.format.clone(),
        database: d.database.clone(),
        server_version: d.server_version.clone(),
        tool_version: d.tool_version.clone(),
        tables: d.tables.iter().map(|t| TableRows { name: t.name.clone(), rows: t.rows }).collect(),
        rows_exact: d.rows_exact,
        size: d.size,
        blake3: d.blake3.clone(),
        start_ns: d.start_ns,
        end_ns: d.end_ns,
    }
}

/// Connect to an agent and ask who it is. The whole exchange is bounded by the agent's
/// `connect_timeout_secs`: an agent that accepts the connection but never answers (a hung
/// process, a proxy holding the port) would otherwise hold up every source of the pull for as
/// long as the connection lives.
pub(crate) async fn handshake(
    agent: &AgentEntry,
    cfg: &CollectorConfig,
) -> Result<(AgentClient<Channel>, magpie_proto::v1::HandshakeResponse, i64)> {
    let limit = std::time::Duration::from_secs(agent.connect_timeout_secs);
    tokio::time::timeout(limit, handshake_unbounded(agent, cfg)).await.unwrap_or_else(|_| {
        bail!(
            "agent {} ({}): no answer to the handshake within {} s (connect_timeout_secs): is the agent hung, or something else listening there?",
            agent.name,
            agent.endpoint,
            agent.connect_timeout_secs
        )
    })
}

async fn handshake_unbounded(
    agent: &AgentEntry,
    cfg: &CollectorConfig,
) -> Result<(AgentClient<Channel>, magpie_proto::v1::HandshakeResponse, i64)> {
    let mut c = client::connect(agent, &cfg.tls).await?;
    let request = HandshakeRequest {
        collector_version: env!("CARGO_PKG_VERSION").into(),
        protocol: magpie_proto::PROTOCOL_VERSION,
    };
    match c.handshake(request).await {
        Ok(r) => {
            let hs = r.into_inner();
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
            let skew = if hs.now_ns == 0 { 0 } else { hs.now_ns - now };
            Ok((c, hs, skew))
        }
        Err(s) => {
            let why = match client::diagnose_tls(agent, &cfg.tls).await {
                Some(tls_error) => tls_error,
                None => client::cause_chain(&s),
            };
            bail!("agent {} ({}): handshake failed: {why}", agent.name, agent.endpoint)
        }
    }
}

fn run_job(rt: &tokio::runtime::Runtime, job: &Job<'_>, cache: &SignatureCache, repo: &Repository) -> SourceSummary {
    let started = Instant::now();
    let mut summary = SourceSummary { agent: job.agent.name.clone(), source: job.source.clone(), ..Default::default() };
    let result = match job.hs.sources.iter().find(|s| s.name == job.source) {
        None => Err(anyhow!(
            "agent {} has no source {:?} (it declares: {})",
            job.agent.name,
            job.source,
            job.hs.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        )),
        Some(info) => {
            let mut session = repo.session();
            pull_source(rt, job, info, cache, &mut session, &mut summary)
        }
    };
    if let Err(e) = result {
        summary.error = Some(format!("{e:#}"));
    }
    summary.duration_secs = started.elapsed().as_secs_f64();
    summary
}

/// How long before the previous pull a file must have last changed to be trusted unchanged by
/// its times: the coarsest timestamps of a filesystem a server may have (FAT's 2 s).
const RACY_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// What to do with one file entry.
enum Plan {
    Reuse(Box<Node>),
    Fetch { had_previous: bool },
    LinkTo(usize),
}

fn pull_source(
    rt: &tokio::runtime::Runtime,
    job: &Job<'_>,
    info: &magpie_proto::v1::SourceInfo,
    cache: &SignatureCache,
    repo: &mut Repository,
    summary: &mut SourceSummary,
) -> Result<()> {
    let (agent, agent_version, mut client) = (job.agent, job.hs.agent_version.as_str(), job.client.clone());
    let early = job.early.lock().expect("early listing").take();
    let start = early.as_ref().map_or_else(chrono::Utc::now, |e| e.started);
    let lock = repo_format::locking::lock(repo, false, "collector pull", std::time::Duration::ZERO)?;
    repo.load_index()?;

    // 0. A dump source's dumps, spooled on the agent while this pull holds their session.
    let dump = if info.dump { Some(rt.block_on(take_dump(&mut client, agent, &info.name))?) } else { None };
    let previous = previous_snapshot(repo, &agent.name, &info.name)?;
    // A dump far smaller than the last one (or missing) is more likely broken than a database
    // that shrank: refuse it before it costs a transfer.
    if let Some(d) = &dump {
        check_dump_sizes(&d.ready.dumps, previous.as_ref().map(|(_, s)| s), job.dumps)?;
    }
    // Dump files get the dump chunker; a Docker volume, read through a session too, holds files.
    let dump_source = info.dump && info.kind != "docker-volume";
    let session = dump.as_ref().map_or("", |d| d.ready.session.as_str());
    let remote = Remote { name: &info.name, session, dumps: dump_source };

    // 1. The listing, streaming in while 2. the files cache (the previous snapshot of this source)
    // is read: the agent's walk and the collector's tree reads overlap.
    let listing = match early {
        Some(e) => e.into_task(),
        None => {
            rt.spawn(list_entries(client.clone(), agent.name.clone(), info.name.clone(), remote.session.to_string()))
        }
    };
    let prev_files = match &previous {
        Some((_, s)) => previous_files(repo, s),
        None => Ok(HashMap::new()),
    };
    let entries = rt.block_on(listing).map_err(|e| anyhow!("the listing task failed: {e}"))??;
    let mut warnings = Vec::new();
    // A previous snapshot that cannot be read must not stop every later backup of the source:
    // this pull reads every file instead (`collector check` reports the damage).
    let mut prev_files = prev_files.unwrap_or_else(|e| {
        warnings.push(format!("the previous snapshot cannot be read ({e:#}); every file was read whole"));
        HashMap::new()
    });
    let tree = DirTree::from_entries(&entries, &mut warnings);

    // 3. The plan, in restore order (so the first name of a hard link comes first).
    let mut plans: HashMap<usize, Plan> = HashMap::new();
    let mut fetch: Vec<usize> = Vec::new();
    // Changed large files whose previous version is similar in size travel as deltas.
    let mut deltas: Vec<usize> = Vec::new();
    let mut delta_prev: HashMap<usize, Node> = HashMap::new();
    let mut first_link: HashMap<(u64, u64), usize> = HashMap::new();
    // A file whose ctime is as late as the previous pull's start may have been written again
    // after that pull read it, within the same tick of its filesystem's clock, and so with the
    // same times (ext4 and XFS keep the time of the last timer tick, a few ms; some NFS servers
    // and FAT whole seconds). Such a file is read again rather than trusted unchanged, as git
    // does with "racily clean" files. The start is taken on the agent's clock, the files' one.
    let racy_from = previous.as_ref().map_or(i64::MAX, |(_, s)| {
        s.time_ns.saturating_add(job.clock_skew_ns).saturating_sub(RACY_MARGIN.as_nanos() as i64)
    });
    for i in tree.files_in_order(&entries) {
        let e = &entries[i];
        if e.nlink > 1 {
            if let Some(&first) = first_link.get(&(e.device, e.inode)) {
                plans.insert(i, Plan::LinkTo(first));
                continue;
            }
            first_link.insert((e.device, e.inode), i);
        }
        let prev = prev_files.get(&e.path);
        let unchanged = prev.is_some_and(|n| {
            n.size == e.size
                && n.mtime_ns == e.mtime_ns
                && n.ctime_ns == e.ctime_ns
                && n.inode == e.inode
                && n.ctime_ns < racy_from
        });
        if unchanged {
            summary.files_unchanged += 1;
            // Moved, not cloned: on an unchanged tree a copy would double the largest structure of the pull.
            let node = prev_files.remove(&e.path).expect("checked");
            plans.insert(i, Plan::Reuse(node));
        } else {
            plans.insert(i, Plan::Fetch { had_previous: prev.is_some() });
            match prev {
                Some(p)
                    if p.size >= delta::DELTA_MIN
                        && e.size >= delta::DELTA_MIN
                        && e.size <= p.size * 2
                        && p.size <= e.size * 2 =>
                {
                    deltas.push(i);
                    delta_prev.insert(i, Node::clone(p));
                }
                _ => fetch.push(i),
            }
        }
    }

    // 4. Fetch and store on an ingest thread; 5. build the trees.
    let threshold = repo.config().small_file_threshold as u64;
    let repo_ref: &Repository = repo;
    let (root_id, stats, index, stale, dictionary) = std::thread::scope(|s| -> Result<_> {
        // Each message can hold a window of a delta, rebuilt (4 MiB): a short queue bounds the memory.
        let (tx, mut rx) = mpsc::channel::<Msg>(4);
        let (entries_ref, plans_ref) = (&entries, &plans);
        let dictionary = previous.as_ref().and_then(|(_, p)| Id::from_slice(&p.dictionary));
        let ingest = s.spawn(move || -> Result<(Fetches, Writer<'_>, Option<String>)> {
            let mut w = Writer::new(repo_ref, 0);
            // The source's dictionary again: one per source, not one per pull. Without it (damaged
            // or deleted) the pull trains a new one; blobs that needed it are check's to report.
            let dictionary_lost = dictionary.and_then(|d| {
                w.use_dictionary(&d).err().map(|e| format!("dump dictionary {}: {e}; a new one is trained", d.short()))
            });
            let chunkers = Chunkers::new(repo_ref, dump_source)?;
            let mut st = Ingest::new(chunkers, threshold, cache, plans_ref);
            let mut patch: Option<Patch> = None;
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    Msg::Files(batch, frames) => {
                        for f in frames {
                            let idx = batch
                                .get(f.index as usize)
                                .copied()
                                .ok_or_else(|| anyhow!("the agent sent a file it was not asked for"))?;
                            st.frame(&mut w, entries_ref, idx, f)?;
                        }
                    }
                    Msg::Window(idx, bytes, origins) => {
                        let p = match patch.as_mut() {
                            Some(p) if p.idx == idx => p,
                            _ => patch.insert(Patch::new(idx, &st.chunkers, entries_ref[idx].size)),
                        };
                        p.window(&mut w, &bytes, origins)?;
                    }
                    Msg::DeltaEnd(idx, f, reply) => {
                        let p = match patch.take() {
                            Some(p) if p.idx == idx => p,
                            _ => Patch::new(idx, &st.chunkers, entries_ref[idx].size),
                        };
                        let ok = match p.finish(&mut w, &f, cache)? {
                            Some(content) => {
                                st.results.insert(idx, (Ok(content), ReadAs::of_delta(&f)));
                                true
                            }
                            None => false,
                        };
                        let _ = reply.send(ok);
                    }
                }
            }
            st.finish_dir(&mut w)?;
            Ok((st.results, w, dictionary_lost))
        });
        let progress =
            progress_bar(&agent.name, &info.name, deltas.iter().chain(&fetch).map(|&i| entries[i].size).sum());
        let net = rt.block_on(async {
            let (mut wire, mut read, mut fallback, mut delta_done) = (0u64, 0u64, Vec::new(), 0u64);
            let mut delta_warnings = Vec::new();
            for &idx in &deltas {
                let (ok, bytes, delta_read) = pull_delta(
                    &mut client,
                    agent,
                    remote,
                    (repo_ref, cache),
                    &entries[idx],
                    &delta_prev[&idx],
                    &mut delta_warnings,
                    idx,
                    &tx,
                    &progress,
                )
                .await?;
                wire += bytes;
                read += delta_read;
                if ok {
                    delta_done += 1;
                } else {
                    fallback.push(idx);
                }
            }
            fetch.extend(fallback);
            let (w2, r2, changed) =
                fetch_all(&mut client, agent, remote, &entries, &fetch, tx.clone(), &progress).await?;
            // A file written to while it was read is read once more: most writes are over by then,
            // and the second read is what is stored (with a warning if it moved again).
            let (w3, r3, _) = fetch_all(&mut client, agent, remote, &entries, &changed, tx, &progress).await?;
            Ok::<_, anyhow::Error>((wire + w2 + w3, read + r2 + r3, delta_done, delta_warnings))
        });
        let ingested = ingest.join().map_err(|_| anyhow!("the ingest thread panicked"))?;
        progress.finish_and_clear();
        let (results, mut w, dictionary_lost) = ingested?;
        warnings.extend(dictionary_lost);
        let (wire, read, delta_done, delta_warnings) = net?;
        warnings.extend(delta_warnings);
        (summary.wire_bytes, summary.bytes_read, summary.files_delta) = (wire, read, delta_done);
        if let Some(&missing) = fetch.iter().chain(&deltas).find(|i| !results.contains_key(i)) {
            bail!(
                "agent {}: the stream ended before {} arrived",
                agent.name,
                String::from_utf8_lossy(&entries[missing].path)
            );
        }
        if let Some(d) = &dump {
            verify_dump_files(&d.ready.dumps, &entries, &results)?;
        }
        let mut stats = SnapshotStats::default();
        let mut b = TreeBuild {
            entries: &entries,
            tree: &tree,
            plans: &plans,
            results: &results,
            stats: &mut stats,
            warnings: &mut warnings,
            summary,
        };
        let root = b.dir(&mut w, b"")?;
        let (index, ws) = w.finish()?;
        stats.blobs_added = ws.blobs;
        stats.bytes_added = ws.raw_bytes;
        stats.stored_added = ws.stored_bytes;
        // Versions this pull replaced: their signatures go once the snapshot is committed.
        let stale: Vec<(Vec<u8>, u64)> = fetch
            .iter()
            .chain(&deltas)
            .filter_map(|&i| {
                let old = prev_files.get(&entries[i].path)?;
                let new = results.get(&i).and_then(|(r, _)| r.as_ref().ok())?;
                (old.blake3 != new.blake3).then(|| (old.blake3.clone(), old.size))
            })
            .collect();
        Ok((root, stats, index, stale, ws.dictionary))
    })?;

    // 6. The session ends (held containers resume); the dumps' and volumes' metadata goes into
    // the snapshot.
    let (mut dumps, mut volumes) = (Vec::new(), Vec::new());
    if let Some(d) = dump {
        warnings.extend(d.ready.warnings.iter().map(|w| format!("dump: {w}")));
        dumps = d.ready.dumps.iter().map(dump_info).collect();
        volumes = d.ready.volumes.iter().map(volume_info).collect::<Vec<_>>();
        match rt.block_on(d.release()) {
            Ok(released) => {
                warnings.extend(released.warnings.iter().map(|w| format!("docker: {w}")));
                for h in &released.held {
                    let done = if h.action == "stop" { "stopped" } else { "paused" };
                    summary.held.push(format!("{} {done} {:.1} s", h.name, h.held_ms as f64 / 1000.0));
                    for v in volumes.iter_mut().filter(|v| v.containers.contains(&h.name)) {
                        v.held.push(repo_format::repofile::snapshot::ContainerHold {
                            name: h.name.clone(),
                            action: h.action.clone(),
                            held_ms: h.held_ms,
                        });
                    }
                }
            }
            // The copy is complete either way; what the agent did not confirm is the operator's to check.
            Err(e) => warnings.push(format!("agent {}: {e:#}", agent.name)),
        }
    }

    // 7. Commit: the snapshot is the last write.
    if let Some((id, f)) = index {
        repo.add_index(id, &f);
    }
    let mut metadata = HashMap::new();
    metadata.insert("agent_version".to_string(), agent_version.to_string());
    if !warnings.is_empty() {
        metadata
            .insert("warnings".to_string(), warnings.iter().take(MAX_WARNINGS).cloned().collect::<Vec<_>>().join("\n"));
        metadata.insert("warning_count".to_string(), warnings.len().to_string());
    }
    let snap = Snapshot {
        version: repo_format::magic::METADATA_VERSION,
        time_ns: start.timestamp_nanos_opt().unwrap_or_default(),
        end_time_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        host: repo_format::repository::hostname(),
        agent: agent.name.clone(),
        source: info.name.clone(),
        source_kind: info.kind.clone(),
        role: info.role.clone(),
        category: info.category.clone(),
        tree: root_id.0.to_vec(),
        parent: previous.map(|(id, _)| id.0.to_vec()).unwrap_or_default(),
        stats: Some(stats.clone()),
        metadata,
        program_version: env!("CARGO_PKG_VERSION").into(),
        dumps,
        volumes,
        dictionary: dictionary.map(|d| d.0.to_vec()).unwrap_or_default(),
        ..Default::default()
    };
    lock.ensure_held()?;
    let id = repo.save_snapshot(&snap)?;
    for (blake3, size) in stale {
        cache.remove(&blake3, size);
    }
    summary.snapshot = Some(id.to_hex());
    summary.bytes_added = stats.bytes_added;
    summary.stored_added = stats.stored_added;
    summary.warnings = warnings;
    Ok(())
}

/// Results of fetched files by entry index: the content, or why it failed; and how the file was
/// when the agent finished reading it.
type Fetches = HashMap<usize, (Result<FileContent, String>, ReadAs)>;

/// A file as the agent saw it after reading it (the end of its frames).
#[derive(Clone, Copy, Debug, Default)]
struct ReadAs {
    /// Size, mtime or ctime moved while it was read.
    changed: bool,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl ReadAs {
    fn of(f: &FileFrame) -> ReadAs {
        ReadAs { changed: f.changed, mtime_ns: f.mtime_ns, ctime_ns: f.ctime_ns }
    }

    fn of_delta(f: &DeltaFrame) -> ReadAs {
        ReadAs { changed: f.changed, mtime_ns: f.mtime_ns, ctime_ns: f.ctime_ns }
    }
}

/// What the network side hands the ingest thread.
enum Msg {
    /// Frames of a ReadFiles call, whose `index` points into the batch (entry indices).
    Files(Arc<Vec<usize>>, Vec<FileFrame>),
    /// One window of an entry rebuilt from its previous version and the agent's delta.
    Window(usize, Vec<u8>, Vec<Origin>),
    /// The end of a delta (its `error` set when the network side could not apply it): the
    /// ingest thread answers whether the result verified.
    DeltaEnd(usize, DeltaFrame, tokio::sync::oneshot::Sender<bool>),
}

/// Pull one file as an rsync delta against its previous version. Returns whether it verified on
/// a file that held still while it was read (if not, the caller fetches it whole), the wire
/// bytes it cost and the bytes the agent read; a previous version that cannot be read adds to
/// `warnings`.
#[allow(clippy::too_many_arguments)]
async fn pull_delta(
    client: &mut AgentClient<Channel>,
    agent: &AgentEntry,
    src: Remote<'_>,
    (repo, cache): (&Repository, &SignatureCache),
    entry: &Entry,
    prev: &Node,
    warnings: &mut Vec<String>,
    idx: usize,
    tx: &mpsc::Sender<Msg>,
    progress: &ProgressBar,
) -> Result<(bool, u64, u64)> {
    let bs = delta::block_size(prev.size);
    let signature = match cache.get(&prev.blake3, bs) {
        Some(sig) => sig,
        None => match OldContent::new(repo, prev).signature() {
            Ok(sig) => sig,
            Err(e) => {
                // Without its previous version the file still travels, whole.
                warnings.push(format!(
                    "{}: its previous version cannot be read ({e:#}); read whole",
                    String::from_utf8_lossy(&entry.path)
                ));
                return Ok((false, 0, 0));
            }
        },
    };
    let request = DeltaRequest {
        source: src.name.to_string(),
        path: entry.path.clone(),
        signature,
        compress: agent.compress(),
        session: src.session.to_string(),
    };
    let mut stream = match client.delta(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            // Refused (an older agent, a limit): the file travels whole instead.
            tracing::info!(
                "agent {}: no delta for {}: {}",
                agent.name,
                String::from_utf8_lossy(&entry.path),
                s.message()
            );
            return Ok((false, 0, 0));
        }
    };
    let mut reader = FrameReader::new(agent.compress())?;
    let (mut wire, mut read) = (0u64, 0u64);
    let gone = || anyhow!("the ingest thread stopped");
    // The windows are rebuilt here, on the thread that waits for the network, so that reading
    // the previous version (two thirds of the work: decrypting and decompressing old chunks)
    // runs beside the ingest thread's chunking instead of before it.
    let mut old = OldContent::new(repo, prev);
    // A changed dump chunk is compressed against the old chunk its bytes mostly come from; until
    // the first window shows whether this is a dump, where they come from is noted.
    old.note_origins(true);
    let mut first = true;
    let mut failed: Option<String> = None;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow!("agent {}: the delta stream of {} broke off: {}", agent.name, src.name, s.message()))?
    {
        wire += msg.encoded_len() as u64;
        for mut f in reader.push::<DeltaFrame>(msg.data)? {
            if f.end {
                if let Some(why) = failed.filter(|_| f.error.is_empty()) {
                    f.error = why;
                }
                let changed = f.changed;
                let (reply, verdict) = tokio::sync::oneshot::channel();
                tx.send(Msg::DeltaEnd(idx, f, reply)).await.map_err(|_| gone())?;
                return Ok((verdict.await.unwrap_or(false) && !changed, wire, read));
            }
            read += f.window_len;
            progress.inc(f.window_len);
            if failed.is_some() {
                continue;
            }
            let mut window = Vec::with_capacity(f.window_len.min(delta::MAX_WINDOW) as usize);
            match old.apply(&f.delta, f.window_len, &mut window) {
                Ok(()) => {
                    if std::mem::take(&mut first) && !is_dump(src.dumps, &window) {
                        old.note_origins(false);
                    }
                    let origins = old.take_origins();
                    tx.send(Msg::Window(idx, window, origins)).await.map_err(|_| gone())?
                }
                Err(e) => failed = Some(format!("{e:#}")),
            }
        }
    }
    bail!(
        "agent {}: the delta stream of {} ended without its last frame",
        agent.name,
        String::from_utf8_lossy(&entry.path)
    )
}

/// Whether content starting with `head` is stored as a database dump: everything in a dump
/// source, elsewhere what its first bytes say is database content. The network side of a delta
/// decides by it too (whether to note where copies come from), so both sides agree.
fn is_dump(dump_source: bool, head: &[u8]) -> bool {
    dump_source || is_database_content(head)
}

/// The chunkers of a source: database content (by its first bytes) gets the dump chunker and
/// the dump dictionary even in a path source; everything in a dump source does.
#[derive(Clone)]
struct Chunkers {
    files: repo_format::chunker::Chunker,
    dumps: repo_format::chunker::Chunker,
    dump_source: bool,
}

impl Chunkers {
    fn new(repo: &Repository, dump_source: bool) -> Result<Chunkers> {
        Ok(Chunkers { files: repo.chunker(dump_source)?, dumps: repo.chunker(true)?, dump_source })
    }

    /// A file's content, starting with `first` then `then` (only their first bytes are looked at).
    fn content(&self, first: &[u8], then: &[u8]) -> ChunkedContent {
        use repo_format::chunker::DATABASE_HEAD;
        let mut head = first[..first.len().min(DATABASE_HEAD)].to_vec();
        head.extend_from_slice(&then[..then.len().min(DATABASE_HEAD - head.len())]);
        if is_dump(self.dump_source, &head) {
            ChunkedContent::dump(self.dumps.clone())
        } else {
            ChunkedContent::new(self.files.clone())
        }
    }
}

/// A file being rebuilt from its previous version and the agent's window deltas: the windows
/// arrive rebuilt (see [`pull_delta`]) and are chunked and signed here.
struct Patch {
    idx: usize,
    chunkers: Chunkers,
    /// Started with the first window (its bytes choose the chunker).
    content: Option<ChunkedContent>,
    sig: SignatureBuilder,
}

impl Patch {
    fn new(idx: usize, chunkers: &Chunkers, size: u64) -> Patch {
        Patch { idx, chunkers: chunkers.clone(), content: None, sig: SignatureBuilder::new(size) }
    }

    /// Store one window, copied from the stored blobs `origins` say; an error is the
    /// repository's (a full disk), so the pull's.
    fn window(&mut self, w: &mut Writer<'_>, bytes: &[u8], origins: Vec<Origin>) -> Result<()> {
        let content = self.content.get_or_insert_with(|| self.chunkers.content(bytes, &[]));
        content.push_from(w, bytes, origins)?;
        self.sig.push(bytes);
        Ok(())
    }

    /// The rebuilt content if it verifies against the agent's BLAKE3.
    fn finish(self, w: &mut Writer<'_>, end: &DeltaFrame, cache: &SignatureCache) -> Result<Option<FileContent>> {
        if !end.error.is_empty() {
            tracing::debug!("delta not used: {}", end.error);
            return Ok(None);
        }
        let content = self.content.unwrap_or_else(|| self.chunkers.content(&[], &[])).finish(w)?;
        if content.blake3.as_slice() != end.blake3.as_slice() {
            return Ok(None);
        }
        // Content that changed while it was read is read again: its signature would never be used.
        if !end.changed {
            remember_signature(cache, &content, Some(self.sig));
        }
        Ok(Some(content))
    }
}

/// Stream the files to fetch in batches; returns the wire bytes, the content bytes and the files
/// that changed while they were read.
async fn fetch_all(
    client: &mut AgentClient<Channel>,
    agent: &AgentEntry,
    src: Remote<'_>,
    entries: &[Entry],
    fetch: &[usize],
    tx: mpsc::Sender<Msg>,
    progress: &ProgressBar,
) -> Result<(u64, u64, Vec<usize>)> {
    let (mut wire, mut read, mut changed) = (0u64, 0u64, Vec::new());
    let mut i = 0;
    while i < fetch.len() {
        let mut j = i;
        let mut bytes = 0u64;
        while j < fetch.len() && j - i < BATCH_FILES && (j == i || bytes + entries[fetch[j]].size <= BATCH_BYTES) {
            bytes += entries[fetch[j]].size;
            j += 1;
        }
        let batch: Arc<Vec<usize>> = Arc::new(fetch[i..j].to_vec());
        let paths = batch.iter().map(|&k| entries[k].path.clone()).collect();
        let mut stream = client
            .read_files(ReadFilesRequest {
                source: src.name.to_string(),
                paths,
                compress: agent.compress(),
                session: src.session.to_string(),
            })
            .await
            .map_err(|s| anyhow!("agent {}: reading files of {}: {}", agent.name, src.name, s.message()))?
            .into_inner();
        let mut reader = FrameReader::new(agent.compress())?;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow!("agent {}: the file stream of {} broke off: {}", agent.name, src.name, s.message()))?
        {
            wire += msg.encoded_len() as u64;
            let frames: Vec<FileFrame> = reader.push(msg.data)?;
            changed.extend(
                frames
                    .iter()
                    .filter(|f| f.end && f.changed && f.error.is_empty())
                    .filter_map(|f| batch.get(f.index as usize)),
            );
            let got = frames.iter().map(|f| f.data.len() as u64).sum::<u64>();
            read += got;
            progress.inc(got);
            if !frames.is_empty() && tx.send(Msg::Files(batch.clone(), frames)).await.is_err() {
                // The ingest thread stopped; its error is the one to report.
                return Ok((wire, read, changed));
            }
        }
        i = j;
    }
    Ok((wire, read, changed))
}

enum Current {
    Small(Vec<u8>),
    /// A large file, and the signature of its content for the next delta (files of
    /// `DELTA_MIN` and more that are likely to change, see [`Ingest::frame`]).
    Large(Box<ChunkedContent>, Option<SignatureBuilder>),
}

/// The ingest side: file frames in, content in the repository out.
struct Ingest<'c> {
    cache: &'c SignatureCache,
    /// What the pull does with each entry: a fetched file with a previous version changed.
    plans: &'c HashMap<usize, Plan>,
    chunkers: Chunkers,
    threshold: u64,
    current: Option<(usize, Current)>,
    small: SmallFiles,
    /// Directory of the small files pushed since the last flush, and those files.
    small_dir: Vec<u8>,
    pending: Vec<(usize, StreamRange, [u8; 32], u64, ReadAs)>,
    results: Fetches,
}

fn parent_of(path: &[u8]) -> &[u8] {
    path.iter().rposition(|&b| b == b'/').map(|p| &path[..p]).unwrap_or(b"")
}

impl<'c> Ingest<'c> {
    fn new(
        chunkers: Chunkers,
        threshold: u64,
        cache: &'c SignatureCache,
        plans: &'c HashMap<usize, Plan>,
    ) -> Ingest<'c> {
        Ingest {
            cache,
            plans,
            small: SmallFiles::new(chunkers.files.clone()),
            chunkers,
            threshold,
            current: None,
            small_dir: Vec::new(),
            pending: Vec::new(),
            results: HashMap::new(),
        }
    }

    fn frame(&mut self, w: &mut Writer<'_>, entries: &[Entry], idx: usize, f: FileFrame) -> Result<()> {
        let size = entries[idx].size;
        // Signed now only where a delta is likely next time: database content, which changes
        // every day, and files that changed since the last pull. Any other file's signature is
        // built from the repository the day it first changes, so that the cache does not hold
        // 0.6% of every large file that never will (uploads, media, images).
        let changed = matches!(self.plans.get(&idx), Some(Plan::Fetch { had_previous: true }));
        let likely_to_change = |c: &ChunkedContent| c.is_dump() || changed;
        let signature =
            |c: &ChunkedContent| (size >= delta::DELTA_MIN && likely_to_change(c)).then(|| SignatureBuilder::new(size));
        if self.current.as_ref().is_none_or(|(i, _)| *i != idx) {
            // The chunker is chosen by the first bytes: a large file whose first frame is shorter
            // than that (a short read) starts in the small buffer, and moves on with the next frame.
            let short = f.data.len() < repo_format::chunker::DATABASE_HEAD && !f.end;
            let cur = if size < self.threshold || short {
                Current::Small(Vec::new())
            } else {
                let c = Box::new(self.chunkers.content(&f.data, &[]));
                let sig = signature(&c);
                Current::Large(c, sig)
            };
            self.current = Some((idx, cur));
        }
        let (_, cur) = self.current.as_mut().expect("set above");
        if !f.data.is_empty() {
            // A file listed as small that turns out larger is chunked like any large file.
            if let Current::Small(buf) = cur
                && (buf.len() + f.data.len()) as u64 > self.threshold
            {
                let mut c = Box::new(self.chunkers.content(buf, &f.data));
                c.push(w, buf)?;
                let mut sig = signature(&c);
                if let Some(sig) = &mut sig {
                    sig.push(buf);
                }
                *cur = Current::Large(c, sig);
            }
            match cur {
                Current::Small(buf) => buf.extend_from_slice(&f.data),
                Current::Large(c, sig) => {
                    c.push(w, &f.data)?;
                    if let Some(sig) = sig {
                        sig.push(&f.data);
                    }
                }
            }
        }
        if !f.end {
            return Ok(());
        }
        let (_, cur) = self.current.take().expect("set above");
        if !f.error.is_empty() {
            self.record(idx, Err(f.error), ReadAs::default());
            return Ok(());
        }
        match cur {
            Current::Small(buf) => {
                let hash = *blake3::hash(&buf).as_bytes();
                if hash.as_slice() != f.blake3.as_slice() {
                    self.record(idx, Err("content differs from the BLAKE3 the agent computed".into()), ReadAs::of(&f));
                    return Ok(());
                }
                let dir = parent_of(&entries[idx].path);
                if dir != self.small_dir.as_slice() {
                    self.finish_dir(w)?;
                    self.small_dir = dir.to_vec();
                }
                let range = self.small.push(w, &buf)?;
                self.pending.push((idx, range, hash, buf.len() as u64, ReadAs::of(&f)));
            }
            Current::Large(c, sig) => {
                let content = c.finish(w)?;
                let result = if content.blake3.as_slice() == f.blake3.as_slice() {
                    if !f.changed {
                        remember_signature(self.cache, &content, sig);
                    }
                    Ok(content)
                } else {
                    Err("content differs from the BLAKE3 the agent computed".into())
                };
                self.record(idx, result, ReadAs::of(&f));
            }
        }
        Ok(())
    }

    /// The result of a read, which replaces that of an earlier read of the file (one that
    /// changed while it was read, see [`fetch_all`]), including one still waiting in `pending`.
    fn record(&mut self, idx: usize, result: Result<FileContent, String>, read: ReadAs) {
        self.pending.retain(|p| p.0 != idx);
        self.results.insert(idx, (result, read));
    }

    /// Cut the shared stream of the current directory's small files and resolve them.
    fn finish_dir(&mut self, w: &mut Writer<'_>) -> Result<()> {
        self.small.flush(w)?;
        for (idx, range, blake3, size, read) in self.pending.drain(..) {
            self.results.insert(idx, (Ok(FileContent { chunks: self.small.resolve(range), size, blake3 }), read));
        }
        self.small.clear();
        Ok(())
    }
}

/// Entries by directory.
#[derive(Default)]
struct DirTree {
    children: HashMap<Vec<u8>, Vec<(Vec<u8>, usize)>>,
}

/// Deepest path accepted from an agent (tree building recurses per level).
const MAX_DEPTH: usize = 256;

impl DirTree {
    /// Index the listing, keeping only entries that can be stored and restored: a valid,
    /// unique path whose parent directory was listed. Everything else becomes a warning.
    fn from_entries(entries: &[Entry], warnings: &mut Vec<String>) -> DirTree {
        let mut tree = DirTree::default();
        let dirs: std::collections::HashSet<&[u8]> = entries
            .iter()
            .filter(|e| e.error.is_empty() && e.kind == EntryKind::Dir as i32)
            .map(|e| e.path.as_slice())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            let shown = String::from_utf8_lossy(&e.path);
            let comps = e.path.split(|&b| b == b'/');
            let valid = !e.path.is_empty()
                && comps.clone().all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0));
            let why = if !e.error.is_empty() {
                e.error.clone()
            } else if !valid {
                "not a valid relative path; skipped".into()
            } else if comps.count() > MAX_DEPTH {
                format!("deeper than {MAX_DEPTH} levels; skipped")
            } else if !seen.insert(e.path.as_slice()) {
                "listed twice; the first is kept".into()
            } else if !parent_of(&e.path).is_empty() && !dirs.contains(parent_of(&e.path)) {
                "its directory is not in the listing; skipped".into()
            } else {
                tree.insert(&e.path, i);
                continue;
            };
            warnings.push(format!("{shown}: {why}"));
        }
        tree
    }

    fn insert(&mut self, path: &[u8], idx: usize) {
        let parent = parent_of(path);
        let name = path[if parent.is_empty() { 0 } else { parent.len() + 1 }..].to_vec();
        self.children.entry(parent.to_vec()).or_default().push((name, idx));
    }

    fn sorted(&self, dir: &[u8]) -> Vec<(Vec<u8>, usize)> {
        let mut v = self.children.get(dir).cloned().unwrap_or_default();
        v.sort();
        v
    }

    /// File entries in restore order: depth first; in each directory the entries that are not
    /// directories by name, then the sub-directories by name.
    fn files_in_order(&self, entries: &[Entry]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack = vec![Vec::new()];
        while let Some(dir) = stack.pop() {
            let kids = self.sorted(&dir);
            out.extend(kids.iter().filter(|(_, i)| entries[*i].kind == EntryKind::File as i32).map(|(_, i)| *i));
            for (_, i) in kids.iter().rev().filter(|(_, i)| entries[*i].kind == EntryKind::Dir as i32) {
                stack.push(entries[*i].path.clone());
            }
        }
        out
    }
}

fn node_from_entry(e: &Entry, name: Vec<u8>) -> Node {
    let kind = match EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unknown) {
        EntryKind::File => NodeKind::File,
        EntryKind::Dir => NodeKind::Dir,
        EntryKind::Symlink => NodeKind::Symlink,
        EntryKind::CharDevice => NodeKind::CharDevice,
        EntryKind::BlockDevice => NodeKind::BlockDevice,
        EntryKind::Fifo => NodeKind::Fifo,
        EntryKind::Socket => NodeKind::Socket,
        EntryKind::Unknown => NodeKind::Unknown,
    };
    Node {
        name,
        kind: kind as i32,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        user: e.user.clone(),
        group: e.group.clone(),
        mtime_ns: e.mtime_ns,
        ctime_ns: e.ctime_ns,
        size: e.size,
        inode: e.inode,
        device: e.device,
        nlink: e.nlink,
        link_target: e.link_target.clone(),
        rdev: e.rdev,
        xattrs: e.xattrs.iter().map(|x| Xattr { name: x.name.clone(), value: x.value.clone() }).collect(),
        ..Default::default()
    }
}

struct TreeBuild<'a> {
    entries: &'a [Entry],
    tree: &'a DirTree,
    plans: &'a HashMap<usize, Plan>,
    results: &'a Fetches,
    stats: &'a mut SnapshotStats,
    warnings: &'a mut Vec<String>,
    summary: &'a mut SourceSummary,
}

impl TreeBuild<'_> {
    /// The content a file entry ends up with, if any.
    fn content(&self, idx: usize) -> Option<(Vec<ChunkRef>, Vec<u8>, u64)> {
        match self.plans.get(&idx)? {
            Plan::Reuse(n) => Some((n.content.clone(), n.blake3.clone(), n.size)),
            Plan::Fetch { .. } => match self.results.get(&idx)? {
                (Ok(c), _) => Some((c.chunks.clone(), c.blake3.to_vec(), c.size)),
                (Err(_), _) => None,
            },
            Plan::LinkTo(first) => self.content(*first),
        }
    }

    fn dir(&mut self, w: &mut Writer<'_>, path: &[u8]) -> Result<Id> {
        let mut nodes = Vec::new();
        for (name, idx) in self.tree.sorted(path) {
            let e = &self.entries[idx];
            let mut node = node_from_entry(e, name);
            let shown = || String::from_utf8_lossy(&e.path).into_owned();
            match node.node_kind() {
                NodeKind::Dir => {
                    node.subtree = self.dir(w, &e.path)?.0.to_vec();
                    self.stats.dirs += 1;
                }
                NodeKind::File => {
                    match self.plans.get(&idx) {
                        Some(Plan::Fetch { had_previous }) => match self.results.get(&idx) {
                            Some((Ok(_), read)) => {
                                if *had_previous {
                                    self.summary.files_changed += 1;
                                } else {
                                    self.summary.files_new += 1;
                                }
                                if read.changed {
                                    // The listing's times stay: older than the file's, they make
                                    // the next pull read it again.
                                    self.warnings.push(format!(
                                        "{}: changed while it was read, twice; stored as last read",
                                        shown()
                                    ));
                                } else {
                                    // The times of the content stored, which the listing's are
                                    // not when the file changed between the listing and its read.
                                    (node.mtime_ns, node.ctime_ns) = (read.mtime_ns, read.ctime_ns);
                                }
                            }
                            Some((Err(why), _)) => {
                                self.summary.files_failed += 1;
                                self.warnings.push(format!("{}: not stored: {why}", shown()));
                                continue;
                            }
                            None => bail!("{}: no result", shown()),
                        },
                        Some(Plan::LinkTo(first)) => {
                            node.kind = NodeKind::Hardlink as i32;
                            node.link_target = self.entries[*first].path.clone();
                        }
                        _ => {}
                    }
                    let Some((chunks, blake3, size)) = self.content(idx) else {
                        self.warnings.push(format!("{}: not stored: its first link failed", shown()));
                        continue;
                    };
                    (node.content, node.blake3, node.size) = (chunks, blake3, size);
                    self.stats.files += 1;
                    self.stats.bytes += node.size;
                }
                _ => self.stats.others += 1,
            }
            nodes.push(node);
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let tree = Tree { version: repo_format::magic::METADATA_VERSION, nodes };
        Ok(w.add(BlobKind::Tree, tree.encode_to_vec())?)
    }
}

/// A byte progress bar on a terminal, one line per source pulled at the same time; hidden
/// otherwise (timers, pipes, --json callers).
pub(crate) fn progress_bar(agent: &str, source: &str, total: u64) -> ProgressBar {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = BARS.get_or_init(indicatif::MultiProgress::new).add(ProgressBar::new(total));
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("{agent}/{source}"));
    bar
}

/// Keep the signature of a stored version for its next delta.
fn remember_signature(cache: &SignatureCache, content: &FileContent, sig: Option<SignatureBuilder>) {
    if let Some((bs, sig)) = sig.and_then(|s| s.finish(content.size)) {
        cache.put(&content.blake3, bs, &sig);
    }
}

/// Every entry of a source, in the agent's order.
async fn list_entries(
    mut client: AgentClient<Channel>,
    agent: String,
    source: String,
    session: String,
) -> Result<Vec<Entry>> {
    let mut stream = client
        .list(ListRequest { source: source.clone(), session })
        .await
        .map_err(|s| anyhow!("agent {agent}: listing {source}: {}", s.message()))?
        .into_inner();
    let mut all = Vec::new();
    let mut complete = false;
    while let Some(batch) =
        stream.message().await.map_err(|s| anyhow!("agent {agent}: listing {source} broke off: {}", s.message()))?
    {
        all.extend(batch.entries);
        complete = batch.complete;
    }
    if !complete {
        bail!("agent {agent}: the listing of {source} ended before it was complete");
    }
    Ok(all)
}

/// The files of a snapshot with content, by path: what an unchanged file reuses. Boxed: a table of
/// whole nodes would stay at its full size after the unchanged files move out of it.
fn previous_files(repo: &Repository, snapshot: &Snapshot) -> Result<HashMap<Vec<u8>, Box<Node>>> {
    let mut m = HashMap::new();
    let root = Id::from_slice(&snapshot.tree).context("previous snapshot has no tree")?;
    repo_format::fs::walk(repo, &root, &mut |p, n| {
        if matches!(n.node_kind(), NodeKind::File | NodeKind::Hardlink) && !n.blake3.is_empty() {
            m.insert(p.to_vec(), Box::new(n.clone()));
        }
        Ok(())
    })?;
    Ok(m)
}

/// The newest snapshot of (agent, source).
fn previous_snapshot(repo: &Repository, agent: &str, source: &str) -> Result<Option<(Id, Snapshot)>> {
    Ok(repo
        .snapshots()?
        .into_iter()
        .filter(|(_, s)| s.agent == agent && s.source == source)
        .max_by_key(|(_, s)| s.time_ns))
}
