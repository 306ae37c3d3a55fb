//! Routes as the agent reports them: which routing peer serves each routed network (the core's
//! choice, `tern_tunnel::routing`) and conflicts with networks the host is attached to (reported,
//! not installed). Installing them, and the routing peer's forwarding rules, is the platform's
//! job (`crate::platform::net`).

use ipnet::IpNet;
use serde::Serialize;

use tern_proto::PublicKey;

/// One routing decision for a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteChoice {
    pub network: String,
    pub peer_id: String,
    /// The routing peer's name (empty when no peer serves the network).
    pub peer_name: String,
    #[serde(skip)]
    pub peer_key: Option<PublicKey>,
    pub metric: i64,
    /// "installed", or why not ("conflict: ...", "no connected routing peer").
    pub state: String,
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
