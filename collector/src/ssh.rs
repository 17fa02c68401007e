//! The SSH transport: for an agent at `ssh://user@host[:port]` the collector starts
//! `agent serve --stdio` through the system's ssh (openssh crate) and speaks the same gRPC service
//! over the channel. Host keys are checked strictly (an unknown key is refused, never added);
//! the remote command is fixed by the agent's authorized_keys entry. The SSH session lives inside
//! the connection: when the gRPC connection goes (the pull is done, or failed), the remote agent's
//! input closes and the session ends.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Result, anyhow};
use magpie_proto::v1::agent_client::AgentClient;
use openssh::{KnownHosts, SessionBuilder, Stdio};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentEntry;

/// The remote agent's stdout and stdin as one stream, holding the SSH session and the remote
/// process: dropped with the connection, which ends both.
struct SshIo {
    io: tokio::io::Join<openssh::ChildStdout, openssh::ChildStdin>,
    _child: openssh::Child<Arc<openssh::Session>>,
}

impl AsyncRead for SshIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for SshIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What ssh said, down to its last cause ("Host key verification failed.").
fn ssh_error(e: &openssh::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

pub async fn connect(agent: &AgentEntry) -> Result<AgentClient<Channel>> {
    let fail = |what: &str, why: String| anyhow!("agent {} ({}): {what}: {why}", agent.name, agent.endpoint);
    let mut b = SessionBuilder::default();
    b.known_hosts_check(KnownHosts::Strict)
        .connect_timeout(Duration::from_secs(agent.connect_timeout_secs))
        .server_alive_interval(Duration::from_secs(30))
        // The control socket in the temporary directory (a service may have no writable home).
        .control_directory(std::env::temp_dir());
    if let Some(k) = &agent.ssh_identity {
        b.keyfile(k);
    }
    if let Some(f) = &agent.ssh_known_hosts {
        b.user_known_hosts_file(f);
    }
    let session = Arc::new(b.connect(&agent.endpoint).await.map_err(|e| fail("ssh", ssh_error(&e)))?);
    let mut command = session.arc_raw_command(agent.ssh_command.as_deref().unwrap_or("agent serve --stdio"));
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = command.spawn().await.map_err(|e| fail("starting the remote agent", ssh_error(&e)))?;
    let (input, output) = match (child.stdin().take(), child.stdout().take()) {
        (Some(i), Some(o)) => (i, o),
        _ => return Err(fail("ssh", "no pipes to the remote agent".into())),
    };
    let slot = Arc::new(Mutex::new(Some(SshIo { io: tokio::io::join(output, input), _child: child })));
    // One connection over the channel; a reconnect cannot be made from it.
    let channel = crate::client::flow_control(Endpoint::from_static("http://agent.over.ssh"))
        .connect_with_connector(tower::service_fn(move |_| {
            let io = slot.lock().expect("ssh slot").take();
            async move {
                io.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the SSH channel to the agent is closed"))
            }
        }))
        .await
        .map_err(|e| fail("gRPC over ssh", crate::client::cause_chain(&e)))?;
    Ok(AgentClient::new(channel).max_decoding_message_size(64 << 20))
}
