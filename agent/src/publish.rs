//! Public services, the agent's side: while the network map says this peer carries a public
//! service, keep a control tunnel and a few idle data tunnels to management (HTTP upgrades on
//! the management URL, so they pass wherever management does); for every `Open` the server sends,
//! check it against the map, connect to the target and pump bytes (TCP) or framed datagrams (UDP).
//! A stream the map does not list is refused: the server cannot make this agent an open proxy.

use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_proto::management as pb;
use tern_proto::tunnel::{self, Control, Open, Protocol, SpliceEnd, Status, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Idle data tunnels kept ready, so a new client does not wait for one to be opened.
const IDLE_TARGET: usize = 4;
/// How long a used idle tunnel waits to be replaced while others are still idle.
const REFILL_DELAY: Duration = Duration::from_millis(50);
/// Streams carried at once; more are answered Busy.
const MAX_STREAMS: usize = 2048;
/// Connecting to a target gives up after this long.
const TARGET_CONNECT: Duration = Duration::from_secs(5);

/// One service of the map as `tern status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub protocol: String,
    /// Where outside clients connect.
    pub public_address: String,
    pub target: String,
    pub ephemeral: bool,
    pub active: u64,
    pub total: u64,
}

#[derive(Default)]
struct Counters {
    active: AtomicU64,
    total: AtomicU64,
}

/// Management's address as the tunnel needs it.
#[derive(Clone, Debug)]
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
}

impl Endpoint {
    fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let uri: tonic::codegen::http::Uri = url
            .parse()
            .with_context(|| format!("management URL {url:?} is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("management URL {url:?} must start with http:// or https://"),
        };
        let auth = uri
            .authority()
            .ok_or_else(|| anyhow!("management URL {url:?} has no host"))?;
        Ok(Endpoint {
            tls,
            host: auth.host().trim_matches(['[', ']']).to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: auth.as_str().to_string(),
        })
    }
}

pub struct Publisher {
    /// Management as the user named it (TLS name, and the host shown for public addresses).
    ep: Endpoint,
    /// Where the tunnel connects (the same host, or its NAT64 address on an IPv6-only uplink).
    dial: Mutex<(String, u16)>,
    tls: Arc<rustls::ClientConfig>,
    token: watch::Receiver<Option<String>>,
    services: watch::Receiver<Arc<Vec<pb::ServedService>>>,
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    streams: AtomicUsize,
}

impl Publisher {
    /// Management at `url`, dialled at `dial` (see [`crate::nat64::Nat64::url`]).
    pub fn new(
        url: &str,
        dial: &str,
        tls: Arc<rustls::ClientConfig>,
        token: watch::Receiver<Option<String>>,
        services: watch::Receiver<Arc<Vec<pb::ServedService>>>,
    ) -> anyhow::Result<Arc<Publisher>> {
        let d = Endpoint::parse(dial)?;
        Ok(Arc::new(Publisher {
            ep: Endpoint::parse(url)?,
            dial: Mutex::new((d.host, d.port)),
            tls,
            token,
            services,
            counters: Mutex::new(HashMap::new()),
            streams: AtomicUsize::new(0),
        }))
    }

    fn dialled(&self) -> (String, u16) {
        self.dial.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Management is now dialled at `dial` (the host's NAT64 prefix changed).
    pub fn redial(&self, dial: &str) -> anyhow::Result<()> {
        let d = Endpoint::parse(dial)?;
        *self.dial.lock().unwrap_or_else(|e| e.into_inner()) = (d.host, d.port);
        Ok(())
    }

    fn counters(&self, id: &str) -> Arc<Counters> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// The services this peer carries, with their streams.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let host = if self.ep.host.contains(':') {
            format!("[{}]", self.ep.host)
        } else {
            self.ep.host.clone()
        };
        self.services
            .borrow()
            .iter()
            .map(|s| {
                let c = self.counters(&s.id);
                ServiceStatus {
                    name: s.name.clone(),
                    protocol: s.protocol.clone(),
                    public_address: format!("{host}:{}", s.public_port),
                    target: s.target.clone(),
                    ephemeral: s.ephemeral,
                    active: c.active.load(Relaxed),
                    total: c.total.load(Relaxed),
                }
            })
            .collect()
    }

