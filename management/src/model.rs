//! Domain types shared by the store, the network map and the REST API.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Unix milliseconds.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random id (128 bits, hex).
pub fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

pub const ALL_GROUP_ID: &str = "all";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Settings {
    /// Overlay address range (CIDR), default 100.64.0.0/10.
    #[schema(value_type = String, example = "100.64.0.0/10")]
    pub overlay_range: IpNet,
    /// Tunnel MTU, default 1280.
    pub mtu: u32,
    /// Peer login expiry in seconds (for peers with login expiration enabled); 0 = never.
    pub peer_login_expiry_secs: i64,
    /// Ephemeral peers are removed this long after they disconnect.
    pub ephemeral_ttl_secs: i64,
    /// New peers must be approved by an admin before they see or are seen by anyone.
    #[serde(default)]
    pub peer_approval_required: bool,
    /// Groups whose peers may publish their own ports with `tern expose` (none by default).
    #[serde(default)]
    pub expose_groups: Vec<String>,
    /// Groups every device added by a person's sign-in joins, besides its owner's groups
    /// (none by default).
    #[serde(default)]
    pub sign_in_groups: Vec<String>,
    /// Every peer answers to `<name>.<dns_domain>` on every agent (default `tern.internal`).
    #[serde(default = "default_dns_domain")]
    pub dns_domain: String,
    /// Serial of the current network state; bumped by every change that can affect a map.
    #[serde(default)]
    pub network_serial: i64,
}

/// What an account may do. Ordered by power: an owner can do everything, including changing
/// roles; an admin everything else; an auditor reads everything and changes nothing; a user sees
/// and manages only their own devices.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Auditor,
    Admin,
    Owner,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Auditor, Role::User];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::User => "user",
        }
    }

    /// Owners and admins change the network; auditors and users do not.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }

    /// Owners, admins and auditors see the whole network.
    pub fn sees_all(self) -> bool {
        self != Role::User
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role: use owner, admin, auditor or user"))
    }
}

pub fn default_dns_domain() -> String {
    "tern.internal".into()
}

/// A DNS name in canonical form (lower case, no trailing dot), or why it is not one: labels of
/// 1-63 letters, digits and '-' (not first or last), at least two labels, at most 253 characters.
pub fn dns_name(s: &str) -> Result<String, String> {
    let n = s.trim().trim_end_matches('.').to_ascii_lowercase();
    if n.is_empty() {
        return Err("is empty".into());
    }
    if n.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    let labels: Vec<&str> = n.split('.').collect();
    if labels.len() < 2 {
        return Err(format!(
            "{n:?} needs at least two labels, e.g. tern.internal"
        ));
    }
    for l in &labels {
        if l.is_empty() || l.len() > 63 {
            return Err(format!(
                "{n:?} has an empty label or one longer than 63 characters"
            ));
        }
        if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!(
                "{n:?} may contain only letters, digits, '-' and '.'"
            ));
        }
        if l.starts_with('-') || l.ends_with('-') {
            return Err(format!("{n:?} has a label that starts or ends with '-'"));
        }
    }
    Ok(n)
}

/// The DNS label a name becomes (lower case, letters, digits, '-'; at most 56 so that a "-NN"
/// suffix still fits 63): "Factory GW" -> "factory-gw".
pub fn label_of(name: &str) -> String {
    let mut l: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while l.contains("--") {
        l = l.replace("--", "-");
    }
    let l: String = l.trim_matches('-').chars().take(56).collect();
    let l = l.trim_end_matches('-').to_string();
    if l.is_empty() {
        "peer".into()
    } else {
        l
    }
}

/// The DNS label of each peer (in `peers`' order): its name made a valid label (lower case,
/// letters, digits, '-'; at most 63); names that come out the same get "-2", "-3"… in the order
/// the peers joined.
pub fn dns_labels(peers: &[Peer]) -> Vec<String> {
    let keys: Vec<(&str, Millis, &str)> = peers
        .iter()
        .map(|p| (p.name.as_str(), p.created_at, p.id.as_str()))
        .collect();
    labels_in_join_order(&keys)
}

