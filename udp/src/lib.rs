//! UDP socket options the agent and the relay share (Linux):
//! - buffer sizing past `net.core.rmem_max` (which cannot be raised inside a network namespace):
//!   `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, available to CAP_NET_ADMIN;
//! - batched I/O: `recvmmsg`/`sendmmsg` (many datagrams, many destinations, one call),
//!   UDP GSO sends (`UDP_SEGMENT`, one `sendmsg` cut into datagrams by the kernel)
//!   with a clean fall back to one send per datagram, and UDP GRO receives (a run of datagrams
//!   of one flow in one `recvmsg`, with their segment size).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

pub fn force_buffers(sock: &impl AsFd, bytes: usize) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(sock, sockopt::RcvBufForce, &bytes).map_err(std::io::Error::from)?;
    setsockopt(sock, sockopt::SndBufForce, &bytes).map_err(std::io::Error::from)?;
    Ok(())
}

/// What the kernel holds for one socket (`SO_MEMINFO`): bytes sent but not yet gone out below
/// it (in the qdisc and the device: an uplink's queue), bytes waiting to be read, and datagrams
/// it dropped on receive because they were not read in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub unsent_bytes: u64,
    pub unread_bytes: u64,
    pub receive_drops: u64,
}

/// `SO_MEMINFO` of a socket (Linux 3.15+); None where the kernel does not have it.
#[allow(unsafe_code)] // getsockopt into a C array: nix has no SO_MEMINFO.
pub fn meminfo(sock: &impl AsFd) -> Option<MemInfo> {
    // SK_MEMINFO_VARS (linux/sock_diag.h): RMEM_ALLOC 0, RCVBUF 1, WMEM_ALLOC 2, SNDBUF 3,
    // FWD_ALLOC 4, WMEM_QUEUED 5, OPTMEM 6, BACKLOG 7, DROPS 8.
    let mut v = [0u32; 9];
    let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
    // SAFETY: `v` is a writable buffer of `len` bytes; the kernel writes at most `len` bytes and
    // sets `len` to what it wrote.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize >= std::mem::size_of_val(&v)).then(|| MemInfo {
        unsent_bytes: u64::from(v[2]),
        unread_bytes: u64::from(v[0]),
        receive_drops: u64::from(v[8]),
    })
}

/// UDP datagrams this network namespace's kernel dropped on send because the device's queue
/// was full (`SndbufErrors` in /proc/net/snmp: a saturated uplink).
pub fn udp_send_queue_drops() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let at = names.iter().position(|n| *n == "SndbufErrors")?;
    values.get(at)?.parse().ok()
}

/// Most datagrams one GSO send carries (the kernel's UDP_MAX_SEGMENTS), and its byte limit.
pub const GSO_MAX_SEGMENTS: usize = 64;
pub const GSO_MAX_BYTES: usize = 65_000;

/// One `sendmsg` of `data`, cut by the kernel into datagrams of `seg` bytes (the last may be
/// shorter) to `to` (UDP GSO, `UDP_SEGMENT`). WouldBlock when the socket is full.
pub fn try_send_gso(
    sock: &tokio::net::UdpSocket,
    data: &[u8],
    seg: u16,
    to: SocketAddr,
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    let addr = SockaddrStorage::from(to);
    sock.try_io(tokio::io::Interest::WRITABLE, || {
        sendmsg(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(data)],
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .map_err(std::io::Error::from)
    })
}

/// Asks the kernel to coalesce received datagrams of a flow (UDP GRO); false if it cannot.
pub fn enable_gro(sock: &tokio::net::UdpSocket) -> bool {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::UdpGroSegment, &true).is_ok()
}

/// Room for the control message a GRO receive carries (its segment size).
pub fn gro_cmsg_space() -> Vec<u8> {
    nix::cmsg_space!(nix::libc::c_int)
}

