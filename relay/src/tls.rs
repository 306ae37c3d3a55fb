//! Serving an axum router over plain TCP or TLS (rustls), HTTP/1.1 and HTTP/2 (for gRPC) on the
//! same port, with graceful shutdown, a header-read timeout and a per-source connection cap.

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

/// Loads a PEM certificate chain and private key into a server config with ALPN h2 + http/1.1.
pub fn load_server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    server_config(certs, key)
}

pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// How long a client may take to send its first bytes, finish the TLS handshake, or send a
/// request's headers, before the connection is closed (slow or idle clients must not hold
/// sockets). An HTTP/2 connection that has carried no request this long is closed too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request's body may take to arrive in full (the API takes at most 64 KiB); a body
/// trickled slower than that is cut off. The one streaming request (a signal stream) is exempt:
/// its body lasts as long as the peer is online, and it is authenticated by its headers.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and HTTP/2
/// alike; browsers and agents open a new one when they need it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections open at once from one source address (an IPv6 /64 counts as one); more are
/// closed at accept. Room for a few hundred agents behind one NAT, each with a management
/// stream, a signal stream, the TCP relay and public-service tunnels. A trusted proxy's own
/// connections are not counted (its clients are, when it names them with the PROXY protocol).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 1024;
/// Requests whose bodies stream for the life of the call.
const STREAMING_REQUESTS: &[&str] = &["/tern.signal.v1.SignalService/Open"];

/// Reverse proxies and load balancers whose word on the client's address is taken: a connection
/// from one of them may start with a PROXY protocol header (v1 or v2), and its requests'
/// `X-Forwarded-For` is read (the right-most address that is not itself a trusted proxy is the
/// client). From anyone else both are ignored: per-source limits must not be dodged by a header.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// Parses `CIDR[,CIDR…]` (a bare address stands for itself).
    pub fn parse(list: &str) -> anyhow::Result<Self> {
        let mut nets = vec![];
        for item in list
            .split([',', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let net = match item.parse::<ipnet::IpNet>() {
                Ok(n) => n.trunc(),
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(ip) => ipnet::IpNet::from(ip),
                    Err(_) => anyhow::bail!(
                        "{item:?} is not an address or CIDR prefix (e.g. 10.0.0.5 or 172.16.0.0/12)"
                    ),
                },
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client a request from `peer` stands for: `peer` itself unless it is trusted and
    /// `X-Forwarded-For` names someone further out.
    pub fn client(&self, peer: SocketAddr, headers: &hyper::HeaderMap) -> SocketAddr {
        if !self.contains(peer.ip()) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let ip = match hop.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => match hop.parse::<SocketAddr>() {
                    Ok(sa) => sa.ip(),
                    // Garbage past a trusted hop: nothing further out can be believed.
                    Err(_) => break,
                },
            };
            client = SocketAddr::new(ip.to_canonical(), 0);
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

/// Open connections per source, and the guard that gives one back when its connection ends.
#[derive(Clone, Default)]
struct PerSource(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct Slot(PerSource, IpAddr);

impl PerSource {
    fn take(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let key = tern_proto::source_of(ip);
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), key))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serves `router` until `shutdown` turns true. With `tls`, every connection is TLS first.
/// HTTP/1.1 and HTTP/2 (prior knowledge, for gRPC) on one port; the client's address reaches
/// handlers as `ConnectInfo<SocketAddr>`; slow clients and sources holding too many connections
/// are cut off ([`HEADER_READ_TIMEOUT`], [`BODY_TIMEOUT`], [`IDLE_TIMEOUT`],
/// [`MAX_CONNECTIONS_PER_SOURCE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: watch::Receiver<bool>,
) {
    serve_with(listener, router, tls, TrustedProxies::default(), shutdown).await
}

/// [`serve`], taking the client's address from `proxies` where they give it.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxies: TrustedProxies,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let per_source = PerSource::default();
    let proxies = Arc::new(proxies);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let via_proxy = proxies.contains(peer.ip());
        let slot = if via_proxy {
            None
        } else {
            match per_source.take(peer.ip(), MAX_CONNECTIONS_PER_SOURCE) {
                Some(s) => Some(s),
                None => {
                    warn!(source = %peer.ip(), limit = MAX_CONNECTIONS_PER_SOURCE, "connection refused: too many open connections from this source");
                    continue;
                }
            }
        };
        // Small frames (gRPC, tunnel handshakes, interactive traffic in public-service tunnels)
        // must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let stop = shutdown.clone();
        let proxies = proxies.clone();
        let per_source = per_source.clone();
        tokio::spawn(async move {
            let mut _slot = slot;
            // The first bytes: a PROXY header (from a trusted proxy only), or the start of TLS
            // or of a request. A client that opens a connection and sends nothing is closed.
            let (stream, peer) = match tokio::time::timeout(
                HEADER_READ_TIMEOUT,
                first_bytes(tcp, via_proxy),
            )
            .await
            {
                Ok(Ok((stream, None))) => (stream, peer),
                Ok(Ok((stream, Some(client)))) => {
                    match per_source.take(client.ip(), MAX_CONNECTIONS_PER_SOURCE) {
                        Some(s) => _slot = Some(s),
                        None => {
                            warn!(source = %client.ip(), proxy = %peer.ip(), limit = MAX_CONNECTIONS_PER_SOURCE, "connection refused: too many open connections from this source");
                            return;
                        }
                    }
                    (stream, client)
                }
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "connection closed before a request");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "connection closed: nothing sent");
                    return;
                }
            };
            match acceptor {
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    serve_connection(stream, peer, router, proxies, stop).await;
                }
                None => serve_connection(stream, peer, router, proxies, stop).await,
            }
        });
    }
}

