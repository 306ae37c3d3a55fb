//! The agent's own TURN allocation on the shared port (RFC 8656), without I/O: the caller feeds
//! it what the TURN server sends and the time, and sends what it queues.
//!
//! Why our own: webrtc-ice's TURN client opens a socket per ICE session and relays every datagram
//! through its buffered connection, one `sendto` and a copy each. Here the allocation lives on
//! the WireGuard port itself, one per agent; relayed WireGuard leaves as ChannelData in GSO runs
//! and arrives in GRO reads like any other datagram.
//!
//! How ICE sees it: our relayed address goes to the peer as a `relay` candidate, so the peer
//! sends to it from its own shared port (plain UDP, no TURN client on its side). The server hands
//! what arrives to us from the peer's address X; the shell presents it to ICE and to the core as
//! coming from a *stand-in address* Y in 240.0.0.0/8 (reserved, never a real host), one per X,
//! so that a peer address that is also reachable directly never gets confused with its relayed
//! twin. Whatever is sent to Y leaves through the allocation to X: on a bound channel as
//! ChannelData, before that as a Send indication.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message, MessageType, Setter, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION,
    METHOD_REFRESH, METHOD_SEND,
};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::{channum::ChannelNumber, lifetime::Lifetime, peeraddr::PeerAddress};

/// First channel number (RFC 8656 §12: 0x4000-0x4FFF).
const FIRST_CHANNEL: u16 = 0x4000;
/// How many peers one allocation relays for (channel numbers, and stand-in addresses).
pub const MAX_PEERS: usize = 0x1000;
/// Lifetime asked for; refreshed at half of what the server grants.
const LIFETIME: Duration = Duration::from_secs(600);
/// Permissions last 300 s and channels 600 s on the server; both are renewed well before.
const PERMISSION_EVERY: Duration = Duration::from_secs(240);
const CHANNEL_EVERY: Duration = Duration::from_secs(300);
/// A permission nobody asked for again (a peer's candidate in an ICE session) and a channel
/// nothing arrived on for this long are let lapse: peers come and go over months.
const IDLE: Duration = Duration::from_secs(1800);
/// Retransmissions of a request (RFC 8489's RTO doubling from 500 ms), then it failed.
const RESEND: [Duration; 4] = [
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
    Duration::from_millis(4000),
];
/// After a failed allocation: the next try, doubling up to a minute.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Whether `a` is a stand-in address for a peer reached through our allocation.
pub fn is_stand_in(a: &SocketAddr) -> bool {
    slot_of(a).is_some()
}

/// The stand-in address of peer slot `i`: IPv4 (240.0.0.0/8, reserved), or IPv6 (100::/64,
/// discard-only, RFC 6666) where ICE has no IPv4 candidate (an IPv6-only host reaching an IPv4
/// relay through NAT64): webrtc-ice drops answers from a remote of a family none of its own
/// candidates has. Both families of a slot lead to the same peer. The port is the peer's own
/// (it reads naturally in logs).
fn stand_in(i: usize, port: u16, v6: bool) -> SocketAddr {
    let i = i as u16;
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, i))
    } else {
        IpAddr::V4(Ipv4Addr::new(240, 0, (i >> 8) as u8, i as u8))
    };
    SocketAddr::new(ip, port)
}

fn slot_of(y: &SocketAddr) -> Option<usize> {
    match y.ip() {
        IpAddr::V4(v4) if v4.octets()[0] == 240 => {
            let o = v4.octets();
            Some((usize::from(o[2]) << 8) | usize::from(o[3]))
        }
        IpAddr::V6(v6) if v6.segments()[..7] == [0x100, 0, 0, 0, 0, 0, 0] => {
            Some(usize::from(v6.segments()[7]))
        }
        _ => None,
    }
}

/// Credentials and server of an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub url: String,
    pub server: SocketAddr,
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The relayed address, and this host's address as the server sees it.
    Allocated {
        relayed: SocketAddr,
        mapped: SocketAddr,
    },
    /// The allocation is gone (refused, expired, no answer); with why, in words.
    Lost(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Allocate,
    Refresh,
    Permission(IpAddr),
    Bind(usize),
}

struct Pending {
    what: What,
    /// Sent with credentials, and whether it answers a challenge (a second challenge for the
    /// same request means the credentials are wrong, not that the nonce moved on).
    signed: bool,
    retried: bool,
    raw: Vec<u8>,
    sent: Instant,
    tries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No allocation; the next try at this time.
    Idle(Instant),
    /// The first Allocate (without credentials) or the signed one is out.
    Allocating,
    Ready,
}

