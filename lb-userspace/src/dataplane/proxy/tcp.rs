//! The TCP side of the proxy: accepting, connecting to a backend, relaying both ways.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::{ActiveGuard, Counters, Shared, describe, in_reserve};

/// Accepts connections on a TCP frontend until it is stopped.
pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((client, _)) if in_reserve(client.as_raw_fd()) => {
                // The descriptors left are for the probes and the API: refuse this one.
                Counters::bump(&shared.counters.accept_errors);
                Counters::bump(&shared.counters.dropped);
                if !failing {
                    tracing::warn!(frontend = %describe(&shared.frontend), "proxy out of file descriptors; refusing connections");
                    failing = true;
                }
                drop(client);
            }
            Ok((client, peer)) => {
                failing = false;
                tokio::spawn(relay(client, peer, shared.clone()));
            }
            // The listener was shut down by `Running::stop`.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => return,
            Err(error) => {
                // EMFILE, ENOBUFS and the like: back off instead of spinning, and say so once
                // per streak (the pending connection waits in the backlog).
                Counters::bump(&shared.counters.accept_errors);
                if !failing {
                    tracing::warn!(frontend = %describe(&shared.frontend), %error, "proxy accept failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connects to a backend (round robin, trying the next on failure) and relays until both
/// directions have ended.
async fn relay(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _active = ActiveGuard::new(&shared);
    let Some(upstream) = connect(&shared, peer).await else {
        Counters::bump(&shared.counters.dropped);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut client = Counted {
        stream: client,
        bytes: &shared.counters.bytes_to_backends,
    };
    let mut upstream = Counted {
        stream: upstream,
        bytes: &shared.counters.bytes_to_clients,
    };
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(frontend = %describe(&shared.frontend), %peer, %error, "proxied connection ended with an error");
    }
}

/// The first backend, in round-robin order, that accepts a connection within the connect
/// timeout.
async fn connect(shared: &Shared, peer: SocketAddr) -> Option<TcpStream> {
    let candidates = shared.pick();
    if candidates.is_empty() {
        tracing::debug!(frontend = %describe(&shared.frontend), %peer, "no backends; connection closed");
    }
    for backend in candidates {
        let limit = shared.timeouts.connect;
        let error = match tokio::time::timeout(limit, TcpStream::connect(backend)).await {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {limit:?}"),
        };
        Counters::bump(&shared.counters.backend_failures);
        tracing::warn!(frontend = %describe(&shared.frontend), %backend, %error, "proxy could not connect to a backend; trying the next");
    }
    None
}

/// A stream that counts the bytes read from it.
struct Counted<'a> {
    stream: TcpStream,
    bytes: &'a AtomicU64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = buf.filled().len().saturating_sub(before);
            this.bytes.fetch_add(read as u64, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