/// The PROXY protocol v2 signature.
const PROXY_V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
enum Preamble {
    /// More bytes are needed to tell.
    Incomplete,
    /// No PROXY header: the bytes belong to TLS or HTTP.
    None,
    /// A PROXY header of this many bytes, naming the client (None: the proxy's own connection,
    /// e.g. a health check, or an address family it does not name).
    Proxy(usize, Option<SocketAddr>),
}

#[derive(Debug, thiserror::Error)]
#[error("malformed PROXY protocol header")]
struct BadProxyHeader;

/// Reads a PROXY protocol header (v1 text or v2 binary) at the start of `buf`.
fn parse_preamble(buf: &[u8]) -> Result<Preamble, BadProxyHeader> {
    const V1: &[u8] = b"PROXY ";
    let n = buf.len().min(V1.len());
    if buf[..n] == V1[..n] {
        if buf.len() < V1.len() {
            return Ok(Preamble::Incomplete);
        }
        // "PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n", at most 107 bytes.
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() >= 107 {
                Err(BadProxyHeader)
            } else {
                Ok(Preamble::Incomplete)
            };
        };
        let line = std::str::from_utf8(&buf[..end]).map_err(|_| BadProxyHeader)?;
        let words: Vec<&str> = line.split(' ').collect();
        let client = match words.as_slice() {
            ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
                let ip: IpAddr = src.parse().map_err(|_| BadProxyHeader)?;
                let port: u16 = sport.parse().map_err(|_| BadProxyHeader)?;
                Some(SocketAddr::new(ip, port))
            }
            ["PROXY", "UNKNOWN", ..] => None,
            _ => return Err(BadProxyHeader),
        };
        return Ok(Preamble::Proxy(end + 2, client));
    }
    let n = buf.len().min(PROXY_V2.len());
    if buf[..n] != PROXY_V2[..n] {
        return Ok(Preamble::None);
    }
    if buf.len() < 16 {
        return Ok(Preamble::Incomplete);
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 || len > 512 {
        return Err(BadProxyHeader);
    }
    if buf.len() < 16 + len {
        return Ok(Preamble::Incomplete);
    }
    let a = &buf[16..16 + len];
    let client = match (ver_cmd & 0x0f, family >> 4) {
        // LOCAL: the proxy's own connection.
        (0, _) => None,
        (1, 1) if a.len() >= 12 => {
            let ip = std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        (1, 2) if a.len() >= 36 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            let ip = std::net::Ipv6Addr::from(o);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        (1, 0) => None,
        _ => return Err(BadProxyHeader),
    };
    Ok(Preamble::Proxy(16 + len, client))
}

/// Waits for a connection's first bytes; from a trusted proxy, takes a PROXY header off them.
/// Returns the stream (with the bytes read but not consumed put back) and the client a PROXY
/// header named.
async fn first_bytes(
    mut tcp: tokio::net::TcpStream,
    via_proxy: bool,
) -> std::io::Result<(Prefixed<tokio::net::TcpStream>, Option<SocketAddr>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 256];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if !via_proxy {
            return Ok((Prefixed::new(buf, tcp), None));
        }
        match parse_preamble(&buf) {
            Ok(Preamble::Incomplete) if buf.len() < 16 + 512 => continue,
            Ok(Preamble::Incomplete) | Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    BadProxyHeader,
                ))
            }
            Ok(Preamble::None) => return Ok((Prefixed::new(buf, tcp), None)),
            Ok(Preamble::Proxy(len, client)) => {
                let rest = buf.split_off(len);
                let client = client.map(|c| SocketAddr::new(c.ip().to_canonical(), c.port()));
                return Ok((Prefixed::new(rest, tcp), client));
            }
        }
    }
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(head: Vec<u8>, inner: S) -> Self {
        Self { head, at: 0, inner }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(out.remaining());
            let at = self.at;
            out.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Requests in flight on one connection, and since when it has had none.
struct Activity {
    state: Mutex<(usize, Instant, bool)>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((0, Instant::now(), false)),
        })
    }

    fn enter(self: &Arc<Self>) -> InFlight {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        s.2 = true;
        InFlight(self.clone())
    }

    /// How long the connection has been without a request, and whether it ever had one.
    fn idle(&self) -> Option<(Duration, bool)> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.0 == 0).then(|| (s.1.elapsed(), s.2))
    }
}

/// One request in flight; it lands when its response body has been sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        s.1 = Instant::now();
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct Tracked {
    inner: axum::body::Body,
    _flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())]
struct BodyTooSlow;