    /// Keeps the control tunnel up while the map lists a service.
    pub async fn run(self: Arc<Self>) {
        let mut services = self.services.clone();
        let mut backoff = tern_backoff::Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            std::time::Instant::now(),
        );
        loop {
            while services.borrow_and_update().is_empty() {
                if services.changed().await.is_err() {
                    return;
                }
            }
            match self.connect(tunnel::ROLE_CONTROL).await {
                Ok(io) => {
                    backoff.succeeded();
                    let n = services.borrow().len();
                    info!(services = n, "carrying public services");
                    let why = self.clone().session(io, &mut services).await;
                    info!(reason = %why, "public-service tunnel closed");
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %format!("{e:#}"), retry_in = ?wait, "public-service tunnel to management failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = services.changed() => {}
                    }
                }
            }
        }
    }

    /// One control connection: answers pings, opens data tunnels when asked and keeps
    /// [`IDLE_TARGET`] idle. Ends when the connection or the last service goes.
    async fn session(
        self: Arc<Self>,
        io: Box<dyn Io>,
        services: &mut watch::Receiver<Arc<Vec<pb::ServedService>>>,
    ) -> String {
        let (stop_tx, stop) = watch::channel(false);
        let pool = Arc::new(Pool::default());
        let (mut r, mut w) = tokio::io::split(io);
        // Used tunnels are replaced a moment later unless none is left, so that opening the
        // replacement (a TCP and HTTP handshake on both ends) does not compete with the connection
        // that just took one; a burst that empties the pool refills at once, and the server asks
        // (`Want`) for any client left waiting.
        let refill = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(refill);
        let mut refill_armed = false;
        let why = loop {
            let idle = pool.idle.load(Relaxed);
            if idle == 0 || (refill_armed && refill.is_elapsed()) {
                refill_armed = false;
                while pool.idle.load(Relaxed) < IDLE_TARGET {
                    self.spawn_data(&pool, &stop);
                }
            } else if idle < IDLE_TARGET && !refill_armed {
                refill
                    .as_mut()
                    .reset(tokio::time::Instant::now() + REFILL_DELAY);
                refill_armed = true;
            }
            tokio::select! {
                _ = &mut refill, if refill_armed => {}
                f = Control::read(&mut r) => match f {
                    Ok(Control::Want(n)) => {
                        for _ in 0..n.min(64) {
                            self.spawn_data(&pool, &stop);
                        }
                    }
                    Ok(Control::Ping) => {
                        if let Err(e) = w.write_all(&Control::Pong.encode()).await {
                            break e.to_string();
                        }
                    }
                    Ok(Control::Pong) => {}
                    Err(e) => break e.to_string(),
                },
                _ = pool.changed.notified() => {}
                r = services.changed() => {
                    if r.is_err() || services.borrow_and_update().is_empty() {
                        break "no public service to carry".to_string();
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        why
    }

    fn spawn_data(self: &Arc<Self>, pool: &Arc<Pool>, stop: &watch::Receiver<bool>) {
        pool.idle.fetch_add(1, Relaxed);
        let (me, pool, mut stop) = (self.clone(), pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut io = match me.connect(tunnel::ROLE_DATA).await {
                Ok(io) => io,
                Err(e) => {
                    debug!(error = %format!("{e:#}"), "data tunnel failed");
                    // Do not reconnect in a tight loop while management is unreachable.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    pool.release();
                    return;
                }
            };
            let open = tokio::select! {
                o = Open::read(&mut io) => o,
                _ = stop.changed() => { pool.release(); return; }
            };
            pool.release();
            match open {
                Ok(open) => me.carry(open, io).await,
                Err(tunnel::TunnelError::Closed) => {}
                Err(e) => debug!(error = %e, "bad open frame"),
            }
        });
    }

    /// One client: checks the request against the map, connects to the target, pumps.
    async fn carry(&self, open: Open, mut io: Box<dyn Io>) {
        let svc = self
            .services
            .borrow()
            .iter()
            .find(|s| s.id == open.service)
            .cloned();
        let refuse = |msg: String| Status::new(StatusCode::UnknownService, msg);
        let svc = match svc {
            None => Err(refuse(format!(
                "this peer does not carry service {} (its network map may be out of date)",
                open.service
            ))),
            Some(s) if s.protocol != open.protocol.as_str() => Err(refuse(format!(
                "service {} is {} here, not {}",
                s.name,
                s.protocol,
                open.protocol.as_str()
            ))),
            Some(s) if s.target.parse::<SocketAddr>().ok() != Some(open.target) => {
                Err(refuse(format!(
                    "service {} reaches {} here, not {}",
                    s.name, s.target, open.target
                )))
            }
            Some(s) => Ok(s),
        };
        let svc = match svc {
            Ok(s) => s,
            Err(st) => {
                warn!(service = %open.service, target = %open.target, reason = %st.message, "refused a public-service stream");
                let _ = io.write_all(&st.encode()).await;
                return;
            }
        };
        if self.streams.fetch_add(1, Relaxed) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Relaxed);
            let st = Status::new(
                StatusCode::Busy,
                format!("the agent carries {MAX_STREAMS} streams already"),
            );
            let _ = io.write_all(&st.encode()).await;
            return;
        }
        let c = self.counters(&svc.id);
        c.active.fetch_add(1, Relaxed);
        c.total.fetch_add(1, Relaxed);
        let idle = Duration::from_secs(svc.idle_timeout_secs.max(1) as u64);
        match open.protocol {
            Protocol::Tcp => carry_tcp(&open, svc.proxy_protocol, idle, &mut io).await,
            Protocol::Udp => carry_udp(&open, idle, io).await,
        }
        c.active.fetch_sub(1, Relaxed);
        self.streams.fetch_sub(1, Relaxed);
    }

    /// A tunnel: TCP (TLS for https URLs) to management, upgraded to a raw stream.
    async fn connect(&self, role: &str) -> anyhow::Result<Box<dyn Io>> {
        let token = self
            .token
            .borrow()
            .clone()
            .ok_or_else(|| anyhow!("not logged in to management yet"))?;
        let ep = &self.ep;
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(self.dialled()))
            .await
            .map_err(|_| anyhow!("no answer from {} within 10 s", ep.authority))?
            .with_context(|| format!("connecting to {}", ep.authority))?;
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(20))
                .with_interval(Duration::from_secs(5)),
        );
        let mut io: Box<dyn Io> = if ep.tls {
            let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                .map_err(|_| anyhow!("{:?} is not a valid TLS server name", ep.host))?;
            Box::new(
                tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {}", ep.authority))?,
            )
        } else {
            Box::new(tcp)
        };
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\
             Authorization: Bearer {token}\r\n{}: {role}\r\n\r\n",
            tunnel::PATH,
            ep.authority,
            tunnel::UPGRADE,
            tunnel::ROLE_HEADER
        );
        io.write_all(req.as_bytes()).await?;
        let (head, rest) = tokio::time::timeout(Duration::from_secs(10), read_head(&mut io))
            .await
            .map_err(|_| anyhow!("management did not answer the tunnel request within 10 s"))??;
        let status = head.lines().next().unwrap_or_default().to_string();
        if !status.starts_with("HTTP/1.1 101") {
            let mut body = vec![0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(2), io.read(&mut body))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let body = String::from_utf8_lossy(&body[..n]);
            let body = format!("{}{body}", String::from_utf8_lossy(&rest));
            bail!(
                "management refused the tunnel: {status}{}",
                if body.trim().is_empty() {
                    String::new()
                } else {
                    format!(" ({})", body.trim())
                }
            );
        }
        if rest.is_empty() {
            return Ok(io);
        }
        Ok(Box::new(Prefixed {
            rest,
            pos: 0,
            inner: io,
        }))
    }
}

