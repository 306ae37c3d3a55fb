//! Public-service tunnels: how the server carries an outside client's TCP connection or UDP flow
//! to the agent that reaches the published target.
//!
//! The agent opens TCP (or TLS) connections to management's URL and turns them into raw byte
//! streams with an HTTP/1.1 upgrade (`GET /agent/v1/tunnel`, `Upgrade: tern-tunnel/1`,
//! `Authorization: Bearer <peer token>`, `Tern-Tunnel-Role: control|data`), so they pass wherever
//! the agent reaches management (NAT, NAT64, UDP blocked, reverse proxies that forward upgrades).
//!
//! - One **control** connection per agent: the server asks for more data connections with
//!   `Want(n)` and pings; the agent answers pings. Frames are 3 bytes: type, u16 argument.
//! - **Data** connections wait idle in a small pool. For a new client the server writes an
//!   [`Open`] frame (`'O'`, u16 length, JSON); the agent checks it against the services its
//!   network map says it serves, connects to the target and answers with a [`Status`] frame
//!   (code, u16 length, message). After `Ok` the connection carries the client's bytes (TCP) or
//!   datagrams framed as u16 length + payload (UDP).
//!
//! This module is the wire format (encoding, decoding, small async readers) and [`splice`], the
//! byte pump both ends use; sockets and policy live in management and the agent.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Path of the upgrade endpoint on management's HTTP port.
pub const PATH: &str = "/agent/v1/tunnel";
/// Value of the `Upgrade` header (protocol and version).
pub const UPGRADE: &str = "tern-tunnel/1";
/// Header naming the connection's role: [`ROLE_CONTROL`] or [`ROLE_DATA`].
pub const ROLE_HEADER: &str = "tern-tunnel-role";
pub const ROLE_CONTROL: &str = "control";
pub const ROLE_DATA: &str = "data";

/// Largest JSON body of an [`Open`] frame or message of a [`Status`] frame.
pub const MAX_FRAME: usize = 4096;
/// Largest UDP payload carried (an IPv4 UDP datagram's maximum).
pub const MAX_DATAGRAM: usize = 65_507;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connection closed")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Control-connection frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Server -> agent: open this many more data connections now (clients are waiting).
    Want(u16),
    /// Server -> agent liveness check.
    Ping,
    /// Agent -> server answer to a ping.
    Pong,
}

impl Control {
    pub fn encode(self) -> [u8; 3] {
        let (t, n) = match self {
            Control::Want(n) => (b'W', n),
            Control::Ping => (b'P', 0),
            Control::Pong => (b'p', 0),
        };
        let n = n.to_be_bytes();
        [t, n[0], n[1]]
    }

    pub fn decode(b: [u8; 3]) -> Result<Control, TunnelError> {
        let n = u16::from_be_bytes([b[1], b[2]]);
        match b[0] {
            b'W' => Ok(Control::Want(n)),
            b'P' => Ok(Control::Ping),
            b'p' => Ok(Control::Pong),
            t => Err(TunnelError::Malformed(format!(
                "unknown control frame type {t:#04x}"
            ))),
        }
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Control, TunnelError> {
        let mut b = [0u8; 3];
        read_exact(r, &mut b).await?;
        Control::decode(b)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            o => Err(format!("protocol must be tcp or udp, not {o:?}")),
        }
    }
}

/// Server -> agent on an idle data connection: carry one client of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The service id, as in the agent's network map.
    pub service: String,
    pub protocol: Protocol,
    /// Where the agent must connect (it refuses if its map says otherwise).
    pub target: SocketAddr,
    /// The outside client's address (for PROXY protocol and logs).
    pub client: SocketAddr,
    /// The server address the client connected to.
    pub public: SocketAddr,
}

impl Open {
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(3 + body.len());
        out.push(b'O');
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Open, TunnelError> {
        let mut head = [0u8; 3];
        read_exact(r, &mut head).await?;
        if head[0] != b'O' {
            return Err(TunnelError::Malformed(format!(
                "expected an open frame, got type {:#04x}",
                head[0]
            )));
        }
        let body = read_body(r, u16::from_be_bytes([head[1], head[2]])).await?;
        serde_json::from_slice(&body)
            .map_err(|e| TunnelError::Malformed(format!("open frame: {e}")))
    }
}

