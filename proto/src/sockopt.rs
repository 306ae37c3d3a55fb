//! UDP socket options the agent and the relay share (Linux):
//! - buffer sizing past `net.core.rmem_max` (which cannot be raised inside a network namespace):
//!   `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, available to CAP_NET_ADMIN;
//! - batched I/O: UDP GSO sends (`UDP_SEGMENT`, one `sendmsg` cut into datagrams by the kernel)
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
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(
                                nix::libc::EIO
                                    | nix::libc::EINVAL
                                    | nix::libc::EOPNOTSUPP
                                    | nix::libc::ENOPROTOOPT
                            )
                        ) =>
                    {
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
}
