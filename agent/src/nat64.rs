//! IPv6-only uplinks behind NAT64 (a mobile carrier's 464XLAT without a CLAT on this host): the
//! relay URLs in the network map carry IPv4 literals this host cannot reach. With a NAT64 prefix
//! (RFC 6052, e.g. 64:ff9b::/96 or a network-specific one) and no IPv4 default route, the agent
//! rewrites those literals into IPv4-embedded IPv6 addresses, which the carrier's NAT64 translates.

use ipnet::Ipv6Net;
use std::net::{Ipv4Addr, Ipv6Addr};
use tern_proto::management as pb;

/// The IPv4-embedded IPv6 address of `v4` under a /96 prefix.
pub fn embed(prefix: &Ipv6Net, v4: Ipv4Addr) -> Ipv6Addr {
    let mut o = prefix.network().octets();
    o[12..].copy_from_slice(&v4.octets());
    Ipv6Addr::from(o)
}

/// Replaces an IPv4 literal host in a `scheme:host:port...` or `scheme://host:port/...` URL.
pub fn rewrite_url(url: &str, prefix: &Ipv6Net) -> String {
    let (head, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => match url.split_once(':') {
            Some((s, r)) => (format!("{s}:"), r),
            None => return url.to_string(),
        },
    };
    let end = rest.find([':', '/', '?']).unwrap_or(rest.len());
    match rest[..end].parse::<Ipv4Addr>() {
        Ok(v4) => format!("{head}[{}]{}", embed(prefix, v4), &rest[end..]),
        Err(_) => url.to_string(),
    }
}

pub fn rewrite_relay(relay: &mut pb::RelayConfig, prefix: &Ipv6Net) {
    for s in &mut relay.stun {
        s.url = rewrite_url(&s.url, prefix);
    }
    for t in &mut relay.turn {
        t.url = rewrite_url(&t.url, prefix);
    }
    for t in &mut relay.tcp_relay {
        t.url = rewrite_url(&t.url, prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_literals_become_nat64_addresses() {
        let p: Ipv6Net = "2001:db8:64:ff9b::/96".parse().expect("prefix");
        assert_eq!(
            embed(&p, Ipv4Addr::new(203, 0, 113, 10)).to_string(),
            "2001:db8:64:ff9b::cb00:710a"
        );
        assert_eq!(
            rewrite_url("stun:203.0.113.10:3478", &p),
            "stun:[2001:db8:64:ff9b::cb00:710a]:3478"
        );
        assert_eq!(
            rewrite_url("turn:203.0.113.10:3478?transport=udp", &p),
            "turn:[2001:db8:64:ff9b::cb00:710a]:3478?transport=udp"
        );
        assert_eq!(
            rewrite_url("ws://203.0.113.10:443/relay", &p),
            "ws://[2001:db8:64:ff9b::cb00:710a]:443/relay"
        );
        assert_eq!(
            rewrite_url("wss://relay.example.com/relay", &p),
            "wss://relay.example.com/relay",
            "names stay"
        );
        assert_eq!(
            rewrite_url("stun:[2001:db8::1]:3478", &p),
            "stun:[2001:db8::1]:3478",
            "IPv6 stays"
        );
    }
}