/// Agent -> server answer to [`Open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Ok,
    /// The target answered with a reset (nothing listens on that port).
    TargetRefused,
    /// No answer from the target in time, or no route to it.
    TargetUnreachable,
    /// The agent's map does not list this service (or lists another target).
    UnknownService,
    /// The agent carries as many streams as it allows.
    Busy,
    Error,
}

impl StatusCode {
    fn byte(self) -> u8 {
        match self {
            StatusCode::Ok => 0,
            StatusCode::TargetRefused => 1,
            StatusCode::TargetUnreachable => 2,
            StatusCode::UnknownService => 3,
            StatusCode::Busy => 4,
            StatusCode::Error => 5,
        }
    }

    fn from_byte(b: u8) -> StatusCode {
        match b {
            0 => StatusCode::Ok,
            1 => StatusCode::TargetRefused,
            2 => StatusCode::TargetUnreachable,
            3 => StatusCode::UnknownService,
            4 => StatusCode::Busy,
            _ => StatusCode::Error,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: StatusCode,
    /// Human-readable detail (empty for Ok).
    pub message: String,
}

impl Status {
    pub fn ok() -> Status {
        Status {
            code: StatusCode::Ok,
            message: String::new(),
        }
    }

    pub fn new(code: StatusCode, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let msg = clip(&self.message, MAX_FRAME);
        let mut out = Vec::with_capacity(3 + msg.len());
        out.push(self.code.byte());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg.as_bytes());
        out
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Status, TunnelError> {
        let mut head = [0u8; 3];
        read_exact(r, &mut head).await?;
        let body = read_body(r, u16::from_be_bytes([head[1], head[2]])).await?;
        Ok(Status {
            code: StatusCode::from_byte(head[0]),
            message: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// How long the frame starting with `prefix` is, once its 3-byte head is there.
    pub fn frame_len(prefix: &[u8]) -> Result<Option<usize>, TunnelError> {
        if prefix.len() < 3 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([prefix[1], prefix[2]]) as usize;
        if len > MAX_FRAME {
            return Err(TunnelError::Malformed(format!("frame of {len} bytes")));
        }
        Ok(Some(3 + len))
    }

    /// Decodes a whole frame (as measured by [`Status::frame_len`]).
    pub fn decode(frame: &[u8]) -> Status {
        Status {
            code: StatusCode::from_byte(frame.first().copied().unwrap_or(u8::MAX)),
            message: String::from_utf8_lossy(frame.get(3..).unwrap_or_default()).into_owned(),
        }
    }
}

/// A UDP datagram on a data connection: u16 length, payload. None if it is too large.
pub fn encode_datagram(payload: &[u8], out: &mut Vec<u8>) -> Option<()> {
    if payload.len() > MAX_DATAGRAM {
        return None;
    }
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    Some(())
}

/// Reads one framed datagram into `buf` (at least [`MAX_DATAGRAM`] long); returns its length.
pub async fn read_datagram<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<usize, TunnelError> {
    let mut len = [0u8; 2];
    read_exact(r, &mut len).await?;
    let n = u16::from_be_bytes(len) as usize;
    if n > buf.len() || n > MAX_DATAGRAM {
        return Err(TunnelError::Malformed(format!("datagram of {n} bytes")));
    }
    read_exact(r, &mut buf[..n]).await?;
    Ok(n)
}

/// PROXY protocol version 2 header (haproxy's proxy-protocol.txt, section 2.2) for a TCP
/// connection from `client` to `server`; mixed families are sent as IPv6 (v4-mapped).
pub fn proxy_v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    const SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIG);
    out.push(0x21); // version 2, command PROXY
    match (client.ip(), server.ip()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&s.octets());
        }
        (c, s) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c).octets());
            out.extend_from_slice(&v6(s).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&server.port().to_be_bytes());
    out
}

