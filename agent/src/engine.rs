//! The data-plane shell: the TUN device, the ICE sessions (webrtc-ice) and the TCP relay around
//! the sans-IO core ([`tern_tunnel::Node`], one lock). The core decides; this module moves bytes
//! and runs what the core asks for:
//!
//! - TUN packets are encapsulated by the core and sent over the path it names: the peer's ICE
//!   connection (direct or via TURN) or the TCP relay.
//! - Datagrams from a peer's ICE connection or the TCP relay are decapsulated by the core, which
//!   checks that the inner source belongs to that peer and that the policy lets it in.
//! - Every 250 ms the core's timers run; the ICE attempts it schedules (with backoff) are started
//!   here, and their outcome goes back to it.
//! - Routed networks: routing-peer selection (core) decides, this module installs kernel routes
//!   and, on a routing peer, the forwarding rules.

use crate::signal::PeerMsg;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tern_proto::management as pb;
use tern_proto::{PublicKey, SecretKey};
use tern_tunnel::firewall::{Rule, ICMP, TCP, UDP};
use tern_tunnel::{Decap, Event, IceEvent, IcePath, Node, PathKind as CorePath, PeerId, PeerSpec};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};
use webrtc_ice::agent::agent_config::AgentConfig;
use webrtc_ice::agent::Agent;
use webrtc_ice::candidate::{candidate_base::unmarshal_candidate, Candidate, CandidateType};
use webrtc_ice::network_type::NetworkType;
use webrtc_ice::state::ConnectionState;
use webrtc_ice::url::Url;
use webrtc_util::Conn;

/// A connected ICE pair's connection.
type IceConn = Arc<dyn Conn + Send + Sync>;

/// Datagrams for the TCP relay: (recipient peer id, bytes).
pub type TcpOut = mpsc::Sender<(String, Vec<u8>)>;

/// Largest packet read from the TUN device, and the buffers around it.
const MAX_PACKET: usize = 65_536;
const BUF: usize = MAX_PACKET + 256;
/// Packets (or datagrams) handled per batch: one lock of the core, one coalesced TUN write.
const BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Largest single packet after segmentation (the MTU is at most 9000) plus WireGuard's overhead.
const SEGMENT: usize = 9216;
use crate::tunnel::HEADROOM;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    TurnRelay,
    TcpRelay,
    None,
}

impl From<CorePath> for PathKind {
    fn from(k: CorePath) -> Self {
        match k {
            CorePath::Direct => PathKind::Direct,
            CorePath::TurnRelay => PathKind::TurnRelay,
            CorePath::TcpRelay => PathKind::TcpRelay,
            CorePath::None => PathKind::None,
        }
    }
}

/// Everything `tern status` shows about one peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub id: String,
    pub public_key: String,
    pub overlay_ip: String,
    pub state: String,
    pub connection: PathKind,
    /// Why the path is what it is (e.g. why not direct), in words.
    pub path_reason: String,
    pub local_candidate: Option<String>,
    pub remote_candidate: Option<String>,
    pub latency_ms: Option<f64>,
    pub last_handshake_secs_ago: Option<u64>,
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    pub allowed_ips: Vec<String>,
}

/// An ICE session run for a peer; dropping it cancels a pending dial/accept.
struct IceSession {
    id: u64,
    agent: Arc<Agent>,
    _cancel: mpsc::Sender<()>,
    /// Offering side: the cancel receiver the dial takes once the answer arrives.
    dial_cancel: Option<mpsc::Receiver<()>>,
}

pub struct Engine {
    node: Mutex<Node>,
    /// The one UDP port for WireGuard and ICE, and webrtc-ice's view of it.
    shared: Arc<crate::socket::Shared>,
    mux: Arc<webrtc_ice::udp_mux::UDPMuxDefault>,
    tun: Arc<tun_rs::AsyncDevice>,
    iface: String,
    relay: Mutex<pb::RelayConfig>,
    signal_out: mpsc::Sender<(PublicKey, PeerMsg)>,
    tcp_out: RwLock<Option<TcpOut>>,
    /// ICE sessions under way or connected, per peer.
    ice: Mutex<HashMap<PeerId, IceSession>>,
    /// Connected ICE connections (the per-packet lookup).
    conns: RwLock<HashMap<PeerId, (u64, IceConn)>>,
    routes: Mutex<BTreeMap<String, crate::routes::RouteChoice>>,
    served: Mutex<Vec<(String, bool)>>,
}

fn candidate_kind(t: CandidateType) -> &'static str {
    match t {
        CandidateType::Host => "host",
        CandidateType::ServerReflexive => "srflx",
        CandidateType::PeerReflexive => "prflx",
        CandidateType::Relay => "relay",
        CandidateType::Unspecified => "unknown",
    }
}

/// A firewall rule of the network map as the core's policy filter takes it (inbound only).
fn rule_from_map(r: &pb::FirewallRule) -> Option<Rule> {
    if r.direction != pb::Direction::In as i32 {
        return None;
    }
    let proto = match pb::Protocol::try_from(r.protocol).ok()? {
        pb::Protocol::Any => 0,
        pb::Protocol::Tcp => TCP,
        pb::Protocol::Udp => UDP,
        pb::Protocol::Icmp => ICMP,
    };
    Some(Rule {
        src: r.peer_cidr.parse().ok()?,
        proto,
        ports: r
            .ports
            .iter()
            .map(|p| (p.start as u16, p.end as u16))
            .collect(),
        network: if r.network.is_empty() {
            None
        } else {
            Some(r.network.parse().ok()?)
        },
    })
}

