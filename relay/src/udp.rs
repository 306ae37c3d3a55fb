//! STUN and TURN over UDP. The `turn` crate runs the protocol; around it:
//! - [`FrontConn`] wraps the listening socket and inspects every datagram before the TURN server
//!   sees it: per-source rate limit on STUN/TURN requests (anti-amplification, and it bounds the
//!   crate's nonce table, which grows by one entry per unauthenticated request), the peer-address
//!   filter on CreatePermission/ChannelBind/Send (answered 403 here), allocation quotas (486), and
//!   counters. Malformed datagrams are dropped and counted. The crate keeps every nonce it
//!   creates and never prunes them, so the front hands out the crate's current nonce itself
//!   ([`NonceBook`]: 401 to unauthenticated requests, 438 to requests with a nonce the crate did
//!   not issue recently): the crate creates about one nonce per 50 minutes instead of one per
//!   unauthenticated request. A global request budget sits beside the per-source one.
//! - [`CoturnAuth`] verifies coturn-style time-limited credentials (the crate's own handler rejects
//!   `<expiry>:<id>` usernames).
//! - [`RelayGen`] allocates relay sockets in the configured port range and wraps them in
//!   [`RelayConn`], which re-checks the peer filter on every send and counts relayed traffic.

use crate::fastpath::{channel_bind, channel_bind_success, is_allocate, Channels, FastPath};
use crate::filter::PeerFilter;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stun::attributes::{
    ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
};
use stun::error_code::{
    ErrorCode, ErrorCodeAttribute, CODE_ALLOC_QUOTA_REACHED, CODE_FORBIDDEN, CODE_STALE_NONCE,
    CODE_UNAUTHORIZED,
};
use stun::message::{
    Message, MessageType, Setter, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, MAGIC_COOKIE, METHOD_ALLOCATE, METHOD_BINDING, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_SEND,
};
use tern_udp::{
    gro_cmsg_space, recv_gro, try_recv_mmsg, Outgoing, Received, SegmentSender, GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
};
use tokio::net::UdpSocket;
use tracing::{debug, warn};
use webrtc_util::Conn;

type UResult<T> = std::result::Result<T, webrtc_util::Error>;

/// Limits applied by the UDP front.
#[derive(Clone, Debug)]
pub struct UdpLimits {
    /// STUN/TURN requests per second per source IP (sustained), and burst.
    pub requests_per_sec: f64,
    pub requests_burst: f64,
    pub max_allocations: u64,
    pub max_allocations_per_user: u64,
    /// STUN/TURN requests per second from all sources together (sustained); burst is twice.
    pub global_requests_per_sec: f64,
}

impl Default for UdpLimits {
    fn default() -> Self {
        UdpLimits {
            requests_per_sec: 20.0,
            requests_burst: 60.0,
            max_allocations: 10_000,
            max_allocations_per_user: 16,
            global_requests_per_sec: 20_000.0,
        }
    }
}

/// State shared by the front, the auth handler and the relay sockets.
pub struct UdpShared {
    pub metrics: Arc<Metrics>,
    pub filter: PeerFilter,
    pub secret: Vec<u8>,
    pub realm: String,
    pub limits: UdpLimits,
    limiter: Mutex<Limiter<IpAddr>>,
    global: Mutex<Limiter<()>>,
    nonces: Mutex<NonceBook>,
    /// User of the Allocate request being handled (the TURN server handles one datagram at a
    /// time per listener, so the allocation that follows belongs to it).
    current_user: Mutex<Option<String>>,
    per_user: Mutex<HashMap<String, u64>>,
    last_auth_warn: Mutex<Option<Instant>>,
    /// Bound channels relayed without the crate (see [`crate::fastpath`]).
    pub fast: FastPath,
    /// The listening socket (relayed datagrams go back to clients from it).
    main: std::sync::OnceLock<Arc<UdpSocket>>,
    /// Runs of relayed datagrams go out in one GSO send where the kernel takes it.
    sender: SegmentSender,
    /// Peers whose credentials were revoked before they expired.
    pub revoked: Arc<crate::revoke::Revoked>,
}

impl UdpShared {
    pub fn new(
        metrics: Arc<Metrics>,
        filter: PeerFilter,
        secret: Vec<u8>,
        realm: String,
        limits: UdpLimits,
    ) -> Arc<Self> {
        Arc::new(UdpShared {
            limiter: Mutex::new(Limiter::new(
                limits.requests_per_sec,
                limits.requests_burst,
                65_536,
            )),
            global: Mutex::new(Limiter::new(
                limits.global_requests_per_sec,
                limits.global_requests_per_sec * 2.0,
                1,
            )),
            nonces: Mutex::new(NonceBook::default()),
            metrics,
            filter,
            secret,
            realm,
            limits,
            current_user: Mutex::new(None),
            per_user: Mutex::new(HashMap::new()),
            last_auth_warn: Mutex::new(None),
            fast: FastPath::default(),
            main: std::sync::OnceLock::new(),
            sender: SegmentSender::default(),
            revoked: Arc::default(),
        })
    }

    /// The listening socket (relayed datagrams go back to clients from it).
    pub fn main_socket(&self) -> Option<Arc<UdpSocket>> {
        self.main.get().cloned()
    }

