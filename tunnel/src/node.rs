//! [`Node`]: the agent's data plane without I/O. It owns the peers and their WireGuard sessions
//! (boringtun `Tunn`), the allowed-IPs trie (each peer's overlay address plus the routed networks
//! it serves for us), the policy filter, and per peer the path in use (an ICE pair, direct or via
//! TURN, else the TCP relay) with the reason, and the schedule of ICE attempts.
//!
//! The shell (the `tern` binary) reads packets and datagrams, calls [`Node::encapsulate`] and
//! [`Node::decapsulate`] with its own buffers, sends what [`Node::poll_transmit`] yields, runs the
//! ICE sessions [`Node::poll_event`] asks for and reports their outcome with
//! [`Node::handle_ice_event`]. Time comes in as `now`; nothing here blocks, locks or allocates per
//! packet (boringtun queues packets in its own buffers only while a handshake is under way).

use crate::allowed_ips::AllowedIps;
use crate::backoff::Backoff;
use crate::firewall::{Firewall, Rule};
use crate::probe::{self, Probes};
use crate::reach::{relay_cause, Reach};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// A peer's handle inside one [`Node`] (also its WireGuard session index, below 2^24).
pub type PeerId = u32;

/// WireGuard persistent keepalive (seconds).
pub const KEEPALIVE: u16 = 25;
/// An ICE attempt with no connected pair by then has failed.
pub const ICE_ATTEMPT: Duration = Duration::from_secs(20);
/// First delay before retrying ICE; doubles per failure up to [`ICE_RETRY_MAX`].
pub const ICE_RETRY_MIN: Duration = Duration::from_secs(2);
pub const ICE_RETRY_MAX: Duration = Duration::from_secs(120);
/// After an ICE path is lost, the next attempt starts this soon.
const ICE_RETRY_AFTER_LOSS: Duration = Duration::from_secs(1);
/// A path through TURN is tried for a direct upgrade this long after it settles, then with a
/// delay doubling up to [`UPGRADE_MAX`] while the attempts find no direct pair (the TURN path
/// carries traffic meanwhile).
pub const UPGRADE_MIN: Duration = Duration::from_secs(15);
pub const UPGRADE_MAX: Duration = Duration::from_secs(600);
/// How long a measurement of this host's reachability stands (the host's addresses changing
/// ends it sooner).
pub const REACH_FRESH: Duration = Duration::from_secs(300);
/// A session whose last handshake is older than this is not up (WireGuard's reject-after-time).
const SESSION_UP: Duration = Duration::from_secs(180);
/// Smallest buffer boringtun may write into (a handshake initiation), and its data overhead.
pub const MIN_BUF: usize = 148;
pub const DATA_OVERHEAD: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an IP packet")]
    NotIp,
    #[error("no peer for destination {0}")]
    NoRoute(IpAddr),
    #[error("unknown peer")]
    UnknownPeer,
    #[error("output buffer too small")]
    BufferTooSmall,
    #[error("source {0} is not among the sending peer's addresses")]
    NotAllowed(IpAddr),
    #[error("dropped by policy")]
    Policy,
    #[error("WireGuard: {0:?}")]
    WireGuard(WireGuardError),
}

/// A remote peer as the network map describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// WireGuard public key.
    pub key: [u8; 32],
    /// Management's id for the peer.
    pub id: String,
    pub name: String,
    pub overlay_ip: IpAddr,
    /// The peer's own addresses (its overlay /32 or /128).
    pub allowed: Vec<IpNet>,
    /// The peer has a live connection to management.
    pub online: bool,
    /// A plain WireGuard device the server hosts: no ICE, always the TCP relay.
    pub relay_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// An ICE pair without a relay (host, server- or peer-reflexive addresses).
    Direct,
    /// An ICE pair through a TURN relay.
    TurnRelay,
    /// The TCP/TLS relay (no ICE pair, or ICE not yet connected).
    TcpRelay,
    None,
}

/// A connected ICE pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcePath {
    pub session: u64,
    /// [`PathKind::Direct`] or [`PathKind::TurnRelay`].
    pub kind: PathKind,
    /// e.g. "host 192.0.2.2:40000".
    pub local: String,
    pub remote: String,
    /// The remote candidate's address (must not be reached through the tunnel itself).
    pub remote_addr: IpAddr,
    /// A direct pair on the agent's shared socket: WireGuard goes to this address (and follows
    /// the peer when its address changes). None: through the ICE connection (TURN).
    pub endpoint: Option<SocketAddr>,
}

/// What the shell reports about the ICE session of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IceEvent {
    /// An attempt started: this side sent an offer, or answered the peer's offer.
    Started {
        session: u64,
    },
    Connected(IcePath),
    /// The attempt ended without a pair.
    Failed {
        session: u64,
        why: String,
    },
    /// A connected pair stopped working (consent lost, peer gone).
    Lost {
        session: u64,
    },
}