impl Engine {
    pub fn new(
        key: SecretKey,
        tun: Arc<tun_rs::AsyncDevice>,
        iface: String,
        signal_out: mpsc::Sender<(PublicKey, PeerMsg)>,
        shared: Arc<crate::socket::Shared>,
        mux: Arc<webrtc_ice::udp_mux::UDPMuxDefault>,
    ) -> Arc<Self> {
        Arc::new(Engine {
            node: Mutex::new(Node::new(key.to_bytes())),
            shared,
            mux,
            tun,
            iface,
            relay: Mutex::new(pb::RelayConfig::default()),
            signal_out,
            tcp_out: RwLock::new(None),
            ice: Mutex::new(HashMap::new()),
            conns: RwLock::new(HashMap::new()),
            routes: Mutex::new(BTreeMap::new()),
            served: Mutex::new(vec![]),
        })
    }

    pub fn set_tcp_out(self: &Arc<Self>, tx: Option<TcpOut>) {
        let up = tx.is_some();
        *write(&self.tcp_out) = tx;
        lock(&self.node).set_tcp_relay(up);
        self.run_events();
    }

    pub fn tcp_connected(&self) -> bool {
        read(&self.tcp_out).as_ref().is_some_and(|t| !t.is_closed())
    }

    /// Applies a network map: peers come and go (others keep their sessions), rules and relays
    /// are replaced.
    pub fn apply_map(self: &Arc<Self>, map: &pb::NetworkMap) {
        if let Some(relay) = &map.relay {
            *lock(&self.relay) = relay.clone();
        }
        let local = map
            .peer_config
            .as_ref()
            .and_then(|c| c.address.split('/').next()?.parse().ok());
        let rules = map
            .firewall_rules
            .iter()
            .filter_map(rule_from_map)
            .collect();
        let specs: Vec<PeerSpec> = map
            .remote_peers
            .iter()
            .filter_map(|rp| {
                Some(PeerSpec {
                    key: PublicKey::from_slice(&rp.wg_public_key).ok()?.0,
                    id: rp.id.clone(),
                    name: rp.name.clone(),
                    overlay_ip: rp.overlay_ip.parse().ok()?,
                    allowed: rp
                        .allowed_ips
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .collect(),
                    online: rp.connected,
                })
            })
            .collect();
        {
            let mut n = lock(&self.node);
            if let Some(cfg) = &map.peer_config {
                n.set_overlay(cfg.overlay_range.parse().ok());
            }
            n.set_rules(local, rules);
            let before: Vec<PeerId> = n.peer_ids().collect();
            n.apply_peers(&specs, Instant::now());
            for id in n.peer_ids().filter(|id| !before.contains(id)) {
                if let Some(s) = n.spec(id) {
                    info!(peer = %s.name, ip = %s.overlay_ip, controlling = n.controlling(id), "peer added");
                }
            }
        }
        self.run_events();
    }

    /// Chooses a routing peer per routed network, installs kernel routes through the TUN device
    /// (not where they would shadow a network this host is attached to), and, on a routing peer,
    /// applies forwarding/masquerade rules for the networks it serves.
    pub fn apply_routes(self: &Arc<Self>, map: &pb::NetworkMap) {
        use crate::routes;
        let connected: HashMap<String, bool> = map
            .remote_peers
            .iter()
            .map(|p| (p.id.clone(), p.connected))
            .collect();
        let offers: Vec<tern_tunnel::routing::Offer> = map
            .routes
            .iter()
            .map(|r| tern_tunnel::routing::Offer {
                network: r.network.clone(),
                peer_id: r.routing_peer_id.clone(),
                metric: r.metric,
            })
            .collect();
        let keys: HashMap<&str, &[u8]> = map
            .routes
            .iter()
            .map(|r| (r.routing_peer_id.as_str(), r.routing_peer_key.as_slice()))
            .collect();
        let mut cur = lock(&self.routes);
        let current: BTreeMap<String, String> = cur
            .iter()
            .map(|(n, c)| (n.clone(), c.peer_id.clone()))
            .collect();
        let picks = tern_tunnel::routing::select(&offers, &connected, &current);
        let locals = routes::local_networks(&self.iface);
        let mut next = BTreeMap::new();
        let mut assigned: Vec<(IpNet, String)> = vec![];
        for (net, pick) in picks {
            let Ok(parsed) = net.parse::<IpNet>() else {
                continue;
            };
            let (peer_id, metric) = pick.clone().unwrap_or_default();
            let state = if let Some(c) = routes::conflict(&parsed, &locals) {
                c
            } else if pick.is_none() {
                "no connected routing peer".to_string()
            } else {
                assigned.push((parsed, peer_id.clone()));
                match routes::install(&net, &self.iface) {
                    Ok(()) => "installed".to_string(),
                    Err(e) => format!("kernel refused the route: {e}"),
                }
            };
            if cur.get(&net).map(|c| (&c.peer_id, &c.state)) != Some((&peer_id, &state)) {
                info!(network = %net, via = %peer_id, %state, "route");
            }
            next.insert(
                net.clone(),
                routes::RouteChoice {
                    network: net,
                    peer_key: keys
                        .get(peer_id.as_str())
                        .and_then(|k| PublicKey::from_slice(k).ok()),
                    peer_id,
                    metric,
                    state,
                },
            );
        }
        for (net, old) in cur.iter() {
            if old.state == "installed" && next.get(net).is_none_or(|n| n.state != "installed") {
                routes::uninstall(net, &self.iface);
            }
        }
        *cur = next;
        drop(cur);
        {
            let mut n = lock(&self.node);
            let by_peer: Vec<(IpNet, PeerId)> = assigned
                .iter()
                .filter_map(|(net, id)| Some((*net, n.peer_by_mgmt_id(id)?)))
                .collect();
            n.set_routes(by_peer, Instant::now());
        }
        self.run_events();
        let served: Vec<(String, bool)> = map
            .served_routes
            .iter()
            .map(|r| (r.network.clone(), r.masquerade))
            .collect();
        let mut prev = lock(&self.served);
        if *prev != served {
            let overlay = map
                .peer_config
                .as_ref()
                .map(|c| c.overlay_range.clone())
                .unwrap_or_default();
            if let Err(e) = routes::serve(&self.iface, &overlay, &served) {
                warn!(error = %e, "could not apply routing-peer rules");
            }
            *prev = served;
        }
    }

