//! The agent's one UDP port for WireGuard and ICE (as NetBird shares its WireGuard socket with
//! ICE): an IPv4 and an IPv6 socket bound to the same port. Each datagram is sorted by its first
//! bytes: WireGuard (message types 1-4 followed by three zero bytes) goes straight to the data
//! plane; STUN goes to webrtc-ice through its `UDPMux` (the connectivity checks), except the
//! answers to our own binding requests, which tell us our server-reflexive address (webrtc-ice
//! gathers none in muxed mode). Our TURN allocation lives on this port too ([`crate::turn`]):
//! what the TURN server relays is unwrapped here and sorted the same way.

use async_trait::async_trait;
use rand::RngCore;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};
use webrtc_ice::udp_mux::{UDPMuxDefault, UDPMuxParams};

/// STUN's magic cookie (RFC 8489 §5).
const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// What a datagram on the shared port is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    WireGuard,
    Stun,
    Other,
}

pub fn classify(d: &[u8]) -> Kind {
    if d.len() >= 4 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0] {
        Kind::WireGuard
    } else if d.len() >= 20 && d[0] & 0xc0 == 0 && d[4..8] == MAGIC {
        Kind::Stun
    } else {
        Kind::Other
    }
}

/// A STUN Binding request with a fresh transaction id.
fn binding_request() -> ([u8; 20], [u8; 12]) {
    let mut req = [0u8; 20];
    req[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    req[4..8].copy_from_slice(&MAGIC);
    let mut tx = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut tx);
    req[8..20].copy_from_slice(&tx);
    (req, tx)
}

/// The XOR-MAPPED-ADDRESS of a Binding success response (RFC 8489 §14.2), and its transaction.
pub fn mapped_address(d: &[u8]) -> Option<([u8; 12], SocketAddr)> {
    if d.len() < 20 || d[0..2] != [0x01, 0x01] || d[4..8] != MAGIC {
        return None;
    }
    let tx: [u8; 12] = d[8..20].try_into().ok()?;
    Some((tx, xor_address(stun_attr(d, 0x0020)?, &tx)?))
}

/// The value of the first attribute of type `t` of a STUN message (None when absent or the
/// message is malformed).
pub fn stun_attr(d: &[u8], t: u16) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*d.get(2)?, *d.get(3)?]));
    let attrs = d.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let at = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let l = usize::from(u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]));
        let v = attrs.get(i + 4..i + 4 + l)?;
        if at == t {
            return Some(v);
        }
        i += 4 + l.div_ceil(4) * 4;
    }
    None
}

