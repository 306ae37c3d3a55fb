//! `tern ping PEER|IP`: echo requests through the tunnel (the system's `ping`, one per second),
//! each reply printed with the path the peer's traffic took at that moment (direct, via TURN, via
//! the TCP relay) and its round trip; a change of path is called out ("now direct"). Exits
//! non-zero, saying why, when nothing answers.

use anyhow::{bail, Context};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// The peer `target` names (by name or overlay address) or the routing peer of the routed
/// network that contains it: (label for the user, address to ping, peer name to follow).
fn resolve(status: &serde_json::Value, target: &str) -> anyhow::Result<(String, IpAddr, String)> {
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let text = |p: &serde_json::Value, k: &str| p[k].as_str().unwrap_or("").to_string();
    if let Some(p) = peers
        .iter()
        .find(|p| text(p, "name") == target || text(p, "overlay_ip") == target)
    {
        let ip: IpAddr = text(p, "overlay_ip")
            .parse()
            .context("the daemon reported a malformed overlay address")?;
        return Ok((format!("{} ({ip})", text(p, "name")), ip, text(p, "name")));
    }
    let Ok(ip) = target.parse::<IpAddr>() else {
        let names: Vec<String> = peers.iter().map(|p| text(p, "name")).collect();
        bail!(
            "no peer named {target:?} in this network map{}",
            if names.is_empty() {
                " (it is empty: is a policy letting this peer reach others?)".to_string()
            } else {
                format!(" (peers: {})", names.join(", "))
            }
        );
    };
    for r in status["routes"].as_array().cloned().unwrap_or_default() {
        let Ok(net) = text(&r, "network").parse::<ipnet::IpNet>() else {
            continue;
        };
        if net.contains(&ip) {
            let via = text(&r, "peer_name");
            if via.is_empty() {
                bail!(
                    "{ip} is in the routed network {net}, but no routing peer serves it here ({})",
                    text(&r, "state")
                );
            }
            return Ok((format!("{ip} (in {net}, via {via})"), ip, via));
        }
    }
    bail!("{ip} is neither a peer's address nor inside a routed network this peer uses")
}

fn path_words(p: &serde_json::Value) -> String {
    match p["connection"].as_str().unwrap_or("none") {
        "direct" => "direct".into(),
        "turn_relay" => "via TURN".into(),
        "tcp_relay" => "via the TCP relay".into(),
        _ => "no path yet".into(),
    }
}

