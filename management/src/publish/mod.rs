//! Public services at run time: the server listens on each enabled service's public port and
//! carries every TCP connection (or UDP flow) through a tunnel to an agent that reaches the
//! target; that agent connects to the target and the bytes flow. No TUN device is needed on the
//! server, so it works the same in a container.
//!
//! Why tunnels to the agent rather than the server joining the mesh as a WireGuard peer with a
//! userspace TCP/IP stack: the agent already keeps a TCP connection to management on every path
//! (direct, symmetric NAT, NAT64, UDP blocked), the target's own kernel TCP does the work, and a
//! connection costs one spliced TCP stream per side, as in a plain reverse tunnel (rathole, frp).
//!
//! Safety: a service reaches exactly its target ip:port; the agent refuses any stream that its
//! network map does not list. Sources outside the allowlist are reset and counted; each source and
//! the server have connection caps; a connection that cannot be set up within the set-up timeout
//! is closed; idle connections and flows time out.

mod hub;
mod limits;

pub use hub::{Hub, HubError, Tunnel};
pub use limits::Limits;

use crate::model::{now_millis, Millis, PublicService, ServiceProtocol, ServiceStats};
use crate::netmap::NetIndex;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tern_proto::tunnel::{self, Control, Open, SpliceEnd, Status, StatusCode as TunnelStatus};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// A port the server itself uses (never published).
#[derive(Clone, Debug)]
pub struct Reserved {
    pub protocol: ServiceProtocol,
    pub first: u16,
    pub last: u16,
    pub what: &'static str,
}

/// Configuration of public services (`--public-ports` and friends).
#[derive(Clone, Debug)]
pub struct PublicOptions {
    /// Ports the server may publish, inclusive; None switches public services off.
    pub ports: Option<(u16, u16)>,
    /// Address public ports listen on.
    pub bind: IpAddr,
    /// Host part of the addresses shown to admins (the public URL's host).
    pub host: String,
    pub reserved: Vec<Reserved>,
    /// Open connections plus live flows, all services together.
    pub max_connections: usize,
    /// The same, per source address.
    pub max_per_source: usize,
    /// A client whose tunnel is not up by then is disconnected.
    pub setup_timeout: Duration,
    /// Ports one peer may hold with `tern expose` at once (admins' services do not count).
    pub max_exposed_per_peer: usize,
}

impl Default for PublicOptions {
    fn default() -> Self {
        PublicOptions {
            ports: Some((10000, 10999)),
            bind: IpAddr::from([0, 0, 0, 0]),
            host: "localhost".into(),
            reserved: vec![],
            max_connections: 4096,
            max_per_source: 256,
            setup_timeout: Duration::from_secs(10),
            max_exposed_per_peer: 10,
        }
    }
}

impl PublicOptions {
    /// Whether the server may publish `port` for `protocol` (the error says why not, in words).
    pub fn check_port(&self, protocol: ServiceProtocol, port: u16) -> Result<(), String> {
        let Some((a, b)) = self.ports else {
            return Err(
                "public services are switched off on this server: start it with \
                        --public-ports (e.g. 10000-10999)"
                    .into(),
            );
        };
        if !(a..=b).contains(&port) {
            return Err(format!(
                "port {port} is outside the ports this server may publish ({a}-{b}, set with \
                 --public-ports)"
            ));
        }
        if let Some(r) = self
            .reserved
            .iter()
            .find(|r| r.protocol == protocol && (r.first..=r.last).contains(&port))
        {
            return Err(format!(
                "port {port}/{} is used by the server itself ({})",
                protocol.as_str(),
                r.what
            ));
        }
        Ok(())
    }

    pub fn address(&self, port: u16) -> String {
        format!("{}:{port}", self.host)
    }
}

/// Live counters of one service.
#[derive(Default)]
struct Stats {
    active: AtomicU64,
    total: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    refused_allowlist: AtomicU64,
    refused_limit: AtomicU64,
    failed: AtomicU64,
    /// UDP datagrams dropped because their flow's queue (or all flows' together) was full.
    dropped_full: AtomicU64,
    last_error: Mutex<Option<(String, Millis)>>,
}

impl Stats {
    fn fail(&self, service: &str, why: &str) {
        self.failed.fetch_add(1, Relaxed);
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_none_or(|(m, _)| m != why) {
            info!(service, reason = why, "public service connection failed");
        }
        *last = Some((why.to_string(), now_millis()));
    }

