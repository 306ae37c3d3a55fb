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

/// A delta that changes nothing but the serial.
fn is_empty(d: &MapDelta) -> bool {
    d.replaced.is_empty()
        && d.upsert_peers.is_empty()
        && d.removed_peers.is_empty()
        && d.added_rules.is_empty()
        && d.removed_rules.is_empty()
        && d.upsert_records.is_empty()
        && d.removed_records.is_empty()
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
    if is_empty(&d) {
        return None;
    }
    d.sections = Some(sections);
    Some(d)
}

/// Bytes that are not a network map as this version encodes it (`delta_encoded`'s input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an encoded network map: {0}")]
pub struct Malformed(String);

impl From<prost::DecodeError> for Malformed {
    fn from(e: prost::DecodeError) -> Self {
        Malformed(e.to_string())
    }
}

/// One field of an encoded message: its whole bytes (key, length, value) and its value (for a
/// length-delimited field, the bytes inside).
#[derive(Clone, Copy)]
struct Field<'a> {
    raw: &'a [u8],
    value: &'a [u8],
}

/// The fields of an encoded message by field number (1..=N; others are refused): a field that
/// repeats keeps every occurrence, in order.
fn fields<const N: usize>(mut buf: &[u8]) -> Result<[Vec<Field<'_>>; N], Malformed> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut out: [Vec<Field<'_>>; N] = std::array::from_fn(|_| Vec::new());
    while !buf.is_empty() {
        let start = buf;
        let (num, wire) = decode_key(&mut buf)?;
        let slot = (num as usize)
            .checked_sub(1)
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| Malformed(format!("unknown field {num}")))?;
        let value = match wire {
            WireType::Varint => {
                let mut rest = buf;
                decode_varint(&mut rest)?;
                let len = buf.len() - rest.len();
                take(&mut buf, len, num)?
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf)?)
                    .map_err(|_| Malformed("length out of range".into()))?;
                take(&mut buf, len, num)?
            }
            WireType::SixtyFourBit => take(&mut buf, 8, num)?,
            WireType::ThirtyTwoBit => take(&mut buf, 4, num)?,
            WireType::StartGroup | WireType::EndGroup => {
                return Err(Malformed(format!("field {num} is a group")))
            }
        };
        slot.push(Field {
            raw: &start[..start.len() - buf.len()],
            value,
        });
    }
    Ok(out)
}

/// The next `len` bytes of field `num`'s value.
fn take<'a>(buf: &mut &'a [u8], len: usize, num: u32) -> Result<&'a [u8], Malformed> {
    let (value, rest) = buf
        .split_at_checked(len)
        .ok_or_else(|| Malformed(format!("field {num} is cut short")))?;
    *buf = rest;
    Ok(value)
}

fn same_fields(a: &[Field<'_>], b: &[Field<'_>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.raw == y.raw)
}

/// The items of two lists that are not the same bytes at the same place counted from either
/// end: what is left to compare item by item.
fn middles<'o, 'n, 'a, 'b>(
    old: &'o [Field<'a>],
    new: &'n [Field<'b>],
) -> (&'o [Field<'a>], &'n [Field<'b>]) {
    let head = old
        .iter()
        .zip(new)
        .take_while(|(a, b)| a.value == b.value)
        .count();
    let (old, new) = (&old[head..], &new[head..]);
    let tail = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(|(a, b)| a.value == b.value)
        .count();
    (&old[..old.len() - tail], &new[..new.len() - tail])
}

