//! The client listener and the HTTP/1.1 connections it serves, with every
//! bound a client could otherwise hold open:
//!
//! - connections served at once (`connections_max`) and from one IP address
//!   (`connections_per_address_max`). Past either, a new connection is
//!   answered with a prepared `503 overloaded` (with `Retry-After`) and
//!   closed, before a byte of it is read or parsed. A node whose core is
//!   saturated then serves a bounded set of connections promptly instead of
//!   queueing every request of every connection behind every other
//!   (BENCHMARKS.md, "Overload"), and one host cannot take every slot;
//! - bytes of a request head (`header_bytes_max`): hyper refuses a longer
//!   head, and this connection rewrites hyper's empty `431` (and `414`,
//!   `400`) into our JSON error body;
//! - time: a connection must deliver each request head within
//!   `header_read_timeout_ms` of its first byte (a new connection: of being
//!   opened), and a keep-alive connection with no request for
//!   `idle_timeout_ms` is closed. While a request is being served there is no
//!   timeout here: the body has its own (`api.rs`, `body_read_timeout_ms`),
//!   and a long-poll waits on purpose.
//!
//! - TLS, when the node has a certificate: the handshake is done in the
//!   connection's own task, after the connection has its slots and within
//!   `header_read_timeout_ms` (a refused connection is answered through a
//!   handshake too, so a TLS client reads the 503 instead of a protocol
//!   error; those handshakes are bounded by the refusals' own bound).
//!   What TLS is and is checked against is `tls.rs`'s.
//!
//! What a request means is left to the router (`api.rs`).

use crate::error::{ApiError, ErrorCode};
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::Router;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Refused connections being answered at once; past it, one is just closed.
const REFUSALS_IN_FLIGHT_MAX: usize = 1024;
/// How long a refused connection may take to close after its answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// A refused connection's answer: `503 overloaded` with `Retry-After: 1`
/// (503, not 429: the node refuses the connection, not the client's rate).
fn refusal_answer(message: &str) -> Vec<u8> {
    ApiError::unavailable(ErrorCode::Overloaded, message, 1000)
        .with_status(StatusCode::SERVICE_UNAVAILABLE)
        .http1_bytes()
}

fn refusal() -> Vec<u8> {
    refusal_answer("connections_max connections are being served; try again later")
}

fn refusal_per_address() -> Vec<u8> {
    refusal_answer("connections_per_address_max connections from this address are open; close some or try again later")
}

/// The JSON answer replacing hyper's own empty answer to a head it could not
/// parse, recognised by its status and by having no `content-type` (every
/// answer of the router has one).
fn rewrite_of_hyper_answer(head: &[u8]) -> Option<Vec<u8>> {
    let status = head.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    if head.contains("\r\ncontent-type:") {
        return None;
    }
    Some(match status {
        b"431" => ApiError::new(ErrorCode::HeaderTooLarge, "the request head is over header_bytes_max").http1_bytes(),
        b"414" => ApiError::new(ErrorCode::UriTooLong, "the request target is too long").http1_bytes(),
        b"400" => ApiError::invalid("the request head is not valid HTTP/1.1").http1_bytes(),
        _ => return None,
    })
}

/// Counts kept by the listener, for `/metrics`.
#[derive(Default)]
pub struct ListenerStats {
    pub connections_refused: AtomicU64,
    /// Connections closed because a head was too slow or they stayed idle.
    pub connections_timed_out: AtomicU64,
}

/// The listener's bounds and timeouts (from `NodeConfig`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub connections_max: usize,
    pub connections_per_address_max: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub header_bytes_max: usize,
}

impl Settings {
    pub fn of(config: &crate::config::NodeConfig) -> Settings {
        Settings {
            connections_max: config.connections_max,
            connections_per_address_max: config.connections_per_address_max,
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            header_bytes_max: config.header_bytes_max,
        }
    }
}

pub struct BoundedListener {
    inner: TcpListener,
    settings: Settings,
    slots: Arc<Semaphore>,
    /// Open connections per address; an address leaves the map with its last.
    per_address: Arc<Mutex<BTreeMap<IpAddr, usize>>>,
    refusals: Arc<Semaphore>,
    answer: Arc<[u8]>,
    answer_per_address: Arc<[u8]>,
    stats: Arc<ListenerStats>,
    tls: Option<Arc<crate::tls::Tls>>,
}