    /// Counts an auth failure; warns at most once a minute so floods do not flood the log.
    pub fn auth_failed(&self, user: &str, src: SocketAddr, why: &str) {
        Metrics::inc(&self.metrics.auth_failures_total);
        let mut last = lock(&self.last_auth_warn);
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            *last = Some(Instant::now());
            warn!(%src, user, reason = why, total = Metrics::get(&self.metrics.auth_failures_total), "relay authentication failed (further failures this minute are only counted)");
        } else {
            debug!(%src, user, reason = why, "relay authentication failed");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Socket buffers large enough for relayed bursts (the kernel default of 208 KiB overflows).
pub fn size_buffers(sock: &UdpSocket, bytes: usize) {
    let s = socket2::SockRef::from(sock);
    // SO_*BUFFORCE needs CAP_NET_ADMIN; fall back to the capped ordinary option.
    if tern_udp::force_buffers(sock, bytes).is_err() {
        let _ = s.set_recv_buffer_size(bytes);
        let _ = s.set_send_buffer_size(bytes);
    }
}

/// The nonces the TURN crate issued (seen in its outgoing 401/438 answers) and the one the front
/// hands out. The crate accepts a nonce for an hour; the front hands one out for
/// [`NonceBook::HAND_OUT_FOR`] and lets requests carry it for [`NonceBook::ACCEPT_FOR`], both
/// inside that hour.
#[derive(Default)]
pub struct NonceBook {
    current: Option<(String, Instant)>,
    issued: HashMap<String, Instant>,
}

impl NonceBook {
    pub const HAND_OUT_FOR: Duration = Duration::from_secs(50 * 60);
    pub const ACCEPT_FOR: Duration = Duration::from_secs(59 * 60);
    const MAX_ISSUED: usize = 1024;

    /// The nonce to answer an unauthenticated request with, if a fresh one is known.
    pub fn current(&self, now: Instant) -> Option<&str> {
        self.current
            .as_ref()
            .filter(|(_, t)| now.saturating_duration_since(*t) < Self::HAND_OUT_FOR)
            .map(|(n, _)| n.as_str())
    }

    /// Whether the crate issued `nonce` recently enough to accept it.
    pub fn knows(&self, nonce: &str, now: Instant) -> bool {
        self.issued
            .get(nonce)
            .is_some_and(|t| now.saturating_duration_since(*t) < Self::ACCEPT_FOR)
    }

    /// The crate issued `nonce` (seen going out).
    pub fn record(&mut self, nonce: &str, now: Instant) {
        if self.issued.contains_key(nonce) {
            return;
        }
        self.issued
            .retain(|_, t| now.saturating_duration_since(*t) < Self::ACCEPT_FOR);
        while self.issued.len() >= Self::MAX_ISSUED {
            let Some(oldest) = self
                .issued
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            self.issued.remove(&oldest);
        }
        self.issued.insert(nonce.to_string(), now);
        self.current = Some((nonce.to_string(), now));
    }
}

/// The NONCE of a 401/438 the crate sends, if `buf` is one (cheap header check first).
fn issued_nonce(buf: &[u8]) -> Option<String> {
    if buf.len() < 20 || !(0x01..=0x3f).contains(&buf[0]) {
        return None; // ChannelData or not STUN
    }
    let t = u16::from_be_bytes([buf[0], buf[1]]);
    let class_bits = ((t >> 7) & 0x2) | ((t >> 4) & 0x1);
    if class_bits != 0b11 {
        return None; // only error responses carry new nonces
    }
    let mut m = Message::new();
    m.raw = buf.to_vec();
    m.decode().ok()?;
    let n = m.get(ATTR_NONCE).ok()?;
    Some(String::from_utf8_lossy(&n).into_owned())
}

/// What the front does with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Reply(Vec<u8>),
}

pub struct FrontConn {
    sock: Arc<UdpSocket>,
    shared: Arc<UdpShared>,
    rx: tokio::sync::Mutex<Batch>,
}

/// The datagrams of one receive (one `recvmmsg` on the listener; a GRO receive on a relay
/// socket), each message a run of datagrams of one flow when the kernel coalesced them (UDP
/// GRO), and those of them the crate has yet to see. Relaying a batch at a time lets the
/// datagrams leave in one `sendmmsg`, consecutive ones to one destination in one GSO message.
struct Batch {
    /// One buffer per message, allocated at the first receive (most allocations never carry
    /// data: a direct path wins).
    bufs: Vec<Vec<u8>>,
    receives: usize,
    cmsg: Vec<u8>,
    msgs: Vec<Received>,
    /// Each received datagram: (buffer, offset, length, sender), in order.
    got: Vec<(usize, usize, usize, SocketAddr)>,
    /// The datagrams of `got` left for the crate (indexes), in order.
    pending: std::collections::VecDeque<usize>,
    /// Datagrams on their way out.
    outbox: Outbox,
    /// The fast path's datagrams of this batch: (socket, destination, index in `got`, ChannelData
    /// header when relayed to a client), to be grouped by destination.
    order: Vec<Forward>,
}

type Forward = (Arc<UdpSocket>, SocketAddr, usize, Option<[u8; 4]>);

impl Batch {
    fn new(receives: usize) -> Self {
        Batch {
            bufs: Vec::new(),
            receives,
            cmsg: gro_cmsg_space(),
            msgs: Vec::new(),
            got: Vec::new(),
            pending: Default::default(),
            outbox: Outbox::default(),
            order: Vec::new(),
        }
    }

    /// The next datagram for the crate, copied into `buf`.
    fn next(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let i = self.pending.pop_front()?;
        let (b, off, len, from) = self.got[i];
        let m = len.min(buf.len());
        buf[..m].copy_from_slice(&self.bufs[b][off..off + m]);
        Some((m, from))
    }

