//! Network-map deltas: what changed between two maps of one peer (remote peers one by one, every
//! other section replaced whole when it changed), and applying one to the map it was made from.
//! Pure functions, shared by management (which sends them) and the agent (which applies them).

use crate::management::{DnsConfig, DnsRecord, FirewallRule, MapDelta, NetworkMap, RemotePeer};
use prost::Message;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// The map a delta does not apply to: the agent missed a change and needs a full map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this map is serial {have}, the change is for serial {base}: a full map is needed")]
pub struct Gap {
    pub have: u64,
    pub base: u64,
}

/// The sections replaced whole when they change (remote peers, firewall rules and DNS records
/// change item by item).
macro_rules! sections {
    ($m:ident) => {
        $m!(peer_config);
        $m!(routes);
        $m!(served_routes);
        $m!(relay);
        $m!(pending_approval);
        $m!(served_services);
    };
}

fn key(m: &impl Message) -> Vec<u8> {
    m.encode_to_vec()
}

/// Items identified by a key (peers by id, names by name): those of `new` that are new or
/// differ, and the keys of those that left. When the same keys sit in the same places (the usual
/// case: a rule, a name or a peer's state changed) pair by pair, else through hash maps.
fn keyed_changes<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> &String,
) -> (Vec<T>, Vec<String>) {
    if old.len() == new.len() && old.iter().zip(new).all(|(a, b)| key(a) == key(b)) {
        let upserts = old.iter().zip(new).filter(|(a, b)| a != b);
        return (upserts.map(|(_, b)| b.clone()).collect(), vec![]);
    }
    let before: HashMap<&str, &T> = old.iter().map(|x| (key(x).as_str(), x)).collect();
    let now: HashSet<&str> = new.iter().map(|x| key(x).as_str()).collect();
    let upserts = new
        .iter()
        .filter(|x| before.get(key(x).as_str()) != Some(x))
        .cloned()
        .collect();
    let removed = old
        .iter()
        .filter(|x| !now.contains(key(x).as_str()))
        .map(|x| key(x).clone())
        .collect();
    (upserts, removed)
}

fn port_pairs(r: &FirewallRule) -> impl Iterator<Item = (u32, u32)> + '_ {
    r.ports.iter().map(|p| (p.start, p.end))
}

/// The order management sends rules in (every field, so equal in this order means equal).
fn rule_order(a: &FirewallRule, b: &FirewallRule) -> Ordering {
    (&a.peer_cidr, a.direction, a.protocol)
        .cmp(&(&b.peer_cidr, b.direction, b.protocol))
        .then_with(|| port_pairs(a).cmp(port_pairs(b)))
        .then_with(|| (&a.policy_id, &a.network).cmp(&(&b.policy_id, &b.network)))
}

/// Whether `rules` are in the order management sends them (sorted, no repeats), which lets a
/// delta compare two lists in one pass.
pub fn in_rule_order(rules: &[FirewallRule]) -> bool {
    rules
        .windows(2)
        .all(|w| rule_order(&w[0], &w[1]) == Ordering::Less)
}

/// The rules that joined (in `new`, not in `old`) and left: by one merge when both lists are in
/// management's order without repeats (as management sends them), else through hash sets.
fn rule_changes(
    old: &[FirewallRule],
    new: &[FirewallRule],
) -> (Vec<FirewallRule>, Vec<FirewallRule>) {
    let (mut added, mut removed) = (vec![], vec![]);
    if in_rule_order(old) && in_rule_order(new) {
        let (mut i, mut j) = (0, 0);
        while let (Some(a), Some(b)) = (old.get(i), new.get(j)) {
            match rule_order(a, b) {
                Ordering::Equal => (i, j) = (i + 1, j + 1),
                Ordering::Less => {
                    removed.push(a.clone());
                    i += 1;
                }
                Ordering::Greater => {
                    added.push(b.clone());
                    j += 1;
                }
            }
        }
        removed.extend_from_slice(&old[i..]);
        added.extend_from_slice(&new[j..]);
        return (added, removed);
    }
    let had: HashSet<&FirewallRule> = old.iter().collect();
    let has: HashSet<&FirewallRule> = new.iter().collect();
    added.extend(new.iter().filter(|r| !had.contains(r)).cloned());
    removed.extend(old.iter().filter(|r| !has.contains(r)).cloned());
    (added, removed)
}

