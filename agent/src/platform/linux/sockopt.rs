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
    let _ = tern_udp::force_buffers(sock, BUFFER_BYTES);
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

// Batched UDP I/O lives beside the buffer sizing in `tern_udp` (the relay uses it too).
pub use tern_udp::{
    enable_gro, gro_cmsg_space, try_recv_gro, SegmentSender, GSO_MAX_BYTES, GSO_MAX_SEGMENTS,
};