/// What the core asks of the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Start an ICE attempt with this peer (this side offers).
    StartIce { peer: PeerId },
    /// Close this ICE session (superseded, failed, or its pair runs through the tunnel).
    StopIce { peer: PeerId, session: u64 },
    /// The path to a peer changed.
    PathChanged { peer: PeerId, kind: PathKind },
}

/// A datagram to send to `peer` over `path` (to `to` on the shared socket, when set).
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    pub peer: PeerId,
    pub path: PathKind,
    pub to: Option<SocketAddr>,
    pub payload: &'a [u8],
}

/// What a datagram from the network turned into.
#[derive(Debug, PartialEq, Eq)]
pub enum Decap<'a> {
    /// An IP packet for the TUN device (allowed by cryptokey routing and policy).
    Tunnel(&'a [u8]),
    /// A handshake message to send back; then drain [`Node::poll_transmit`] (queued packets).
    Network(Transmit<'a>),
    /// Nothing to do (a keepalive, a duplicate).
    Nothing,
}

/// Everything `tern status` shows about one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub peer: PeerId,
    pub spec: PeerSpec,
    /// A session with a handshake in the last 180 s.
    pub up: bool,
    pub path: PathKind,
    /// Why the path is what it is, in words.
    pub reason: String,
    /// The same as a stable code (`direct`, `ice_no_direct_pair`, `ice_failed`, ...).
    pub reason_code: &'static str,
    pub ice: Option<IcePath>,
    pub last_handshake: Option<Duration>,
    /// Round trip of the path in use (in-tunnel probes), else of the last WireGuard handshake.
    pub rtt: Option<Duration>,
    /// Probes over the last minute on the path in use: (settled, lost); None before the first
    /// answer.
    pub loss: Option<(u32, u32)>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub routed: Vec<IpNet>,
    /// Packets that opened flows to the peer that no policy allows (the peer drops them).
    pub sent_without_policy: u64,
    /// How long the peer has been in the map.
    pub known_for: Duration,
}

struct Peer {
    spec: PeerSpec,
    tunn: Tunn,
    /// This side offers (the greater public key does).
    controlling: bool,
    ice: Option<IcePath>,
    /// The ICE attempt under way: (session, started).
    attempt: Option<(u64, Instant)>,
    retry: Backoff,
    /// When to try a direct path while the current one runs through TURN.
    upgrade: Backoff,
    failures: u32,
    last_failure: Option<String>,
    reported: PathKind,
    rx_bytes: u64,
    tx_bytes: u64,
    probes: Probes,
    /// Packets that opened flows to the peer no outbound rule allows (its filter drops them).
    sent_without_policy: u64,
    /// When the peer entered the map (a first handshake takes a moment after that).
    added: Instant,
    /// What the peer reported of its reachability at its last ICE session.
    reach: Option<Reach>,
}

pub struct Node {
    secret: x25519::StaticSecret,
    public: [u8; 32],
    peers: HashMap<PeerId, Peer>,
    by_key: HashMap<[u8; 32], PeerId>,
    by_mgmt_id: HashMap<String, PeerId>,
    next_id: PeerId,
    allowed: AllowedIps<PeerId>,
    /// Routed networks and the peer that serves each for us.
    routed: Vec<(IpNet, PeerId)>,
    /// Routed networks no policy lets this host use, and the packets sent into each anyway (the
    /// routing peer drops them; counted here too, so the sender can see it).
    denied: Vec<(IpNet, u64)>,
    overlay: Option<IpNet>,
    firewall: Firewall,
    tcp_relay_up: bool,
    /// This host's own reachability (measured by the shell; None until it was), and when.
    reach: Option<Reach>,
    reach_at: Option<Instant>,
    events: VecDeque<Event>,
    /// Peers whose queued packets are due after a handshake.
    flush: Vec<PeerId>,
    /// Peers whose WireGuard timers are due.
    timers: Vec<PeerId>,
    /// Peers a path probe is due for, and when that was decided (the last tick).
    probes_due: Vec<PeerId>,
    tick: Option<Instant>,
    /// This host's overlay address (IPv4: probes are IPv4).
    local_v4: Option<Ipv4Addr>,
    dropped_not_allowed: u64,
}

/// Who sent a WireGuard datagram to the holder of `secret`: the static key inside a handshake
/// initiation (after the key work that reveals it), or the receiver's session index (24 bits, as
/// boringtun assigns them) of any other message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Key([u8; 32]),
    Index(u32),
}

