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

mod datapath;
pub use datapath::TcpRx;
mod ice;

use crate::signal::PeerMsg;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tern_proto::management as pb;
use tern_proto::{PublicKey, SecretKey};
use tern_tunnel::{Decap, Event, IceEvent, IcePath, Node, PathKind as CorePath, PeerId};
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
use crate::platform::tun::HEADROOM;

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
    /// The same as a stable code (docs/agent.md, `tern diagnose`).
    pub path_reason_code: String,
    /// Path changes in the last 10 minutes.
    pub path_changes_10m: u32,
    /// Connected to management, as the network map says.
    pub online: bool,
    pub local_candidate: Option<String>,
    pub remote_candidate: Option<String>,
    /// Round trip of the path in use (in-tunnel probes every 5 s; before the first answer, the
    /// last WireGuard handshake's).
    pub latency_ms: Option<f64>,
    /// Probes lost on the path in use over the last minute (from 3 settled probes on).
    pub loss_pct: Option<f64>,
    /// (settled, lost) probes behind `loss_pct`.
    #[serde(skip)]
    pub probes: Option<(u32, u32)>,
    pub last_handshake_secs_ago: Option<u64>,
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    pub allowed_ips: Vec<String>,
    /// What the policies let this host send to the peer: "all", "none" (only the peer may open
    /// connections to this host), or protocols and ports ("tcp 22, 443; icmp").
    pub access: String,
    /// Packets that opened flows to the peer that no policy allows (the peer drops them).
    pub sent_without_policy: u64,
    /// Seconds since the peer entered this agent's map.
    pub in_map_secs: u64,
}

/// An ICE session run for a peer; dropping it cancels a pending dial/accept.
struct IceSession {
    agent: Arc<Agent>,
    /// Our username fragment in this session (a relayed check names it).
    ufrag: String,
    /// Stand-in addresses already made relay candidates of this session (see `crate::turn`).
    relayed: Vec<std::net::SocketAddr>,
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
    /// The map's TURN servers, their round trips, and the one ICE allocates on.
    relays: Mutex<crate::relays::RelayBook>,
    /// Wakes the relay probes when the map's TURN servers change.
    relays_changed: tokio::sync::Notify,
    signal_out: mpsc::Sender<(PublicKey, PeerMsg)>,
    tcp_out: RwLock<Option<TcpOut>>,
    /// ICE sessions under way or connected, per (peer, session): a peer on TURN keeps its
    /// connected session while an upgrade attempt runs.
    ice: Mutex<HashMap<(PeerId, u64), IceSession>>,
    /// Connected ICE connections (the per-packet lookup).
    conns: RwLock<HashMap<PeerId, (u64, IceConn)>>,
    routes: Mutex<BTreeMap<String, crate::routes::RouteChoice>>,
    served: Mutex<Vec<(IpNet, bool)>>,
    /// What the policies let this host send to each peer, by overlay address (from the map's
    /// outbound rules).
    access: Mutex<HashMap<String, String>>,
    /// When each peer's path changed (the last 10 minutes, at most 64 per peer).
    path_log: Mutex<HashMap<PeerId, std::collections::VecDeque<Instant>>>,
}

/// How far back path changes are counted.
const PATH_LOG: Duration = Duration::from_secs(600);

fn candidate_kind(t: CandidateType) -> &'static str {
    match t {
        CandidateType::Host => "host",
        CandidateType::ServerReflexive => "srflx",
        CandidateType::PeerReflexive => "prflx",
        CandidateType::Relay => "relay",
        CandidateType::Unspecified => "unknown",
    }
}