impl BoundedListener {
    pub fn new(
        inner: TcpListener,
        settings: Settings,
        stats: Arc<ListenerStats>,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> BoundedListener {
        BoundedListener {
            inner,
            slots: Arc::new(Semaphore::new(settings.connections_max)),
            settings,
            per_address: Arc::default(),
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX)),
            answer: refusal().into(),
            answer_per_address: refusal_per_address().into(),
            stats,
            tls,
        }
    }

    fn refuse(&self, stream: TcpStream, answer: &Arc<[u8]>) {
        self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
        if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
            tokio::spawn(refuse(stream, self.tls.clone(), answer.clone(), permit));
        }
        // else: dropped, which closes it.
    }

    pub async fn accept(&mut self) -> (Connection, SocketAddr) {
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
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.refuse(stream, &self.answer.clone());
                continue;
            };
            let Some(address) =
                AddressSlot::take(&self.per_address, addr.ip(), self.settings.connections_per_address_max)
            else {
                self.refuse(stream, &self.answer_per_address.clone());
                continue;
            };
            let connection = Connection {
                stream: Stream::Plain(stream),
                activity: Arc::new(Mutex::new(Activity::new())),
                settings: self.settings.clone(),
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
                stats: self.stats.clone(),
                rewrite: None,
                _slot: slot,
                _address: address,
            };
            return (connection, addr);
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One connection counted against its address's bound until dropped.
struct AddressSlot {
    map: Arc<Mutex<BTreeMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    fn take(map: &Arc<Mutex<BTreeMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut counts = map.lock().expect("address map lock");
        let count = counts.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { map: map.clone(), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.map.lock().expect("address map lock");
        let count = counts.get_mut(&self.ip).expect("counted when taken");
        *count -= 1;
        if *count == 0 {
            counts.remove(&self.ip);
        }
    }
}

/// Where a connection is between requests, shared by its I/O (which sees
/// bytes) and its service (which sees requests begin and end).
struct Activity {
    opened: Instant,
    /// Requests being served; no timeout of this file applies meanwhile.
    in_flight: u32,
    requests_served: u64,
    /// When the first byte of the next request head arrived.
    head_started: Option<Instant>,
    /// The last byte read or written, or the end of the last request.
    last_activity: Instant,
    /// The task waiting to read. hyper may have parked its read while the
    /// request was served, with no deadline armed; the end of the request
    /// wakes it to arm the idle one.
    read_waker: Option<std::task::Waker>,
}

impl Activity {
    fn new() -> Activity {
        let now = Instant::now();
        Activity {
            opened: now,
            in_flight: 0,
            requests_served: 0,
            head_started: None,
            last_activity: now,
            read_waker: None,
        }
    }

    /// When the connection is to be closed if nothing happens, and why.
    fn deadline(&self, settings: &Settings) -> Option<(Instant, &'static str)> {
        if self.in_flight > 0 {
            return None;
        }
        Some(match (self.head_started, self.requests_served) {
            (Some(started), _) => (started + settings.header_read_timeout, "request head not received in time"),
            (None, 0) => (self.opened + settings.header_read_timeout, "no request head received in time"),
            (None, _) => (self.last_activity + settings.idle_timeout, "idle"),
        })
    }

