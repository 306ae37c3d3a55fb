//! The data path and per-peer connection management.
//!
//! - One boringtun `Tunn` per peer; packets from the TUN device are routed to a peer by
//!   destination (the peer's allowed IPs), encapsulated, and sent over the peer's current path.
//! - Paths, best first: an ICE connection (direct host/srflx/prflx pair, or a TURN relay pair),
//!   then the TCP/WebSocket relay. Until ICE connects (or while it is down) the TCP relay carries
//!   the traffic, so a tunnel comes up even where UDP is blocked; ICE is retried with capped
//!   backoff and the tunnel moves to it as soon as it connects.
//! - Decapsulated packets are accepted only if their source is in the peer's allowed IPs.

use crate::signal::PeerMsg;
use boringtun::noise::{Tunn, TunnResult};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tern_proto::management as pb;
use tern_proto::{PublicKey, SecretKey};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};
use webrtc_ice::agent::agent_config::AgentConfig;
use webrtc_ice::agent::Agent;
use webrtc_ice::candidate::{candidate_base::unmarshal_candidate, Candidate, CandidateType};
use webrtc_ice::network_type::NetworkType;
use webrtc_ice::state::ConnectionState;
use webrtc_ice::url::Url;
use webrtc_util::Conn;

/// Datagrams for the TCP relay: (recipient peer id, bytes).
pub type TcpOut = mpsc::Sender<(String, Vec<u8>)>;

/// WireGuard persistent keepalive (seconds).
pub const KEEPALIVE: u16 = 25;
/// Give up on an ICE attempt after this long and retry later.
const ICE_ATTEMPT: Duration = Duration::from_secs(20);
/// Cap of the ICE retry backoff while relayed.
const ICE_RETRY_MAX: Duration = Duration::from_secs(120);
/// Room boringtun needs around a packet (it panics on short buffers).
const OVERHEAD: usize = 148;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    TurnRelay,
    TcpRelay,
    None,
}

#[derive(Clone)]
struct IcePath {
    conn: Arc<dyn Conn + Send + Sync>,
    session: u64,
    kind: PathKind,
    local: String,
    remote: String,
    /// The remote candidate's address (a route installed later may capture it).
    remote_addr: String,
}

struct IceSession {
    id: u64,
    agent: Arc<Agent>,
    /// Dropping it cancels a pending dial/accept.
    _cancel: mpsc::Sender<()>,
}

pub struct Peer {
    pub id: String,
    pub name: String,
    pub key: PublicKey,
    pub overlay_ip: IpAddr,
    allowed: RwLock<Vec<IpNet>>,
    /// Routed networks this peer serves for us (chosen by the route selection).
    routed: RwLock<Vec<IpNet>>,
    tunn: Mutex<Tunn>,
    ice_path: RwLock<Option<IcePath>>,
    ice: Mutex<Option<IceSession>>,
    controlling: bool,
    next_retry: Mutex<(Instant, Duration)>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Last `connected` flag management reported for the peer.
    online: std::sync::atomic::AtomicBool,
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
    pub local_candidate: Option<String>,
    pub remote_candidate: Option<String>,
    pub latency_ms: Option<f64>,
    pub last_handshake_secs_ago: Option<u64>,
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    pub allowed_ips: Vec<String>,
}

pub struct Engine {
    key: SecretKey,
    tun: Arc<tun_rs::AsyncDevice>,
    overlay: RwLock<Option<IpNet>>,
    peers: RwLock<HashMap<PublicKey, Arc<Peer>>>,
    by_id: RwLock<HashMap<String, Arc<Peer>>>,
    /// Overlay address -> peer: the per-packet lookup for mesh traffic (routed networks fall back
    /// to a longest-prefix scan).
    by_ip: RwLock<HashMap<IpAddr, Arc<Peer>>>,
    relay: RwLock<pb::RelayConfig>,
    signal_out: mpsc::Sender<(PublicKey, PeerMsg)>,
    tcp_out: RwLock<Option<TcpOut>>,
    next_index: AtomicU64,
    iface: String,
    routes: Mutex<BTreeMap<String, crate::routes::RouteChoice>>,
    served: Mutex<Vec<(String, bool)>>,
    fw: Mutex<crate::firewall::Firewall>,
}

