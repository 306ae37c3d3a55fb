//! Which TURN server this agent allocates on when the map lists several (one per server replica,
//! or several `--turn-urls`): the nearest one that answers. A probe from the shared port (a STUN
//! Binding, which every TURN server answers) measures each server's round trip every
//! [`PROBE_EVERY`]; ICE then gathers a relay candidate on the preferred server only, instead of an
//! allocation on every server. A server that stops answering loses its place after [`MISSES`]
//! probes in a row (a miss is checked again after [`CONFIRM_AFTER`]), and sessions started after that use the next nearest (a session whose relay
//! died fails its checks and is retried). The choice keeps to the server in use unless another
//! is clearly nearer ([`clearly_nearer`]), so two servers at about the same distance do not make
//! agents flap between them. With no answer from any server (before the first probe, or where
//! UDP is blocked) every server is offered to ICE. A single server is probed too: `tern status`
//! says when it does not answer.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How often each TURN server is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(20);
/// Probes in a row without an answer before a server is taken for down.
pub const MISSES: u32 = 2;
/// How soon a server that missed a probe is probed again (a lost datagram, or down?).
pub const CONFIRM_AFTER: Duration = Duration::from_secs(2);

/// What is known of one TURN server.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    url: String,
    /// Smoothed round trip (None before the first answer).
    rtt: Option<Duration>,
    /// Probes in a row that got no answer.
    misses: u32,
    probed: bool,
}

impl Entry {
    fn healthy(&self) -> bool {
        self.rtt.is_some() && self.misses < MISSES
    }
}

/// The TURN servers of the map and what the probes found.
#[derive(Debug, Default)]
pub struct RelayBook {
    entries: Vec<Entry>,
    /// The server in use (an index into `entries`).
    current: Option<usize>,
}

/// One server in `tern status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub url: String,
    /// Smoothed round trip of STUN probes from the shared port; None while it does not answer.
    pub rtt_ms: Option<f64>,
    /// `preferred` (ICE allocates here), `answering`, `no_answer`, `not_probed_yet`.
    pub state: String,
    /// Our allocation on this server: its relayed address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed: Option<String>,
    /// Why the allocation on this server failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_error: Option<String>,
}

/// Whether `rtt` is clearly nearer than the server in use at `cur`: a quarter and 5 ms less.
pub fn clearly_nearer(rtt: Duration, cur: Duration) -> bool {
    rtt + rtt / 4 + Duration::from_millis(5) < cur
}

impl RelayBook {
    /// The map's TURN URLs (in its order); what is known of servers still listed is kept.
    pub fn set_urls(&mut self, urls: &[String]) {
        if self.entries.iter().map(|e| &e.url).eq(urls.iter()) {
            return;
        }
        let current = self.current.map(|i| self.entries[i].url.clone());
        let old = std::mem::take(&mut self.entries);
        self.entries = urls
            .iter()
            .map(|u| {
                old.iter().find(|e| &e.url == u).cloned().unwrap_or(Entry {
                    url: u.clone(),
                    rtt: None,
                    misses: 0,
                    probed: false,
                })
            })
            .collect();
        self.current = current.and_then(|c| self.entries.iter().position(|e| e.url == c));
        self.choose();
    }

    pub fn urls(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.url.clone()).collect()
    }

    /// A probe's outcome: the round trip, or None when no answer came.
    pub fn record(&mut self, url: &str, rtt: Option<Duration>) {
        let Some(e) = self.entries.iter_mut().find(|e| e.url == url) else {
            return;
        };
        e.probed = true;
        match rtt {
            Some(r) => {
                e.misses = 0;
                // Smoothed like TCP's SRTT (RFC 6298: 7/8 old, 1/8 new), first sample as is.
                e.rtt = Some(e.rtt.map_or(r, |old| (old * 7 + r) / 8));
            }
            None => e.misses = e.misses.saturating_add(1),
        }
        self.choose();
    }

    fn choose(&mut self) {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.healthy())
            .min_by_key(|(_, e)| e.rtt)
            .map(|(i, _)| i);
        self.current = match (self.current, best) {
            (Some(c), Some(b)) if self.entries[c].healthy() => {
                let (rb, rc) = (self.entries[b].rtt, self.entries[c].rtt);
                match (rb, rc) {
                    (Some(rb), Some(rc)) if clearly_nearer(rb, rc) => Some(b),
                    _ => Some(c),
                }
            }
            (_, b) => b,
        };
    }

    /// When to probe next: soon when a server missed its last probe but is not yet taken for
    /// down, else after the usual interval.
    pub fn next_probe(&self) -> Duration {
        if self
            .entries
            .iter()
            .any(|e| e.rtt.is_some() && (1..MISSES).contains(&e.misses))
        {
            CONFIRM_AFTER
        } else {
            PROBE_EVERY
        }
    }

    /// The URL ICE should allocate on, or None: offer every server (none answered yet).
    pub fn preferred(&self) -> Option<&str> {
        self.current.map(|i| self.entries[i].url.as_str())
    }

    pub fn status(&self) -> Vec<RelayStatus> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| RelayStatus {
                url: e.url.clone(),
                rtt_ms: e
                    .rtt
                    .filter(|_| e.healthy())
                    .map(|r| (r.as_secs_f64() * 100_000.0).round() / 100.0),
                state: if self.current == Some(i) {
                    "preferred"
                } else if e.healthy() {
                    "answering"
                } else if e.probed && e.misses > 0 {
                    "no_answer"
                } else {
                    "not_probed_yet"
                }
                .into(),
                relayed: None,
                allocation_error: None,
            })
            .collect()
    }
}

