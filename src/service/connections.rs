//! Accepted connections, watched (issue 13): a bound on connections that have not yet sent a
//! request (TLS handshakes in progress, or silence), and a send timeout for clients that do
//! not read their responses.
//!
//! Every accepted TCP connection is wrapped in a [`WatchedIo`] registered in [`Connections`];
//! the registry can close any of them (its reads and writes fail, which ends the connection in
//! hyper and frees everything its streams held, whether it was in its TLS handshake or
//! serving). A background sweep ([`Connections::sweep_periodically`]) closes:
//!
//! - **Connections that never get going.** A connection that has not sent a complete request
//!   within `handshake_timeout` of being accepted (TCP connect and silence, a partial
//!   ClientHello, an HTTP/2 preface and nothing more) is closed. At most
//!   `max_unestablished` such connections are open at once: a new one past that closes the
//!   oldest, so a flood of idle connections cannot take every file descriptor, and a real
//!   client, whose handshake takes milliseconds, completes it before it becomes the oldest.
//!   Handshakes run each in their own task (tonic), so none waits for another.
//! - **Responses nobody reads.** Each response body is handed to HTTP/2 in pieces of at most
//!   [`SEND_CHUNK`] bytes, so HTTP/2 takes more only as the client's flow-control window and
//!   the socket allow. A response not wholly handed over within `send_timeout` of being ready
//!   (a client that never opens its window), or a connection whose socket stays unwritable for
//!   `send_timeout` (a client that does not read its socket), is closed. So memory pinned by a
//!   slow reader (400 such streams took the server from 333 MB to 1 GB, locked, never
//!   released) is held for at most the send timeout, and is at most the advertised stream
//!   limit times the message limit per connection meanwhile.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::body::{Bytes, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Largest piece of a response body handed to HTTP/2 at once.
pub const SEND_CHUNK: usize = 16 * 1024;

/// The registry of open connections (one per server).
pub struct Connections {
    send_timeout: Duration,
    handshake_timeout: Duration,
    max_unestablished: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_peer: HashMap<SocketAddr, Arc<Conn>>,
    /// Connections not yet established, oldest first (entries of closed or established
    /// connections are skipped and pruned).
    unestablished: VecDeque<Weak<Conn>>,
}

/// One connection's watch state.
pub struct Conn {
    accepted: Instant,
    established: AtomicBool,
    closed: AtomicBool,
    /// The waker of the connection task's last read, woken to make it see `closed`.
    waker: Mutex<Option<Waker>>,
    /// Since when the socket has refused writes, if it does now.
    write_blocked_since: Mutex<Option<Instant>>,
    /// Responses being handed over: id → deadline.
    sends: Mutex<HashMap<u64, Instant>>,
    next_send: AtomicU64,
}