pub fn sender_of(
    packet: Packet<'_>,
    secret: &x25519::StaticSecret,
    public: &x25519::PublicKey,
) -> Option<Sender> {
    Some(match packet {
        Packet::HandshakeInit(init) => Sender::Key(
            parse_handshake_anon(secret, public, &init)
                .ok()?
                .peer_static_public,
        ),
        Packet::HandshakeResponse(r) => Sender::Index(r.receiver_idx >> 8),
        Packet::PacketCookieReply(c) => Sender::Index(c.receiver_idx >> 8),
        Packet::PacketData(d) => Sender::Index(d.receiver_idx >> 8),
    })
}

/// Offset and length of `part` inside the buffer starting at `base` (boringtun returns
/// sub-slices of our buffer).
fn span(base: usize, part: &[u8]) -> (usize, usize) {
    ((part.as_ptr() as usize).saturating_sub(base), part.len())
}

impl Node {
    pub fn new(secret: [u8; 32]) -> Node {
        let secret = x25519::StaticSecret::from(secret);
        let public = x25519::PublicKey::from(&secret).to_bytes();
        Node {
            secret,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            by_mgmt_id: HashMap::new(),
            next_id: 1,
            allowed: AllowedIps::default(),
            routed: vec![],
            denied: vec![],
            overlay: None,
            firewall: Firewall::default(),
            tcp_relay_up: false,
            reach: None,
            reach_at: None,
            events: VecDeque::new(),
            flush: vec![],
            timers: vec![],
            probes_due: vec![],
            tick: None,
            local_v4: None,
            dropped_not_allowed: 0,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The overlay range: addresses inside it are never reached through an ICE pair.
    pub fn set_overlay(&mut self, overlay: Option<IpNet>) {
        self.overlay = overlay;
    }

    pub fn overlay(&self) -> Option<IpNet> {
        self.overlay
    }

    /// What the peers' filters let this host open (the map's outbound rules; `src` is the peer).
    pub fn set_out_rules(&mut self, rules: Vec<Rule>) {
        self.firewall.set_out_rules(rules);
    }

    /// The policy filter's rules and this host's overlay address.
    pub fn set_rules(&mut self, local: Option<IpAddr>, rules: Vec<Rule>) {
        self.local_v4 = match local {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        self.firewall.set_rules(local, rules);
    }

    /// Whether the TCP relay is connected (the fallback path).
    pub fn set_tcp_relay(&mut self, up: bool) {
        if self.tcp_relay_up != up {
            self.tcp_relay_up = up;
            self.report_paths();
        }
    }

    fn new_id(&mut self) -> PeerId {
        // Session indexes are 24 bits (boringtun shifts them by 8): reuse freed ids after a wrap.
        loop {
            let id = self.next_id;
            self.next_id = (self.next_id % 0x00ff_ffff) + 1;
            if !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    /// Brings the peer table in line with the network map: new peers get a session, gone ones
    /// lose theirs (and their ICE session), the others keep their sessions and paths untouched.
    pub fn apply_peers(&mut self, specs: &[PeerSpec], now: Instant) {
        let wanted: HashMap<[u8; 32], &PeerSpec> = specs.iter().map(|s| (s.key, s)).collect();
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| !wanted.contains_key(&p.spec.key))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                self.by_key.remove(&p.spec.key);
                self.by_mgmt_id.remove(&p.spec.id);
                for s in p
                    .attempt
                    .map(|a| a.0)
                    .into_iter()
                    .chain(p.ice.map(|i| i.session))
                {
                    self.events.push_back(Event::StopIce {
                        peer: id,
                        session: s,
                    });
                }
            }
        }
        for spec in specs {
            if let Some(&id) = self.by_key.get(&spec.key) {
                let Some(p) = self.peers.get_mut(&id) else {
                    continue;
                };
                // A peer that just came online: try the direct path now, not at the next step.
                if spec.online && !p.spec.online {
                    p.retry.retry_by(now);
                }
                if p.spec.id != spec.id {
                    self.by_mgmt_id.remove(&p.spec.id);
                    self.by_mgmt_id.insert(spec.id.clone(), id);
                }
                p.spec = spec.clone();
                continue;
            }
            let id = self.new_id();
            let tunn = Tunn::new(
                self.secret.clone(),
                x25519::PublicKey::from(spec.key),
                None,
                Some(KEEPALIVE),
                id,
                None,
            );
            self.peers.insert(
                id,
                Peer {
                    spec: spec.clone(),
                    tunn,
                    controlling: self.public > spec.key,
                    ice: None,
                    attempt: None,
                    retry: Backoff::new(ICE_RETRY_MIN, ICE_RETRY_MAX, now),
                    upgrade: Backoff::new(UPGRADE_MIN, UPGRADE_MAX, now),
                    failures: 0,
                    last_failure: None,
                    reported: PathKind::None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    probes: Probes::default(),
                    sent_without_policy: 0,
                    added: now,
                    reach: None,
                },
            );
            self.by_key.insert(spec.key, id);
            self.by_mgmt_id.insert(spec.id.clone(), id);
        }
        self.routed.retain(|(_, id)| self.peers.contains_key(id));
        self.rebuild_allowed();
    }

    /// The routed networks and the peer that serves each for us (from routing-peer selection).
    /// An ICE pair whose remote address falls inside one would carry WireGuard through its own
    /// tunnel: it is dropped and ICE retried.
    pub fn set_routes(&mut self, routes: Vec<(IpNet, PeerId)>, now: Instant) {
        self.routed = routes
            .into_iter()
            .filter(|(_, id)| self.peers.contains_key(id))
            .collect();
        self.rebuild_allowed();
        let captured: Vec<(PeerId, u64)> = self
            .peers
            .iter()
            .filter_map(|(id, p)| {
                let i = p.ice.as_ref()?;
                self.tunnelled(i.remote_addr).then_some((*id, i.session))
            })
            .collect();
        for (id, session) in captured {
            if let Some(p) = self.peers.get_mut(&id) {
                p.ice = None;
                p.last_failure = Some("the ICE pair ran through a routed network".into());
                p.retry.retry_by(now);
            }
            self.events.push_back(Event::StopIce { peer: id, session });
        }
        self.report_paths();
    }

    /// The routed networks no policy lets this host use (counters of networks that stay are kept).
    pub fn set_denied(&mut self, nets: Vec<IpNet>) {
        let old = std::mem::take(&mut self.denied);
        self.denied = nets
            .into_iter()
            .map(|n| {
                let kept = old.iter().find(|(o, _)| *o == n).map_or(0, |(_, c)| *c);
                (n, kept)
            })
            .collect();
    }

    /// Packets sent into each routed network that no policy lets this host use.
    pub fn denied_counts(&self) -> &[(IpNet, u64)] {
        &self.denied
    }

    fn rebuild_allowed(&mut self) {
        let mut a = AllowedIps::default();
        for (id, p) in &self.peers {
            for n in &p.spec.allowed {
                a.insert(*n, *id);
            }
        }
        for (n, id) in &self.routed {
            a.insert(*n, *id);
        }
        self.allowed = a;
    }

    /// True if `addr` is reached through the tunnel (the overlay or a routed network).
    pub fn tunnelled(&self, addr: IpAddr) -> bool {
        self.overlay.is_some_and(|o| o.contains(&addr))
            || self.routed.iter().any(|(n, _)| n.contains(&addr))
    }

    pub fn peer_by_key(&self, key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    pub fn peer_by_mgmt_id(&self, id: &str) -> Option<PeerId> {
        self.by_mgmt_id.get(id).copied()
    }

    pub fn spec(&self, peer: PeerId) -> Option<&PeerSpec> {
        self.peers.get(&peer).map(|p| &p.spec)
    }

    pub fn controlling(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.controlling)
    }

    /// The session of the peer's ICE attempt or connected pair.
    pub fn ice_session(&self, peer: PeerId) -> Option<u64> {
        let p = self.peers.get(&peer)?;
        p.attempt
            .map(|a| a.0)
            .or_else(|| p.ice.as_ref().map(|i| i.session))
    }

    fn path_of(p: &Peer, tcp_relay_up: bool) -> PathKind {
        match &p.ice {
            Some(i) => i.kind,
            None if tcp_relay_up => PathKind::TcpRelay,
            None => PathKind::None,
        }
    }

    fn endpoint_of(p: &Peer) -> Option<SocketAddr> {
        p.ice.as_ref().and_then(|i| i.endpoint)
    }

    /// `out[off..off + n]`, WireGuard's datagram to `p`, counted as sent, with its path.
    fn outgoing<'o>(
        id: PeerId,
        p: &mut Peer,
        tcp: bool,
        out: &'o [u8],
        off: usize,
        n: usize,
    ) -> Transmit<'o> {
        p.tx_bytes += n as u64;
        Transmit {
            peer: id,
            path: Self::path_of(p, tcp),
            to: Self::endpoint_of(p),
            payload: &out[off..off + n],
        }
    }