/// One echo request with a 1 s deadline; the round trip when it was answered.
fn echo(ip: IpAddr) -> Option<f64> {
    let out = std::process::Command::new("ping")
        .args(["-n", "-c", "1", "-W", "1"])
        .arg(ip.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("time=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

pub async fn run(sock: &Path, target: &str, count: u32, until_direct: bool) -> anyhow::Result<()> {
    let status = |raw: String| -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&raw).context("daemon sent a malformed status")
    };
    let first = status(crate::status::request(sock, "status").await?)?;
    let (label, ip, follow) = resolve(&first, target)?;
    let peer_of = |s: &serde_json::Value| {
        s["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == follow.as_str()).cloned())
            .unwrap_or_default()
    };
    let mut answered = 0;
    let mut sent = 0;
    let mut last_path: Option<String> = None;
    for i in 0..count.max(1) {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sent += 1;
        let rtt = tokio::task::spawn_blocking(move || echo(ip))
            .await
            .unwrap_or(None);
        let now = status(crate::status::request(sock, "status").await?)?;
        let peer = peer_of(&now);
        let path = path_words(&peer);
        if let Some(prev) = &last_path {
            if *prev != path {
                println!("path changed: {prev} -> {path}");
            }
        }
        match rtt {
            Some(ms) => {
                answered += 1;
                println!("reply from {label}: {path}, {ms:.1} ms");
                if until_direct && path == "direct" {
                    last_path = Some(path);
                    break;
                }
            }
            None => println!("no reply from {label} within 1 s ({path})"),
        }
        last_path = Some(path);
    }
    println!("{answered}/{sent} answered");
    if until_direct && last_path.as_deref() != Some("direct") {
        let peer = peer_of(&status(crate::status::request(sock, "status").await?)?);
        bail!(
            "no direct path to {label} after {sent} requests: still {}, because {} (`tern diagnose` says why)",
            last_path.unwrap_or_default(),
            peer["path_reason"].as_str().unwrap_or("no reason was given")
        );
    }
    if answered == 0 {
        let now = status(crate::status::request(sock, "status").await?)?;
        let route = now["routes"].as_array().and_then(|rs| {
            rs.iter()
                .find(|r| {
                    r["network"]
                        .as_str()
                        .and_then(|n| n.parse::<ipnet::IpNet>().ok())
                        .is_some_and(|n| n.contains(&ip))
                })
                .cloned()
        });
        bail!(
            "no reply from {label}: {}",
            silence(&peer_of(&now), route.as_ref())
        );
    }
    Ok(())
}

/// Why no echo request was answered, as far as this host knows: the policies (when they do not
/// allow ICMP there), else the path's own state.
fn silence(peer: &serde_json::Value, route: Option<&serde_json::Value>) -> String {
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let (access, dropped, what) = match route {
        Some(r) => (
            text(r, "access"),
            r["sent_without_policy"].as_u64().unwrap_or(0),
            format!("into {}", text(r, "network")),
        ),
        None => (
            text(peer, "access"),
            peer["sent_without_policy"].as_u64().unwrap_or(0),
            "to it".to_string(),
        ),
    };
    let probes = match peer["latency_ms"].as_f64() {
        Some(ms) if peer["state"] == "connected" => {
            format!("; the tunnel itself answers (in-tunnel probes {ms:.1} ms)")
        }
        _ => String::new(),
    };
    if !access.is_empty() && !tern_proto::access_allows(&access, "icmp", 0) {
        let allowed = if access == "none" {
            "nothing".to_string()
        } else {
            access.clone()
        };
        let counted = if dropped > 0 {
            format!(" ({dropped} packets sent anyway were dropped)")
        } else {
            String::new()
        };
        return format!(
            "the policies do not let this host send ICMP {what} (they allow {allowed}){counted}{probes}; an admin adds icmp to a policy if echo requests should pass"
        );
    }
    match text(peer, "path_reason") {
        r if r.is_empty() => format!("the path gave no reason{probes}"),
        r => format!("{r}{probes}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_to_peers_or_routing_peers_and_mistakes_are_named() {
        let s = serde_json::json!({
            "peers": [{"name": "home-b", "overlay_ip": "100.64.0.3", "connection": "direct"},
                      {"name": "gw", "overlay_ip": "100.64.0.4", "connection": "turn_relay"}],
            "routes": [{"network": "192.168.50.0/24", "peer_name": "gw", "state": "installed"},
                       {"network": "10.9.0.0/16", "peer_name": "", "state": "no connected routing peer"}],
        });
        let (label, ip, follow) = resolve(&s, "home-b").expect("by name");
        assert_eq!(
            (label.as_str(), ip.to_string().as_str(), follow.as_str()),
            ("home-b (100.64.0.3)", "100.64.0.3", "home-b")
        );
        assert_eq!(resolve(&s, "100.64.0.4").expect("by address").2, "gw");
        let (label, _, follow) = resolve(&s, "192.168.50.10").expect("in a route");
        assert_eq!(follow, "gw");
        assert!(label.contains("via gw"), "{label}");
        let e = resolve(&s, "nobody").expect_err("unknown").to_string();
        assert!(e.contains("peers: home-b, gw"), "{e}");
        let e = resolve(&s, "10.9.1.1").expect_err("unserved").to_string();
        assert!(e.contains("no routing peer serves it"), "{e}");
        let e = resolve(&s, "8.8.8.8").expect_err("outside").to_string();
        assert!(e.contains("neither a peer"), "{e}");
        assert_eq!(path_words(&s["peers"][1]), "via TURN");
    }

    #[test]
    fn silence_under_a_policy_without_icmp_is_blamed_on_the_policy_not_the_path() {
        let peer = serde_json::json!({
            "name": "factory-gw", "state": "connected", "connection": "turn_relay",
            "path_reason": "no direct pair got through the NATs; ICE relays through TURN",
            "access": "tcp 502, 80", "sent_without_policy": 6, "latency_ms": 12.4,
        });
        let why = silence(&peer, None);
        assert!(
            why.starts_with("the policies do not let this host send ICMP to it (they allow tcp 502, 80) (6 packets sent anyway were dropped)"),
            "{why}"
        );
        assert!(
            why.contains("in-tunnel probes 12.4 ms") && !why.contains("NATs"),
            "{why}"
        );
        // Into a routed network, the route's access counts.
        let route = serde_json::json!({"network": "192.168.50.0/24", "access": "none", "sent_without_policy": 0});
        let why = silence(&peer, Some(&route));
        assert!(
            why.contains("ICMP into 192.168.50.0/24 (they allow nothing)"),
            "{why}"
        );
        // ICMP allowed: the path is what speaks.
        let mut open = peer.clone();
        open["access"] = "tcp 22; icmp".into();
        assert!(
            silence(&open, None).starts_with("no direct pair"),
            "{}",
            silence(&open, None)
        );
        open["access"] = "all".into();
        assert!(silence(&open, None).starts_with("no direct pair"));
    }
}
