//! TURN relay capacity (a benchmark, not a test): pairs of allocations on one TURN server send
//! ChannelData to each other (each message is relayed by the server once: client A -> A's
//! allocation -> B's allocation -> client B), paced at a rate or unpaced, and this counts what
//! arrives. Paced: steps the total rate up by 1.25x until more than 0.1% is lost (twice in a row
//! at one rate), narrows the last
//! step down by three halvings, and reports the highest rate that stayed within it. Unpaced:
//! every sender as fast as it can; delivered messages/s.
//!
//!   cargo run --release -p tern-relay --example turn_load -- --server 127.0.0.1:3478 \
//!       --secret S [--pairs 16] [--len 1200] [--seconds 3] [--start 20000] [--max-rate 2000000] \
//!       [--burst 1] [--gso] [--fixed MSGS_PER_S]
//!
//! `--fixed R`: one paced round at R messages/s and nothing else (a script measures the server's
//! CPU around it: CPU per relayed message at a rate every server carries).
//!
//! How clients send: `--burst N` sends N messages in turn from one client before the next
//! (one `sendmmsg`; 1: one `send` per message, clients interleaved message by message);
//! `--gso` sends each burst as one UDP GSO `sendmsg`, as a Tern agent sends a run of relayed
//! WireGuard packets (the kernel cuts it into datagrams; a server that did not ask for GRO reads
//! them one by one). Receivers read with `recvmmsg` and UDP GRO, as an agent reads. The
//! generator shares the machine with the server under test: the fewer system calls it makes per
//! message, the more of the machine the server gets.
//!
//! Credentials are coturn-style time-limited ones (`use-auth-secret`), as Tern's relay takes them;
//! every allocation has its own user name (per-user allocation quotas stay out of the way).
//! Only for servers you run (loopback or a lab namespace): it sends as fast as it is told to.

use anyhow::{anyhow, bail, Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message, MessageType, Setter, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE,
    METHOD_CHANNEL_BIND,
};
use stun::textattrs::TextAttribute;

/// The loss a rate may have and still count as carried.
const MAX_LOSS: f64 = 0.001;
/// How long stragglers may take after the senders stop.
const DRAIN: Duration = Duration::from_millis(500);

struct Args {
    server: SocketAddr,
    secret: String,
    pairs: usize,
    len: usize,
    seconds: f64,
    start: f64,
    max_rate: f64,
    burst: usize,
    gso: bool,
    fixed: Option<f64>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        server: "127.0.0.1:3478".parse()?,
        secret: String::new(),
        pairs: 16,
        len: 1200,
        seconds: 3.0,
        start: 20_000.0,
        max_rate: 2_000_000.0,
        burst: 1,
        gso: false,
        fixed: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => a.server = value()?.parse().context("--server ADDR:PORT")?,
            "--secret" => a.secret = value()?,
            "--pairs" => a.pairs = value()?.parse().context("--pairs N")?,
            "--len" => a.len = value()?.parse().context("--len BYTES")?,
            "--seconds" => a.seconds = value()?.parse().context("--seconds S")?,
            "--start" => a.start = value()?.parse().context("--start MSGS_PER_S")?,
            "--max-rate" => a.max_rate = value()?.parse().context("--max-rate MSGS_PER_S")?,
            "--burst" => a.burst = value()?.parse().context("--burst N")?,
            "--gso" => a.gso = true,
            "--fixed" => a.fixed = Some(value()?.parse().context("--fixed MSGS_PER_S")?),
            other => bail!("unknown flag {other} (see the comment at the top of turn_load.rs)"),
        }
    }
    if a.secret.is_empty() {
        bail!("--secret is required (the server's static-auth-secret)");
    }
    if !(16..=1400).contains(&a.len) || a.pairs == 0 || a.pairs > 500 {
        bail!("--len must be 16-1400 and --pairs 1-500");
    }
    if !(1..=MAX_BURST).contains(&a.burst) || a.burst * (a.len + 4) > 65_000 {
        bail!("--burst must be 1-{MAX_BURST} and a burst at most 65,000 bytes");
    }
    Ok(a)
}

/// One request/response exchange (retried a few times: UDP).
fn transact(sock: &UdpSocket, server: SocketAddr, req: &Message) -> Result<Message> {
    let mut buf = [0u8; 1500];
    for _ in 0..5 {
        sock.send_to(&req.raw, server)?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                break;
            };
            let mut m = Message::new();
            m.raw = buf[..n].to_vec();
            if m.decode().is_ok() && m.transaction_id == req.transaction_id {
                return Ok(m);
            }
        }
    }
    bail!("{server} did not answer")
}