    /// The peer a WireGuard datagram from the shared socket belongs to: by our session index
    /// (responses, cookies, data), or by the static key inside a handshake initiation.
    pub fn peer_for_datagram(&self, datagram: &[u8]) -> Option<PeerId> {
        let packet = Tunn::parse_incoming_packet(datagram).ok()?;
        let public = x25519::PublicKey::from(self.public);
        match sender_of(packet, &self.secret, &public)? {
            Sender::Key(k) => self.by_key.get(&k).copied(),
            Sender::Index(i) => self.known(i),
        }
    }

    fn known(&self, id: PeerId) -> Option<PeerId> {
        self.peers.contains_key(&id).then_some(id)
    }

    /// A datagram that arrived on the shared socket from `from`: finds its peer, and once it
    /// authenticates, follows the peer's direct path to that address (NAT rebinding, roaming).
    pub fn decapsulate_from<'o>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &'o mut [u8],
    ) -> Result<Decap<'o>, Error> {
        let peer = self.peer_for_datagram(datagram).ok_or(Error::UnknownPeer)?;
        let r = self.decapsulate(peer, datagram, now, out)?;
        if let Some(i) = self.peers.get_mut(&peer).and_then(|p| p.ice.as_mut()) {
            if i.endpoint.is_some_and(|e| e != from) {
                i.endpoint = Some(from);
            }
        }
        Ok(match r {
            Decap::Network(t) => Decap::Network(Transmit {
                to: self.peers.get(&peer).and_then(Self::endpoint_of),
                ..t
            }),
            other => other,
        })
    }

    fn report_paths(&mut self) {
        for (id, p) in self.peers.iter_mut() {
            let k = Self::path_of(p, self.tcp_relay_up);
            if k != p.reported {
                p.reported = k;
                p.probes.reset();
                self.events
                    .push_back(Event::PathChanged { peer: *id, kind: k });
            }
        }
    }

    /// An IP packet from the TUN device: the datagram for the peer that owns its destination.
    pub fn encapsulate<'o>(
        &mut self,
        packet: &[u8],
        now: Instant,
        out: &'o mut [u8],
    ) -> Result<Option<Transmit<'o>>, Error> {
        let dst = crate::packet::dst(packet).ok_or(Error::NotIp)?;
        let id = *self.allowed.get(dst).ok_or(Error::NoRoute(dst))?;
        if let Some((_, c)) = self.denied.iter_mut().find(|(n, _)| n.contains(&dst)) {
            *c += 1;
        }
        if out.len() < (packet.len() + DATA_OVERHEAD).max(MIN_BUF) {
            return Err(Error::BufferTooSmall);
        }
        let to_peer = self.overlay.is_some_and(|o| o.contains(&dst));
        let allowed = self.firewall.outbound(packet, now, to_peer);
        let tcp = self.tcp_relay_up;
        let p = self.peers.get_mut(&id).ok_or(Error::UnknownPeer)?;
        if !allowed {
            p.sent_without_policy += 1;
        }
        let base = out.as_ptr() as usize;
        let (off, n) = match p.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(w) => span(base, w),
            TunnResult::Err(e) => return Err(Error::WireGuard(e)),
            _ => return Ok(None),
        };
        Ok(Some(Self::outgoing(id, p, tcp, out, off, n)))
    }

    /// A datagram from `peer` (the path it arrived on names the peer): an IP packet for the TUN
    /// device if its source belongs to that peer and the policy lets it in, or a handshake reply.
    pub fn decapsulate<'o>(
        &mut self,
        peer: PeerId,
        datagram: &[u8],
        now: Instant,
        out: &'o mut [u8],
    ) -> Result<Decap<'o>, Error> {
        if out.len() < datagram.len().max(MIN_BUF) {
            return Err(Error::BufferTooSmall);
        }
        let tcp = self.tcp_relay_up;
        let p = self.peers.get_mut(&peer).ok_or(Error::UnknownPeer)?;
        p.rx_bytes += datagram.len() as u64;
        let base = out.as_ptr() as usize;
        let (off, n, src) = match p.tunn.decapsulate(None, datagram, out) {
            TunnResult::WriteToNetwork(w) => {
                let (off, n) = span(base, w);
                let path = Self::path_of(p, tcp);
                let to = Self::endpoint_of(p);
                if !self.flush.contains(&peer) {
                    self.flush.push(peer);
                }
                return Ok(Decap::Network(Transmit {
                    peer,
                    path,
                    to,
                    payload: &out[off..off + n],
                }));
            }
            TunnResult::WriteToTunnelV4(w, src) => {
                let (off, n) = span(base, w);
                (off, n, IpAddr::V4(src))
            }
            TunnResult::WriteToTunnelV6(w, src) => {
                let (off, n) = span(base, w);
                (off, n, IpAddr::V6(src))
            }
            TunnResult::Done => return Ok(Decap::Nothing),
            TunnResult::Err(e) => return Err(Error::WireGuard(e)),
        };
        // Cryptokey routing: the inner source must be an address this peer owns.
        if self.allowed.get(src) != Some(&peer) {
            self.dropped_not_allowed += 1;
            return Err(Error::NotAllowed(src));
        }
        if let Some((reply, seq, psrc, pdst)) = probe::parse(&out[off..off + n]) {
            if Some(pdst) != self.local_v4 {
                return Err(Error::Policy);
            }
            if reply {
                p.probes.answered(seq, now);
                return Ok(Decap::Nothing);
            }
            let mut answer = [0u8; probe::LEN];
            probe::build(&mut answer, pdst, psrc, true, seq);
            let base = out.as_ptr() as usize;
            return match p.tunn.encapsulate(&answer, out) {
                TunnResult::WriteToNetwork(w) => {
                    let (off, n) = span(base, w);
                    Ok(Decap::Network(Self::outgoing(peer, p, tcp, out, off, n)))
                }
                _ => Ok(Decap::Nothing),
            };
        }
        let pkt = &out[off..off + n];
        let allowed = &self.allowed;
        if !self
            .firewall
            .inbound(pkt, now, |ip| allowed.get(ip) == Some(&peer))
        {
            return Err(Error::Policy);
        }
        Ok(Decap::Tunnel(pkt))
    }

    /// Work due at `now`: ICE attempts to start or give up, and WireGuard timers (handshakes,
    /// keepalives) whose datagrams [`Node::poll_transmit`] then yields. Call it at least every
    /// 250 ms (boringtun's timer resolution).
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut failed = vec![];
        for (id, p) in self.peers.iter_mut() {
            if let Some((session, started)) = p.attempt {
                if now >= started + ICE_ATTEMPT {
                    failed.push((*id, session));
                }
            }
            if p.controlling
                && !p.spec.relay_only
                && p.ice.is_none()
                && p.attempt.is_none()
                && p.spec.online
                && p.retry.is_due(now)
            {
                // Not again until the shell reports the attempt (or it times out).
                p.retry.hold_until(now + ICE_ATTEMPT);
                self.events.push_back(Event::StartIce { peer: *id });
            }
            // Relayed: look for a direct pair now and then, keeping the TURN path meanwhile.
            if p.controlling
                && p.ice
                    .as_ref()
                    .is_some_and(|i| i.kind == PathKind::TurnRelay)
                && p.attempt.is_none()
                && p.spec.online
                && p.upgrade.is_due(now)
            {
                p.upgrade.hold_until(now + ICE_ATTEMPT);
                self.events.push_back(Event::StartIce { peer: *id });
            }
        }
        for (id, session) in failed {
            self.handle_ice_event(
                id,
                IceEvent::Failed {
                    session,
                    why: format!("no ICE pair within {} s", ICE_ATTEMPT.as_secs()),
                },
                now,
            );
        }
        self.timers.clear();
        self.timers.extend(self.peers.keys().copied());
        self.tick = Some(now);
        if self.local_v4.is_some() {
            self.probes_due.clear();
            self.probes_due
                .extend(self.peers.iter().filter_map(|(id, p)| {
                    let up = p
                        .tunn
                        .time_since_last_handshake()
                        .is_some_and(|d| d < SESSION_UP);
                    (up && p.spec.overlay_ip.is_ipv4() && p.probes.due(now)).then_some(*id)
                }));
        }
    }

    /// The next instant [`Node::handle_timeout`] has work for (besides the 250 ms tick).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| match p.attempt {
                Some((_, started)) => Some(started + ICE_ATTEMPT),
                None if p.controlling && !p.spec.relay_only && p.ice.is_none() && p.spec.online => {
                    Some(p.retry.due_at())
                }
                None if p.controlling
                    && p.spec.online
                    && p.ice
                        .as_ref()
                        .is_some_and(|i| i.kind == PathKind::TurnRelay) =>
                {
                    Some(p.upgrade.due_at())
                }
                None => None,
            })
            .min()
    }

    /// The next datagram to send: packets queued during a handshake, then timer messages.
    pub fn poll_transmit<'o>(&mut self, out: &'o mut [u8]) -> Option<Transmit<'o>> {
        if out.len() < MIN_BUF {
            return None;
        }
        let tcp = self.tcp_relay_up;
        while let Some(&id) = self.flush.last() {
            let Some(p) = self.peers.get_mut(&id) else {
                self.flush.pop();
                continue;
            };
            let base = out.as_ptr() as usize;
            let (off, n) = match p.tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(w) => span(base, w),
                _ => {
                    self.flush.pop();
                    continue;
                }
            };
            return Some(Self::outgoing(id, p, tcp, out, off, n));
        }
        while let Some(id) = self.timers.pop() {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let base = out.as_ptr() as usize;
            let (off, n) = match p.tunn.update_timers(out) {
                TunnResult::WriteToNetwork(w) => span(base, w),
                _ => continue,
            };
            return Some(Self::outgoing(id, p, tcp, out, off, n));
        }
        while let Some(id) = self.probes_due.pop() {
            let (Some(local), Some(now)) = (self.local_v4, self.tick) else {
                break;
            };
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let IpAddr::V4(remote) = p.spec.overlay_ip else {
                continue;
            };
            let mut req = [0u8; probe::LEN];
            probe::build(&mut req, local, remote, false, p.probes.sent(now));
            let base = out.as_ptr() as usize;
            let (off, n) = match p.tunn.encapsulate(&req, out) {
                TunnResult::WriteToNetwork(w) => span(base, w),
                _ => continue,
            };
            return Some(Self::outgoing(id, p, tcp, out, off, n));
        }
        None
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The outcome of an ICE session, as the shell saw it.
    pub fn handle_ice_event(&mut self, peer: PeerId, ev: IceEvent, now: Instant) {
        let tunnelled = match &ev {
            IceEvent::Connected(i) => self.tunnelled(i.remote_addr),
            _ => false,
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            if let IceEvent::Started { session } | IceEvent::Connected(IcePath { session, .. }) = ev
            {
                self.events.push_back(Event::StopIce { peer, session });
            }
            return;
        };
        match ev {
            IceEvent::Started { session } => {
                // A new attempt replaces an older attempt. A TURN pair keeps carrying traffic
                // until the new one connects (an upgrade); a direct pair goes (the controlling
                // side starts again only when it lost it).
                let keep = p
                    .ice
                    .as_ref()
                    .is_some_and(|i| i.kind == PathKind::TurnRelay);
                let old = p
                    .attempt
                    .replace((session, now))
                    .map(|a| a.0)
                    .into_iter()
                    .chain(if keep {
                        None
                    } else {
                        p.ice.take().map(|i| i.session)
                    })
                    .filter(|s| *s != session);
                for s in old {
                    self.events.push_back(Event::StopIce { peer, session: s });
                }
            }
            IceEvent::Connected(path) => {
                let session = path.session;
                if p.attempt.map(|a| a.0) != Some(session) {
                    // Stale: a newer attempt replaced it.
                    self.events.push_back(Event::StopIce { peer, session });
                } else if tunnelled {
                    p.attempt = None;
                    p.failures += 1;
                    p.last_failure = Some(format!(
                        "the only ICE pair ({}) ran through the tunnel itself",
                        path.remote
                    ));
                    p.retry.failed(now);
                    self.events.push_back(Event::StopIce { peer, session });
                } else if path.kind == PathKind::TurnRelay
                    && p.ice
                        .as_ref()
                        .is_some_and(|i| i.kind == PathKind::TurnRelay)
                {
                    // An upgrade attempt found TURN again: keep the path in use, try later.
                    p.attempt = None;
                    p.upgrade.failed(now);
                    self.events.push_back(Event::StopIce { peer, session });
                } else {
                    p.attempt = None;
                    p.failures = 0;
                    p.last_failure = None;
                    p.retry.succeeded();
                    if path.kind == PathKind::TurnRelay {
                        p.upgrade = Backoff::new(UPGRADE_MIN, UPGRADE_MAX, now);
                        p.upgrade.failed(now);
                    }
                    if let Some(old) = p.ice.replace(path) {
                        if old.session != session {
                            self.events.push_back(Event::StopIce {
                                peer,
                                session: old.session,
                            });
                        }
                    }
                }
            }
            IceEvent::Failed { session, why } => {
                if p.attempt.map(|a| a.0) == Some(session) {
                    p.attempt = None;
                    if p.ice.is_some() {
                        // An upgrade attempt: the path in use stays; try again later.
                        p.upgrade.failed(now);
                    } else {
                        p.failures += 1;
                        p.last_failure = Some(why);
                        p.retry.failed(now);
                    }
                    self.events.push_back(Event::StopIce { peer, session });
                }
            }
            IceEvent::Lost { session } => {
                if p.ice.as_ref().is_some_and(|i| i.session == session) && p.attempt.is_some() {
                    // The pair in use is gone while another attempt runs: wait for that one.
                    p.ice = None;
                    p.last_failure = Some("the ICE pair stopped answering".into());
                    self.events.push_back(Event::StopIce { peer, session });
                } else if p.ice.as_ref().is_some_and(|i| i.session == session) {
                    p.ice = None;
                    p.last_failure = Some("the ICE pair stopped answering".into());
                    p.retry.retry_by(now + ICE_RETRY_AFTER_LOSS);
                    self.events.push_back(Event::StopIce { peer, session });
                } else if p.attempt.map(|a| a.0) == Some(session) {
                    p.attempt = None;
                    p.failures += 1;
                    p.last_failure = Some("the ICE session closed before a pair worked".into());
                    p.retry.failed(now);
                    self.events.push_back(Event::StopIce { peer, session });
                }
            }
        }
        self.report_paths();
    }

    /// This host's own reachability, as the shell measured it (see [`crate::reach`]).
    pub fn set_reach(&mut self, r: Reach, now: Instant) {
        self.reach = Some(r);
        self.reach_at = Some(now);
    }

    /// This host's reachability if measured within [`REACH_FRESH`] and since its addresses last
    /// changed; None: measure it again.
    pub fn fresh_reach(&self, now: Instant) -> Option<Reach> {
        self.reach_at
            .filter(|at| now.saturating_duration_since(*at) < REACH_FRESH)
            .and(self.reach)
    }

    /// This host's reachability as last measured (None: not yet).
    pub fn reach(&self) -> Option<Reach> {
        self.reach
    }

    /// What `peer` reported of its reachability.
    pub fn set_peer_reach(&mut self, peer: PeerId, r: Reach) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.reach = Some(r);
        }
    }

    /// The host's addresses changed: retry ICE with every peer without a pair now, and look
    /// for a direct pair with every peer reached through TURN.
    pub fn retry_ice_now(&mut self, now: Instant) {
        // Another network: this host's reachability is measured again at the next session.
        self.reach_at = None;
        for p in self.peers.values_mut() {
            match &p.ice {
                None => p.retry.retry_by(now),
                Some(i) if i.kind == PathKind::TurnRelay => p.upgrade.retry_by(now),
                Some(_) => {}
            }
        }
    }

    /// Inbound packets the policy dropped, and packets whose source was not the sender's.
    pub fn dropped(&self) -> (u64, u64) {
        (self.firewall.dropped, self.dropped_not_allowed)
    }

    pub fn peer_ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Why the path is what it is: a stable code (documented in docs/agent.md under `tern diagnose`)
    /// and the same in words.
    fn reason(&self, p: &Peer, now: Instant) -> (&'static str, String) {
        let tcp = self.tcp_relay_up;
        if let Some(i) = &p.ice {
            return match i.kind {
                PathKind::TurnRelay => {
                    let (code, why) = match &self.reach {
                        Some(here) => relay_cause(here, p.reach.as_ref()),
                        // Not measured yet: nothing to say of either side.
                        None => (
                            "ice_no_direct_pair",
                            "no direct pair got through the NATs".into(),
                        ),
                    };
                    (code, format!("{why}; ICE relays through TURN"))
                }
                _ => ("direct", "direct ICE pair".into()),
            };
        }
        if p.spec.relay_only {
            return (
                "hosted_device",
                if tcp {
                    "a WireGuard device the server hosts: always through the TCP relay".into()
                } else {
                    "a WireGuard device the server hosts: reached through the TCP relay, which is not connected".into()
                },
            );
        }
        let fallback = if tcp {
            "; the TCP relay carries traffic meanwhile"
        } else {
            "; no relay is connected either"
        };
        if !p.spec.online {
            return (
                "peer_offline",
                format!("the peer is not connected to management{fallback}"),
            );
        }
        let last = p
            .last_failure
            .as_ref()
            .map(|w| format!(" (last: {w})"))
            .unwrap_or_default();
        if p.attempt.is_some() {
            return if p.failures == 0 {
                ("ice_connecting", format!("ICE is connecting{fallback}"))
            } else {
                (
                    "ice_retrying",
                    format!(
                        "ICE is connecting after {} failed attempts{last}{fallback}",
                        p.failures
                    ),
                )
            };
        }
        if !p.controlling {
            return (
                "ice_waiting_for_offer",
                format!("waiting for the peer's ICE offer{last}{fallback}"),
            );
        }
        if p.failures == 0 {
            return ("ice_starting", format!("ICE is starting{fallback}"));
        }
        let wait = p.retry.due_at().saturating_duration_since(now).as_secs();
        (
            "ice_failed",
            format!(
                "ICE failed {} times{last}; next attempt in {wait} s{fallback}",
                p.failures
            ),
        )
    }

    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(id, p)| {
                let (hs, tx, rx, _, hs_rtt) = p.tunn.stats();
                let _ = (tx, rx);
                let quality = p.probes.quality(now);
                let (reason_code, reason) = self.reason(p, now);
                PeerStatus {
                    peer: *id,
                    spec: p.spec.clone(),
                    up: hs.is_some_and(|d| d < SESSION_UP),
                    path: Self::path_of(p, self.tcp_relay_up),
                    reason,
                    reason_code,
                    ice: p.ice.clone(),
                    last_handshake: hs,
                    rtt: quality
                        .map(|q| q.rtt)
                        .or(hs_rtt.map(|ms| Duration::from_millis(ms as u64))),
                    loss: quality.map(|q| (q.settled, q.lost)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    sent_without_policy: p.sent_without_policy,
                    known_for: now.saturating_duration_since(p.added),
                    routed: self
                        .routed
                        .iter()
                        .filter(|(_, r)| r == id)
                        .map(|(n, _)| *n)
                        .collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        out
    }
}
