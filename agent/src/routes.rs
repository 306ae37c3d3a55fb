//! Routes: on clients, kernel routes through the TUN device for the routed networks (which routing
//! peer serves each is the core's choice, `tern_tunnel::routing`), and conflicts with networks
//! the host is attached to (reported, not installed). On a routing peer:
//! IP forwarding, masquerade and TCP MSS clamping with one nftables table owned by the agent
//! (replaced atomically, deleted on exit and at the next start after a crash).

use ipnet::IpNet;
use serde::Serialize;

use std::process::{Command, Stdio};

use tern_proto::PublicKey;
use tracing::{info, warn};

/// One routing decision for a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteChoice {
    pub network: String,
    pub peer_id: String,
    #[serde(skip)]
    pub peer_key: Option<PublicKey>,
    pub metric: i64,
    /// "installed", or why not ("conflict: ...", "no connected routing peer").
    pub state: String,
}

/// Networks the host is directly attached to, except on `skip_iface` (from `ip -o addr`).
pub fn local_networks(skip_iface: &str) -> Vec<(String, IpNet)> {
    let out = Command::new("ip").args(["-o", "addr", "show"]).output();
    let Ok(out) = out else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let iface = f.get(1)?.trim_end_matches(':');
            let fam = *f.get(2)?;
            if iface == skip_iface || iface == "lo" || (fam != "inet" && fam != "inet6") {
                return None;
            }
            let net: IpNet = f.get(3)?.parse().ok()?;
            let net = net.trunc();
            if net.addr().is_ipv6() && net.prefix_len() == 64 && f.get(3)?.starts_with("fe80") {
                return None;
            }
            Some((iface.to_string(), net))
        })
        .collect()
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `net` cannot be routed through the tunnel here, if it cannot.
pub fn conflict(net: &IpNet, locals: &[(String, IpNet)]) -> Option<String> {
    locals
        .iter()
        .find(|(_, l)| overlaps(net, l))
        .map(|(iface, l)| {
            format!("conflict: {net} overlaps {l} on {iface}, which this host is attached to")
        })
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

pub fn install(net: &str, iface: &str) -> Result<(), String> {
    ip(&["route", "replace", net, "dev", iface])
}

pub fn uninstall(net: &str, iface: &str) {
    let _ = ip(&["route", "del", net, "dev", iface]);
}

fn table_name(iface: &str) -> String {
    format!(
        "tern_{}",
        iface.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The routing-peer rules for `served` (network, masquerade), or none when empty.
pub fn serve(iface: &str, overlay: &str, served: &[(String, bool)]) -> Result<(), String> {
    let t = table_name(iface);
    if served.is_empty() {
        remove_rules(iface);
        return Ok(());
    }
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    let masq: String = served
        .iter()
        .filter(|(n, m)| *m && n.parse::<ipnet::Ipv4Net>().is_ok())
        .map(|(n, _)| format!("    ip saddr {overlay} ip daddr {n} masquerade\n"))
        .collect();
    // "table ...{}; delete table ..." makes the replacement atomic whether or not it existed.
    let script = format!(
        "table inet {t} {{}}
delete table inet {t}
table inet {t} {{
  chain forward {{
    type filter hook forward priority -5; policy accept;
    iifname \"{iface}\" tcp flags syn tcp option maxseg size set rt mtu
    oifname \"{iface}\" tcp flags syn tcp option maxseg size set rt mtu
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
{masq}  }}
}}
"
    );
    nft(&script)?;
    info!(table = %t, routes = served.len(), "routing peer rules applied");
    Ok(())
}

/// Deletes the agent's nftables table (on exit, and at start to clear what a crash left).
pub fn remove_rules(iface: &str) {
    let t = table_name(iface);
    if nft(&format!("table inet {t} {{}}\ndelete table inet {t}\n")).is_err() {
        warn!(table = %t, "could not remove nftables table");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_local_networks_are_conflicts() {
        let locals = vec![("eth0".to_string(), "192.168.50.0/24".parse().expect("net"))];
        let c = conflict(&"192.168.0.0/16".parse().expect("net"), &locals).expect("conflict");
        assert!(c.contains("192.168.50.0/24") && c.contains("eth0"), "{c}");
        assert!(conflict(&"10.0.0.0/8".parse().expect("net"), &locals).is_none());
    }
}