/// An XOR-MAPPED-ADDRESS or XOR-PEER-ADDRESS value (RFC 8489 §14.2) of transaction `tx`.
pub fn xor_address(v: &[u8], tx: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 8 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
    let ip = match v[1] {
        0x01 => {
            let mut a: [u8; 4] = v[4..8].try_into().ok()?;
            a.iter_mut().zip(MAGIC).for_each(|(b, m)| *b ^= m);
            IpAddr::from(a)
        }
        0x02 if v.len() >= 20 => {
            let mut a: [u8; 16] = v[4..20].try_into().ok()?;
            let key = MAGIC.iter().chain(tx.iter());
            a.iter_mut().zip(key).for_each(|(b, m)| *b ^= m);
            IpAddr::from(a)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A STUN Binding request's local username fragment (ours: the USERNAME is "ours:theirs").
pub fn binding_request_ufrag(d: &[u8]) -> Option<&str> {
    if d.len() < 20 || d[0..2] != [0x00, 0x01] || d[4..8] != MAGIC {
        return None;
    }
    let u = std::str::from_utf8(stun_attr(d, 0x0006)?).ok()?;
    u.split(':').next()
}

/// STUN relayed through our TURN allocation, with the stand-in address it came from.
pub type RelayedStun = mpsc::Receiver<(Vec<u8>, SocketAddr)>;

pub struct Shared {
    v4: Option<Arc<UdpSocket>>,
    v6: Option<Arc<UdpSocket>>,
    port: u16,
    /// GSO sends, with the fall back to one send per datagram.
    gso: crate::platform::sockopt::SegmentSender,
    to_ice: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    bindings: Mutex<HashMap<[u8; 12], oneshot::Sender<SocketAddr>>>,
    /// Our TURN allocation on this port ([`crate::turn`]), when the map has a TURN server.
    turn: Mutex<Option<crate::turn::Client>>,
    /// Wakes the allocation's task: it has something to send.
    pub turn_wake: tokio::sync::Notify,
    /// Stand-in addresses in IPv6 (ICE has no IPv4 candidate; see `crate::turn`).
    stand_ins_v6: std::sync::atomic::AtomicBool,
    /// STUN relayed to us through the allocation (a peer's ICE checks), by stand-in address:
    /// the engine hands it to ICE (see `Engine::relayed_stun_loop`).
    relayed_stun: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    relayed_stun_rx: Mutex<Option<RelayedStun>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

impl Shared {
    /// Binds the port (IPv4 and, when the host has it, IPv6) and the mux webrtc-ice uses.
    pub fn bind() -> anyhow::Result<(Arc<Shared>, Arc<UDPMuxDefault>)> {
        let mut last = None;
        for _ in 0..10 {
            let v4 = udp(SocketAddr::from(([0, 0, 0, 0], 0)));
            let port = match &v4 {
                Ok(s) => s.local_addr()?.port(),
                Err(_) => 0,
            };
            let v6 = udp(SocketAddr::from(([0u16; 8], port)));
            match (v4, v6) {
                (Err(e4), Err(e6)) => anyhow::bail!("cannot open a UDP socket: {e4}; {e6}"),
                // The IPv6 side took the port elsewhere: try another.
                (Ok(_), Err(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last = Some(e);
                    continue;
                }
                (v4, v6) => return Self::new(v4.ok(), v6.ok()),
            }
        }
        Err(anyhow::anyhow!(
            "no UDP port free on both IPv4 and IPv6: {last:?}"
        ))
    }

    fn new(
        v4: Option<std::net::UdpSocket>,
        v6: Option<std::net::UdpSocket>,
    ) -> anyhow::Result<(Arc<Shared>, Arc<UDPMuxDefault>)> {
        let tokio_sock =
            |s: Option<std::net::UdpSocket>| -> anyhow::Result<Option<Arc<UdpSocket>>> {
                let Some(s) = s else { return Ok(None) };
                let s = UdpSocket::from_std(s)?;
                if let Err(e) = crate::platform::sockopt::tune_udp(&s) {
                    debug!(error = %e, "could not size the UDP socket's buffers");
                }
                Ok(Some(Arc::new(s)))
            };
        let (v4, v6) = (tokio_sock(v4)?, tokio_sock(v6)?);
        let gro = v4
            .iter()
            .chain(v6.iter())
            .all(|s| crate::platform::sockopt::enable_gro(s));
        let port = v4
            .as_ref()
            .or(v6.as_ref())
            .map(|s| s.local_addr().map(|a| a.port()))
            .transpose()?
            .unwrap_or(0);
        let (to_ice, from_demux) = mpsc::channel(1024);
        let (relayed_stun, relayed_stun_rx) = mpsc::channel(256);
        let shared = Arc::new(Shared {
            v4,
            v6,
            port,
            gso: Default::default(),
            to_ice,
            bindings: Mutex::new(HashMap::new()),
            turn: Mutex::new(None),
            turn_wake: tokio::sync::Notify::new(),
            stand_ins_v6: Default::default(),
            relayed_stun,
            relayed_stun_rx: Mutex::new(Some(relayed_stun_rx)),
        });
        let conn = MuxConn {
            shared: shared.clone(),
            rx: tokio::sync::Mutex::new(from_demux),
        };
        let mux = UDPMuxDefault::new(UDPMuxParams::new(conn));
        info!(
            port,
            ipv4 = shared.v4.is_some(),
            ipv6 = shared.v6.is_some(),
            udp_gro = gro,
            "WireGuard and ICE share one UDP port"
        );
        Ok((shared, mux))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The sockets and their families, for the receive loops.
    pub fn sockets(&self) -> Vec<Arc<UdpSocket>> {
        self.v4.iter().chain(self.v6.iter()).cloned().collect()
    }

    fn socket_for(&self, to: &SocketAddr) -> Option<&Arc<UdpSocket>> {
        match to.ip() {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        }
    }

    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        if crate::turn::is_stand_in(&to) {
            let (framed, server) = self.frame(&to, data)?;
            return self.send_plain(&framed, server).await.map(|_| data.len());
        }
        self.send_plain(data, to).await
    }

    /// `data` for the peer behind stand-in `to`, framed for our TURN server, and the server.
    fn frame(&self, to: &SocketAddr, data: &[u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
        let t = lock(&self.turn);
        t.as_ref()
            .and_then(|c| Some((c.frame(to, data)?, c.server())))
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!("no TURN allocation relays to {to}"),
                )
            })
    }

    async fn send_plain(&self, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        let to = SocketAddr::new(to.ip().to_canonical(), to.port());
        match self.socket_for(&to) {
            Some(s) => s.send_to(data, to).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!(
                    "no {} socket for {to}",
                    if to.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            )),
        }
    }

    /// Sends datagrams of `seg` bytes laid end to end in `data` (the last may be shorter) to
    /// `to`: one `sendmsg` with UDP GSO, or one `sendto` each where the kernel refuses GSO. To a
    /// peer behind our TURN allocation, each goes as ChannelData in one GSO run to the server.
    pub async fn send_segments(
        &self,
        data: &[u8],
        seg: usize,
        to: SocketAddr,
    ) -> std::io::Result<()> {
        if crate::turn::is_stand_in(&to) {
            let route = lock(&self.turn)
                .as_ref()
                .and_then(|c| Some((c.channel(&to)?, c.server())));
            let Some((ch, server)) = route else {
                // Not bound yet: one Send indication each.
                for d in data.chunks(seg.max(1)) {
                    self.send_to(d, to).await?;
                }
                return Ok(());
            };
            let mut framed = Vec::with_capacity(data.len() + data.len().div_ceil(seg.max(1)) * 4);
            for d in data.chunks(seg.max(1)) {
                framed.extend_from_slice(&crate::turn::channel_header(ch, d.len()));
                framed.extend_from_slice(d);
            }
            let Some(sock) = self.socket_for(&server) else {
                return self.send_plain(&framed, server).await.map(drop);
            };
            return self.gso.send(sock, &framed, seg + 4, server).await;
        }
        let to = SocketAddr::new(to.ip().to_canonical(), to.port());
        let Some(sock) = self.socket_for(&to) else {
            return self.send_to(data, to).await.map(drop);
        };
        self.gso.send(sock, data, seg, to).await
    }

    /// Sets the TURN server our allocation lives on (None: no allocation). The same server with
    /// new credentials keeps its allocation (the credentials serve its next requests). Returns
    /// the request that frees an allocation left behind, and its server, for the caller to send.
    pub fn set_turn(&self, cfg: Option<crate::turn::Config>) -> Option<(Vec<u8>, SocketAddr)> {
        let mut t = lock(&self.turn);
        let old = match (t.as_mut(), cfg) {
            (Some(c), Some(cfg)) if c.config().url == cfg.url && c.server() == cfg.server => {
                c.set_credentials(cfg.username, cfg.password);
                None
            }
            (_, None) => t.take(),
            (_, Some(cfg)) => {
                info!(turn = %cfg.url, server = %cfg.server, "TURN allocation on the shared port: allocating");
                let mut c = crate::turn::Client::new(cfg, std::time::Instant::now());
                c.set_v6_stand_ins(self.stand_ins_v6.load(std::sync::atomic::Ordering::Relaxed));
                t.replace(c)
            }
        };
        drop(t);
        self.turn_wake.notify_one();
        let old = old?;
        Some((old.free()?, old.server()))
    }

    /// Which family stand-in addresses take from now on (see `crate::turn`).
    pub fn set_stand_in_family(&self, v6: bool) {
        let was = self
            .stand_ins_v6
            .swap(v6, std::sync::atomic::Ordering::Relaxed);
        if was != v6 {
            info!(
                family = if v6 { "IPv6" } else { "IPv4" },
                "peers behind our TURN allocation appear to ICE with stand-in addresses of this family"
            );
        }
        self.with_turn(|c| c.set_v6_stand_ins(v6));
    }

    /// Runs `f` on the allocation's client, when there is one.
    pub fn with_turn<R>(&self, f: impl FnOnce(&mut crate::turn::Client) -> R) -> Option<R> {
        lock(&self.turn).as_mut().map(f)
    }

    /// The TURN server of our allocation.
    pub fn turn_server(&self) -> Option<SocketAddr> {
        lock(&self.turn).as_ref().map(|c| c.server())
    }

    /// Lets datagrams from a peer's `ip` through our allocation.
    pub fn turn_permit(&self, ip: IpAddr) {
        if self
            .with_turn(|c| c.permit(ip, std::time::Instant::now()))
            .is_some()
        {
            self.turn_wake.notify_one();
        }
    }

    /// Our relayed address and this host's address as the TURN server sees it.
    pub fn turn_relayed(&self) -> Option<(SocketAddr, SocketAddr)> {
        lock(&self.turn)
            .as_ref()
            .and_then(|c| Some((c.relayed()?, c.mapped()?)))
    }

    /// A datagram from our TURN server (see [`crate::turn::Client::handle_inbound`]).
    pub fn turn_inbound<'a>(
        &self,
        d: &'a [u8],
        now: std::time::Instant,
    ) -> crate::turn::Inbound<'a> {
        let (r, queued) = match lock(&self.turn).as_mut() {
            Some(c) => (c.handle_inbound(d, now), c.has_work()),
            None => (crate::turn::Inbound::NotOurs, false),
        };
        // Only when an answer or a new peer queued a request or an event: relayed data arrives
        // at packet rate and must not wake the allocation's task each time.
        if queued {
            self.turn_wake.notify_one();
        }
        r
    }

    /// STUN relayed through our allocation from the peer behind stand-in `y`.
    pub fn relayed_stun(&self, d: &[u8], y: SocketAddr) {
        let _ = self.relayed_stun.try_send((d.to_vec(), y));
    }

    /// The receiver of [`Shared::relayed_stun`] (once).
    pub fn take_relayed_stun(&self) -> Option<RelayedStun> {
        lock(&self.relayed_stun_rx).take()
    }

    /// Hands a STUN message to ICE as if it came from `from`.
    pub fn to_ice(&self, d: Vec<u8>, from: SocketAddr) {
        let _ = self.to_ice.try_send((d, from));
    }

    /// This port's address as `stun` sees it (a Binding request; no answer within 1 s: None).
    pub async fn reflexive(&self, stun: SocketAddr) -> Option<SocketAddr> {
        let (req, tx) = binding_request();
        let (done, answer) = oneshot::channel();
        lock(&self.bindings).insert(tx, done);
        let got = match self.send_to(&req, stun).await {
            Ok(_) => tokio::time::timeout(Duration::from_secs(1), answer)
                .await
                .ok()
                .and_then(Result::ok),
            Err(e) => {
                debug!(%stun, error = %e, "STUN binding not sent");
                None
            }
        };
        lock(&self.bindings).remove(&tx);
        got
    }

    /// A STUN message from the port: an answer to our own binding request, or ICE's.
    pub fn stun(&self, data: &[u8], from: SocketAddr) {
        if let Some((tx, mapped)) = mapped_address(data) {
            let waiter = lock(&self.bindings).remove(&tx);
            if let Some(w) = waiter {
                let _ = w.send(mapped);
                return;
            }
        }
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let _ = self.to_ice.try_send((data.to_vec(), from));
    }
}

