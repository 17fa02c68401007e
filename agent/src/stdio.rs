//! The agent's standard input and output as one connection: the SSH transport.
//!
//! The collector starts `agent serve --stdio` through ssh (the authorized_keys entry fixes the
//! command) and speaks the same gRPC service over the channel; SSH authenticates and encrypts,
//! so no TLS runs inside. Nothing but gRPC may reach stdout (logs go to stderr). Pipes are
//! polled by tokio directly, much faster than `tokio::io::stdin()`'s blocking thread, and the
//! connection reports when hyper drops it, so the agent exits when the collector hangs up.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

pub struct Stdio {
    input: Pin<Box<dyn AsyncRead + Send>>,
    output: Pin<Box<dyn AsyncWrite + Send>>,
    closed: Option<oneshot::Sender<()>>,
}

impl Stdio {
    /// The connection, and a receiver that fires once it has been dropped.
    pub fn new() -> io::Result<(Stdio, oneshot::Receiver<()>)> {
        let (tx, rx) = oneshot::channel();
        // Pipes (what sshd gives a command) are polled directly; anything else goes through
        // tokio's blocking standard streams.
        let input: Pin<Box<dyn AsyncRead + Send>> =
            match io::stdin().as_fd().try_clone_to_owned().and_then(pipe::Receiver::from_owned_fd) {
                Ok(p) => Box::pin(p),
                Err(_) => Box::pin(tokio::io::stdin()),
            };
        let output: Pin<Box<dyn AsyncWrite + Send>> =
            match io::stdout().as_fd().try_clone_to_owned().and_then(pipe::Sender::from_owned_fd) {
                Ok(p) => Box::pin(p),
                Err(_) => Box::pin(tokio::io::stdout()),
            };
        Ok((Stdio { input, output, closed: Some(tx) }, rx))
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(());
        }
    }
}

impl AsyncRead for Stdio {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.input.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.output.as_mut().poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.output.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.output.as_mut().poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Stdio {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}
