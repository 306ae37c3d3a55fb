//! Which peer addresses the relay may send to. By default it refuses addresses that would let a
//! client reach the relay host itself or private networks behind it: loopback, unspecified,
//! link-local, multicast, broadcast, RFC 1918, IPv6 unique-local, and the overlay range. Labs can
//! allow ranges explicitly.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Clone, Debug)]
pub struct PeerFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl PeerFilter {
    /// `overlay`: the mesh overlay range (denied); `allow`: ranges allowed even if denied above.
    pub fn new(overlay: Option<IpNet>, allow: Vec<IpNet>) -> Self {
        let mut deny: Vec<IpNet> = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        deny.extend(overlay);
        PeerFilter { allow, deny }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        let special = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback()
                    || v4.is_unspecified()
                    || v4.is_link_local()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.octets()[0] == 0
                    || v4 == Ipv4Addr::new(255, 255, 255, 255)
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        !special && !self.deny.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> PeerFilter {
        PeerFilter::new("100.64.0.0/10".parse().ok(), vec![])
    }

    #[test]
    fn refuses_local_private_and_overlay_addresses() {
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
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!f().allows(a.parse().expect("ip")), "{a} must be refused");
        }
    }

    #[test]
    fn allows_public_addresses_and_explicit_lab_ranges() {
        for a in ["203.0.113.10", "198.51.100.2", "8.8.8.8", "2001:db8::1"] {
            assert!(f().allows(a.parse().expect("ip")), "{a} must be allowed");
        }
        let lab = PeerFilter::new(None, vec!["127.0.0.0/8".parse().expect("net")]);
        assert!(lab.allows("127.0.0.1".parse().expect("ip")));
        assert!(!lab.allows("10.0.0.1".parse().expect("ip")));
    }
}