    /// Inbound packets the policy filter dropped.
    pub fn firewall_dropped(&self) -> u64 {
        lock(&self.node).dropped().0
    }

    pub fn route_status(&self) -> Vec<crate::routes::RouteChoice> {
        lock(&self.routes).values().cloned().collect()
    }

    pub fn served_status(&self) -> Vec<String> {
        lock(&self.served)
            .iter()
            .map(|(n, m)| {
                if *m {
                    format!("{n} (masquerade)")
                } else {
                    n.clone()
                }
            })
            .collect()
    }

    /// Sends one datagram over the path the core chose.
    async fn send(
        &self,
        peer: PeerId,
        path: CorePath,
        to: Option<std::net::SocketAddr>,
        data: &[u8],
    ) {
        match path {
            CorePath::Direct | CorePath::TurnRelay if to.is_some() => {
                let to = to.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                if let Err(e) = self.shared.send_to(data, to).await {
                    debug!(%to, error = %e, "send failed");
                }
            }
            CorePath::Direct | CorePath::TurnRelay => {
                let conn = read(&self.conns).get(&peer).map(|c| c.1.clone());
                if let Some(c) = conn {
                    if let Err(e) = c.send(data).await {
                        debug!(error = %e, "ICE send failed");
                    }
                    return;
                }
                // The pair just went away: the relay is the fallback.
                self.send_tcp(peer, data);
            }
            CorePath::TcpRelay => self.send_tcp(peer, data),
            CorePath::None => trace!(peer, "no path: datagram dropped"),
        }
    }

    fn send_tcp(&self, peer: PeerId, data: &[u8]) {
        let Some(tx) = read(&self.tcp_out).clone() else {
            return;
        };
        let Some(id) = lock(&self.node).spec(peer).map(|s| s.id.clone()) else {
            return;
        };
        let _ = tx.try_send((id, data.to_vec()));
    }

    /// Sends what the core has queued (after a handshake, or timers).
    async fn flush(&self, buf: &mut [u8]) {
        loop {
            let (peer, path, to, n) = {
                let mut node = lock(&self.node);
                match node.poll_transmit(buf) {
                    Some(t) => (t.peer, t.path, t.to, t.payload.len()),
                    None => return,
                }
            };
            self.send(peer, path, to, &buf[..n]).await;
        }
    }