    /// Waits for datagrams, then takes what is queued (up to one message per buffer).
    async fn receive(&mut self, sock: &UdpSocket) -> std::io::Result<()> {
        self.got.clear();
        self.pending.clear();
        if self.bufs.is_empty() {
            self.bufs = (0..self.receives).map(|_| vec![0u8; RECV_BYTES]).collect();
        }
        if self.bufs.len() == 1 {
            let (n, from, seg) = recv_gro(sock, &mut self.bufs[0], &mut self.cmsg).await?;
            self.split(0, n, from, seg);
            return Ok(());
        }
        self.msgs.clear();
        loop {
            sock.readable().await?;
            match try_recv_mmsg(sock, &mut self.bufs, &mut self.msgs) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        let msgs = std::mem::take(&mut self.msgs);
        for m in &msgs {
            self.split(m.buf, m.len, m.from, m.seg);
        }
        self.msgs = msgs;
        Ok(())
    }

    fn split(&mut self, b: usize, n: usize, from: SocketAddr, seg: usize) {
        let mut off = 0;
        while off < n {
            let len = seg.min(n - off);
            self.got.push((b, off, len, from));
            off += len;
        }
    }

    fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let (b, off, len, from) = self.got[i];
        (&self.bufs[b][off..off + len], from)
    }
}

/// Room for one message: the largest UDP payload, which a GRO run never exceeds.
const RECV_BYTES: usize = 65_536;
/// Messages per receive on the listener (every client's traffic, one `recvmmsg`) and on a relay
/// socket (one allocation's peers: a GRO receive already brings a run of an agent's GSO send).
const LISTENER_RECEIVES: usize = 32;
const RELAY_RECEIVES: usize = 1;

/// Relayed datagrams gathered from one batch, laid end to end in one buffer: consecutive ones
/// to one destination with one length form a run (one GSO message), and the runs through one
/// socket leave in one `sendmmsg` where the kernel takes it.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    runs: Vec<Outgoing>,
    /// The socket each run leaves through.
    socks: Vec<Arc<UdpSocket>>,
}

impl Outbox {
    /// Appends a datagram (`head` then `body`) for `to` through `sock`.
    fn push(&mut self, sock: &Arc<UdpSocket>, to: SocketAddr, head: &[u8], body: &[u8]) {
        let len = head.len() + body.len();
        let start = self.buf.len();
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(body);
        if let (Some(r), Some(s)) = (self.runs.last_mut(), self.socks.last()) {
            let bytes = r.end - r.start;
            if Arc::ptr_eq(s, sock)
                && r.to == to
                && r.seg == len
                && r.end == start
                && bytes + len <= GSO_MAX_BYTES
                && bytes / len < GSO_MAX_SEGMENTS
            {
                r.end = self.buf.len();
                return;
            }
        }
        self.runs.push(Outgoing {
            start,
            end: self.buf.len(),
            seg: len.max(1),
            to,
        });
        self.socks.push(sock.clone());
    }

    /// Sends everything gathered: the runs through one socket in as few calls as it takes.
    async fn flush(&mut self, shared: &UdpShared) {
        let mut i = 0;
        while i < self.runs.len() {
            let sock = &self.socks[i];
            let mut j = i + 1;
            while j < self.runs.len() && Arc::ptr_eq(&self.socks[j], sock) {
                j += 1;
            }
            match shared
                .sender
                .send_many(sock, &self.buf, &self.runs[i..j])
                .await
            {
                Ok(0) => {}
                Ok(lost) => {
                    Metrics::add(&shared.metrics.turn_send_failures_total, lost as u64);
                    debug!(lost, "relayed datagrams refused by the kernel");
                }
                Err(e) => debug!(error = %e, "relayed send failed"),
            }
            i = j;
        }
        self.buf.clear();
        self.runs.clear();
        self.socks.clear();
    }
}

impl FrontConn {
    pub fn new(sock: Arc<UdpSocket>, shared: Arc<UdpShared>) -> Self {
        let _ = shared.main.set(sock.clone());
        let gro = tern_udp::enable_gro(&sock);
        debug!(udp_gro = gro, "TURN listener");
        FrontConn {
            sock,
            shared,
            rx: tokio::sync::Mutex::new(Batch::new(LISTENER_RECEIVES)),
        }
    }

