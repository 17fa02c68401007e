//! The gRPC service: handshake, list, read. Errors become Status values naming the source
//! or path; file-level trouble (vanished, permission denied) travels in-band per file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magpie_proto::v1::agent_server::Agent;
use magpie_proto::v1::{
    DeltaFrame, DeltaRequest, DeltaResponse, DumpEvent, DumpReady, DumpReleased, DumpRequest, FileFrame,
    HandshakeRequest, HandshakeResponse, ListRequest, ListResponse, ReadFilesRequest, ReadFilesResponse,
    RestoreCheckRequest, RestoreCheckResponse, RestoreEvent, RestoreMessage, RestoreResult, RestoreStart, SourceInfo,
    dump_event, restore_event, restore_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Source;
use crate::readahead::with_read_ahead;
use crate::source;
use crate::spool::Spool;
use crate::wire::FrameWriter;

/// Entries per ListResponse.
const LIST_BATCH: usize = 512;
/// Bytes of file content per FileFrame.
const PIECE: usize = 256 * 1024;
/// Window of a file diffed at once: the diff needs a slice, so a large file is diffed
/// in windows read with ordinary reads (never mapped: a live file that shrinks would kill us).
const DELTA_WINDOW: usize = 4 << 20;
/// Signature limits: the block sizes and MD4 prefix the collector uses, and a length that covers
/// a 100 GiB file at the smallest block (a forged header could otherwise stall `diff`).
const SIG_BLOCK: std::ops::RangeInclusive<u32> = 2048..=65536;
const SIG_MAX_LEN: usize = 64 << 20;
/// A first window whose delta is more than this share literal data means the file changed
/// wholesale: the collector is told to fetch it whole instead.
const NO_GAIN: f64 = 0.9;

/// How long a dump's spool waits for the collector to pull it.
const MAX_SESSION: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone)]
pub struct AgentService {
    pub name: String,
    pub sources: Vec<Arc<Source>>,
    /// Bounds the reads and diffs running at once, and so the memory they hold.
    pub work: Arc<tokio::sync::Semaphore>,
    /// Bounds the dumps running at once (each loads a database server).
    pub dumps: Arc<tokio::sync::Semaphore>,
    pub spool: Arc<Spool>,
    /// Dump spools being pulled, by session id.
    pub sessions: Arc<Mutex<HashMap<String, Arc<Source>>>>,
    /// `allow_restore` from agent.toml: the restore endpoints refuse unless it is set.
    pub allow_restore: bool,
    /// One volume hold at a time: two holds sharing a container must not resume it for each other.
    pub holds: Arc<tokio::sync::Mutex<()>>,
    /// Containers held and not yet resumed, kept on disk for an agent that dies holding them.
    pub hold_record: Arc<crate::volume::HoldRecord>,
}

/// Paths per ReadFiles call.
const MAX_PATHS: usize = 10_000;

/// Accept only signatures of the shape the collector sends.
fn check_signature(sig: Vec<u8>) -> Result<Vec<u8>, Status> {
    let bad = |why: &str| Status::invalid_argument(format!("bad signature: {why}"));
    if sig.len() > SIG_MAX_LEN || sig.len() < 12 {
        return Err(bad("length"));
    }
    let word = |i: usize| u32::from_be_bytes(sig[i..i + 4].try_into().expect("4 bytes"));
    let (block, hash) = (word(4), word(8));
    if word(0) != crate::rsync::SIGNATURE_MAGIC {
        return Err(bad("not a librsync MD4 signature"));
    }
    if !SIG_BLOCK.contains(&block) || !(1..=16).contains(&hash) || !(sig.len() - 12).is_multiple_of(4 + hash as usize) {
        return Err(bad("block size, hash size or length out of range"));
    }
    // The entries are read when the diff indexes them.
    Ok(sig)
}

