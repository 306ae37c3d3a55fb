//! The network map: a pure function from a store snapshot to what one peer must know (its
//! config, the peers a policy or route connects it with, the firewall rules it enforces, the
//! routes it installs or serves, and relay endpoints with time-limited credentials).
//! [`NetIndex`] is built once per snapshot so computing many maps is cheap.

use crate::model::{Peer, PortRange, Protocol as ModelProtocol, PublicService};
use crate::store::Snapshot;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tern_proto::management as pb;
use tern_proto::PublicKey;

mod wire;

/// Relay endpoints and the shared secret credentials are derived from.
#[derive(Clone, Default)]
pub struct RelaySettings {
    /// e.g. `stun:relay.example.com:3478`
    pub stun_urls: Vec<String>,
    /// e.g. `turn:relay.example.com:3478?transport=udp`
    pub turn_urls: Vec<String>,
    /// e.g. `wss://relay.example.com/relay`
    pub tcp_relay_urls: Vec<String>,
    pub secret: Vec<u8>,
    /// STUN endpoints for `tern diagnose` only (the embedded relay's alternate port).
    pub stun_probe_urls: Vec<String>,
}

impl RelaySettings {
    /// These settings with the URLs of every live replica's relays (oldest replica first,
    /// duplicates dropped), so that all agents, whichever replica they use, list the same relays
    /// in the same order and meet on the same TCP relay. Without replica relays: unchanged.
    pub fn with_replicas(
        &self,
        replicas: &[crate::store::RelayUrls],
    ) -> std::borrow::Cow<'_, Self> {
        if replicas.is_empty() {
            return std::borrow::Cow::Borrowed(self);
        }
        fn merge<'a>(lists: impl Iterator<Item = &'a Vec<String>>) -> Vec<String> {
            let mut out: Vec<String> = vec![];
            for u in lists.flatten() {
                if !out.contains(u) {
                    out.push(u.clone());
                }
            }
            out
        }
        std::borrow::Cow::Owned(RelaySettings {
            stun_urls: merge(replicas.iter().map(|r| &r.stun)),
            turn_urls: merge(replicas.iter().map(|r| &r.turn)),
            tcp_relay_urls: merge(replicas.iter().map(|r| &r.tcp_relay)),
            stun_probe_urls: merge(replicas.iter().map(|r| &r.stun_probe)),
            secret: self.secret.clone(),
        })
    }

    /// The URLs this replica hands out (registered for its siblings' maps).
    pub fn urls(&self) -> crate::store::RelayUrls {
        crate::store::RelayUrls {
            stun: self.stun_urls.clone(),
            turn: self.turn_urls.clone(),
            tcp_relay: self.tcp_relay_urls.clone(),
            stun_probe: self.stun_probe_urls.clone(),
        }
    }
}

impl std::fmt::Debug for RelaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySettings")
            .field("stun_urls", &self.stun_urls)
            .field("turn_urls", &self.turn_urls)
            .field("tcp_relay_urls", &self.tcp_relay_urls)
            .field("stun_probe_urls", &self.stun_probe_urls)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Lookup tables over one snapshot.
pub struct NetIndex {
    snap: Arc<Snapshot>,
    by_id: HashMap<String, usize>,
    members: HashMap<String, Vec<usize>>,
    /// Parsed port ranges per policy id (invalid entries were refused on input; skipped here).
    ports: HashMap<String, Vec<PortRange>>,
    /// Per enabled public service: the peers that can carry its clients to the target, best
    /// first, or why none can.
    carriers: HashMap<String, Result<Vec<usize>, String>>,
    /// The earliest login expiry after the index was built (Unix ms): the maps change then.
    next_expiry: Option<crate::model::Millis>,
    /// Each peer's DNS label (by index).
    labels: Vec<String>,
    /// Each peer's overlay address as a host prefix and its WireGuard key as bytes (by index):
    /// computed once per index rather than once per map that lists the peer.
    cidrs: Vec<String>,
    keys: Vec<Vec<u8>>,
    /// Each peer's place among all peers ordered by host prefix (as strings), and by DNS label:
    /// maps sort rules and names by these numbers instead of comparing strings.
    cidr_rank: Vec<u32>,
    label_rank: Vec<u32>,
    /// When the index was built (Unix ms): logins expired by then are off the network.
    built_at: crate::model::Millis,
    /// What changed since the index built before this one, when that is known to be little.
    since: Option<Since>,
    /// Parts of maps encoded once (see `map_bytes_for`).
    wire: wire::Encoded,
}

/// Peers whose maps may differ from the maps of the index with serial `from` (the one built just
/// before), when nothing but peers' live state (online, last seen, agent details), new peers and
/// policies changed: the changed or new peers and every peer that sees one of them (seeing is
/// mutual: a policy or route that puts q in p's map puts p in q's), and the peers in a changed
/// policy's groups. Streams of other peers need not compute their map again.
#[derive(Debug, Clone)]
pub struct Since {
    pub from: i64,
    pub affected: std::collections::HashSet<String>,
}

/// More changed peers than this in one index: every stream computes its map (a fleet
/// reconnecting touches most maps anyway).
const MAX_LOCAL_CHANGES: usize = 64;

impl NetIndex {
    pub fn new(snap: Arc<Snapshot>) -> Self {
        Self::at(snap, crate::model::now_millis())
    }