    /// Relays the ChannelData on bound channels in the batch just received (each datagram goes
    /// out of its allocation's relay socket; consecutive ones to the same peer with the same
    /// length in one GSO send) and leaves the rest for the crate.
    async fn fast_forward(&self, b: &mut Batch) {
        let now = Instant::now();
        let mut out = std::mem::take(&mut b.outbox);
        let mut order = std::mem::take(&mut b.order);
        // Datagrams and bytes relayed, counted once per batch.
        let mut relayed = (0u64, 0u64);
        let mut mine: Option<(Arc<Channels>, u64, u64)> = None;
        // The last (client, channel) looked up, and where it goes (None: not on the fast path):
        // the sender's allocation, the peer, and the peer's client and channel when the peer is
        // an allocation here.
        let mut checked: Option<(SocketAddr, bool)> = None;
        #[allow(clippy::type_complexity)]
        let mut last: Option<(
            (SocketAddr, u16),
            Option<(Arc<Channels>, SocketAddr, Option<(SocketAddr, u16)>)>,
        )> = None;
        for i in 0..b.got.len() {
            let (d, src) = b.datagram(i);
            if d.len() < 4 || !(0x40..=0x7f).contains(&d[0]) {
                b.pending.push_back(i);
                continue;
            }
            let channel = u16::from_be_bytes([d[0], d[1]]);
            let len = u16::from_be_bytes([d[2], d[3]]) as usize;
            if 4 + len > d.len() {
                b.pending.push_back(i);
                continue;
            }
            if last.as_ref().is_none_or(|(k, _)| *k != (src, channel)) {
                let route = self
                    .shared
                    .fast
                    .route(src, channel, now)
                    .map(|(from, peer)| {
                        // A peer that is an allocation here, with a channel bound to the sender's
                        // relayed address: straight to its client (see `crate::fastpath`).
                        let inside = self.shared.fast.local(peer).and_then(|to| {
                            let ch = to.channel_for(from.relayed, now)?;
                            Some((to.client, ch))
                        });
                        (from, peer, inside)
                    });
                last = Some(((src, channel), route));
            }
            let Some((_, Some((from, peer, inside)))) = &last else {
                b.pending.push_back(i);
                continue;
            };
            // The filter's verdict, asked once per run of one peer.
            let allowed = match checked {
                Some((p, ok)) if p == *peer => ok,
                _ => {
                    let ok = self.shared.filter.allows_addr(*peer);
                    checked = Some((*peer, ok));
                    ok
                }
            };
            if !allowed {
                Metrics::inc(&self.shared.metrics.forbidden_peer_total);
                continue;
            }
            // The sender's allocation's share, counted once per run of one (client, channel).
            match &mut mine {
                Some((c, d, by)) if Arc::ptr_eq(c, from) => {
                    *d += 1;
                    *by += len as u64;
                }
                _ => {
                    if let Some((c, d, by)) = mine.take() {
                        c.count(d, by);
                    }
                    mine = Some((from.clone(), 1, len as u64));
                }
            }
            match (inside, self.shared.main.get()) {
                (Some((client, ch)), Some(main)) => {
                    // Relayed twice: out of the sender's allocation, into the peer's.
                    relayed.0 += 2;
                    relayed.1 += 2 * len as u64;
                    let mut head = [0u8; 4];
                    head[0..2].copy_from_slice(&ch.to_be_bytes());
                    head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                    order.push((main.clone(), *client, i, Some(head)));
                }
                _ => {
                    relayed.0 += 1;
                    relayed.1 += len as u64;
                    order.push((from.relay.clone(), *peer, i, None));
                }
            }
        }
        // Datagrams to one destination next to each other (in the order they came): a run
        // leaves in one GSO send, which the kernel routes, filters and delivers as one packet.
        // Only datagrams of different flows change places.
        order.sort_by_key(|(sock, to, _, _)| (Arc::as_ptr(sock) as usize, *to));
        for (sock, to, i, head) in order.drain(..) {
            let (d, _) = b.datagram(i);
            let len = u16::from_be_bytes([d[2], d[3]]) as usize;
            let body = &d[4..4 + len];
            match head {
                Some(head) => out.push(&sock, to, &head, body),
                None => out.push(&sock, to, &[], body),
            }
        }
        if let Some((c, d, by)) = mine {
            c.count(d, by);
        }
        Metrics::add(&self.shared.metrics.turn_packets_relayed_total, relayed.0);
        Metrics::add(&self.shared.metrics.turn_bytes_relayed_total, relayed.1);
        out.flush(&self.shared).await;
        b.outbox = out;
        b.order = order;
    }
}

/// Decodes XOR-PEER-ADDRESS values (RFC 8656 §18.3) of a message; None if one is malformed.
fn peer_addresses(m: &Message) -> Option<Vec<IpAddr>> {
    let mut out = vec![];
    for a in m
        .attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
    {
        let v = &a.value;
        if v.len() < 4 {
            return None;
        }
        let cookie = MAGIC_COOKIE.to_be_bytes();
        match (v[1], v.len()) {
            (0x01, 8) => {
                let b: [u8; 4] = std::array::from_fn(|i| v[4 + i] ^ cookie[i]);
                out.push(IpAddr::V4(Ipv4Addr::from(b)));
            }
            (0x02, 20) => {
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&cookie);
                key[4..].copy_from_slice(&m.transaction_id.0);
                let b: [u8; 16] = std::array::from_fn(|i| v[4 + i] ^ key[i]);
                out.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            _ => return None,
        }
    }
    Some(out)
}

fn error_response(m: &Message, code: ErrorCode, reason: &str) -> Option<Vec<u8>> {
    let mut r = Message::new();
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(m.transaction_id),
        Box::new(MessageType::new(m.typ.method, CLASS_ERROR_RESPONSE)),
        Box::new(ErrorCodeAttribute {
            code,
            reason: reason.as_bytes().to_vec(),
        }),
    ];
    r.build(&setters).ok()?;
    Some(r.raw)
}

/// The success answer to a Binding request from `src` (XOR-MAPPED-ADDRESS), if it is one.
fn binding_answer(buf: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
    if !stun::message::is_message(buf) {
        return None;
    }
    let mut m = Message::new();
    m.raw = buf.to_vec();
    m.decode().ok()?;
    if m.typ.method != METHOD_BINDING || m.typ.class != CLASS_REQUEST {
        return None;
    }
    let mut r = Message::new();
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(m.transaction_id),
        Box::new(MessageType::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE)),
        Box::new(stun::xoraddr::XorMappedAddress {
            ip: src.ip(),
            port: src.port(),
        }),
        Box::new(stun::fingerprint::FINGERPRINT),
    ];
    r.build(&setters).ok()?;
    Some(r.raw)
}

/// Serves Binding requests only (the alternate STUN port), rate-limited per source like the
/// main port; everything else is dropped.
pub async fn stun_only(sock: UdpSocket, metrics: Arc<Metrics>, limits: UdpLimits) {
    let mut limiter = Limiter::new(limits.requests_per_sec, limits.requests_burst, 65_536);
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, src)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Some(reply) = binding_answer(&buf[..n], src) else {
            Metrics::inc(&metrics.malformed_total);
            continue;
        };
        Metrics::inc(&metrics.stun_requests_total);
        if !limiter.allow(&src.ip(), Instant::now()) {
            Metrics::inc(&metrics.rate_limited_total);
            continue;
        }
        let _ = sock.send_to(&reply, src).await;
    }
}

/// A 401 or 438 carrying `nonce` and `realm`, as the TURN server itself would answer.
fn nonce_challenge(m: &Message, code: ErrorCode, nonce: &str, realm: &str) -> Option<Vec<u8>> {
    let mut r = Message::new();
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(m.transaction_id),
        Box::new(MessageType::new(m.typ.method, CLASS_ERROR_RESPONSE)),
        Box::new(ErrorCodeAttribute {
            code,
            reason: vec![],
        }),
        Box::new(stun::textattrs::TextAttribute::new(
            ATTR_NONCE,
            nonce.to_string(),
        )),
        Box::new(stun::textattrs::TextAttribute::new(
            ATTR_REALM,
            realm.to_string(),
        )),
    ];
    r.build(&setters).ok()?;
    Some(r.raw)
}

