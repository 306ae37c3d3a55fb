//! The host's networks on Linux: the networks it is attached to (`ip -o addr`), whether it has
//! an IPv4 default route, kernel routes through the TUN device for routed networks, and on a
//! routing peer IP forwarding, masquerade and TCP MSS clamping with one nftables table owned by
//! the agent (replaced atomically, deleted on exit and at the next start after a crash).

use ipnet::IpNet;
use std::process::{Command, Stdio};
use tracing::{info, warn};

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

/// Whether the host has a default route (not through `skip_iface`) for IPv4 and for IPv6.
pub fn default_routes(skip_iface: &str) -> (bool, bool) {
    let has = |fam: &str| {
        Command::new("ip")
            .args([fam, "-o", "route", "show", "default"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                    let mut f = l.split_whitespace();
                    !f.any(|w| w == "dev") || f.next() != Some(skip_iface)
                })
            })
            .unwrap_or(false)
    };
    (has("-4"), has("-6"))
}

/// Networks the host reaches without the tunnel: every route of the main tables (IPv4 and IPv6)
/// except the default route, the tunnel's own and link-local ones (from `ip -o route`).
pub fn reachable_networks(skip_iface: &str) -> Vec<IpNet> {
    let mut out = vec![];
    for fam in ["-4", "-6"] {
        let Ok(o) = Command::new("ip")
            .args([fam, "-o", "route", "show"])
            .output()
        else {
            continue;
        };
        out.extend(parse_routes(
            &String::from_utf8_lossy(&o.stdout),
            skip_iface,
        ));
    }
    out.sort();
    out.dedup();
    out
}

fn parse_routes(text: &str, skip_iface: &str) -> Vec<IpNet> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let first = *f.first()?;
            if matches!(
                first,
                "unreachable"
                    | "blackhole"
                    | "prohibit"
                    | "throw"
                    | "local"
                    | "broadcast"
                    | "multicast"
                    | "default"
            ) {
                return None;
            }
            let dev = f
                .iter()
                .position(|w| *w == "dev")
                .and_then(|i| f.get(i + 1));
            if dev.is_some_and(|d| *d == skip_iface || *d == "lo") {
                return None;
            }
            let net: IpNet = match first.parse() {
                Ok(n) => n,
                Err(_) => first.parse::<std::net::IpAddr>().ok()?.into(),
            };
            let link_local = match net {
                IpNet::V4(n) => n.addr().is_link_local(),
                IpNet::V6(n) => n.addr().is_unicast_link_local(),
            };
            (!link_local).then(|| net.trunc())
        })
        .collect()
}

/// True if the host has an IPv4 default route (then IPv4 literals work as they are).
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

pub fn install(net: &IpNet, iface: &str) -> Result<(), String> {
    ip(&["route", "replace", &net.to_string(), "dev", iface])
}

pub fn uninstall(net: &IpNet, iface: &str) {
    let _ = ip(&["route", "del", &net.to_string(), "dev", iface]);
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

/// The routing-peer rules for `served` (network, masquerade), or none when empty. Every value
/// that reaches the nftables script is typed (networks, the overlay range) or checked
/// (`iface`, [`valid_iface`]): nothing from the network map is pasted in as text.
pub fn serve(iface: &str, overlay: Option<IpNet>, served: &[(IpNet, bool)]) -> Result<(), String> {
    if !valid_iface(iface) {
        return Err(format!("{iface:?} is not a valid interface name"));
    }
    let t = table_name(iface);
    if served.is_empty() {
        remove_rules(iface);
        return Ok(());
    }
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    let masq: String = match overlay {
        Some(IpNet::V4(overlay)) => served
            .iter()
            .filter_map(|(n, m)| match n {
                IpNet::V4(n) if *m => {
                    Some(format!("    ip saddr {overlay} ip daddr {n} masquerade\n"))
                }
                _ => None,
            })
            .collect(),
        _ => {
            if served.iter().any(|(_, m)| *m) {
                warn!("no IPv4 overlay range in the map: routed networks are served without masquerade");
            }
            String::new()
        }
    };
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

/// A Linux interface name: 1-15 bytes of letters, digits, '-', '_' or '.'.
pub fn valid_iface(iface: &str) -> bool {
    !iface.is_empty()
        && iface.len() <= 15
        && iface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
    fn interface_names_are_checked_before_they_reach_nft() {
        for ok in ["tern0", "wt-0", "eth0.100", "a_b"] {
            assert!(valid_iface(ok), "{ok}");
        }
        for bad in [
            "",
            "tern0\"; flush ruleset; \"",
            "a b",
            "sixteen-chars-xx",
            "t\n0",
        ] {
            assert!(!valid_iface(bad), "{bad:?}");
        }
        assert!(serve("x\"; flush ruleset", None, &[]).is_err());
    }

    #[test]
    fn reachable_networks_come_from_the_routing_table_without_default_or_tunnel() {
        let text = "default via 10.0.0.1 dev eth0 proto dhcp\n\
            10.0.0.0/24 dev eth0 proto kernel scope link src 10.0.0.5\n\
            192.168.50.0/24 dev eth1 proto kernel scope link src 192.168.50.1\n\
            10.20.0.0/16 via 192.168.50.254 dev eth1\n\
            100.64.0.0/10 dev tern0 proto kernel scope link src 100.64.0.1\n\
            unreachable 10.99.0.0/16\n\
            169.254.0.0/16 dev eth0 scope link\n\
            203.0.113.7 via 10.0.0.1 dev eth0\n";
        let nets: Vec<String> = parse_routes(text, "tern0")
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            nets,
            [
                "10.0.0.0/24",
                "192.168.50.0/24",
                "10.20.0.0/16",
                "203.0.113.7/32"
            ]
        );
    }
}
