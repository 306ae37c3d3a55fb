//! Which peer addresses the relay may send to: public unicast only. By default it refuses
//! addresses that would let a client reach the relay host itself or networks behind it —
//! loopback, unspecified, link-local, multicast, broadcast, RFC 1918, shared (CGNAT) space,
//! IETF protocol assignments, benchmarking and reserved ranges, IPv6 outside global unicast
//! (`2000::/3`: unique-local, site-local, discard-only, ...), and the overlay range — also when
//! an IPv4 address hides inside an IPv6 one (IPv4-mapped and -compatible, NAT64 `64:ff9b::/96`,
//! 6to4 `2002::/16`, Teredo). The documentation ranges (TEST-NET-1..3, `2001:db8::/32`) stay
//! allowed: they route nowhere on the internet and labs use them as "public" addresses. Labs can
//! allow more explicitly (`--allow-peers`), never the overlay range, which follows settings changes
//! ([`PeerFilter::set_overlay`]).
//!
//! On the relay's own addresses only its relay port range is a destination (another client's
//! allocation); its STUN/TURN ports never are, so an allocation cannot talk to the server it
//! runs on ([`PeerFilter::set_own`], [`PeerFilter::allows_addr`]).

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

#[derive(Clone, Debug)]
pub struct PeerFilter {
    allow: Vec<IpNet>,
    overlay: Arc<RwLock<Option<IpNet>>>,
    own: Arc<RwLock<Own>>,
}

/// The relay's own addresses, its relay port range and the ports it serves on.
#[derive(Clone, Debug, Default)]
struct Own {
    ips: Vec<IpAddr>,
    relay_ports: (u16, u16),
    served: Vec<u16>,
}

/// IPv4 ranges that are never a peer on the internet.
const DENY_V4: &[(u8, u8, u8, u8, u8)] = &[
    (0, 0, 0, 0, 8),      // "this network"
    (10, 0, 0, 0, 8),     // RFC 1918
    (100, 64, 0, 0, 10),  // shared address space (carrier NAT)
    (127, 0, 0, 0, 8),    // loopback
    (169, 254, 0, 0, 16), // link-local
    (172, 16, 0, 0, 12),  // RFC 1918
    (192, 0, 0, 0, 24),   // IETF protocol assignments (incl. NAT64 discovery)
    (192, 168, 0, 0, 16), // RFC 1918
    (198, 18, 0, 0, 15),  // benchmarking
    (224, 0, 0, 0, 4),    // multicast
    (240, 0, 0, 0, 4),    // reserved, and broadcast
];

fn v4_special(v4: Ipv4Addr) -> bool {
    let ip = u32::from(v4);
    DENY_V4.iter().any(|&(a, b, c, d, len)| {
        let net = u32::from(Ipv4Addr::new(a, b, c, d));
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        ip & mask == net
    })
}

