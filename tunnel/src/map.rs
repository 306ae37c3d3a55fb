//! The network map as the core takes it (feature `map`): peers, the inbound policy filter, the
//! outbound rules and the route offers, read from management's `NetworkMap`. Shared by the agent
//! and the server's WireGuard-device gateway, which runs a core per device it hosts.

use crate::firewall::{Rule, ICMP, TCP, UDP};
use crate::routing::Offer;
use crate::{Node, PeerSpec};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;
use tern_proto::management as pb;

/// A firewall rule of the map as the policy filter takes it (inbound rules only).
pub fn rule_from_map(r: &pb::FirewallRule) -> Option<Rule> {
    if r.direction != pb::Direction::In as i32 {
        return None;
    }
    let proto = match pb::Protocol::try_from(r.protocol).ok()? {
        pb::Protocol::Any => 0,
        pb::Protocol::Tcp => TCP,
        pb::Protocol::Udp => UDP,
        pb::Protocol::Icmp => ICMP,
    };
    Some(Rule {
        src: r.peer_cidr.parse().ok()?,
        proto,
        ports: r
            .ports
            .iter()
            .map(|p| (p.start as u16, p.end as u16))
            .collect(),
        network: if r.network.is_empty() {
            None
        } else {
            Some(r.network.parse().ok()?)
        },
    })
}

/// The inbound policy filter's rules.
pub fn inbound_rules(map: &pb::NetworkMap) -> Vec<Rule> {
    map.firewall_rules
        .iter()
        .filter_map(rule_from_map)
        .collect()
}

/// What the peers' filters let this host open (outbound rules to peers, as filter rules).
pub fn outbound_rules(map: &pb::NetworkMap) -> Vec<Rule> {
    map.firewall_rules
        .iter()
        .filter(|r| r.direction == pb::Direction::Out as i32 && r.network.is_empty())
        .filter_map(|r| {
            rule_from_map(&pb::FirewallRule {
                direction: pb::Direction::In as i32,
                ..r.clone()
            })
        })
        .collect()
}

/// The remote peers (malformed entries are left out).
pub fn peer_specs(map: &pb::NetworkMap) -> Vec<PeerSpec> {
    map.remote_peers
        .iter()
        .filter_map(|rp| {
            Some(PeerSpec {
                key: tern_proto::PublicKey::from_slice(&rp.wg_public_key).ok()?.0,
                id: rp.id.clone(),
                name: rp.name.clone(),
                overlay_ip: rp.overlay_ip.parse().ok()?,
                allowed: rp
                    .allowed_ips
                    .iter()
                    .filter_map(|s| s.parse().ok())
                    .collect(),
                online: rp.connected,
                relay_only: rp.hosted,
            })
        })
        .collect()
}

/// This host's overlay address.
pub fn local_address(map: &pb::NetworkMap) -> Option<IpAddr> {
    map.peer_config
        .as_ref()
        .and_then(|c| c.address.split('/').next()?.parse().ok())
}

/// Applies the map's overlay, rules and peers to the core (peers that stay keep their sessions).
pub fn apply(node: &mut Node, map: &pb::NetworkMap, now: Instant) {
    if let Some(cfg) = &map.peer_config {
        node.set_overlay(cfg.overlay_range.parse().ok());
    }
    node.set_rules(local_address(map), inbound_rules(map));
    node.set_out_rules(outbound_rules(map));
    node.apply_peers(&peer_specs(map), now);
}

/// The routed networks the map offers, and which peers are connected (routing-peer selection's
/// inputs).
pub fn route_offers(map: &pb::NetworkMap) -> (Vec<Offer>, HashMap<String, bool>) {
    let offers = map
        .routes
        .iter()
        .map(|r| Offer {
            network: r.network.clone(),
            peer_id: r.routing_peer_id.clone(),
            metric: r.metric,
        })
        .collect();
    let connected = map
        .remote_peers
        .iter()
        .map(|p| (p.id.clone(), p.connected))
        .collect();
    (offers, connected)
}

/// The networks no policy lets this host use (the map's route access says `none`).
pub fn denied_networks(map: &pb::NetworkMap) -> Vec<IpNet> {
    map.routes
        .iter()
        .filter(|r| r.access == "none")
        .filter_map(|r| r.network.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_rules_become_inbound_filter_rules() {
        let r = pb::FirewallRule {
            peer_cidr: "100.64.0.2/32".into(),
            direction: pb::Direction::In as i32,
            protocol: pb::Protocol::Tcp as i32,
            ports: vec![pb::PortRange { start: 22, end: 22 }],
            policy_id: "p".into(),
            network: "192.168.50.0/24".into(),
        };
        let rule = rule_from_map(&r).expect("rule");
        assert_eq!(rule.proto, TCP);
        assert_eq!(rule.ports, vec![(22, 22)]);
        assert_eq!(rule.network, Some("192.168.50.0/24".parse().expect("net")));
        let out = pb::FirewallRule {
            direction: pb::Direction::Out as i32,
            ..r.clone()
        };
        assert!(
            rule_from_map(&out).is_none(),
            "outbound rules are not filters here"
        );
        let bad = pb::FirewallRule {
            peer_cidr: "nonsense".into(),
            ..r
        };
        assert!(rule_from_map(&bad).is_none());
    }

    #[test]
    fn hosted_peers_are_relay_only() {
        let key = [7u8; 32];
        let map = pb::NetworkMap {
            remote_peers: vec![
                pb::RemotePeer {
                    id: "phone".into(),
                    name: "phone".into(),
                    wg_public_key: key.to_vec(),
                    allowed_ips: vec!["100.64.0.9/32".into()],
                    overlay_ip: "100.64.0.9".into(),
                    connected: true,
                    hosted: true,
                },
                pb::RemotePeer {
                    id: "bad".into(),
                    wg_public_key: vec![1, 2],
                    overlay_ip: "100.64.0.10".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let specs = peer_specs(&map);
        assert_eq!(specs.len(), 1, "a malformed key is left out");
        assert!(specs[0].relay_only);
        assert_eq!(specs[0].key, key);
    }
}