    fn snapshot(&self) -> ServiceStats {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        ServiceStats {
            active: self.active.load(Relaxed),
            connections_total: self.total.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            refused_allowlist: self.refused_allowlist.load(Relaxed),
            refused_limit: self.refused_limit.load(Relaxed),
            failed: self.failed.load(Relaxed),
            dropped_full: self.dropped_full.load(Relaxed),
            last_error_at: last.as_ref().map(|l| l.1),
            last_error: last.map(|l| l.0),
        }
    }
}

/// Decrements `active` when a connection ends, however it ends.
struct Active(Arc<Stats>);

impl Active {
    fn new(stats: &Arc<Stats>) -> Active {
        stats.active.fetch_add(1, Relaxed);
        stats.total.fetch_add(1, Relaxed);
        Active(stats.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// What a running listener was started with; any change restarts it (ending its connections).
#[derive(Clone, PartialEq, Eq)]
struct Spec {
    protocol: ServiceProtocol,
    port: u16,
    target: SocketAddr,
    allowed: Vec<IpNet>,
    proxy_protocol: bool,
    idle: Duration,
}

impl Spec {
    fn of(s: &PublicService) -> Spec {
        Spec {
            protocol: s.protocol,
            port: s.public_port,
            target: SocketAddr::new(s.target_ip, s.target_port),
            allowed: s.allowed_sources.clone(),
            proxy_protocol: s.proxy_protocol,
            idle: Duration::from_secs(s.idle_timeout_secs.max(1) as u64),
        }
    }

    fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allowed.iter().any(|n| n.contains(&ip))
    }
}

struct Running {
    spec: Spec,
    /// Set to true to stop the listener and end its connections.
    stop: watch::Sender<bool>,
}

/// One service as the connection tasks see it.
struct Service {
    id: String,
    name: String,
    spec: Spec,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
}

pub struct Publisher {
    pub hub: Hub,
    pub opts: PublicOptions,
    limits: Arc<Limits>,
    index: RwLock<Option<Arc<NetIndex>>>,
    running: Mutex<HashMap<String, Running>>,
    stats: Mutex<HashMap<String, Arc<Stats>>>,
    /// Bytes queued in all UDP flows together (see [`QUEUED_BYTES_ALL`]).
    queued: Arc<AtomicUsize>,
    /// Per carrying peer, what ends its connections when it is cut off ([`Publisher::cut`]).
    cuts: Mutex<HashMap<String, watch::Sender<()>>>,
}

/// How long a public connection waits for an agent to open a tunnel.
const TUNNEL_WAIT: Duration = Duration::from_secs(5);
/// How long the agent may take to connect to the target and answer.
const STATUS_WAIT: Duration = Duration::from_secs(8);
/// Datagrams queued per UDP flow while its tunnel is set up or busy, and the most bytes they
/// may hold, per flow and for all flows together: beyond, datagrams are dropped and counted (as
/// a full socket buffer drops them), so a flood of large datagrams from many source ports costs
/// at most `QUEUED_BYTES_ALL`, not 256 x 64 KiB per flow.
const FLOW_QUEUE: usize = 256;
const QUEUED_BYTES_FLOW: usize = 256 << 10;
const QUEUED_BYTES_ALL: usize = 32 << 20;

/// What one UDP flow holds queued, and all flows together.
struct FlowQueue {
    tx: mpsc::Sender<Vec<u8>>,
    bytes: Arc<AtomicUsize>,
}

/// Takes `n` bytes of both budgets, or none (false: drop the datagram).
fn reserve(flow: &AtomicUsize, all: &AtomicUsize, n: usize) -> bool {
    if flow.fetch_add(n, Relaxed) + n > QUEUED_BYTES_FLOW {
        flow.fetch_sub(n, Relaxed);
        return false;
    }
    if all.fetch_add(n, Relaxed) + n > QUEUED_BYTES_ALL {
        all.fetch_sub(n, Relaxed);
        flow.fetch_sub(n, Relaxed);
        return false;
    }
    true
}

fn release(flow: &AtomicUsize, all: &AtomicUsize, n: usize) {
    flow.fetch_sub(n, Relaxed);
    all.fetch_sub(n, Relaxed);
}

impl Publisher {
    pub fn new(opts: PublicOptions) -> Arc<Publisher> {
        Arc::new(Publisher {
            hub: Hub::default(),
            limits: Limits::new(opts.max_connections, opts.max_per_source),
            opts,
            index: RwLock::new(None),
            running: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            queued: Arc::new(AtomicUsize::new(0)),
            cuts: Mutex::new(HashMap::new()),
        })
    }

    /// Fires when `peer` stops carrying anything: removed, its login expired, or its user
    /// disabled ([`Publisher::cut`]).
    fn cut_signal(&self, peer: &str) -> watch::Receiver<()> {
        self.cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer.to_string())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    /// `peer` carries no public client any more: its tunnels close (idle ones and those in use),
    /// and no new one is taken from it (it cannot connect its tunnels again without a live sync
    /// stream).
    pub fn cut(&self, peer: &str) {
        self.hub.remove(peer);
        if let Some(tx) = self
            .cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer)
        {
            tx.send_replace(());
        }
    }

    /// Queues datagram `d` on flow `q`, within both byte budgets; drops and counts it otherwise
    /// (or when the flow's queue is full).
    fn enqueue(&self, svc: &Service, q: &FlowQueue, d: &[u8]) {
        if !reserve(&q.bytes, &self.queued, d.len()) {
            svc.stats.dropped_full.fetch_add(1, Relaxed);
            return;
        }
        if q.tx.try_send(d.to_vec()).is_err() {
            release(&q.bytes, &self.queued, d.len());
            svc.stats.dropped_full.fetch_add(1, Relaxed);
        }
    }

    fn stats_of(&self, id: &str) -> Arc<Stats> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// The live counters of a service (zero for one that never ran).
    pub fn stats(&self, id: &str) -> ServiceStats {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    /// Whether this server already listens on the port for a service.
    pub fn listening(&self, protocol: ServiceProtocol, port: u16) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|r| r.spec.protocol == protocol && r.spec.port == port)
    }