/// [`dns_labels`] of (name, created_at, id) triples.
pub fn labels_in_join_order(peers: &[(&str, Millis, &str)]) -> Vec<String> {
    let mut order: Vec<usize> = (0..peers.len()).collect();
    order.sort_by(|&a, &b| (peers[a].1, peers[a].2).cmp(&(peers[b].1, peers[b].2)));
    let mut taken = std::collections::HashSet::new();
    let mut out = vec![String::new(); peers.len()];
    for i in order {
        let b = label_of(peers[i].0);
        let mut label = b.clone();
        let mut n = 2;
        while !taken.insert(label.clone()) {
            label = format!("{b}-{n}");
            n += 1;
        }
        out[i] = label;
    }
    out
}

/// Queries for `domains` go to `nameservers` (inside the network: behind a route, or a peer) on
/// the peers of `groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct NameserverGroup {
    pub id: String,
    pub name: String,
    pub description: String,
    /// e.g. ["factory.local"]: names under these (and the domains themselves).
    pub domains: Vec<String>,
    /// e.g. ["192.168.50.2"] or ["192.168.50.2:5353"].
    pub nameservers: Vec<String>,
    /// Distribution groups: peers in any of them use this nameserver group.
    pub groups: Vec<String>,
    pub enabled: bool,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    pub id: String,
    pub username: String,
    pub disabled: bool,
    pub created_at: Millis,
    /// "local" (password) or "oidc" (signs in through the identity provider).
    pub source: String,
    pub role: Role,
    /// Number of devices this user added by signing in with `tern up` (in user lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccessToken {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub expires_at: Option<Millis>,
    pub created_at: Millis,
    pub last_used_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub builtin: bool,
    /// Number of peers in the group.
    pub peers: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SetupKey {
    pub id: String,
    pub name: String,
    /// First characters of the key, to recognise it; the key itself is shown only at creation.
    pub key_prefix: String,
    pub reusable: bool,
    /// 0 = unlimited (reusable keys only).
    pub usage_limit: i64,
    pub used_count: i64,
    pub expires_at: Option<Millis>,
    pub ephemeral: bool,
    pub revoked: bool,
    pub auto_groups: Vec<String>,
    pub created_at: Millis,
    pub last_used_at: Option<Millis>,
    /// Derived: "valid", "revoked", "expired" or "overused".
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Peer {
    pub id: String,
    pub name: String,
    pub wg_public_key: String,
    pub overlay_ip: String,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    pub setup_key_id: Option<String>,
    pub ephemeral: bool,
    pub connected: bool,
    /// False while the peer awaits an admin's approval (see settings.peer_approval_required).
    pub approved: bool,
    pub login_expiration_enabled: bool,
    /// The user whose sign-in added this device (None for peers that joined with a setup key).
    pub user_id: Option<String>,
    /// That user's name.
    pub owner: Option<String>,
    /// The owner's account is disabled: the device is off the network until it is enabled.
    pub owner_disabled: bool,
    pub last_seen: Millis,
    pub last_login: Millis,
    pub created_at: Millis,
    pub groups: Vec<String>,
    /// How this peer reaches others right now, as its agent last reported (not stored; empty
    /// while offline).
    pub connections: Vec<PeerConnection>,
    /// Its DNS name on every agent, e.g. `gina-laptop.tern.internal` (a suffix when two names
    /// come out the same).
    #[serde(default)]
    pub dns_name: String,
    /// Where its management connection comes from now (its public address as the server sees
    /// it; a reverse proxy's when one is in front); None while offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Set for a plain WireGuard device the server hosts (no agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardDevice>,
    /// On one peer's page and a user's own devices, for an online peer without reported paths:
    /// whether its map lists no other peer (no policy connects it with anyone). Not stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alone: Option<bool>,
}

/// A plain WireGuard device: its own key, and what the server's endpoint sees of it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WireguardDevice {
    /// The device's WireGuard public key (base64, as `wg` shows it).
    pub public_key: String,
    /// Where its datagrams come from (its public address); None before the first handshake
    /// since the server started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Seconds since its last handshake; None if none since the server started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_handshake_secs: Option<u64>,
    /// Bytes from the device and to it through the server's endpoint (since the server started).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Peer {
    /// A connected, approved peer named `id` in "all" and `groups`, for tests.
    #[cfg(test)]
    pub fn fixture(id: &str, ip: &str, groups: &[&str]) -> Peer {
        Peer {
            id: id.into(),
            name: id.into(),
            wg_public_key: tern_proto::SecretKey::generate().public_key().to_base64(),
            overlay_ip: ip.into(),
            hostname: id.into(),
            os: "linux".into(),
            agent_version: "t".into(),
            setup_key_id: None,
            ephemeral: false,
            connected: true,
            approved: true,
            login_expiration_enabled: false,
            user_id: None,
            owner: None,
            owner_disabled: false,
            last_seen: 0,
            last_login: 0,
            created_at: 0,
            groups: std::iter::once("all")
                .chain(groups.iter().copied())
                .map(String::from)
                .collect(),
            connections: vec![],
            dns_name: String::new(),
            endpoint: None,
            wireguard: None,
            alone: None,
        }
    }

    /// Approved and not owned by a disabled user: policies and routes may reach it.
    pub fn on_network(&self) -> bool {
        self.approved && !self.owner_disabled
    }
}

