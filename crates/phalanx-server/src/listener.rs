//! The client listener, with a bound on the connections served at once
//! (`connections_max`). Past it, a new connection is answered with a
//! prepared `503 overloaded` (with `Retry-After`) and closed, before a byte
//! of it is read or parsed. A node whose core is saturated then serves a
//! bounded set of connections promptly instead of queueing every request of
//! every connection behind every other (BENCHMARKS.md, "Overload").
//!
//! A connection holds its slot until it closes, idle keep-alive time
//! included: size `connections_max` for the clients' pools and the agents'
//! long-polls together.

use axum::serve::{IncomingStream, Listener};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Refused connections being answered at once; past it, one is just closed.
const REFUSALS_IN_FLIGHT_MAX: usize = 1024;
/// How long a refused connection may take to close after its answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

const REFUSAL_BODY: &str = r#"{"error":{"code":"overloaded","message":"connections_max connections are being served; try again later","retry_after_ms":1000}}"#;

fn refusal() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    )
    .into_bytes()
}

/// Counts kept by the listener, for `/metrics`.
#[derive(Default)]
pub struct ListenerStats {
    pub connections_refused: AtomicU64,
}

pub struct BoundedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    answer: Arc<[u8]>,
    stats: Arc<ListenerStats>,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, connections_max: usize, stats: Arc<ListenerStats>) -> BoundedListener {
        BoundedListener {
            inner,
            slots: Arc::new(Semaphore::new(connections_max)),
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX)),
            answer: refusal().into(),
            stats,
        }
    }
}

/// An accepted connection; its slot is given back when it is dropped.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// The peer of a connection, for handlers (`ConnectInfo<PeerAddr>`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<IncomingStream<'_, BoundedListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, BoundedListener>) -> PeerAddr {
        PeerAddr(*stream.remote_addr())
    }
}

impl Listener for BoundedListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, as axum's own listener does.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => return (Connection { stream, _slot: slot }, addr),
                Err(_) => {
                    self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                    if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
                        tokio::spawn(refuse(stream, self.answer.clone(), permit));
                    }
                    // else: dropped, which closes it.
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Writes the prepared answer and closes. What the client sent is read and
/// discarded first, briefly, so that the close is a FIN the client reads
/// after the answer, not a reset that could discard it.
async fn refuse(mut stream: TcpStream, answer: Arc<[u8]>, _permit: OwnedSemaphorePermit) {
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while let Ok(read) = stream.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prepared_refusal_is_a_complete_http_answer() {
        let text = String::from_utf8(refusal()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("\r\nretry-after: 1"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "overloaded");
    }
}