    /// A WireGuard datagram from `peer` (its ICE connection or the TCP relay), or from an
    /// address on the shared port (`peer` None: the core finds it).
    async fn handle_wire(
        &self,
        peer: Option<PeerId>,
        from: Option<std::net::SocketAddr>,
        data: &[u8],
        out: &mut [u8],
    ) {
        let r = {
            let mut node = lock(&self.node);
            let now = Instant::now();
            let room = &mut out[HEADROOM..];
            let d = match (peer, from) {
                (Some(p), _) => node.decapsulate(p, data, now, room),
                (None, Some(f)) => node.decapsulate_from(f, data, now, room),
                (None, None) => return,
            };
            match d {
                Ok(Decap::Tunnel(p)) => Ok(Some((true, p.len(), 0, CorePath::None, None))),
                Ok(Decap::Network(t)) => Ok(Some((false, t.payload.len(), t.peer, t.path, t.to))),
                Ok(Decap::Nothing) => Ok(None),
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(Some((true, n, _, _, _))) => self.tun_write_one(out, n).await,
            Ok(Some((false, n, to, path, addr))) => {
                self.send(to, path, addr, &out[HEADROOM..HEADROOM + n])
                    .await;
                self.flush(out).await;
            }
            Ok(None) => {}
            Err(e) => trace!(?peer, ?from, error = %e, "datagram dropped"),
        }
    }

    /// Writes one packet that sits at `buf[HEADROOM..HEADROOM + n]` to the TUN device.
    async fn tun_write_one(&self, buf: &mut [u8], n: usize) {
        let r = if self.tun.tcp_gso() {
            buf[..HEADROOM].fill(0); // virtio-net header: no offload for this one
            self.tun.send(&buf[..HEADROOM + n]).await
        } else {
            self.tun.send(&buf[HEADROOM..HEADROOM + n]).await
        };
        if let Err(e) = r {
            debug!(error = %e, "TUN write failed");
        }
    }

    /// Reads one of the shared port's sockets forever, a batch at a time: WireGuard to the core
    /// (decrypted under one lock, then coalesced into few TUN writes), STUN to ICE.
    pub async fn shared_loop(self: Arc<Self>, sock: Arc<tokio::net::UdpSocket>) {
        use crate::socket::Kind;
        // Up to RECVS reads per batch; with UDP GRO one read brings a run of datagrams.
        const RECVS: usize = 16;
        let mut rx = vec![vec![0u8; MAX_PACKET]; RECVS];
        let mut cmsg = nix::cmsg_space!(libc::c_int);
        // (buffer, offset, length, sender) of each datagram of the batch.
        let mut got: Vec<(usize, usize, usize, std::net::SocketAddr)> = Vec::with_capacity(BATCH);
        let mut out = vec![0u8; BUF];
        let mut to_tun: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| Vec::with_capacity(HEADROOM + SEGMENT))
            .collect();
        let mut replies: Vec<(PeerId, CorePath, Option<std::net::SocketAddr>, Vec<u8>)> = vec![];
        let mut gro = tun_rs::GROTable::default();
        loop {
            if sock.readable().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            got.clear();
            let mut reads = 0;
            while reads < RECVS && got.len() < BATCH {
                match crate::sockopt::try_recv_gro(&sock, &mut rx[reads], &mut cmsg) {
                    Ok((n, from, seg)) => {
                        let seg = seg.unwrap_or(n).max(1);
                        let mut off = 0;
                        while off < n {
                            let len = seg.min(n - off);
                            got.push((reads, off, len, from));
                            off += len;
                        }
                        reads += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ICMP errors surface here (port unreachable); nothing to do.
                    Err(e) => {
                        trace!(error = %e, "UDP receive");
                        break;
                    }
                }
            }
            let mut packets = 0;
            let mut flush = false;
            {
                let mut node = lock(&self.node);
                let now = Instant::now();
                for &(b, off, len, ref from) in &got {
                    let d = &rx[b][off..off + len];
                    match crate::socket::classify(d) {
                        Kind::WireGuard => match node.decapsulate_from(*from, d, now, &mut out) {
                            Ok(Decap::Tunnel(p)) => {
                                // A GRO read brings up to 64 datagrams: the pool follows the batch.
                                if packets == to_tun.len() {
                                    to_tun.push(Vec::with_capacity(HEADROOM + SEGMENT));
                                }
                                let b = &mut to_tun[packets];
                                b.clear();
                                b.resize(HEADROOM, 0);
                                b.extend_from_slice(p);
                                packets += 1;
                            }
                            Ok(Decap::Network(t)) => {
                                replies.push((t.peer, t.path, t.to, t.payload.to_vec()));
                                flush = true;
                            }
                            Ok(Decap::Nothing) => {}
                            Err(e) => trace!(%from, error = %e, "datagram dropped"),
                        },
                        Kind::Stun => self.shared.stun(d, *from),
                        Kind::Other => trace!(%from, "unknown datagram on the shared port"),
                    }
                }
            }
            if packets > 0 {
                if let Err(e) = self
                    .tun
                    .send_multiple(&mut gro, &mut to_tun[..packets], HEADROOM)
                    .await
                {
                    debug!(error = %e, "TUN write failed");
                }
            }
            for (peer, path, to, d) in replies.drain(..) {
                self.send(peer, path, to, &d).await;
            }
            if flush {
                self.flush(&mut out).await;
            }
        }
    }

    /// Reads the TUN device forever (a burst per read with offloads) and sends each packet to
    /// its peer, encrypted under one lock of the core per batch.
    pub async fn tun_loop(self: Arc<Self>) {
        let mut original = vec![0u8; HEADROOM + MAX_PACKET];
        let mut bufs = vec![vec![0u8; SEGMENT]; BATCH];
        let mut sizes = vec![0usize; BATCH];
        let mut outs = vec![vec![0u8; SEGMENT + 256]; BATCH];
        let mut sends: Vec<(
            PeerId,
            CorePath,
            Option<std::net::SocketAddr>,
            usize,
            usize,
            usize,
        )> = Vec::with_capacity(BATCH);
        let mut gso: Vec<u8> = Vec::with_capacity(crate::sockopt::GSO_MAX_BYTES);
        loop {
            let n = match self
                .tun
                .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            sends.clear();
            {
                let mut node = lock(&self.node);
                let now = Instant::now();
                for (i, out) in outs.iter_mut().enumerate().take(n) {
                    let base = out.as_ptr() as usize;
                    match node.encapsulate(&bufs[i][..sizes[i]], now, out) {
                        Ok(Some(t)) => {
                            let off = t.payload.as_ptr() as usize - base;
                            sends.push((t.peer, t.path, t.to, i, off, t.payload.len()));
                        }
                        Ok(None) => {}
                        Err(e) => trace!(error = %e, "packet not sent"),
                    }
                }
            }
            // Runs of datagrams to one address, all of one size but the last: one GSO send.
            let mut i = 0;
            while i < sends.len() {
                let (peer, path, to, b, off, seg) = sends[i];
                let direct = matches!(path, CorePath::Direct | CorePath::TurnRelay);
                let mut j = i + 1;
                if let (true, Some(addr)) = (direct, to) {
                    let mut bytes = seg;
                    while j < sends.len()
                        && j - i < crate::sockopt::GSO_MAX_SEGMENTS
                        && sends[j].2 == Some(addr)
                        && sends[j - 1].5 == seg
                        && sends[j].5 <= seg
                        && bytes + sends[j].5 <= crate::sockopt::GSO_MAX_BYTES
                    {
                        bytes += sends[j].5;
                        j += 1;
                    }
                    if j - i > 1 {
                        gso.clear();
                        for &(_, _, _, b, off, len) in &sends[i..j] {
                            gso.extend_from_slice(&outs[b][off..off + len]);
                        }
                        if let Err(e) = self.shared.send_segments(&gso, seg, addr).await {
                            debug!(to = %addr, error = %e, "send failed");
                        }
                        i = j;
                        continue;
                    }
                }
                self.send(peer, path, to, &outs[b][off..off + seg]).await;
                i = j;
            }
        }
    }

    /// The core's timers every 250 ms, and the ICE work they schedule.
    pub async fn timer_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut buf = vec![0u8; 2048];
        loop {
            tick.tick().await;
            lock(&self.node).handle_timeout(Instant::now());
            self.flush(&mut buf).await;
            self.run_events();
        }
    }