struct Peer {
    addr: SocketAddr,
    bound: bool,
    /// Next ChannelBind (to bind, or to keep it bound); None once let lapse.
    due: Option<Instant>,
    /// When something last arrived from it.
    seen: Instant,
}

/// A permission: when it is renewed next and when it was last asked for.
struct Perm {
    due: Instant,
    asked: Instant,
}

/// What a datagram from the TURN server was.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Relayed from a peer: its stand-in address and the datagram.
    Data(SocketAddr, &'a [u8]),
    /// An answer to one of our requests (handled).
    Handled,
    /// Not the allocation's (e.g. an answer to someone else's Binding request).
    NotOurs,
}

pub struct Client {
    cfg: Config,
    realm: String,
    nonce: String,
    state: State,
    relayed: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    /// When the allocation is refreshed next.
    refresh_at: Option<Instant>,
    retry: tern_tunnel::backoff::Backoff,
    /// Why the last allocation failed or was lost (until the next one succeeds).
    last_error: Option<String>,
    /// Stand-in addresses in IPv6 (see `stand_in`).
    v6: bool,
    txs: HashMap<[u8; 12], Pending>,
    /// Permissions by peer IP: when each is renewed next.
    perms: HashMap<IpAddr, Perm>,
    peers: Vec<Peer>,
    slots: HashMap<SocketAddr, usize>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl Client {
    pub fn new(cfg: Config, now: Instant) -> Self {
        Client {
            cfg,
            realm: String::new(),
            nonce: String::new(),
            state: State::Idle(now),
            relayed: None,
            mapped: None,
            refresh_at: None,
            retry: tern_tunnel::backoff::Backoff::new(RETRY_FIRST, RETRY_MAX, now),
            last_error: None,
            v6: false,
            txs: HashMap::new(),
            perms: HashMap::new(),
            peers: Vec::new(),
            slots: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The request that frees the allocation on the server (a Refresh with lifetime 0; RFC 8656
    /// §7), when there is one; not retransmitted (the server frees it within its lifetime anyway).
    pub fn free(&self) -> Option<Vec<u8>> {
        if self.state != State::Ready || self.realm.is_empty() {
            return None;
        }
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            Box::new(Lifetime(Duration::ZERO)),
            Box::new(TextAttribute::new(ATTR_USERNAME, self.cfg.username.clone())),
            Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())),
            Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())),
            Box::new(self.integrity()),
        ])
        .ok()?;
        Some(m.raw)
    }

    /// Stand-in addresses in IPv6 from now on (ICE has no IPv4 candidate), or IPv4.
    pub fn set_v6_stand_ins(&mut self, v6: bool) {
        self.v6 = v6;
    }

    /// New credentials for the next requests (management re-issues them at half their life).
    pub fn set_credentials(&mut self, username: String, password: String) {
        self.cfg.username = username;
        self.cfg.password = password;
    }

    pub fn server(&self) -> SocketAddr {
        self.cfg.server
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed.filter(|_| self.state == State::Ready)
    }

    /// Why the last allocation failed or was lost, until the next one succeeds.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// Whether requests or events wait to be taken.
    pub fn has_work(&self) -> bool {
        !self.out.is_empty() || !self.events.is_empty()
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time [`Client::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let resend = self
            .txs
            .values()
            .map(|p| p.sent + RESEND[p.tries.min(RESEND.len() - 1)]);
        let idle = match self.state {
            State::Idle(at) => Some(at),
            _ => None,
        };
        let ready = (self.state == State::Ready).then(|| {
            let perms = self.perms.values().map(|p| p.due);
            let chans = self.peers.iter().filter_map(|p| p.due);
            perms.chain(chans).chain(self.refresh_at).min()
        });
        resend.chain(idle).chain(ready.flatten()).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Requests without an answer: sent again, or given up.
        let mut failed = vec![];
        for (tx, p) in self.txs.iter_mut() {
            if now < p.sent + RESEND[p.tries.min(RESEND.len() - 1)] {
                continue;
            }
            if p.tries + 1 >= RESEND.len() {
                failed.push((*tx, p.what));
            } else {
                p.tries += 1;
                p.sent = now;
                self.out.push_back(p.raw.clone());
            }
        }
        for (tx, what) in failed {
            self.txs.remove(&tx);
            match what {
                What::Allocate | What::Refresh => self.lose(
                    "no answer within 7.5 s: check the server's address, port and firewall (UDP)"
                        .into(),
                    now,
                ),
                // Tried again at the next renewal.
                What::Permission(_) | What::Bind(_) => {}
            }
        }
        match self.state {
            State::Idle(at) if now >= at => {
                self.state = State::Allocating;
                self.request(What::Allocate, now);
            }
            State::Ready => {
                if self.refresh_at.is_some_and(|t| now >= t) {
                    self.refresh_at = None;
                    self.request(What::Refresh, now);
                }
                let due: Vec<IpAddr> = self
                    .perms
                    .iter()
                    .filter(|(_, p)| now >= p.due)
                    .map(|(ip, _)| *ip)
                    .collect();
                for ip in due {
                    let lapsed = self
                        .perms
                        .get(&ip)
                        .is_some_and(|p| now.saturating_duration_since(p.asked) > IDLE);
                    if lapsed {
                        self.perms.remove(&ip);
                        continue;
                    }
                    if let Some(p) = self.perms.get_mut(&ip) {
                        p.due = now + PERMISSION_EVERY;
                    }
                    self.request(What::Permission(ip), now);
                }
                for i in 0..self.peers.len() {
                    let p = &mut self.peers[i];
                    if p.due.is_none_or(|d| now < d) {
                        continue;
                    }
                    if now.saturating_duration_since(p.seen) > IDLE {
                        // Let lapse; bound again if it speaks up.
                        p.due = None;
                        p.bound = false;
                        continue;
                    }
                    p.due = Some(now + CHANNEL_EVERY);
                    self.request(What::Bind(i), now);
                }
            }
            _ => {}
        }
    }

    /// Lets datagrams from `ip` in (a peer's candidate): the server drops what comes from an
    /// address without a permission.
    pub fn permit(&mut self, ip: IpAddr, now: Instant) {
        let ip = ip.to_canonical();
        if ip.is_unspecified() {
            return;
        }
        if let Some(p) = self.perms.get_mut(&ip) {
            p.asked = now;
            return;
        }
        // Asked for at once when allocated, else at the allocation.
        let ready = self.state == State::Ready;
        let due = if ready { now + PERMISSION_EVERY } else { now };
        self.perms.insert(ip, Perm { due, asked: now });
        if ready {
            self.request(What::Permission(ip), now);
        }
    }

    /// The stand-in address of peer `x` (a slot, and a channel bound to it, the first time).
    pub fn stand_in_for(&mut self, x: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let x = SocketAddr::new(x.ip().to_canonical(), x.port());
        if let Some(&i) = self.slots.get(&x) {
            let p = &mut self.peers[i];
            p.seen = now;
            if p.due.is_none() {
                // It speaks up after its channel lapsed: bound again.
                p.due = Some(now + CHANNEL_EVERY);
                if self.state == State::Ready {
                    self.request(What::Bind(i), now);
                }
            }
            return Some(stand_in(i, x.port(), self.v6));
        }
        if self.peers.len() >= MAX_PEERS {
            return None;
        }
        let i = self.peers.len();
        self.peers.push(Peer {
            addr: x,
            bound: false,
            due: Some(now + CHANNEL_EVERY),
            seen: now,
        });
        self.slots.insert(x, i);
        if self.state == State::Ready {
            self.request(What::Bind(i), now);
        }
        Some(stand_in(i, x.port(), self.v6))
    }

    /// The peer a stand-in address stands for.
    pub fn peer_of(&self, y: &SocketAddr) -> Option<SocketAddr> {
        let p = self.peers.get(slot_of(y)?)?;
        (p.addr.port() == y.port()).then_some(p.addr)
    }

    /// The bound channel to the peer behind stand-in `y`, if bound.
    pub fn channel(&self, y: &SocketAddr) -> Option<u16> {
        let i = slot_of(y)?;
        let p = self.peers.get(i)?;
        (p.bound && p.addr.port() == y.port()).then_some(FIRST_CHANNEL + i as u16)
    }

    /// `data` for the peer behind stand-in `y`, framed for the server: ChannelData on a bound
    /// channel, else a Send indication. None for an unknown stand-in or before the allocation.
    pub fn frame(&self, y: &SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        if self.state != State::Ready {
            return None;
        }
        if let Some(ch) = self.channel(y) {
            let mut v = Vec::with_capacity(4 + data.len());
            v.extend_from_slice(&channel_header(ch, data.len()));
            v.extend_from_slice(data);
            return Some(v);
        }
        let x = self.peer_of(y)?;
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            Box::new(PeerAddress {
                ip: x.ip(),
                port: x.port(),
            }),
            Box::new(turn::proto::data::Data(data.to_vec())),
        ])
        .ok()?;
        Some(m.raw)
    }

    /// A datagram from the TURN server: relayed data (ChannelData or a Data indication), or an
    /// answer to one of our requests.
    pub fn handle_inbound<'a>(&mut self, d: &'a [u8], now: Instant) -> Inbound<'a> {
        if let Some((ch, payload)) = parse_channel_data(d) {
            let v6 = self.v6;
            let i = usize::from(ch.wrapping_sub(FIRST_CHANNEL));
            return match self.peers.get_mut(i) {
                Some(p) if ch >= FIRST_CHANNEL => {
                    p.seen = now;
                    Inbound::Data(stand_in(i, p.addr.port(), v6), payload)
                }
                _ => Inbound::Handled, // a channel we did not bind: dropped
            };
        }
        if d.len() < 20 || d[0] & 0xc0 != 0 {
            return Inbound::NotOurs;
        }
        // A Data indication (0x0017): the peer's address and the datagram, found in place.
        if d[0..2] == [0x00, 0x17] {
            let Some((x, payload)) = parse_data_indication(d) else {
                return Inbound::Handled;
            };
            return match self.stand_in_for(x, now) {
                Some(y) => Inbound::Data(y, payload),
                None => Inbound::Handled,
            };
        }
        let Ok(tx) = <[u8; 12]>::try_from(&d[8..20]) else {
            return Inbound::NotOurs;
        };
        let Some(p) = self.txs.remove(&tx) else {
            return Inbound::NotOurs;
        };
        let mut m = Message::new();
        m.raw = d.to_vec();
        if m.decode().is_err() {
            return Inbound::Handled;
        }
        self.answer(&p, &mut m, now);
        Inbound::Handled
    }

    fn answer(&mut self, p: &Pending, m: &mut Message, now: Instant) {
        let what = p.what;
        if m.typ.class == CLASS_ERROR_RESPONSE {
            let mut e = ErrorCodeAttribute::default();
            let code = e.get_from(m).map(|_| e.code.0).unwrap_or(0);
            let reason = String::from_utf8_lossy(&e.reason).to_string();
            let text = |a| {
                m.get(a)
                    .ok()
                    .map(|v| String::from_utf8_lossy(&v).to_string())
            };
            // The credentials challenge (to an unsigned request), or a nonce that went stale:
            // the same request once more with the realm and nonce given.
            let challenge = (code == 401 && !p.signed) || (code == 438 && !p.retried);
            if let (true, Some(realm), Some(nonce)) =
                (challenge, text(ATTR_REALM), text(ATTR_NONCE))
            {
                self.realm = realm;
                self.nonce = nonce;
                self.send(what, now, true);
                return;
            }
            // Said beside the server's URL (status) or address (log): not repeated here.
            let why = if code == 401 {
                format!("it refused the credentials management issued ({code} {reason}): give management and the relay the same secret")
            } else {
                format!("it refused the allocation ({code} {reason}): its log says why")
            };
            match what {
                What::Allocate | What::Refresh => self.lose(why, now),
                What::Permission(_) | What::Bind(_) => {}
            }
            return;
        }
        if m.typ.class != CLASS_SUCCESS_RESPONSE {
            return;
        }
        if !self.realm.is_empty() && self.integrity().check(m).is_err() {
            return; // not from the server we share a key with
        }
        match what {
            What::Allocate => {
                let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
                if relayed.get_from(m).is_err() {
                    self.lose("the TURN allocation's answer lacks its address".into(), now);
                    return;
                }
                let mut mapped = XorMappedAddress::default();
                if mapped.get_from(m).is_ok() {
                    self.mapped = Some(SocketAddr::new(mapped.ip, mapped.port));
                }
                let relayed = SocketAddr::new(relayed.ip, relayed.port);
                self.relayed = Some(relayed);
                self.state = State::Ready;
                self.retry.succeeded();
                self.last_error = None;
                self.schedule_refresh(m, now);
                // Asked for before the allocation: at once now.
                for p in self.perms.values_mut() {
                    p.due = now;
                }
                for p in &mut self.peers {
                    p.bound = false;
                    p.due = Some(now);
                }
                self.events.push_back(Event::Allocated {
                    relayed,
                    mapped: self.mapped.unwrap_or(relayed),
                });
                self.handle_timeout(now);
            }
            What::Refresh => self.schedule_refresh(m, now),
            What::Permission(_) => {}
            What::Bind(i) => {
                if let Some(p) = self.peers.get_mut(i) {
                    p.bound = true;
                }
            }
        }
    }

    fn schedule_refresh(&mut self, m: &Message, now: Instant) {
        let mut l = Lifetime::default();
        let granted = if l.get_from(m).is_ok() { l.0 } else { LIFETIME };
        self.refresh_at = Some(now + (granted / 2).max(Duration::from_secs(30)));
    }

    fn lose(&mut self, why: String, now: Instant) {
        let had = self.state == State::Ready;
        self.state = State::Idle(now + self.retry.next_delay());
        self.relayed = None;
        self.refresh_at = None;
        self.realm.clear();
        self.nonce.clear();
        self.txs.clear();
        for p in &mut self.peers {
            p.bound = false;
        }
        // Said once per failure in a row, not at every retry.
        if had || self.last_error.as_deref() != Some(why.as_str()) {
            self.events.push_back(Event::Lost(why.clone()));
        }
        self.last_error = Some(why);
    }

    fn integrity(&self) -> MessageIntegrity {
        MessageIntegrity::new_long_term_integrity(
            self.cfg.username.clone(),
            self.realm.clone(),
            self.cfg.password.clone(),
        )
    }

    fn request(&mut self, what: What, now: Instant) {
        self.send(what, now, false);
    }

    fn send(&mut self, what: What, now: Instant, retried: bool) {
        let method = match what {
            What::Allocate => METHOD_ALLOCATE,
            What::Refresh => METHOD_REFRESH,
            What::Permission(_) => METHOD_CREATE_PERMISSION,
            What::Bind(_) => METHOD_CHANNEL_BIND,
        };
        let tx = TransactionId::new();
        let mut s: Vec<Box<dyn Setter>> = vec![
            Box::new(tx),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        match what {
            What::Allocate => {
                s.push(Box::new(turn::proto::reqtrans::RequestedTransport {
                    protocol: turn::proto::PROTO_UDP,
                }));
                s.push(Box::new(Lifetime(LIFETIME)));
            }
            What::Refresh => s.push(Box::new(Lifetime(LIFETIME))),
            What::Permission(ip) => s.push(Box::new(PeerAddress { ip, port: 0 })),
            What::Bind(i) => {
                let Some(p) = self.peers.get(i) else { return };
                s.push(Box::new(ChannelNumber(FIRST_CHANNEL + i as u16)));
                s.push(Box::new(PeerAddress {
                    ip: p.addr.ip(),
                    port: p.addr.port(),
                }));
            }
        }
        // Unsigned only for the first Allocate, which fetches the realm and nonce.
        if !self.realm.is_empty() {
            s.push(Box::new(TextAttribute::new(
                ATTR_USERNAME,
                self.cfg.username.clone(),
            )));
            s.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
            s.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
            s.push(Box::new(self.integrity()));
        } else if what != What::Allocate {
            return;
        }
        let mut m = Message::new();
        if m.build(&s).is_err() {
            return;
        }
        self.txs.insert(
            m.transaction_id.0,
            Pending {
                what,
                signed: !self.realm.is_empty(),
                retried,
                raw: m.raw.clone(),
                sent: now,
                tries: 0,
            },
        );
        self.out.push_back(m.raw);
    }
}

/// The 4-byte ChannelData header (RFC 8656 §12.4). Over UDP no padding follows: WireGuard and
/// STUN messages are multiples of 4 bytes anyway.
pub fn channel_header(ch: u16, len: usize) -> [u8; 4] {
    let c = ch.to_be_bytes();
    let l = (len as u16).to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

/// A ChannelData message: its channel and payload.
pub fn parse_channel_data(d: &[u8]) -> Option<(u16, &[u8])> {
    if d.len() < 4 || !(0x40..=0x4f).contains(&d[0]) {
        return None;
    }
    let ch = u16::from_be_bytes([d[0], d[1]]);
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    Some((ch, d.get(4..4 + len)?))
}

/// A Data indication's XOR-PEER-ADDRESS and DATA, without copying the data.
fn parse_data_indication(d: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    let tx: [u8; 12] = d.get(8..20)?.try_into().ok()?;
    let attrs = d.get(20..20 + len)?;
    let (mut peer, mut data) = (None, None);
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let t = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let l = usize::from(u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]));
        let v = attrs.get(i + 4..i + 4 + l)?;
        match t {
            0x0012 => peer = crate::socket::xor_address(v, &tx),
            0x0013 => data = Some(v),
            _ => {}
        }
        i += 4 + l.div_ceil(4) * 4;
    }
    Some((peer?, data?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "192.0.2.1:3478";

    fn client(now: Instant) -> Client {
        Client::new(
            Config {
                url: "turn:192.0.2.1:3478".into(),
                server: SERVER.parse().expect("addr"),
                username: "1700000000:peer".into(),
                password: "secret".into(),
            },
            now,
        )
    }

    fn decode(raw: &[u8]) -> Message {
        let mut m = Message::new();
        m.raw = raw.to_vec();
        m.decode().expect("a STUN message");
        m
    }

    /// The server's answer to `req`: `class`, `attrs`, signed when `signed`.
    fn answer(
        req: &Message,
        class: stun::message::MessageClass,
        attrs: Vec<Box<dyn Setter>>,
        signed: bool,
    ) -> Vec<u8> {
        let mut s: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId(req.transaction_id.0)),
            Box::new(MessageType::new(req.typ.method, class)),
        ];
        s.extend(attrs);
        if signed {
            s.push(Box::new(MessageIntegrity::new_long_term_integrity(
                "1700000000:peer".into(),
                "tern".into(),
                "secret".into(),
            )));
        }
        let mut m = Message::new();
        m.build(&s).expect("build");
        m.raw
    }

    /// What the server sends when `from` reaches our relayed address without a channel.
    fn data_indication(from: SocketAddr, data: &[u8]) -> Vec<u8> {
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(
                stun::message::METHOD_DATA,
                CLASS_INDICATION,
            )),
            Box::new(PeerAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(turn::proto::data::Data(data.to_vec())),
        ])
        .expect("build");
        m.raw
    }

    fn error(code: u16, nonce: &str) -> Vec<Box<dyn Setter>> {
        vec![
            Box::new(ErrorCodeAttribute {
                code: stun::error_code::ErrorCode(code),
                reason: b"x".to_vec(),
            }),
            Box::new(TextAttribute::new(ATTR_REALM, "tern".into())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce.into())),
        ]
    }

    /// Runs the client through the challenge to an allocation at 198.51.100.7:50001.
    fn allocated(now: Instant) -> Client {
        let mut c = client(now);
        c.handle_timeout(now);
        let first = decode(&c.poll_transmit().expect("first Allocate"));
        assert_eq!(first.typ, MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST));
        assert!(
            first.get(ATTR_USERNAME).is_err(),
            "the first one is unsigned"
        );
        let challenge = answer(&first, CLASS_ERROR_RESPONSE, error(401, "n1"), false);
        assert_eq!(c.handle_inbound(&challenge, now), Inbound::Handled);
        let signed = decode(&c.poll_transmit().expect("signed Allocate"));
        assert_eq!(signed.get(ATTR_NONCE).expect("nonce"), b"n1");
        let ok = answer(
            &signed,
            CLASS_SUCCESS_RESPONSE,
            vec![
                Box::new(turn::proto::relayaddr::RelayedAddress {
                    ip: "198.51.100.7".parse().expect("ip"),
                    port: 50001,
                }),
                Box::new(XorMappedAddress {
                    ip: "203.0.113.5".parse().expect("ip"),
                    port: 4000,
                }),
                Box::new(Lifetime(Duration::from_secs(600))),
            ],
            true,
        );
        assert_eq!(c.handle_inbound(&ok, now), Inbound::Handled);
        assert_eq!(
            c.poll_event(),
            Some(Event::Allocated {
                relayed: "198.51.100.7:50001".parse().expect("addr"),
                mapped: "203.0.113.5:4000".parse().expect("addr"),
            })
        );
        c
    }

    #[test]
    fn allocates_through_the_challenge_then_binds_a_channel_per_peer_and_frames_for_it() {
        let now = Instant::now();
        let mut c = allocated(now);
        assert_eq!(
            c.relayed(),
            Some("198.51.100.7:50001".parse().expect("addr"))
        );
        // A Data indication from a peer we had permitted: handed on from its stand-in address,
        // and a channel is bound to it.
        c.permit("203.0.113.9".parse().expect("ip"), now);
        let perm = decode(&c.poll_transmit().expect("CreatePermission"));
        assert_eq!(perm.typ.method, METHOD_CREATE_PERMISSION);
        let x: SocketAddr = "203.0.113.9:7000".parse().expect("addr");
        let ind = data_indication(x, &[4, 0, 0, 0, 1, 2, 3, 4]);
        let Inbound::Data(y, payload) = c.handle_inbound(&ind, now) else {
            panic!("relayed data expected");
        };
        assert!(is_stand_in(&y) && y.port() == 7000, "{y}");
        assert_eq!(payload, [4, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(c.peer_of(&y), Some(x));
        // Before the channel is bound: a Send indication to the peer.
        let send = decode(&c.frame(&y, b"hello!!!").expect("framed"));
        assert_eq!(send.typ, MessageType::new(METHOD_SEND, CLASS_INDICATION));
        assert!(c.has_work(), "a new peer queues its ChannelBind");
        let bind = decode(&c.poll_transmit().expect("ChannelBind"));
        assert_eq!(bind.typ.method, METHOD_CHANNEL_BIND);
        let mut ch = ChannelNumber::default();
        ch.get_from(&bind).expect("channel number");
        let ok = answer(&bind, CLASS_SUCCESS_RESPONSE, vec![], true);
        assert_eq!(c.handle_inbound(&ok, now), Inbound::Handled);
        // Bound: ChannelData both ways.
        let framed = c.frame(&y, b"hello!!!").expect("framed");
        assert_eq!(parse_channel_data(&framed), Some((ch.0, &b"hello!!!"[..])));
        let mut back = channel_header(ch.0, 4).to_vec();
        back.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(
            c.handle_inbound(&back, now),
            Inbound::Data(y, &[1, 0, 0, 0][..])
        );
        assert!(!c.has_work(), "relayed data queues nothing");
        // A second peer gets its own stand-in and channel; the same peer keeps its own.
        let x2: SocketAddr = "203.0.113.10:7000".parse().expect("addr");
        let y2 = c.stand_in_for(x2, now).expect("slot");
        assert_ne!(y, y2);
        assert_eq!(c.stand_in_for(x, now), Some(y));
        // Not ours: another client's Binding answer, an unknown channel.
        let mut other = Message::new();
        other
            .build(&[
                Box::new(TransactionId::new()),
                Box::new(stun::message::BINDING_SUCCESS),
            ])
            .expect("build");
        assert_eq!(c.handle_inbound(&other.raw, now), Inbound::NotOurs);
        let mut stray = channel_header(0x4abc, 4).to_vec();
        stray.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(c.handle_inbound(&stray, now), Inbound::Handled);
        // Something that is not a stand-in is not framed.
        assert_eq!(c.frame(&x, b"data"), None);
        // Freed with a signed Refresh of lifetime 0; nothing to free before an allocation.
        let free = decode(&c.free().expect("an allocation to free"));
        assert_eq!(free.typ, MessageType::new(METHOD_REFRESH, CLASS_REQUEST));
        let mut l = Lifetime::default();
        l.get_from(&free).expect("lifetime");
        assert_eq!(l.0, Duration::ZERO);
        assert!(c.integrity().check(&mut free.clone()).is_ok(), "signed");
        assert_eq!(client(now).free(), None);
    }

    #[test]
    fn a_host_without_ipv4_gets_ipv6_stand_ins_and_they_are_told_apart() {
        let now = Instant::now();
        let mut c = Client::new(
            Config {
                url: "turn:[64:ff9b::c000:201]:3478".into(),
                server: "[64:ff9b::c000:201]:3478".parse().expect("addr"),
                username: "u".into(),
                password: "p".into(),
            },
            now,
        );
        c.set_v6_stand_ins(true);
        let x: SocketAddr = "203.0.113.9:7000".parse().expect("addr");
        let y = c.stand_in_for(x, now).expect("slot");
        assert!(y.is_ipv6() && is_stand_in(&y), "{y}");
        assert_eq!(c.peer_of(&y), Some(x));
        let y2 = c
            .stand_in_for("203.0.113.10:7000".parse().expect("addr"), now)
            .expect("slot");
        assert_ne!(y, y2);
        for other in [
            "[100:0:0:1::1]:7000",
            "[2001:db8::1]:7000",
            "239.0.0.1:7000",
        ] {
            assert!(!is_stand_in(&other.parse().expect("addr")), "{other}");
        }
        assert!(is_stand_in(&"240.0.1.2:7000".parse().expect("addr")));
    }

    #[test]
    fn refreshes_before_expiry_and_renews_permissions_and_channels() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        let x: SocketAddr = "203.0.113.9:7000".parse().expect("addr");
        c.permit(x.ip(), t0);
        let y = c.stand_in_for(x, t0).expect("slot");
        while c.poll_transmit().is_some() {}
        // Half the granted 600 s: a Refresh; the permission (240 s) and channel (300 s) too.
        let t = t0 + Duration::from_secs(301);
        assert!(c.poll_timeout().is_some_and(|d| d <= t));
        c.handle_timeout(t);
        let mut methods = vec![];
        while let Some(raw) = c.poll_transmit() {
            methods.push(decode(&raw).typ.method);
        }
        for m in [
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ] {
            assert!(methods.contains(&m), "{m} in {methods:?}");
        }
        assert_eq!(c.peer_of(&y), Some(x));

        // Half an hour without the peer's candidate asked for again or anything from it: the
        // permission and the channel lapse (the allocation itself is still refreshed) ...
        // The server answers every request.
        let methods_at = |c: &mut Client, t: Instant| {
            c.handle_timeout(t);
            let mut m = vec![];
            while let Some(raw) = c.poll_transmit() {
                let req = decode(&raw);
                m.push(req.typ.method);
                let ok = answer(
                    &req,
                    CLASS_SUCCESS_RESPONSE,
                    vec![Box::new(Lifetime(Duration::from_secs(600)))],
                    true,
                );
                assert_eq!(c.handle_inbound(&ok, t), Inbound::Handled);
            }
            m
        };
        let mut t = t;
        let mut late = vec![];
        while t < t0 + Duration::from_secs(2700) {
            t += Duration::from_secs(60);
            late = methods_at(&mut c, t);
        }
        let idle: Vec<_> = (0..12)
            .flat_map(|k| methods_at(&mut c, t + Duration::from_secs(60 * k)))
            .collect();
        assert!(
            !idle.contains(&METHOD_CREATE_PERMISSION) && !idle.contains(&METHOD_CHANNEL_BIND),
            "{idle:?} (last before: {late:?})"
        );
        assert!(idle.contains(&METHOD_REFRESH), "{idle:?}");
        assert_eq!(c.channel(&y), None);
        // ... and the peer speaking up again (a Data indication) gets its channel back.
        let ind = data_indication(x, &[4, 0, 0, 0]);
        let later = t + Duration::from_secs(720);
        assert_eq!(
            c.handle_inbound(&ind, later),
            Inbound::Data(y, &[4, 0, 0, 0][..])
        );
        let bind = decode(&c.poll_transmit().expect("ChannelBind again"));
        assert_eq!(bind.typ.method, METHOD_CHANNEL_BIND);
    }

    #[test]
    fn no_answer_or_refused_credentials_lose_the_allocation_and_it_is_tried_again_later() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let first = c.poll_transmit().expect("Allocate");
        // Retransmitted unchanged, then given up.
        let mut t = t0;
        let mut resent = 0;
        for _ in 0..10 {
            t += Duration::from_secs(5);
            c.handle_timeout(t);
            while let Some(raw) = c.poll_transmit() {
                if raw == first {
                    resent += 1;
                }
            }
            if c.poll_event().is_some() {
                break;
            }
        }
        assert_eq!(resent, RESEND.len() - 1);
        assert_eq!(c.relayed(), None);
        // Tried again, then a second 401 for the signed request: the credentials are wrong.
        let later = t + RETRY_MAX;
        c.handle_timeout(later);
        let req = decode(&c.poll_transmit().expect("Allocate again"));
        c.handle_inbound(
            &answer(&req, CLASS_ERROR_RESPONSE, error(401, "n1"), false),
            later,
        );
        let signed = decode(&c.poll_transmit().expect("signed"));
        c.handle_inbound(
            &answer(&signed, CLASS_ERROR_RESPONSE, error(401, "n1"), false),
            later,
        );
        match c.poll_event() {
            Some(Event::Lost(why)) => assert!(why.contains("refused the credentials"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(c
            .last_error()
            .is_some_and(|e| e.contains("refused the credentials")));
        // A stale nonce is not a refusal: the request goes again with the new nonce.
        let mut c = allocated(t0);
        c.handle_timeout(t0 + Duration::from_secs(301));
        let refresh = decode(&c.poll_transmit().expect("Refresh"));
        c.handle_inbound(
            &answer(&refresh, CLASS_ERROR_RESPONSE, error(438, "n2"), false),
            t0,
        );
        let again = decode(&c.poll_transmit().expect("Refresh again"));
        assert_eq!(again.typ.method, METHOD_REFRESH);
        assert_eq!(again.get(ATTR_NONCE).expect("nonce"), b"n2");
        assert_eq!(c.poll_event(), None);
    }
}
