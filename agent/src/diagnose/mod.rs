//! `tern diagnose`: active checks run by the daemon (management, signal, the TCP relay, STUN and
//! TURN with the issued credentials, the relay's port range, the NAT's mapping behaviour and,
//! with `--deep`, its mapping lifetime; per peer the path and why, loss, RTT and path MTU through
//! the tunnel; local route and overlay conflicts) turned into findings. Each finding has a stable
//! code (docs/agent.md lists them with one line of advice each), a severity, the numbers behind it and
//! what to do.
//!
//! The checks gather [`Facts`] (`run`, real sockets); [`analyze`] is a pure function of them, so
//! every rule is tested without a network.

pub mod bundle;
pub mod run;
pub mod wire;

use serde::{Deserialize, Serialize};
use wire::{StunResult, TurnResult};

/// Every code `tern diagnose` can report: (code, what it means, what to do). docs/agent.md lists them.
pub const CODES: &[(&str, &str, &str)] = &[
    ("all_clear", "every check passed", "Nothing to fix."),
    ("management_unreachable", "this host cannot reach the management server", "Check the URL (`tern status`), DNS, the server's TCP port and, for https, its certificate."),
    ("clock_skew", "this host's clock is off from the server's", "Enable time synchronisation (systemd-timesyncd, chrony): logins and relay credentials depend on the clock."),
    ("signal_unreachable", "the signal stream is down, so new direct paths cannot be negotiated", "Check that the server's TCP port is reachable and that no proxy cuts long-lived HTTP/2 streams."),
    ("tcp_relay_unreachable", "the TCP relay (the fallback for networks that block UDP) is not connected", "Check the relay URL and that HTTPS/WebSocket reaches the server."),
    ("nat64_missing", "this host has no IPv4 route (an IPv6-only uplink) and no NAT64 prefix, so the server's IPv4 addresses are unreachable", "Use the network's DNS64 resolver (tern finds the prefix through it), or pass `--nat64-prefix PREFIX` (the carrier's, often 64:ff9b::/96) to `tern up` once: it is remembered."),
    ("nat64_prefix_mismatch", "the NAT64 prefix given with --nat64-prefix is not the one the network announces", "Run `tern up --nat64-prefix auto` (or give the network's prefix shown here)."),
    ("relay_loopback", "the server hands out relay addresses on its own loopback (127.0.0.1), which no other machine reaches: it was started without --public-url", "Restart tern-server with --public-url http://ADDRESS:PORT (the address agents reach it at), or --relay-public-ip ADDRESS."),
    ("udp_blocked", "this network blocks outgoing UDP: every peer goes through the slower TCP relay", "Allow outgoing UDP to the relay's ports (3478 and 3479 by default) and its relay port range."),
    ("stun_unreachable", "a STUN server of the network map does not answer over UDP", "Check its address and port in --stun-urls and that the firewall in front of it lets UDP in."),
    ("turn_unreachable", "the TURN server of the network map does not answer over UDP", "Check the address and port in --turn-urls (a wrong port is the usual cause) and the server's firewall."),
    ("turn_auth_failed", "the TURN server rejects the credentials management issued", "Give management and the relay the same secret (--relay-secret, coturn's static-auth-secret) and check both servers' clocks."),
    ("turn_credentials_expired", "the relay credentials this agent holds have expired", "The agent has not received a fresh network map: check its management connection."),
    ("turn_refused", "the TURN server refuses the allocation for another reason", "Read the relay's log for the code shown (quota, address family, forbidden peer)."),
    ("relay_ports_closed", "TURN allocates, but nothing comes back through the relay's port range", "Open the relay port range (UDP, --relay-ports, 49152-65535 by default) on the server's firewall and cloud security group."),
    ("nat_symmetric", "this host's NAT gives a new public port per destination, so direct paths are rarely possible", "Use a router with endpoint-independent NAT, or forward a UDP port, where you can; TURN carries the traffic meanwhile."),
    ("nat_timeout_short", "this host's NAT forgets idle UDP mappings sooner than the keepalive interval", "Raise the router's UDP timeout to at least 60 s; idle paths break until then."),
    ("no_peers", "no policy connects this peer with any other: its network map is empty", "Put the peer in a group a policy covers (its page in the console, or Settings: groups for devices added by sign-in), or add a policy for one of its groups."),
    ("peer_unreachable", "no WireGuard handshake with this peer", "Run `tern diagnose` on the peer too, and check in the console that it is online."),
    ("peer_connecting", "this peer joined the map moments ago and its first WireGuard handshake is still under way", "Nothing to do yet; if it stays so for a minute, run `tern diagnose` again."),
    ("peer_offline", "the peer is not connected to management", "Start its agent, or remove it in the console if it is gone."),
    ("peer_relayed", "traffic to this peer goes through a relay (slower, costs server bandwidth)", "The reason names the side that keeps the path off direct: fix it there where you can (a NAT that keeps one port per host, a forwarded UDP port, a common address family). Only when it says neither side's facts explain it, look at `tern diagnose` on the peer."),
    ("relay_overloaded", "a relay drops or delays this host's traffic: the TCP relay's queues fill (a receiver reads slower than senders send), or a TURN relay's uplink or CPU is saturated (it says so itself)", "Give the relay more uplink bandwidth or CPU (its figures show which), or add a relay; direct paths take load off it."),
    ("relay_peer_absent", "the TCP relay could not deliver this host's datagrams: their recipient is not connected to it", "The peer reaches neither this host directly nor the relay: its `tern status` and `tern diagnose` say why (on an IPv6-only uplink, check its NAT64 prefix)."),
    ("path_flapping", "the path to this peer changes often", "Usually an unstable uplink or a NAT that rebinds: check the uplink and the NAT's UDP timeouts."),
    ("path_loss", "packets to this peer are lost on the path", "On a relayed path, check the relay's CPU and bandwidth (it may be overloaded); on a direct path, the uplinks."),
    ("path_slow", "the round trip to this peer is long", "On a relayed path, a relay nearer to both peers helps; on a direct path it is the networks' latency."),
    ("pmtu_blackhole", "large packets through the tunnel vanish while small ones pass (a path MTU black hole)", "Lower the tunnel MTU with `tern up --mtu N` using the size shown, or fix the middlebox that drops them."),
    ("overlay_conflict", "the overlay range overlaps a network this host is attached to (carriers use 100.64.0.0/10 too)", "Change the overlay range in Settings, or renumber the local network."),
    ("route_conflict", "a routed network overlaps a network this host is attached to, so it is not installed here", "Renumber one of them, or leave this host's groups out of the route."),
    ("route_no_access", "the route is installed, but no policy lets this peer use the network: the routing peer drops its traffic", "Add a policy from one of this peer's groups to one of the route's access groups, or leave the route's access groups empty."),
    ("route_unserved", "no connected routing peer serves this routed network", "Start the routing peer's agent, or add another routing peer for the network."),
    ("route_failed", "the kernel refused to install a route", "Another VPN or a static route may hold the same prefix: see the error shown."),
    ("nameserver_blocked", "a nameserver group's nameserver is inside the network, but no policy lets this host send it DNS queries (they time out)", "Add udp 53 (or the nameserver's port) towards it to a policy for one of this peer's groups, or take this peer's groups out of the nameserver group."),
    ("forwarding_off", "this host routes networks for others but IP forwarding is off", "Run `sysctl -w net.ipv4.ip_forward=1` and make it permanent in /etc/sysctl.d."),
];

