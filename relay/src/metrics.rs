//! Relay counters, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! metrics {
    ($($name:ident: $kind:literal, $help:literal;)*) => {
        /// All counters and gauges of one relay.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $(pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// Prometheus text exposition (version 0.0.4).
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP tern_relay_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE tern_relay_{} {}", stringify!($name), $kind);
                    let _ = writeln!(out, "tern_relay_{} {}", stringify!($name), self.$name.load(Relaxed));
                )*
                out
            }
        }
    };
}

metrics! {
    stun_requests_total: "counter", "STUN binding requests answered or dropped.";
    rate_limited_total: "counter", "Packets dropped by the per-source rate limit (STUN and unauthenticated TURN).";
    auth_failures_total: "counter", "TURN requests and TCP-relay connections refused for bad or expired credentials.";
    forbidden_peer_total: "counter", "TURN permissions, channel binds or sends refused by the peer-address filter.";
    allocations_active: "gauge", "Live TURN allocations.";
    allocations_total: "counter", "TURN allocations created.";
    allocations_refused_total: "counter", "TURN allocations refused by the total or per-user limit.";
    turn_packets_relayed_total: "counter", "Datagrams relayed by TURN (both directions).";
    turn_bytes_relayed_total: "counter", "Payload bytes relayed by TURN (both directions).";
    tcp_connections_active: "gauge", "Live TCP/TLS (WebSocket) relay connections.";
    tcp_packets_relayed_total: "counter", "Datagrams relayed between TCP-relay clients.";
    tcp_bytes_relayed_total: "counter", "Payload bytes relayed between TCP-relay clients.";
    tcp_drops_total: "counter", "TCP-relay datagrams dropped because a queue was full (a slow receiver or an overloaded relay).";
    tcp_no_recipient_total: "counter", "TCP-relay datagrams for a recipient not connected to the relay (dropped).";
    malformed_total: "counter", "Malformed packets or frames dropped.";
    turn_send_failures_total: "counter", "Relayed datagrams the kernel refused to send.";
    turn_unsent_bytes: "gauge", "Bytes the relay's UDP sockets sent that have not gone out yet (the uplink's queue).";
    turn_queue_ms: "gauge", "About how long that queue takes to drain, in milliseconds.";
    turn_bits_per_sec: "gauge", "TURN payload relayed over the last seconds, bits per second.";
    turn_overloaded: "gauge", "1 while the TURN relay is overloaded (its uplink queues or drops, or it cannot read in time).";
    turn_nonces_issued_total: "counter", "Nonces the TURN server created (the front answers most unauthenticated requests with a current one).";
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub fn dec(c: &AtomicU64) {
        let _ = c.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
    }
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_prometheus_text() {
        let m = super::Metrics::default();
        super::Metrics::inc(&m.stun_requests_total);
        super::Metrics::dec(&m.allocations_active);
        let t = m.render();
        assert!(t.contains(
            "# TYPE tern_relay_stun_requests_total counter\ntern_relay_stun_requests_total 1\n"
        ));
        assert!(
            t.contains("tern_relay_allocations_active 0\n"),
            "gauge never goes below zero"
        );
    }
}