    /// Refuses a port another program on the server holds (tried by binding it for a moment).
    pub fn check_free(&self, protocol: ServiceProtocol, port: u16) -> Result<(), String> {
        if self.listening(protocol, port) {
            return Ok(());
        }
        let addr = SocketAddr::new(self.opts.bind, port);
        let r = match protocol {
            ServiceProtocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
            ServiceProtocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
        };
        r.map_err(|e| {
            format!(
                "port {port}/{} cannot be opened on the server: {e}",
                protocol.as_str()
            )
        })
    }

    /// How the target is reached, in words, for the API.
    pub fn reached_via(&self, s: &PublicService) -> String {
        let idx = self.index.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(idx) = idx else {
            return String::new();
        };
        if !s.enabled {
            return "disabled".into();
        }
        match idx.service_carriers(&s.id) {
            Err(e) => e,
            Ok(c) if s.ephemeral => format!("peer {} (its own host)", names(&c)),
            Ok(c)
                if c.len() == 1 && idx.snapshot().settings.overlay_range.contains(&s.target_ip) =>
            {
                format!("peer {}", names(&c))
            }
            Ok(c) => format!("routing peer {}", names(&c)),
        }
    }

    /// Keeps listeners in line with the store: started, restarted on change, stopped when a
    /// service is disabled or deleted.
    pub async fn run(self: Arc<Self>, state: Arc<AppState>) {
        let mut changes = state.store.subscribe();
        loop {
            match state.net_index().await {
                Ok(idx) => self.apply(idx).await,
                Err(e) => warn!(error = ?e, "cannot load public services"),
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    async fn apply(self: &Arc<Self>, idx: Arc<NetIndex>) {
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = Some(idx.clone());
        let wanted: HashMap<&str, &PublicService> = idx
            .snapshot()
            .services
            .iter()
            .filter(|s| s.enabled)
            .map(|s| (s.id.as_str(), s))
            .collect();
        let mut start = vec![];
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.retain(|id, r| {
                let keep = wanted
                    .get(id.as_str())
                    .is_some_and(|s| Spec::of(s) == r.spec);
                if !keep {
                    info!(service = %id, port = r.spec.port, protocol = r.spec.protocol.as_str(), "public service stopped");
                    let _ = r.stop.send(true);
                }
                keep
            });
            for (id, s) in &wanted {
                if !running.contains_key(*id) {
                    start.push((*s).clone());
                }
            }
        }
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| idx.snapshot().services.iter().any(|s| &s.id == id));
        for s in start {
            self.start(s).await;
        }
    }

    async fn start(self: &Arc<Self>, s: PublicService) {
        let spec = Spec::of(&s);
        let stats = self.stats_of(&s.id);
        let addr = SocketAddr::new(self.opts.bind, spec.port);
        let (stop_tx, stop) = watch::channel(false);
        let svc = Arc::new(Service {
            id: s.id.clone(),
            name: s.name.clone(),
            spec: spec.clone(),
            stats: stats.clone(),
            stop,
        });
        let bound = match spec.protocol {
            ServiceProtocol::Tcp => tcp_listener(addr).map(|l| {
                tokio::spawn(self.clone().serve_tcp(svc, l));
            }),
            ServiceProtocol::Udp => udp_socket(addr).map(|u| {
                tokio::spawn(self.clone().serve_udp(svc, Arc::new(u)));
            }),
        };
        match bound {
            Ok(()) => {
                info!(service = %s.name, %addr, protocol = spec.protocol.as_str(), target = %spec.target, "public service listening");
                self.running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        s.id.clone(),
                        Running {
                            spec,
                            stop: stop_tx,
                        },
                    );
            }
            Err(e) => {
                let why = format!("cannot listen on {addr}/{}: {e}", spec.protocol.as_str());
                warn!(service = %s.name, "{why}");
                stats.fail(&s.name, &why);
            }
        }
    }