impl UdpShared {
    /// Verifies USERNAME (form, expiry) and MESSAGE-INTEGRITY against our secret before the TURN
    /// server sees the request, so failures are counted here and the crate logs nothing.
    fn check_integrity(&self, m: &Message) -> Result<(), (String, &'static str)> {
        let user = m
            .get(ATTR_USERNAME)
            .map(|u| String::from_utf8_lossy(&u).into_owned())
            .map_err(|_| (String::new(), "no username"))?;
        let realm = m
            .get(ATTR_REALM)
            .map(|r| String::from_utf8_lossy(&r).into_owned())
            .map_err(|_| (user.clone(), "no realm"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if let Err(e) = tern_proto::relay_auth::check_username(&user, now) {
            return Err((
                user,
                if matches!(e, tern_proto::relay_auth::CredentialError::Expired(_)) {
                    "expired"
                } else {
                    "malformed username"
                },
            ));
        }
        if self.revoked.refuses_username(&user) {
            return Err((user, "revoked (the peer was removed or its login ended)"));
        }
        let password = tern_proto::relay_auth::password_for(&self.secret, &user);
        let key = turn::auth::generate_auth_key(&user, &realm, &password);
        let mut copy = m.clone();
        stun::integrity::MessageIntegrity(key)
            .check(&mut copy)
            .map_err(|_| (user, "wrong password"))
    }

    /// Decides what to do with a datagram from `src` (pure apart from counters and tables).
    pub fn inspect(&self, buf: &[u8], src: SocketAddr, now: Instant) -> Verdict {
        if buf.len() >= 4 && (0x40..=0x7f).contains(&buf[0]) {
            return Verdict::Pass; // ChannelData: counted by the relay socket.
        }
        if !stun::message::is_message(buf) {
            Metrics::inc(&self.metrics.malformed_total);
            return Verdict::Drop;
        }
        let mut m = Message::new();
        m.raw = buf.to_vec();
        if m.decode().is_err() {
            Metrics::inc(&self.metrics.malformed_total);
            return Verdict::Drop;
        }
        let (method, class) = (m.typ.method, m.typ.class);
        if method == METHOD_BINDING && class == CLASS_REQUEST {
            Metrics::inc(&self.metrics.stun_requests_total);
        }
        if class == CLASS_REQUEST
            && !(lock(&self.limiter).allow(&src.ip(), now) && lock(&self.global).allow(&(), now))
        {
            Metrics::inc(&self.metrics.rate_limited_total);
            return Verdict::Drop;
        }
        let checks_peer = (method == METHOD_CREATE_PERMISSION || method == METHOD_CHANNEL_BIND)
            && class == CLASS_REQUEST
            || method == METHOD_SEND && class == CLASS_INDICATION;
        if checks_peer {
            let Some(peers) = peer_addresses(&m) else {
                Metrics::inc(&self.metrics.malformed_total);
                return Verdict::Drop;
            };
            if let Some(bad) = peers.iter().find(|ip| !self.filter.allows(**ip)) {
                Metrics::inc(&self.metrics.forbidden_peer_total);
                debug!(%src, peer = %bad, "relaying to this peer address is not allowed");
                if class == CLASS_REQUEST {
                    return error_response(&m, CODE_FORBIDDEN, "Forbidden peer address")
                        .map_or(Verdict::Drop, Verdict::Reply);
                }
                return Verdict::Drop;
            }
        }
        if class == CLASS_REQUEST && m.contains(ATTR_MESSAGE_INTEGRITY) {
            if let Err(why) = self.check_integrity(&m) {
                self.auth_failed(&why.0, src, why.1);
                return error_response(&m, CODE_UNAUTHORIZED, "Unauthorized")
                    .map_or(Verdict::Drop, Verdict::Reply);
            }
        }
        // Nonces: answered here from the crate's current one where possible (see NonceBook).
        if class == CLASS_REQUEST && method != METHOD_BINDING {
            let book = lock(&self.nonces);
            if let Some(current) = book.current(now) {
                if !m.contains(ATTR_MESSAGE_INTEGRITY) {
                    return nonce_challenge(&m, CODE_UNAUTHORIZED, current, &self.realm)
                        .map_or(Verdict::Drop, Verdict::Reply);
                }
                let carried = m
                    .get(ATTR_NONCE)
                    .map(|n| String::from_utf8_lossy(&n).into_owned())
                    .unwrap_or_default();
                if !book.knows(&carried, now) {
                    return nonce_challenge(&m, CODE_STALE_NONCE, current, &self.realm)
                        .map_or(Verdict::Drop, Verdict::Reply);
                }
            }
        }
        if method == METHOD_ALLOCATE && class == CLASS_REQUEST {
            let user = m
                .get(ATTR_USERNAME)
                .ok()
                .map(|u| String::from_utf8_lossy(&u).into_owned());
            if let Some(user) = &user {
                let total = Metrics::get(&self.metrics.allocations_active);
                let mine = lock(&self.per_user).get(user).copied().unwrap_or(0);
                if total >= self.limits.max_allocations
                    || mine >= self.limits.max_allocations_per_user
                {
                    Metrics::inc(&self.metrics.allocations_refused_total);
                    return error_response(
                        &m,
                        CODE_ALLOC_QUOTA_REACHED,
                        "Allocation Quota Reached",
                    )
                    .map_or(Verdict::Drop, Verdict::Reply);
                }
            }
            *lock(&self.current_user) = user;
        }
        Verdict::Pass
    }
}

#[async_trait::async_trait]
impl Conn for FrontConn {
    async fn connect(&self, _addr: SocketAddr) -> UResult<()> {
        Err(webrtc_util::Error::Other("listener cannot connect".into()))
    }
    async fn recv(&self, _buf: &mut [u8]) -> UResult<usize> {
        Err(webrtc_util::Error::Other("use recv_from".into()))
    }
    async fn recv_from(&self, buf: &mut [u8]) -> UResult<(usize, SocketAddr)> {
        let mut b = self.rx.lock().await;
        loop {
            let Some((n, src)) = b.next(buf) else {
                b.receive(&self.sock).await?;
                self.fast_forward(&mut b).await;
                continue;
            };
            match self.shared.inspect(&buf[..n], src, Instant::now()) {
                Verdict::Pass => {
                    if is_allocate(&buf[..n]) {
                        self.shared.fast.allocating(src);
                    } else if let Some((tx, channel, peer)) = channel_bind(&buf[..n]) {
                        self.shared.fast.bind_requested(tx, src, channel, peer);
                    }
                    return Ok((n, src));
                }
                Verdict::Drop => continue,
                Verdict::Reply(r) => {
                    let _ = self.sock.send_to(&r, src).await;
                }
            }
        }
    }
    async fn send(&self, _buf: &[u8]) -> UResult<usize> {
        Err(webrtc_util::Error::Other("use send_to".into()))
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> UResult<usize> {
        if let Some(tx) = channel_bind_success(buf) {
            self.shared.fast.bind_succeeded(&tx, Instant::now());
        }
        if let Some(n) = issued_nonce(buf) {
            lock(&self.shared.nonces).record(&n, Instant::now());
            Metrics::inc(&self.shared.metrics.turn_nonces_issued_total);
        }
        Ok(self.sock.send_to(buf, target).await?)
    }
    fn local_addr(&self) -> UResult<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }
    /// The crate closes the listener "turn socket" whenever one allocation ends; the listener
    /// must outlive that, so closing is a no-op here.
    async fn close(&self) -> UResult<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Time-limited coturn-style credentials (`<expiry>:<peer-id>`, HMAC-SHA1 password).
pub struct CoturnAuth {
    pub shared: Arc<UdpShared>,
}

impl turn::auth::AuthHandler for CoturnAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if let Err(e) = tern_proto::relay_auth::check_username(username, now) {
            self.shared.auth_failed(username, src, &e.to_string());
            return Err(turn::Error::Other(e.to_string()));
        }
        if self.shared.revoked.refuses_username(username) {
            self.shared.auth_failed(username, src, "revoked");
            return Err(turn::Error::Other("credentials revoked".into()));
        }
        let password = tern_proto::relay_auth::password_for(&self.shared.secret, username);
        // The front already verified MESSAGE-INTEGRITY with the same key (and counted failures).
        Ok(turn::auth::generate_auth_key(username, realm, &password))
    }
}

/// Allocates relay sockets in `[min_port, max_port]` on `bind_ip`, advertised as `public_ip`.
pub struct RelayGen {
    pub shared: Arc<UdpShared>,
    pub bind_ip: IpAddr,
    pub public_ip: IpAddr,
    pub min_port: u16,
    pub max_port: u16,
}

#[async_trait::async_trait]
impl turn::relay::RelayAddressGenerator for RelayGen {
    fn validate(&self) -> Result<(), turn::Error> {
        if self.min_port == 0 || self.max_port < self.min_port {
            return Err(turn::Error::Other(format!(
                "bad relay port range {}-{}",
                self.min_port, self.max_port
            )));
        }
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let user = lock(&self.shared.current_user).take().unwrap_or_default();
        let ip = if use_ipv4 == self.bind_ip.is_ipv4() {
            self.bind_ip
        } else {
            return Err(turn::Error::Other(
                "address family not served by this relay".into(),
            ));
        };
        let span = u32::from(self.max_port - self.min_port) + 1;
        let mut tries: Vec<u16> = if requested_port != 0 {
            vec![requested_port]
        } else {
            (0..16)
                .map(|_| self.min_port + (rand::random::<u32>() % span) as u16)
                .collect()
        };
        // Then a linear sweep so a nearly full range still finds its free ports.
        if requested_port == 0 {
            tries.extend(self.min_port..=self.max_port);
        }
        for port in tries {
            let Ok(sock) = UdpSocket::bind(SocketAddr::new(ip, port)).await else {
                continue;
            };
            size_buffers(&sock, 4 << 20);
            // Runs of datagrams from a peer (an agent's GSO sends) arrive in one read.
            tern_udp::enable_gro(&sock);
            let local = sock.local_addr()?;
            let sock = Arc::new(sock);
            let relayed = SocketAddr::new(self.public_ip, local.port());
            let channels = self.shared.fast.allocated(sock.clone(), relayed, &user);
            *lock(&self.shared.per_user).entry(user.clone()).or_insert(0) += 1;
            Metrics::inc(&self.shared.metrics.allocations_active);
            Metrics::inc(&self.shared.metrics.allocations_total);
            let conn = RelayConn {
                sock,
                shared: self.shared.clone(),
                user: user.clone(),
                closed: AtomicBool::new(false),
                channels,
                rx: tokio::sync::Mutex::new(Batch::new(RELAY_RECEIVES)),
            };
            return Ok((
                Arc::new(conn),
                SocketAddr::new(self.public_ip, local.port()),
            ));
        }
        Err(turn::Error::ErrMaxRetriesExceeded)
    }
}

pub struct RelayConn {
    sock: Arc<UdpSocket>,
    shared: Arc<UdpShared>,
    user: String,
    closed: AtomicBool,
    /// This allocation's bound channels (the fast path back to the client).
    channels: Option<Arc<Channels>>,
    /// The last receive and what of it the crate has yet to see.
    rx: tokio::sync::Mutex<Batch>,
}

/// The crate drops a relay conn without closing it when it tries another port (EVEN-PORT):
/// its socket must go then too, and with it the fast-path entry that shares it.
impl Drop for RelayConn {
    fn drop(&mut self) {
        if let Some(c) = &self.channels {
            self.shared.fast.freed(c.client, &self.sock);
        }
    }
}

#[async_trait::async_trait]
impl Conn for RelayConn {
    async fn connect(&self, addr: SocketAddr) -> UResult<()> {
        Ok(self.sock.connect(addr).await?)
    }
    async fn recv(&self, buf: &mut [u8]) -> UResult<usize> {
        Ok(self.sock.recv(buf).await?)
    }
    /// Datagrams from a peer: straight back to the client as ChannelData when the peer has a
    /// bound channel (the fast path; a run of them in one GSO send), else to the crate.
    async fn recv_from(&self, buf: &mut [u8]) -> UResult<(usize, SocketAddr)> {
        let mut guard = self.rx.lock().await;
        let b = &mut *guard;
        loop {
            if let Some(got) = b.next(buf) {
                return Ok(got);
            }
            b.receive(&self.sock).await?;
            let bytes: usize = b.got.iter().map(|g| g.2).sum();
            Metrics::add(
                &self.shared.metrics.turn_packets_relayed_total,
                b.got.len() as u64,
            );
            Metrics::add(&self.shared.metrics.turn_bytes_relayed_total, bytes as u64);
            if let Some(c) = &self.channels {
                c.count(b.got.len() as u64, bytes as u64);
            }
            let (Some(channels), Some(main)) = (&self.channels, self.shared.main.get()) else {
                let n = b.got.len();
                b.pending.extend(0..n);
                continue;
            };
            let now = Instant::now();
            let mut out = std::mem::take(&mut b.outbox);
            let mut last: Option<(SocketAddr, Option<u16>)> = None;
            for i in 0..b.got.len() {
                let (d, from) = b.datagram(i);
                if last.is_none_or(|(f, _)| f != from) {
                    last = Some((from, channels.channel_for(from, now)));
                }
                let Some((_, Some(channel))) = last else {
                    b.pending.push_back(i);
                    continue;
                };
                let mut head = [0u8; 4];
                head[0..2].copy_from_slice(&channel.to_be_bytes());
                head[2..4].copy_from_slice(&(d.len() as u16).to_be_bytes());
                out.push(main, channels.client, &head, d);
            }
            out.flush(&self.shared).await;
            b.outbox = out;
        }
    }
    async fn send(&self, buf: &[u8]) -> UResult<usize> {
        Ok(self.sock.send(buf).await?)
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> UResult<usize> {
        if !self.shared.filter.allows_addr(target) {
            Metrics::inc(&self.shared.metrics.forbidden_peer_total);
            return Ok(buf.len());
        }
        let n = self.sock.send_to(buf, target).await?;
        Metrics::inc(&self.shared.metrics.turn_packets_relayed_total);
        Metrics::add(&self.shared.metrics.turn_bytes_relayed_total, n as u64);
        if let Some(c) = &self.channels {
            c.count(1, n as u64);
        }
        Ok(n)
    }
    fn local_addr(&self) -> UResult<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }
    async fn close(&self) -> UResult<()> {
        if !self.closed.swap(true, Ordering::SeqCst) {
            if let Some(c) = &self.channels {
                self.shared.fast.freed(c.client, &self.sock);
            }
            Metrics::dec(&self.shared.metrics.allocations_active);
            let mut per_user = lock(&self.shared.per_user);
            if let Some(n) = per_user.get_mut(&self.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_user.remove(&self.user);
                }
            }
        }
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::agent::TransactionId;
    use stun::message::BINDING_REQUEST;

