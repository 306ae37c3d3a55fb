//! The fast path for bound channels. Once the TURN crate has accepted a ChannelBind (its success
//! answer goes out through our front), ChannelData from that client on that channel goes straight
//! out of the allocation's relay socket to the peer, and datagrams from that peer to the relay
//! socket go straight back to the client as ChannelData: one table lookup per datagram instead of
//! the crate's per-packet path (its allocation lookups, locks and copies). Everything else
//! (requests, Send/Data indications, unbound channels, expired bindings) still goes through the
//! crate, which stays the authority: an entry here lives only while the binding is fresher than a
//! permission's lifetime (5 min, RFC 8656 §9), and goes with the allocation.
//!
//! When the peer is another allocation on this server (both agents relayed through it), the
//! datagram does not cross the sockets at all: it goes straight to that allocation's client as
//! ChannelData on the channel the client bound to the sender's relayed address, which is what
//! the two sockets would have done (a channel bound there is also the permission). Without such
//! a channel it takes the sockets, and the crate decides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// How long a ChannelBind keeps its fast-path entry (a permission's lifetime; clients refresh
/// bindings before then, and the crate decides what happens after).
pub const FRESH: Duration = Duration::from_secs(300);
/// ChannelBind requests waiting for the crate's answer, at most.
const MAX_PENDING: usize = 4096;

type TxId = [u8; 12];