/// A request body that must arrive in full before its deadline.
struct Deadline {
    inner: hyper::body::Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyTooSlow.into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_connection<S>(
    stream: S,
    conn_peer: SocketAddr,
    router: Router,
    proxies: Arc<TrustedProxies>,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::Service;
    let activity = Activity::new();
    let requests = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let flight = requests.enter();
        let peer = proxies.client(conn_peer, req.headers());
        let streaming = STREAMING_REQUESTS.contains(&req.uri().path());
        let mut req = req.map(|inner| {
            if streaming || hyper::body::Body::is_end_stream(&inner) {
                axum::body::Body::new(inner)
            } else {
                axum::body::Body::new(Deadline {
                    inner,
                    deadline: Box::pin(tokio::time::sleep(BODY_TIMEOUT)),
                })
            }
        });
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let call = router.clone().call(req);
        async move {
            let resp = call.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                axum::body::Body::new(Tracked {
                    inner,
                    _flight: flight,
                })
            }))
        }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Dead peers (a laptop that went to sleep) are noticed by PINGs.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r { debug!(peer = %conn_peer, error = %e, "connection error"); }
                return;
            }
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
            _ = tick.tick() => {
                let limit = match activity.idle() {
                    Some((idle, false)) if idle >= HEADER_READ_TIMEOUT => "no request",
                    Some((idle, true)) if idle >= IDLE_TIMEOUT => "idle",
                    _ => continue,
                };
                debug!(peer = %conn_peer, why = limit, "closing the connection");
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                return;
            }
        }
    }
}

/// Resolves once the shutdown flag is set (the watch guard never lives across an await).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn proxy_v1_and_v2_headers_name_the_client() {
        let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_preamble(v1).expect("v1"),
            Preamble::Proxy(44, Some(sa("203.0.113.7:51234")))
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        assert_eq!(
            parse_preamble(v6).expect("v6"),
            Preamble::Proxy(v6.len(), Some(sa("[2001:db8::7]:4000")))
        );
        assert_eq!(
            parse_preamble(b"PROXY UNKNOWN\r\n").expect("unknown"),
            Preamble::Proxy(15, None)
        );
        assert_eq!(
            parse_preamble(b"PROX").expect("short"),
            Preamble::Incomplete
        );
        assert_eq!(
            parse_preamble(b"PROXY TCP4 203.0.113.7").expect("partial"),
            Preamble::Incomplete
        );
        assert!(parse_preamble(b"PROXY TCP4 nonsense 1 2 3\r\n").is_err());
        assert!(parse_preamble(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)).is_err());
        // Not a PROXY header: TLS and HTTP pass through untouched.
        assert_eq!(
            parse_preamble(b"GET / HTTP/1.1\r\n").expect("http"),
            Preamble::None
        );
        assert_eq!(
            parse_preamble(&[0x16, 3, 1, 0, 200]).expect("tls"),
            Preamble::None
        );
        assert_eq!(
            parse_preamble(b"PRI * HTTP/2.0\r\n").expect("h2"),
            Preamble::None
        );

        let mut v2 = PROXY_V2.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 192, 0, 2, 1, 0x1f, 0x90, 1, 187,
        ]);
        v2.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse_preamble(&v2).expect("v2"),
            Preamble::Proxy(28, Some(sa("198.51.100.9:8080")))
        );
        assert_eq!(
            parse_preamble(&v2[..20]).expect("v2 short"),
            Preamble::Incomplete
        );
        let mut local = PROXY_V2.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse_preamble(&local).expect("local"),
            Preamble::Proxy(16, None)
        );
        let mut bad = PROXY_V2.to_vec();
        bad.extend_from_slice(&[0x11, 0x11, 0, 12]);
        assert!(parse_preamble(&bad).is_err(), "version 1 in a v2 header");
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse("10.0.0.5, fd00::/64").expect("parse");
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "198.51.100.1, 203.0.113.7, 10.0.0.5"
                .parse()
                .expect("value"),
        );
        // From the proxy: the right-most address that is not a trusted proxy.
        assert_eq!(
            proxies.client(sa("10.0.0.5:40000"), &h).ip(),
            "203.0.113.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            proxies.client(sa("[::ffff:10.0.0.5]:40000"), &h).ip(),
            "203.0.113.7".parse::<IpAddr>().expect("ip"),
            "an IPv4-mapped proxy address is the proxy"
        );
        // From anyone else the header is ignored.
        assert_eq!(proxies.client(sa("192.0.2.9:1"), &h), sa("192.0.2.9:1"));
        // No header, or garbage right after the proxy: the proxy itself.
        assert_eq!(
            proxies.client(sa("10.0.0.5:1"), &hyper::HeaderMap::new()),
            sa("10.0.0.5:1")
        );
        h.insert(
            "x-forwarded-for",
            "203.0.113.7, junk".parse().expect("value"),
        );
        assert_eq!(proxies.client(sa("[fd00::9]:1"), &h), sa("[fd00::9]:1"));
        assert!(TrustedProxies::parse("10.0.0.0/8,not-an-address").is_err());
        assert!(TrustedProxies::parse("").expect("empty").is_empty());
    }
}