/// Why [`splice`] returned.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both sides closed their sending direction.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    Error(std::io::Error),
}

/// Copy buffer per direction: large enough that one read takes what a fast link delivers.
const SPLICE_BUF: usize = 64 << 10;

/// Moves bytes both ways between `a` and `b` until both directions end (a half-close is passed
/// on), an error, or `idle` without traffic. Bytes read from `a` are added to `a_to_b` (and to
/// the optional second counter, e.g. a service total), bytes read from `b` to `b_to_a`.
pub async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: [Option<&AtomicU64>; 2],
    b_to_a: [Option<&AtomicU64>; 2],
    idle: Duration,
) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let moved = AtomicU64::new(0);
    let mut ca = Counted {
        inner: a,
        counters: a_to_b,
        moved: &moved,
    };
    let mut cb = Counted {
        inner: b,
        counters: b_to_a,
        moved: &moved,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut ca, &mut cb, SPLICE_BUF, SPLICE_BUF);
    tokio::select! {
        r = copy => match r {
            Ok(_) => SpliceEnd::Closed,
            Err(e) => SpliceEnd::Error(e),
        },
        _ = quiet_for(&moved, idle) => SpliceEnd::Idle,
    }
}

/// Resolves once `moved` (a count of bytes or datagrams) has not changed for `limit`; checked
/// a few times per `limit`, at most every 5 s.
pub async fn quiet_for(moved: &AtomicU64, limit: Duration) {
    let step = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut last = moved.load(Ordering::Relaxed);
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = moved.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= limit {
            return;
        }
    }
}

/// A stream whose reads are counted.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    counters: [Option<&'a AtomicU64>; 2],
    moved: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *me.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            me.moved.fetch_add(n, Ordering::Relaxed);
            for c in me.counters.iter().flatten() {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), TunnelError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(TunnelError::Closed),
        Err(e) => Err(TunnelError::Io(e)),
    }
}