    /// Carries out what the core asked for.
    fn run_events(self: &Arc<Self>) {
        loop {
            let Some(ev) = lock(&self.node).poll_event() else {
                return;
            };
            match ev {
                Event::StartIce { peer } => {
                    let me = self.clone();
                    tokio::spawn(async move { me.start_offer(peer).await });
                }
                Event::StopIce { peer, session } => self.stop_ice(peer, session),
                Event::PathChanged { peer, kind } => {
                    let name = lock(&self.node).spec(peer).map(|s| s.name.clone());
                    info!(peer = %name.unwrap_or_default(), path = ?PathKind::from(kind), "path");
                }
            }
        }
    }

    fn stop_ice(&self, peer: PeerId, session: u64) {
        let mut conns = write(&self.conns);
        if conns.get(&peer).is_some_and(|c| c.0 == session) {
            conns.remove(&peer);
        }
        drop(conns);
        let old = {
            let mut ice = lock(&self.ice);
            match ice.get(&peer) {
                Some(s) if s.id == session => ice.remove(&peer),
                _ => None,
            }
        };
        if let Some(s) = old {
            tokio::spawn(async move {
                let _ = s.agent.close().await;
            });
        }
    }

    /// Reports an ICE outcome to the core and runs what follows.
    fn ice_event(self: &Arc<Self>, peer: PeerId, ev: IceEvent) {
        lock(&self.node).handle_ice_event(peer, ev, Instant::now());
        self.run_events();
    }

    /// Retries ICE now for every peer without a pair (e.g. after a local address change).
    pub fn retry_ice_now(&self) {
        lock(&self.node).retry_ice_now(Instant::now());
    }

    fn ice_urls(&self) -> Vec<Url> {
        let relay = lock(&self.relay).clone();
        let mut urls = vec![];
        for s in &relay.stun {
            if let Ok(u) = Url::parse_url(&s.url) {
                urls.push(u);
            }
        }
        for t in &relay.turn {
            if let Ok(mut u) = Url::parse_url(&t.url) {
                u.username = t.username.clone();
                u.password = t.password.clone();
                urls.push(u);
            }
        }
        urls
    }

    /// Tells the peer our server-reflexive address on the shared port (from a STUN binding to the
    /// map's STUN server), as an ICE candidate of `session`: with it the peer's checks punch
    /// through our NAT. webrtc-ice gathers none on a muxed port.
    async fn signal_reflexive(self: Arc<Self>, to: PublicKey, session: u64) {
        use webrtc_ice::candidate::candidate_base::CandidateBaseConfig;
        use webrtc_ice::candidate::candidate_server_reflexive::CandidateServerReflexiveConfig;
        let servers: Vec<(String, u16)> = lock(&self.relay)
            .stun
            .iter()
            .filter_map(|s| Url::parse_url(&s.url).ok())
            .map(|u| (u.host.trim_matches(['[', ']']).to_string(), u.port))
            .collect();
        let mut seen = vec![];
        for (host, port) in servers {
            let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await else {
                continue;
            };
            for stun in addrs {
                let Some(mapped) = self.shared.reflexive(stun).await else {
                    debug!(%stun, "no STUN answer on the shared port");
                    continue;
                };
                if seen.contains(&mapped) {
                    continue;
                }
                seen.push(mapped);
                let c = CandidateServerReflexiveConfig {
                    base_config: CandidateBaseConfig {
                        network: "udp".into(),
                        address: mapped.ip().to_string(),
                        port: mapped.port(),
                        component: 1,
                        ..Default::default()
                    },
                    rel_addr: if mapped.is_ipv4() { "0.0.0.0" } else { "::" }.into(),
                    rel_port: self.shared.port(),
                }
                .new_candidate_server_reflexive();
                match c {
                    Ok(c) => {
                        debug!(%mapped, session, "signalling our server-reflexive address");
                        let _ = self
                            .signal_out
                            .send((
                                to,
                                PeerMsg::Candidate {
                                    session,
                                    candidate: c.marshal(),
                                },
                            ))
                            .await;
                    }
                    Err(e) => debug!(error = %e, "server-reflexive candidate"),
                }
            }
        }
    }