/// Count of idle (or connecting) data tunnels; `changed` wakes the session to top up.
#[derive(Default)]
struct Pool {
    idle: AtomicUsize,
    changed: Notify,
}

impl Pool {
    fn release(&self) {
        self.idle.fetch_sub(1, Relaxed);
        self.changed.notify_one();
    }
}

/// Reads an HTTP response head; returns it and the bytes read past it (the tunnel's first bytes).
async fn read_head(io: &mut Box<dyn Io>) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 8192 {
            bail!("management sent an oversized response head");
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            bail!(
                "management closed the connection (is the URL right, and management up to date?)"
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream whose first bytes were already read (past an HTTP head): they are read again first.
struct Prefixed {
    rest: Vec<u8>,
    pos: usize,
    inner: Box<dyn Io>,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.rest.len() {
            let n = (me.rest.len() - me.pos).min(buf.remaining());
            buf.put_slice(&me.rest[me.pos..me.pos + n]);
            me.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn carry_tcp(open: &Open, proxy: bool, idle: Duration, io: &mut Box<dyn Io>) {
    let target = open.target;
    let conn = tokio::time::timeout(TARGET_CONNECT, TcpStream::connect(target)).await;
    let mut t = match conn {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let st = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Status::new(
                    StatusCode::TargetRefused,
                    format!("target {target} refused the connection (is the service on that port running?)"),
                )
            } else {
                Status::new(
                    StatusCode::TargetUnreachable,
                    format!("cannot reach target {target}: {e}"),
                )
            };
            debug!(%target, reason = %st.message, "target connection failed");
            let _ = io.write_all(&st.encode()).await;
            return;
        }
        Err(_) => {
            let st = Status::new(
                StatusCode::TargetUnreachable,
                format!("target {target} did not answer within {TARGET_CONNECT:?}"),
            );
            let _ = io.write_all(&st.encode()).await;
            return;
        }
    };
    let _ = t.set_nodelay(true);
    if io.write_all(&Status::ok().encode()).await.is_err() {
        return;
    }
    if proxy
        && t.write_all(&tunnel::proxy_v2_header(open.client, open.public))
            .await
            .is_err()
    {
        return;
    }
    match tunnel::splice(io, &mut t, [None, None], [None, None], idle).await {
        SpliceEnd::Closed => {}
        SpliceEnd::Idle => debug!(%target, client = %open.client, "idle connection closed"),
        SpliceEnd::Error(e) => debug!(%target, error = %e, "connection ended"),
    }
}

async fn carry_udp(open: &Open, idle: Duration, mut io: Box<dyn Io>) {
    let target = open.target;
    let bind: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => match s.connect(target).await {
            Ok(()) => s,
            Err(e) => {
                let st = Status::new(
                    StatusCode::TargetUnreachable,
                    format!("cannot reach target {target}: {e}"),
                );
                let _ = io.write_all(&st.encode()).await;
                return;
            }
        },
        Err(e) => {
            let _ = io
                .write_all(&Status::new(StatusCode::Error, format!("no UDP socket: {e}")).encode())
                .await;
            return;
        }
    };
    if io.write_all(&Status::ok().encode()).await.is_err() {
        return;
    }
    let (mut r, mut w) = tokio::io::split(io);
    let moved = AtomicU64::new(0);
    let to_target = async {
        let mut buf = vec![0u8; tunnel::MAX_DATAGRAM];
        while let Ok(n) = tunnel::read_datagram(&mut r, &mut buf).await {
            let _ = sock.send(&buf[..n]).await;
            moved.fetch_add(1, Relaxed);
        }
    };
    let to_client = async {
        let mut buf = vec![0u8; 65_536];
        let mut frame = Vec::with_capacity(2048);
        loop {
            match sock.recv(&mut buf).await {
                Ok(n) => {
                    frame.clear();
                    if tunnel::encode_datagram(&buf[..n], &mut frame).is_some()
                        && w.write_all(&frame).await.is_err()
                    {
                        return;
                    }
                    moved.fetch_add(1, Relaxed);
                }
                // ICMP port unreachable from the target: nothing listens right now; keep going.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = to_target => {}
        _ = to_client => {}
        _ = tunnel::quiet_for(&moved, idle) => debug!(%target, client = %open.client, "idle UDP flow closed"),
    }
}

// ---------------------------------------------------------------------------------------------
// `tern expose`: the daemon asks management for an ephemeral service and ends it when the
// command's connection to the daemon closes.

/// What `tern expose` asks the daemon for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExposeArgs {
    pub protocol: String,
    pub local_port: u16,
    pub public_port: Option<u16>,
    pub allow: Vec<String>,
}

/// The daemon's answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Exposed {
    pub name: String,
    pub public_address: String,
    pub allowed_sources: Vec<String>,
    #[serde(skip)]
    pub service_id: String,
}

pub struct ExposeClient {
    pub channel: tonic::transport::Channel,
    pub token: watch::Receiver<Option<String>>,
}

impl ExposeClient {
    fn request<T>(&self, body: T) -> Result<tonic::Request<T>, String> {
        let t = self
            .token
            .borrow()
            .clone()
            .ok_or("the agent is not logged in to management yet; try again in a moment")?;
        let mut req = tonic::Request::new(body);
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req.set_timeout(Duration::from_secs(10));
        Ok(req)
    }

    pub async fn expose(&self, a: &ExposeArgs) -> Result<Exposed, String> {
        let req = self.request(pb::ExposeRequest {
            protocol: a.protocol.clone(),
            local_port: a.local_port as u32,
            public_port: a.public_port.unwrap_or(0) as u32,
            allowed_sources: a.allow.clone(),
        })?;
        let r = pb::management_service_client::ManagementServiceClient::new(self.channel.clone())
            .expose(req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable => format!("management is unreachable: {}", s.message()),
                _ => s.message().to_string(),
            })?
            .into_inner();
        Ok(Exposed {
            name: r.name,
            public_address: r.public_address,
            allowed_sources: r.allowed_sources,
            service_id: r.service_id,
        })
    }

    pub async fn unexpose(&self, service_id: &str) {
        let Ok(req) = self.request(pb::UnexposeRequest {
            service_id: service_id.to_string(),
        }) else {
            return;
        };
        match pb::management_service_client::ManagementServiceClient::new(self.channel.clone())
            .unexpose(req)
            .await
        {
            Ok(_) => info!(service = %service_id, "port no longer published"),
            // Management also removes it when this agent disconnects.
            Err(e) => {
                warn!(service = %service_id, error = %e.message(), "could not unpublish the port")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(services: Vec<pb::ServedService>) -> Arc<Publisher> {
        let (_t, token) = watch::channel(None);
        // The map stays readable after its sender is gone.
        let (_map, rx) = watch::channel(Arc::new(services));
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("tls")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        Publisher::new("http://127.0.0.1:1", "http://127.0.0.1:1", tls, token, rx)
            .expect("publisher")
    }

    fn served(id: &str, protocol: &str, target: SocketAddr) -> pb::ServedService {
        pb::ServedService {
            id: id.into(),
            name: id.into(),
            protocol: protocol.into(),
            target: target.to_string(),
            proxy_protocol: true,
            idle_timeout_secs: 5,
            public_port: 10001,
            ephemeral: false,
        }
    }

    fn open(service: &str, protocol: Protocol, target: SocketAddr) -> Open {
        Open {
            service: service.into(),
            protocol,
            target,
            client: "203.0.113.20:40000".parse().expect("addr"),
            public: "203.0.113.10:10001".parse().expect("addr"),
        }
    }

    /// Runs `carry` on one end of an in-memory tunnel; returns the other end.
    fn carry(p: &Arc<Publisher>, o: Open) -> tokio::io::DuplexStream {
        let (server, agent) = tokio::io::duplex(1 << 16);
        let p = p.clone();
        tokio::spawn(async move { p.carry(o, Box::new(agent)).await });
        server
    }

    #[tokio::test]
    async fn streams_the_map_does_not_list_are_refused_and_nothing_is_dialled() {
        let target = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = target.local_addr().expect("addr");
        let other = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let other_addr = other.local_addr().expect("addr");
        let p = publisher(vec![served("plc", "tcp", addr)]);
        for (o, why) in [
            (open("unknown", Protocol::Tcp, addr), "does not carry"),
            (open("plc", Protocol::Tcp, other_addr), "reaches"),
            (open("plc", Protocol::Udp, addr), "is tcp here"),
        ] {
            let mut s = carry(&p, o);
            let st = Status::read(&mut s).await.expect("status");
            assert_eq!(st.code, StatusCode::UnknownService);
            assert!(st.message.contains(why), "{}", st.message);
        }
        // The listed target was never dialled for those, and neither was the other address.
        for l in [&target, &other] {
            let r = tokio::time::timeout(Duration::from_millis(100), l.accept()).await;
            assert!(r.is_err(), "no connection was made");
        }
    }

    #[tokio::test]
    async fn a_listed_stream_reaches_its_target_with_the_proxy_header_first() {
        let target = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = target.local_addr().expect("addr");
        let p = publisher(vec![served("plc", "tcp", addr)]);
        let o = open("plc", Protocol::Tcp, addr);
        let header = tunnel::proxy_v2_header(o.client, o.public);
        let mut s = carry(&p, o);
        let (mut t, _) = target.accept().await.expect("dialled");
        assert_eq!(Status::read(&mut s).await.expect("status"), Status::ok());
        s.write_all(b"ping").await.expect("write");
        let mut got = vec![0u8; header.len() + 4];
        t.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..header.len()], &header[..]);
        assert_eq!(&got[header.len()..], b"ping");
        assert_eq!(p.status()[0].active, 1);
    }

    #[tokio::test]
    async fn a_closed_target_port_is_reported_as_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let p = publisher(vec![served("plc", "tcp", addr)]);
        let mut s = carry(&p, open("plc", Protocol::Tcp, addr));
        let st = Status::read(&mut s).await.expect("status");
        assert_eq!(st.code, StatusCode::TargetRefused, "{}", st.message);
        assert!(
            st.message.contains("refused the connection"),
            "{}",
            st.message
        );
    }

    #[tokio::test]
    async fn bytes_read_past_the_response_head_are_not_lost() {
        let (mut server, client) = tokio::io::duplex(4096);
        server
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nO\0\x02{}")
            .await
            .expect("write");
        let mut io: Box<dyn Io> = Box::new(client);
        let (head, rest) = read_head(&mut io).await.expect("head");
        assert!(head.starts_with("HTTP/1.1 101") && head.ends_with("\r\n\r\n"));
        let mut p = Prefixed {
            rest,
            pos: 0,
            inner: io,
        };
        let mut got = [0u8; 5];
        p.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"O\0\x02{}");
    }

    #[test]
    fn management_urls_give_the_tunnel_endpoint() {
        let e = Endpoint::parse("https://vpn.example.com").expect("url");
        assert!(e.tls);
        assert_eq!((e.host.as_str(), e.port), ("vpn.example.com", 443));
        let e = Endpoint::parse("http://[2001:db8:64:ff9b::cb00:710a]:443").expect("url");
        assert!(!e.tls);
        assert_eq!(e.host, "2001:db8:64:ff9b::cb00:710a");
        assert_eq!(e.authority, "[2001:db8:64:ff9b::cb00:710a]:443");
        assert!(Endpoint::parse("htp://x").is_err());
        assert!(Endpoint::parse("not a url").is_err());
    }
}
