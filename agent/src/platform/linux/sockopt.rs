//! Options for the UDP sockets that carry WireGuard:
//! - large buffers (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`): the kernel default of 208 KiB overflows
//!   under load, and `net.core.rmem_max` cannot be raised inside a network namespace;
//! - no DF on outer packets (`IP_PMTUDISC_DONT`), as kernel WireGuard does: on a path whose MTU is
//!   below the tunnel's and where ICMP "fragmentation needed" is dropped, routers fragment the
//!   outer packet instead of black-holing it.

use std::os::fd::AsRawFd;

pub const BUFFER_BYTES: usize = 4 << 20;

/// Applies both options to a socket (best effort; failures are logged by the caller).
pub fn tune_udp(sock: &tokio::net::UdpSocket) -> std::io::Result<()> {
    let _ = tern_proto::sockopt::force_buffers(sock, BUFFER_BYTES);
    let is_v4 = sock.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
    let (level, name) = if is_v4 {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
    };
    let value: libc::c_int = if is_v4 {
        libc::IP_PMTUDISC_DONT
    } else {
        libc::IPV6_PMTUDISC_DONT
    };
    // SAFETY: a plain setsockopt on a valid, open fd owned by `sock`, with a pointer to a live
    // c_int and its exact size. nix and socket2 do not expose IP_MTU_DISCOVER.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
    to: std::net::SocketAddr,
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

/// One `recvmsg`: bytes, sender, and the segment size when the kernel coalesced several
/// datagrams (GRO). WouldBlock when nothing is queued.
pub fn try_recv_gro(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddr, Option<usize>)> {
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
                    Some(std::net::SocketAddr::from(std::net::SocketAddrV4::from(
                        *v4,
                    )))
                } else {
                    a.as_sockaddr_in6()
                        .map(|v6| std::net::SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                }
            })
            .ok_or_else(|| std::io::Error::other("datagram without a sender address"))?;
        Ok((msg.bytes, from, seg))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        tx.writable().await.expect("writable");
        let sent = try_send_gso(&tx, &data, 1000, to);
        let mut got: Vec<Vec<u8>> = vec![];
        let mut buf = vec![0u8; 65536];
        let mut cmsg = nix::cmsg_space!(libc::c_int);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 6 && tokio::time::Instant::now() < deadline {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), rx.readable()).await;
            match try_recv_gro(&rx, &mut buf, &mut cmsg) {
                Ok((n, from, seg)) => {
                    assert_eq!(from, tx.local_addr().expect("addr"));
                    let seg = seg.unwrap_or(n);
                    got.extend(buf[..n].chunks(seg).map(<[u8]>::to_vec));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        if sent.is_err() {
            eprintln!("UDP GSO not available here: {sent:?}");
            return;
        }
        assert_eq!(
            got.len(),
            6,
            "gro {gro}: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, d) in got.iter().enumerate() {
            assert!(d.iter().all(|b| *b == i as u8), "datagram {i} intact");
            assert_eq!(d.len(), if i == 5 { 300 } else { 1000 });
        }
    }
}