/// The connection webrtc-ice's mux reads STUN from (as sorted by the receive loops) and sends
/// its checks through.
struct MuxConn {
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
}

fn unsupported(what: &str) -> webrtc_util::Error {
    webrtc_util::Error::Other(format!("{what} is not supported on the shared socket"))
}

#[async_trait]
impl webrtc_util::Conn for MuxConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(unsupported("connect"))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let Some((d, from)) = self.rx.lock().await.recv().await else {
            return Err(webrtc_util::Error::ErrAlreadyClosed);
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(unsupported("send without an address"))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.shared
            .send_to(buf, target)
            .await
            .map_err(|e| webrtc_util::Error::Other(e.to_string()))
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        // Host candidates are the host's addresses with this port.
        Ok(SocketAddr::from(([0, 0, 0, 0], self.shared.port)))
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_sorted_by_their_first_bytes() {
        assert_eq!(classify(&[1, 0, 0, 0, 9]), Kind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), Kind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), Kind::Other);
        assert_eq!(classify(&[1, 0, 0, 1]), Kind::Other);
        let (req, _) = binding_request();
        assert_eq!(classify(&req), Kind::Stun);
        assert_eq!(
            classify(&[0x40, 1, 0, 4, 1, 2, 3, 4]),
            Kind::Other,
            "TURN ChannelData"
        );
        assert_eq!(classify(&[]), Kind::Other);
    }

    #[test]
    fn xor_mapped_addresses_are_decoded() {
        let tx = [7u8; 12];
        let resp = |attr: Vec<u8>| {
            let mut d = vec![0x01, 0x01];
            d.extend_from_slice(&(attr.len() as u16).to_be_bytes());
            d.extend_from_slice(&MAGIC);
            d.extend_from_slice(&tx);
            d.extend(attr);
            d
        };
        // 203.0.113.11:40000
        let port = (40000u16 ^ 0x2112).to_be_bytes();
        let mut a = [203u8, 0, 113, 11];
        a.iter_mut().zip(MAGIC).for_each(|(b, m)| *b ^= m);
        let mut attr = vec![0x00, 0x20, 0x00, 0x08, 0x00, 0x01, port[0], port[1]];
        attr.extend_from_slice(&a);
        // An unknown attribute first is skipped.
        let mut with_other = vec![0x80, 0x22, 0x00, 0x03, b'x', b'y', b'z', 0];
        with_other.extend_from_slice(&attr);
        assert_eq!(
            mapped_address(&resp(with_other)),
            Some((tx, "203.0.113.11:40000".parse().expect("addr")))
        );
        assert_eq!(mapped_address(&resp(vec![])), None);
        assert_eq!(mapped_address(&[0x01, 0x01, 0, 40]), None, "truncated");
        let mut bad = resp(attr);
        bad[0] = 0x01;
        bad[1] = 0x11;
        assert_eq!(mapped_address(&bad), None, "an error response");
    }

    #[test]
    fn a_binding_request_names_our_username_fragment_and_others_do_not() {
        use stun::message::{Message, Setter, BINDING_REQUEST, BINDING_SUCCESS};
        let build = |setters: Vec<Box<dyn Setter>>| {
            let mut m = Message::new();
            m.build(&setters).expect("build");
            m.raw
        };
        let user = || -> Box<dyn Setter> {
            Box::new(stun::textattrs::TextAttribute::new(
                stun::attributes::ATTR_USERNAME,
                "ours:theirs".into(),
            ))
        };
        let req = build(vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(BINDING_REQUEST),
            // An attribute of odd length first: the walk skips it and its padding.
            Box::new(stun::textattrs::TextAttribute::new(
                stun::attributes::ATTR_SOFTWARE,
                "tern!".into(),
            )),
            user(),
        ]);
        assert_eq!(binding_request_ufrag(&req), Some("ours"));
        let resp = build(vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(BINDING_SUCCESS),
            user(),
        ]);
        assert_eq!(binding_request_ufrag(&resp), None, "not a request");
        let bare = build(vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(BINDING_REQUEST),
        ]);
        assert_eq!(binding_request_ufrag(&bare), None, "no USERNAME");
        let mut cut = req.clone();
        cut.truncate(24);
        assert_eq!(binding_request_ufrag(&cut), None, "truncated");
    }
}