fn decode_all<T: Message + Default>(items: &[Field<'_>]) -> Result<Vec<T>, Malformed> {
    items
        .iter()
        .map(|f| T::decode(f.value).map_err(Malformed::from))
        .collect()
}

/// Items identified by a key (see `keyed_changes`), on encoded lists: items that are the same
/// bytes at the same place from either end are left alone, the rest is decoded and compared.
/// Keys are unique within each list (as in the maps management makes); when one that left is
/// still among the items left alone (a repeated key), the whole lists are compared.
fn keyed_changes_encoded<T: Message + Default + Clone + PartialEq>(
    old: &[Field<'_>],
    new: &[Field<'_>],
    key: impl Fn(&T) -> &String + Copy,
) -> Result<(Vec<T>, Vec<String>), Malformed> {
    let (o, n) = middles(old, new);
    let (upserts, removed) = keyed_changes(&decode_all(o)?, &decode_all(n)?, key);
    if removed.is_empty() || n.len() == new.len() {
        return Ok((upserts, removed));
    }
    let kept: Vec<T> = decode_all(new)?;
    if kept.iter().any(|x| removed.contains(key(x))) {
        return Ok(keyed_changes(&decode_all(old)?, &kept, key));
    }
    Ok((upserts, removed))
}

/// What turns the map encoded as `old` (with serial `old_serial`) into the one encoded as `new`,
/// as `delta` would make it from the decoded maps, without decoding what is the same in both:
/// sections are compared as bytes, and remote peers, rules and DNS records item by item as bytes,
/// only the items that differ decoded. Serial fields in the bytes are ignored. None when nothing
/// but the serial differs.
pub fn delta_encoded(
    old: &[u8],
    old_serial: u64,
    new: &[u8],
    new_serial: u64,
) -> Result<Option<MapDelta>, Malformed> {
    const PEERS: usize = 2;
    const RULES: usize = 3;
    const DNS: usize = 9;
    // NetworkMap's fields by number - 1, for the sections replaced whole.
    const SECTIONS: [(usize, &str); 6] = [
        (1, "peer_config"),
        (4, "routes"),
        (5, "served_routes"),
        (6, "relay"),
        (7, "pending_approval"),
        (8, "served_services"),
    ];
    let (a, b) = (fields::<10>(old)?, fields::<10>(new)?);
    let mut d = MapDelta {
        base_serial: old_serial,
        serial: new_serial,
        ..Default::default()
    };
    // The sections that changed, re-encoded as a map of their own and decoded once.
    let mut sections: Vec<u8> = vec![];
    for (i, name) in SECTIONS {
        if !same_fields(&a[i], &b[i]) {
            d.replaced.push(name.to_string());
            b[i].iter().for_each(|f| sections.extend_from_slice(f.raw));
        }
    }
    if !same_fields(&a[RULES], &b[RULES]) {
        let (o, n) = middles(&a[RULES], &b[RULES]);
        let (added, removed) = rule_changes(&decode_all(o)?, &decode_all(n)?);
        let size = |v: &[FirewallRule]| v.iter().map(|r| r.encoded_len() + 2).sum::<usize>();
        let whole: usize = b[RULES].iter().map(|f| f.value.len() + 2).sum();
        // A rule that left but is still among those left alone (a repeated rule): whole.
        let repeated = removed.iter().any(|r| {
            let bytes = r.encode_to_vec();
            b[RULES].iter().any(|f| f.value == bytes.as_slice())
        });
        if !repeated && size(&added) + size(&removed) < whole {
            d.added_rules = added;
            d.removed_rules = removed;
        } else {
            d.replaced.push("firewall_rules".into());
            b[RULES]
                .iter()
                .for_each(|f| sections.extend_from_slice(f.raw));
        }
    }
    if !same_fields(&a[DNS], &b[DNS]) {
        // Present in both (once, as management encodes it), same domain and nameservers: records
        // by name; else the section whole.
        let by_record = match (a[DNS].as_slice(), b[DNS].as_slice()) {
            ([x], [y]) => {
                let (x, y) = (fields::<3>(x.value)?, fields::<3>(y.value)?);
                (same_fields(&x[0], &y[0]) && same_fields(&x[2], &y[2])).then_some((x, y))
            }
            _ => None,
        };
        match by_record {
            Some((x, y)) => {
                (d.upsert_records, d.removed_records) =
                    keyed_changes_encoded(&x[1], &y[1], |r: &DnsRecord| &r.name)?;
            }
            None => {
                d.replaced.push("dns".into());
                b[DNS]
                    .iter()
                    .for_each(|f| sections.extend_from_slice(f.raw));
            }
        }
    }
    if !same_fields(&a[PEERS], &b[PEERS]) {
        (d.upsert_peers, d.removed_peers) =
            keyed_changes_encoded(&a[PEERS], &b[PEERS], |p: &RemotePeer| &p.id)?;
    }
    if is_empty(&d) {
        return Ok(None);
    }
    d.sections = Some(NetworkMap::decode(sections.as_slice())?);
    Ok(Some(d))
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
            // The same change made from the encoded maps (serials not in the bytes).
            let bytes = |m: &NetworkMap| {
                NetworkMap {
                    serial: 0,
                    ..m.clone()
                }
                .encode_to_vec()
            };
            let encoded = delta_encoded(&bytes(&a), a.serial, &bytes(&b), b.serial)
                .expect("well-formed maps");
            assert_eq!(encoded.is_some(), delta(&a, &b).is_some(), "round {round}");
            if let Some(d) = &encoded {
                let got = apply(&a, d).expect("applies to its base");
                assert!(
                    same(&got, &b),
                    "round {round} (encoded):\n{got:?}\n!=\n{b:?}"
                );
                assert_eq!(got.serial, b.serial);
            }
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
    fn an_encoded_delta_copes_with_repeated_items_and_refuses_what_is_not_a_map() {
        let mut r = StdRng::seed_from_u64(2);
        let rule = |cidr: &str| pb::FirewallRule {
            peer_cidr: cidr.into(),
            ..Default::default()
        };
        let mut a = map(&mut r, 1);
        a.firewall_rules = vec![rule("a"), rule("b"), rule("a")];
        a.remote_peers = vec![peer(&mut r, 1), peer(&mut r, 2), peer(&mut r, 1)];
        a.remote_peers[2].name = "the same id again".into();
        let mut b = a.clone();
        b.serial = 2;
        b.firewall_rules.pop();
        b.remote_peers.pop();
        let d = delta_encoded(&a.encode_to_vec(), 1, &b.encode_to_vec(), 2)
            .expect("maps")
            .expect("a change");
        let got = apply(&a, &d).expect("applies");
        assert_eq!(got.firewall_rules, b.firewall_rules);
        assert!(got.remote_peers.iter().any(|p| p.id == "p1"), "{got:?}");
        for bad in [&[0xff_u8][..], &[0x0a, 0x05, 0x01], &[0x58, 0x01]] {
            assert!(
                delta_encoded(bad, 1, &b.encode_to_vec(), 2).is_err(),
                "{bad:?}"
            );
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
