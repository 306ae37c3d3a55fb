//! Moving packets: TUN reads are encapsulated in batches under one lock of the core and sent over
//! the path it names (UDP GSO runs on the shared port, an ICE connection, the TCP relay); datagrams
//! from the shared port (GRO reads), an ICE connection or the TCP relay are decapsulated and
//! coalesced into few TUN writes.

use super::*;

impl Engine {
    /// Sends one datagram over the path the core chose.
    pub(super) async fn send(
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

    pub(super) fn send_tcp(&self, peer: PeerId, data: &[u8]) {
        let Some(tx) = read(&self.tcp_out).clone() else {
            return;
        };
        let Some(id) = lock(&self.node).spec(peer).map(|s| s.id.clone()) else {
            return;
        };
        let _ = tx.try_send((id, data.to_vec()));
    }

    /// Sends what the core has queued (after a handshake, or timers).
    pub(super) async fn flush(&self, buf: &mut [u8]) {
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

    /// Reads one of the shared port's sockets forever, a batch at a time: WireGuard to the core
    /// (decrypted under one lock, then coalesced into few TUN writes), STUN to ICE.
    pub async fn shared_loop(self: Arc<Self>, sock: Arc<tokio::net::UdpSocket>) {
        use crate::socket::Kind;
        // Up to RECVS reads per batch; with UDP GRO one read brings a run of datagrams.
        const RECVS: usize = 16;
        let mut bufs = vec![vec![0u8; MAX_PACKET]; RECVS];
        let mut cmsg = crate::platform::sockopt::gro_cmsg_space();
        // (buffer, offset, length, sender) of each datagram of the batch.
        let mut got: Vec<(usize, usize, usize, std::net::SocketAddr)> = Vec::with_capacity(BATCH);
        let mut rx = Rx::new();
        loop {
            if sock.readable().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            got.clear();
            let mut reads = 0;
            while reads < RECVS && got.len() < BATCH {
                match crate::platform::sockopt::try_recv_gro(&sock, &mut bufs[reads], &mut cmsg) {
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
            {
                let turn = self.shared.turn_server();
                let mut node = lock(&self.node);
                let now = Instant::now();
                for &(b, off, len, ref from) in &got {
                    let mut d = &bufs[b][off..off + len];
                    let mut from = *from;
                    // Relayed through our allocation: unwrapped, from the peer's stand-in address.
                    if turn == Some(from) {
                        match self.shared.turn_inbound(d, now) {
                            crate::turn::Inbound::Data(y, inner) => {
                                (d, from) = (inner, y);
                                if crate::socket::classify(d) == Kind::Stun {
                                    self.shared.relayed_stun(d, y);
                                    continue;
                                }
                            }
                            crate::turn::Inbound::Handled => continue,
                            crate::turn::Inbound::NotOurs => {}
                        }
                    }
                    match crate::socket::classify(d) {
                        Kind::WireGuard => rx.take(&mut node, None, Some(from), d, now),
                        Kind::Stun => self.shared.stun(d, from),
                        Kind::Other => trace!(%from, "unknown datagram on the shared port"),
                    }
                }
            }
            self.deliver(&mut rx).await;
        }
    }

    /// Reads a relayed ICE connection (a pair on our TURN allocation) until it closes or `peer`
    /// moves to another session: what is queued is taken at once (up to a batch), decrypted
    /// under one lock of the core and coalesced into few TUN writes, as on the shared port.
    pub(super) async fn relayed_loop(self: Arc<Self>, peer: PeerId, session: u64, conn: IceConn) {
        use futures::FutureExt;
        // A WireGuard datagram is at most a TUN segment and its overhead.
        const READS: usize = 16;
        let mut bufs = vec![vec![0u8; SEGMENT + 256]; READS];
        let mut lens = [0usize; READS];
        let mut rx = Rx::new();
        loop {
            let Ok(n) = conn.recv(&mut bufs[0]).await else {
                break;
            };
            lens[0] = n;
            let mut k = 1;
            // The connection's buffer gives up what it holds without waiting (a read that would
            // wait is dropped before it takes anything).
            while k < READS {
                match conn.recv(&mut bufs[k]).now_or_never() {
                    Some(Ok(n)) => {
                        lens[k] = n;
                        k += 1;
                    }
                    _ => break,
                }
            }
            if read(&self.conns).get(&peer).is_none_or(|c| c.0 != session) {
                break;
            }
            {
                let mut node = lock(&self.node);
                let now = Instant::now();
                for (b, n) in bufs.iter().zip(&lens).take(k) {
                    rx.take(&mut node, Some(peer), None, &b[..*n], now);
                }
            }
            self.deliver(&mut rx).await;
        }
    }

    /// Writes what a batch decrypted to the TUN device (coalesced, with offloads) and sends the
    /// core's answers (handshake responses, cookies) and what it queued.
    async fn deliver(&self, rx: &mut Rx) {
        if rx.packets > 0 {
            if let Err(e) = self
                .tun
                .send_multiple(&mut rx.gro, &mut rx.to_tun[..rx.packets], HEADROOM)
                .await
            {
                debug!(error = %e, "TUN write failed");
            }
            rx.packets = 0;
        }
        for (peer, path, to, d) in rx.replies.drain(..) {
            self.send(peer, path, to, &d).await;
        }
        if std::mem::take(&mut rx.flush) {
            self.flush(&mut rx.out).await;
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
        let mut gso: Vec<u8> = Vec::with_capacity(crate::platform::sockopt::GSO_MAX_BYTES);
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
                        && j - i < crate::platform::sockopt::GSO_MAX_SEGMENTS
                        && sends[j].2 == Some(addr)
                        && sends[j - 1].5 == seg
                        && sends[j].5 <= seg
                        && bytes + sends[j].5 <= crate::platform::sockopt::GSO_MAX_BYTES
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

    /// Handles datagrams from the TCP relay, (sender's peer id, datagram) each, as one batch:
    /// decrypted under one lock of the core and written to TUN coalesced.
    pub async fn handle_tcp(&self, batch: &[(String, Vec<u8>)], rx: &mut TcpRx) {
        {
            let mut node = lock(&self.node);
            let now = Instant::now();
            // A batch is mostly one peer's: its id is looked up once per run, not per datagram.
            let mut last: Option<(&str, Option<PeerId>)> = None;
            for (from, d) in batch {
                let peer = match last {
                    Some((id, p)) if id == from.as_str() => p,
                    _ => {
                        let p = node.peer_by_mgmt_id(from);
                        last = Some((from.as_str(), p));
                        p
                    }
                };
                if let Some(p) = peer {
                    rx.0.take(&mut node, Some(p), None, d, now);
                }
            }
        }
        self.deliver(&mut rx.0).await;
    }
}

/// The buffers a TCP relay connection's received batches go through (see
/// [`Engine::handle_tcp`]).
pub struct TcpRx(Rx);

impl Default for TcpRx {
    fn default() -> Self {
        TcpRx(Rx::new())
    }
}

/// What a batch of received datagrams gave: packets for the TUN device (with room for the
/// virtio-net header in front), and datagrams the core answers with.
pub(super) struct Rx {
    out: Vec<u8>,
    to_tun: Vec<Vec<u8>>,
    packets: usize,
    gro: tun_rs::GROTable,
    replies: Vec<(PeerId, CorePath, Option<std::net::SocketAddr>, Vec<u8>)>,
    flush: bool,
}

impl Rx {
    pub(super) fn new() -> Self {
        Rx {
            out: vec![0u8; BUF],
            // Grows to the largest batch seen (a relayed connection's stay small).
            to_tun: Vec::new(),
            packets: 0,
            gro: tun_rs::GROTable::default(),
            replies: vec![],
            flush: false,
        }
    }

    /// Decapsulates one WireGuard datagram from `peer` (a relayed connection) or from the
    /// address `from` (the shared port: the core finds the peer), under the caller's lock.
    fn take(
        &mut self,
        node: &mut Node,
        peer: Option<PeerId>,
        from: Option<std::net::SocketAddr>,
        d: &[u8],
        now: Instant,
    ) {
        let r = match (peer, from) {
            (Some(p), _) => node.decapsulate(p, d, now, &mut self.out),
            (None, Some(f)) => node.decapsulate_from(f, d, now, &mut self.out),
            (None, None) => return,
        };
        match r {
            Ok(Decap::Tunnel(p)) => {
                // The pool follows the batch (a GRO read alone brings up to 64 datagrams).
                if self.packets == self.to_tun.len() {
                    self.to_tun.push(Vec::with_capacity(HEADROOM + SEGMENT));
                }
                let b = &mut self.to_tun[self.packets];
                b.clear();
                b.resize(HEADROOM, 0);
                b.extend_from_slice(p);
                self.packets += 1;
            }
            Ok(Decap::Network(t)) => {
                self.replies
                    .push((t.peer, t.path, t.to, t.payload.to_vec()));
                self.flush = true;
            }
            Ok(Decap::Nothing) => {}
            Err(e) => trace!(?peer, ?from, error = %e, "datagram dropped"),
        }
    }
}
