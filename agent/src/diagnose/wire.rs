//! STUN and TURN probes on fresh UDP sockets, for `tern diagnose`: a Binding request (what
//! address the NAT maps this host to), a real TURN allocation with the credentials management
//! issued, and whether the relay's port range lets datagrams back in (RFC 8489, RFC 8656).
//! Every exchange is bounded: a few retransmissions within a deadline, then "no answer".

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message, MessageType, Setter, BINDING_REQUEST, CLASS_ERROR_RESPONSE, CLASS_INDICATION,
    CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CREATE_PERMISSION, METHOD_DATA,
    METHOD_REFRESH,
};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;

/// How long one request may go unanswered (with retransmissions at 0, 0.3, 0.9 s).
pub const ANSWER_WITHIN: Duration = Duration::from_millis(2000);

/// `stun:host:port`, `turn:host:port?transport=udp` -> the address it names (first one).
pub async fn resolve(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .split_once(':')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{url:?} is not a STUN/TURN URL"))?;
    let hostport = rest.split('?').next().unwrap_or(rest);
    let hostport = if hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit())
    }) {
        hostport.to_string()
    } else {
        format!("{hostport}:3478")
    };
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::lookup_host(hostport.clone()),
    )
    .await
    {
        Err(_) => Err(format!("resolving {hostport} took over 2 s")),
        Ok(Err(e)) => Err(format!("cannot resolve {hostport}: {e}")),
        Ok(Ok(mut a)) => a.next().ok_or_else(|| format!("{hostport} has no address")),
    }
}

pub async fn bind_for(server: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    })
    .await
}

fn build(setters: Vec<Box<dyn Setter>>) -> Option<Message> {
    let mut m = Message::new();
    m.build(&setters).ok()?;
    Some(m)
}

/// Sends `req` (retransmitting) and returns the response with its transaction id, if any came.
async fn transact(sock: &UdpSocket, server: SocketAddr, req: &Message) -> Option<Message> {
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    let resend = [
        Duration::ZERO,
        Duration::from_millis(300),
        Duration::from_millis(900),
    ];
    let start = tokio::time::Instant::now();
    let mut sent = 0;
    let mut buf = vec![0u8; 1500];
    loop {
        if sent < resend.len() && tokio::time::Instant::now() >= start + resend[sent] {
            let _ = sock.send_to(&req.raw, server).await;
            sent += 1;
        }
        let next = if sent < resend.len() {
            (start + resend[sent]).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(next, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) if from == server => {
                let mut m = Message::new();
                m.raw = buf[..n].to_vec();
                if m.decode().is_ok() && m.transaction_id == req.transaction_id {
                    return Some(m);
                }
            }
            Ok(_) => {}
            Err(_) if tokio::time::Instant::now() >= deadline => return None,
            Err(_) => {}
        }
    }
}

/// What a STUN Binding request to one server showed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StunResult {
    pub url: String,
    /// The server's address, when the URL resolved.
    pub server: Option<SocketAddr>,
    /// This host's address as the server sees it (the NAT's mapping).
    pub mapped: Option<SocketAddr>,
    pub rtt_ms: Option<f64>,
    /// Why there is no mapping (no answer, unresolvable URL).
    pub error: Option<String>,
}

/// One Binding request from `sock` to `server`.
pub async fn binding(sock: &UdpSocket, server: SocketAddr) -> Result<(SocketAddr, f64), String> {
    let req = build(vec![
        Box::new(TransactionId::new()),
        Box::new(BINDING_REQUEST),
    ])
    .ok_or("building a STUN request failed")?;
    let t0 = Instant::now();
    let m = transact(sock, server, &req).await.ok_or_else(|| {
        format!(
            "no answer from {server} (UDP) within {} s",
            ANSWER_WITHIN.as_secs()
        )
    })?;
    let rtt = t0.elapsed().as_secs_f64() * 1000.0;
    let mut x = XorMappedAddress::default();
    x.get_from(&m)
        .map_err(|e| format!("{server} answered without a mapped address: {e}"))?;
    Ok((SocketAddr::new(x.ip, x.port), rtt))
}

/// Binding requests from one socket to each URL (the same local port, so that differing
/// mappings mean the NAT maps per destination).
pub async fn stun_all(urls: &[String]) -> Vec<StunResult> {
    let mut out = vec![];
    let mut socks: Vec<(bool, UdpSocket)> = vec![];
    for url in urls {
        let server = match resolve(url).await {
            Ok(s) => s,
            Err(e) => {
                out.push(StunResult {
                    url: url.clone(),
                    server: None,
                    mapped: None,
                    rtt_ms: None,
                    error: Some(e),
                });
                continue;
            }
        };
        let v4 = server.is_ipv4();
        if !socks.iter().any(|(f, _)| *f == v4) {
            match bind_for(server).await {
                Ok(s) => socks.push((v4, s)),
                Err(e) => {
                    out.push(StunResult {
                        url: url.clone(),
                        server: Some(server),
                        mapped: None,
                        rtt_ms: None,
                        error: Some(format!("cannot open a UDP socket: {e}")),
                    });
                    continue;
                }
            }
        }
        let Some((_, sock)) = socks.iter().find(|(f, _)| *f == v4) else {
            continue;
        };
        let r = binding(sock, server).await;
        out.push(StunResult {
            url: url.clone(),
            server: Some(server),
            mapped: r.as_ref().ok().map(|x| x.0),
            rtt_ms: r.as_ref().ok().map(|x| x.1),
            error: r.err(),
        });
    }
    out
}