impl AgentService {
    /// The source a request reads: a path source, or the spool of a dump session.
    fn resolve(&self, name: &str, session: &str) -> Result<Arc<Source>, Status> {
        let src = self
            .sources
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Status::not_found(format!("agent {} has no source {name:?}", self.name)))?;
        match (src.needs_session(), session) {
            (false, "") => Ok(src.clone()),
            (false, _) => Err(Status::invalid_argument(format!("source {name:?} is not a dump source"))),
            (true, "") => Err(Status::failed_precondition(format!(
                "source {name:?} is read through a session: call Dump first, then read with its session"
            ))),
            (true, id) => self
                .sessions
                .lock()
                .expect("sessions")
                .get(id)
                .filter(|s| s.name == name)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no dump session {id:?} of source {name:?} (it ended)"))),
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn handshake(&self, request: Request<HandshakeRequest>) -> Result<Response<HandshakeResponse>, Status> {
        let req = request.into_inner();
        tracing::info!("handshake from collector {} (protocol {})", req.collector_version, req.protocol);
        Ok(Response::new(HandshakeResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol: magpie_proto::PROTOCOL_VERSION,
            host: self.name.clone(),
            now_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos().try_into().unwrap_or(i64::MAX)),
            sources: self
                .sources
                .iter()
                .map(|s| SourceInfo {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    role: s.role.clone(),
                    category: s.category.clone(),
                    dump: s.needs_session(),
                })
                .collect(),
        }))
    }

    type ListStream = ReceiverStream<Result<ListResponse, Status>>;

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<Self::ListStream>, Status> {
        let src = self.resolve(&request.get_ref().source, &request.get_ref().session)?;
        // A root that is gone makes the pull fail, not an empty snapshot that looks complete.
        for root in &src.roots {
            root.open().map_err(|e| {
                Status::failed_precondition(format!("source {}: {e} (restore it, or fix agent.toml)", src.name))
            })?;
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(LIST_BATCH);
            source::list(&src, &mut |e| {
                batch.push(e);
                if batch.len() < LIST_BATCH {
                    return true;
                }
                tx.blocking_send(Ok(ListResponse { entries: std::mem::take(&mut batch), complete: false })).is_ok()
            });
            // The last message says the listing is whole; a stream cut short lacks it.
            let _ = tx.blocking_send(Ok(ListResponse { entries: batch, complete: true }));
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ReadFilesStream = ReceiverStream<Result<ReadFilesResponse, Status>>;

    async fn read_files(&self, request: Request<ReadFilesRequest>) -> Result<Response<Self::ReadFilesStream>, Status> {
        let req = request.into_inner();
        let src = self.resolve(&req.source, &req.session)?;
        if req.paths.len() > MAX_PATHS {
            return Err(Status::invalid_argument(format!("at most {MAX_PATHS} paths per call")));
        }
        let permit = self.work.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let src = &*src;
            with_read_ahead(src, &req.paths, |ahead| {
                let send = |data: Vec<u8>| {
                    data.is_empty() || tx.blocking_send(Ok(ReadFilesResponse { data: data.into() })).is_ok()
                };
                let fail = |e: std::io::Error| {
                    let _ = tx.blocking_send(Err(Status::internal(format!("encoding the file stream: {e}"))));
                };
                let mut w = match FrameWriter::new(req.compress) {
                    Ok(w) => w,
                    Err(e) => return fail(e),
                };
                // One read buffer for the call: a fresh one per file cost a clear of 256 KiB for each
                // small file (glibc's calloc on a reused heap block).
                let mut buf = vec![0u8; PIECE];
                for (i, path) in req.paths.iter().enumerate() {
                    ahead.reading(i);
                    let index = i as u32;
                    let mut out_err: Option<std::io::Error> = None;
                    let result = source::open(src, path).and_then(|f| {
                        source::read(f, &mut buf, &mut |piece| match w.push_file_data(index, piece) {
                            Ok(Some(seg)) => send(seg),
                            Ok(None) => true,
                            Err(e) => {
                                out_err = Some(e);
                                false
                            }
                        })
                    });
                    if let Some(e) = out_err {
                        return fail(e);
                    }
                    let end = match result {
                        Ok(r) => FileFrame {
                            index,
                            end: true,
                            blake3: r.blake3.to_vec(),
                            size: r.size,
                            mtime_ns: r.mtime_ns,
                            ctime_ns: r.ctime_ns,
                            changed: r.changed,
                            ..Default::default()
                        },
                        // The collector went away: stop quietly.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return,
                        Err(e) => {
                            tracing::debug!("{}: {e}", String::from_utf8_lossy(path));
                            FileFrame { index, end: true, error: e.to_string(), ..Default::default() }
                        }
                    };
                    match w.push(&end) {
                        Ok(Some(seg)) => {
                            if !send(seg) {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return fail(e),
                    }
                }
                match w.finish() {
                    Ok(seg) => {
                        send(seg);
                    }
                    Err(e) => fail(e),
                }
            })
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DumpStream = ReceiverStream<Result<DumpEvent, Status>>;

    async fn dump(&self, request: Request<Streaming<DumpRequest>>) -> Result<Response<Self::DumpStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("an empty dump request"))?;
        let src = self
            .sources
            .iter()
            .find(|s| s.name == first.source)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("agent {} has no source {:?}", self.name, first.source)))?;
        if !src.needs_session() {
            return Err(Status::invalid_argument(format!("source {:?} is not a dump source", src.name)));
        }
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let run = match src.volume {
                Some(_) => this.run_hold(inbound, src, tx.clone()).await,
                None => this.run_dump(inbound, src, tx.clone()).await,
            };
            if let Err(status) = run {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn restore_check(
        &self,
        request: Request<RestoreCheckRequest>,
    ) -> Result<Response<RestoreCheckResponse>, Status> {
        let req = request.into_inner();
        let src = self.restorable(&req.source)?;
        let spool = self.spool.clone();
        let r = tokio::task::spawn_blocking(move || crate::restore::readiness(&src, &spool, &req))
            .await
            .map_err(|e| Status::internal(format!("the readiness check failed: {e}")))?;
        Ok(Response::new(r))
    }

    type RestoreStream = ReceiverStream<Result<RestoreEvent, Status>>;

    async fn restore(
        &self,
        request: Request<Streaming<RestoreMessage>>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let mut inbound = request.into_inner();
        let start = match inbound.message().await?.and_then(|m| m.msg) {
            Some(restore_message::Msg::Start(s)) => s,
            _ => return Err(Status::invalid_argument("a restore must begin with RestoreStart")),
        };
        let src = self.restorable(&start.source)?;
        // A dump source's restore runs its hooks and loads its server: never beside a dump.
        let permit = match &src.dump {
            Some(_) => {
                Some(self.dumps.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?)
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            tracing::info!("restore of source {} started", src.name);
            let result = this.run_restore(&handle, inbound, &src, &start, &tx);
            match &result {
                Ok(r) => tracing::info!(
                    "restore of source {} done: {} files, {} bytes; checks {}",
                    src.name,
                    r.files,
                    r.bytes,
                    if r.checks.iter().all(|c| c.ok) { "passed" } else { "FAILED" }
                ),
                Err(s) => tracing::warn!("restore of source {} failed: {}", src.name, s.message()),
            }
            let event = result.map(|r| RestoreEvent { event: Some(restore_event::Event::Result(r)) });
            let _ = tx.blocking_send(event);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DeltaStream = ReceiverStream<Result<DeltaResponse, Status>>;

    async fn delta(&self, request: Request<DeltaRequest>) -> Result<Response<Self::DeltaStream>, Status> {
        let req = request.into_inner();
        let src = self.resolve(&req.source, &req.session)?;
        let signature = check_signature(req.signature)?;
        let permit = self.work.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let send =
                |data: Vec<u8>| data.is_empty() || tx.blocking_send(Ok(DeltaResponse { data: data.into() })).is_ok();
            let mut w = match FrameWriter::new(req.compress) {
                Ok(w) => w,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                    return;
                }
            };
            let end = match delta_frames(&src, &req.path, &signature, &mut |f| match w.push(&f) {
                Ok(Some(seg)) => send(seg),
                Ok(None) => true,
                Err(_) => false,
            }) {
                Ok(Some(end)) => end,
                Ok(None) => return,
                Err(e) => DeltaFrame { end: true, error: e.to_string(), ..Default::default() },
            };
            if let Ok(Some(seg)) = w.push(&end)
                && !send(seg)
            {
                return;
            }
            if let Ok(seg) = w.finish() {
                send(seg);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl AgentService {
    /// A source restores may write to (refused unless the agent allows restores).
    fn restorable(&self, name: &str) -> Result<Arc<Source>, Status> {
        if !self.allow_restore {
            return Err(Status::permission_denied(format!(
                "agent {} does not accept restores: set allow_restore = true in its agent.toml to allow them",
                self.name
            )));
        }
        self.sources
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("agent {} has no source {name:?}", self.name)))
    }

    /// Receive a restore and write it; for a dump source, then load the dumps. Runs on a
    /// blocking thread (the writes are ordinary file system calls).
    fn run_restore(
        &self,
        handle: &tokio::runtime::Handle,
        mut inbound: Streaming<RestoreMessage>,
        src: &Source,
        start: &RestoreStart,
        tx: &mpsc::Sender<Result<RestoreEvent, Status>>,
    ) -> Result<RestoreResult, Status> {
        let failed = |e: std::io::Error| Status::aborted(format!("restore of source {}: {e}", src.name));
        let report = |line: String| {
            tracing::info!("source {}: {line}", src.name);
            let _ = tx.try_send(Ok(RestoreEvent { event: Some(restore_event::Event::Progress(line)) }));
        };
        // Dumps are spooled, checked, then loaded; files go straight to their place.
        let session = match &src.dump {
            Some(_) => Some(self.spool.session().map_err(|e| Status::internal(format!("{e:#}")))?),
            None => None,
        };
        let base = match (&session, &src.restore_root) {
            (Some(s), _) => s.path.join("out"),
            (None, Some(r)) => r.clone(),
            (None, None) => std::path::PathBuf::from("/"),
        };
        // A docker-volume source: its volumes made when missing, the containers that mount them
        // stopped while they are written and started again after (also on every error path).
        let mut _one_hold = None;
        let mut volume_hold = None;
        let mut w = match &src.volume {
            Some(spec) => {
                if start.volumes.is_empty() {
                    return Err(Status::invalid_argument("the snapshot records no Docker volume to restore"));
                }
                // Never beside a volume copy: the two would stop, pause and resume the same
                // containers under each other.
                _one_hold = Some(self.holds.blocking_lock());
                let refused =
                    |e: anyhow::Error| Status::failed_precondition(format!("restore of source {}: {e:#}", src.name));
                let (volumes, made) = crate::volume::prepare_restore(spec, &start.volumes).map_err(refused)?;
                made.into_iter().for_each(&report);
                let hold =
                    crate::volume::Hold::take(&spec.docker, &self.hold_record, crate::volume::Mode::Stop, &volumes)
                        .map_err(refused)?;
                volume_hold = Some(hold);
                let mut parts = Vec::new();
                for v in &volumes {
                    parts.push((v.volume.name.clone(), crate::restore::Writer::new(&v.mountpoint).map_err(failed)?));
                }
                crate::restore::Writers::per_volume(parts)
            }
            None => crate::restore::Writers::single(crate::restore::Writer::new(&base).map_err(failed)?),
        };
        let mut entries = 0u64;
        loop {
            let msg = handle
                .block_on(inbound.message())?
                .ok_or_else(|| Status::aborted("the collector ended the restore before its end"))?;
            match msg.msg {
                Some(restore_message::Msg::Entry(re)) => {
                    let e = re.entry.ok_or_else(|| Status::invalid_argument("an entry without its metadata"))?;
                    // Volumes: the writers route each path into its volume, or refuse it.
                    match crate::restore::place(src, session.is_some() || src.volume.is_some(), &e.path) {
                        crate::restore::Place::Write => w.entry(e, re.blake3, &re.hardlink_to).map_err(failed)?,
                        crate::restore::Place::Parent => w.ensure_dir(&e.path).map_err(failed)?,
                        crate::restore::Place::Outside => {
                            return Err(Status::permission_denied(format!(
                                "restore of source {}: entry {:?} is outside every root of the source; refused",
                                src.name,
                                String::from_utf8_lossy(&e.path)
                            )));
                        }
                    }
                    entries += 1;
                    if entries.is_multiple_of(1000) {
                        report(format!("{entries} entries written"));
                    }
                }
                Some(restore_message::Msg::Data(d)) => w.data(&d).map_err(failed)?,
                Some(restore_message::Msg::Finish(_)) => break,
                _ => return Err(Status::invalid_argument("unexpected message in a restore")),
            }
        }
        // The dumps the start announced are exactly files this restore wrote (and nothing else
        // on the server: a dump path is read below the spool only).
        if src.dump.is_some() {
            for d in &start.dumps {
                let ok = crate::restore::check_path(d.path.as_bytes()).is_ok() && w.wrote(d.path.as_bytes());
                if !ok {
                    return Err(Status::invalid_argument(format!("dump file {} did not arrive whole", d.path)));
                }
            }
        }
        let written = w.finish().map_err(failed)?;
        let mut result = RestoreResult {
            files: written.files,
            dirs: written.dirs,
            symlinks: written.symlinks,
            bytes: written.bytes,
            warnings: written.warnings,
            ..Default::default()
        };
        if let Some(hold) = volume_hold {
            let (held, trouble) = hold.release();
            let names: Vec<&str> = held.iter().map(|h| h.name.as_str()).collect();
            let detail = match (names.is_empty(), trouble.is_empty()) {
                (true, _) => "no container was running".to_string(),
                (false, true) => format!("stopped during the restore, then started: {}", names.join(", ")),
                (false, false) => trouble.join("; "),
            };
            result.checks.push(crate::dump::check("containers", trouble.is_empty(), &detail));
            result.warnings.extend(trouble);
        }
        let (Some(spec), Some(session)) = (&src.dump, &session) else {
            let place = match &src.volume {
                Some(_) => "in the volumes".to_string(),
                None => format!("under {}", base.display()),
            };
            result.checks.push(crate::dump::check(
                "file hashes",
                true,
                &format!("{} files written {place}, each matching its BLAKE3", result.files),
            ));
            return Ok(result);
        };
        let etc = session.path.join("etc");
        std::fs::create_dir(&etc).map_err(failed)?;
        let cancelled = || tx.is_closed();
        let restored = spec
            .restore(&crate::dump::RestoreRun {
                dir: &base,
                etc: &etc,
                spool: &self.spool,
                cancelled: &cancelled,
                progress: &report,
                dumps: &start.dumps,
                clean: start.clean,
                force: start.force,
                restore_root: src.restore_root.as_deref(),
            })
            .map_err(|e| Status::aborted(format!("restore of source {}: {e:#}", src.name)))?;
        result.checks.extend(restored.checks);
        result.warnings.extend(restored.warnings);
        Ok(result)
    }

    /// Take a source's dumps into a new spool session, announce it, and hold it until the
    /// collector releases it (or goes away); the spool is removed on every path out.
    async fn run_dump(
        &self,
        mut inbound: Streaming<DumpRequest>,
        src: Arc<Source>,
        tx: mpsc::Sender<Result<DumpEvent, Status>>,
    ) -> Result<(), Status> {
        let internal = |e: anyhow::Error| Status::internal(format!("{e:#}"));
        let progress = |line: String| Ok(DumpEvent { event: Some(dump_event::Event::Progress(line)) });
        if self.dumps.available_permits() == 0 {
            let _ = tx.send(progress("waiting for another dump to finish".into())).await;
        }
        let permit = self.dumps.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let session = self.spool.session().map_err(internal)?;
        let (out, etc) = (session.path.join("out"), session.path.join("etc"));
        for d in [&out, &etc] {
            std::fs::create_dir(d).map_err(|e| Status::internal(format!("{}: {e}", d.display())))?;
        }
        let started = std::time::Instant::now();
        tracing::info!("dump of source {} started (session {})", src.name, session.id);
        let (spool, tx2, src2, out2) = (self.spool.clone(), tx.clone(), src.clone(), out.clone());
        let taken = tokio::task::spawn_blocking(move || {
            let spec = src2.dump.as_ref().expect("a dump source");
            let cancelled = || tx2.is_closed();
            let report = |line: String| {
                tracing::info!("source {}: {line}", src2.name);
                let _ = tx2.try_send(progress(line));
            };
            spec.take(&crate::dump::Run {
                out: &out2,
                etc: &etc,
                spool: &spool,
                cancelled: &cancelled,
                progress: &report,
            })
        })
        .await
        .map_err(|e| Status::internal(format!("the dump task failed: {e}")))?;
        // The server is free again; the spool waits for the pull without holding it.
        drop(permit);
        let taken = taken.map_err(|e| {
            tracing::warn!("dump of source {} failed: {e:#}", src.name);
            Status::aborted(format!("dump of source {} failed: {e:#}", src.name))
        })?;
        tracing::info!(
            "dump of source {} done in {:.1}s: {} files, {} bytes",
            src.name,
            started.elapsed().as_secs_f64(),
            taken.dumps.len(),
            taken.dumps.iter().map(|d| d.size).sum::<u64>()
        );
        let served = Arc::new(Source::spool(&src.name, &out).map_err(internal)?);
        self.sessions.lock().expect("sessions").insert(session.id.clone(), served);
        let ready = DumpReady {
            session: session.id.clone(),
            dumps: taken.dumps,
            warnings: taken.warnings,
            volumes: Vec::new(),
        };
        let released = self.serve_session(&mut inbound, &tx, &session.id, ready, MAX_SESSION).await;
        drop(session);
        tracing::info!("dump session of source {} ended; spool removed", src.name);
        if released {
            let _ = tx.send(Ok(DumpEvent { event: Some(dump_event::Event::Released(DumpReleased::default())) })).await;
        }
        Ok(())
    }

    /// Announce a ready session and keep it until the collector releases it (true), goes away
    /// or `limit` passes (false); it is unregistered on return.
    async fn serve_session(
        &self,
        inbound: &mut Streaming<DumpRequest>,
        tx: &mpsc::Sender<Result<DumpEvent, Status>>,
        id: &str,
        ready: DumpReady,
        limit: Duration,
    ) -> bool {
        let mut released = false;
        if tx.send(Ok(DumpEvent { event: Some(dump_event::Event::Ready(ready)) })).await.is_ok() {
            let _ = tokio::time::timeout(limit, async {
                while let Ok(Some(m)) = inbound.message().await {
                    if m.release {
                        released = true;
                        break;
                    }
                }
            })
            .await;
        }
        self.sessions.lock().expect("sessions").remove(id);
        released
    }

    /// Hold a docker-volume source still (pause or stop the containers that mount its volumes),
    /// serve the volumes as a session, and resume the containers when the collector releases
    /// it, goes away, or the hold lasts too long; the resume also runs on every error path.
    async fn run_hold(
        &self,
        mut inbound: Streaming<DumpRequest>,
        src: Arc<Source>,
        tx: mpsc::Sender<Result<DumpEvent, Status>>,
    ) -> Result<(), Status> {
        let progress = |line: String| Ok(DumpEvent { event: Some(dump_event::Event::Progress(line)) });
        let _one_hold = match self.holds.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                let _ = tx.send(progress("waiting for another volume copy to finish".into())).await;
                self.holds.clone().lock_owned().await
            }
        };
        if tx.is_closed() {
            // The collector left while it waited: hold nothing for nobody.
            return Ok(());
        }
        let spec = src.volume.as_ref().expect("a docker-volume source");
        // The Docker calls block: the hold lives on a thread of its own, told by a channel when
        // to let go.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let (record, src2) = (self.hold_record.clone(), src.clone());
        let held = tokio::task::spawn_blocking(move || {
            let spec = src2.volume.as_ref().expect("a docker-volume source");
            let taken = spec.resolve().and_then(|volumes| {
                let hold = crate::volume::Hold::take(&spec.docker, &record, spec.mode, &volumes)?;
                Ok((volumes, hold))
            });
            let (volumes, hold) = match taken {
                Ok(t) => t,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return None;
                }
            };
            let infos: Vec<_> = volumes.iter().map(|v| crate::volume::info(v, spec.mode)).collect();
            let served = Source::volumes(&src2.name, &volumes);
            if ready_tx.send(Ok((served, infos))).is_err() {
                return Some(hold.release());
            }
            // Until the session ends (the sender is dropped then).
            let _ = end_rx.recv();
            Some(hold.release())
        });
        let (served, volumes) = match ready_rx.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!("volume copy of source {} refused: {e:#}", src.name);
                return Err(Status::failed_precondition(format!("source {}: {e:#}", src.name)));
            }
            Err(_) => return Err(Status::internal("the volume hold task failed")),
        };
        let id = crate::spool::session_id().map_err(|e| Status::internal(format!("{e:#}")))?;
        tracing::info!(
            "volume copy of source {} ({}) started, consistency {}",
            src.name,
            volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", "),
            spec.mode.name()
        );
        self.sessions.lock().expect("sessions").insert(id.clone(), Arc::new(served));
        let ready = DumpReady { session: id.clone(), volumes, ..Default::default() };
        let released = self.serve_session(&mut inbound, &tx, &id, ready, crate::volume::MAX_HOLD).await;
        drop(end_tx);
        let (held, warnings) =
            held.await.map_err(|e| Status::internal(format!("the volume hold task failed: {e}")))?.unwrap_or_default();
        tracing::info!("volume copy of source {} ended; {} containers resumed", src.name, held.len());
        if released {
            let _ = tx
                .send(Ok(DumpEvent { event: Some(dump_event::Event::Released(DumpReleased { held, warnings })) }))
                .await;
        }
        Ok(())
    }
}

