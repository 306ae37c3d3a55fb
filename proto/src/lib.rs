//! Tern's wire protocols and the small pieces of cryptography every component shares: the
//! management and signal gRPC APIs (generated from `proto/*.proto` by protox + tonic-prost-build,
//! no `protoc` needed), WireGuard/X25519 key newtypes, the crypto_box "sealed message" used for
//! key proofs and end-to-end payloads, coturn-compatible time-limited relay credentials, the wire
//! format and client of the TCP/TLS fallback relay, and the wire format of public-service tunnels.

pub mod keys;
pub mod mapdelta;
pub mod relay_auth;
pub mod relay_ws;
pub mod seal;
pub mod sockopt;
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