    /// Hosts of the TURN servers in the current map.
    fn turn_hosts(&self) -> Vec<String> {
        lock(&self.relay)
            .turn
            .iter()
            .filter_map(|t| Url::parse_url(&t.url).ok())
            .map(|u| u.host)
            .collect()
    }

    async fn new_agent(&self, controlling: bool) -> anyhow::Result<Arc<Agent>> {
        let iface = self.iface.clone();
        let overlay = lock(&self.node).overlay();
        let cfg = AgentConfig {
            urls: self.ice_urls(),
            network_types: vec![NetworkType::Udp4, NetworkType::Udp6],
            multicast_dns_mode: webrtc_ice::mdns::MulticastDnsMode::Disabled,
            is_controlling: controlling,
            relay_acceptance_min_wait: Some(Duration::from_millis(500)),
            srflx_acceptance_min_wait: Some(Duration::from_millis(300)),
            // Consent checks every second; a path silent for 3 s (NAT rebinding, dead link) is
            // dropped and the relay fallback takes over while ICE is retried.
            disconnected_timeout: Some(Duration::from_secs(3)),
            failed_timeout: Some(Duration::from_secs(8)),
            keepalive_interval: Some(Duration::from_secs(1)),
            check_interval: Duration::from_millis(200),
            interface_filter: Arc::new(Some(Box::new(move |name: &str| {
                name != iface && !name.starts_with("tern")
            }))),
            // Not the overlay, and not link-local: a candidate carries no interface scope, so a
            // link-local pair works by chance at best.
            ip_filter: Arc::new(Some(Box::new(move |ip: IpAddr| {
                let link_local = match ip {
                    IpAddr::V4(v4) => v4.is_link_local(),
                    IpAddr::V6(v6) => v6.is_unicast_link_local(),
                };
                !link_local && overlay.is_none_or(|o| !o.contains(&ip))
            }))),
            // Host candidates on the shared port; the server-reflexive one is ours
            // (signal_reflexive); relay candidates use the TURN client's own socket.
            udp_network: webrtc_ice::udp_network::UDPNetwork::Muxed(self.mux.clone()),
            ..Default::default()
        };
        Ok(Arc::new(Agent::new(cfg).await?))
    }

    /// Registers a new ICE session for `peer` with the core and the shell; returns its cancel
    /// receiver (dropped with the session).
    fn begin_session(
        self: &Arc<Self>,
        peer: PeerId,
        agent: &Arc<Agent>,
        session: u64,
    ) -> mpsc::Receiver<()> {
        let (cancel, cancel_rx) = mpsc::channel(1);
        let old = lock(&self.ice).insert(
            peer,
            IceSession {
                id: session,
                agent: agent.clone(),
                _cancel: cancel,
                dial_cancel: None,
            },
        );
        if let Some(old) = old.filter(|o| o.id != session) {
            tokio::spawn(async move {
                let _ = old.agent.close().await;
            });
        }
        self.wire_agent_events(peer, agent, session);
        self.ice_event(peer, IceEvent::Started { session });
        cancel_rx
    }

    fn wire_agent_events(self: &Arc<Self>, peer: PeerId, agent: &Arc<Agent>, session: u64) {
        let out = self.signal_out.clone();
        let Some(to) = lock(&self.node).spec(peer).map(|s| PublicKey(s.key)) else {
            return;
        };
        agent.on_candidate(Box::new(
            move |c: Option<Arc<dyn Candidate + Send + Sync>>| {
                let out = out.clone();
                Box::pin(async move {
                    if let Some(c) = c {
                        let _ = out
                            .send((
                                to,
                                PeerMsg::Candidate {
                                    session,
                                    candidate: c.marshal(),
                                },
                            ))
                            .await;
                    }
                })
            },
        ));
        let weak = Arc::downgrade(self);
        agent.on_connection_state_change(Box::new(move |s: ConnectionState| {
            if matches!(
                s,
                ConnectionState::Failed | ConnectionState::Disconnected | ConnectionState::Closed
            ) {
                if let Some(me) = weak.upgrade() {
                    if read(&me.conns).get(&peer).is_some_and(|c| c.0 == session) {
                        info!(peer, state = %s, "ICE path lost; using the relay fallback");
                    }
                    me.ice_event(peer, IceEvent::Lost { session });
                }
            }
            Box::pin(async {})
        }));
    }