    /// The index as of `now` (Unix ms): peers whose login has expired by then are off the
    /// network (their own stream closes at expiry, which rebuilds everyone's maps).
    pub fn at(snap: Arc<Snapshot>, now: crate::model::Millis) -> Self {
        let mut by_id = HashMap::with_capacity(snap.peers.len());
        let mut members: HashMap<String, Vec<usize>> = HashMap::new();
        let expiry = snap.settings.peer_login_expiry_secs;
        let mut next_expiry: Option<crate::model::Millis> = None;
        for (i, p) in snap.peers.iter().enumerate() {
            by_id.insert(p.id.clone(), i);
            // A peer awaiting approval, whose owner is disabled, or whose login expired is in
            // no group: no policy or route reaches it.
            let expires =
                (p.login_expiration_enabled && expiry > 0).then(|| p.last_login + expiry * 1000);
            let expired = expires.is_some_and(|at| at <= now);
            if !p.on_network() || expired {
                continue;
            }
            if let Some(at) = expires {
                next_expiry = Some(next_expiry.map_or(at, |n| n.min(at)));
            }
            for g in &p.groups {
                members.entry(g.clone()).or_default().push(i);
            }
        }
        let ports = snap
            .policies
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    p.ports.iter().filter_map(|s| s.parse().ok()).collect(),
                )
            })
            .collect();
        let labels = crate::model::dns_labels(&snap.peers);
        let cidrs: Vec<String> = snap
            .peers
            .iter()
            .map(|p| host_cidr(&p.overlay_ip))
            .collect();
        let keys = snap
            .peers
            .iter()
            .map(|p| key_bytes(&p.wg_public_key))
            .collect();
        let cidr_rank = ranks(&cidrs);
        let n_peers = snap.peers.len();
        let label_rank = ranks(&labels);
        let mut idx = NetIndex {
            snap,
            by_id,
            members,
            ports,
            carriers: HashMap::new(),
            next_expiry,
            labels,
            cidrs,
            keys,
            cidr_rank,
            label_rank,
            built_at: now,
            since: None,
            wire: wire::Encoded::new(n_peers),
        };
        idx.carriers = idx
            .snap
            .services
            .iter()
            .filter(|s| s.enabled)
            .map(|s| (s.id.clone(), idx.find_carriers(s)))
            .collect();
        idx
    }

    /// The peers that reach a service's target, best first: its owner (`tern expose`), the peer
    /// with that overlay address, or the routing peers of the most specific enabled route that
    /// contains it (by metric, then name: the HA order clients use).
    fn find_carriers(&self, s: &PublicService) -> Result<Vec<usize>, String> {
        let peers = &self.snap.peers;
        let usable = |i: usize| -> Result<Vec<usize>, String> {
            let p = &peers[i];
            if p.owner_disabled {
                Err(format!("peer {}'s owner is disabled", p.name))
            } else if self.expired(p) {
                Err(format!("peer {}'s login expired", p.name))
            } else if p.approved {
                Ok(vec![i])
            } else {
                Err(format!("peer {} awaits an admin's approval", p.name))
            }
        };
        if let Some(owner) = &s.owner_peer {
            let i = self
                .by_id
                .get(owner.as_str())
                .copied()
                .ok_or_else(|| "the publishing peer was deleted".to_string())?;
            return usable(i);
        }
        if self.snap.settings.overlay_range.contains(&s.target_ip) {
            let ip = s.target_ip.to_string();
            let i = peers
                .iter()
                .position(|p| p.overlay_ip == ip)
                .ok_or_else(|| format!("no peer has the overlay address {ip}"))?;
            return usable(i);
        }
        let best = self
            .snap
            .routes
            .iter()
            .filter(|r| r.enabled && r.network.contains(&s.target_ip))
            .map(|r| r.network.prefix_len())
            .max()
            .ok_or_else(|| format!("no enabled route contains {}", s.target_ip))?;
        let mut routers: Vec<(i64, &str, usize)> = vec![];
        for r in self
            .snap
            .routes
            .iter()
            .filter(|r| r.enabled && r.network.contains(&s.target_ip))
            .filter(|r| r.network.prefix_len() == best)
        {
            for i in self.routers(r) {
                if !routers.iter().any(|x| x.2 == i) {
                    routers.push((r.metric, peers[i].name.as_str(), i));
                }
            }
        }
        if routers.is_empty() {
            return Err(format!(
                "the route containing {} has no approved routing peer",
                s.target_ip
            ));
        }
        routers.sort();
        Ok(routers.into_iter().map(|(_, _, i)| i).collect())
    }

    /// Ids of the peers that carry `service_id`'s clients, best first (Err: why none can).
    pub fn service_carriers(&self, service_id: &str) -> Result<Vec<&Peer>, String> {
        match self.carriers.get(service_id) {
            None => Err("the service is disabled or was deleted".into()),
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(v)) => Ok(v.iter().map(|&i| &self.snap.peers[i]).collect()),
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// See [`Since`]; None when any map may have changed.
    pub fn since(&self) -> Option<&Since> {
        self.since.as_ref()
    }

    /// This index, knowing what changed since `prev` (the index built before it).
    pub fn with_changes_since(mut self, prev: &NetIndex) -> Self {
        self.since = self.changes_since(prev);
        self
    }

    fn changes_since(&self, prev: &NetIndex) -> Option<Since> {
        let (a, b) = (&prev.snap, &self.snap);
        // A login that expired in between takes a peer off the network.
        if prev.next_expiry.is_some_and(|at| at <= self.built_at) {
            return None;
        }
        let mut settings = a.settings.clone();
        settings.network_serial = b.settings.network_serial;
        if settings != b.settings
            || a.routes != b.routes
            || a.services != b.services
            || a.nameservers != b.nameservers
            || a.relays != b.relays
            || a.peers.len() > b.peers.len()
        {
            return None;
        }
        // Policies edited, added, removed, switched on or off: a map depends on a policy only
        // when its peer is in the policy's sources or destinations, so the peers in those groups
        // (old and new) are affected and no one else. Unless a route follows policies (it is
        // not open to its distribution groups): then policies also decide what the route's
        // clients reach and what its routers let in.
        let mut policies_changed: Vec<(&NetIndex, &crate::model::Policy)> = vec![];
        if a.policies != b.policies {
            if b.routes
                .iter()
                .any(|r| !r.access_groups.is_empty() || !r.open_to_groups)
            {
                return None;
            }
            let old: HashMap<&str, _> = a.policies.iter().map(|p| (p.id.as_str(), p)).collect();
            let new: HashMap<&str, _> = b.policies.iter().map(|p| (p.id.as_str(), p)).collect();
            policies_changed.extend(
                a.policies
                    .iter()
                    .filter(|p| new.get(p.id.as_str()) != Some(p))
                    .map(|p| (prev, p)),
            );
            policies_changed.extend(
                b.policies
                    .iter()
                    .filter(|p| old.get(p.id.as_str()) != Some(p))
                    .map(|p| (self, p)),
            );
        }
        let expiry_on = b.settings.peer_login_expiry_secs > 0;
        let newest = a.peers.iter().map(|p| p.created_at).max().unwrap_or(0);
        let mut changed: Vec<&str> = vec![];
        for q in &b.peers {
            let Some(&i) = prev.by_id.get(q.id.as_str()) else {
                // A new peer: it and whoever sees it. Only the newest (DNS labels are given in
                // order of creation: an older newcomer could change another peer's label).
                if q.created_at <= newest {
                    return None;
                }
                changed.push(&q.id);
                continue;
            };
            let p = &a.peers[i];
            if p == q {
                continue;
            }
            // Only live state may differ.
            let mut live = p.clone();
            live.connected = q.connected;
            live.last_seen = q.last_seen;
            live.hostname.clone_from(&q.hostname);
            live.os.clone_from(&q.os);
            live.agent_version.clone_from(&q.agent_version);
            live.connections.clone_from(&q.connections);
            live.endpoint.clone_from(&q.endpoint);
            live.wireguard.clone_from(&q.wireguard);
            if !(expiry_on && q.login_expiration_enabled) {
                live.last_login = q.last_login;
            }
            if live != *q {
                return None;
            }
            changed.push(&q.id);
            if changed.len() > MAX_LOCAL_CHANGES {
                return None;
            }
        }
        // Every old peer must still be there: a peer removed may free a DNS label another peer
        // then takes, so any map may change.
        let kept = b
            .peers
            .iter()
            .filter(|q| prev.by_id.contains_key(q.id.as_str()))
            .count();
        if kept != a.peers.len() || changed.len() > MAX_LOCAL_CHANGES {
            return None;
        }
        let mut affected = std::collections::HashSet::new();
        for (idx, pol) in policies_changed {
            let members = idx
                .members_of(&pol.sources)
                .chain(idx.members_of(&pol.destinations));
            affected.extend(members.map(|i| idx.snap.peers[i].id.clone()));
        }
        let none = RelaySettings::default();
        for id in changed {
            affected.insert(id.to_string());
            for idx in [prev, self] {
                if let Some(m) = idx.map_for(id, &none, 0) {
                    affected.extend(m.remote_peers.into_iter().map(|r| r.id));
                }
            }
        }
        Some(Since {
            from: a.settings.network_serial,
            affected,
        })
    }

    /// Why `peer_id` may not be on the network at all right now (its owner is disabled).
    pub fn refused(&self, peer_id: &str) -> Option<String> {
        let p = &self.snap.peers[*self.by_id.get(peer_id)?];
        p.owner_disabled
            .then(|| crate::store::disabled_owner_message(p))
    }

    /// Whether `peer_id` is in this index.
    pub fn contains(&self, peer_id: &str) -> bool {
        self.by_id.contains_key(peer_id)
    }

    /// When the next login on the network expires (Unix ms), if any does.
    pub fn next_expiry(&self) -> Option<crate::model::Millis> {
        self.next_expiry
    }

    /// Peers on the network in this index whose login has expired by `now`: (id, name).
    pub fn expired_by(&self, now: crate::model::Millis) -> Vec<(String, String)> {
        self.members
            .get(crate::model::ALL_GROUP_ID)
            .into_iter()
            .flatten()
            .map(|&i| &self.snap.peers[i])
            .filter(|p| self.login_expires_at(&p.id).is_some_and(|at| at <= now))
            .map(|p| (p.id.clone(), p.name.clone()))
            .collect()
    }

    /// True if a user's sign-in added `peer_id` (rather than a setup key).
    pub fn is_user_device(&self, peer_id: &str) -> bool {
        self.by_id
            .get(peer_id)
            .is_some_and(|&i| self.snap.peers[i].user_id.is_some())
    }

    /// When `peer_id`'s login expires (Unix ms), if login expiry applies to it.
    pub fn login_expires_at(&self, peer_id: &str) -> Option<crate::model::Millis> {
        let p = &self.snap.peers[*self.by_id.get(peer_id)?];
        let secs = self.snap.settings.peer_login_expiry_secs;
        (p.login_expiration_enabled && secs > 0).then(|| p.last_login + secs * 1000)
    }

    /// A policy's port ranges (parsed when the index was built).
    fn ports_of(&self, pol: &crate::model::Policy) -> &[PortRange] {
        self.ports.get(pol.id.as_str()).map_or(&[], Vec::as_slice)
    }

    fn in_any(&self, peer: &Peer, groups: &[String]) -> bool {
        peer.groups.iter().any(|g| groups.contains(g))
    }

    fn members_of<'s>(&'s self, groups: &'s [String]) -> impl Iterator<Item = usize> + 's {
        groups
            .iter()
            .flat_map(|g| self.members.get(g.as_str()).into_iter().flatten().copied())
    }

    /// Whether `p`'s login had expired when this index was built.
    fn expired(&self, p: &Peer) -> bool {
        let expiry = self.snap.settings.peer_login_expiry_secs;
        p.login_expiration_enabled && expiry > 0 && p.last_login + expiry * 1000 <= self.built_at
    }

    /// Routing peers of a route (by index).
    fn routers(&self, r: &crate::model::Route) -> Vec<usize> {
        match (&r.routing_peer, &r.routing_group) {
            (Some(p), _) => self
                .by_id
                .get(p.as_str())
                .copied()
                .filter(|&i| self.snap.peers[i].on_network() && !self.expired(&self.snap.peers[i]))
                .into_iter()
                .collect(),
            (None, Some(g)) => self.members.get(g.as_str()).cloned().unwrap_or_default(),
            (None, None) => vec![],
        }
    }

    /// The policy destinations that open route `r`'s network: None when the route is open to
    /// every peer it is distributed to (`open_to_groups`); else its access groups, or without
    /// them the groups of its routing peers, so that a policy towards the routing peer also
    /// says what its LAN may be reached on (as subnet routes follow the ACLs in Tailscale).
    fn route_gates<'s>(
        &'s self,
        r: &'s crate::model::Route,
        routers: &[usize],
    ) -> Option<Vec<&'s str>> {
        if !r.access_groups.is_empty() {
            return Some(r.access_groups.iter().map(String::as_str).collect());
        }
        if r.open_to_groups {
            return None;
        }
        let mut g: Vec<&str> = r.routing_group.iter().map(String::as_str).collect();
        for &i in routers {
            g.extend(self.snap.peers[i].groups.iter().map(String::as_str));
        }
        g.sort_unstable();
        g.dedup();
        Some(g)
    }

    /// What `me` may reach in route `r`'s network, in words: "all" when the route is open to its
    /// distribution groups; else what the enabled policies from `me` towards its gates (see
    /// [`Self::route_gates`]) allow, or "none".
    fn route_access(&self, me: &Peer, r: &crate::model::Route, routers: &[usize]) -> String {
        let Some(gates) = self.route_gates(r, routers) else {
            return "all".into();
        };
        let mut parts: BTreeSet<String> = BTreeSet::new();
        for pol in self.snap.policies.iter().filter(|p| p.enabled) {
            if !pol.destinations.iter().any(|g| gates.contains(&g.as_str()))
                || !self.in_any(me, &pol.sources)
            {
                continue;
            }
            let ports = self.ports_of(pol);
            let proto = match pol.protocol {
                ModelProtocol::Any => return "all".into(),
                ModelProtocol::Tcp => "tcp",
                ModelProtocol::Udp => "udp",
                ModelProtocol::Icmp => "icmp",
            };
            let ranges: Vec<(u32, u32)> = ports
                .iter()
                .map(|p| (u32::from(p.start), u32::from(p.end)))
                .collect();
            parts.insert(tern_proto::access_words(proto, &ranges));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.into_iter().collect::<Vec<_>>().join("; ")
        }
    }

    /// What `peer_id`'s map holds, by index into this snapshot (both renderings of a map,
    /// `map_for` and `map_bytes_for`, start here), or None if the peer is not in the snapshot.
    fn plan<'s>(&'s self, peer_id: &str) -> Option<Plan<'s>> {
        let me_idx = *self.by_id.get(peer_id)?;
        let me = &self.snap.peers[me_idx];
        // Collected, then sorted and deduplicated once.
        let mut visible: Vec<usize> = Vec::new();
        // Collected, then sorted and deduplicated once (cheaper than a set kept ordered).
        let mut rules: Vec<RuleKey<'s>> = Vec::new();

        // A peer awaiting approval sees no one (and gets no relay credentials).
        let policies = self
            .snap
            .policies
            .iter()
            .filter(|p| p.enabled && me.on_network());
        for pol in policies {
            let ports = self.ports_of(pol);
            let in_src = self.in_any(me, &pol.sources);
            let in_dst = self.in_any(me, &pol.destinations);
            let mut add = |others: &[String], dir: pb::Direction, rules: &mut Vec<RuleKey<'s>>| {
                for q in self.members_of(others) {
                    if q == me_idx {
                        continue;
                    }
                    visible.push(q);
                    rules.push(RuleKey {
                        cidr: self.cidr_rank[q],
                        direction: dir as i32,
                        protocol: proto(pol.protocol) as i32,
                        ports,
                        policy_id: KeyText(Cow::Borrowed(&pol.id)),
                        network: KeyText(Cow::Borrowed("")),
                        peer: q,
                    });
                }
            };
            if in_dst {
                add(&pol.sources, pb::Direction::In, &mut rules);
            }
            if in_src {
                add(&pol.destinations, pb::Direction::Out, &mut rules);
            }
            if pol.bidirectional {
                if in_src {
                    add(&pol.destinations, pb::Direction::In, &mut rules);
                }
                if in_dst {
                    add(&pol.sources, pb::Direction::Out, &mut rules);
                }
            }
        }

        let mut routes = vec![];
        let mut served = vec![];
        for r in self
            .snap
            .routes
            .iter()
            .filter(|r| r.enabled && me.on_network())
        {
            let routers = self.routers(r);
            let open_to_groups = r.open_to_groups && r.access_groups.is_empty();
            let route_msg = |ri: usize, access: String| {
                let rp = &self.snap.peers[ri];
                pb::Route {
                    open_to_groups,
                    access,
                    id: r.id.clone(),
                    network: r.network.to_string(),
                    routing_peer_key: self.keys[ri].clone(),
                    routing_peer_id: rp.id.clone(),
                    metric: r.metric,
                    masquerade: r.masquerade,
                    description: r.description.clone(),
                }
            };
            if routers.contains(&me_idx) {
                served.push(route_msg(me_idx, String::new()));
                // Clients of the route must be able to reach us. A route open to its
                // distribution groups lets every client use the whole network; otherwise only
                // what policies towards its gates allow (and only for clients the route is
                // distributed to).
                let gates = self.route_gates(r, &routers);
                for q in self.members_of(&r.groups) {
                    if routers.contains(&q) {
                        continue;
                    }
                    visible.push(q);
                    let cidr = self.cidr_rank[q];
                    let Some(gates) = &gates else {
                        rules.push(RuleKey {
                            cidr,
                            direction: pb::Direction::In as i32,
                            protocol: pb::Protocol::Any as i32,
                            ports: &[],
                            policy_id: KeyText(Cow::Owned(format!("route:{}", r.id))),
                            network: KeyText(Cow::Owned(r.network.to_string())),
                            peer: q,
                        });
                        continue;
                    };
                    let client = &self.snap.peers[q];
                    for pol in self.snap.policies.iter().filter(|p| p.enabled) {
                        let opens = pol.destinations.iter().any(|g| gates.contains(&g.as_str()));
                        if opens && self.in_any(client, &pol.sources) {
                            rules.push(RuleKey {
                                cidr,
                                direction: pb::Direction::In as i32,
                                protocol: proto(pol.protocol) as i32,
                                ports: self.ports_of(pol),
                                policy_id: KeyText(Cow::Borrowed(&pol.id)),
                                network: KeyText(Cow::Owned(r.network.to_string())),
                                peer: q,
                            });
                        }
                    }
                }
            } else if self.in_any(me, &r.groups) {
                let access = self.route_access(me, r, &routers);
                for ri in routers {
                    visible.push(ri);
                    routes.push(route_msg(ri, access.clone()));
                }
            }
        }
        routes.sort_by(|a, b| {
            (&a.network, a.metric, &a.routing_peer_id).cmp(&(
                &b.network,
                b.metric,
                &b.routing_peer_id,
            ))
        });
        served.sort_by(|a, b| a.network.cmp(&b.network));

        visible.sort_unstable();
        visible.dedup();
        rules.sort_unstable();
        rules.dedup();
        Some(Plan {
            me: me_idx,
            visible,
            rules,
            routes,
            served,
        })
    }

    /// The map for `peer_id`, or None if the peer is not in the snapshot.
    pub fn map_for(
        &self,
        peer_id: &str,
        relay: &RelaySettings,
        creds_expire_unix: i64,
    ) -> Option<pb::NetworkMap> {
        let plan = self.plan(peer_id)?;
        let me = &self.snap.peers[plan.me];
        let settings = &self.snap.settings;
        Some(pb::NetworkMap {
            dns: Some(self.dns_for(plan.me, &plan.visible)),
            serial: settings.network_serial.max(0) as u64,
            served_services: self.served_services(plan.me).collect(),
            peer_config: Some(peer_config(me, settings)),
            remote_peers: plan.visible.iter().map(|&i| self.remote_peer(i)).collect(),
            firewall_rules: plan.rules.iter().map(|k| self.rule(k)).collect(),
            routes: plan.routes,
            served_routes: plan.served,
            relay: self.relay_for(plan.me, relay, creds_expire_unix),
            pending_approval: !me.approved,
        })
    }

    /// How peer `i` appears in the maps of the peers that see it.
    fn remote_peer(&self, i: usize) -> pb::RemotePeer {
        let p = &self.snap.peers[i];
        pb::RemotePeer {
            id: p.id.clone(),
            name: p.name.clone(),
            wg_public_key: self.keys[i].clone(),
            allowed_ips: vec![self.cidrs[i].clone()],
            overlay_ip: p.overlay_ip.clone(),
            connected: p.connected,
            hosted: p.wireguard.is_some(),
        }
    }

    fn rule(&self, k: &RuleKey<'_>) -> pb::FirewallRule {
        pb::FirewallRule {
            peer_cidr: self.cidrs[k.peer].clone(),
            direction: k.direction,
            protocol: k.protocol,
            ports: k
                .ports
                .iter()
                .map(|p| pb::PortRange {
                    start: p.start as u32,
                    end: p.end as u32,
                })
                .collect(),
            policy_id: k.policy_id.as_str().to_string(),
            network: k.network.as_str().to_string(),
        }
    }

    /// The public services whose clients peer `me` carries to their target.
    fn served_services(&self, me: usize) -> impl Iterator<Item = pb::ServedService> + '_ {
        self.snap
            .services
            .iter()
            .filter(
                move |s| matches!(self.carriers.get(s.id.as_str()), Some(Ok(c)) if c.contains(&me)),
            )
            .map(|s| pb::ServedService {
                id: s.id.clone(),
                name: s.name.clone(),
                protocol: s.protocol.as_str().to_string(),
                target: std::net::SocketAddr::new(s.target_ip, s.target_port).to_string(),
                proxy_protocol: s.proxy_protocol,
                idle_timeout_secs: s.idle_timeout_secs,
                public_port: s.public_port as u32,
                ephemeral: s.ephemeral,
            })
    }

    /// Relay servers and credentials, for a peer on the network.
    fn relay_for(&self, me: usize, relay: &RelaySettings, expire: i64) -> Option<pb::RelayConfig> {
        let me = &self.snap.peers[me];
        me.on_network()
            .then(|| relay_config(&me.id, &relay.with_replicas(&self.snap.relays), expire))
    }
}

