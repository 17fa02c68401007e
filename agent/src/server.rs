//! The gRPC service: handshake, list, read. Errors become Status values naming the source
//! or path; file-level trouble (vanished, permission denied) travels in-band per file.

use std::sync::Arc;

use magpie_proto::v1::agent_server::Agent;
use magpie_proto::v1::{
    FileFrame, HandshakeRequest, HandshakeResponse, ListRequest, ListResponse, ReadFilesRequest, ReadFilesResponse,
    SourceInfo,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::Source;
use crate::source;
use crate::wire::FrameWriter;

/// Entries per ListResponse.
const LIST_BATCH: usize = 512;
/// Bytes of file content per FileFrame.
const PIECE: usize = 256 * 1024;

pub struct AgentService {
    pub name: String,
    pub sources: Arc<Vec<Source>>,
}

impl AgentService {
    fn source(&self, name: &str) -> Result<usize, Status> {
        self.sources
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Status::not_found(format!("agent {} has no source {name:?}", self.name)))
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
            sources: self
                .sources
                .iter()
                .map(|s| SourceInfo {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    role: s.role.clone(),
                    category: s.category.clone(),
                })
                .collect(),
        }))
    }

    type ListStream = ReceiverStream<Result<ListResponse, Status>>;

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<Self::ListStream>, Status> {
        let idx = self.source(&request.get_ref().source)?;
        let sources = self.sources.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(LIST_BATCH);
            source::list(&sources[idx], &mut |e| {
                batch.push(e);
                if batch.len() < LIST_BATCH {
                    return true;
                }
                tx.blocking_send(Ok(ListResponse { entries: std::mem::take(&mut batch) })).is_ok()
            });
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(ListResponse { entries: batch }));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ReadFilesStream = ReceiverStream<Result<ReadFilesResponse, Status>>;

    async fn read_files(&self, request: Request<ReadFilesRequest>) -> Result<Response<Self::ReadFilesStream>, Status> {
        let req = request.into_inner();
        let idx = self.source(&req.source)?;
        let sources = self.sources.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let src = &sources[idx];
            let send = |data: Vec<u8>| data.is_empty() || tx.blocking_send(Ok(ReadFilesResponse { data })).is_ok();
            let fail = |e: std::io::Error| {
                let _ = tx.blocking_send(Err(Status::internal(format!("encoding the file stream: {e}"))));
            };
            let mut w = match FrameWriter::new(req.compress) {
                Ok(w) => w,
                Err(e) => return fail(e),
            };
            for (i, path) in req.paths.iter().enumerate() {
                let index = i as u32;
                let mut out_err: Option<std::io::Error> = None;
                let result = source::open(src, path).and_then(|f| {
                    source::read(f, PIECE, &mut |piece| match w.push(&FileFrame {
                        index,
                        data: piece.to_vec(),
                        ..Default::default()
                    }) {
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
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
