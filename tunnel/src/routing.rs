//! Which routing peer serves each routed network: the lowest metric among the routing peers that
//! are connected, and sticky: the current choice stays while it is connected and as good as the
//! best, so equal routers never flap.

use std::collections::{BTreeMap, HashMap};

/// A routing peer's offer for a network (one per route of the network map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub network: String,
    pub peer_id: String,
    pub metric: i64,
}

/// The chosen (peer id, metric) per network; None if no routing peer of it is connected.
pub fn select(
    offers: &[Offer],
    connected: &HashMap<String, bool>,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<(String, i64)>> {
    let mut by_net: BTreeMap<&str, Vec<&Offer>> = BTreeMap::new();
    for o in offers {
        by_net.entry(o.network.as_str()).or_default().push(o);
    }
    let mut out = BTreeMap::new();
    for (net, os) in by_net {
        let mut up: Vec<&&Offer> = os
            .iter()
            .filter(|o| connected.get(&o.peer_id).copied().unwrap_or(false))
            .collect();
        up.sort_by(|a, b| (a.metric, &a.peer_id).cmp(&(b.metric, &b.peer_id)));
        let choice = up.first().map(|best| {
            let keep = current.get(net).and_then(|cur| {
                up.iter()
                    .find(|o| &o.peer_id == cur && o.metric == best.metric)
            });
            let o = keep.unwrap_or(best);
            (o.peer_id.clone(), o.metric)
        });
        out.insert(net.to_string(), choice);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(net: &str, peer: &str, metric: i64) -> Offer {
        Offer {
            network: net.into(),
            peer_id: peer.into(),
            metric,
        }
    }

    #[test]
    fn the_best_connected_router_wins_and_equal_ones_do_not_flap() {
        let offers = [
            offer("192.168.50.0/24", "gw1", 100),
            offer("192.168.50.0/24", "gw2", 100),
            offer("192.168.50.0/24", "gw3", 200),
            offer("10.9.0.0/16", "gw3", 10),
        ];
        let up = |ids: &[&str]| -> HashMap<String, bool> {
            ids.iter().map(|i| (i.to_string(), true)).collect()
        };
        let none = BTreeMap::new();
        let pick = select(&offers, &up(&["gw1", "gw2", "gw3"]), &none);
        assert_eq!(pick["192.168.50.0/24"], Some(("gw1".into(), 100)));
        assert_eq!(pick["10.9.0.0/16"], Some(("gw3".into(), 10)));
        // gw2 is current: an equal gw1 does not take over.
        let cur = BTreeMap::from([("192.168.50.0/24".to_string(), "gw2".to_string())]);
        assert_eq!(
            select(&offers, &up(&["gw1", "gw2"]), &cur)["192.168.50.0/24"],
            Some(("gw2".into(), 100))
        );
        // Failover: gw2 gone -> gw1; both gone -> the worse gw3; nobody -> None.
        assert_eq!(
            select(&offers, &up(&["gw1", "gw3"]), &cur)["192.168.50.0/24"],
            Some(("gw1".into(), 100))
        );
        assert_eq!(
            select(&offers, &up(&["gw3"]), &cur)["192.168.50.0/24"],
            Some(("gw3".into(), 200))
        );
        assert_eq!(select(&offers, &up(&[]), &cur)["192.168.50.0/24"], None);
        // A better router coming back replaces a worse current one.
        let cur3 = BTreeMap::from([("192.168.50.0/24".to_string(), "gw3".to_string())]);
        assert_eq!(
            select(&offers, &up(&["gw1", "gw3"]), &cur3)["192.168.50.0/24"],
            Some(("gw1".into(), 100))
        );
    }
}