/// What a TURN allocation with the issued credentials showed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TurnResult {
    pub url: String,
    pub server: Option<SocketAddr>,
    /// The server answered at all (a 401 challenge counts).
    pub answered: bool,
    /// The relayed address of a successful allocation.
    pub relayed: Option<SocketAddr>,
    /// The error the server gave to the authenticated request (e.g. 401 Unauthorized).
    pub rejected: Option<(u16, String)>,
    /// Datagrams sent to the relayed address came back through the relay (None: not tried).
    pub relay_ports_open: Option<bool>,
    pub error: Option<String>,
}

struct Auth {
    username: String,
    password: String,
    realm: String,
    nonce: String,
}

impl Auth {
    fn setters(&self) -> Vec<Box<dyn Setter>> {
        vec![
            Box::new(TextAttribute::new(ATTR_USERNAME, self.username.clone())),
            Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())),
            Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())),
        ]
    }
    fn integrity(&self) -> MessageIntegrity {
        MessageIntegrity::new_long_term_integrity(
            self.username.clone(),
            self.realm.clone(),
            self.password.clone(),
        )
    }
}

fn error_of(m: &Message) -> Option<(u16, String)> {
    if m.typ.class != CLASS_ERROR_RESPONSE {
        return None;
    }
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok()?;
    Some((e.code.0, String::from_utf8_lossy(&e.reason).to_string()))
}

/// An authenticated request: `extra` attributes, then USERNAME/REALM/NONCE and integrity.
fn signed(method: stun::message::Method, extra: Vec<Box<dyn Setter>>, a: &Auth) -> Option<Message> {
    let mut s: Vec<Box<dyn Setter>> = vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(method, CLASS_REQUEST)),
    ];
    s.extend(extra);
    s.extend(a.setters());
    s.push(Box::new(a.integrity()));
    build(s)
}

/// An open allocation (freed by [`Allocation::free`]).
pub struct Allocation {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub relayed: SocketAddr,
    pub mapped: SocketAddr,
    auth: Auth,
}

/// Allocates a UDP relay address on `url` with the long-term credentials.
pub async fn allocate(
    url: &str,
    username: &str,
    password: &str,
) -> (TurnResult, Option<Allocation>) {
    let mut r = TurnResult {
        url: url.to_string(),
        ..TurnResult::default()
    };
    let server = match resolve(url).await {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(e);
            return (r, None);
        }
    };
    r.server = Some(server);
    let sock = match bind_for(server).await {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("cannot open a UDP socket: {e}"));
            return (r, None);
        }
    };
    let transport = || -> Box<dyn Setter> {
        Box::new(turn::proto::reqtrans::RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        })
    };
    let Some(first) = build(vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        transport(),
    ]) else {
        r.error = Some("building a TURN request failed".into());
        return (r, None);
    };
    let Some(challenge) = transact(&sock, server, &first).await else {
        r.error = Some(format!(
            "no answer from {server} (UDP) within {} s",
            ANSWER_WITHIN.as_secs()
        ));
        return (r, None);
    };
    r.answered = true;
    let text = |m: &Message, a| {
        m.get(a)
            .ok()
            .map(|v| String::from_utf8_lossy(&v).to_string())
    };
    let (Some(realm), Some(mut nonce)) =
        (text(&challenge, ATTR_REALM), text(&challenge, ATTR_NONCE))
    else {
        r.rejected = error_of(&challenge);
        r.error = Some("the server did not ask for credentials (is it a TURN server?)".into());
        return (r, None);
    };
    for _ in 0..2 {
        let auth = Auth {
            username: username.to_string(),
            password: password.to_string(),
            realm: realm.clone(),
            nonce: nonce.clone(),
        };
        let Some(req) = signed(METHOD_ALLOCATE, vec![transport()], &auth) else {
            r.error = Some("building a TURN request failed".into());
            return (r, None);
        };
        let Some(m) = transact(&sock, server, &req).await else {
            r.error = Some(format!(
                "{server} stopped answering after its credentials challenge"
            ));
            return (r, None);
        };
        if m.typ.class == CLASS_SUCCESS_RESPONSE {
            let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
            let mut mapped = XorMappedAddress::default();
            if relayed.get_from(&m).is_err() || mapped.get_from(&m).is_err() {
                r.error = Some("the allocation answer lacks its addresses".into());
                return (r, None);
            }
            let relayed = SocketAddr::new(relayed.ip, relayed.port);
            r.relayed = Some(relayed);
            let a = Allocation {
                sock,
                server,
                relayed,
                mapped: SocketAddr::new(mapped.ip, mapped.port),
                auth,
            };
            return (r, Some(a));
        }
        match error_of(&m) {
            // Stale nonce: once more with the new one.
            Some((438, _)) => {
                if let Some(n) = text(&m, ATTR_NONCE) {
                    nonce = n;
                    continue;
                }
                r.rejected = Some((438, "Stale Nonce".into()));
                return (r, None);
            }
            other => {
                r.rejected = other;
                return (r, None);
            }
        }
    }
    (r, None)
}