/// The IPv4 address an IPv6 address carries, for the forms a relay could be steered through.
fn embedded_v4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mut out = vec![];
    if let Some(v4) = v6.to_ipv4_mapped() {
        out.push(v4);
    }
    // IPv4-compatible (deprecated), e.g. ::7f00:1 = ::127.0.0.1.
    if s[..6] == [0; 6] {
        out.push(last);
    }
    // NAT64 well-known prefix (RFC 6052).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        out.push(last);
    }
    // 6to4: 2002:AABB:CCDD::/48.
    if s[0] == 0x2002 {
        out.push(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    // Teredo: 2001:0::/32, server in bits 32-63, client obfuscated (inverted) in the last 32.
    if s[0] == 0x2001 && s[1] == 0 {
        out.push(Ipv4Addr::new(o[4], o[5], o[6], o[7]));
        out.push(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    out
}

fn v6_special(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    // The NAT64 well-known prefix is outside 2000::/3 but reaches public IPv4 (checked through
    // the embedded address); everything else outside global unicast is refused, as is the
    // local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215), whose embedding varies.
    let nat64_wkp = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if !nat64_wkp && (s[0] & 0xe000) != 0x2000 {
        return true;
    }
    // Inside 2000::/3: benchmarking 2001:2::/48, ORCHIDv2 2001:20::/28.
    (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0020)
}

impl PeerFilter {
    /// `overlay`: the mesh overlay range (denied); `allow`: ranges allowed even if denied above.
    pub fn new(overlay: Option<IpNet>, allow: Vec<IpNet>) -> Self {
        PeerFilter {
            allow,
            overlay: Arc::new(RwLock::new(overlay)),
            own: Arc::default(),
        }
    }

    /// The relay's own addresses (`ips`), the range its allocations take ports from, and the
    /// ports it serves STUN/TURN on: on its own addresses, only the range is a destination
    /// (other ports there only where `--allow-peers` names the address, for labs), never a
    /// served port.
    pub fn set_own(&self, ips: Vec<IpAddr>, relay_ports: (u16, u16), served: Vec<u16>) {
        let ips = ips
            .into_iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        *self.own.write().unwrap_or_else(|e| e.into_inner()) = Own {
            ips,
            relay_ports,
            served,
        };
    }

    /// Whether the relay may send to `to` (its address passes [`PeerFilter::allows`], and it
    /// is not one of the relay's own ports).
    pub fn allows_addr(&self, to: SocketAddr) -> bool {
        if !self.allows(to.ip()) {
            return false;
        }
        let ip = to.ip().to_canonical();
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        if !own.ips.contains(&ip) {
            return true;
        }
        let port = to.port();
        if own.served.contains(&port) {
            return false;
        }
        (own.relay_ports.0..=own.relay_ports.1).contains(&port) || self.allowed_explicitly(ip)
    }

    /// The overlay range changed (a settings change): every clone of this filter follows.
    pub fn set_overlay(&self, overlay: Option<IpNet>) {
        *self.overlay.write().unwrap_or_else(|e| e.into_inner()) = overlay;
    }

    fn allowed_explicitly(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(&ip))
    }

    fn in_overlay(&self, ip: IpAddr) -> bool {
        self.overlay
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|n| n.contains(&ip))
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        // The overlay is never a relay destination, whatever a lab allows.
        if self.in_overlay(ip) {
            return false;
        }
        if self.allowed_explicitly(ip) {
            return true;
        }
        match ip {
            IpAddr::V4(v4) => !v4_special(v4),
            IpAddr::V6(v6) => {
                if v6_special(v6) {
                    return false;
                }
                // Every IPv4 address hiding inside must pass too.
                embedded_v4(v6).into_iter().all(|v4| {
                    let v4 = IpAddr::V4(v4);
                    self.allowed_explicitly(v4) || (!self.in_overlay(v4) && !v4_special_ip(v4))
                })
            }
        }
    }
}

fn v4_special_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_special(v4),
        IpAddr::V6(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> PeerFilter {
        PeerFilter::new("100.64.0.0/10".parse().ok(), vec![])
    }

    #[test]
    fn refuses_local_private_reserved_and_overlay_addresses() {
        for a in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.50.10",
            "100.64.0.7",
            "192.0.0.170",
            "198.18.0.1",
            "198.19.255.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "fd00::1",
            "fec0::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::7f00:1",
            "::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b::c0a8:3201",
            "64:ff9b:1::a00:1",
            "64:ff9b:1::cb00:710a",
            "2002:7f00:1::1",
            "2002:c0a8:3201::1",
            "2001:0:7f00:1::1",
            "2001:0:cb00:710a:0:0:f5ff:fffe", // Teredo client 10.0.0.1
            "2001:2::1",
        ] {
            assert!(!f().allows(a.parse().expect("ip")), "{a} must be refused");
        }
    }

    #[test]
    fn allows_public_addresses_also_through_nat64_and_6to4() {
        for a in [
            "203.0.113.10",
            "198.51.100.2",
            "8.8.8.8",
            "2001:db8::1",
            "2a00:1450::1",
            "64:ff9b::cb00:710a", // 203.0.113.10 through NAT64
            "2002:cb00:710a::1",  // 203.0.113.10 as 6to4
        ] {
            assert!(f().allows(a.parse().expect("ip")), "{a} must be allowed");
        }
        let lab = PeerFilter::new(None, vec!["127.0.0.0/8".parse().expect("net")]);
        assert!(lab.allows("127.0.0.1".parse().expect("ip")));
        assert!(lab.allows("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!lab.allows("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn on_its_own_address_only_the_relay_range_is_a_destination() {
        let f = f();
        f.set_own(
            vec![
                "203.0.113.5".parse().expect("ip"),
                "0.0.0.0".parse().expect("ip"),
            ],
            (49152, 65535),
            vec![3478, 3479],
        );
        let to = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(f.allows_addr(to("203.0.113.5:50000")), "another allocation");
        for own in [
            "203.0.113.5:3478",
            "203.0.113.5:3479",
            "203.0.113.5:22",
            "[::ffff:203.0.113.5]:53",
        ] {
            assert!(!f.allows_addr(to(own)), "{own}");
        }
        assert!(
            f.allows_addr(to("203.0.113.6:3478")),
            "another server's TURN port"
        );
        assert!(
            !f.allows_addr(to("10.0.0.1:50000")),
            "the address filter still applies"
        );
        // A lab that allows its own loopback explicitly reaches other ports there, never the
        // relay's own.
        let lab = PeerFilter::new(None, vec!["127.0.0.0/8".parse().expect("net")]);
        lab.set_own(
            vec!["127.0.0.1".parse().expect("ip")],
            (61000, 61400),
            vec![3478],
        );
        assert!(lab.allows_addr(to("127.0.0.1:40000")));
        assert!(!lab.allows_addr(to("127.0.0.1:3478")));
    }

    #[test]
    fn the_overlay_range_follows_a_settings_change() {
        let lab = PeerFilter::new(
            "100.64.0.0/10".parse().ok(),
            vec!["10.0.0.0/8".parse().expect("net")],
        );
        let clone = lab.clone();
        assert!(clone.allows("10.99.0.5".parse().expect("ip")));
        lab.set_overlay("10.99.0.0/16".parse().ok());
        assert!(
            !clone.allows("10.99.0.5".parse().expect("ip")),
            "the new overlay is refused"
        );
        assert!(clone.allows("10.98.0.5".parse().expect("ip")));
    }
}
