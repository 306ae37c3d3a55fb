//! Linux: TUN with virtio-net offloads, `ip` routes, nftables, UDP GSO/GRO socket options.

pub mod net;
pub mod sockopt;
pub mod tun;