impl Allocation {
    /// Lets datagrams from `peer`'s IP reach the allocation.
    pub async fn permit(&self, peer: SocketAddr) -> Result<(), String> {
        let req = signed(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(turn::proto::peeraddr::PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            })],
            &self.auth,
        )
        .ok_or("building a TURN request failed")?;
        let m = transact(&self.sock, self.server, &req)
            .await
            .ok_or("no answer to CreatePermission")?;
        match error_of(&m) {
            None => Ok(()),
            Some((c, why)) => Err(format!("CreatePermission refused: {c} {why}")),
        }
    }

    /// Whether a datagram `from` sends to the relayed address (dialled as `nat64` says: through
    /// the prefix on an IPv6-only host) arrives here as a Data indication (sent up to 3 times
    /// within `within`).
    pub async fn echo_through(
        &self,
        from: &UdpSocket,
        nat64: &crate::nat64::Nat64,
        within: Duration,
    ) -> bool {
        let to = nat64.dial(self.relayed);
        let token: [u8; 16] = rand::random();
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = vec![0u8; 1500];
        let mut next_send = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_send {
                let _ = from.send_to(&token, to).await;
                next_send += within / 3;
            }
            let until = next_send.min(deadline);
            match tokio::time::timeout_at(until, self.sock.recv_from(&mut buf)).await {
                Ok(Ok((n, src))) if src == self.server => {
                    let mut m = Message::new();
                    m.raw = buf[..n].to_vec();
                    if m.decode().is_ok()
                        && m.typ == MessageType::new(METHOD_DATA, CLASS_INDICATION)
                    {
                        let mut d = turn::proto::data::Data::default();
                        if d.get_from(&m).is_ok() && d.0 == token {
                            return true;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) if tokio::time::Instant::now() >= deadline => return false,
                Err(_) => {}
            }
        }
    }

    /// Releases the allocation on the server (Refresh with lifetime 0); best effort.
    pub async fn free(self) {
        if let Some(req) = signed(
            METHOD_REFRESH,
            vec![Box::new(turn::proto::lifetime::Lifetime(Duration::ZERO))],
            &self.auth,
        ) {
            let _ = self.sock.send_to(&req.raw, self.server).await;
        }
    }
}

/// Allocation on `url`, then whether the relay's port range lets a datagram back in: a second
/// socket of this host sends to the relayed address and the relay must hand it over.
pub async fn turn_check(
    url: &str,
    username: &str,
    password: &str,
    nat64: &crate::nat64::Nat64,
) -> TurnResult {
    let (mut r, alloc) = allocate(url, username, password).await;
    let Some(a) = alloc else {
        return r;
    };
    r.relay_ports_open = Some(match bind_for(a.server).await {
        Err(e) => {
            r.error = Some(format!("cannot open a UDP socket: {e}"));
            a.free().await;
            return r;
        }
        Ok(other) => match a.permit(a.mapped).await {
            Err(e) => {
                r.error = Some(e);
                false
            }
            Ok(()) => {
                a.echo_through(&other, nat64, Duration::from_millis(1500))
                    .await
            }
        },
    });
    a.free().await;
    r
}

/// `--deep`: how long an idle UDP mapping of this host's NAT lives. One allocation per idle
/// time; after `idle` with no traffic, a datagram sent to the relayed address must still come
/// back through the NAT. Returns (idle seconds, survived) for each.
pub async fn nat_lifetime(
    url: &str,
    username: &str,
    password: &str,
    idles: &[u64],
    nat64: &crate::nat64::Nat64,
) -> Vec<(u64, Option<bool>)> {
    let tries = idles.iter().map(|&idle| async move {
        let (_, alloc) = allocate(url, username, password).await;
        let Some(a) = alloc else {
            return (idle, None);
        };
        let Ok(other) = bind_for(a.server).await else {
            a.free().await;
            return (idle, None);
        };
        if a.permit(a.mapped).await.is_err()
            || !a
                .echo_through(&other, nat64, Duration::from_millis(1500))
                .await
        {
            a.free().await;
            return (idle, None);
        }
        tokio::time::sleep(Duration::from_secs(idle)).await;
        let alive = a
            .echo_through(&other, nat64, Duration::from_millis(1500))
            .await;
        a.free().await;
        (idle, Some(alive))
    });
    futures::future::join_all(tries).await
}