    fn shared() -> Arc<UdpShared> {
        UdpShared::new(
            Arc::new(Metrics::default()),
            PeerFilter::new(None, vec![]),
            b"s".to_vec(),
            "tern".into(),
            UdpLimits {
                requests_per_sec: 1.0,
                requests_burst: 2.0,
                ..UdpLimits::default()
            },
        )
    }

    fn src() -> SocketAddr {
        "198.51.100.7:5000".parse().expect("addr")
    }

    fn permission_to(ip: IpAddr) -> Vec<u8> {
        let mut m = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST)),
            Box::new(turn::proto::peeraddr::PeerAddress { ip, port: 9 }),
        ];
        m.build(&setters).expect("build");
        m.raw
    }

    #[tokio::test]
    async fn the_alternate_port_answers_binding_requests_only() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(stun_only(server, metrics.clone(), UdpLimits::default()));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let me = client.local_addr().expect("addr");
        client
            .send_to(b"not stun at all", addr)
            .await
            .expect("send");
        let mut m = Message::new();
        m.build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
            .expect("build");
        client.send_to(&m.raw, addr).await.expect("send");
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .expect("answered in time")
            .expect("recv");
        let mut r = Message::new();
        r.raw = buf[..n].to_vec();
        r.decode().expect("decode");
        assert_eq!(r.transaction_id, m.transaction_id);
        let mut x = stun::xoraddr::XorMappedAddress::default();
        stun::message::Getter::get_from(&mut x, &r).expect("mapped address");
        assert_eq!(SocketAddr::new(x.ip, x.port), me);
        assert_eq!(
            Metrics::get(&metrics.malformed_total),
            1,
            "the junk was dropped"
        );
    }

    #[test]
    fn binding_requests_are_rate_limited_per_source() {
        let s = shared();
        let mut m = Message::new();
        m.build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
            .expect("build");
        let t = Instant::now();
        assert_eq!(s.inspect(&m.raw, src(), t), Verdict::Pass);
        assert_eq!(s.inspect(&m.raw, src(), t), Verdict::Pass);
        assert_eq!(
            s.inspect(&m.raw, src(), t),
            Verdict::Drop,
            "burst of 2 spent"
        );
        assert_eq!(Metrics::get(&s.metrics.rate_limited_total), 1);
        assert_eq!(
            s.inspect(&m.raw, "198.51.100.8:1".parse().expect("addr"), t),
            Verdict::Pass
        );
    }

    fn allocate() -> Vec<u8> {
        let mut m = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        ];
        m.build(&setters).expect("build");
        m.raw
    }

    fn nonce_of(v: Verdict, want: ErrorCode) -> String {
        let Verdict::Reply(r) = v else {
            panic!("expected a reply, got {v:?}")
        };
        let mut m = Message::new();
        m.raw = r;
        m.decode().expect("decode");
        let mut e = ErrorCodeAttribute::default();
        stun::message::Getter::get_from(&mut e, &m).expect("error code");
        assert_eq!(e.code.0, want.0);
        let realm = m.get(ATTR_REALM).expect("realm");
        assert_eq!(realm, b"tern");
        String::from_utf8(m.get(ATTR_NONCE).expect("nonce")).expect("utf8")
    }

    #[test]
    fn unauthenticated_requests_get_the_crates_current_nonce_from_the_front() {
        let s = UdpShared::new(
            Arc::new(Metrics::default()),
            PeerFilter::new(None, vec![]),
            b"s".to_vec(),
            "tern".into(),
            UdpLimits::default(),
        );
        let t = Instant::now();
        // No nonce known yet: the crate answers (and creates one).
        assert_eq!(s.inspect(&allocate(), src(), t), Verdict::Pass);
        let mut req = Message::new();
        req.raw = allocate();
        req.decode().expect("decode");
        let crate_answer =
            nonce_challenge(&req, CODE_UNAUTHORIZED, "nonce-from-the-crate", "tern").expect("401");
        assert_eq!(
            issued_nonce(&crate_answer).as_deref(),
            Some("nonce-from-the-crate")
        );
        assert_eq!(
            issued_nonce(&allocate()),
            None,
            "requests carry no new nonce"
        );
        assert_eq!(
            issued_nonce(&[0x40, 0, 0, 4, 1, 2, 3, 4]),
            None,
            "ChannelData"
        );
        lock(&s.nonces).record("nonce-from-the-crate", t);
        // From then on the front answers, from any number of sources: the crate sees none.
        for i in 0..1000u32 {
            let from = SocketAddr::from(([198, 51, (i / 250) as u8, (i % 250) as u8], 4000));
            assert_eq!(
                nonce_of(s.inspect(&allocate(), from, t), CODE_UNAUTHORIZED),
                "nonce-from-the-crate"
            );
        }
        // After 50 minutes the crate makes a fresh one (it accepts each for an hour).
        let later = t + NonceBook::HAND_OUT_FOR;
        assert_eq!(s.inspect(&allocate(), src(), later), Verdict::Pass);
    }

    #[test]
    fn the_nonce_book_accepts_recent_crate_nonces_only_and_stays_small() {
        let t = Instant::now();
        let mut b = NonceBook::default();
        assert!(b.current(t).is_none());
        b.record("a", t);
        assert_eq!(b.current(t), Some("a"));
        assert!(b.knows("a", t + NonceBook::ACCEPT_FOR - Duration::from_secs(1)));
        assert!(
            !b.knows("a", t + NonceBook::ACCEPT_FOR),
            "too old for the crate"
        );
        assert!(!b.knows("made-up", t));
        for i in 0..5000 {
            b.record(&format!("n{i}"), t + Duration::from_millis(i));
        }
        assert!(b.issued.len() <= NonceBook::MAX_ISSUED);
        assert_eq!(b.current(t + Duration::from_secs(5)), Some("n4999"));
    }

    #[test]
    fn permissions_to_forbidden_peers_get_403() {
        let s = shared();
        let t = Instant::now();
        match s.inspect(&permission_to("127.0.0.1".parse().expect("ip")), src(), t) {
            Verdict::Reply(r) => {
                let mut m = Message::new();
                m.raw = r;
                m.decode().expect("decode");
                assert_eq!(m.typ.class, CLASS_ERROR_RESPONSE);
                let mut e = ErrorCodeAttribute::default();
                stun::message::Getter::get_from(&mut e, &m).expect("error code");
                assert_eq!(e.code.0, CODE_FORBIDDEN.0);
            }
            v => panic!("expected 403, got {v:?}"),
        }
        assert_eq!(
            s.inspect(
                &permission_to("203.0.113.10".parse().expect("ip")),
                src(),
                t
            ),
            Verdict::Pass
        );
        let v6 = s.inspect(
            &permission_to("::1".parse().expect("ip")),
            "[2001:db8::1]:5".parse().expect("a"),
            t,
        );
        assert!(matches!(v6, Verdict::Reply(_)), "IPv6 loopback refused too");
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let s = shared();
        let t = Instant::now();
        let mut rng_state = 0x1234_5678_u64;
        for len in 0..2000usize {
            let buf: Vec<u8> = (0..(len % 300))
                .map(|_| {
                    rng_state ^= rng_state << 13;
                    rng_state ^= rng_state >> 7;
                    rng_state ^= rng_state << 17;
                    rng_state as u8
                })
                .collect();
            let _ = s.inspect(&buf, src(), t);
        }
        // Truncations of a valid message.
        let p = permission_to("203.0.113.10".parse().expect("ip"));
        for cut in 0..p.len() {
            let _ = s.inspect(&p[..cut], src(), t);
        }
        assert!(Metrics::get(&s.metrics.malformed_total) > 0);
    }
}
