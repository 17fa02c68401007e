//! Connecting to an agent over mutual TLS and the ReadFiles byte stream.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use magpie_proto::v1::agent_client::AgentClient;
use prost::Message;
use prost::bytes::Bytes;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{AgentEntry, TlsConfig};

fn host_port(agent: &AgentEntry) -> (String, String) {
    let rest = agent.endpoint.trim_start_matches("https://").trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']).to_string(), p.to_string()),
        None => (rest.to_string(), "443".to_string()),
    }
}

/// Open a channel to an agent; errors name the agent and the cause in one line.
pub async fn connect(agent: &AgentEntry, tls: &TlsConfig) -> Result<AgentClient<Channel>> {
    if agent.endpoint.starts_with("ssh://") {
        return crate::ssh::connect(agent).await;
    }
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let (host, _) = host_port(agent);
    let tls_cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .domain_name(agent.tls_name.clone().unwrap_or(host));
    let endpoint = Endpoint::from_shared(agent.endpoint.clone())
        .with_context(|| format!("agent {}: bad endpoint {:?}", agent.name, agent.endpoint))?
        .tls_config(tls_cfg)
        .with_context(|| format!("agent {}: TLS configuration", agent.name))?
        .connect_timeout(Duration::from_secs(agent.connect_timeout_secs))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(30));
    let channel = flow_control(endpoint)
        .connect()
        .await
        .map_err(|e| anyhow!("agent {} ({}): cannot connect: {}", agent.name, agent.endpoint, cause_chain(&e)))?;
    Ok(AgentClient::new(channel).max_decoding_message_size(64 << 20))
}

/// HTTP/2 flow control for bulk streams. h2's defaults (64 KiB windows, 16 KiB frames) make the
/// agent wait for a window update every 64 KiB of a file stream, each wait a round of thread
/// wake-ups on two busy cores (the 2 GB bench pull took 3% longer with them). The windows bound
/// what a stream holds in flight: the collector's memory, on top of the ingest queue.
pub fn flow_control(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME)
}

/// Bytes in flight per stream, per connection, and per HTTP/2 frame (see [`flow_control`]).
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const FRAME: u32 = 1 << 20;

/// The innermost causes of an error, joined, with TLS alerts explained.
pub fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    let text = parts.join(": ");
    let hint = if text.contains("AccessDenied") || text.contains("access denied") {
        " (the agent refused our certificate: is its fingerprint in the agent's tls.allowed_collectors?)"
    } else if text.contains("CertificateExpired") || text.contains("Expired") || text.contains("expired") {
        " (a certificate has expired: issue a new one with `collector certs issue`)"
    } else if text.contains("UnknownCA") || text.contains("UnknownIssuer") || text.contains("BadCertificate") {
        " (the certificates are not from the same CA)"
    } else {
        ""
    };
    format!("{text}{hint}")
}

/// Why a TLS session with the agent fails, found with a plain TLS connection: with TLS 1.3 the
/// agent judges our certificate after our side of the handshake is done, and the gRPC stack
/// only reports a cancelled connection. The agent's alert says what is wrong.
pub async fn diagnose_tls(agent: &AgentEntry, tls: &TlsConfig) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.ca).ok()?.flatten() {
        roots.add(c).ok()?;
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(&tls.cert).ok()?.flatten().collect();
    let key = PrivateKeyDer::from_pem_file(&tls.key).ok()?;
    let mut cfg =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key).ok()?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let (host, port) = host_port(agent);
    let name = ServerName::try_from(agent.tls_name.clone().unwrap_or(host.clone())).ok()?;
    let tcp = tokio::net::TcpStream::connect(format!("{host}:{port}")).await.ok()?;
    let mut s = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return Some(cause_chain(&e)),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
        Ok(Err(e)) => Some(cause_chain(&e)),
        _ => None,
    }
}

/// Largest frame an honest agent sends (a delta window of literals and its framing).
const MAX_FRAME: usize = 24 << 20;
/// Decompressed bytes held while waiting for a frame to complete.
const MAX_PENDING: usize = 2 * MAX_FRAME;
/// Largest segment once decompressed: the agent sends a segment when 1 MiB is pending, so it
/// holds less than that and one frame (agent/src/wire.rs).
const MAX_SEGMENT: usize = (1 << 20) + MAX_FRAME;

/// Turns the segments of a ReadFiles or Delta stream back into frames. Frames are decoded from
/// a shared buffer, so their content fields are slices of it rather than copies: a byte read by
/// the agent is copied once on the collector (by tonic, out of HTTP/2) before it is chunked.
pub struct FrameReader {
    /// Each compressed segment is one zstd frame of its own.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// The start of a frame the last segment did not complete.
    pending: Vec<u8>,
}

impl FrameReader {
    pub fn new(compressed: bool) -> Result<FrameReader> {
        let zstd = if compressed { Some(zstd::bulk::Decompressor::new()?) } else { None };
        Ok(FrameReader { zstd, pending: Vec::new() })
    }