fn build(setters: Vec<Box<dyn Setter>>) -> Result<Message> {
    let mut m = Message::new();
    m.build(&setters)
        .map_err(|e| anyhow!("building a request: {e}"))?;
    Ok(m)
}

fn text(m: &Message, a: stun::attributes::AttrType) -> Option<String> {
    m.get(a)
        .ok()
        .map(|v| String::from_utf8_lossy(&v).to_string())
}

fn error_of(m: &Message) -> String {
    let mut e = ErrorCodeAttribute::default();
    match e.get_from(m) {
        Ok(()) => format!("{} {}", e.code.0, String::from_utf8_lossy(&e.reason)),
        Err(_) => "an error without a code".into(),
    }
}

/// A client socket with its allocation.
struct Client {
    sock: UdpSocket,
    relayed: SocketAddr,
    user: String,
    pass: String,
    realm: String,
    nonce: String,
}

impl Client {
    fn signed(
        &self,
        method: stun::message::Method,
        extra: Vec<Box<dyn Setter>>,
    ) -> Result<Message> {
        let mut s: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        s.extend(extra);
        s.push(Box::new(TextAttribute::new(
            ATTR_USERNAME,
            self.user.clone(),
        )));
        s.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
        s.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
        s.push(Box::new(MessageIntegrity::new_long_term_integrity(
            self.user.clone(),
            self.realm.clone(),
            self.pass.clone(),
        )));
        build(s)
    }

    fn allocate(server: SocketAddr, secret: &str, id: usize) -> Result<Client> {
        let sock = UdpSocket::bind(SocketAddr::new(
            if server.is_ipv4() {
                [0, 0, 0, 0].into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        ))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64
            + 3600;
        let c = tern_proto::relay_auth::issue(secret.as_bytes(), &format!("load{id}"), expiry);
        let transport = || -> Box<dyn Setter> {
            Box::new(turn::proto::reqtrans::RequestedTransport {
                protocol: turn::proto::PROTO_UDP,
            })
        };
        let challenge = transact(
            &sock,
            server,
            &build(vec![
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
                transport(),
            ])?,
        )?;
        let (Some(realm), Some(nonce)) =
            (text(&challenge, ATTR_REALM), text(&challenge, ATTR_NONCE))
        else {
            bail!(
                "{server} did not ask for credentials: {}",
                error_of(&challenge)
            );
        };
        let mut client = Client {
            sock,
            relayed: server,
            user: c.username,
            pass: c.password,
            realm,
            nonce,
        };
        let m = transact(
            &client.sock,
            server,
            &client.signed(METHOD_ALLOCATE, vec![transport()])?,
        )?;
        if m.typ.class != CLASS_SUCCESS_RESPONSE {
            bail!("allocation refused: {}", error_of(&m));
        }
        let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
        relayed
            .get_from(&m)
            .map_err(|e| anyhow!("no relayed address: {e}"))?;
        client.relayed = SocketAddr::new(relayed.ip, relayed.port);
        Ok(client)
    }

    /// Binds `channel` to `peer` (which also permits it).
    fn bind(&self, server: SocketAddr, channel: u16, peer: SocketAddr) -> Result<()> {
        let m = transact(
            &self.sock,
            server,
            &self.signed(
                METHOD_CHANNEL_BIND,
                vec![
                    Box::new(turn::proto::channum::ChannelNumber(channel)),
                    Box::new(turn::proto::peeraddr::PeerAddress {
                        ip: peer.ip(),
                        port: peer.port(),
                    }),
                ],
            )?,
        )?;
        if m.typ.class != CLASS_SUCCESS_RESPONSE {
            bail!("channel bind refused: {}", error_of(&m));
        }
        Ok(())
    }
}

struct Round {
    sent: u64,
    received: u64,
    secs: f64,
}

impl Round {
    fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - (self.received as f64 / self.sent as f64).min(1.0)
    }
    fn delivered_per_sec(&self) -> f64 {
        self.received as f64 / self.secs
    }
}

/// Most messages one burst carries (one `sendmmsg` or one GSO send).
const MAX_BURST: usize = 64;
/// Messages one receiver's `recvmmsg` takes at most.
const RECV_BATCH: usize = 32;