fn dst_ip(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&pkt[16..20]).ok()?)),
        6 if pkt.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&pkt[24..40]).ok()?)),
        _ => None,
    }
}

fn src_ip(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&pkt[12..16]).ok()?)),
        6 if pkt.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&pkt[8..24]).ok()?)),
        _ => None,
    }
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

impl Engine {
    pub fn new(
        key: SecretKey,
        tun: Arc<tun_rs::AsyncDevice>,
        iface: String,
        signal_out: mpsc::Sender<(PublicKey, PeerMsg)>,
    ) -> Arc<Self> {
        Arc::new(Engine {
            key,
            tun,
            overlay: RwLock::new(None),
            peers: RwLock::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
            by_ip: RwLock::new(HashMap::new()),
            relay: RwLock::new(pb::RelayConfig::default()),
            signal_out,
            tcp_out: RwLock::new(None),
            next_index: AtomicU64::new(1),
            iface,
            routes: Mutex::new(BTreeMap::new()),
            served: Mutex::new(vec![]),
            fw: Mutex::new(crate::firewall::Firewall::default()),
        })
    }

    pub fn set_tcp_out(&self, tx: Option<TcpOut>) {
        *self.tcp_out.write().unwrap_or_else(|e| e.into_inner()) = tx;
    }

    pub fn tcp_connected(&self) -> bool {
        self.tcp_out
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_closed())
    }

    fn peer_by_ip(&self, ip: IpAddr) -> Option<Arc<Peer>> {
        // A peer's own address is a full-length prefix: nothing can be more specific.
        if let Some(p) = self
            .by_ip
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
        {
            return Some(p.clone());
        }
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers
            .values()
            .filter_map(|p| {
                let best = p
                    .allowed
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .chain(p.routed.read().unwrap_or_else(|e| e.into_inner()).iter())
                    .filter(|n| n.contains(&ip))
                    .map(|n| n.prefix_len())
                    .max();
                best.map(|b| (b, p))
            })
            .max_by_key(|(b, _)| *b)
            .map(|(_, p)| p.clone())
    }

    /// Applies a network map: adds new peers, removes gone ones, updates allowed IPs and relays.
    /// Peers that stay are not disturbed.
    pub fn apply_map(self: &Arc<Self>, map: &pb::NetworkMap) {
        if let Some(relay) = &map.relay {
            *self.relay.write().unwrap_or_else(|e| e.into_inner()) = relay.clone();
        }
        if let Some(cfg) = &map.peer_config {
            *self.overlay.write().unwrap_or_else(|e| e.into_inner()) =
                cfg.overlay_range.parse().ok();
        }
        let local = map
            .peer_config
            .as_ref()
            .and_then(|c| c.address.split('/').next()?.parse().ok());
        let rules = map
            .firewall_rules
            .iter()
            .filter_map(crate::firewall::Rule::from_map)
            .collect();
        lock(&self.fw).set_rules(local, rules);
        let mut wanted = HashMap::new();
        for rp in &map.remote_peers {
            let Ok(key) = PublicKey::from_slice(&rp.wg_public_key) else {
                continue;
            };
            let allowed: Vec<IpNet> = rp
                .allowed_ips
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
            wanted.insert(key, (rp, allowed));
        }
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        let mut by_ip = self.by_ip.write().unwrap_or_else(|e| e.into_inner());
        peers.retain(|k, p| {
            let keep = wanted.contains_key(k);
            if !keep {
                info!(peer = %p.name, "peer removed from the network map");
                by_id.remove(&p.id);
                by_ip.remove(&p.overlay_ip);
                if let Some(s) = lock(&p.ice).take() {
                    tokio::spawn(async move {
                        let _ = s.agent.close().await;
                    });
                }
            }
            keep
        });
        for (key, (rp, allowed)) in wanted {
            if let Some(p) = peers.get(&key) {
                *p.allowed.write().unwrap_or_else(|e| e.into_inner()) = allowed;
                // A peer that just came online: try the direct path now rather than at the next
                // backoff step.
                if rp.connected && !p.online.swap(true, Ordering::Relaxed) {
                    let mut r = lock(&p.next_retry);
                    r.0 = Instant::now();
                    r.1 = Duration::from_secs(2);
                } else if !rp.connected {
                    p.online.store(false, Ordering::Relaxed);
                }
                continue;
            }
            let Ok(ip) = rp.overlay_ip.parse::<IpAddr>() else {
                continue;
            };
            let index = (self.next_index.fetch_add(1, Ordering::Relaxed) as u32) << 8;
            let tunn = Tunn::new(
                boringtun::x25519::StaticSecret::from(self.key.to_bytes()),
                boringtun::x25519::PublicKey::from(key.0),
                None,
                Some(KEEPALIVE),
                index,
                None,
            );
            let peer = Arc::new(Peer {
                id: rp.id.clone(),
                name: rp.name.clone(),
                key,
                overlay_ip: ip,
                allowed: RwLock::new(allowed),
                routed: RwLock::new(vec![]),
                tunn: Mutex::new(tunn),
                ice_path: RwLock::new(None),
                ice: Mutex::new(None),
                controlling: self.key.public_key() > key,
                next_retry: Mutex::new((Instant::now(), Duration::from_secs(2))),
                rx_bytes: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
                online: std::sync::atomic::AtomicBool::new(rp.connected),
            });
            info!(peer = %peer.name, ip = %ip, controlling = peer.controlling, "peer added");
            by_id.insert(peer.id.clone(), peer.clone());
            by_ip.insert(ip, peer.clone());
            peers.insert(key, peer);
        }
    }

    /// Chooses a routing peer per routed network, installs kernel routes through the TUN device
    /// (not where they would shadow a network this host is attached to), and, on a routing peer,
    /// applies forwarding/masquerade rules for the networks it serves.
    pub fn apply_routes(&self, map: &pb::NetworkMap) {
        use crate::routes;
        let connected: HashMap<String, bool> = map
            .remote_peers
            .iter()
            .map(|p| (p.id.clone(), p.connected))
            .collect();
        let mut cur = lock(&self.routes);
        let current: BTreeMap<String, String> = cur
            .iter()
            .map(|(n, c)| (n.clone(), c.peer_id.clone()))
            .collect();
        let picks = routes::select(&map.routes, &connected, &current);
        let locals = routes::local_networks(&self.iface);
        let mut next = BTreeMap::new();
        let mut per_peer: HashMap<String, Vec<IpNet>> = HashMap::new();
        for (net, pick) in picks {
            let Ok(parsed) = net.parse::<IpNet>() else {
                continue;
            };
            let (peer_id, metric, key) = match &pick {
                Some((id, m, k)) => (id.clone(), *m, PublicKey::from_slice(k).ok()),
                None => (String::new(), 0, None),
            };
            let state = if let Some(c) = routes::conflict(&parsed, &locals) {
                c
            } else if pick.is_none() {
                "no connected routing peer".to_string()
            } else {
                per_peer.entry(peer_id.clone()).or_default().push(parsed);
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
                    peer_id,
                    peer_key: key,
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
        for p in self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *p.routed.write().unwrap_or_else(|e| e.into_inner()) =
                per_peer.remove(&p.id).unwrap_or_default();
        }
        *cur = next;
        drop(cur);
        // A route installed now may capture an ICE path (its remote address inside the routed
        // network would send WireGuard through its own tunnel): drop such paths and restart ICE.
        for p in self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let captured = p
                .ice_path
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|i| self.tunnelled(&i.remote_addr));
            if captured {
                info!(peer = %p.name, "ICE path now inside a routed network; renegotiating");
                *p.ice_path.write().unwrap_or_else(|e| e.into_inner()) = None;
                if let Some(s) = lock(&p.ice).take() {
                    tokio::spawn(async move {
                        let _ = s.agent.close().await;
                    });
                }
                let mut r = lock(&p.next_retry);
                r.0 = Instant::now();
            }
        }
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

    /// True if `addr` is reached through the tunnel (overlay or a routed network).
    fn tunnelled(&self, addr: &str) -> bool {
        let Ok(ip) = addr.parse::<IpAddr>() else {
            return false;
        };
        if self
            .overlay
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|o| o.contains(&ip))
        {
            return true;
        }
        lock(&self.routes)
            .keys()
            .filter_map(|n| n.parse::<IpNet>().ok())
            .any(|n| n.contains(&ip))
    }

    /// Inbound packets the policy filter dropped.
    pub fn firewall_dropped(&self) -> u64 {
        lock(&self.fw).dropped
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

    /// Sends one WireGuard datagram to a peer over its best path.
    async fn send_wire(&self, peer: &Peer, data: &[u8]) {
        let ice = peer
            .ice_path
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(p) = ice {
            match p.conn.send(data).await {
                Ok(_) => {
                    peer.tx_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) => debug!(peer = %peer.name, error = %e, "ICE send failed"),
            }
        }
        let tcp = self
            .tcp_out
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(tx) = tcp {
            if tx.try_send((peer.id.clone(), data.to_vec())).is_ok() {
                peer.tx_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Handles a WireGuard datagram that arrived from `peer` on any path.
    pub async fn handle_wire(&self, peer: &Arc<Peer>, data: &[u8]) {
        peer.rx_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut buf = vec![0u8; data.len().max(1500) + OVERHEAD];
        let mut input: &[u8] = data;
        loop {
            let (to_net, to_tun) = {
                let mut t = lock(&peer.tunn);
                match t.decapsulate(None, input, &mut buf) {
                    TunnResult::WriteToNetwork(p) => (Some(p.to_vec()), None),
                    TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                        (None, Some(p.to_vec()))
                    }
                    TunnResult::Done => (None, None),
                    TunnResult::Err(e) => {
                        trace!(peer = %peer.name, error = ?e, "decapsulate");
                        (None, None)
                    }
                }
            };
            if let Some(pkt) = to_tun {
                let ok = src_ip(&pkt).is_some_and(|s| {
                    peer.allowed
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .chain(peer.routed.read().unwrap_or_else(|e| e.into_inner()).iter())
                        .any(|n| n.contains(&s))
                });
                if ok && !lock(&self.fw).inbound(&pkt, Instant::now()) {
                    trace!(peer = %peer.name, "dropped by policy");
                } else if ok {
                    let _ = self.tun.send(&pkt).await;
                } else {
                    trace!(peer = %peer.name, "dropping packet from outside the peer's allowed IPs");
                }
                return;
            }
            match to_net {
                Some(p) => {
                    self.send_wire(peer, &p).await;
                    input = &[]; // drain queued packets after a handshake
                }
                None => return,
            }
        }
    }

    /// Reads the TUN device forever and sends packets to their peers.
    pub async fn tun_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536];
        let mut out = vec![0u8; 65536 + OVERHEAD];
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let pkt = &buf[..n];
            let Some(dst) = dst_ip(pkt) else { continue };
            let Some(peer) = self.peer_by_ip(dst) else {
                trace!(%dst, "no peer for destination");
                continue;
            };
            lock(&self.fw).outbound(pkt, Instant::now());
            let wire = {
                let mut t = lock(&peer.tunn);
                match t.encapsulate(pkt, &mut out) {
                    TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                    _ => None,
                }
            };
            if let Some(w) = wire {
                self.send_wire(&peer, &w).await;
            }
        }
    }

    /// WireGuard timers (every 250 ms) and ICE (re)starts.
    pub async fn timer_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut buf = vec![0u8; 2048];
        loop {
            tick.tick().await;
            let peers: Vec<Arc<Peer>> = self
                .peers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for p in peers {
                let wire = {
                    let mut t = lock(&p.tunn);
                    match t.update_timers(&mut buf) {
                        TunnResult::WriteToNetwork(w) => Some(w.to_vec()),
                        _ => None,
                    }
                };
                if let Some(w) = wire {
                    self.send_wire(&p, &w).await;
                }
                if p.controlling
                    && p.ice_path
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_none()
                {
                    let due = {
                        let mut r = lock(&p.next_retry);
                        if Instant::now() >= r.0 && lock(&p.ice).is_none() {
                            let wait = r.1;
                            r.0 = Instant::now() + ICE_ATTEMPT + wait;
                            r.1 = (wait * 2).min(ICE_RETRY_MAX);
                            true
                        } else {
                            false
                        }
                    };
                    if due {
                        let me = self.clone();
                        tokio::spawn(async move { me.start_offer(p).await });
                    }
                }
            }
        }
    }

    /// Retries ICE now for every relayed peer (e.g. after a local address change).
    pub fn retry_ice_now(&self) {
        for p in self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let mut r = lock(&p.next_retry);
            r.0 = Instant::now();
            r.1 = Duration::from_secs(2);
        }
    }

    fn ice_urls(&self) -> Vec<Url> {
        let relay = self.relay.read().unwrap_or_else(|e| e.into_inner()).clone();
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

    /// Hosts of the TURN servers in the current map.
    fn turn_hosts(&self) -> Vec<String> {
        let relay = self.relay.read().unwrap_or_else(|e| e.into_inner()).clone();
        relay
            .turn
            .iter()
            .filter_map(|t| Url::parse_url(&t.url).ok())
            .map(|u| u.host)
            .collect()
    }

    async fn new_agent(self: &Arc<Self>, controlling: bool) -> anyhow::Result<Arc<Agent>> {
        let iface = self.iface.clone();
        let overlay = *self.overlay.read().unwrap_or_else(|e| e.into_inner());
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
            ip_filter: Arc::new(Some(Box::new(move |ip: IpAddr| {
                overlay.is_none_or(|o| !o.contains(&ip))
            }))),
            ..Default::default()
        };
        Ok(Arc::new(Agent::new(cfg).await?))
    }

    fn wire_agent_events(self: &Arc<Self>, peer: &Arc<Peer>, agent: &Arc<Agent>, session: u64) {
        let out = self.signal_out.clone();
        let to = peer.key;
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
        let weak_peer = Arc::downgrade(peer);
        agent.on_connection_state_change(Box::new(move |s: ConnectionState| {
            if matches!(s, ConnectionState::Failed | ConnectionState::Disconnected | ConnectionState::Closed) {
                if let Some(p) = weak_peer.upgrade() {
                    let mut path = p.ice_path.write().unwrap_or_else(|e| e.into_inner());
                    if path.as_ref().is_some_and(|x| x.session == session) {
                        info!(peer = %p.name, state = %s, "ICE path lost; using the relay fallback");
                        *path = None;
                    }
                    drop(path);
                    let mut ice = lock(&p.ice);
                    if ice.as_ref().is_some_and(|x| x.id == session) {
                        if let Some(old) = ice.take() {
                            tokio::spawn(async move {
                                let _ = old.agent.close().await;
                            });
                        }
                    }
                    let mut r = lock(&p.next_retry);
                    r.0 = r.0.min(Instant::now() + Duration::from_secs(1));
                }
            }
            Box::pin(async {})
        }));
    }

    /// Controlling side: a new ICE session with a fresh offer.
    async fn start_offer(self: Arc<Self>, peer: Arc<Peer>) {
        let agent = match self.new_agent(true).await {
            Ok(a) => a,
            Err(e) => {
                warn!(peer = %peer.name, error = %e, "cannot create ICE agent");
                return;
            }
        };
        let session: u64 = rand::random();
        self.wire_agent_events(&peer, &agent, session);
        let (cancel, _rx) = mpsc::channel(1);
        if let Some(old) = lock(&peer.ice).replace(IceSession {
            id: session,
            agent: agent.clone(),
            _cancel: cancel,
        }) {
            tokio::spawn(async move {
                let _ = old.agent.close().await;
            });
        }
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        debug!(peer = %peer.name, session, "sending ICE offer");
        let _ = self
            .signal_out
            .send((
                peer.key,
                PeerMsg::Offer {
                    session,
                    ufrag,
                    pwd,
                },
            ))
            .await;
        // Attempt timeout: the answer may never come (peer offline).
        tokio::spawn(async move {
            tokio::time::sleep(ICE_ATTEMPT).await;
            let stale = {
                let ice = lock(&peer.ice);
                ice.as_ref().is_some_and(|s| s.id == session)
                    && peer
                        .ice_path
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_none()
            };
            if stale {
                debug!(peer = %peer.name, session, "ICE attempt timed out");
                let old = lock(&peer.ice).take();
                if let Some(s) = old {
                    let _ = s.agent.close().await;
                }
            }
        });
    }

    /// Handles a message from another peer (through signal).
    pub async fn handle_signal(self: &Arc<Self>, from: PublicKey, msg: PeerMsg) {
        let Some(peer) = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&from)
            .cloned()
        else {
            debug!(%from, "signal from a peer not in our map");
            return;
        };
        match msg {
            PeerMsg::Offer {
                session,
                ufrag,
                pwd,
            } => {
                if peer.controlling {
                    return; // we offer to this peer, not the other way round
                }
                let agent = match self.new_agent(false).await {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(peer = %peer.name, error = %e, "cannot create ICE agent");
                        return;
                    }
                };
                self.wire_agent_events(&peer, &agent, session);
                let (cancel_tx, cancel_rx) = mpsc::channel(1);
                if let Some(old) = lock(&peer.ice).replace(IceSession {
                    id: session,
                    agent: agent.clone(),
                    _cancel: cancel_tx,
                }) {
                    tokio::spawn(async move {
                        let _ = old.agent.close().await;
                    });
                }
                let (lu, lp) = agent.get_local_user_credentials().await;
                let _ = self
                    .signal_out
                    .send((
                        peer.key,
                        PeerMsg::Answer {
                            session,
                            ufrag: lu,
                            pwd: lp,
                        },
                    ))
                    .await;
                if let Err(e) = agent.gather_candidates() {
                    warn!(peer = %peer.name, error = %e, "ICE gathering failed");
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(ICE_ATTEMPT, agent.accept(cancel_rx, ufrag, pwd))
                        .await;
                    me.ice_result(
                        &peer,
                        &agent,
                        session,
                        r.ok().map(|x| x.map(|c| c as Arc<dyn Conn + Send + Sync>)),
                    )
                    .await;
                });
            }
            PeerMsg::Answer {
                session,
                ufrag,
                pwd,
            } => {
                let agent = {
                    let ice = lock(&peer.ice);
                    match ice.as_ref() {
                        Some(s) if s.id == session => s.agent.clone(),
                        _ => return,
                    }
                };
                if let Err(e) = agent.gather_candidates() {
                    warn!(peer = %peer.name, error = %e, "ICE gathering failed");
                }
                let (_cancel_tx, cancel_rx) = mpsc::channel(1);
                let me = self.clone();
                tokio::spawn(async move {
                    let _keep = _cancel_tx;
                    let r =
                        tokio::time::timeout(ICE_ATTEMPT, agent.dial(cancel_rx, ufrag, pwd)).await;
                    me.ice_result(
                        &peer,
                        &agent,
                        session,
                        r.ok().map(|x| x.map(|c| c as Arc<dyn Conn + Send + Sync>)),
                    )
                    .await;
                });
            }
            PeerMsg::Candidate { session, candidate } => {
                let agent = {
                    let ice = lock(&peer.ice);
                    match ice.as_ref() {
                        Some(s) if s.id == session => s.agent.clone(),
                        _ => return,
                    }
                };
                match unmarshal_candidate(&candidate) {
                    Ok(c) if self.tunnelled(&c.address()) => {
                        // Reaching it would route WireGuard into its own tunnel.
                        debug!(peer = %peer.name, candidate = %c.address(), "ignoring a candidate inside a routed network");
                    }
                    Ok(c) => {
                        let c: Arc<dyn Candidate + Send + Sync> = Arc::new(c);
                        if let Err(e) = agent.add_remote_candidate(&c) {
                            debug!(peer = %peer.name, error = %e, "remote candidate refused");
                        }
                    }
                    Err(e) => debug!(peer = %peer.name, error = %e, "malformed remote candidate"),
                }
            }
        }
    }

    async fn ice_result(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        agent: &Arc<Agent>,
        session: u64,
        r: Option<Result<Arc<dyn Conn + Send + Sync>, webrtc_ice::Error>>,
    ) {
        let conn = match r {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                debug!(peer = %peer.name, error = %e, "ICE failed");
                return;
            }
            None => {
                debug!(peer = %peer.name, "ICE attempt timed out");
                return;
            }
        };
        let remote_addr = agent
            .get_selected_candidate_pair()
            .map(|p| p.remote.address())
            .unwrap_or_default();
        if self.tunnelled(&remote_addr) {
            // Checks reached it through our own tunnel: never carry WireGuard that way.
            info!(peer = %peer.name, remote = %remote_addr, "ICE pair runs through the tunnel itself; discarded");
            let old = lock(&peer.ice).take();
            if let Some(s) = old {
                let _ = s.agent.close().await;
            }
            return;
        }
        let (kind, local, remote) = match agent.get_selected_candidate_pair() {
            Some(p) => {
                // The local socket of a host/srflx pair carries WireGuard from now on: tune it.
                if let Some(sock) = p
                    .local
                    .get_conn()
                    .and_then(|c| c.as_any().downcast_ref::<tokio::net::UdpSocket>())
                {
                    if let Err(e) = crate::sockopt::tune_udp(sock) {
                        debug!(peer = %peer.name, error = %e, "could not tune the ICE socket");
                    }
                }
                // The remote side's relay address shows up as peer-reflexive when its checks arrive
                // before its relay candidate: an address on a TURN server is relayed all the same.
                let turn_hosts = self.turn_hosts();
                let relayed = p.local.candidate_type() == CandidateType::Relay
                    || p.remote.candidate_type() == CandidateType::Relay
                    || turn_hosts.iter().any(|h| *h == p.remote.address());
                (
                    if relayed {
                        PathKind::TurnRelay
                    } else {
                        PathKind::Direct
                    },
                    format!(
                        "{} {}:{}",
                        candidate_kind(p.local.candidate_type()),
                        p.local.address(),
                        p.local.port()
                    ),
                    format!(
                        "{} {}:{}",
                        candidate_kind(p.remote.candidate_type()),
                        p.remote.address(),
                        p.remote.port()
                    ),
                )
            }
            None => (PathKind::Direct, String::new(), String::new()),
        };
        info!(peer = %peer.name, path = ?kind, %local, %remote, "ICE connected");
        *peer.ice_path.write().unwrap_or_else(|e| e.into_inner()) = Some(IcePath {
            conn: conn.clone(),
            session,
            kind,
            local,
            remote,
            remote_addr,
        });
        {
            let mut r = lock(&peer.next_retry);
            r.1 = Duration::from_secs(2);
        }
        let me = self.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                match conn.recv(&mut buf).await {
                    Ok(n) => me.handle_wire(&peer, &buf[..n]).await,
                    Err(_) => break,
                }
                let current = peer
                    .ice_path
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|p| p.session);
                if current != Some(session) {
                    break;
                }
            }
        });
    }

    /// Handles a datagram from the TCP relay.
    pub async fn handle_tcp(&self, from_peer_id: &str, data: &[u8]) {
        let peer = self
            .by_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(from_peer_id)
            .cloned();
        if let Some(p) = peer {
            self.handle_wire(&p, data).await;
        }
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let tcp = self.tcp_connected();
        let mut out: Vec<PeerStatus> = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| {
                let (hs, _, _, _, rtt) = lock(&p.tunn).stats();
                let ice = p.ice_path.read().unwrap_or_else(|e| e.into_inner()).clone();
                let connection = match &ice {
                    Some(i) => i.kind,
                    None if tcp => PathKind::TcpRelay,
                    None => PathKind::None,
                };
                let up = hs.is_some_and(|d| d < Duration::from_secs(180));
                PeerStatus {
                    name: p.name.clone(),
                    id: p.id.clone(),
                    public_key: p.key.to_base64(),
                    overlay_ip: p.overlay_ip.to_string(),
                    state: if up { "connected" } else { "connecting" }.into(),
                    connection: if up { connection } else { PathKind::None },
                    local_candidate: ice.as_ref().map(|i| i.local.clone()),
                    remote_candidate: ice.as_ref().map(|i| i.remote.clone()),
                    latency_ms: rtt.map(|r| r as f64),
                    last_handshake_secs_ago: hs.map(|d| d.as_secs()),
                    bytes_rx: p.rx_bytes.load(Ordering::Relaxed),
                    bytes_tx: p.tx_bytes.load(Ordering::Relaxed),
                    allowed_ips: p
                        .allowed
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .map(|n| n.to_string())
                        .collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_ip_headers() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[100, 64, 0, 1]);
        v4[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(src_ip(&v4), Some("100.64.0.1".parse().expect("ip")));
        assert_eq!(dst_ip(&v4), Some("100.64.0.2".parse().expect("ip")));
        assert_eq!(dst_ip(&v4[..10]), None, "truncated");
        assert_eq!(dst_ip(&[]), None);
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(dst_ip(&v6), Some("::1".parse().expect("ip")));
    }
}
