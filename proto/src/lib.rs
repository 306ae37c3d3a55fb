//! Tern's wire protocols and the small pieces of cryptography every component shares: the
//! management and signal gRPC APIs (generated from `proto/*.proto` by protox + tonic-prost-build,
//! no `protoc` needed), WireGuard/X25519 key newtypes, the crypto_box "sealed message" used for
//! key proofs and end-to-end payloads, coturn-compatible time-limited relay credentials, the wire
//! format of the TCP/TLS fallback relay, and the wire format of public-service tunnels. (UDP socket
//! options live in `tern-udp`, the fallback relay's client in `tern-relay-client`.)

pub mod keys;
pub mod mapdelta;
pub mod relay_auth;
pub mod relay_ws;
pub mod seal;
pub mod token;
pub mod tunnel;

mod redact;

/// What a policy opens, in words: `proto` ("tcp", "udp", "icmp"; "all" for any) and its port
/// ranges, e.g. "tcp 22, 8000-8080" (`tern status`, `tern diagnose`, the network map).
pub fn access_words(proto: &str, ports: &[(u32, u32)]) -> String {
    if proto == "all" || ports.is_empty() {
        return proto.to_string();
    }
    let list: Vec<String> = ports
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    format!("{proto} {}", list.join(", "))
}

/// The source an address stands for in per-source limits: an IPv4 address itself (also when
/// written IPv4-mapped), an IPv6 address its /64 (a host usually owns the whole prefix, so one
/// address per connection must not buy a fresh budget each time).
pub fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
        }
        v4 => v4,
    }
}

/// Whether access words ("all", "none", "tcp 22, 443; udp 53; icmp", as [`access_words`] and
/// their "; " joins write them) let `proto` through to `port` (ICMP has none: pass 0).
pub fn access_allows(words: &str, proto: &str, port: u16) -> bool {
    let port = u32::from(port);
    words.split(';').map(str::trim).any(|part| {
        let (p, ports) = part.split_once(' ').unwrap_or((part, ""));
        if p == "all" {
            return true;
        }
        if p != proto {
            return false;
        }
        ports.trim().is_empty()
            || ports.split(',').map(str::trim).any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                matches!((a.parse::<u32>(), b.parse::<u32>()), (Ok(a), Ok(b)) if (a..=b).contains(&port))
            })
    })
}

#[cfg(test)]
mod access_tests {
    use super::*;

    #[test]
    fn an_ipv6_slash_64_is_one_source_an_ipv4_address_is_one_too() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::99".parse().expect("ip");
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        assert_eq!(source_of(a).to_string(), "2001:db8:1:2::");
        let mapped: std::net::IpAddr = "::ffff:203.0.113.7".parse().expect("ip");
        assert_eq!(source_of(mapped).to_string(), "203.0.113.7");
    }

    #[test]
    fn access_words_are_read_back_per_protocol_and_port() {
        let w = format!(
            "{}; {}; {}",
            access_words("tcp", &[(22, 22), (8000, 8080)]),
            access_words("udp", &[(53, 53)]),
            access_words("icmp", &[])
        );
        assert_eq!(w, "tcp 22, 8000-8080; udp 53; icmp");
        assert!(access_allows(&w, "tcp", 8042) && access_allows(&w, "tcp", 22));
        assert!(!access_allows(&w, "tcp", 23) && !access_allows(&w, "udp", 54));
        assert!(access_allows(&w, "udp", 53) && access_allows(&w, "icmp", 0));
        assert!(access_allows("all", "udp", 53) && access_allows("udp", "udp", 53));
        assert!(!access_allows("none", "udp", 53) && !access_allows("", "icmp", 0));
        assert!(!access_allows("tcp 53", "udp", 53));
    }
}

/// Management service (agent <-> management).
pub mod management {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tern.management.v1");
}

/// Signal service (agent <-> signal <-> agent).
pub mod signal {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tern.signal.v1");
}

pub use keys::{KeyError, PublicKey, SecretKey};
pub use seal::{open, seal, SealError};

/// Maximum clock skew accepted for a sealed login request (seconds). Bounds replay of a captured
/// request while tolerating hosts without NTP for a few minutes.
pub const LOGIN_MAX_SKEW_SECS: i64 = 300;