/// What turns `old` into `new`; None when nothing but the serial differs.
pub fn delta(old: &NetworkMap, new: &NetworkMap) -> Option<MapDelta> {
    let mut d = MapDelta {
        base_serial: old.serial,
        serial: new.serial,
        ..Default::default()
    };
    let mut sections = NetworkMap::default();
    macro_rules! diff {
        ($f:ident) => {
            if old.$f != new.$f {
                d.replaced.push(stringify!($f).to_string());
                sections.$f = new.$f.clone();
            }
        };
    }
    sections!(diff);
    // Firewall rules: the ones that joined and left, unless replacing them is smaller.
    if old.firewall_rules != new.firewall_rules {
        let (added, removed) = rule_changes(&old.firewall_rules, &new.firewall_rules);
        let size = |v: &[FirewallRule]| v.iter().map(|r| r.encoded_len() + 2).sum::<usize>();
        if size(&added) + size(&removed) < size(&new.firewall_rules) {
            d.added_rules = added;
            d.removed_rules = removed;
        } else {
            d.replaced.push("firewall_rules".into());
            sections.firewall_rules = new.firewall_rules.clone();
        }
    }
    // DNS: records by name when only they changed, else the section whole.
    if old.dns != new.dns {
        let (o, n) = (
            old.dns.clone().unwrap_or_default(),
            new.dns.clone().unwrap_or_default(),
        );
        let same_rest = old.dns.is_some() == new.dns.is_some()
            && o.domain == n.domain
            && o.nameservers == n.nameservers;
        if same_rest {
            (d.upsert_records, d.removed_records) =
                keyed_changes(&o.records, &n.records, |r: &DnsRecord| &r.name);
        } else {
            d.replaced.push("dns".into());
            sections.dns = new.dns.clone();
        }
    }
    (d.upsert_peers, d.removed_peers) =
        keyed_changes(&old.remote_peers, &new.remote_peers, |p: &RemotePeer| &p.id);
    if d.replaced.is_empty()
        && d.upsert_peers.is_empty()
        && d.removed_peers.is_empty()
        && d.added_rules.is_empty()
        && d.removed_rules.is_empty()
        && d.upsert_records.is_empty()
        && d.removed_records.is_empty()
    {
        return None;
    }
    d.sections = Some(sections);
    Some(d)
}

/// `base` with `d` applied (remote peers keep the order of the newer map: unchanged ones where
/// they were, new ones after them, as the server's order is by name the agent does not rely on
/// it).
pub fn apply(base: &NetworkMap, d: &MapDelta) -> Result<NetworkMap, Gap> {
    if base.serial != d.base_serial {
        return Err(Gap {
            have: base.serial,
            base: d.base_serial,
        });
    }
    let mut out = base.clone();
    out.serial = d.serial;
    let sections = d.sections.clone().unwrap_or_default();
    macro_rules! replace {
        ($f:ident) => {
            if d.replaced.iter().any(|r| r == stringify!($f)) {
                out.$f = sections.$f.clone();
            }
        };
    }
    sections!(replace);
    replace!(firewall_rules);
    replace!(dns);
    if !d.added_rules.is_empty() || !d.removed_rules.is_empty() {
        let gone: HashSet<&FirewallRule> = d.removed_rules.iter().collect();
        out.firewall_rules.retain(|r| !gone.contains(r));
        out.firewall_rules.extend(d.added_rules.iter().cloned());
    }
    if !d.upsert_records.is_empty() || !d.removed_records.is_empty() {
        let dns = out.dns.get_or_insert_with(DnsConfig::default);
        let gone: HashSet<&str> = d.removed_records.iter().map(String::as_str).collect();
        dns.records.retain(|r| !gone.contains(r.name.as_str()));
        for r in &d.upsert_records {
            match dns.records.iter_mut().find(|x| x.name == r.name) {
                Some(x) => *x = r.clone(),
                None => dns.records.push(r.clone()),
            }
        }
    }
    let removed: std::collections::HashSet<&str> =
        d.removed_peers.iter().map(String::as_str).collect();
    out.remote_peers
        .retain(|p| !removed.contains(p.id.as_str()));
    for p in &d.upsert_peers {
        match out.remote_peers.iter_mut().find(|x| x.id == p.id) {
            Some(x) => *x = p.clone(),
            None => out.remote_peers.push(p.clone()),
        }
    }
    Ok(out)
}

