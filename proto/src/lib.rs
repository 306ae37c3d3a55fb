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
