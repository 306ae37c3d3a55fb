//! The few IP header fields the data plane reads.

use std::net::IpAddr;

/// Destination address of an IPv4 or IPv6 packet.
pub fn dst(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&pkt[16..20]).ok()?)),
        6 if pkt.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&pkt[24..40]).ok()?)),
        _ => None,
    }
}

/// Source address of an IPv4 or IPv6 packet.
pub fn src(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&pkt[12..16]).ok()?)),
        6 if pkt.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&pkt[8..24]).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_ip_headers() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[100, 64, 0, 1]);
        v4[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(src(&v4), Some("100.64.0.1".parse().expect("ip")));
        assert_eq!(dst(&v4), Some("100.64.0.2".parse().expect("ip")));
        assert_eq!(dst(&v4[..10]), None, "truncated");
        assert_eq!(dst(&[]), None);
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(dst(&v6), Some("::1".parse().expect("ip")));
    }
}