/// One peer-to-peer path as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PeerConnection {
    pub peer_id: String,
    /// "direct", "turn_relay", "tcp_relay" or "connecting".
    pub kind: String,
    /// Round trip of the path (the agent's in-tunnel probes); None = unknown.
    pub rtt_ms: Option<u32>,
    /// Share of the agent's probes lost on this path over the last minute, in percent (from 3
    /// probes on); None = not measured yet.
    pub loss_pct: Option<u8>,
    /// Why the path is what it is (`tern diagnose` codes: "direct", "ice_no_direct_pair",
    /// "ice_failed", ...); None when the agent did not say.
    pub reason: Option<String>,
    /// The other peer's name, for callers that cannot list every peer (a `user`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(Protocol::Any),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            other => Err(format!("unknown protocol {other:?} (any, tcp, udp, icmp)")),
        }
    }
}

/// An inclusive port range; a single port has start == end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    /// "22" or "8000-8080"; ports 1..=65535, start <= end.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| -> Result<u16, String> {
            let v: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("port {p:?} is not a number"))?;
            if v == 0 || v > 65535 {
                return Err(format!("port {v} is out of range 1-65535"));
            }
            Ok(v as u16)
        };
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        if start > end {
            return Err(format!("port range {s:?} starts after it ends"));
        }
        Ok(PortRange { start, end })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub protocol: Protocol,
    /// Destination ports ("22", "8000-8080"); empty = all. Only for tcp/udp.
    pub ports: Vec<String>,
    pub bidirectional: bool,
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Route {
    pub id: String,
    #[schema(value_type = String, example = "192.168.50.0/24")]
    pub network: IpNet,
    pub description: String,
    /// Exactly one of routing_peer / routing_group is set.
    pub routing_peer: Option<String>,
    pub routing_group: Option<String>,
    pub metric: i64,
    pub masquerade: bool,
    pub enabled: bool,
    /// Distribution groups: peers in these groups receive the route.
    pub groups: Vec<String>,
    /// Access groups: if set, only policies whose destinations include one of them open the
    /// routed network (for what they allow).
    pub access_groups: Vec<String>,
    /// Without access groups: true lets every peer the route is distributed to reach the whole
    /// network (an explicit choice; routes made before this setting existed have it); false
    /// (the default) opens it only as far as policies towards its routing peer's groups allow.
    pub open_to_groups: bool,
    pub created_at: Millis,
    /// Whether a routing peer serves the network now, in words: "served by factory-gw", or
    /// "not served: ..." with the reason (from the routing peers' own reports).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub serving: String,
    /// What became of the route on each online client it is distributed to (their reports).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<RouteClient>,
}