    /// Feed one segment; returns the frames it completed.
    pub fn push<M: Message + Default>(&mut self, segment: Bytes) -> Result<Vec<M>> {
        let pending = &mut self.pending;
        match &mut self.zstd {
            Some(z) => {
                // The size the segment declares bounds what it may decompress to: a few MiB
                // of zstd can otherwise expand to far more memory than this host has.
                if zstd::zstd_safe::find_frame_compressed_size(&segment) != Ok(segment.len()) {
                    bail!("the agent sent a compressed segment that is not one zstd frame");
                }
                let size = match zstd::zstd_safe::get_frame_content_size(&segment) {
                    Ok(Some(n)) if n <= MAX_SEGMENT as u64 => n as usize,
                    Ok(Some(n)) => {
                        bail!("the agent sent a segment of {n} bytes once decompressed (at most {MAX_SEGMENT})")
                    }
                    _ => bail!("the agent sent a compressed segment that does not declare its size"),
                };
                pending.reserve(size);
                let start = pending.len();
                // Decompressed after what is pending, into its spare capacity (at most `size` more).
                let mut at = std::io::Cursor::new(&mut *pending);
                at.set_position(start as u64);
                z.decompress_to_buffer(&segment, &mut at).context("corrupt zstd segment from the agent")?;
            }
            None if pending.is_empty() => {
                let whole = whole_frames(&segment)?;
                pending.extend_from_slice(&segment[whole..]);
                return decode_frames(segment.slice(..whole));
            }
            None => pending.extend_from_slice(&segment),
        }
        let whole = whole_frames(pending)?;
        if whole == 0 {
            if pending.len() > MAX_PENDING {
                bail!("the agent's stream holds more than {MAX_PENDING} bytes without completing a frame");
            }
            return Ok(Vec::new());
        }
        // The next segment decodes into a buffer as large as this one: one grown from nothing
        // would copy each byte once more on the way.
        let mut rest = Vec::with_capacity(pending.capacity());
        rest.extend_from_slice(&pending[whole..]);
        pending.truncate(whole);
        decode_frames(Bytes::from(std::mem::replace(pending, rest)))
    }
}

/// The length of the complete frames at the start of `buf`.
fn whole_frames(buf: &[u8]) -> Result<usize> {
    let mut pos = 0;
    loop {
        let mut rest = &buf[pos..];
        let before = rest.len();
        let Ok(len) = prost::decode_length_delimiter(&mut rest) else { return Ok(pos) };
        if len > MAX_FRAME {
            bail!("the agent sent a frame of {len} bytes (at most {MAX_FRAME})");
        }
        if rest.len() < len {
            return Ok(pos);
        }
        pos += before - rest.len() + len;
    }
}

/// Decode complete frames; their `bytes` fields share `buf`.
fn decode_frames<M: Message + Default>(mut buf: Bytes) -> Result<Vec<M>> {
    let mut frames = Vec::new();
    while !buf.is_empty() {
        frames.push(M::decode_length_delimited(&mut buf).context("malformed frame from the agent")?);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use magpie_proto::v1::FileFrame;

    /// Frames come back whole and in order however the stream is cut into segments, plain or
    /// compressed, down to one byte per segment.
    #[test]
    fn frames_survive_any_segmenting() {
        let frames: Vec<FileFrame> = (0..40u32)
            .map(|i| FileFrame {
                index: i,
                data: vec![i as u8; (i * 97) as usize].into(),
                end: i % 3 == 0,
                ..Default::default()
            })
            .collect();
        let stream: Vec<u8> = frames.iter().flat_map(|f| f.encode_length_delimited_to_vec()).collect();
        for compressed in [false, true] {
            for cut in [1, 7, 1000, stream.len()] {
                let mut reader = FrameReader::new(compressed).unwrap();
                let mut got = Vec::new();
                for seg in stream.chunks(cut) {
                    let seg = if compressed { zstd::bulk::compress(seg, 1).unwrap() } else { seg.to_vec() };
                    got.extend(reader.push::<FileFrame>(Bytes::from(seg)).unwrap());
                }
                assert_eq!(got, frames, "compressed {compressed}, segments of {cut} bytes");
            }
        }
    }

    /// A compressed segment that expands past what an agent sends is refused before it is
    /// decompressed: a compromised agent must not exhaust the collector's memory.
    #[test]
    fn a_segment_that_expands_too_far_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_SEGMENT + 1], 19).unwrap();
        assert!(bomb.len() < 4096, "{} bytes", bomb.len());
        let err = FrameReader::new(true).unwrap().push::<FileFrame>(Bytes::from(bomb)).unwrap_err();
        assert!(err.to_string().contains("once decompressed"), "{err}");
        // A frame that hides its size is refused too.
        let mut hidden = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut hidden, 1).unwrap();
        std::io::Write::write_all(&mut enc, &[0u8; 1000]).unwrap();
        enc.finish().unwrap();
        let err = FrameReader::new(true).unwrap().push::<FileFrame>(Bytes::from(hidden)).unwrap_err();
        assert!(err.to_string().contains("declare its size"), "{err}");
        // Nor may a frame follow the one that declared its size.
        let mut two = zstd::bulk::compress(b"a", 1).unwrap();
        two.extend(zstd::bulk::compress(&[0u8; 1 << 20], 1).unwrap());
        let err = FrameReader::new(true).unwrap().push::<FileFrame>(Bytes::from(two)).unwrap_err();
        assert!(err.to_string().contains("not one zstd frame"), "{err}");
    }

    #[test]
    fn an_oversized_frame_is_refused() {
        let mut head = Vec::new();
        prost::encode_length_delimiter(MAX_FRAME + 1, &mut head).unwrap();
        let err = FrameReader::new(false).unwrap().push::<FileFrame>(Bytes::from(head)).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }
}