/// What one peer's map holds, by index into the snapshot (see `NetIndex::plan`).
struct Plan<'a> {
    me: usize,
    /// The remote peers, in index order (the snapshot lists peers by name).
    visible: Vec<usize>,
    /// Sorted and without repeats.
    rules: Vec<RuleKey<'a>>,
    routes: Vec<pb::Route>,
    served: Vec<pb::Route>,
}

pub fn peer_config(me: &Peer, settings: &crate::model::Settings) -> pb::PeerConfig {
    pb::PeerConfig {
        address: format!("{}/{}", me.overlay_ip, settings.overlay_range.prefix_len()),
        mtu: settings.mtu,
        name: me.name.clone(),
        overlay_range: settings.overlay_range.to_string(),
    }
}

impl NetIndex {
    /// Names for `me`: itself and the peers it sees, and the nameserver groups it is in.
    fn dns_for(&self, me: usize, visible: &[usize]) -> pb::DnsConfig {
        pb::DnsConfig {
            domain: self.snap.settings.dns_domain.clone(),
            records: self
                .dns_order(me, visible)
                .into_iter()
                .map(|i| self.dns_record(i))
                .collect(),
            nameservers: self.nameservers_for(me).collect(),
        }
    }

    /// Whose names `me` is told, by name (label ranks keep the names' order), one per name.
    fn dns_order(&self, me: usize, visible: &[usize]) -> Vec<usize> {
        let mut order: Vec<usize> = std::iter::once(me).chain(visible.iter().copied()).collect();
        order.sort_by_key(|&i| self.label_rank[i]);
        order.dedup_by_key(|i| self.label_rank[*i]);
        order
    }