/// One client's report about a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RouteClient {
    pub peer_id: String,
    pub peer_name: String,
    /// "installed", "conflict", "unserved", "failed" or "no_access".
    pub state: String,
    /// The reason in words (empty when installed).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEvent {
    pub id: String,
    pub created_at: Millis,
    /// "user:<name>", "token:<name>", "peer:<id>" or "system".
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

pub use tern_proto::tunnel::Protocol as ServiceProtocol;

/// A port on the server's public address carried to a target inside the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PublicService {
    pub id: String,
    pub name: String,
    #[schema(value_type = String, example = "tcp")]
    pub protocol: ServiceProtocol,
    pub public_port: u16,
    /// Where outside clients connect, e.g. "vpn.example.com:10001".
    pub public_address: String,
    /// A peer's overlay address or an address inside a routed network.
    #[schema(value_type = String, example = "192.168.50.10")]
    pub target_ip: std::net::IpAddr,
    pub target_port: u16,
    /// Sources allowed to connect (CIDRs); 0.0.0.0/0 and ::/0 open the service to everyone.
    #[schema(value_type = Vec<String>, example = json!(["198.51.100.0/24"]))]
    pub allowed_sources: Vec<IpNet>,
    pub enabled: bool,
    /// TCP: send a PROXY protocol v2 header to the target so it sees the client's address.
    pub proxy_protocol: bool,
    /// A connection (TCP) or flow (UDP) with no traffic for this long is closed.
    pub idle_timeout_secs: u32,
    /// Published by an agent with `tern expose` (removed when it stops or disconnects).
    pub ephemeral: bool,
    /// The peer that published an ephemeral service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_peer: Option<String>,
    pub created_at: Millis,
    /// How the target is reached, in words (e.g. "peer factory-gw", "route 192.168.50.0/24 via
    /// gw-1, gw-2"); filled by the API.
    pub reached_via: String,
    /// Live counters since the server started (not stored).
    pub stats: ServiceStats,
}

/// Counters of one public service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct ServiceStats {
    /// Open TCP connections or live UDP flows.
    pub active: u64,
    /// Connections (or flows) carried to the target since the server started.
    pub connections_total: u64,
    /// Bytes from outside clients to the target.
    pub bytes_in: u64,
    /// Bytes from the target to outside clients.
    pub bytes_out: u64,
    /// Connections refused because the source is outside `allowed_sources`.
    pub refused_allowlist: u64,
    /// Connections refused by the per-source or global limit.
    pub refused_limit: u64,
    /// Connections that could not reach the target.
    pub failed: u64,
    /// UDP datagrams dropped because their flow's queue (or all flows' together) was full.
    #[serde(default)]
    pub dropped_full: u64,
    /// The last failure in words (omitted when there was none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<Millis>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, name: &str, created_at: Millis) -> Peer {
        Peer {
            name: name.into(),
            created_at,
            ..Peer::fixture(id, "100.64.0.1", &[])
        }
    }

    #[test]
    fn dns_labels_are_valid_and_collisions_get_suffixes_in_join_order() {
        let peers = vec![
            peer("c", "Factory GW", 3),
            peer("a", "factory_gw", 1),
            peer("b", "factory-gw", 2),
            peer("d", "--Ünïcode--", 4),
            peer("e", &"x".repeat(80), 5),
        ];
        let l = dns_labels(&peers);
        assert_eq!(l[1], "factory-gw", "the first to join keeps the plain name");
        assert_eq!(l[2], "factory-gw-2");
        assert_eq!(l[0], "factory-gw-3");
        assert_eq!(l[3], "n-code");
        assert_eq!(l[4].len(), 56);
        for x in &l {
            assert!(dns_name(&format!("{x}.tern.internal")).is_ok(), "{x}");
        }
    }

    #[test]
    fn dns_names_are_checked_label_by_label() {
        assert_eq!(dns_name("Factory.Local.").as_deref(), Ok("factory.local"));
        assert!(dns_name("nodots").is_err());
        assert!(dns_name("a..b").is_err());
        assert!(dns_name("-a.b").is_err());
        assert!(dns_name("a_b.c").is_err());
        assert!(dns_name(&format!("{}.com", "a".repeat(64))).is_err());
    }
}