async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: u16) -> Result<Vec<u8>, TunnelError> {
    let len = len as usize;
    if len > MAX_FRAME {
        return Err(TunnelError::Malformed(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn control_frames_round_trip_and_unknown_types_are_refused() {
        for c in [Control::Want(513), Control::Ping, Control::Pong] {
            assert_eq!(Control::decode(c.encode()).expect("decode"), c);
        }
        assert!(Control::decode([b'x', 0, 0]).is_err());
    }

    #[test]
    fn open_and_status_frames_round_trip_in_one_stream() {
        let open = Open {
            service: "svc1".into(),
            protocol: Protocol::Tcp,
            target: "192.168.50.10:502".parse().expect("addr"),
            client: "203.0.113.20:40000".parse().expect("addr"),
            public: "203.0.113.10:10001".parse().expect("addr"),
        };
        let mut wire = open.encode();
        wire.extend(Status::new(StatusCode::TargetRefused, "refused").encode());
        wire.extend(Status::ok().encode());
        let mut r = wire.as_slice();
        block_on(async {
            assert_eq!(Open::read(&mut r).await.expect("open"), open);
            let s = Status::read(&mut r).await.expect("status");
            assert_eq!(s.code, StatusCode::TargetRefused);
            assert_eq!(s.message, "refused");
            assert_eq!(Status::read(&mut r).await.expect("ok"), Status::ok());
            let frame = Status::new(StatusCode::Busy, "busy").encode();
            assert_eq!(Status::frame_len(&frame[..2]).expect("short"), None);
            assert_eq!(Status::frame_len(&frame).expect("len"), Some(frame.len()));
            assert_eq!(
                Status::decode(&frame),
                Status::new(StatusCode::Busy, "busy")
            );
            assert!(Status::frame_len(b"\0\xff\xff").is_err());
            assert!(matches!(
                Status::read(&mut r).await,
                Err(TunnelError::Closed)
            ));
        });
    }

    #[test]
    fn malformed_open_frames_are_errors_not_panics() {
        block_on(async {
            for wire in [
                b"X\0\0".to_vec(),
                b"O\0\x05{bad".to_vec(),
                b"O\xff\xff".to_vec(),
                b"O\0\x02{}".to_vec(),
                b"O".to_vec(),
            ] {
                let mut r = wire.as_slice();
                assert!(Open::read(&mut r).await.is_err(), "{wire:?}");
            }
        });
    }

    #[test]
    fn datagrams_are_framed_with_their_length() {
        let mut wire = vec![];
        encode_datagram(b"hello", &mut wire).expect("fits");
        encode_datagram(b"", &mut wire).expect("fits");
        assert!(encode_datagram(&vec![0u8; MAX_DATAGRAM + 1], &mut wire).is_none());
        let mut r = wire.as_slice();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        block_on(async {
            let n = read_datagram(&mut r, &mut buf).await.expect("first");
            assert_eq!(&buf[..n], b"hello");
            assert_eq!(read_datagram(&mut r, &mut buf).await.expect("empty"), 0);
            assert!(matches!(
                read_datagram(&mut r, &mut buf).await,
                Err(TunnelError::Closed)
            ));
        });
    }

    #[test]
    fn splice_moves_both_ways_counts_and_passes_half_closes_on() {
        use tokio::io::AsyncWriteExt;
        block_on(async {
            let (mut client, mut a) = tokio::io::duplex(1 << 16);
            let (mut b, mut target) = tokio::io::duplex(1 << 16);
            let (up, down, total) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
            let pump = async {
                splice(
                    &mut a,
                    &mut b,
                    [Some(&up), Some(&total)],
                    [Some(&down), Some(&total)],
                    Duration::from_secs(5),
                )
                .await
            };
            let peers = async {
                client.write_all(&[7u8; 100_000]).await.expect("write");
                client.shutdown().await.expect("half-close");
                let mut got = vec![];
                target
                    .read_to_end(&mut got)
                    .await
                    .expect("target reads to EOF");
                assert_eq!(got.len(), 100_000);
                target.write_all(b"reply").await.expect("reply");
                target.shutdown().await.expect("close");
                let mut back = vec![];
                client.read_to_end(&mut back).await.expect("client reads");
                assert_eq!(back, b"reply");
            };
            let (end, ()) = tokio::join!(pump, peers);
            assert!(matches!(end, SpliceEnd::Closed), "{end:?}");
            assert_eq!(up.load(Ordering::Relaxed), 100_000);
            assert_eq!(down.load(Ordering::Relaxed), 5);
            assert_eq!(total.load(Ordering::Relaxed), 100_005);
        });
    }

    #[test]
    fn splice_ends_a_quiet_connection_after_the_idle_timeout() {
        block_on(async {
            let (_client, mut a) = tokio::io::duplex(64);
            let (mut b, _target) = tokio::io::duplex(64);
            let t0 = std::time::Instant::now();
            let end = tokio::time::timeout(
                Duration::from_secs(5),
                splice(
                    &mut a,
                    &mut b,
                    [None, None],
                    [None, None],
                    Duration::from_millis(300),
                ),
            )
            .await
            .expect("ends by itself");
            assert!(matches!(end, SpliceEnd::Idle), "{end:?}");
            assert!(t0.elapsed() >= Duration::from_millis(300));
        });
    }

    #[test]
    fn proxy_v2_header_matches_the_specification() {
        let h = proxy_v2_header(
            "203.0.113.20:40000".parse().expect("addr"),
            "203.0.113.10:10001".parse().expect("addr"),
        );
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[203, 0, 113, 20]);
        assert_eq!(&h[20..24], &[203, 0, 113, 10]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 10001);
        assert_eq!(h.len(), 28);
        let mixed = proxy_v2_header(
            "[2001:db8::1]:5".parse().expect("addr"),
            "203.0.113.10:6".parse().expect("addr"),
        );
        assert_eq!(mixed[13], 0x21);
        assert_eq!(mixed.len(), 16 + 36);
        assert_eq!(
            &mixed[32..48],
            &"::ffff:203.0.113.10"
                .parse::<std::net::Ipv6Addr>()
                .expect("v6")
                .octets()
        );
    }
}