/// The channels of one allocation.
pub struct Channels {
    pub client: SocketAddr,
    pub relay: Arc<UdpSocket>,
    /// The relayed address as clients and peers see it (public address, relay port).
    pub relayed: SocketAddr,
    /// The TURN username the allocation was made with.
    pub user: String,
    by_channel: RwLock<HashMap<u16, (SocketAddr, Instant)>>,
    by_peer: RwLock<HashMap<SocketAddr, (u16, Instant)>>,
    /// Datagrams and payload bytes relayed for this allocation, both ways (its load).
    datagrams: AtomicU64,
    bytes: AtomicU64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Channels {
    /// Counts `datagrams` of `bytes` in all relayed for this allocation.
    pub fn count(&self, datagrams: u64, bytes: u64) {
        self.datagrams.fetch_add(datagrams, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (datagrams, bytes) relayed for this allocation so far.
    pub fn relayed(&self) -> (u64, u64) {
        (
            self.datagrams.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// The channel bound to `peer`, if the binding is fresh.
    pub fn channel_for(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        read(&self.by_peer)
            .get(&peer)
            .filter(|(_, at)| now.saturating_duration_since(*at) < FRESH)
            .map(|(c, _)| *c)
    }

    fn bind(&self, channel: u16, peer: SocketAddr, now: Instant) {
        let mut by_channel = write(&self.by_channel);
        let mut by_peer = write(&self.by_peer);
        // A channel moves to another peer only after its binding expired (the crate checks).
        if let Some((old, _)) = by_channel.insert(channel, (peer, now)) {
            if old != peer {
                by_peer.remove(&old);
            }
        }
        by_peer.insert(peer, (channel, now));
    }
}

#[derive(Default)]
pub struct FastPath {
    allocs: RwLock<HashMap<SocketAddr, Arc<Channels>>>,
    /// The same allocations by relayed address.
    by_relayed: RwLock<HashMap<SocketAddr, Arc<Channels>>>,
    pending: Mutex<HashMap<TxId, (SocketAddr, u16, SocketAddr)>>,
    /// The client whose Allocate request the crate is handling (it handles one datagram at a
    /// time per listener, so the relay socket it asks for next belongs to this client).
    current: Mutex<Option<SocketAddr>>,
}

impl FastPath {
    pub fn allocating(&self, client: SocketAddr) {
        *lock(&self.current) = Some(client);
    }

    /// The crate opened `relay` for the client of the Allocate request being handled (it may
    /// open several and keep one: the last one opened replaces the others here, and the ones it
    /// drops leave with their socket, see [`FastPath::freed`]).
    pub fn allocated(
        &self,
        relay: Arc<UdpSocket>,
        relayed: SocketAddr,
        user: &str,
    ) -> Option<Arc<Channels>> {
        let client = (*lock(&self.current))?;
        let c = Arc::new(Channels {
            client,
            relay,
            relayed,
            user: user.to_string(),
            by_channel: RwLock::new(HashMap::new()),
            by_peer: RwLock::new(HashMap::new()),
            datagrams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        write(&self.allocs).insert(client, c.clone());
        write(&self.by_relayed).insert(relayed, c.clone());
        Some(c)
    }

    /// The allocation of `client` ended.
    pub fn freed(&self, client: SocketAddr, relay: &Arc<UdpSocket>) {
        let mut allocs = write(&self.allocs);
        if let Some(c) = allocs
            .get(&client)
            .filter(|c| Arc::ptr_eq(&c.relay, relay))
            .cloned()
        {
            allocs.remove(&client);
            let mut by_relayed = write(&self.by_relayed);
            if by_relayed
                .get(&c.relayed)
                .is_some_and(|o| Arc::ptr_eq(&o.relay, relay))
            {
                by_relayed.remove(&c.relayed);
            }
        }
    }

    /// The allocation on this server whose relayed address is `addr`.
    pub fn local(&self, addr: SocketAddr) -> Option<Arc<Channels>> {
        read(&self.by_relayed).get(&addr).cloned()
    }

    /// A ChannelBind request passed the front (the crate decides next).
    pub fn bind_requested(&self, tx: TxId, client: SocketAddr, channel: u16, peer: SocketAddr) {
        let mut p = lock(&self.pending);
        if p.len() >= MAX_PENDING {
            p.clear();
        }
        p.insert(tx, (client, channel, peer));
    }

    /// The crate accepted the ChannelBind with transaction `tx`.
    pub fn bind_succeeded(&self, tx: &TxId, now: Instant) {
        let Some((client, channel, peer)) = lock(&self.pending).remove(tx) else {
            return;
        };
        if let Some(c) = read(&self.allocs).get(&client) {
            c.bind(channel, peer, now);
        }
    }

    /// Where ChannelData from `client` on `channel` goes: (the client's allocation, peer).
    pub fn route(
        &self,
        client: SocketAddr,
        channel: u16,
        now: Instant,
    ) -> Option<(Arc<Channels>, SocketAddr)> {
        let allocs = read(&self.allocs);
        let c = allocs.get(&client)?;
        let peer = read(&c.by_channel)
            .get(&channel)
            .filter(|(_, at)| now.saturating_duration_since(*at) < FRESH)
            .map(|(p, _)| *p)?;
        Some((c.clone(), peer))
    }

    pub fn allocations(&self) -> usize {
        read(&self.allocs).len()
    }

    /// Every allocation now.
    pub fn all(&self) -> Vec<Arc<Channels>> {
        read(&self.allocs).values().cloned().collect()
    }
}

/// A ChannelBind request's transaction id, channel number and peer (XOR-PEER-ADDRESS), if `buf`
/// is one (header checked first: most datagrams are not).
pub fn channel_bind(buf: &[u8]) -> Option<(TxId, u16, SocketAddr)> {
    use stun::message::{Getter, Message, CLASS_REQUEST, METHOD_CHANNEL_BIND};
    if buf.len() < 20 || buf[0] != 0x00 || buf[1] != 0x09 {
        return None;
    }
    let mut m = Message::new();
    m.raw = buf.to_vec();
    m.decode().ok()?;
    if m.typ.method != METHOD_CHANNEL_BIND || m.typ.class != CLASS_REQUEST {
        return None;
    }
    let mut ch = turn::proto::channum::ChannelNumber::default();
    ch.get_from(&m).ok()?;
    let mut peer = turn::proto::peeraddr::PeerAddress::default();
    peer.get_from(&m).ok()?;
    Some((
        m.transaction_id.0,
        ch.0,
        SocketAddr::new(peer.ip, peer.port),
    ))
}

/// The transaction id of a ChannelBind success answer, if `buf` is one.
pub fn channel_bind_success(buf: &[u8]) -> Option<TxId> {
    // Type 0x0109: ChannelBind success response.
    if buf.len() < 20 || buf[0] != 0x01 || buf[1] != 0x09 {
        return None;
    }
    buf[8..20].try_into().ok()
}

/// Whether `buf` is an Allocate request (type 0x0003).
pub fn is_allocate(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] == 0x00 && buf[1] == 0x03
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[tokio::test]
    async fn only_accepted_fresh_bindings_take_the_fast_path() {
        let f = FastPath::default();
        let relay = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let client = addr("198.51.100.7:5000");
        let peer = addr("203.0.113.9:7000");
        let relayed = addr("192.0.2.1:50000");
        assert!(
            f.allocated(relay.clone(), relayed, "u").is_none(),
            "no Allocate being handled"
        );
        f.allocating(client);
        let ch = f.allocated(relay.clone(), relayed, "u").expect("channels");
        assert!(Arc::ptr_eq(&f.local(relayed).expect("local"), &ch));
        let t0 = Instant::now();
        f.bind_requested([1; 12], client, 0x4000, peer);
        assert!(
            f.route(client, 0x4000, t0).is_none(),
            "not before the crate accepts"
        );
        f.bind_succeeded(&[2; 12], t0);
        assert!(f.route(client, 0x4000, t0).is_none(), "another transaction");
        f.bind_succeeded(&[1; 12], t0);
        let (_, to) = f.route(client, 0x4000, t0).expect("route");
        assert_eq!(to, peer);
        assert_eq!(ch.channel_for(peer, t0), Some(0x4000));
        assert!(f.route(client, 0x4001, t0).is_none(), "unbound channel");
        assert!(
            f.route(addr("198.51.100.8:5000"), 0x4000, t0).is_none(),
            "another client"
        );
        let late = t0 + FRESH;
        assert!(
            f.route(client, 0x4000, late).is_none(),
            "stale: the crate decides"
        );
        assert!(ch.channel_for(peer, late).is_none());
        f.freed(client, &relay);
        assert!(
            f.route(client, 0x4000, t0).is_none(),
            "gone with the allocation"
        );
        assert_eq!(f.allocations(), 0);
        assert!(
            f.local(relayed).is_none(),
            "gone by its relayed address too"
        );
    }

    #[test]
    fn channel_bind_requests_are_recognised() {
        use stun::agent::TransactionId;
        use stun::message::{Message, MessageType, Setter, CLASS_REQUEST, METHOD_CHANNEL_BIND};
        let mut m = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST)),
            Box::new(turn::proto::channum::ChannelNumber(0x4001)),
            Box::new(turn::proto::peeraddr::PeerAddress {
                ip: "203.0.113.9".parse().expect("ip"),
                port: 7000,
            }),
        ];
        m.build(&setters).expect("build");
        let (tx, ch, peer) = channel_bind(&m.raw).expect("bind");
        assert_eq!(tx, m.transaction_id.0);
        assert_eq!((ch, peer), (0x4001, addr("203.0.113.9:7000")));
        assert!(
            channel_bind(&[0x40, 0, 0, 4, 1, 2, 3, 4]).is_none(),
            "ChannelData"
        );
        assert!(!is_allocate(&m.raw));
    }
}