    fn bytes_read(&mut self) {
        let now = Instant::now();
        self.last_activity = now;
        if self.in_flight == 0 && self.head_started.is_none() {
            self.head_started = Some(now);
        }
    }
}

/// Marks a request as being served while alive.
struct Serving(Arc<Mutex<Activity>>);

impl Serving {
    fn begin(activity: &Arc<Mutex<Activity>>) -> Serving {
        let mut state = activity.lock().expect("activity lock");
        state.in_flight += 1;
        state.head_started = None;
        Serving(activity.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut state = self.0.lock().expect("activity lock");
        state.in_flight -= 1;
        state.requests_served += 1;
        state.last_activity = Instant::now();
        if let Some(waker) = state.read_waker.take() {
            waker.wake();
        }
    }
}

/// A connection's bytes: as they come, or through TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// While the handshake has the socket (never read or written).
    Handshaking,
}

impl Stream {
    fn pinned(&mut self) -> io::Result<Pin<&mut dyn AsyncReadWrite>> {
        match self {
            Stream::Plain(stream) => Ok(Pin::new(stream)),
            Stream::Tls(stream) => Ok(Pin::new(stream.as_mut())),
            Stream::Handshaking => Err(io::Error::new(io::ErrorKind::NotConnected, "TLS handshake not done")),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

/// An accepted connection; its slots are given back when it is dropped.
pub struct Connection {
    stream: Stream,
    activity: Arc<Mutex<Activity>>,
    settings: Settings,
    timer: Pin<Box<Sleep>>,
    stats: Arc<ListenerStats>,
    /// Our JSON answer in place of hyper's, and how much of it is written.
    rewrite: Option<(Vec<u8>, usize)>,
    _slot: OwnedSemaphorePermit,
    _address: AddressSlot,
}

/// The peer of a connection, for handlers (`ConnectInfo<PeerAddr>`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// What the node decides about a request from its head alone, before the
/// router sees it (`api::door`): refused at once with a prepared answer, or let
/// in, holding its guard (a slot, say) until its answer is produced. A refusal
/// here costs no routing and none of the router's layers.
pub type Gate = Arc<
    dyn Fn(
            &axum::http::Method,
            &axum::http::Uri,
            &axum::http::HeaderMap,
        ) -> Result<Option<Box<dyn Send>>, axum::response::Response>
        + Send
        + Sync,
>;

/// Serves the router on the listener until `shutdown` turns true, then stops
/// accepting, lets each connection finish the request it is serving, and
/// returns once all are closed. Every request meets `gate` first, if any.
pub async fn serve(
    mut listener: BoundedListener,
    router: Router,
    gate: Option<Gate>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    // Every connection task holds a sender; `recv` ends once all are dropped.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let header_bytes_max = listener.settings.header_bytes_max;
    loop {
        let (mut connection, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let tls = listener.tls.clone();
        let activity = connection.activity.clone();
        let router = router.clone();
        let gate = gate.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(PeerAddr(addr)));
            let serving = Serving::begin(&activity);
            let admitted = match &gate {
                Some(gate) => gate(request.method(), request.uri(), request.headers()),
                None => Ok(None),
            };
            let router = router.clone();
            async move {
                let guard = match admitted {
                    Ok(guard) => guard,
                    Err(refusal) => return Ok(refusal),
                };
                let response = tower::ServiceExt::oneshot(router, request.map(axum::body::Body::new)).await;
                drop(guard);
                drop(serving);
                response
            }
        });
        let mut stop = shutdown.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            if let Some(tls) = tls {
                if let Err(error) = connection.handshake(&tls).await {
                    tracing::debug!(%error, %addr, "TLS handshake failed");
                    return;
                }
            }
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.max_header_size(header_bytes_max).header_read_timeout(None).keep_alive(true);
            let serving = builder.serve_connection(hyper_util::rt::TokioIo::new(connection), service);
            let mut serving = std::pin::pin!(serving);
            let result = tokio::select! {
                result = serving.as_mut() => result,
                // The watch's guard is dropped before the connection is awaited.
                _ = async { let _ = stop.wait_for(|stop| *stop).await; } => {
                    serving.as_mut().graceful_shutdown();
                    serving.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, %addr, "connection ended");
            }
            drop(open);
        });
    }
    drop(open_tx);
    let _ = open_rx.recv().await;
    Ok(())
}

/// Writes the prepared answer and closes. What the client sent is read and
/// discarded first, briefly, so that the close is a FIN the client reads
/// after the answer, not a reset that could discard it.
async fn refuse(
    stream: TcpStream,
    tls: Option<Arc<crate::tls::Tls>>,
    answer: Arc<[u8]>,
    _permit: OwnedSemaphorePermit,
) {
    match tls {
        None => answer_and_close(stream, answer).await,
        Some(tls) => {
            let Ok(Ok(mut stream)) = tokio::time::timeout(REFUSAL_LINGER, tls.accept_client(stream)).await else {
                return;
            };
            // A TLS client sends its request once the handshake is done; an
            // answer that arrived before it would be an unsolicited message
            // to its HTTP client, so the first bytes of the request are waited
            // for (briefly) first.
            let mut head = [0u8; 1024];
            let _ = tokio::time::timeout(REFUSAL_LINGER, stream.read(&mut head)).await;
            answer_and_close(stream, answer).await;
        }
    }
}