fn entry(code: &str) -> (&'static str, &'static str) {
    CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or(("", ""), |(_, m, a)| (m, a))
}

pub fn advice(code: &str) -> &'static str {
    entry(code).1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub code: String,
    pub severity: Severity,
    /// The peer, route or server it is about, when it is about one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// What the code means.
    pub meaning: String,
    /// What was seen, with the numbers.
    pub evidence: String,
    /// What to do.
    pub advice: String,
}

fn finding(code: &str, severity: Severity, subject: &str, evidence: String) -> Finding {
    Finding {
        code: code.into(),
        severity,
        subject: subject.into(),
        meaning: entry(code).0.into(),
        evidence,
        advice: advice(code).into(),
    }
}

/// What `tern diagnose` asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Args {
    /// Only this peer (by name or overlay address).
    #[serde(default)]
    pub peer: Option<String>,
    /// Also the slow checks (NAT mapping lifetime).
    #[serde(default)]
    pub deep: bool,
    /// Also the debug bundle's files (redacted).
    #[serde(default)]
    pub bundle: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Reach {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A short train of echo requests through the tunnel.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PingFacts {
    pub sent: u32,
    pub received: u32,
    pub avg_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Full-size and small packets through the tunnel with the don't-fragment bit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PmtuFacts {
    /// The tunnel MTU (the size of a full packet).
    pub mtu: u32,
    pub full_ok: bool,
    pub small_ok: bool,
    /// The largest packet (IP size) that got through, when full-size ones did not.
    pub largest_ok: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerFacts {
    pub name: String,
    pub overlay_ip: String,
    /// Connected to management (as the network map says).
    pub online: bool,
    /// A WireGuard session with a handshake in the last 3 minutes.
    pub up: bool,
    /// "direct", "turn_relay", "tcp_relay" or "none".
    pub path: String,
    pub reason_code: String,
    pub reason: String,
    /// Path changes in the last 10 minutes.
    pub path_changes: u32,
    pub ping: Option<PingFacts>,
    pub pmtu: Option<PmtuFacts>,
    /// The data plane's own in-tunnel probes over the last minute (they need no policy).
    #[serde(default)]
    pub probe_rtt_ms: Option<f64>,
    #[serde(default)]
    pub probe_loss_pct: Option<f64>,
    /// Seconds since the peer entered this agent's map.
    #[serde(default)]
    pub in_map_secs: Option<u64>,
    /// Seconds since the last WireGuard handshake (None: never).
    #[serde(default)]
    pub last_handshake_secs: Option<u64>,
    /// What the policies let this host send to the peer ("all", "none", "tcp 22; icmp").
    #[serde(default)]
    pub access: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteFacts {
    pub network: String,
    pub via: String,
    pub state: String,
    /// What the policies let this peer reach in it ("all", "none", "tcp 22").
    #[serde(default)]
    pub access: String,
}

/// Everything the checks saw; [`analyze`] turns it into findings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Facts {
    pub management: Reach,
    /// Server clock minus this host's clock, seconds.
    pub clock_offset_secs: Option<i64>,
    pub signal: bool,
    /// None when the network map names no TCP relay.
    pub tcp_relay: Option<Reach>,
    /// Binding requests from one socket to each STUN URL of the map and to the relay's
    /// alternate STUN port (diagnostics only).
    pub stun: Vec<StunResult>,
    pub turn: Vec<TurnResult>,
    pub credentials_expire_unix: i64,
    pub now_unix: i64,
    /// `--deep`: (idle seconds, the mapping survived it).
    pub nat_lifetime: Vec<(u64, Option<bool>)>,
    /// The TCP relay's own figures about this agent at the start and the end of the checks.
    #[serde(default)]
    pub relay_view: Option<(
        tern_proto::relay_ws::RelayView,
        tern_proto::relay_ws::RelayView,
    )>,
    pub keepalive_secs: u64,
    pub peers: Vec<PeerFacts>,
    pub overlay_conflict: Option<String>,
    pub routes: Vec<RouteFacts>,
    /// Networks this host routes for others.
    pub serving: Vec<String>,
    pub ip_forward: Option<bool>,
    /// Only on a host without an IPv4 route: the NAT64 prefix in use and how it was found.
    #[serde(default)]
    pub nat64: Option<crate::nat64::Status>,
    /// Server URLs of the map with an IPv4 literal this host cannot dial (IPv6 only, no prefix).
    #[serde(default)]
    pub ipv4_unreachable: Vec<String>,
    /// The TURN relays' own load, as management reports it (the relays it knows).
    #[serde(default)]
    pub turn_load: Vec<TurnLoad>,
    /// Peers in this agent's map (all of them, whatever `--peer` asked for), and whether an
    /// admin has yet to approve this peer (then its map is empty for that reason).
    #[serde(default)]
    pub map_peers: Option<usize>,
    #[serde(default)]
    pub pending_approval: bool,
    /// Nameservers of the map this host may not query (no policy lets DNS through), in words.
    #[serde(default)]
    pub nameservers_blocked: Vec<String>,
    /// Relay URLs of the map on the server's loopback, while management is elsewhere.
    #[serde(default)]
    pub relay_loopback: Vec<String>,
}

/// A TURN relay's load over its last seconds, as it measures it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TurnLoad {
    pub url: String,
    pub bits_per_sec: f64,
    pub datagrams_per_sec: f64,
    pub send_drops_per_sec: f64,
    pub receive_drops_per_sec: f64,
    pub unsent_bytes: u64,
    pub queue_ms: f64,
    pub overloaded: bool,
    pub why: String,
    /// This host's own allocations on it.
    pub yours_bits_per_sec: f64,
}

/// The answer to `tern diagnose`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub facts: Facts,
    pub took_ms: u64,
    pub deep: bool,
    /// The debug bundle's files, when asked for (`--bundle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<bundle::Files>,
}