/// The same maps, remote peers, firewall rules and DNS records compared as sets (their order
/// carries no meaning).
pub fn same(a: &NetworkMap, b: &NetworkMap) -> bool {
    let norm = |m: &NetworkMap| {
        let mut m = m.clone();
        m.remote_peers.sort_by(|x, y| x.id.cmp(&y.id));
        m.firewall_rules.sort_by_key(key);
        if let Some(d) = m.dns.as_mut() {
            d.records.sort_by(|x, y| x.name.cmp(&y.name));
        }
        m
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::management as pb;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn peer(r: &mut StdRng, i: usize) -> RemotePeer {
        RemotePeer {
            id: format!("p{i}"),
            name: format!("peer-{i}"),
            wg_public_key: vec![i as u8; 32],
            allowed_ips: vec![format!("100.64.{}.{}/32", i / 250, i % 250 + 1)],
            overlay_ip: format!("100.64.{}.{}", i / 250, i % 250 + 1),
            connected: r.gen_bool(0.5),
            hosted: r.gen_bool(0.1),
        }
    }

    fn map(r: &mut StdRng, serial: u64) -> NetworkMap {
        let n = r.gen_range(0..40);
        let mut ids: Vec<usize> = (0..60).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.gen_range(0..=i));
        }
        NetworkMap {
            serial,
            peer_config: r.gen_bool(0.8).then(|| pb::PeerConfig {
                address: "100.64.0.1/10".into(),
                mtu: if r.gen_bool(0.5) { 1280 } else { 1420 },
                ..Default::default()
            }),
            remote_peers: ids[..n].iter().map(|&i| peer(r, i)).collect(),
            firewall_rules: (0..r.gen_range(0..5))
                .map(|i| pb::FirewallRule {
                    peer_cidr: format!("100.64.0.{i}/32"),
                    policy_id: format!("pol{}", r.gen_range(0..3)),
                    ..Default::default()
                })
                .collect(),
            routes: (0..r.gen_range(0..3))
                .map(|i| pb::Route {
                    network: format!("192.168.{i}.0/24"),
                    metric: r.gen_range(0..3),
                    ..Default::default()
                })
                .collect(),
            pending_approval: r.gen_bool(0.1),
            dns: r.gen_bool(0.7).then(|| pb::DnsConfig {
                domain: "tern.internal".into(),
                records: (0..r.gen_range(0..4))
                    .map(|i| pb::DnsRecord {
                        name: format!("n{i}"),
                        ip: format!("100.64.0.{i}"),
                    })
                    .collect(),
                nameservers: vec![],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_applied_to_the_old_map_gives_the_new_one() {
        let mut r = StdRng::seed_from_u64(0x7e57);
        for round in 0..3000u64 {
            let a = map(&mut r, round * 2);
            // Often a small change of a, sometimes another map entirely.
            let b = if r.gen_bool(0.7) {
                let mut b = a.clone();
                b.serial = round * 2 + 1;
                match r.gen_range(0..9) {
                    // Rules out of management's order (deltas then compare them as sets).
                    6 if b.firewall_rules.len() > 1 => {
                        b.firewall_rules.reverse();
                        b.firewall_rules[0].policy_id = format!("pol{round}");
                    }
                    7 if !b.firewall_rules.is_empty() => {
                        let i = r.gen_range(0..b.firewall_rules.len());
                        b.firewall_rules[i].ports = vec![pb::PortRange { start: 22, end: 22 }];
                    }
                    8 if b.dns.as_ref().is_some_and(|d| !d.records.is_empty()) => {
                        if let Some(d) = b.dns.as_mut() {
                            d.records[0].ip = "100.64.9.8".into();
                        }
                    }
                    4 => b.firewall_rules.push(pb::FirewallRule {
                        peer_cidr: format!("100.64.9.{}/32", r.gen_range(0..9)),
                        ..Default::default()
                    }),
                    5 if b.dns.is_some() => {
                        if let Some(d) = b.dns.as_mut() {
                            d.records.push(pb::DnsRecord {
                                name: format!("x{round}"),
                                ip: "100.64.9.9".into(),
                            });
                            if d.records.len() > 2 {
                                d.records.remove(0);
                            }
                        }
                    }
                    0 if !b.remote_peers.is_empty() => {
                        let i = r.gen_range(0..b.remote_peers.len());
                        b.remote_peers[i].connected = !b.remote_peers[i].connected;
                    }
                    1 if !b.remote_peers.is_empty() => {
                        let i = r.gen_range(0..b.remote_peers.len());
                        b.remote_peers.remove(i);
                    }
                    2 => b.remote_peers.push(peer(&mut r, 100 + round as usize)),
                    _ => b.pending_approval = !b.pending_approval,
                }
                b
            } else {
                map(&mut r, round * 2 + 1)
            };
            match delta(&a, &b) {
                None => assert!(same(
                    &NetworkMap {
                        serial: b.serial,
                        ..a.clone()
                    },
                    &b
                )),
                Some(d) => {
                    let got = apply(&a, &d).expect("applies to its base");
                    assert!(same(&got, &b), "round {round}:\n{got:?}\n!=\n{b:?}");
                    assert_eq!(got.serial, b.serial);
                }
            }
        }
    }

    #[test]
    fn a_delta_for_another_map_is_a_gap_and_small_changes_are_small() {
        let mut r = StdRng::seed_from_u64(1);
        let mut a = map(&mut r, 10);
        a.remote_peers = (0..1000).map(|i| peer(&mut r, i)).collect();
        let mut b = a.clone();
        b.serial = 11;
        b.remote_peers[500].connected = !b.remote_peers[500].connected;
        let d = delta(&a, &b).expect("a change");
        assert_eq!(d.upsert_peers.len(), 1);
        assert!(d.replaced.is_empty());
        let full = b.encoded_len();
        let small = d.encoded_len();
        assert!(small * 100 < full, "delta {small} B vs full {full} B");
        let older = NetworkMap {
            serial: 9,
            ..a.clone()
        };
        assert_eq!(apply(&older, &d), Err(Gap { have: 9, base: 10 }));
        assert_eq!(
            delta(
                &a,
                &NetworkMap {
                    serial: 12,
                    ..a.clone()
                }
            ),
            None
        );
    }
}
