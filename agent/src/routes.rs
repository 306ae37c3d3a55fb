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
    /// What the policies let this peer reach in the network: "all", "none", or protocols and
    /// ports ("tcp 22, 443").
    pub access: String,
    /// An admin opened the network to every peer the route is distributed to, whatever the
    /// policies say.
    pub open_to_groups: bool,
    /// With access "none": packets this host sent into the network anyway (the routing peer
    /// drops them).
    pub sent_without_policy: u64,
}

impl RouteChoice {
    /// The state as reported to management: (code, reason in words).
    pub fn report(&self) -> (&'static str, String) {
        let via = if self.peer_name.is_empty() {
            "the routing peer".to_string()
        } else {
            self.peer_name.clone()
        };
        if self.state == "installed" {
            if self.access == "none" {
                return (
                    "no_access",
                    format!(
                        "no policy lets this peer use {}; {via} drops its traffic",
                        self.network
                    ),
                );
            }
            return ("installed", String::new());
        }
        if let Some(why) = self.state.strip_prefix("conflict: ") {
            return ("conflict", why.to_string());
        }
        if self.state.starts_with("kernel refused") {
            return ("failed", self.state.clone());
        }
        ("unserved", self.state.clone())
    }
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
    fn route_states_are_reported_as_codes_with_the_reason() {
        let r = |state: &str, access: &str| RouteChoice {
            network: "192.168.50.0/24".into(),
            peer_id: "p".into(),
            peer_name: "factory-gw".into(),
            peer_key: None,
            metric: 10,
            state: state.into(),
            access: access.into(),
            open_to_groups: false,
            sent_without_policy: 0,
        };
        assert_eq!(r("installed", "all").report(), ("installed", String::new()));
        assert_eq!(r("installed", "tcp 22").report().0, "installed");
        let (code, why) = r("installed", "none").report();
        assert_eq!(code, "no_access");
        assert!(why.contains("factory-gw drops its traffic"), "{why}");
        let (code, why) = r("conflict: 192.168.50.0/24 overlaps 192.168.50.0/24 on eth0, which this host is attached to", "all").report();
        assert_eq!(code, "conflict");
        assert!(why.starts_with("192.168.50.0/24 overlaps"), "{why}");
        assert_eq!(r("no connected routing peer", "all").report().0, "unserved");
        assert_eq!(
            r("kernel refused the route: File exists", "all").report().0,
            "failed"
        );
    }

    #[test]
    fn overlapping_local_networks_are_conflicts() {
        let locals = vec![("eth0".to_string(), "192.168.50.0/24".parse().expect("net"))];
        let c = conflict(&"192.168.0.0/16".parse().expect("net"), &locals).expect("conflict");
        assert!(c.contains("192.168.50.0/24") && c.contains("eth0"), "{c}");
        assert!(conflict(&"10.0.0.0/8".parse().expect("net"), &locals).is_none());
    }
}