/// What the map's outbound rules let this host send to each peer (by overlay address), in words.
fn outbound_access(rules: &[pb::FirewallRule]) -> HashMap<String, String> {
    let mut by_peer: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
    for r in rules
        .iter()
        .filter(|r| r.direction == pb::Direction::Out as i32 && r.network.is_empty())
    {
        let ip = r.peer_cidr.split('/').next().unwrap_or("").to_string();
        let proto = match pb::Protocol::try_from(r.protocol) {
            Ok(pb::Protocol::Any) => "all",
            Ok(pb::Protocol::Tcp) => "tcp",
            Ok(pb::Protocol::Udp) => "udp",
            Ok(pb::Protocol::Icmp) => "icmp",
            Err(_) => continue,
        };
        let ports: Vec<(u32, u32)> = r.ports.iter().map(|p| (p.start, p.end)).collect();
        by_peer
            .entry(ip)
            .or_default()
            .insert(tern_proto::access_words(proto, &ports));
    }
    by_peer
        .into_iter()
        .map(|(ip, set)| {
            let w = if set.contains("all") {
                "all".to_string()
            } else {
                set.into_iter().collect::<Vec<_>>().join("; ")
            };
            (ip, w)
        })
        .collect()
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
            relays: Mutex::new(Default::default()),
            relays_changed: tokio::sync::Notify::new(),
            signal_out,
            tcp_out: RwLock::new(None),
            ice: Mutex::new(HashMap::new()),
            conns: RwLock::new(HashMap::new()),
            routes: Mutex::new(BTreeMap::new()),
            served: Mutex::new(vec![]),
            path_log: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
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
            let urls: Vec<String> = relay.turn.iter().map(|t| t.url.clone()).collect();
            let mut book = lock(&self.relays);
            if book.urls() != urls {
                book.set_urls(&urls);
                self.relays_changed.notify_one();
            }
        }
        *lock(&self.access) = outbound_access(&map.firewall_rules);
        {
            let mut n = lock(&self.node);
            let before: Vec<PeerId> = n.peer_ids().collect();
            tern_tunnel::map::apply(&mut n, map, Instant::now());
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
        let (offers, connected) = tern_tunnel::map::route_offers(map);
        let names: HashMap<&str, &str> = map
            .remote_peers
            .iter()
            .map(|p| (p.id.as_str(), p.name.as_str()))
            .collect();
        let keys: HashMap<&str, &[u8]> = map
            .routes
            .iter()
            .map(|r| (r.routing_peer_id.as_str(), r.routing_peer_key.as_slice()))
            .collect();
        let access: HashMap<&str, &str> = map
            .routes
            .iter()
            .map(|r| (r.network.as_str(), r.access.as_str()))
            .collect();
        let open: std::collections::HashSet<&str> = map
            .routes
            .iter()
            .filter(|r| r.open_to_groups)
            .map(|r| r.network.as_str())
            .collect();
        let mut cur = lock(&self.routes);
        let current: BTreeMap<String, String> = cur
            .iter()
            .map(|(n, c)| (n.clone(), c.peer_id.clone()))
            .collect();
        let picks = tern_tunnel::routing::select(&offers, &connected, &current);
        let locals = crate::platform::net::local_networks(&self.iface);
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
                match crate::platform::net::install(&parsed, &self.iface) {
                    Ok(()) => "installed".to_string(),
                    Err(e) => format!("kernel refused the route: {e}"),
                }
            };
            if cur.get(&net).map(|c| (&c.peer_id, &c.state)) != Some((&peer_id, &state)) {
                if access.get(net.as_str()) == Some(&"none") && state == "installed" {
                    warn!(network = %net, "no policy lets this peer use this routed network: the routing peer drops its traffic");
                }
                info!(network = %net, via = %peer_id, %state, "route");
            }
            let route_access = access.get(net.as_str()).unwrap_or(&"").to_string();
            let open_to_groups = open.contains(net.as_str());
            next.insert(
                net.clone(),
                routes::RouteChoice {
                    network: net,
                    peer_name: names.get(peer_id.as_str()).unwrap_or(&"").to_string(),
                    peer_key: keys
                        .get(peer_id.as_str())
                        .and_then(|k| PublicKey::from_slice(k).ok()),
                    peer_id,
                    metric,
                    state,
                    open_to_groups,
                    access: route_access,
                    sent_without_policy: 0,
                },
            );
        }
        for (net, old) in cur.iter() {
            if old.state == "installed" && next.get(net).is_none_or(|n| n.state != "installed") {
                if let Ok(n) = net.parse::<IpNet>() {
                    crate::platform::net::uninstall(&n, &self.iface);
                }
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
            let denied: Vec<IpNet> = assigned
                .iter()
                .filter(|(net, _)| access.get(net.to_string().as_str()) == Some(&"none"))
                .map(|(net, _)| *net)
                .collect();
            n.set_denied(denied);
        }
        self.run_events();
        // Typed before anything reaches nftables: a malformed value from the map is dropped.
        let served: Vec<(IpNet, bool)> = map
            .served_routes
            .iter()
            .filter_map(|r| match r.network.parse::<IpNet>() {
                Ok(n) => Some((n.trunc(), r.masquerade)),
                Err(_) => {
                    warn!(network = %r.network.escape_debug(), "management sent a malformed served network; ignored");
                    None
                }
            })
            .collect();
        let mut prev = lock(&self.served);
        if *prev != served {
            let overlay = map
                .peer_config
                .as_ref()
                .and_then(|c| c.overlay_range.parse::<IpNet>().ok());
            if let Err(e) = crate::platform::net::serve(&self.iface, overlay, &served) {
                warn!(error = %e, "could not apply routing-peer rules");
            }
            *prev = served;
        }
    }

    /// Networks this host reaches without the tunnel (reported to management, which checks the
    /// routes this peer should serve against them).
    pub fn reachable_networks(&self) -> Vec<String> {
        crate::platform::net::reachable_networks(&self.iface)
            .into_iter()
            .take(1024)
            .map(|n| n.to_string())
            .collect()
    }

    /// Inbound packets the policy filter dropped.
    pub fn firewall_dropped(&self) -> u64 {
        lock(&self.node).dropped().0
    }

    pub fn route_status(&self) -> Vec<crate::routes::RouteChoice> {
        let counts: Vec<(IpNet, u64)> = lock(&self.node).denied_counts().to_vec();
        lock(&self.routes)
            .values()
            .cloned()
            .map(|mut r| {
                r.sent_without_policy = counts
                    .iter()
                    .find(|(n, _)| n.to_string() == r.network)
                    .map_or(0, |(_, c)| *c);
                r
            })
            .collect()
    }

    pub fn served_status(&self) -> Vec<String> {
        lock(&self.served)
            .iter()
            .map(|(n, m)| {
                if *m {
                    format!("{n} (masquerade)")
                } else {
                    n.to_string()
                }
            })
            .collect()
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
                    {
                        let now = Instant::now();
                        let mut log = lock(&self.path_log);
                        let l = log.entry(peer).or_default();
                        l.push_back(now);
                        while l.len() > 64
                            || l.front().is_some_and(|t| now.duration_since(*t) > PATH_LOG)
                        {
                            l.pop_front();
                        }
                    }
                    let name = lock(&self.node).spec(peer).map(|s| s.name.clone());
                    info!(peer = %name.unwrap_or_default(), path = ?PathKind::from(kind), "path");
                }
            }
        }
    }

    /// The relay servers and credentials of the current network map.
    pub fn relay_config(&self) -> pb::RelayConfig {
        lock(&self.relay).clone()
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let now = Instant::now();
        let access = lock(&self.access).clone();
        let changes: HashMap<PeerId, u32> = lock(&self.path_log)
            .iter()
            .map(|(p, l)| {
                let n = l
                    .iter()
                    .filter(|t| now.duration_since(**t) <= PATH_LOG)
                    .count();
                (*p, n as u32)
            })
            .collect();
        lock(&self.node)
            .status(now)
            .into_iter()
            .map(|s| PeerStatus {
                path_reason_code: s.reason_code.to_string(),
                path_changes_10m: changes.get(&s.peer).copied().unwrap_or(0),
                online: s.spec.online,
                name: s.spec.name.clone(),
                id: s.spec.id.clone(),
                public_key: PublicKey(s.spec.key).to_base64(),
                overlay_ip: s.spec.overlay_ip.to_string(),
                state: if s.up { "connected" } else { "connecting" }.into(),
                connection: if s.up { s.path.into() } else { PathKind::None },
                path_reason: s.reason.clone(),
                local_candidate: s.ice.as_ref().map(|i| i.local.clone()),
                remote_candidate: s.ice.as_ref().map(|i| i.remote.clone()),
                latency_ms: s.rtt.map(|r| (r.as_secs_f64() * 100_000.0).round() / 100.0),
                loss_pct: s
                    .loss
                    .filter(|(settled, _)| *settled >= 3)
                    .map(|(settled, lost)| {
                        (f64::from(lost) * 1000.0 / f64::from(settled)).round() / 10.0
                    }),
                probes: s.loss,
                last_handshake_secs_ago: s.last_handshake.map(|d| d.as_secs()),
                bytes_rx: s.rx_bytes,
                bytes_tx: s.tx_bytes,
                allowed_ips: s.spec.allowed.iter().map(|n| n.to_string()).collect(),
                access: access
                    .get(&s.spec.overlay_ip.to_string())
                    .cloned()
                    .unwrap_or_else(|| "none".into()),
                sent_without_policy: s.sent_without_policy,
                in_map_secs: s.known_for.as_secs(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_rules_say_what_this_host_may_send_to_each_peer() {
        let rule = |ip: &str, proto: pb::Protocol, ports: &[(u32, u32)]| pb::FirewallRule {
            peer_cidr: format!("{ip}/32"),
            direction: pb::Direction::Out as i32,
            protocol: proto as i32,
            ports: ports
                .iter()
                .map(|(start, end)| pb::PortRange {
                    start: *start,
                    end: *end,
                })
                .collect(),
            policy_id: "p".into(),
            network: String::new(),
        };
        let mut inbound = rule("100.64.0.9", pb::Protocol::Any, &[]);
        inbound.direction = pb::Direction::In as i32;
        let a = outbound_access(&[
            rule("100.64.0.2", pb::Protocol::Tcp, &[(22, 22), (8000, 8080)]),
            rule("100.64.0.2", pb::Protocol::Icmp, &[]),
            rule("100.64.0.3", pb::Protocol::Tcp, &[(22, 22)]),
            rule("100.64.0.3", pb::Protocol::Any, &[]),
            inbound,
        ]);
        assert_eq!(a["100.64.0.2"], "icmp; tcp 22, 8000-8080");
        assert_eq!(a["100.64.0.3"], "all");
        assert!(
            !a.contains_key("100.64.0.9"),
            "inbound rules say nothing about sending"
        );
    }
}