/// Counts the ChannelData messages arriving on `group` until `stop` (`recvmmsg` on each
/// non-blocking socket in turn; a GRO read of a run the server sent in one GSO send counts each
/// of its datagrams).
fn receive(group: &[Arc<UdpSocket>], received: &AtomicU64, stop: &AtomicBool) {
    use tern_udp::recv_mmsg;
    let mut bufs = vec![vec![0u8; 65_536]; RECV_BATCH];
    let mut got = Vec::with_capacity(RECV_BATCH);
    loop {
        let mut any = false;
        for s in group {
            got.clear();
            while let Ok(1..) = recv_mmsg(&**s, &mut bufs, &mut got) {
                any = true;
                let channel_data: usize = got
                    .iter()
                    .filter(|m| m.len >= 4 && bufs[m.buf][0] & 0xC0 == 0x40)
                    .map(|m| m.len.div_ceil(m.seg))
                    .sum();
                received.fetch_add(channel_data as u64, Ordering::Relaxed);
                got.clear();
            }
        }
        if !any {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Sends bursts of one ChannelData message from a client socket (connected to the server).
struct Sender {
    /// The message, `MAX_BURST` times end to end (a GSO send takes a prefix of it).
    msgs: Vec<u8>,
    len: usize,
    gso: bool,
    hdrs: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
}

impl Sender {
    fn new(len: usize, gso: bool) -> Self {
        let mut msg = vec![0u8; 4 + len];
        msg[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
        msg[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        Sender {
            msgs: msg.repeat(MAX_BURST),
            len: 4 + len,
            gso,
            hdrs: nix::sys::socket::MultiHeaders::preallocate(MAX_BURST, None),
        }
    }

    /// Sends `k` messages from `s`; returns how many the kernel took.
    fn send(&mut self, s: &UdpSocket, k: usize) -> usize {
        use nix::sys::socket::{sendmmsg, sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;
        let k = k.clamp(1, MAX_BURST);
        let one = &self.msgs[..self.len];
        if self.gso {
            let seg = self.len as u16;
            let sent = sendmsg::<SockaddrStorage>(
                s.as_raw_fd(),
                &[IoSlice::new(&self.msgs[..k * self.len])],
                &[ControlMessage::UdpGsoSegments(&seg)],
                MsgFlags::empty(),
                None,
            );
            return if sent.is_ok() { k } else { 0 };
        }
        if k == 1 {
            return usize::from(s.send(one).is_ok());
        }
        let slices: Vec<[IoSlice; 1]> = (0..k).map(|_| [IoSlice::new(one)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = vec![None; k];
        match sendmmsg(
            s.as_raw_fd(),
            &mut self.hdrs,
            &slices,
            &addrs,
            [],
            MsgFlags::empty(),
        ) {
            Ok(r) => r.count(),
            Err(_) => 0,
        }
    }
}

/// One round: every sender sends ChannelData to its partner at `rate` messages/s in all (None:
/// as fast as it can) for `secs`, in bursts of `a.burst`; receivers count what arrives.
fn round(pairs: &[(Arc<UdpSocket>, Arc<UdpSocket>)], a: &Args, rate: Option<f64>) -> Round {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = vec![];
    // Receivers: one thread per half of the sockets.
    let sockets: Vec<Arc<UdpSocket>> = pairs.iter().map(|(_, b)| b.clone()).collect();
    for group in sockets.chunks(sockets.len().div_ceil(2).max(1)) {
        let group: Vec<Arc<UdpSocket>> = group.to_vec();
        let (received, stop) = (received.clone(), stop.clone());
        receivers.push(std::thread::spawn(move || {
            receive(&group, &received, &stop)
        }));
    }
    let mut sender = Sender::new(a.len, a.gso);
    let senders: Vec<Arc<UdpSocket>> = pairs.iter().map(|(a, _)| a.clone()).collect();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.seconds);
    let mut sent = 0u64;
    let mut i = 0usize;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = match rate {
            Some(r) => ((now - t0).as_secs_f64() * r) as u64,
            None => sent + 64,
        };
        if sent >= due {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        while sent < due {
            let s = &senders[i % senders.len()];
            i += 1;
            let k = (due - sent).min(a.burst as u64) as usize;
            sent += sender.send(s, k) as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(DRAIN);
    stop.store(true, Ordering::Relaxed);
    for r in receivers {
        let _ = r.join();
    }
    Round {
        sent,
        received: received.load(Ordering::Relaxed),
        secs,
    }
}

/// One paced round at `rate`, printed as `what`; with the rate the sender achieved.
fn paced(
    pairs: &[(Arc<UdpSocket>, Arc<UdpSocket>)],
    a: &Args,
    rate: f64,
    what: &str,
) -> (Round, f64) {
    let r = round(pairs, a, Some(rate));
    let achieved = r.sent as f64 / r.secs;
    println!(
        "{what} {:>9.0} msgs/s: sent {:>9.0}/s, delivered {:>9.0}/s, loss {:.3}%",
        rate,
        achieved,
        r.delivered_per_sec(),
        r.loss() * 100.0
    );
    (r, achieved)
}

/// Halvings of the gap between the last paced step within the loss limit and the first beyond.
const REFINE: usize = 3;

fn main() -> Result<()> {
    let a = args()?;
    let mut pairs = vec![];
    for p in 0..a.pairs {
        let x = Client::allocate(a.server, &a.secret, 2 * p)
            .with_context(|| format!("allocation {}", 2 * p))?;
        let y = Client::allocate(a.server, &a.secret, 2 * p + 1)
            .with_context(|| format!("allocation {}", 2 * p + 1))?;
        x.bind(a.server, 0x4000, y.relayed)?;
        y.bind(a.server, 0x4000, x.relayed)?;
        for s in [&x.sock, &y.sock] {
            // Connected: each send skips the route lookup, so the generator spends less of the
            // two cores it shares with the server under test.
            s.connect(a.server)?;
            s.set_nonblocking(true)?;
            let _ = tern_udp::force_buffers(s, 4 << 20);
            // Runs the server sends in one GSO send arrive in one read (as on an agent).
            let _ =
                nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::UdpGroSegment, &true);
        }
        pairs.push((Arc::new(x.sock), Arc::new(y.sock)));
    }
    println!(
        "# TURN load on {}: {} allocation pairs, {}-byte ChannelData, bursts of {}{}, {} s per step, loss limit {}%",
        a.server,
        a.pairs,
        a.len,
        a.burst,
        if a.gso { " (one GSO send each)" } else { "" },
        a.seconds,
        MAX_LOSS * 100.0
    );
    if let Some(rate) = a.fixed {
        let (r, achieved) = paced(&pairs, &a, rate, "fixed ");
        println!(
            "RESULT fixed_rate {rate:.0} sent_per_s {achieved:.0} delivered {} loss_pct {:.3}",
            r.received,
            r.loss() * 100.0
        );
        return Ok(());
    }
    let unpaced = round(&pairs, &a, None);
    println!(
        "unpaced: sent {} received {} in {:.1} s: {:.0} msgs/s delivered, loss {:.2}%",
        unpaced.sent,
        unpaced.received,
        unpaced.secs,
        unpaced.delivered_per_sec(),
        unpaced.loss() * 100.0
    );
    let mut rate = a.start;
    let mut best: Option<f64> = None;
    let mut sender_bound = false;
    let mut retried = false;
    // The rate that lost twice, when the climb ended there (not at --max-rate or the sender).
    let mut lost_at = None;
    while rate <= a.max_rate {
        let (r, achieved) = paced(&pairs, &a, rate, "paced ");
        // The sender itself could not keep up: the relay was not the limit at this rate.
        if achieved < rate * 0.95 {
            sender_bound = r.loss() <= MAX_LOSS;
            break;
        }
        if r.loss() > MAX_LOSS {
            // One burst of loss (the machine busy elsewhere for a moment) does not end the
            // climb: the same rate must lose again.
            if retried {
                lost_at = Some(rate);
                break;
            }
            retried = true;
            continue;
        }
        retried = false;
        best = Some(rate);
        rate *= 1.25;
    }
    // Between the last rate within the limit and the first beyond it, a few halvings of the gap
    // (geometric): the 1.25x steps alone make a ratio between two relays coarse.
    if let (Some(mut lo), Some(mut failed)) = (best, lost_at) {
        for _ in 0..REFINE {
            let mid = (lo * failed).sqrt();
            let (r, achieved) = paced(&pairs, &a, mid, "refine");
            if achieved >= mid * 0.95 && r.loss() <= MAX_LOSS {
                lo = mid;
            } else {
                failed = mid;
            }
        }
        best = Some(lo);
    }
    if sender_bound {
        println!("(the generator could send no faster: the relay's limit is above this)");
    }
    println!(
        "RESULT highest_rate_within_loss {:.0} unpaced_delivered {:.0} sender_bound {}",
        best.unwrap_or(0.0),
        unpaced.delivered_per_sec(),
        sender_bound
    );
    Ok(())
}
