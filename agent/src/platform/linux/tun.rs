//! The TUN device: overlay address and prefix from management (the kernel then routes the whole
//! overlay range to it), MTU, IPv6 off (the kernel's link-local noise is not ours to carry). On
//! Linux with virtio-net offloads (GSO/GRO, `IFF_VNET_HDR`): one read brings a whole TCP burst
//! (up to 64 KiB, split by tun-rs), and decrypted segments are coalesced into few writes.

use anyhow::Context;
use std::net::Ipv4Addr;
use std::sync::Arc;
use tracing::info;

/// Room in front of every packet written to the device (the virtio-net header when offloads are
/// on; tun-rs wants more than 10 bytes).
pub const HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;

fn build(
    name: &str,
    net: ipnet::Ipv4Net,
    mtu: u32,
    offload: bool,
) -> std::io::Result<tun_rs::AsyncDevice> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(net.addr(), net.prefix_len(), None::<Ipv4Addr>)
        .mtu(mtu as u16)
        .offload(offload)
        .build_async()
}

pub fn create(name: &str, address: &str, mtu: u32) -> anyhow::Result<Arc<tun_rs::AsyncDevice>> {
    let net: ipnet::Ipv4Net = address
        .parse()
        .with_context(|| format!("management sent a bad overlay address {address:?}"))?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let dev = match build(name, net, mtu, true) {
        Ok(d) => Ok(d),
        Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => {
            info!(error = %e, "TUN offloads unavailable; one packet per read and write");
            build(name, net, mtu, false)
        }
        Err(e) => Err(e),
    }
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!("cannot create TUN device {name}: permission denied (run as root or with CAP_NET_ADMIN)"),
        std::io::ErrorKind::NotFound => anyhow::anyhow!("cannot create TUN device {name}: /dev/net/tun is missing (load the tun module or pass the device into the container)"),
        _ => anyhow::anyhow!("cannot create TUN device {name}: {e}"),
    })?;
    info!(
        tcp_gso = dev.tcp_gso(),
        udp_gso = dev.udp_gso(),
        "TUN device {name} ready"
    );
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    Ok(Arc::new(dev))
}