impl Report {
    /// The worst severity among the findings other than `all_clear`.
    pub fn worst(&self) -> Option<Severity> {
        self.findings
            .iter()
            .filter(|f| f.code != "all_clear")
            .map(|f| f.severity)
            .max()
    }
}

/// Loss at or above which a path is reported, and RTT above which it is called slow.
const LOSS_WARN: f64 = 0.2;
const LOSS_ERROR: f64 = 0.5;
const SLOW_MS: f64 = 250.0;
const SKEW_SECS: i64 = 30;
const FLAPPING: u32 = 4;
/// A peer this new without a handshake is still connecting, not unreachable (ICE takes up to
/// its attempt's bound, and the relay fallback a few seconds).
const HANDSHAKE_GRACE_SECS: u64 = 60;

pub fn analyze(f: &Facts) -> Vec<Finding> {
    use Severity::*;
    let mut out = vec![];
    if !f.management.ok {
        out.push(finding(
            "management_unreachable",
            Error,
            "",
            f.management.detail.clone(),
        ));
    }
    if let Some(off) = f.clock_offset_secs.filter(|o| o.abs() > SKEW_SECS) {
        out.push(finding(
            "clock_skew",
            if off.abs() > 300 { Error } else { Warning },
            "",
            format!(
                "this host's clock is {} s {} the server's",
                off.abs(),
                if off > 0 { "behind" } else { "ahead of" }
            ),
        ));
    }
    if f.management.ok && !f.signal {
        out.push(finding(
            "signal_unreachable",
            Warning,
            "",
            "the signal stream is not connected".into(),
        ));
    }
    // An IPv6-only host without a NAT64 prefix reaches none of the server's IPv4 addresses:
    // that, not UDP or the relay, is what to fix.
    let no_nat64 =
        !f.ipv4_unreachable.is_empty() && f.nat64.as_ref().is_some_and(|n| n.prefix.is_empty());
    if no_nat64 {
        let why = f
            .nat64
            .as_ref()
            .map(|n| n.error.clone())
            .filter(|e| !e.is_empty())
            .map(|e| format!("; {e}"))
            .unwrap_or_default();
        out.push(finding(
            "nat64_missing",
            Error,
            "",
            format!(
                "no IPv4 route and no NAT64 prefix{why}: unreachable {}",
                f.ipv4_unreachable.join(", ")
            ),
        ));
    }
    if let Some(n) = f.nat64.as_ref().filter(|n| !n.discovered.is_empty()) {
        out.push(finding(
            "nat64_prefix_mismatch",
            Warning,
            "",
            format!(
                "configured {}, the network's DNS64 answers with {}",
                n.prefix, n.discovered
            ),
        ));
    }
    if !f.relay_loopback.is_empty() {
        out.push(finding(
            "relay_loopback",
            Error,
            "",
            format!(
                "the network map names {} while this host reaches management elsewhere",
                f.relay_loopback.join(", ")
            ),
        ));
    }
    // Nothing of the relay answers for a reason already said: not UDP being blocked.
    let relay_explained = no_nat64 || !f.relay_loopback.is_empty();
    if let Some(t) = f.tcp_relay.as_ref().filter(|t| !t.ok && !relay_explained) {
        out.push(finding(
            "tcp_relay_unreachable",
            Warning,
            "",
            t.detail.clone(),
        ));
    }

    // UDP: blocked altogether, or one server/port not answering.
    let udp_tried = f.stun.iter().filter(|s| s.server.is_some()).count()
        + f.turn.iter().filter(|t| t.server.is_some()).count();
    let udp_answered = f.stun.iter().filter(|s| s.mapped.is_some()).count()
        + f.turn.iter().filter(|t| t.answered).count();
    if relay_explained {
        // Said above: the relay's addresses cannot be reached from here.
    } else if udp_tried > 0 && udp_answered == 0 {
        let fallback = match &f.tcp_relay {
            Some(t) if t.ok => "; peers are reached through the TCP relay",
            _ => "",
        };
        let tried: Vec<String> = f
            .stun
            .iter()
            .filter_map(|s| s.server)
            .chain(f.turn.iter().filter_map(|t| t.server))
            .map(|a| a.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        out.push(finding(
            "udp_blocked",
            Error,
            "",
            format!(
                "no UDP answer from {} within {} s while TCP to the server works{fallback}",
                tried.join(", "),
                wire::ANSWER_WITHIN.as_secs()
            ),
        ));
    } else {
        for s in f.stun.iter().filter(|s| s.mapped.is_none()) {
            out.push(finding(
                "stun_unreachable",
                Warning,
                &s.url,
                s.error.clone().unwrap_or_else(|| "no answer".into()),
            ));
        }
        for t in f.turn.iter().filter(|t| !t.answered) {
            out.push(finding(
                "turn_unreachable",
                Error,
                &t.url,
                t.error.clone().unwrap_or_else(|| "no answer".into()),
            ));
        }
    }
    let server_now = f.now_unix + f.clock_offset_secs.unwrap_or(0);
    if f.credentials_expire_unix > 0 && f.credentials_expire_unix < server_now {
        out.push(finding(
            "turn_credentials_expired",
            Error,
            "",
            format!(
                "the relay credentials expired {} s ago (server time)",
                server_now - f.credentials_expire_unix
            ),
        ));
    }
    for t in &f.turn {
        match &t.rejected {
            Some((401, why)) => {
                let skew = f
                    .clock_offset_secs
                    .filter(|o| o.abs() > SKEW_SECS)
                    .map(|o| format!("; this host's clock is {} s off the server's", o.abs()))
                    .unwrap_or_default();
                out.push(finding(
                    "turn_auth_failed",
                    Error,
                    &t.url,
                    format!(
                        "the TURN server answered 401 {why} to the credentials management issued (valid for {} s more by the server's clock){skew}",
                        (f.credentials_expire_unix - server_now).max(0)
                    ),
                ));
            }
            Some((code, why)) => out.push(finding(
                "turn_refused",
                Error,
                &t.url,
                format!("the TURN server refused the allocation: {code} {why}"),
            )),
            None => {}
        }
        if t.relay_ports_open == Some(false) {
            out.push(finding(
                "relay_ports_closed",
                Error,
                &t.url,
                format!(
                    "allocated {} but a datagram this host sent to it never came back through the relay",
                    t.relayed.map(|a| a.to_string()).unwrap_or_default()
                ),
            ));
        }
    }

    // NAT mapping: one socket, several server endpoints.
    let mapped: Vec<(std::net::SocketAddr, std::net::SocketAddr)> = f
        .stun
        .iter()
        .filter_map(|s| Some((s.server?, s.mapped?)))
        .collect();
    let symmetric = mapped.len() >= 2 && mapped.iter().any(|(_, m)| *m != mapped[0].1);
    if symmetric {
        out.push(finding(
            "nat_symmetric",
            Warning,
            "",
            format!(
                "one local port was seen as {}",
                mapped
                    .iter()
                    .map(|(s, m)| format!("{m} by {s}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        ));
    }
    let udp_blocked = out.iter().any(|x| x.code == "udp_blocked");
    if let Some((idle, _)) = f
        .nat_lifetime
        .iter()
        .filter(|(i, alive)| *alive == Some(false) && *i <= f.keepalive_secs)
        .min_by_key(|(i, _)| *i)
    {
        let survived = f
            .nat_lifetime
            .iter()
            .filter(|(_, a)| *a == Some(true))
            .map(|(i, _)| *i)
            .max();
        out.push(finding(
            "nat_timeout_short",
            Warning,
            "",
            format!(
                "an idle UDP mapping was gone after {idle} s{}; keepalives are sent every {} s",
                survived
                    .map(|s| format!(" (one idle for {s} s survived)"))
                    .unwrap_or_default(),
                f.keepalive_secs
            ),
        ));
    }

    if let Some((a, b)) = &f.relay_view {
        let absent = b
            .no_recipient_from_you
            .saturating_sub(a.no_recipient_from_you);
        if absent > 0 {
            out.push(finding(
                "relay_peer_absent",
                Warning,
                "",
                format!("during the checks the TCP relay dropped {absent} datagrams from this host because their recipient is not connected to it"),
            ));
        }
        let from = b.dropped_from_you.saturating_sub(a.dropped_from_you);
        let to = b.dropped_to_you.saturating_sub(a.dropped_to_you);
        let full = b.queue_limit_bytes > 0 && b.queued_to_you_bytes * 2 > b.queue_limit_bytes;
        if from > 0 || to > 0 || full {
            out.push(finding(
                "relay_overloaded",
                if from + to > 0 { Error } else { Warning },
                "",
                format!(
                    "during the checks the TCP relay dropped {from} datagrams from this host and {to} to it; it holds {} of {} KiB queued for this host ({} clients, {} drops in all)",
                    b.queued_to_you_bytes / 1024,
                    b.queue_limit_bytes / 1024,
                    b.clients,
                    b.drops_total
                ),
            ));
        }
    }
    // A TURN relay of this host's (its allocation carries traffic there, or the map names it)
    // that says it is overloaded is why TURN paths are slow and lossy: named once, with its
    // figures and each such path's, instead of per path with a path's advice.
    let prefix: Option<ipnet::Ipv6Net> = f.nat64.as_ref().and_then(|n| n.prefix.parse().ok());
    let turn_overloaded: Vec<&TurnLoad> = f
        .turn_load
        .iter()
        .filter(|l| {
            l.overloaded
                && (l.yours_bits_per_sec > 0.0
                    || f.turn
                        .iter()
                        .any(|t| same_server(&t.url, &l.url, prefix.as_ref())))
        })
        .collect();
    let mut hurt: Vec<String> = vec![];
    for p in &f.peers {
        let relayed = p.path == "turn_relay" || p.path == "tcp_relay";
        if p.path == "turn_relay" && !turn_overloaded.is_empty() && p.online && p.up {
            if let Some(h) = path_figures(p) {
                hurt.push(format!("{}: {h}", p.name));
            }
        }
        let explained = p.path == "turn_relay" && !turn_overloaded.is_empty();
        if !p.online {
            out.push(finding(
                "peer_offline",
                Info,
                &p.name,
                "the network map says it is not connected to management".into(),
            ));
            continue;
        }
        if !p.up {
            let added = p.in_map_secs.unwrap_or(u64::MAX);
            if p.last_handshake_secs.is_none() && added < HANDSHAKE_GRACE_SECS {
                out.push(finding(
                    "peer_connecting",
                    Info,
                    &p.name,
                    format!(
                        "in this host's map for {added} s, no handshake yet; {}",
                        p.reason
                    ),
                ));
                continue;
            }
            let seen = match p.last_handshake_secs {
                Some(s) => format!(
                    "no WireGuard handshake in the last 3 minutes (the last {} min ago)",
                    s / 60
                ),
                None if added == u64::MAX => "no WireGuard handshake yet".to_string(),
                None => format!("no WireGuard handshake in the {added} s since it joined the map"),
            };
            out.push(finding(
                "peer_unreachable",
                Error,
                &p.name,
                format!("{seen}; {}", p.reason),
            ));
            continue;
        }
        if relayed {
            // The path's reason already names a cause on one side (both sides' facts): no
            // referral to the peer then.
            let known = p.reason_code != "ice_no_direct_pair" && p.path == "turn_relay";
            let here = if known {
                ""
            } else if udp_blocked {
                "; here: UDP is blocked (udp_blocked)"
            } else if symmetric {
                "; here: this host's NAT maps per destination (nat_symmetric)"
            } else {
                "; nothing on this host explains it: run `tern diagnose` on the peer"
            };
            out.push(finding(
                "peer_relayed",
                // TURN for a reason both sides' facts give: how this network is, not a fault.
                if known { Info } else { Warning },
                &p.name,
                format!(
                    "{} because {} [{}]{here}",
                    path_words(&p.path),
                    p.reason,
                    p.reason_code
                ),
            ));
        }
        if p.path_changes >= FLAPPING {
            out.push(finding(
                "path_flapping",
                Warning,
                &p.name,
                format!(
                    "{} path changes in the last 10 minutes (now {})",
                    p.path_changes,
                    path_words(&p.path)
                ),
            ));
        }
        let via = if relayed {
            format!(" ({})", path_words(&p.path))
        } else {
            " (direct)".into()
        };
        let pinged = p.ping.as_ref().filter(|x| x.sent > 0 && x.received > 0);
        if explained {
            // Said with relay_overloaded below.
        } else if pinged.is_none() {
            // Echo requests unanswered (a policy may drop ICMP): the data plane's probes speak.
            if let Some(loss) = p.probe_loss_pct.filter(|l| *l >= LOSS_WARN * 100.0) {
                out.push(finding(
                    "path_loss",
                    if loss >= LOSS_ERROR * 100.0 {
                        Error
                    } else {
                        Warning
                    },
                    &p.name,
                    format!("{loss:.0}% of the last minute's in-tunnel probes were lost{via}"),
                ));
            }
            if let Some(rtt) = p.probe_rtt_ms.filter(|r| *r > SLOW_MS) {
                out.push(finding(
                    "path_slow",
                    Warning,
                    &p.name,
                    format!("round trip {rtt:.0} ms (in-tunnel probe){via}"),
                ));
            }
        }
        if let Some(ping) = pinged.filter(|_| !explained) {
            let loss = 1.0 - f64::from(ping.received) / f64::from(ping.sent);
            if loss >= LOSS_WARN {
                out.push(finding(
                    "path_loss",
                    if loss >= LOSS_ERROR { Error } else { Warning },
                    &p.name,
                    format!(
                        "{:.0}% of {} echo requests through the tunnel were lost{via}",
                        loss * 100.0,
                        ping.sent
                    ),
                ));
            }
            if let Some(avg) = ping.avg_ms.filter(|a| *a > SLOW_MS) {
                out.push(finding(
                    "path_slow",
                    Warning,
                    &p.name,
                    format!("average round trip {avg:.0} ms through the tunnel{via}"),
                ));
            }
        }
        if let Some(m) = p.pmtu.as_ref().filter(|m| m.small_ok && !m.full_ok) {
            out.push(finding(
                "pmtu_blackhole",
                Error,
                &p.name,
                format!(
                    "{}-byte packets through the tunnel (its MTU) are lost without an error while small ones pass{}",
                    m.mtu,
                    m.largest_ok
                        .map(|l| format!("; the largest that got through was {l} bytes: try `--mtu {}`", l / 8 * 8))
                        .unwrap_or_default()
                ),
            ));
        }
    }

    for l in &turn_overloaded {
        let mine = if l.yours_bits_per_sec > 0.0 {
            format!(", {} of it for this host", mbit(l.yours_bits_per_sec))
        } else {
            String::new()
        };
        let paths = if hurt.is_empty() {
            String::new()
        } else {
            format!("; through it: {}", hurt.join(", "))
        };
        out.push(finding(
            "relay_overloaded",
            Error,
            &l.url,
            format!(
                "the TURN relay says: {} (it relays {}, {:.0} datagrams/s{mine}){paths}",
                l.why,
                mbit(l.bits_per_sec),
                l.datagrams_per_sec
            ),
        ));
    }

    if f.map_peers == Some(0) && !f.pending_approval && f.management.ok {
        out.push(finding(
            "no_peers",
            Warning,
            "",
            "this peer's map lists no other peer: none of its groups is a source or destination of an enabled policy with anyone in it".into(),
        ));
    }

    if let Some(c) = &f.overlay_conflict {
        out.push(finding("overlay_conflict", Error, "", c.clone()));
    }
    for r in &f.routes {
        let (code, sev) = if r.state == "installed" && r.access == "none" {
            out.push(finding(
                "route_no_access",
                Warning,
                &r.network,
                format!(
                    "installed via {}, but no policy lets this peer use it: {} drops its traffic",
                    r.via, r.via
                ),
            ));
            continue;
        } else if r.state.starts_with("conflict") {
            ("route_conflict", Warning)
        } else if r.state == "no connected routing peer" {
            ("route_unserved", Warning)
        } else if r.state.starts_with("kernel refused") {
            ("route_failed", Error)
        } else {
            continue;
        };
        out.push(finding(code, sev, &r.network, r.state.clone()));
    }
    for b in &f.nameservers_blocked {
        out.push(finding("nameserver_blocked", Warning, "", b.clone()));
    }
    if !f.serving.is_empty() && f.ip_forward == Some(false) {
        out.push(finding(
            "forwarding_off",
            Error,
            "",
            format!(
                "this host serves {} but net.ipv4.ip_forward is 0",
                f.serving.join(", ")
            ),
        ));
    }
    if out.iter().all(|x| x.severity == Info) {
        out.insert(
            0,
            finding("all_clear", Info, "", "every check passed".into()),
        );
    }
    out.sort_by_key(|x| std::cmp::Reverse(x.severity));
    out
}

/// Whether two STUN/TURN URLs name the same server (host and port, the transport aside; an
/// address under this host's NAT64 `prefix` stands for the IPv4 address it embeds: a relay names
/// itself by its IPv4 address, an IPv6-only host dials it through the prefix).
fn same_server(a: &str, b: &str, prefix: Option<&ipnet::Ipv6Net>) -> bool {
    let key = |u: &str| -> Option<(std::net::IpAddr, u16)> {
        let hostport = u.split_once(':')?.1.split('?').next()?;
        let (h, p) = hostport.rsplit_once(':')?;
        let ip: std::net::IpAddr = h.trim_matches(['[', ']']).parse().ok()?;
        let ip = match (ip, prefix) {
            (std::net::IpAddr::V6(v6), Some(p)) => crate::nat64::unembed(p, v6)
                .map(std::net::IpAddr::V4)
                .unwrap_or(ip),
            _ => ip,
        };
        Some((ip, p.parse().ok()?))
    };
    a == b || matches!((key(a), key(b)), (Some(x), Some(y)) if x == y)
}

/// "12.4 Mbit/s".
fn mbit(bits_per_sec: f64) -> String {
    format!("{:.1} Mbit/s", bits_per_sec / 1e6)
}

/// A path's round trip and loss, from the echo train or else the in-tunnel probes.
fn path_figures(p: &PeerFacts) -> Option<String> {
    let mut parts = vec![];
    match p.ping.as_ref().filter(|x| x.sent > 0 && x.received > 0) {
        Some(ping) => {
            if let Some(avg) = ping.avg_ms {
                parts.push(format!("round trip {avg:.0} ms"));
            }
            let lost = ping.sent.saturating_sub(ping.received);
            if lost > 0 {
                parts.push(format!("{lost} of {} echo requests lost", ping.sent));
            }
        }
        None => {
            if let Some(rtt) = p.probe_rtt_ms {
                parts.push(format!("round trip {rtt:.0} ms"));
            }
            if let Some(l) = p.probe_loss_pct.filter(|l| *l > 0.0) {
                parts.push(format!("{l:.0}% of probes lost"));
            }
        }
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn path_words(path: &str) -> &'static str {
    match path {
        "direct" => "direct",
        "turn_relay" => "via TURN",
        "tcp_relay" => "via the TCP relay",
        _ => "no path",
    }
}

/// The report in words, for a terminal.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let f = &r.facts;
    let _ = writeln!(
        s,
        "Checks ({:.1} s{}):",
        r.took_ms as f64 / 1000.0,
        if r.deep { ", deep" } else { "" }
    );
    let ok = |b: bool| if b { "ok" } else { "FAILED" };
    let _ = writeln!(
        s,
        "  management {}{}   signal {}   TCP relay {}",
        ok(f.management.ok),
        f.clock_offset_secs
            .map(|o| format!(" (clock offset {o:+} s)"))
            .unwrap_or_default(),
        ok(f.signal),
        f.tcp_relay.as_ref().map_or("not configured", |t| ok(t.ok))
    );
    for st in &f.stun {
        let _ = match (&st.mapped, &st.error) {
            (Some(m), _) => writeln!(
                s,
                "  STUN {}: this host is {m}{}",
                st.url,
                st.rtt_ms
                    .map(|r| format!(" ({r:.1} ms)"))
                    .unwrap_or_default()
            ),
            (None, e) => writeln!(
                s,
                "  STUN {}: {}",
                st.url,
                e.as_deref().unwrap_or("no answer")
            ),
        };
    }
    for t in &f.turn {
        let state = if let Some(a) = t.relayed {
            format!(
                "allocated {a}, relay ports {}",
                match t.relay_ports_open {
                    Some(true) => "reachable",
                    Some(false) => "CLOSED",
                    None => "not checked",
                }
            )
        } else if let Some((c, w)) = &t.rejected {
            format!("refused: {c} {w}")
        } else {
            t.error.clone().unwrap_or_else(|| "no answer".into())
        };
        let _ = writeln!(s, "  TURN {}: {state}", t.url);
    }
    if let Some((_, v)) = &f.relay_view {
        let _ = writeln!(
            s,
            "  TCP relay's view: {} dropped from this host, {} to it, {} KiB queued for it",
            v.dropped_from_you,
            v.dropped_to_you,
            v.queued_to_you_bytes / 1024
        );
    }
    for (idle, alive) in &f.nat_lifetime {
        let _ = writeln!(
            s,
            "  NAT mapping idle {idle} s: {}",
            match alive {
                Some(true) => "kept",
                Some(false) => "FORGOTTEN",
                None => "could not be measured",
            }
        );
    }
    for p in &f.peers {
        let mut line = format!("  peer {}: {}", p.name, path_words(&p.path));
        if let Some(pg) = &p.ping {
            if pg.received > 0 {
                let _ = write!(
                    line,
                    ", {}/{} echo replies, avg {:.1} ms",
                    pg.received,
                    pg.sent,
                    pg.avg_ms.unwrap_or_default()
                );
            } else if pg.sent > 0 {
                let icmp = tern_proto::access_allows(&p.access, "icmp", 0);
                let _ = match (icmp, p.access.as_str()) {
                    (true, _) => write!(line, ", no echo replies although the policies allow ICMP"),
                    (false, "" | "none") => write!(
                        line,
                        ", no echo replies (no policy lets this host send it anything)"
                    ),
                    (false, a) => {
                        write!(line, ", no echo replies (the policies allow {a}, not ICMP)")
                    }
                };
            }
        }
        if let Some(rtt) = p.probe_rtt_ms {
            let _ = write!(
                line,
                ", probes {rtt:.1} ms{}",
                p.probe_loss_pct
                    .map(|l| format!(" {l:.0}% lost"))
                    .unwrap_or_default()
            );
        }
        if let Some(m) = &p.pmtu {
            let _ = write!(
                line,
                ", {}-byte packets {}",
                m.mtu,
                if m.full_ok { "pass" } else { "LOST" }
            );
        }
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s);
    for x in &r.findings {
        let sev = match x.severity {
            Severity::Error => "ERROR",
            Severity::Warning => "WARN",
            Severity::Info if x.code == "all_clear" => "OK",
            Severity::Info => "INFO",
        };
        let subject = if x.subject.is_empty() {
            String::new()
        } else {
            format!(" [{}]", x.subject)
        };
        if x.code == "all_clear" {
            let _ = writeln!(s, "{sev:<5} {}: {}", x.code, x.meaning);
            continue;
        }
        let _ = writeln!(s, "{sev:<5} {}{subject}: {}", x.code, x.meaning);
        let _ = writeln!(s, "      seen: {}", x.evidence);
        let _ = writeln!(s, "      do:   {}", x.advice);
    }
    s
}

#[cfg(test)]
mod tests;