impl Conn {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            established: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waker: Mutex::new(None),
            write_blocked_since: Mutex::new(None),
            sends: Mutex::new(HashMap::new()),
            next_send: AtomicU64::new(0),
        }
    }

    /// Closes the connection: its next read or write fails.
    fn close(&self, why: &str) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            tracing::debug!(reason = why, "closing a connection");
            if let Some(waker) = lock(&self.waker).take() {
                waker.wake();
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Why the connection must be closed now, if it must.
    fn overdue(&self, now: Instant, limits: &Connections) -> Option<&'static str> {
        if !self.established.load(Ordering::SeqCst)
            && now.saturating_duration_since(self.accepted) >= limits.handshake_timeout
        {
            return Some("no request within the handshake timeout");
        }
        if lock(&self.write_blocked_since)
            .is_some_and(|since| now.saturating_duration_since(since) >= limits.send_timeout)
        {
            return Some("the client did not read its socket within the send timeout");
        }
        if lock(&self.sends).values().any(|deadline| *deadline <= now) {
            return Some("a response was not taken within the send timeout");
        }
        None
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connections {
    /// A registry closing responses not taken within `send_timeout`, connections without a
    /// request after `handshake_timeout`, and the oldest of more than `max_unestablished`
    /// (at least 1) connections without a request.
    pub fn new(
        send_timeout: Duration,
        handshake_timeout: Duration,
        max_unestablished: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            send_timeout,
            handshake_timeout,
            max_unestablished: max_unestablished.max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Registers an accepted connection, closing the oldest unestablished one if there are
    /// now too many.
    pub fn watch(self: &Arc<Self>, stream: TcpStream) -> WatchedIo {
        let conn = Arc::new(Conn::new());
        let peer = stream.peer_addr().ok();
        let mut inner = lock(&self.inner);
        if let Some(peer) = peer {
            inner.by_peer.insert(peer, Arc::clone(&conn));
        }
        inner.unestablished.retain(|weak| {
            weak.upgrade()
                .is_some_and(|c| !c.is_closed() && !c.established.load(Ordering::SeqCst))
        });
        inner.unestablished.push_back(Arc::downgrade(&conn));
        while inner.unestablished.len() > self.max_unestablished {
            if let Some(oldest) = inner.unestablished.pop_front().and_then(|w| w.upgrade()) {
                oldest.close("too many connections without a request: the oldest is closed");
            }
        }
        drop(inner);
        WatchedIo {
            stream,
            conn,
            peer,
            registry: Arc::downgrade(self),
        }
    }

    /// The connection a request came on (by its peer address).
    fn find(&self, extensions: &http::Extensions) -> Option<Arc<Conn>> {
        let peer = connection_addr(extensions)?;
        lock(&self.inner).by_peer.get(&peer).cloned()
    }

    /// Connections open now (for tests and metrics).
    pub fn open(&self) -> usize {
        lock(&self.inner).by_peer.len()
    }

    /// Closes every connection that is overdue (see the module docs).
    pub fn sweep(&self) {
        let now = Instant::now();
        let conns: Vec<Arc<Conn>> = lock(&self.inner).by_peer.values().cloned().collect();
        for conn in conns {
            if let Some(why) = conn.overdue(now, self) {
                conn.close(why);
            }
        }
    }

    /// Sweeps until the task is aborted, four times per shortest timeout (between 50 ms and
    /// 1 s), so a connection is closed at most a quarter of its timeout late.
    pub async fn sweep_periodically(self: Arc<Self>) {
        let period = (self.send_timeout.min(self.handshake_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.sweep();
        }
    }
}

/// How the audit and the refusal counters name a peer: its address exactly as `Display`
/// writes it (`192.0.2.7:50312`, `[2001:db8::1]:50312`), or `unknown` without one. Made for
/// every audited call, so an IPv4 address (the common case) is written digit by digit
/// instead of through the formatting machinery, which costs several times more.
pub fn peer_text(addr: Option<SocketAddr>) -> String {
    match addr {
        Some(SocketAddr::V4(v4)) => {
            let mut text = String::with_capacity(21);
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                push_decimal(&mut text, u32::from(octet));
            }
            text.push(':');
            push_decimal(&mut text, u32::from(v4.port()));
            text
        }
        Some(other) => other.to_string(),
        None => "unknown".to_owned(),
    }
}

/// Appends `value` in decimal, without leading zeros.
fn push_decimal(text: &mut String, value: u32) {
    if value >= 10 {
        push_decimal(text, value / 10);
    }
    text.push(char::from_digit(value % 10, 10).unwrap_or('0'));
}

/// The peer address of the connection a request came on, as tonic records it in the
/// request's extensions (plaintext or TLS).
pub fn connection_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// An accepted TCP connection the registry can close (see the module docs).
pub struct WatchedIo {
    stream: TcpStream,
    conn: Arc<Conn>,
    peer: Option<SocketAddr>,
    registry: Weak<Connections>,
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed by the server's connection watch",
    )
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.conn.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        {
            let mut waker = lock(&self.conn.waker);
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        // Closed between the check and the waker's registration: seen on this poll.
        if self.conn.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.conn.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        let mut blocked = lock(&self.conn.write_blocked_since);
        match &polled {
            Poll::Pending => {
                blocked.get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => *blocked = None,
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for WatchedIo {
    type ConnectInfo = TcpConnectInfo;

    /// The same information a plain `TcpStream` gives, so callers' peer addresses and
    /// client certificates read as before.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl Drop for WatchedIo {
    fn drop(&mut self) {
        self.conn.closed.store(true, Ordering::SeqCst);
        if let (Some(registry), Some(peer)) = (self.registry.upgrade(), self.peer) {
            let mut inner = lock(&registry.inner);
            if inner
                .by_peer
                .get(&peer)
                .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
            {
                inner.by_peer.remove(&peer);
            }
        }
    }
}

/// The tower layer that marks a connection established at its first request and watches
/// every response body's hand-over (see the module docs).
#[derive(Clone)]
pub struct WatchLayer(pub Arc<Connections>);

impl<S> tower::Layer<S> for WatchLayer {
    type Service = Watch<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Watch {
            inner,
            registry: Arc::clone(&self.0),
        }
    }
}

/// See [`WatchLayer`].
#[derive(Clone)]
pub struct Watch<S> {
    inner: S,
    registry: Arc<Connections>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<Body>> for Watch<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let conn = self.registry.find(request.extensions());
        if let Some(conn) = &conn {
            conn.established.store(true, Ordering::SeqCst);
        }
        let send_timeout = self.registry.send_timeout;
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response
                .map(|body| Body::new(WatchedBody::new(Body::new(body), conn, send_timeout))))
        })
    }
}

/// A response body handed over in pieces of at most [`SEND_CHUNK`] bytes, with a deadline
/// registered on its connection until its end has been taken.
struct WatchedBody {
    inner: Body,
    rest: Bytes,
    watch: Option<(Arc<Conn>, u64)>,
}

impl WatchedBody {
    fn new(inner: Body, conn: Option<Arc<Conn>>, send_timeout: Duration) -> Self {
        let watch = conn.map(|conn| {
            let id = conn.next_send.fetch_add(1, Ordering::Relaxed);
            lock(&conn.sends).insert(id, Instant::now() + send_timeout);
            (conn, id)
        });
        Self {
            inner,
            rest: Bytes::new(),
            watch,
        }
    }

    fn done(&mut self) {
        if let Some((conn, id)) = self.watch.take() {
            lock(&conn.sends).remove(&id);
        }
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.done();
    }
}

impl hyper::body::Body for WatchedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let piece = this.rest.split_to(this.rest.len().min(SEND_CHUNK));
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() > SEND_CHUNK {
                        this.rest = data.split_off(SEND_CHUNK);
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    // Trailers end a gRPC response.
                    this.done();
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Poll::Ready(None) => {
                this.done();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = u64::try_from(self.rest.len()).unwrap_or(u64::MAX);
        hint.set_lower(hint.lower().saturating_add(rest));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_text_is_what_display_writes() {
        for text in [
            "0.0.0.0:0",
            "127.0.0.1:50312",
            "192.0.2.7:9",
            "10.20.30.40:65535",
            "255.255.255.255:80",
            "[::1]:443",
            "[2001:db8::7]:8443",
            "[::ffff:192.0.2.1]:1",
        ] {
            let addr: std::net::SocketAddr = text.parse().unwrap();
            assert_eq!(super::peer_text(Some(addr)), addr.to_string());
            assert_eq!(super::peer_text(Some(addr)), text);
        }
        assert_eq!(super::peer_text(None), "unknown");
    }
}