    fn dns_record(&self, i: usize) -> pb::DnsRecord {
        pb::DnsRecord {
            name: self.labels[i].clone(),
            ip: self.snap.peers[i].overlay_ip.clone(),
        }
    }

    fn nameservers_for(&self, me: usize) -> impl Iterator<Item = pb::NameserverGroup> + '_ {
        let p = &self.snap.peers[me];
        self.snap
            .nameservers
            .iter()
            .filter(move |n| n.enabled && p.on_network() && self.in_any(p, &n.groups))
            .map(|n| pb::NameserverGroup {
                name: n.name.clone(),
                domains: n.domains.clone(),
                servers: n.nameservers.clone(),
            })
    }
}

/// Relay section with fresh credentials for `peer_id` expiring at `expire_unix`.
pub fn relay_config(peer_id: &str, relay: &RelaySettings, expire_unix: i64) -> pb::RelayConfig {
    let creds = tern_proto::relay_auth::issue(&relay.secret, peer_id, expire_unix);
    pb::RelayConfig {
        stun: relay
            .stun_urls
            .iter()
            .map(|u| pb::StunServer { url: u.clone() })
            .collect(),
        turn: relay
            .turn_urls
            .iter()
            .map(|u| pb::TurnServer {
                url: u.clone(),
                username: creds.username.clone(),
                password: creds.password.clone(),
            })
            .collect(),
        tcp_relay: relay
            .tcp_relay_urls
            .iter()
            .map(|u| pb::TcpRelay {
                url: u.clone(),
                token: format!("{}:{}", creds.username, creds.password),
            })
            .collect(),
        credentials_expire_unix: expire_unix,
        stun_probe_urls: relay.stun_probe_urls.clone(),
    }
}