/// Diff a file window by window; hands each window's frame to `emit` (false = the collector went
/// away, returns None) and returns the end frame.
fn delta_frames(
    src: &Source,
    path: &[u8],
    signature: &[u8],
    emit: &mut dyn FnMut(DeltaFrame) -> bool,
) -> std::io::Result<Option<DeltaFrame>> {
    use std::io::Read;
    let f = source::open(src, path)?;
    let before = f.metadata()?;
    // As for whole reads: what the file held when opened (growth shows as `changed`).
    let mut f = f.take(before.len());
    let index = crate::rsync::Index::new(signature)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad signature: {e}")))?;
    let mut hasher = blake3::Hasher::new();
    let mut window = vec![0u8; DELTA_WINDOW];
    let mut first = true;
    loop {
        let mut n = 0;
        while n < window.len() {
            match f.read(&mut window[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        hasher.update(&window[..n]);
        let mut delta = Vec::new();
        let literal = crate::rsync::diff(&index, &window[..n], &mut delta);
        if first && literal as f64 > NO_GAIN * n as f64 {
            return Ok(Some(DeltaFrame { end: true, error: "no-gain".into(), ..Default::default() }));
        }
        first = false;
        if !emit(DeltaFrame { delta: delta.into(), window_len: n as u64, ..Default::default() }) {
            return Ok(None);
        }
        if n < window.len() {
            break;
        }
    }
    let r = source::ReadResult::new(&before, &f.get_ref().metadata()?, hasher);
    Ok(Some(DeltaFrame {
        end: true,
        blake3: r.blake3.to_vec(),
        size: r.size,
        mtime_ns: r.mtime_ns,
        ctime_ns: r.ctime_ns,
        changed: r.changed,
        ..Default::default()
    }))
}
