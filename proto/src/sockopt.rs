//! Socket buffer sizing past `net.core.rmem_max` (which cannot be raised inside a network
//! namespace): `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, available to CAP_NET_ADMIN.

use std::os::fd::AsFd;

pub fn force_buffers(sock: &impl AsFd, bytes: usize) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(sock, sockopt::RcvBufForce, &bytes).map_err(std::io::Error::from)?;
    setsockopt(sock, sockopt::SndBufForce, &bytes).map_err(std::io::Error::from)?;
    Ok(())
}