async fn answer_and_close(mut stream: impl AsyncRead + AsyncWrite + Unpin, answer: Arc<[u8]>) {
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

impl Connection {
    /// Does the TLS handshake, within the time a request head is given.
    async fn handshake(&mut self, tls: &crate::tls::Tls) -> io::Result<()> {
        let Stream::Plain(stream) = std::mem::replace(&mut self.stream, Stream::Handshaking) else {
            return Err(io::Error::other("the handshake is done once"));
        };
        match tokio::time::timeout(self.settings.header_read_timeout, tls.accept_client(stream)).await {
            Ok(Ok(stream)) => {
                self.stream = Stream::Tls(Box::new(stream));
                self.activity.lock().expect("activity lock").opened = Instant::now();
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => {
                self.stats.connections_timed_out.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake not done in time"))
            }
        }
    }

    /// Writes what remains of the rewritten answer; `Ready` once all is out.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((answer, written)) = &mut self.rewrite else { return Poll::Ready(Ok(())) };
        while *written < answer.len() {
            match self.stream.pinned()?.poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(count)) => *written += count,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether hyper is about to write its own answer to a head it could not
    /// parse: then ours goes out instead.
    fn intercept(&mut self, first: &[u8]) {
        if self.rewrite.is_none() {
            if let Some(answer) = rewrite_of_hyper_answer(first) {
                self.rewrite = Some((answer, 0));
            }
        }
    }

    fn touch(&self) {
        self.activity.lock().expect("activity lock").last_activity = Instant::now();
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match this.stream.pinned()?.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.lock().expect("activity lock").bytes_read();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => {}
        }
        // Nothing to read. hyper polls the read side whenever it waits for a
        // request head (and while it writes an answer), so this is where the
        // connection's deadline is armed and enforced.
        let deadline = {
            let mut activity = this.activity.lock().expect("activity lock");
            if !activity.read_waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                activity.read_waker = Some(cx.waker().clone());
            }
            activity.deadline(&this.settings)
        };
        let Some((deadline, why)) = deadline else { return Poll::Pending };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            this.stats.connections_timed_out.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        Poll::Pending
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.intercept(buf);
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx).map_ok(|()| buf.len());
        }
        let result = this.stream.pinned()?.poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(count)) if count > 0) {
            this.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.intercept(first);
        }
        if this.rewrite.is_some() {
            let total = bufs.iter().map(|b| b.len()).sum();
            return this.poll_rewrite(cx).map_ok(|()| total);
        }
        let result = this.stream.pinned()?.poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(count)) if count > 0) {
            this.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
            Stream::Handshaking => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rewrite.is_some() {
            std::task::ready!(this.poll_rewrite(cx))?;
        }
        this.stream.pinned()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rewrite.is_some() {
            std::task::ready!(this.poll_rewrite(cx))?;
        }
        this.stream.pinned()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_answer(answer: Vec<u8>, status: &str, code: &str) {
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], code);
    }

    #[test]
    fn the_prepared_refusals_are_complete_http_answers() {
        check_answer(refusal(), "503", "overloaded");
        check_answer(refusal_per_address(), "503", "overloaded");
        assert!(String::from_utf8(refusal()).unwrap().contains("\r\nretry-after: 1"));
    }

    #[test]
    fn hyper_answers_without_a_body_are_rewritten_and_ours_are_not() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        check_answer(rewrite_of_hyper_answer(hyper_431).unwrap(), "431", "header_too_large");
        let hyper_414 = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        check_answer(rewrite_of_hyper_answer(hyper_414).unwrap(), "414", "uri_too_long");
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(rewrite_of_hyper_answer(ours).is_none());
        assert!(rewrite_of_hyper_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite_of_hyper_answer(b"{\"tasks\": []}").is_none());
    }
}
