//! The TUN device: overlay address and prefix from management (the kernel then routes the whole
//! overlay range to it), MTU, IPv6 off (the kernel's link-local noise is not ours to carry).

use anyhow::Context;
use std::net::Ipv4Addr;
use std::sync::Arc;

pub fn create(name: &str, address: &str, mtu: u32) -> anyhow::Result<Arc<tun_rs::AsyncDevice>> {
    let net: ipnet::Ipv4Net = address
        .parse()
        .with_context(|| format!("management sent a bad overlay address {address:?}"))?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(net.addr(), net.prefix_len(), None::<Ipv4Addr>)
        .mtu(mtu as u16)
        .build_async()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!("cannot create TUN device {name}: permission denied (run as root or with CAP_NET_ADMIN)"),
            std::io::ErrorKind::NotFound => anyhow::anyhow!("cannot create TUN device {name}: /dev/net/tun is missing (load the tun module or pass the device into the container)"),
            _ => anyhow::anyhow!("cannot create TUN device {name}: {e}"),
        })?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    Ok(Arc::new(dev))
}