    /// A tunnel to an agent that reaches the service's target, with the agent's Ok; Err says in
    /// words why there is none.
    async fn open_tunnel(
        &self,
        svc: &Service,
        open: &Open,
        mut client: Option<&mut TcpStream>,
    ) -> Result<(Tunnel, String), String> {
        let idx = self
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("the server is starting")?;
        let carriers = idx.service_carriers(&svc.id)?;
        let online: Vec<_> = carriers.iter().filter(|p| self.hub.online(&p.id)).collect();
        if online.is_empty() {
            return Err(match carriers.as_slice() {
                [p] => format!("target agent {} is offline", p.name),
                ps => format!(
                    "no routing peer for {} is online ({})",
                    svc.spec.target.ip(),
                    names(ps)
                ),
            });
        }
        let frame = open.encode();
        let mut last = String::new();
        for p in online {
            // An idle tunnel may have died unnoticed: try a few before the next agent.
            for _ in 0..3 {
                let mut t = match self.hub.take(&p.id, TUNNEL_WAIT).await {
                    Ok(t) => t,
                    Err(HubError::Offline) => {
                        last = format!("target agent {} went offline", p.name);
                        break;
                    }
                    Err(e) => {
                        last = format!("target agent {}: {e}", p.name);
                        break;
                    }
                };
                if t.write_all(&frame).await.is_err() {
                    continue;
                }
                let (status, consumed) = match tokio::time::timeout(
                    STATUS_WAIT,
                    status_with_early_data(&mut t, client.as_deref_mut(), &svc.stats.bytes_in),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => (Err(None), false),
                };
                match status {
                    Ok(st) if st.code == TunnelStatus::Ok => return Ok((t, p.id.clone())),
                    Ok(st) if st.code == TunnelStatus::TargetRefused => {
                        return Err(st.message);
                    }
                    Ok(st) => {
                        last = format!("{} (via {})", st.message, p.name);
                        break;
                    }
                    // A dead idle tunnel: the next one, unless the client's bytes went into it.
                    Err(Some(_)) if !consumed => continue,
                    Err(Some(e)) => {
                        return Err(format!("the tunnel to target agent {} broke: {e}", p.name));
                    }
                    Err(None) => {
                        last = format!(
                            "target agent {} did not answer within {STATUS_WAIT:?}",
                            p.name
                        );
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    async fn serve_tcp(self: Arc<Self>, svc: Arc<Service>, listener: TcpListener) {
        let mut stop = svc.stop.clone();
        loop {
            let (stream, client) = tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: do not spin.
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if !svc.spec.allows(client.ip()) {
                svc.stats.refused_allowlist.fetch_add(1, Relaxed);
                debug!(service = %svc.name, %client, "source not allowed");
                reset(stream);
                continue;
            }
            let Some(slot) = self.limits.admit(client.ip().to_canonical()) else {
                svc.stats.refused_limit.fetch_add(1, Relaxed);
                reset(stream);
                continue;
            };
            let me = self.clone();
            let svc = svc.clone();
            tokio::spawn(async move {
                let _slot = slot;
                me.tcp_connection(&svc, stream, client).await;
            });
        }
    }

    /// Sets up the tunnel for one client, or records why there is none. None also when the
    /// service stops meanwhile. `early`: the TCP client, whose first bytes may go ahead.
    async fn setup(
        &self,
        svc: &Service,
        protocol: ServiceProtocol,
        client: SocketAddr,
        public: SocketAddr,
        early: Option<&mut TcpStream>,
    ) -> Option<(Tunnel, String)> {
        let open = Open {
            service: svc.id.clone(),
            protocol,
            target: svc.spec.target,
            client,
            public,
        };
        let mut stop = svc.stop.clone();
        let limit = self.opts.setup_timeout;
        let why = tokio::select! {
            _ = stop.changed() => return None,
            r = tokio::time::timeout(limit, self.open_tunnel(svc, &open, early)) => match r {
                Ok(Ok(t)) => return Some(t),
                Ok(Err(why)) => why,
                Err(_) => format!("no tunnel to the target within {limit:?}"),
            },
        };
        svc.stats.fail(&svc.name, &why);
        None
    }

    async fn tcp_connection(&self, svc: &Service, mut stream: TcpStream, client: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let public = stream.local_addr().unwrap_or(client);
        let tunnel = self
            .setup(svc, ServiceProtocol::Tcp, client, public, Some(&mut stream))
            .await;
        let Some((mut tunnel, carrier)) = tunnel else {
            reset(stream);
            return;
        };
        let mut stop = svc.stop.clone();
        let mut cut = self.cut_signal(&carrier);
        let _active = Active::new(&svc.stats);
        let s = &svc.stats;
        let end = tokio::select! {
            _ = stop.changed() => return,
            // The carrier was removed, its login expired or its user disabled.
            _ = cut.changed() => return,
            e = tunnel::splice(&mut stream, &mut tunnel, [Some(&s.bytes_in), None], [Some(&s.bytes_out), None], svc.spec.idle) => e,
        };
        match end {
            SpliceEnd::Closed => {}
            SpliceEnd::Idle => debug!(service = %svc.name, %client, "idle connection closed"),
            SpliceEnd::Error(e) => {
                debug!(service = %svc.name, %client, error = %e, "connection ended")
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, svc: Arc<Service>, sock: Arc<UdpSocket>) {
        let flows: Arc<Mutex<HashMap<SocketAddr, Arc<FlowQueue>>>> = Arc::default();
        let mut stop = svc.stop.clone();
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, client) = tokio::select! {
                _ = stop.changed() => return,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "UDP receive failed");
                        continue;
                    }
                },
            };
            let known = flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&client)
                .cloned();
            if let Some(q) = known {
                // A full queue drops the datagram (datagram semantics, bounded memory).
                self.enqueue(&svc, &q, &buf[..n]);
                continue;
            }
            if !svc.spec.allows(client.ip()) {
                svc.stats.refused_allowlist.fetch_add(1, Relaxed);
                continue;
            }
            let Some(slot) = self.limits.admit(client.ip().to_canonical()) else {
                svc.stats.refused_limit.fetch_add(1, Relaxed);
                continue;
            };
            let (tx, rx) = mpsc::channel(FLOW_QUEUE);
            let q = Arc::new(FlowQueue {
                tx,
                bytes: Arc::new(AtomicUsize::new(0)),
            });
            self.enqueue(&svc, &q, &buf[..n]);
            flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(client, q.clone());
            let (me, svc, sock, flows) = (self.clone(), svc.clone(), sock.clone(), flows.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let failed = me.udp_flow(&svc, &sock, client, rx, &q.bytes).await;
                // What the flow still held goes back to the budget of all flows.
                me.queued.fetch_sub(q.bytes.swap(0, Relaxed), Relaxed);
                if failed {
                    // Hold the flow a moment so a client retrying fast does not open a tunnel
                    // per datagram while the target is down.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                flows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&client);
            });
        }
    }

    /// Carries one UDP flow; true if it could not be set up.
    async fn udp_flow(
        &self,
        svc: &Service,
        sock: &UdpSocket,
        client: SocketAddr,
        mut rx: mpsc::Receiver<Vec<u8>>,
        queued: &AtomicUsize,
    ) -> bool {
        let public = sock.local_addr().unwrap_or(client);
        let Some((tunnel, carrier)) = self
            .setup(svc, ServiceProtocol::Udp, client, public, None)
            .await
        else {
            return true;
        };
        let mut stop = svc.stop.clone();
        let mut cut = self.cut_signal(&carrier);
        let _active = Active::new(&svc.stats);
        let (r, w) = tokio::io::split(tunnel);
        let moved = AtomicU64::new(0);
        tokio::select! {
            _ = stop.changed() => {}
            _ = cut.changed() => {}
            _ = flow_to_tunnel(&mut rx, w, &svc.stats.bytes_in, &moved, (queued, &self.queued)) => {}
            _ = tunnel_to_client(r, sock, client, &svc.stats.bytes_out, &moved) => {}
            _ = tunnel::quiet_for(&moved, svc.spec.idle) => debug!(service = %svc.name, %client, "idle UDP flow closed"),
        }
        false
    }
}

async fn flow_to_tunnel(
    rx: &mut mpsc::Receiver<Vec<u8>>,
    mut w: WriteHalf<Tunnel>,
    bytes: &AtomicU64,
    moved: &AtomicU64,
    (flow, all): (&AtomicUsize, &AtomicUsize),
) {
    let mut frame = Vec::with_capacity(2048);
    while let Some(d) = rx.recv().await {
        release(flow, all, d.len());
        frame.clear();
        if tunnel::encode_datagram(&d, &mut frame).is_none() {
            continue;
        }
        if w.write_all(&frame).await.is_err() {
            return;
        }
        bytes.fetch_add(d.len() as u64, Relaxed);
        moved.fetch_add(1, Relaxed);
    }
}

async fn tunnel_to_client(
    mut r: ReadHalf<Tunnel>,
    sock: &UdpSocket,
    client: SocketAddr,
    bytes: &AtomicU64,
    moved: &AtomicU64,
) {
    let mut buf = vec![0u8; tunnel::MAX_DATAGRAM];
    while let Ok(n) = tunnel::read_datagram(&mut r, &mut buf).await {
        let _ = sock.send_to(&buf[..n], client).await;
        bytes.fetch_add(n as u64, Relaxed);
        moved.fetch_add(1, Relaxed);
    }
}

/// Waits for the agent's status frame while passing what the client sends on to the tunnel (the
/// agent reads it once the target is connected), so a client that speaks first waits no longer
/// than through a plain reverse tunnel. Returns the status (Err(None): never; the caller's timeout
/// decides) and whether any client byte was consumed (then the connection cannot move to another
/// tunnel). The client bytes passed on count in `bytes_in` as the splice's do.
async fn status_with_early_data(
    t: &mut Tunnel,
    mut client: Option<&mut TcpStream>,
    bytes_in: &AtomicU64,
) -> (Result<Status, Option<String>>, bool) {
    use std::pin::Pin;
    use std::task::Poll;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    let mut frame: Vec<u8> = Vec::with_capacity(64);
    let mut buf = vec![0u8; 16 << 10];
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut consumed = false;
    let mut client_done = client.is_none();
    let status = std::future::poll_fn(|cx| {
        // The status frame, read exactly: what follows it is the target's data.
        loop {
            let want = match Status::frame_len(&frame) {
                Ok(Some(n)) if frame.len() == n => return Poll::Ready(Ok(Status::decode(&frame))),
                Ok(Some(n)) => n,
                Ok(None) => 3,
                Err(e) => return Poll::Ready(Err(Some(e.to_string()))),
            };
            let mut tmp = [0u8; 512];
            let room = (want - frame.len()).min(tmp.len());
            let mut rb = ReadBuf::new(&mut tmp[..room]);
            match Pin::new(&mut *t).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(Some("closed".into())))
                }
                Poll::Ready(Ok(())) => frame.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e.to_string()))),
                Poll::Pending => break,
            }
        }
        // Meanwhile: client bytes into the tunnel.
        if let Some(c) = client.as_deref_mut() {
            loop {
                if lo < hi {
                    match Pin::new(&mut *t).poll_write(cx, &buf[lo..hi]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(Some("closed".into()))),
                        Poll::Ready(Ok(n)) => lo += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e.to_string()))),
                        Poll::Pending => break,
                    }
                } else if !client_done {
                    let mut rb = ReadBuf::new(&mut buf);
                    match Pin::new(&mut *c).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => client_done = true,
                        Poll::Ready(Ok(())) => {
                            (lo, hi) = (0, rb.filled().len());
                            bytes_in.fetch_add(hi as u64, Relaxed);
                            consumed = true;
                        }
                        // The splice meets the same error (or EOF) again and ends.
                        Poll::Ready(Err(_)) => client_done = true,
                        Poll::Pending => break,
                    }
                } else {
                    break;
                }
            }
        }
        Poll::Pending
    })
    .await;
    // Bytes read from the client but not yet written go first.
    if status.is_ok() && lo < hi {
        if let Err(e) = t.write_all(&buf[lo..hi]).await {
            return (Err(Some(e.to_string())), true);
        }
    }
    (status, consumed)
}