    /// Controlling side: a new ICE session with a fresh offer.
    async fn start_offer(self: Arc<Self>, peer: PeerId) {
        let Some(key) = lock(&self.node).spec(peer).map(|s| PublicKey(s.key)) else {
            return;
        };
        let agent = match self.new_agent(true).await {
            Ok(a) => a,
            Err(e) => {
                warn!(peer, error = %e, "cannot create ICE agent");
                self.ice_event(
                    peer,
                    IceEvent::Failed {
                        session: 0,
                        why: format!("cannot create an ICE agent: {e}"),
                    },
                );
                return;
            }
        };
        let session: u64 = rand::random();
        let cancel = self.begin_session(peer, &agent, session);
        // Kept with the session until the answer arrives (the dial takes it there).
        if let Some(s) = lock(&self.ice).get_mut(&peer).filter(|s| s.id == session) {
            s.dial_cancel = Some(cancel);
        }
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        debug!(peer, session, "sending ICE offer");
        let _ = self
            .signal_out
            .send((
                key,
                PeerMsg::Offer {
                    session,
                    ufrag,
                    pwd,
                },
            ))
            .await;
        tokio::spawn(self.clone().signal_reflexive(key, session));
    }

    /// Handles a message from another peer (through signal).
    pub async fn handle_signal(self: &Arc<Self>, from: PublicKey, msg: PeerMsg) {
        let (peer, controlling) = {
            let n = lock(&self.node);
            let Some(peer) = n.peer_by_key(&from.0) else {
                debug!(%from, "signal from a peer not in our map");
                return;
            };
            (peer, n.controlling(peer))
        };
        match msg {
            PeerMsg::Offer {
                session,
                ufrag,
                pwd,
            } => {
                if controlling {
                    return; // we offer to this peer, not the other way round
                }
                let agent = match self.new_agent(false).await {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(peer, error = %e, "cannot create ICE agent");
                        return;
                    }
                };
                let cancel = self.begin_session(peer, &agent, session);
                let (lu, lp) = agent.get_local_user_credentials().await;
                let _ = self
                    .signal_out
                    .send((
                        from,
                        PeerMsg::Answer {
                            session,
                            ufrag: lu,
                            pwd: lp,
                        },
                    ))
                    .await;
                if let Err(e) = agent.gather_candidates() {
                    warn!(peer, error = %e, "ICE gathering failed");
                }
                tokio::spawn(self.clone().signal_reflexive(from, session));
                let me = self.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        tern_tunnel::ICE_ATTEMPT,
                        agent.accept(cancel, ufrag, pwd),
                    )
                    .await;
                    me.ice_result(peer, &agent, session, r).await;
                });
            }
            PeerMsg::Answer {
                session,
                ufrag,
                pwd,
            } => {
                let (agent, cancel) = {
                    let mut ice = lock(&self.ice);
                    match ice.get_mut(&peer) {
                        Some(s) if s.id == session => match s.dial_cancel.take() {
                            Some(c) => (s.agent.clone(), c),
                            None => return, // a repeated answer
                        },
                        _ => return,
                    }
                };
                if let Err(e) = agent.gather_candidates() {
                    warn!(peer, error = %e, "ICE gathering failed");
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        tern_tunnel::ICE_ATTEMPT,
                        agent.dial(cancel, ufrag, pwd),
                    )
                    .await;
                    me.ice_result(peer, &agent, session, r).await;
                });
            }
            PeerMsg::Candidate { session, candidate } => {
                let Some(agent) = self.session_agent(peer, session) else {
                    return;
                };
                match unmarshal_candidate(&candidate) {
                    Ok(c) => {
                        let inside = c
                            .address()
                            .parse::<IpAddr>()
                            .is_ok_and(|ip| lock(&self.node).tunnelled(ip));
                        if inside {
                            // Reaching it would route WireGuard into its own tunnel.
                            debug!(peer, candidate = %c.address(), "ignoring a candidate inside a routed network");
                            return;
                        }
                        let c: Arc<dyn Candidate + Send + Sync> = Arc::new(c);
                        if let Err(e) = agent.add_remote_candidate(&c) {
                            debug!(peer, error = %e, "remote candidate refused");
                        }
                    }
                    Err(e) => debug!(peer, error = %e, "malformed remote candidate"),
                }
            }
        }
    }

    fn session_agent(&self, peer: PeerId, session: u64) -> Option<Arc<Agent>> {
        match lock(&self.ice).get(&peer) {
            Some(s) if s.id == session => Some(s.agent.clone()),
            _ => None,
        }
    }

    async fn ice_result(
        self: &Arc<Self>,
        peer: PeerId,
        agent: &Arc<Agent>,
        session: u64,
        r: Result<
            Result<Arc<impl Conn + Send + Sync + 'static>, webrtc_ice::Error>,
            tokio::time::error::Elapsed,
        >,
    ) {
        let conn: Arc<dyn Conn + Send + Sync> = match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(peer, error = %e, "ICE failed");
                self.ice_event(
                    peer,
                    IceEvent::Failed {
                        session,
                        why: format!("ICE checks failed: {e}"),
                    },
                );
                return;
            }
            Err(_) => {
                self.ice_event(
                    peer,
                    IceEvent::Failed {
                        session,
                        why: format!(
                            "no ICE pair within {} s",
                            tern_tunnel::ICE_ATTEMPT.as_secs()
                        ),
                    },
                );
                return;
            }
        };
        let Some(pair) = agent.get_selected_candidate_pair() else {
            self.ice_event(
                peer,
                IceEvent::Failed {
                    session,
                    why: "ICE connected without a selected pair".into(),
                },
            );
            return;
        };
        let Ok(remote_addr) = pair.remote.address().parse::<IpAddr>() else {
            self.ice_event(
                peer,
                IceEvent::Failed {
                    session,
                    why: format!("unusable remote address {}", pair.remote.address()),
                },
            );
            return;
        };
        // The remote side's relay address shows up as peer-reflexive when its checks arrive
        // before its relay candidate: an address on a TURN server is relayed all the same.
        let turn_hosts = self.turn_hosts();
        let relayed = pair.local.candidate_type() == CandidateType::Relay
            || pair.remote.candidate_type() == CandidateType::Relay
            || turn_hosts.iter().any(|h| *h == pair.remote.address());
        let path = IcePath {
            session,
            kind: if relayed {
                CorePath::TurnRelay
            } else {
                CorePath::Direct
            },
            local: format!(
                "{} {}:{}",
                candidate_kind(pair.local.candidate_type()),
                pair.local.address(),
                pair.local.port()
            ),
            remote: format!(
                "{} {}:{}",
                candidate_kind(pair.remote.candidate_type()),
                pair.remote.address(),
                pair.remote.port()
            ),
            remote_addr,
            // A pair on the shared port: WireGuard goes there directly, not through webrtc-ice.
            endpoint: (pair.local.candidate_type() != CandidateType::Relay)
                .then(|| std::net::SocketAddr::new(remote_addr, pair.remote.port())),
        };
        let (local, remote, kind) = (path.local.clone(), path.remote.clone(), path.kind);
        let direct = path.endpoint.is_some();
        // The conn is in place before the core switches to it, so no packet finds it missing.
        write(&self.conns).insert(peer, (session, conn.clone()));
        self.ice_event(peer, IceEvent::Connected(path));
        if lock(&self.node).ice_session(peer) != Some(session) {
            // Refused (stale, or its pair runs through the tunnel): StopIce removed the conn.
            info!(peer, remote = %remote, "ICE pair discarded");
            return;
        }
        info!(peer, path = ?PathKind::from(kind), %local, %remote, "ICE connected");
        if direct {
            return; // its datagrams arrive on the shared port
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; BUF];
            let mut out = vec![0u8; BUF];
            loop {
                let n = match conn.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(_) => break,
                };
                if read(&me.conns).get(&peer).is_none_or(|c| c.0 != session) {
                    break;
                }
                me.handle_wire(Some(peer), None, &buf[..n], &mut out).await;
            }
        });
    }

    /// Handles a datagram from the TCP relay.
    pub async fn handle_tcp(&self, from_peer_id: &str, data: &[u8], out: &mut [u8]) {
        let peer = lock(&self.node).peer_by_mgmt_id(from_peer_id);
        if let Some(p) = peer {
            self.handle_wire(Some(p), None, data, out).await;
        }
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        lock(&self.node)
            .status(Instant::now())
            .into_iter()
            .map(|s| PeerStatus {
                name: s.spec.name.clone(),
                id: s.spec.id.clone(),
                public_key: PublicKey(s.spec.key).to_base64(),
                overlay_ip: s.spec.overlay_ip.to_string(),
                state: if s.up { "connected" } else { "connecting" }.into(),
                connection: if s.up { s.path.into() } else { PathKind::None },
                path_reason: s.reason.clone(),
                local_candidate: s.ice.as_ref().map(|i| i.local.clone()),
                remote_candidate: s.ice.as_ref().map(|i| i.remote.clone()),
                latency_ms: s.rtt_ms.map(|r| r as f64),
                last_handshake_secs_ago: s.last_handshake.map(|d| d.as_secs()),
                bytes_rx: s.rx_bytes,
                bytes_tx: s.tx_bytes,
                allowed_ips: s.spec.allowed.iter().map(|n| n.to_string()).collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_rules_become_inbound_filter_rules() {
        let r = pb::FirewallRule {
            peer_cidr: "100.64.0.2/32".into(),
            direction: pb::Direction::In as i32,
            protocol: pb::Protocol::Tcp as i32,
            ports: vec![pb::PortRange { start: 22, end: 22 }],
            policy_id: "p".into(),
            network: "192.168.50.0/24".into(),
        };
        let rule = rule_from_map(&r).expect("rule");
        assert_eq!(rule.proto, TCP);
        assert_eq!(rule.ports, vec![(22, 22)]);
        assert_eq!(rule.network, Some("192.168.50.0/24".parse().expect("net")));
        let out = pb::FirewallRule {
            direction: pb::Direction::Out as i32,
            ..r.clone()
        };
        assert!(
            rule_from_map(&out).is_none(),
            "outbound rules are not filters here"
        );
        let bad = pb::FirewallRule {
            peer_cidr: "nonsense".into(),
            ..r
        };
        assert!(rule_from_map(&bad).is_none());
    }
}