/// One `recvmsg`: bytes, sender, and the segment size when the kernel coalesced several
/// datagrams (GRO). WouldBlock when nothing is queued.
pub fn try_recv_gro(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<usize>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    sock.try_io(tokio::io::Interest::READABLE, || {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let msg =
            recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())
                .map_err(std::io::Error::from)?;
        let seg = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::UdpGroSegments(s) if s > 0 => Some(s as usize),
                _ => None,
            })
        });
        let from = msg
            .address
            .and_then(|a| {
                if let Some(v4) = a.as_sockaddr_in() {
                    Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                } else {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                }
            })
            .ok_or_else(|| std::io::Error::other("datagram without a sender address"))?;
        Ok((msg.bytes, from, seg))
    })
}

/// A GRO receive, waiting until something is queued: bytes, sender, and the segment size (the
/// whole length when the kernel did not coalesce).
pub async fn recv_gro(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, usize)> {
    loop {
        sock.readable().await?;
        match try_recv_gro(sock, buf, cmsg) {
            Ok((n, from, seg)) => return Ok((n, from, seg.unwrap_or(n).max(1))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends runs of equal datagrams with UDP GSO while the kernel accepts it; after the first
/// refusal (a device without checksum offload, an old kernel) one send per datagram, logged once.
#[derive(Debug)]
pub struct SegmentSender {
    gso: AtomicBool,
}

impl Default for SegmentSender {
    fn default() -> Self {
        SegmentSender {
            gso: AtomicBool::new(true),
        }
    }
}

impl SegmentSender {
    /// Whether GSO is still in use.
    pub fn gso(&self) -> bool {
        self.gso.load(Relaxed)
    }

    /// Sends datagrams of `seg` bytes laid end to end in `data` (the last may be shorter) to
    /// `to`: one `sendmsg` with UDP GSO, or one `sendto` each where the kernel refuses GSO.
    /// `data` holds at most [`GSO_MAX_SEGMENTS`] datagrams and [`GSO_MAX_BYTES`] bytes.
    pub async fn send(
        &self,
        sock: &tokio::net::UdpSocket,
        data: &[u8],
        seg: usize,
        to: SocketAddr,
    ) -> std::io::Result<()> {
        if seg == 0 {
            return Ok(());
        }
        if self.gso.load(Relaxed) && data.len() > seg {
            loop {
                sock.writable().await?;
                match try_send_gso(sock, data, seg as u16, to) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) if gso_refused(&e) => {
                        if self.gso.swap(false, Relaxed) {
                            tracing::info!(error = %e, "UDP GSO refused by the kernel: one send per datagram");
                        }
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for d in data.chunks(seg) {
            sock.send_to(d, to).await?;
        }
        Ok(())
    }

    /// Sends `items` (slices of `buf`) in as few `sendmmsg` calls as the kernel allows: a run in
    /// one GSO message while the kernel takes GSO, else one message per datagram. A destination
    /// that fails (unreachable, refused) loses its own message, not the others'. Returns how
    /// many datagrams were lost that way; Err only when waiting on the socket fails.
    pub async fn send_many(
        &self,
        sock: &tokio::net::UdpSocket,
        buf: &[u8],
        items: &[Outgoing],
    ) -> std::io::Result<usize> {
        let (mut i, mut off, mut lost) = (0, 0, 0);
        let mut msgs: Vec<(&[u8], SocketAddr, Option<u16>)> =
            Vec::with_capacity(items.len().min(MMSG_MAX));
        // Where the items stand after each message of `msgs` (item, offset in it).
        let mut after: Vec<(usize, usize)> = Vec::with_capacity(msgs.capacity());
        while i < items.len() {
            let gso = self.gso.load(Relaxed);
            msgs.clear();
            after.clear();
            let (mut j, mut o) = (i, off);
            while j < items.len() && msgs.len() < MMSG_MAX {
                let it = items[j];
                let (start, seg) = (it.start + o, it.seg.max(1));
                if start >= it.end {
                    (j, o) = (j + 1, 0);
                    continue;
                }
                if gso && it.end - start > seg {
                    msgs.push((&buf[start..it.end], it.to, Some(seg as u16)));
                    (j, o) = (j + 1, 0);
                } else {
                    let end = (start + seg).min(it.end);
                    msgs.push((&buf[start..end], it.to, None));
                    (j, o) = if end >= it.end {
                        (j + 1, 0)
                    } else {
                        (j, end - it.start)
                    };
                }
                after.push((j, o));
            }
            if msgs.is_empty() {
                break;
            }
            match try_send_mmsg(sock, &msgs) {
                Ok(k) if k > 0 => (i, off) = after[k.min(after.len()) - 1],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.writable().await?,
                Err(e) if msgs[0].2.is_some() && gso_refused(&e) => {
                    if self.gso.swap(false, Relaxed) {
                        tracing::info!(error = %e, "UDP GSO refused by the kernel: one send per datagram");
                    }
                }
                r => {
                    let (data, to, seg) = msgs[0];
                    let n = seg.map_or(1, |s| data.len().div_ceil(s.max(1) as usize));
                    lost += n;
                    match r {
                        Err(e) => tracing::debug!(%to, error = %e, datagrams = n, "send failed"),
                        Ok(_) => tracing::debug!(%to, "send took nothing"),
                    }
                    (i, off) = after[0];
                }
            }
        }
        Ok(lost)
    }
}

/// Most messages one `recvmmsg`/`sendmmsg` call takes here.
pub const MMSG_MAX: usize = 64;

/// Room for one message's control data (a GRO or GSO segment size), aligned for `cmsghdr`.
type CmsgBuf = [u64; 4];

#[allow(unsafe_code)] // C structs for recvmmsg/sendmmsg: nix cannot set a GSO size per message.
fn to_storage(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

#[allow(unsafe_code)] // C structs for recvmmsg/sendmmsg: nix cannot set a GSO size per message.
fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into the storage.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6) into the storage.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The GRO segment size in a received message's control data, if the kernel coalesced.
#[allow(unsafe_code)] // C structs for recvmmsg/sendmmsg: nix cannot set a GSO size per message.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: `hdr` is a msghdr the kernel filled in (msg_control/msg_controllen valid); the
    // CMSG_* macros walk only within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return (v > 0).then_some(v as usize);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// A message `recvmmsg` brought: a datagram, or a GRO run of datagrams of `seg` bytes (the last
/// may be shorter), in `bufs[buf][..len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub buf: usize,
    pub len: usize,
    pub from: SocketAddr,
    pub seg: usize,
}

/// One `recvmmsg`: up to one message per buffer of `bufs` (at most [`MMSG_MAX`]), each a
/// datagram or a GRO run, appended to `got` (segment size: the whole length when the kernel did
/// not coalesce). Returns how many messages arrived. WouldBlock when nothing is queued.
pub fn try_recv_mmsg(
    sock: &tokio::net::UdpSocket,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<Received>,
) -> std::io::Result<usize> {
    sock.try_io(tokio::io::Interest::READABLE, || recv_mmsg(sock, bufs, got))
}

/// [`try_recv_mmsg`] on any socket (a blocking one waits; a non-blocking one returns WouldBlock
/// when nothing is queued). Every call sets up its headers afresh, control lengths included: a
/// header reused from an earlier call (as nix's `recvmmsg` does) would lose a GRO run's segment
/// size.
#[allow(unsafe_code)] // C structs for recvmmsg/sendmmsg: nix cannot set a GSO size per message.
pub fn recv_mmsg(
    sock: &impl AsRawFd,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<Received>,
) -> std::io::Result<usize> {
    let n = bufs.len().min(MMSG_MAX);
    // SAFETY (zeroed): plain C structs; null pointers and zero lengths are valid values.
    let mut names: [libc::sockaddr_storage; MMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; MMSG_MAX] = [[0; 4]; MMSG_MAX];
    let mut iovs: [libc::iovec; MMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; MMSG_MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: bufs[i].len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = cmsgs[i].as_mut_ptr().cast();
        h.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
    }
    // SAFETY: every header points into arrays and buffers that outlive the call, with their
    // true lengths; `n` headers are initialised.
    let r = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            0,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let count = r as usize;
    for (i, h) in hdrs.iter().enumerate().take(count) {
        let len = h.msg_len as usize;
        let Some(from) = from_storage(&names[i]) else {
            continue;
        };
        let seg = gro_segment(&h.msg_hdr).unwrap_or(len).max(1);
        got.push(Received {
            buf: i,
            len,
            from,
            seg,
        });
    }
    Ok(count)
}

/// One datagram, or a run of datagrams of `seg` bytes laid end to end (the last may be shorter)
/// for one GSO send, to `to`: a slice `start..end` of a shared buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub start: usize,
    pub end: usize,
    pub seg: usize,
    pub to: SocketAddr,
}

/// One `sendmmsg` of the messages `(bytes, destination, GSO segment size or None)`; returns how
/// many the kernel took (the first failing one ends the call; its error comes back when it is
/// the first).
#[allow(unsafe_code)] // C structs for recvmmsg/sendmmsg: nix cannot set a GSO size per message.
fn try_send_mmsg(
    sock: &tokio::net::UdpSocket,
    msgs: &[(&[u8], SocketAddr, Option<u16>)],
) -> std::io::Result<usize> {
    let n = msgs.len().min(MMSG_MAX);
    let mut names: [(libc::sockaddr_storage, libc::socklen_t); MMSG_MAX] =
        // SAFETY: plain C structs; all zeroes is a valid value.
        unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; MMSG_MAX] = [[0; 4]; MMSG_MAX];
    // SAFETY (zeroed): plain C structs; null pointers and zero lengths are valid values.
    let mut iovs: [libc::iovec; MMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; MMSG_MAX] = unsafe { std::mem::zeroed() };
    for (i, (data, to, seg)) in msgs.iter().take(n).enumerate() {
        names[i] = to_storage(*to);
        iovs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut names[i].0 as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = names[i].1;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        if let Some(seg) = seg {
            h.msg_control = cmsgs[i].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE/LEN are pure arithmetic; the control buffer holds one
            // cmsghdr with a u16 (32 bytes >= CMSG_SPACE(2)), written through CMSG_FIRSTHDR.
            unsafe {
                h.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, *seg);
            }
        }
    }
    sock.try_io(tokio::io::Interest::WRITABLE, || {
        // SAFETY: every header points into arrays and slices that outlive the call, with their
        // true lengths; `n` headers are initialised.
        let r =
            unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    })
}

/// Whether a send error means the kernel or device refuses UDP GSO.
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EIO | nix::libc::EINVAL | nix::libc::EOPNOTSUPP | nix::libc::ENOPROTOOPT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn meminfo_counts_unread_bytes_and_receive_drops() {
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let before = meminfo(&rx).expect("SO_MEMINFO");
        assert_eq!(before, MemInfo::default());
        // Far more than the receive buffer holds, never read: the rest is dropped and counted.
        let payload = [7u8; 1200];
        for _ in 0..4000 {
            let _ = tx.send_to(&payload, to);
        }
        let after = meminfo(&rx).expect("SO_MEMINFO");
        assert!(after.unread_bytes > 0, "{after:?}");
        assert!(after.receive_drops > 0, "{after:?}");
        assert!(
            udp_send_queue_drops().is_some(),
            "/proc/net/snmp has SndbufErrors"
        );
    }

    #[tokio::test]
    async fn gso_sends_arrive_as_their_datagrams_with_or_without_gro() {
        let tx = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let gro = enable_gro(&rx);
        let to = rx.local_addr().expect("addr");
        // Five datagrams of 1000 bytes and a shorter last one, numbered.
        let mut data = vec![];
        for i in 0..6u8 {
            let len = if i == 5 { 300 } else { 1000 };
            data.extend(std::iter::repeat_n(i, len));
        }
        let sender = SegmentSender::default();
        sender.send(&tx, &data, 1000, to).await.expect("send");
        let mut got: Vec<Vec<u8>> = vec![];
        let mut buf = vec![0u8; 65536];
        let mut cmsg = gro_cmsg_space();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 6 && tokio::time::Instant::now() < deadline {
            let Ok(r) = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                recv_gro(&rx, &mut buf, &mut cmsg),
            )
            .await
            else {
                continue;
            };
            let (n, from, seg) = r.expect("recv");
            assert_eq!(from, tx.local_addr().expect("addr"));
            got.extend(buf[..n].chunks(seg).map(<[u8]>::to_vec));
        }
        assert_eq!(
            got.len(),
            6,
            "gro {gro}, gso {}: {:?}",
            sender.gso(),
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, d) in got.iter().enumerate() {
            assert!(d.iter().all(|b| *b == i as u8), "datagram {i} intact");
            assert_eq!(d.len(), if i == 5 { 300 } else { 1000 });
        }
    }

    /// Receives with `recvmmsg` until `want` datagrams came (bounded), split by segment size.
    async fn recv_all(rx: &tokio::net::UdpSocket, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut bufs = vec![vec![0u8; 65536]; 8];
        let mut out = vec![];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while out.len() < want && tokio::time::Instant::now() < deadline {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(100), rx.readable()).await;
            let mut got = vec![];
            match try_recv_mmsg(rx, &mut bufs, &mut got) {
                Ok(n) => assert_eq!(n, got.len()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("recvmmsg: {e}"),
            }
            for r in got {
                out.extend(
                    bufs[r.buf][..r.len]
                        .chunks(r.seg)
                        .map(|d| (d.to_vec(), r.from)),
                );
            }
        }
        out
    }

    #[tokio::test]
    async fn many_destinations_in_one_call_each_get_theirs_in_order_and_a_failing_one_only_loses_its_own(
    ) {
        let bind = || tokio::net::UdpSocket::bind("127.0.0.1:0");
        let (tx, rx1, rx2) = (
            bind().await.expect("bind"),
            bind().await.expect("bind"),
            bind().await.expect("bind"),
        );
        enable_gro(&rx1);
        let (a1, a2) = (
            rx1.local_addr().expect("addr"),
            rx2.local_addr().expect("addr"),
        );
        // An IPv6 destination from an IPv4 socket: the kernel refuses it (EAFNOSUPPORT) and
        // nothing leaves the host.
        let bad: SocketAddr = "[::1]:9".parse().expect("addr");
        let mut buf = vec![];
        let mut items = vec![];
        let mut push = |buf: &mut Vec<u8>, to, seg: usize, lens: &[usize], first: u8| {
            let start = buf.len();
            for (k, len) in lens.iter().enumerate() {
                buf.extend(std::iter::repeat_n(first + k as u8, *len));
            }
            items.push(Outgoing {
                start,
                end: buf.len(),
                seg,
                to,
            });
        };
        push(&mut buf, a1, 1000, &[1000, 1000, 1000, 1000, 1000, 300], 0);
        push(&mut buf, bad, 500, &[500], 50);
        push(&mut buf, a2, 200, &[200, 200, 200], 100);
        push(&mut buf, a1, 700, &[700], 6);
        // With GSO, and as where the kernel refuses it (one message per datagram).
        for gso in [true, false] {
            let sender = SegmentSender {
                gso: AtomicBool::new(gso),
            };
            let lost = sender.send_many(&tx, &buf, &items).await.expect("send");
            assert_eq!(lost, 1, "only the datagram to the refused destination");
            let from = tx.local_addr().expect("addr");
            let got1 = recv_all(&rx1, 7).await;
            let got2 = recv_all(&rx2, 3).await;
            let lens1: Vec<usize> = got1.iter().map(|(d, _)| d.len()).collect();
            assert_eq!(
                lens1,
                [1000, 1000, 1000, 1000, 1000, 300, 700],
                "gso {}",
                sender.gso()
            );
            for (i, (d, f)) in got1.iter().enumerate() {
                assert_eq!(*f, from);
                assert!(
                    d.iter().all(|b| *b == i as u8),
                    "datagram {i} to rx1 intact, in order"
                );
            }
            assert_eq!(got2.len(), 3);
            for (i, (d, _)) in got2.iter().enumerate() {
                assert_eq!(d.len(), 200);
                assert!(
                    d.iter().all(|b| *b == 100 + i as u8),
                    "datagram {i} to rx2 intact, in order"
                );
            }
        }
    }

    #[test]
    fn socket_addresses_survive_the_c_round_trip() {
        for a in ["192.0.2.7:3478", "[2001:db8::5]:51820", "[fe80::1%3]:9"] {
            let a: SocketAddr = a.parse().expect("addr");
            let (ss, len) = to_storage(a);
            assert!(len as usize <= std::mem::size_of::<libc::sockaddr_storage>());
            assert_eq!(from_storage(&ss), Some(a));
        }
    }
}