/// Whether a STUN/TURN/relay URL names this machine's loopback (a server started without
/// `--public-url` advertises 127.0.0.1, which only the server's own host reaches).
pub fn loopback_url(url: &str) -> bool {
    let rest = url
        .split_once("://")
        .map_or_else(|| url.split_once(':').map_or("", |(_, r)| r), |(_, r)| r);
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => rest.split([':', '/', '?']).next().unwrap_or(""),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One line for `tern status`: each server, its round trip and whether ICE uses it (a server
/// that does not answer is the usual reason why a peer behind a hard NAT cannot connect).
pub fn status_line(relays: &[RelayStatus]) -> Option<String> {
    if relays.is_empty() {
        return None;
    }
    let parts: Vec<String> = relays
        .iter()
        .map(|r| {
            let mut what = match (r.state.as_str(), r.rtt_ms) {
                ("preferred", Some(ms)) => format!("{ms} ms, in use"),
                (_, Some(ms)) => format!("{ms} ms"),
                ("no_answer", None) if loopback_url(&r.url) => {
                    "no answer: the server advertises its loopback address; start it with --public-url http://ADDRESS:PORT".to_string()
                }
                ("no_answer", None) => "no answer".to_string(),
                _ => "not probed yet".to_string(),
            };
            if let Some(a) = &r.relayed {
                what.push_str(&format!(", relayed address {a}"));
            }
            if let Some(e) = &r.allocation_error {
                what.push_str(&format!("; allocation failed: {e}"));
            }
            // The transport is UDP for every server probed; the URL reads better without it.
            let url = r.url.strip_suffix("?transport=udp").unwrap_or(&r.url);
            format!("{url} ({what})")
        })
        .collect();
    Some(format!("TURN relays: {}", parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_told_apart() {
        assert!(loopback_url("turn:127.0.0.1:3478?transport=udp"));
        assert!(loopback_url("stun:[::1]:3478"));
        assert!(loopback_url("ws://localhost:8080/relay"));
        assert!(!loopback_url("turn:203.0.113.10:3478"));
        assert!(!loopback_url("wss://vpn.example.com/relay"));
    }

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    fn book(urls: &[&str]) -> RelayBook {
        let mut b = RelayBook::default();
        b.set_urls(&urls.iter().map(|u| u.to_string()).collect::<Vec<_>>());
        b
    }

    #[test]
    fn every_server_is_offered_until_one_answers_then_the_nearest() {
        let mut b = book(&["turn:a:3478", "turn:b:3478", "turn:c:3478"]);
        assert_eq!(b.preferred(), None, "nothing probed: ICE gets every server");
        b.record("turn:a:3478", ms(40));
        assert_eq!(b.preferred(), Some("turn:a:3478"));
        b.record("turn:b:3478", ms(8));
        b.record("turn:c:3478", None);
        assert_eq!(b.preferred(), Some("turn:b:3478"), "clearly nearer");
        let s = b.status();
        assert_eq!(
            s.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(),
            ["answering", "preferred", "no_answer"]
        );
        assert_eq!(s[1].rtt_ms, Some(8.0));
        assert_eq!(s[2].rtt_ms, None);
    }

    #[test]
    fn servers_at_about_the_same_distance_do_not_flap() {
        let mut b = book(&["turn:a:3478", "turn:b:3478"]);
        b.record("turn:a:3478", ms(10));
        b.record("turn:b:3478", ms(12));
        assert_eq!(b.preferred(), Some("turn:a:3478"));
        // b gets a little nearer than a, then a little farther, many times over.
        for i in 0..50 {
            let (ra, rb) = if i % 2 == 0 { (11, 9) } else { (9, 11) };
            b.record("turn:a:3478", ms(ra));
            b.record("turn:b:3478", ms(rb));
            assert_eq!(b.preferred(), Some("turn:a:3478"), "round {i}");
        }
        // Clearly nearer wins, once the smoothed round trip shows it.
        for _ in 0..30 {
            b.record("turn:a:3478", ms(60));
            b.record("turn:b:3478", ms(10));
        }
        assert_eq!(b.preferred(), Some("turn:b:3478"));
    }

    #[test]
    fn a_server_that_stops_answering_gives_way_and_can_come_back() {
        let mut b = book(&["turn:a:3478", "turn:b:3478"]);
        b.record("turn:a:3478", ms(5));
        b.record("turn:b:3478", ms(30));
        assert_eq!(b.preferred(), Some("turn:a:3478"));
        assert_eq!(b.next_probe(), PROBE_EVERY);
        b.record("turn:a:3478", None);
        assert_eq!(
            b.preferred(),
            Some("turn:a:3478"),
            "one lost probe is tolerated"
        );
        assert_eq!(b.next_probe(), CONFIRM_AFTER, "confirmed soon");
        b.record("turn:a:3478", None);
        assert_eq!(b.next_probe(), PROBE_EVERY);
        assert_eq!(
            b.preferred(),
            Some("turn:b:3478"),
            "down after {MISSES} misses"
        );
        b.record("turn:b:3478", None);
        b.record("turn:b:3478", None);
        assert_eq!(b.preferred(), None, "none answers: every server again");
        b.record("turn:a:3478", ms(5));
        assert_eq!(b.preferred(), Some("turn:a:3478"), "back");
    }

    #[test]
    fn a_new_map_keeps_what_probes_found_for_servers_it_still_lists() {
        let mut b = book(&["turn:a:3478", "turn:b:3478"]);
        b.record("turn:a:3478", ms(30));
        b.record("turn:b:3478", ms(5));
        assert_eq!(b.preferred(), Some("turn:b:3478"));
        b.set_urls(&["turn:c:3478".into(), "turn:b:3478".into()]);
        assert_eq!(b.preferred(), Some("turn:b:3478"));
        assert_eq!(b.status()[0].state, "not_probed_yet");
        b.set_urls(&["turn:c:3478".into()]);
        assert_eq!(b.preferred(), None, "the server in use left the map");
        b.record("turn:gone:3478", ms(1));
        assert_eq!(b.preferred(), None, "a server not in the map is ignored");
    }

    #[test]
    fn status_names_each_server_and_its_round_trip() {
        let mut b = book(&["turn:a:3478?transport=udp", "turn:b:3478"]);
        assert_eq!(
            status_line(&b.status()).as_deref(),
            Some("TURN relays: turn:a:3478 (not probed yet), turn:b:3478 (not probed yet)")
        );
        b.record("turn:a:3478?transport=udp", ms(3));
        b.record("turn:b:3478", None);
        assert_eq!(
            status_line(&b.status()).as_deref(),
            Some("TURN relays: turn:a:3478 (3 ms, in use), turn:b:3478 (no answer)")
        );
        let mut one = book(&["turn:a:3478"]);
        one.record("turn:a:3478", None);
        one.record("turn:a:3478", None);
        assert_eq!(
            status_line(&one.status()).as_deref(),
            Some("TURN relays: turn:a:3478 (no answer)"),
            "one server that does not answer: said"
        );
        assert_eq!(status_line(&book(&[]).status()), None, "no TURN server");
        let mut st = b.status();
        st[0].relayed = Some("203.0.113.10:50001".into());
        st[1].allocation_error = Some("it refused the credentials management issued (401 Unauthorized): give management and the relay the same secret".into());
        assert_eq!(
            status_line(&st).as_deref(),
            Some("TURN relays: turn:a:3478 (3 ms, in use, relayed address 203.0.113.10:50001), turn:b:3478 (no answer; allocation failed: it refused the credentials management issued (401 Unauthorized): give management and the relay the same secret)")
        );
    }
}