/// A rule while a map is made, borrowing from the index; ordered as the rules are sent (by
/// host prefix as a string, then the other fields), which deltas rely on to compare in one pass.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct RuleKey<'a> {
    /// The rule's peer's `cidr_rank`: the same order as its host prefix.
    cidr: u32,
    direction: i32,
    protocol: i32,
    ports: &'a [PortRange],
    policy_id: KeyText<'a>,
    network: KeyText<'a>,
    /// The peer itself (one per rank: overlay addresses are unique).
    peer: usize,
}

/// Text in a rule key, compared by content but equal at once when both borrow the same string:
/// a map holds hundreds of rules of one policy, and sorting and deduplicating them compared the
/// policy's id byte by byte each time.
struct KeyText<'a>(Cow<'a, str>);

impl KeyText<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for KeyText<'_> {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.as_str(), other.as_str());
        std::ptr::eq(a, b) || a == b
    }
}

impl Eq for KeyText<'_> {}

impl PartialOrd for KeyText<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyText<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.as_str(), other.as_str());
        if std::ptr::eq(a, b) {
            std::cmp::Ordering::Equal
        } else {
            a.cmp(b)
        }
    }
}

/// Each item's place in the sorted order of all items (equal items share a place).
fn ranks(items: &[String]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_unstable_by(|&a, &b| items[a].cmp(&items[b]));
    let mut out = vec![0u32; items.len()];
    let mut rank = 0u32;
    for (n, &i) in order.iter().enumerate() {
        if n > 0 && items[order[n - 1]] != items[i] {
            rank += 1;
        }
        out[i] = rank;
    }
    out
}

fn proto(p: ModelProtocol) -> pb::Protocol {
    match p {
        ModelProtocol::Any => pb::Protocol::Any,
        ModelProtocol::Tcp => pb::Protocol::Tcp,
        ModelProtocol::Udp => pb::Protocol::Udp,
        ModelProtocol::Icmp => pb::Protocol::Icmp,
    }
}

fn host_cidr(ip: &str) -> String {
    if ip.contains(':') {
        format!("{ip}/128")
    } else {
        format!("{ip}/32")
    }
}

fn key_bytes(b64: &str) -> Vec<u8> {
    b64.parse::<PublicKey>()
        .map(|k| k.0.to_vec())
        .unwrap_or_default()
}

/// Compares two maps ignoring the serial, field by field without copying either (streams compare
/// encoded maps instead; the benchmark and tests use this).
pub fn same_content(a: &pb::NetworkMap, b: &pb::NetworkMap) -> bool {
    // Destructured so that a field added to the message must be added here too.
    let pb::NetworkMap {
        serial: _,
        peer_config,
        remote_peers,
        firewall_rules,
        routes,
        served_routes,
        relay,
        pending_approval,
        served_services,
        dns,
    } = a;
    *pending_approval == b.pending_approval
        && *peer_config == b.peer_config
        && *remote_peers == b.remote_peers
        && *firewall_rules == b.firewall_rules
        && *routes == b.routes
        && *served_routes == b.served_routes
        && *relay == b.relay
        && *served_services == b.served_services
        && *dns == b.dns
}