fn names(peers: &[&crate::model::Peer]) -> String {
    peers
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Closes a connection with a reset, so the client learns at once that it was refused.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    // A deep queue: a burst of connections (or a flood from one source) is accepted and
    // sorted by the limits rather than dropped by the kernel.
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = std::net::UdpSocket::bind(addr)?;
    sock.set_nonblocking(true)?;
    let sock = UdpSocket::from_std(sock)?;
    tern_relay::udp::size_buffers(&sock, 4 << 20);
    Ok(sock)
}

// ---------------------------------------------------------------------------------------------
// The agents' side: `GET /agent/v1/tunnel` upgraded to a raw stream.

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(tunnel::PATH, axum::routing::get(upgrade))
        .with_state(state)
}

fn refuse(code: StatusCode, msg: &str) -> Response {
    (code, format!("{msg}\n")).into_response()
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut req: Request,
) -> Response {
    let Some(publisher) = state.publisher.get().cloned() else {
        return refuse(StatusCode::NOT_FOUND, "public services are not served here");
    };
    let upgrade_ok = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(tunnel::UPGRADE));
    if !upgrade_ok {
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!("this endpoint needs Upgrade: {}", tunnel::UPGRADE),
        );
    }
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <peer token>",
        );
    };
    let id = match tern_proto::token::verify_peer_token(&state.peer_token_secret, token.trim()) {
        Ok(id) => id,
        Err(e) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                &format!("peer token refused: {e}"),
            )
        }
    };
    if !state.has_stream(&id.peer_id) {
        return refuse(
            StatusCode::CONFLICT,
            "open the sync stream before tunnels (log in again)",
        );
    }
    let role = headers
        .get(tunnel::ROLE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if role != tunnel::ROLE_CONTROL && role != tunnel::ROLE_DATA {
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!("{} must be control or data", tunnel::ROLE_HEADER),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let peer = id.peer_id;
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => hyper_util::rt::TokioIo::new(u),
            Err(e) => {
                debug!(%peer, error = %e, "tunnel upgrade failed");
                return;
            }
        };
        if role == tunnel::ROLE_CONTROL {
            control(&publisher.hub, &peer, Box::new(io)).await;
        } else {
            publisher.hub.add(&peer, Box::new(io));
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, tunnel::UPGRADE)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Ping period on control connections; an agent silent for three periods is offline.
const PING: Duration = Duration::from_secs(10);

async fn control(hub: &Hub, peer: &str, io: Tunnel) {
    let (generation, mut frames) = hub.register(peer);
    info!(%peer, "agent tunnel connected");
    let (mut r, mut w) = tokio::io::split(io);
    let last_pong = Mutex::new(tokio::time::Instant::now());
    let reader = async {
        loop {
            match Control::read(&mut r).await {
                Ok(Control::Pong) => {
                    *last_pong.lock().unwrap_or_else(|e| e.into_inner()) =
                        tokio::time::Instant::now();
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    };
    let writer = async {
        let mut tick = tokio::time::interval(PING);
        loop {
            let frame = tokio::select! {
                f = frames.recv() => match f {
                    Some(f) => f,
                    None => return "replaced by a newer connection".to_string(),
                },
                _ = tick.tick() => {
                    let quiet = last_pong.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                    if quiet > PING * 3 {
                        return format!("no answer for {quiet:?}");
                    }
                    Control::Ping
                }
            };
            if let Err(e) = w.write_all(&frame.encode()).await {
                return e.to_string();
            }
        }
    };
    let why = tokio::select! { w = reader => w, w = writer => w };
    hub.unregister(peer, generation);
    info!(%peer, reason = %why, "agent tunnel disconnected");
}

/// A metric family: name, type, help, and how to read it from a service's counters.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ServiceStats) -> u64,
);

/// Prometheus lines for public services (appended to `/metrics`).
pub fn render_metrics(p: &Publisher, services: &[PublicService]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let (agents, idle) = p.hub.counts();
    let _ = writeln!(out, "# HELP tern_public_agents_connected Agents with a tunnel control connection.\n# TYPE tern_public_agents_connected gauge\ntern_public_agents_connected {agents}");
    let _ = writeln!(out, "# HELP tern_public_idle_tunnels Idle data tunnels ready for new clients.\n# TYPE tern_public_idle_tunnels gauge\ntern_public_idle_tunnels {idle}");
    let fams: [Family; 8] = [
        ("active", "gauge", "Open connections or live flows.", |s| {
            s.active
        }),
        (
            "connections_total",
            "counter",
            "Connections or flows carried to the target.",
            |s| s.connections_total,
        ),
        (
            "bytes_in_total",
            "counter",
            "Bytes from outside clients to the target.",
            |s| s.bytes_in,
        ),
        (
            "bytes_out_total",
            "counter",
            "Bytes from the target to outside clients.",
            |s| s.bytes_out,
        ),
        (
            "refused_allowlist_total",
            "counter",
            "Connections refused: source outside allowed_sources.",
            |s| s.refused_allowlist,
        ),
        (
            "refused_limit_total",
            "counter",
            "Connections refused by the per-source or global cap.",
            |s| s.refused_limit,
        ),
        (
            "failed_total",
            "counter",
            "Connections that could not reach the target.",
            |s| s.failed,
        ),
        (
            "dropped_full_total",
            "counter",
            "UDP datagrams dropped: their flow's queue (or all flows' together) was full.",
            |s| s.dropped_full,
        ),
    ];
    let stats: Vec<(&PublicService, ServiceStats)> =
        services.iter().map(|s| (s, p.stats(&s.id))).collect();
    for (name, kind, help, get) in fams {
        let _ = writeln!(
            out,
            "# HELP tern_public_service_{name} {help}\n# TYPE tern_public_service_{name} {kind}"
        );
        for (s, st) in &stats {
            let _ = writeln!(
                out,
                "tern_public_service_{name}{{service=\"{}\",protocol=\"{}\",port=\"{}\"}} {}",
                s.name.replace(['\\', '"', '\n'], "_"),
                s.protocol.as_str(),
                s.public_port,
                get(st)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_the_range_or_used_by_the_server_are_refused_in_words() {
        let mut o = PublicOptions {
            reserved: vec![Reserved {
                protocol: ServiceProtocol::Udp,
                first: 10100,
                last: 10199,
                what: "TURN relay ports",
            }],
            ..PublicOptions::default()
        };
        assert!(o.check_port(ServiceProtocol::Tcp, 10001).is_ok());
        assert!(
            o.check_port(ServiceProtocol::Tcp, 10150).is_ok(),
            "TCP is not reserved"
        );
        let e = o
            .check_port(ServiceProtocol::Udp, 10150)
            .expect_err("reserved");
        assert!(e.contains("TURN relay ports"), "{e}");
        let e = o.check_port(ServiceProtocol::Tcp, 80).expect_err("outside");
        assert!(e.contains("10000-10999"), "{e}");
        o.ports = None;
        let e = o.check_port(ServiceProtocol::Tcp, 10001).expect_err("off");
        assert!(e.contains("--public-ports"), "{e}");
    }

    #[test]
    fn allowlists_match_v4_mapped_sources() {
        let spec = Spec {
            protocol: ServiceProtocol::Tcp,
            port: 1,
            target: "192.168.50.10:502".parse().expect("addr"),
            allowed: vec!["198.51.100.0/24".parse().expect("net")],
            proxy_protocol: false,
            idle: Duration::from_secs(1),
        };
        assert!(spec.allows("198.51.100.7".parse().expect("ip")));
        assert!(spec.allows("::ffff:198.51.100.7".parse().expect("ip")));
        assert!(!spec.allows("203.0.113.20".parse().expect("ip")));
    }
}