/// Counts per remote peer, for diagnostics and benchmarks.
pub fn summary(m: &pb::NetworkMap) -> BTreeMap<&'static str, usize> {
    BTreeMap::from([
        ("remote_peers", m.remote_peers.len()),
        ("firewall_rules", m.firewall_rules.len()),
        ("routes", m.routes.len()),
        ("served_routes", m.served_routes.len()),
        ("served_services", m.served_services.len()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use prost::Message;

    fn peer(id: &str, ip: &str, groups: &[&str]) -> Peer {
        Peer::fixture(id, ip, groups)
    }

    fn policy(
        id: &str,
        src: &[&str],
        dst: &[&str],
        proto: Protocol,
        ports: &[&str],
        bidi: bool,
    ) -> Policy {
        Policy {
            id: id.into(),
            name: id.into(),
            description: String::new(),
            enabled: true,
            protocol: proto,
            ports: ports.iter().map(|s| s.to_string()).collect(),
            bidirectional: bidi,
            sources: src.iter().map(|s| s.to_string()).collect(),
            destinations: dst.iter().map(|s| s.to_string()).collect(),
            created_at: 0,
        }
    }

    fn snap(peers: Vec<Peer>, policies: Vec<Policy>, routes: Vec<Route>) -> Snapshot {
        Snapshot {
            settings: Settings {
                overlay_range: "100.64.0.0/10".parse().expect("cidr"),
                mtu: 1280,
                peer_login_expiry_secs: 0,
                ephemeral_ttl_secs: 600,
                peer_approval_required: false,
                expose_groups: vec![],
                sign_in_groups: vec![],
                dns_domain: "tern.internal".into(),
                network_serial: 7,
            },
            peers,
            policies,
            routes,
            services: vec![],
            nameservers: vec![],
            relays: vec![],
        }
    }

    /// Every peer's map written as bytes (`map_bytes_for`) is its map encoded without serial.
    fn assert_bytes_match(idx: &NetIndex) {
        let mut buf = vec![];
        for p in &idx.snapshot().peers {
            let serial = idx.map_bytes_for(&p.id, &relay(), 77, &mut buf);
            let map = idx.map_for(&p.id, &relay(), 77).expect("a map");
            assert_eq!(serial, Some(map.serial));
            let want = pb::NetworkMap { serial: 0, ..map }.encode_to_vec();
            assert!(buf == want, "{}: bytes differ from the map encoded", p.id);
        }
        assert_eq!(idx.map_bytes_for("nobody", &relay(), 77, &mut buf), None);
    }

    fn relay() -> RelaySettings {
        RelaySettings {
            stun_urls: vec!["stun:r:3478".into()],
            turn_urls: vec!["turn:r:3478".into()],
            tcp_relay_urls: vec!["wss://r/relay".into()],
            secret: b"s".to_vec(),
            stun_probe_urls: vec![],
        }
    }

    fn names(m: &pb::NetworkMap) -> Vec<&str> {
        m.remote_peers.iter().map(|p| p.name.as_str()).collect()
    }

    /// For random changes of peers' live state, every peer outside `since().affected` gets the
    /// same map from the new index as from the old one (so its stream may skip computing it),
    /// and any other kind of change reports "any map may differ".
    #[test]
    fn streams_outside_the_affected_set_have_the_same_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let groups = ["g0", "g1", "g2", "g3"];
        for round in 0..200 {
            let n = rng.gen_range(2..30);
            let peers: Vec<Peer> = (0..n)
                .map(|i| {
                    let gs: Vec<&str> = groups
                        .iter()
                        .copied()
                        .filter(|_| rng.gen_bool(0.3))
                        .collect();
                    let mut p = peer(&format!("p{i}"), &format!("100.64.0.{}", i + 1), &gs);
                    p.connected = rng.gen_bool(0.5);
                    p.approved = rng.gen_bool(0.9);
                    p
                })
                .collect();
            let mut policies = vec![];
            for k in 0..rng.gen_range(0..4) {
                let g = |rng: &mut rand::rngs::StdRng| groups[rng.gen_range(0..groups.len())];
                let (src, dst) = (g(&mut rng), g(&mut rng));
                let bidi = rng.gen_bool(0.5);
                policies.push(policy(
                    &format!("pol{k}"),
                    &[src],
                    &[dst],
                    Protocol::Any,
                    &[],
                    bidi,
                ));
            }
            let mut routes = vec![];
            if rng.gen_bool(0.5) {
                let mut r = route_via("r1", "192.168.50.0/24", "p0", 100);
                r.groups = vec![groups[rng.gen_range(0..groups.len())].into()];
                if rng.gen_bool(0.5) {
                    r.routing_peer = None;
                    r.routing_group = Some(groups[rng.gen_range(0..groups.len())].into());
                }
                routes.push(r);
            }
            let old = snap(peers, policies, routes);
            let mut new = old.clone();
            new.settings.network_serial += 1;
            if rng.gen_bool(0.3) {
                let gs: Vec<&str> = groups
                    .iter()
                    .copied()
                    .filter(|_| rng.gen_bool(0.4))
                    .collect();
                // Named like an existing peer half the time (its DNS label gets a suffix).
                let name = if rng.gen_bool(0.5) {
                    "p0".to_string()
                } else {
                    "new".to_string()
                };
                let mut p = peer("new", &format!("100.64.1.{}", round % 250 + 1), &gs);
                p.name = name;
                p.created_at = new.peers.iter().map(|p| p.created_at).max().unwrap_or(0) + 1;
                new.peers.push(p);
            }
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..n);
                let p = &mut new.peers[i];
                match rng.gen_range(0..3) {
                    0 => p.connected = !p.connected,
                    1 => p.last_seen += 1000,
                    _ => p.agent_version = format!("0.{round}"),
                }
            }
            // Policy edits, often: a policy's ports, protocol, direction, groups, switch; a
            // policy added or removed.
            if rng.gen_bool(0.5) {
                let k = new.policies.len();
                let g = |rng: &mut rand::rngs::StdRng| groups[rng.gen_range(0..groups.len())];
                match rng.gen_range(0..6) {
                    0 if k > 0 => new.policies[rng.gen_range(0..k)].ports = vec!["22".into()],
                    1 if k > 0 => new.policies[rng.gen_range(0..k)].protocol = Protocol::Udp,
                    2 if k > 0 => {
                        let p = &mut new.policies[rng.gen_range(0..k)];
                        p.bidirectional = !p.bidirectional;
                    }
                    3 if k > 0 => {
                        let p = &mut new.policies[rng.gen_range(0..k)];
                        p.destinations = vec![g(&mut rng).into()];
                        p.enabled = rng.gen_bool(0.7);
                    }
                    4 if k > 0 => {
                        new.policies.remove(rng.gen_range(0..k));
                    }
                    _ => {
                        let (src, dst) = (g(&mut rng), g(&mut rng));
                        new.policies.push(policy(
                            "added",
                            &[src],
                            &[dst],
                            Protocol::Tcp,
                            &["80"],
                            false,
                        ));
                    }
                }
            }
            let (a, b) = (
                NetIndex::new(Arc::new(old.clone())),
                NetIndex::new(Arc::new(new.clone())),
            );
            let b = b.with_changes_since(&a);
            let since = b.since().expect("only live state and policies changed");
            assert_eq!(since.from, 7);
            assert_bytes_match(&b);
            for p in &new.peers {
                let mb = b.map_for(&p.id, &relay(), 9);
                // Rules go out in the order deltas compare in one pass.
                let rules = mb
                    .as_ref()
                    .map(|m| m.firewall_rules.as_slice())
                    .unwrap_or(&[]);
                assert!(tern_proto::mapdelta::in_rule_order(rules), "{rules:?}");
                if since.affected.contains(&p.id) {
                    continue;
                }
                let ma = a.map_for(&p.id, &relay(), 9);
                assert!(
                    same_content(&ma.expect("old map"), &mb.expect("new map")),
                    "round {round}: {} is outside {:?} but its map changed",
                    p.id,
                    since.affected
                );
            }
            // A policy edit with a route that has access groups: every map may differ.
            let mut gated = new.clone();
            let mut r2 = route_via("r2", "192.168.60.0/24", "p0", 100);
            r2.access_groups = vec!["g0".into()];
            gated.routes.push(r2);
            let mut gated_old = gated.clone();
            gated_old
                .policies
                .push(policy("x", &["g1"], &["g0"], Protocol::Any, &[], false));
            let c = NetIndex::new(Arc::new(gated))
                .with_changes_since(&NetIndex::new(Arc::new(gated_old)));
            assert_bytes_match(&c);
            assert!(
                c.since().is_none(),
                "policies decide what the route's clients reach"
            );
            // Anything else: every map may differ.
            let mut renamed = new.clone();
            renamed.peers[0].name = "renamed".into();
            let c = NetIndex::new(Arc::new(renamed)).with_changes_since(&a);
            assert!(c.since().is_none(), "a rename changes DNS names everywhere");
            let mut regrouped = new.clone();
            regrouped.peers[0].groups.push("g9".into());
            let c = NetIndex::new(Arc::new(regrouped)).with_changes_since(&a);
            assert!(c.since().is_none());
            let mut removed = new.clone();
            removed.peers.remove(0);
            let c = NetIndex::new(Arc::new(removed)).with_changes_since(&a);
            assert!(c.since().is_none(), "a removal may free a DNS label");
        }
    }

    #[test]
    fn every_replica_hands_out_all_live_relays_oldest_first() {
        let own = RelaySettings {
            stun_urls: vec!["stun:b:3478".into()],
            turn_urls: vec!["turn:b:3478".into()],
            tcp_relay_urls: vec!["wss://b/relay".into()],
            secret: b"s".to_vec(),
            stun_probe_urls: vec![],
        };
        // A single server (or a store without replica rows): its own settings.
        assert_eq!(own.with_replicas(&[]).tcp_relay_urls, own.tcp_relay_urls);
        let a = crate::store::RelayUrls {
            stun: vec!["stun:a:3478".into()],
            turn: vec!["turn:a:3478".into()],
            tcp_relay: vec!["wss://a/relay".into()],
            stun_probe: vec!["stun:a:3479".into()],
        };
        let merged = own.with_replicas(&[a.clone(), own.urls(), a]);
        assert_eq!(
            merged.tcp_relay_urls,
            vec!["wss://a/relay", "wss://b/relay"]
        );
        assert_eq!(merged.turn_urls, vec!["turn:a:3478", "turn:b:3478"]);
        assert_eq!(merged.stun_urls, vec!["stun:a:3478", "stun:b:3478"]);
        assert_eq!(merged.stun_probe_urls, vec!["stun:a:3479"]);
        assert_eq!(
            merged.secret, b"s",
            "credentials from this replica's secret"
        );
    }

    #[test]
    fn all_to_all_policy_connects_everyone_with_inbound_rules() {
        let s = snap(
            vec![
                peer("a", "100.64.0.1", &[]),
                peer("b", "100.64.0.2", &[]),
                peer("c", "100.64.0.3", &[]),
            ],
            vec![policy("p", &["all"], &["all"], Protocol::Any, &[], true)],
            vec![],
        );
        let idx = NetIndex::new(Arc::new(s));
        let m = idx.map_for("a", &relay(), 100).expect("map");
        assert_eq!(m.serial, 7);
        assert_eq!(names(&m), ["b", "c"]);
        let cfg = m.peer_config.expect("cfg");
        assert_eq!(cfg.address, "100.64.0.1/10");
        assert_eq!(cfg.mtu, 1280);
        let inbound: Vec<_> = m
            .firewall_rules
            .iter()
            .filter(|r| r.direction == pb::Direction::In as i32)
            .map(|r| r.peer_cidr.as_str())
            .collect();
        assert_eq!(inbound, ["100.64.0.2/32", "100.64.0.3/32"]);
        assert_eq!(m.remote_peers[0].allowed_ips, ["100.64.0.2/32"]);
    }

    #[test]
    fn a_peer_awaiting_approval_sees_no_one_and_is_seen_by_no_one() {
        let mut pending = peer("c", "100.64.0.3", &[]);
        pending.approved = false;
        let s = snap(
            vec![
                peer("a", "100.64.0.1", &[]),
                peer("b", "100.64.0.2", &[]),
                pending,
            ],
            vec![policy("p", &["all"], &["all"], Protocol::Any, &[], true)],
            vec![],
        );
        let idx = NetIndex::new(Arc::new(s));
        let a = idx.map_for("a", &relay(), 100).expect("map");
        assert_eq!(names(&a), ["b"]);
        assert!(!a.pending_approval);
        assert!(a.relay.is_some());
        let c = idx
            .map_for("c", &relay(), 100)
            .expect("map of the pending peer");
        assert!(c.pending_approval);
        assert!(c.remote_peers.is_empty() && c.firewall_rules.is_empty());
        assert!(c.relay.is_none(), "no relay credentials before approval");
        assert!(c.peer_config.is_some(), "it still learns its own address");
    }

    #[test]
    fn no_policy_means_no_visibility_and_disabled_policies_do_nothing() {
        let mut p = policy("p", &["all"], &["all"], Protocol::Any, &[], true);
        p.enabled = false;
        let s = snap(
            vec![peer("a", "100.64.0.1", &[]), peer("b", "100.64.0.2", &[])],
            vec![p],
            vec![],
        );
        let m = NetIndex::new(Arc::new(s))
            .map_for("a", &relay(), 100)
            .expect("map");
        assert!(m.remote_peers.is_empty());
        assert!(m.firewall_rules.is_empty());
    }

    #[test]
    fn one_way_tcp_policy_opens_only_the_destination_port_inbound() {
        let s = snap(
            vec![
                peer("laptop", "100.64.0.1", &["staff"]),
                peer("srv", "100.64.0.2", &["servers"]),
                peer("guest", "100.64.0.3", &[]),
            ],
            vec![policy(
                "ssh",
                &["staff"],
                &["servers"],
                Protocol::Tcp,
                &["22", "8000-8080"],
                false,
            )],
            vec![],
        );
        let idx = NetIndex::new(Arc::new(s));
        let srv = idx.map_for("srv", &relay(), 100).expect("map");
        assert_eq!(names(&srv), ["laptop"]);
        assert_eq!(srv.firewall_rules.len(), 1);
        let r = &srv.firewall_rules[0];
        assert_eq!(r.direction, pb::Direction::In as i32);
        assert_eq!(r.protocol, pb::Protocol::Tcp as i32);
        assert_eq!(r.peer_cidr, "100.64.0.1/32");
        assert_eq!(
            r.ports,
            [
                pb::PortRange { start: 22, end: 22 },
                pb::PortRange {
                    start: 8000,
                    end: 8080
                }
            ]
        );
        let laptop = idx.map_for("laptop", &relay(), 100).expect("map");
        assert_eq!(names(&laptop), ["srv"]);
        assert!(
            laptop
                .firewall_rules
                .iter()
                .all(|r| r.direction == pb::Direction::Out as i32),
            "laptop accepts no new inbound flow"
        );
        let guest = idx.map_for("guest", &relay(), 100).expect("map");
        assert!(guest.remote_peers.is_empty(), "guest sees nobody");
    }

    fn route_via(id: &str, net: &str, peer: &str, metric: i64) -> Route {
        Route {
            id: id.into(),
            network: net.parse().expect("cidr"),
            description: String::new(),
            routing_peer: Some(peer.into()),
            routing_group: None,
            metric,
            masquerade: true,
            enabled: true,
            groups: vec!["all".into()],
            access_groups: vec![],
            open_to_groups: true,
            created_at: 0,
            serving: String::new(),
            clients: vec![],
        }
    }

    fn public_service(id: &str, target: &str, owner: Option<&str>) -> PublicService {
        PublicService {
            id: id.into(),
            name: id.into(),
            protocol: crate::model::ServiceProtocol::Tcp,
            public_port: 10001,
            public_address: String::new(),
            target_ip: target.parse().expect("ip"),
            target_port: 502,
            allowed_sources: vec!["0.0.0.0/0".parse().expect("cidr")],
            enabled: true,
            proxy_protocol: false,
            idle_timeout_secs: 60,
            ephemeral: owner.is_some(),
            owner_peer: owner.map(String::from),
            created_at: 0,
            reached_via: String::new(),
            stats: Default::default(),
        }
    }

    fn served(idx: &NetIndex, peer: &str) -> Vec<String> {
        idx.map_for(peer, &relay(), 100)
            .expect("map")
            .served_services
            .iter()
            .map(|s| format!("{} {}", s.id, s.target))
            .collect()
    }

    #[test]
    fn public_services_go_to_the_peers_that_reach_their_target_best_first() {
        let mut s = snap(
            vec![
                peer("gw1", "100.64.0.1", &[]),
                peer("gw2", "100.64.0.2", &[]),
                peer("nas", "100.64.0.3", &[]),
                peer("laptop", "100.64.0.4", &[]),
            ],
            vec![],
            vec![
                // HA: the same network through two routing peers; gw2 has the better metric.
                route_via("r1", "192.168.50.0/24", "gw1", 200),
                route_via("r2", "192.168.50.0/24", "gw2", 100),
                // A more specific route wins for addresses inside it.
                route_via("r3", "192.168.50.128/25", "gw1", 500),
            ],
        );
        s.services = vec![
            public_service("plc", "192.168.50.10", None),
            public_service("cam", "192.168.50.200", None),
            public_service("files", "100.64.0.3", None),
            public_service("dev", "127.0.0.1", Some("laptop")),
            public_service("nowhere", "10.9.9.9", None),
        ];
        let mut off = public_service("off", "192.168.50.11", None);
        off.enabled = false;
        s.services.push(off);
        let idx = NetIndex::new(Arc::new(s));
        assert_bytes_match(&idx);
        let ids = |r: Result<Vec<&Peer>, String>| -> Vec<String> {
            r.expect("carriers").iter().map(|p| p.id.clone()).collect()
        };
        assert_eq!(ids(idx.service_carriers("plc")), ["gw2", "gw1"]);
        assert_eq!(ids(idx.service_carriers("cam")), ["gw1"]);
        assert_eq!(ids(idx.service_carriers("files")), ["nas"]);
        assert_eq!(ids(idx.service_carriers("dev")), ["laptop"]);
        assert_eq!(
            idx.service_carriers("nowhere").err().as_deref(),
            Some("no enabled route contains 10.9.9.9")
        );
        assert!(idx.service_carriers("off").is_err());
        // Each carrier's map lists exactly what it must accept, nothing else.
        assert_eq!(
            served(&idx, "gw1"),
            ["plc 192.168.50.10:502", "cam 192.168.50.200:502"]
        );
        assert_eq!(served(&idx, "gw2"), ["plc 192.168.50.10:502"]);
        assert_eq!(served(&idx, "nas"), ["files 100.64.0.3:502"]);
        assert_eq!(served(&idx, "laptop"), ["dev 127.0.0.1:502"]);
    }

    #[test]
    fn a_service_whose_peer_awaits_approval_is_carried_by_no_one() {
        let mut pending = peer("nas", "100.64.0.3", &[]);
        pending.approved = false;
        let mut s = snap(vec![pending], vec![], vec![]);
        s.services = vec![public_service("files", "100.64.0.3", None)];
        let idx = NetIndex::new(Arc::new(s));
        assert_eq!(
            idx.service_carriers("files").err().as_deref(),
            Some("peer nas awaits an admin's approval")
        );
        assert!(served(&idx, "nas").is_empty());
    }

    #[test]
    fn routes_reach_distribution_groups_and_routers_see_their_clients() {
        let route = Route {
            id: "r1".into(),
            network: "192.168.50.0/24".parse().expect("cidr"),
            description: "factory".into(),
            routing_peer: None,
            routing_group: Some("routers".into()),
            metric: 10,
            masquerade: true,
            enabled: true,
            groups: vec!["staff".into()],
            access_groups: vec![],
            open_to_groups: true,
            created_at: 0,
            serving: String::new(),
            clients: vec![],
        };
        let mut s = snap(
            vec![
                peer("gw1", "100.64.0.1", &["routers"]),
                peer("gw2", "100.64.0.2", &["routers"]),
                peer("laptop", "100.64.0.3", &["staff"]),
                peer("other", "100.64.0.4", &[]),
            ],
            vec![],
            vec![route],
        );
        s.nameservers.push(NameserverGroup {
            id: "ns1".into(),
            name: "factory".into(),
            description: String::new(),
            domains: vec!["factory.local".into()],
            nameservers: vec!["192.168.50.2".into(), "192.168.50.3:5353".into()],
            groups: vec!["staff".into()],
            enabled: true,
            created_at: 0,
        });
        let idx = NetIndex::new(Arc::new(s));
        assert_bytes_match(&idx);
        let laptop = idx.map_for("laptop", &relay(), 100).expect("map");
        assert_eq!(names(&laptop), ["gw1", "gw2"]);
        assert_eq!(laptop.routes.len(), 2, "one entry per HA routing peer");
        assert!(laptop
            .routes
            .iter()
            .all(|r| r.network == "192.168.50.0/24" && r.masquerade && r.access == "all"));
        let gw1 = idx.map_for("gw1", &relay(), 100).expect("map");
        assert_eq!(gw1.served_routes.len(), 1);
        assert_eq!(names(&gw1), ["laptop"]);
        assert_eq!(gw1.firewall_rules[0].network, "192.168.50.0/24");
        let other = idx.map_for("other", &relay(), 100).expect("map");
        assert!(other.routes.is_empty() && other.remote_peers.is_empty());
    }

    #[test]
    fn route_access_groups_limit_routed_traffic_to_what_policies_allow() {
        let route = Route {
            id: "r1".into(),
            network: "192.168.50.0/24".parse().expect("cidr"),
            description: String::new(),
            routing_peer: Some("gw".into()),
            routing_group: None,
            metric: 10,
            masquerade: true,
            enabled: true,
            groups: vec!["all".into()],
            access_groups: vec!["lan-ssh".into()],
            open_to_groups: false,
            created_at: 0,
            serving: String::new(),
            clients: vec![],
        };
        let s = snap(
            vec![
                peer("gw", "100.64.0.1", &[]),
                peer("laptop", "100.64.0.2", &["staff"]),
                peer("guest", "100.64.0.3", &[]),
            ],
            vec![policy(
                "ssh",
                &["staff"],
                &["lan-ssh"],
                Protocol::Tcp,
                &["22"],
                false,
            )],
            vec![route],
        );
        let idx = NetIndex::new(Arc::new(s));
        assert_bytes_match(&idx);
        let gw = idx.map_for("gw", &relay(), 100).expect("map");
        let lan_rules: Vec<_> = gw
            .firewall_rules
            .iter()
            .filter(|r| r.network == "192.168.50.0/24")
            .collect();
        assert_eq!(
            lan_rules.len(),
            1,
            "only the staff laptop, only TCP 22: {lan_rules:?}"
        );
        assert_eq!(lan_rules[0].peer_cidr, "100.64.0.2/32");
        assert_eq!(lan_rules[0].protocol, pb::Protocol::Tcp as i32);
        assert_eq!(lan_rules[0].ports, [pb::PortRange { start: 22, end: 22 }]);
        // The guest still receives the route (distribution) but the router opens nothing for it,
        // and its map says so; the laptop's says what it may use.
        let guest = idx.map_for("guest", &relay(), 100).expect("map");
        assert_eq!(guest.routes.len(), 1);
        assert_eq!(guest.routes[0].access, "none");
        let laptop = idx.map_for("laptop", &relay(), 100).expect("map");
        assert_eq!(laptop.routes[0].access, "tcp 22");
        assert!(gw.served_routes[0].access.is_empty());
    }

    /// A route with neither access groups nor `open_to_groups` follows the policies towards its
    /// routing peer: "laptops -> factory tcp 502, 80" opens those two ports of the LAN and
    /// nothing else, as the admin who wrote the policy expects.
    #[test]
    fn a_new_route_opens_its_network_only_as_far_as_policies_towards_its_router_allow() {
        let mut route = route_via("r1", "192.168.50.0/24", "gw", 10);
        route.open_to_groups = false;
        let snap_with = |route: Route| {
            snap(
                vec![
                    peer("gw", "100.64.0.1", &["factory"]),
                    peer("laptop", "100.64.0.2", &["laptops"]),
                    peer("guest", "100.64.0.3", &[]),
                ],
                vec![policy(
                    "plc",
                    &["laptops"],
                    &["factory"],
                    Protocol::Tcp,
                    &["502", "80"],
                    false,
                )],
                vec![route],
            )
        };
        let idx = NetIndex::new(Arc::new(snap_with(route.clone())));
        assert_bytes_match(&idx);
        let gw = idx.map_for("gw", &relay(), 100).expect("map");
        let lan: Vec<_> = gw
            .firewall_rules
            .iter()
            .filter(|r| r.network == "192.168.50.0/24")
            .collect();
        assert_eq!(
            lan.len(),
            1,
            "only the laptop, only what the policy says: {lan:?}"
        );
        assert_eq!(lan[0].peer_cidr, "100.64.0.2/32");
        assert_eq!(lan[0].protocol, pb::Protocol::Tcp as i32);
        assert_eq!(lan[0].ports.len(), 2, "{lan:?}");
        let laptop = idx.map_for("laptop", &relay(), 100).expect("map");
        assert_eq!(laptop.routes[0].access, "tcp 502, 80");
        let guest = idx.map_for("guest", &relay(), 100).expect("map");
        assert_eq!(guest.routes[0].access, "none");
        // Open to its distribution groups (the explicit choice): the whole network for everyone
        // it is distributed to, whatever the policies say.
        route.open_to_groups = true;
        let idx = NetIndex::new(Arc::new(snap_with(route)));
        let guest = idx.map_for("guest", &relay(), 100).expect("map");
        assert_eq!(guest.routes[0].access, "all");
        let gw = idx.map_for("gw", &relay(), 100).expect("map");
        assert!(gw
            .firewall_rules
            .iter()
            .filter(|r| r.network == "192.168.50.0/24")
            .all(|r| r.protocol == pb::Protocol::Any as i32));
    }

    #[test]
    fn relay_credentials_are_coturn_style_and_verify() {
        let s = snap(vec![peer("a", "100.64.0.1", &[])], vec![], vec![]);
        let m = NetIndex::new(Arc::new(s))
            .map_for("a", &relay(), 5_000)
            .expect("map");
        let r = m.relay.expect("relay");
        assert_eq!(r.credentials_expire_unix, 5_000);
        let t = &r.turn[0];
        assert_eq!(t.username, "5000:a");
        assert_eq!(
            tern_proto::relay_auth::verify(b"s", &t.username, &t.password, 4_000),
            Ok("a")
        );
        assert!(r.tcp_relay[0].token.starts_with("5000:a:"));
        assert_eq!(r.stun[0].url, "stun:r:3478");
    }

    #[test]
    fn unknown_peer_has_no_map_and_same_content_ignores_serial() {
        let s = snap(vec![peer("a", "100.64.0.1", &[])], vec![], vec![]);
        let idx = NetIndex::new(Arc::new(s));
        assert!(idx.map_for("zzz", &relay(), 1).is_none());
        let m1 = idx.map_for("a", &relay(), 1).expect("map");
        let mut m2 = m1.clone();
        m2.serial += 1;
        assert!(same_content(&m1, &m2));
        m2.remote_peers.push(pb::RemotePeer::default());
        assert!(!same_content(&m1, &m2));
    }
}
