//! IPv6-only uplinks behind NAT64 (a mobile carrier's 464XLAT without a CLAT on this host): the
//! management URL and the relay URLs in the network map may carry IPv4 literals this host cannot
//! reach. With a NAT64 prefix (RFC 6052: the well-known 64:ff9b::/96 or a network-specific one)
//! and no IPv4 default route, every IPv4 address the agent dials goes through [`Nat64::dial`] or
//! [`Nat64::url`], which embed it in the prefix; the carrier's NAT64 translates.
//!
//! The prefix is found as 464XLAT clients find it (RFC 7050): the AAAA records of
//! `ipv4only.arpa` through the host's resolver (a DNS64 resolver synthesizes them from its
//! well-known IPv4 addresses 192.0.0.170/171), at start and whenever the host's addresses change.
//! `--nat64-prefix` overrides discovery (or turns NAT64 off).

use ipnet::Ipv6Net;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::RwLock;
use std::time::Duration;
use tern_proto::management as pb;
use tracing::{info, warn};

/// The name whose AAAA records reveal the prefix (RFC 7050 §2).
pub const WELL_KNOWN_NAME: &str = "ipv4only.arpa";
/// The IPv4 addresses `ipv4only.arpa` has (RFC 7050 §2.2).
const WELL_KNOWN_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 0, 170), Ipv4Addr::new(192, 0, 0, 171)];
/// Prefix lengths RFC 6052 §2.2 allows, longest first (the usual /96 is tried first).
const LENGTHS: [u8; 6] = [96, 64, 56, 48, 40, 32];
/// How long discovery waits for the resolver.
const DISCOVERY_WITHIN: Duration = Duration::from_secs(5);

/// What `--nat64-prefix` says (saved with the other `tern up` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Setting {
    /// Discover the prefix (RFC 7050) when the host has no IPv4 route.
    #[default]
    Auto,
    /// Never synthesize.
    Off,
    /// This prefix (discovery is still run, to name a prefix that differs from the network's).
    Prefix(Ipv6Net),
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Setting::Auto),
            "off" => Ok(Setting::Off),
            p => {
                let net: Ipv6Net = p.parse().map_err(|_| {
                    format!("{p:?} is not a NAT64 prefix: give an IPv6 prefix such as 64:ff9b::/96, or auto, or off")
                })?;
                if !LENGTHS.contains(&net.prefix_len()) {
                    return Err(format!(
                        "a NAT64 prefix is /32, /40, /48, /56, /64 or /96 (RFC 6052), not /{}",
                        net.prefix_len()
                    ));
                }
                if net.prefix_len() > 64 && net.network().octets()[8] != 0 {
                    return Err(format!(
                        "{net}: bits 64-71 of a NAT64 prefix must be zero (RFC 6052)"
                    ));
                }
                Ok(Setting::Prefix(net.trunc()))
            }
        }
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Auto => f.write_str("auto"),
            Setting::Off => f.write_str("off"),
            Setting::Prefix(p) => write!(f, "{p}"),
        }
    }
}

/// The IPv4-embedded IPv6 address of `v4` under `prefix` (RFC 6052 §2.2: bits 64-71 stay zero).
pub fn embed(prefix: &Ipv6Net, v4: Ipv4Addr) -> Ipv6Addr {
    let mut o = prefix.network().octets();
    let mut at = usize::from(prefix.prefix_len() / 8);
    for b in v4.octets() {
        if at == 8 {
            at += 1;
        }
        o[at] = b;
        at += 1;
    }
    Ipv6Addr::from(o)
}

/// The IPv4 address embedded in `a` under a prefix of `len` bits.
fn extract(a: Ipv6Addr, len: u8) -> Ipv4Addr {
    let o = a.octets();
    let mut at = usize::from(len / 8);
    let mut v4 = [0u8; 4];
    for b in &mut v4 {
        if at == 8 {
            at += 1;
        }
        *b = o[at];
        at += 1;
    }
    Ipv4Addr::from(v4)
}

/// The IPv4 address `a` embeds, if it is under `prefix`.
pub fn unembed(prefix: &Ipv6Net, a: Ipv6Addr) -> Option<Ipv4Addr> {
    prefix.contains(&a).then(|| extract(a, prefix.prefix_len()))
}

/// The prefix behind synthesized AAAA records of `ipv4only.arpa` (RFC 7050 §3): the longest
/// RFC 6052 length at which one of the well-known addresses is embedded.
pub fn prefix_from_answers(answers: &[Ipv6Addr]) -> Option<Ipv6Net> {
    answers.iter().find_map(|a| {
        LENGTHS.iter().find_map(|&len| {
            WELL_KNOWN_V4
                .contains(&extract(*a, len))
                .then(|| Ipv6Net::new(*a, len).ok().map(|n| n.trunc()))
                .flatten()
        })
    })
}

/// Replaces an IPv4 literal host in a `scheme:host:port...` or `scheme://host:port/...` URL.
pub fn rewrite_url(url: &str, prefix: &Ipv6Net) -> String {
    let (head, rest) = match url.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => match url.split_once(':') {
            Some((s, r)) => (format!("{s}:"), r),
            None => return url.to_string(),
        },
    };
    let end = rest.find([':', '/', '?']).unwrap_or(rest.len());
    match rest[..end].parse::<Ipv4Addr>() {
        Ok(v4) => format!("{head}[{}]{}", embed(prefix, v4), &rest[end..]),
        Err(_) => url.to_string(),
    }
}

/// The IPv4 literal host of a URL, if it has one.
pub fn ipv4_host(url: &str) -> Option<Ipv4Addr> {
    let rest = match url.split_once("://") {
        Some((_, r)) => r,
        None => url.split_once(':')?.1,
    };
    let end = rest.find([':', '/', '?']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What `tern status` says about NAT64 (only on a host without an IPv4 route).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
pub struct Status {
    /// The prefix in use ("" when none is known).
    pub prefix: String,
    /// "configured", "discovered" or "" (none).
    pub source: String,
    /// The network's own prefix when it differs from the configured one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub discovered: String,
    /// Why no prefix was discovered (when none is in use).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Status {
    /// The status line, e.g. "IPv6-only uplink, NAT64 prefix 64:ff9b::/96 (discovered)".
    pub fn line(&self) -> String {
        if self.prefix.is_empty() {
            return format!(
                "IPv6-only uplink, no NAT64 prefix: IPv4 addresses of the server are unreachable ({}); pass --nat64-prefix PREFIX",
                if self.error.is_empty() { "discovery found none" } else { &self.error }
            );
        }
        let mut l = format!(
            "IPv6-only uplink, NAT64 prefix {} ({})",
            self.prefix, self.source
        );
        if !self.discovered.is_empty() {
            l.push_str(&format!(
                "; the network announces {}: check --nat64-prefix",
                self.discovered
            ));
        }
        l
    }
}

#[derive(Debug, Clone, Default)]
struct State {
    /// The host has an IPv4 default route (then nothing is synthesized).
    ipv4_route: bool,
    /// IPv4 networks the host has routes to without one (its LANs; loopback always).
    ipv4_nets: Vec<ipnet::Ipv4Net>,
    /// IPv4 addresses the agent must dial (management's, the relays'), and whether one of them
    /// has no route: only then is the prefix looked for (no DNS query otherwise).
    wanted: Vec<Ipv4Addr>,
    needed: bool,
    /// The network's prefix (RFC 7050), when discovery found one.
    discovered: Option<Ipv6Net>,
    /// Why discovery found none.
    error: String,
}

impl State {
    /// Whether `a` is reached as it is (a route covers it).
    fn routable(&self, a: Ipv4Addr) -> bool {
        self.ipv4_route || a.is_loopback() || self.ipv4_nets.iter().any(|n| n.contains(&a))
    }
}

/// The one place IPv4 addresses are made reachable from an IPv6-only host.
#[derive(Debug)]
pub struct Nat64 {
    setting: Setting,
    /// The tunnel's interface (its routes are not the uplink's).
    iface: String,
    state: RwLock<State>,
}

impl Nat64 {
    /// Before the first [`Nat64::refresh`] it assumes an IPv4 route (nothing synthesized).
    pub fn new(setting: Setting, iface: &str) -> Nat64 {
        Nat64 {
            setting,
            iface: iface.to_string(),
            state: RwLock::new(State {
                ipv4_route: true,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> State {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The IPv4 literal hosts of `urls` are what the agent dials (management's URLs, the map's
    /// relays); returns true when one of them has no route and no prefix is known yet (then
    /// [`Nat64::refresh`] looks for one).
    pub fn want(&self, urls: &[String]) -> bool {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        for a in urls.iter().filter_map(|u| ipv4_host(u)) {
            if !st.wanted.contains(&a) {
                st.wanted.push(a);
            }
        }
        let needed = st.wanted.iter().any(|a| !st.routable(*a));
        let ask = needed && !st.needed;
        st.needed = needed;
        ask && self.setting == Setting::Auto && st.discovered.is_none()
    }

    /// Looks at the host's routes again and, when an IPv4 address the agent dials has no
    /// route, asks the resolver for the network's prefix (no DNS query otherwise). Returns true
    /// when what [`Nat64::prefix`] gives changed.
    pub async fn refresh(&self) -> bool {
        let iface = self.iface.clone();
        let (ipv4_route, ipv4_nets) = tokio::task::spawn_blocking(move || {
            let nets = crate::platform::net::reachable_networks(&iface)
                .into_iter()
                .filter_map(|n| match n {
                    ipnet::IpNet::V4(v4) => Some(v4),
                    ipnet::IpNet::V6(_) => None,
                })
                .collect::<Vec<_>>();
            (crate::platform::net::default_routes(&iface).0, nets)
        })
        .await
        .unwrap_or((true, vec![]));
        let before = self.prefix();
        let needed = {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            st.ipv4_route = ipv4_route;
            st.ipv4_nets = ipv4_nets;
            st.needed = st.wanted.iter().any(|a| !st.routable(*a));
            st.needed
        };
        let (discovered, error) = if !needed || self.setting == Setting::Off {
            (None, String::new())
        } else {
            match discover().await {
                Ok(p) => (Some(p), String::new()),
                Err(e) => (None, e),
            }
        };
        {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            st.discovered = discovered;
            st.error = error;
        }
        let after = self.prefix();
        if before != after {
            match (after, self.setting) {
                (Some(p), Setting::Prefix(_)) => {
                    info!(prefix = %p, "IPv6-only uplink: IPv4 addresses are reached through the configured NAT64 prefix")
                }
                (Some(p), _) => {
                    info!(prefix = %p, "IPv6-only uplink: IPv4 addresses are reached through the network's NAT64 prefix (discovered via DNS64)")
                }
                (None, _) if !ipv4_route => {
                    warn!(error = %self.state().error, "IPv6-only uplink without a NAT64 prefix: IPv4 addresses of the server are unreachable; pass --nat64-prefix")
                }
                (None, _) => info!(
                    "the host has an IPv4 route again: IPv4 addresses are dialled as they are"
                ),
            }
        }
        if let (Setting::Prefix(p), Some(d)) = (self.setting, discovered) {
            if p != d {
                warn!(configured = %p, network = %d, "the configured NAT64 prefix differs from the one the network announces");
            }
        }
        before != after
    }

    /// The prefix IPv4 addresses go through now (None: dial them as they are).
    pub fn prefix(&self) -> Option<Ipv6Net> {
        let st = self.state();
        if st.ipv4_route {
            return None;
        }
        match self.setting {
            Setting::Off => None,
            Setting::Prefix(p) => Some(p),
            Setting::Auto => st.discovered,
        }
    }

    /// The host has no IPv4 default route, and an IPv4 address the agent dials has no route
    /// (a host with only LAN routes reaching loopback or LAN addresses needs no NAT64).
    pub fn ipv6_only(&self) -> bool {
        let st = self.state();
        !st.ipv4_route && st.needed
    }

    /// The prefix an IPv4 address `a` is dialled through (None: as it is).
    fn prefix_for(&self, a: Ipv4Addr) -> Option<Ipv6Net> {
        let st = self.state();
        if st.routable(a) {
            return None;
        }
        drop(st);
        self.prefix()
    }

    /// The address to dial for `a`.
    pub fn dial(&self, a: SocketAddr) -> SocketAddr {
        match a.ip() {
            IpAddr::V4(v4) => match self.prefix_for(v4) {
                Some(p) => SocketAddr::new(IpAddr::V6(embed(&p, v4)), a.port()),
                None => a,
            },
            IpAddr::V6(_) => a,
        }
    }

    /// The URL to dial for `url` (an IPv4 literal host without a route embedded in the prefix).
    pub fn url(&self, url: &str) -> String {
        match ipv4_host(url).and_then(|v4| self.prefix_for(v4)) {
            Some(p) => rewrite_url(url, &p),
            None => url.to_string(),
        }
    }

    /// `url` as outsiders know it: an IPv6 literal host under the prefix becomes the IPv4
    /// address it embeds (a management URL written with the NAT64 address).
    pub fn outside_url(&self, url: &str) -> String {
        let (Some(p), Some(open), Some(close)) = (self.prefix(), url.find('['), url.find(']'))
        else {
            return url.to_string();
        };
        match url
            .get(open + 1..close)
            .and_then(|h| h.parse::<Ipv6Addr>().ok())
            .and_then(|a| unembed(&p, a))
        {
            Some(v4) => format!("{}{v4}{}", &url[..open], &url[close + 1..]),
            None => url.to_string(),
        }
    }

    /// Every server URL of the relay part of a network map, as this host dials them.
    pub fn relay(&self, relay: &mut pb::RelayConfig) {
        for s in &mut relay.stun {
            s.url = self.url(&s.url);
        }
        for u in &mut relay.stun_probe_urls {
            *u = self.url(u);
        }
        for t in &mut relay.turn {
            t.url = self.url(&t.url);
        }
        for t in &mut relay.tcp_relay {
            t.url = self.url(&t.url);
        }
    }

    /// The server URLs of a map's relay part (to [`Nat64::want`] them).
    pub fn relay_urls(relay: &pb::RelayConfig) -> Vec<String> {
        relay
            .stun
            .iter()
            .map(|s| s.url.clone())
            .chain(relay.stun_probe_urls.iter().cloned())
            .chain(relay.turn.iter().map(|t| t.url.clone()))
            .chain(relay.tcp_relay.iter().map(|t| t.url.clone()))
            .collect()
    }

    /// For `tern status`: None on a host with an IPv4 route (or one that dials no IPv4 address
    /// it has no route to).
    pub fn status(&self) -> Option<Status> {
        let st = self.state();
        if st.ipv4_route || !st.needed {
            return None;
        }
        let prefix = self.prefix();
        Some(Status {
            prefix: prefix.map(|p| p.to_string()).unwrap_or_default(),
            source: match (prefix, self.setting) {
                (None, _) => "",
                (Some(_), Setting::Prefix(_)) => "configured",
                (Some(_), _) => "discovered",
            }
            .into(),
            discovered: match (self.setting, st.discovered) {
                (Setting::Prefix(p), Some(d)) if p != d => d.to_string(),
                _ => String::new(),
            },
            error: if prefix.is_none() {
                if self.setting == Setting::Off {
                    "--nat64-prefix off".into()
                } else {
                    st.error
                }
            } else {
                String::new()
            },
        })
    }

    /// Why `url` (with an IPv4 literal host) cannot be reached from here, when that is the case:
    /// the host has no IPv4 route and no prefix is known. Says what to do.
    pub fn unreachable_ipv4(&self, url: &str) -> Option<String> {
        let v4 = ipv4_host(url)?;
        if self.state().routable(v4) || self.prefix().is_some() {
            return None;
        }
        let why = match self.setting {
            Setting::Off => "NAT64 is switched off (--nat64-prefix off)".to_string(),
            _ => format!("no NAT64 prefix was found ({})", self.state().error),
        };
        Some(format!(
            "this host has no IPv4 route (an IPv6-only uplink) and {url} names the IPv4 address {v4}; {why}. Use the network's DNS64 resolver (the carrier's, usually handed out by DHCPv6 or router advertisements), or pass --nat64-prefix PREFIX (the carrier's NAT64 prefix, often 64:ff9b::/96), or give a management URL whose host name has an IPv6 address"
        ))
    }
}

/// RFC 7050 discovery through the host's resolver (getaddrinfo, so /etc/resolv.conf, nsswitch
/// and systemd-resolved are honoured as every program on the host sees them).
async fn discover() -> Result<Ipv6Net, String> {
    let lookup = tokio::net::lookup_host((WELL_KNOWN_NAME, 0));
    let addrs = match tokio::time::timeout(DISCOVERY_WITHIN, lookup).await {
        Err(_) => {
            return Err(format!(
                "the resolver did not answer for {WELL_KNOWN_NAME} within {} s",
                DISCOVERY_WITHIN.as_secs()
            ))
        }
        Ok(Err(e)) => {
            return Err(format!(
                "{WELL_KNOWN_NAME} does not resolve ({e}): the resolver does no DNS64"
            ))
        }
        Ok(Ok(a)) => a,
    };
    let v6: Vec<Ipv6Addr> = addrs
        .filter_map(|a| match a.ip() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
        .collect();
    if v6.is_empty() {
        return Err(format!(
            "{WELL_KNOWN_NAME} has no IPv6 address at the resolver: it does no DNS64"
        ));
    }
    prefix_from_answers(&v6).ok_or_else(|| {
        format!(
            "the IPv6 addresses of {WELL_KNOWN_NAME} ({}) embed neither 192.0.0.170 nor 192.0.0.171",
            v6.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_literals_become_nat64_addresses() {
        let p: Ipv6Net = "2001:db8:64:ff9b::/96".parse().expect("prefix");
        assert_eq!(
            embed(&p, Ipv4Addr::new(203, 0, 113, 10)).to_string(),
            "2001:db8:64:ff9b::cb00:710a"
        );
        assert_eq!(
            rewrite_url("stun:203.0.113.10:3478", &p),
            "stun:[2001:db8:64:ff9b::cb00:710a]:3478"
        );
        assert_eq!(
            rewrite_url("turn:203.0.113.10:3478?transport=udp", &p),
            "turn:[2001:db8:64:ff9b::cb00:710a]:3478?transport=udp"
        );
        assert_eq!(
            rewrite_url("ws://203.0.113.10:443/relay", &p),
            "ws://[2001:db8:64:ff9b::cb00:710a]:443/relay"
        );
        assert_eq!(
            rewrite_url("http://203.0.113.10:8080", &p),
            "http://[2001:db8:64:ff9b::cb00:710a]:8080"
        );
        assert_eq!(
            rewrite_url("wss://relay.example.com/relay", &p),
            "wss://relay.example.com/relay",
            "names stay"
        );
        assert_eq!(
            rewrite_url("stun:[2001:db8::1]:3478", &p),
            "stun:[2001:db8::1]:3478",
            "IPv6 stays"
        );
        assert_eq!(
            ipv4_host("http://203.0.113.1:8080"),
            Some(Ipv4Addr::new(203, 0, 113, 1))
        );
        assert_eq!(
            ipv4_host("stun:203.0.113.1:3479"),
            Some(Ipv4Addr::new(203, 0, 113, 1))
        );
        assert_eq!(ipv4_host("https://vpn.example.com"), None);
    }

    /// RFC 6052 §2.4's examples: 192.0.2.33 under each prefix length.
    #[test]
    fn every_rfc6052_prefix_length_embeds_and_is_found_again() {
        let v4 = Ipv4Addr::new(192, 0, 2, 33);
        for (prefix, want) in [
            ("2001:db8::/32", "2001:db8:c000:221::"),
            ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
            ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
            ("64:ff9b::/96", "64:ff9b::192.0.2.33"),
        ] {
            let p: Ipv6Net = prefix.parse().expect("prefix");
            let a = embed(&p, v4);
            assert_eq!(a, want.parse::<Ipv6Addr>().expect("want"), "{prefix}");
            assert_eq!(extract(a, p.prefix_len()), v4, "{prefix}");
            // What a DNS64 resolver answers for ipv4only.arpa under this prefix.
            let answers = [
                embed(&p, Ipv4Addr::new(192, 0, 0, 171)),
                embed(&p, WELL_KNOWN_V4[0]),
            ];
            assert_eq!(prefix_from_answers(&answers), Some(p), "{prefix}");
        }
        // An ordinary IPv6 address of the name (no DNS64) gives none.
        assert_eq!(
            prefix_from_answers(&["2001:db8::1".parse().expect("a")]),
            None
        );
    }

    #[test]
    fn settings_parse_and_say_what_is_wrong() {
        assert_eq!("auto".parse::<Setting>(), Ok(Setting::Auto));
        assert_eq!("off".parse::<Setting>(), Ok(Setting::Off));
        assert_eq!(
            "64:ff9b::/96".parse::<Setting>(),
            Ok(Setting::Prefix("64:ff9b::/96".parse().expect("p")))
        );
        assert!("64:ff9b::/95"
            .parse::<Setting>()
            .expect_err("refused")
            .contains("RFC 6052"));
        assert!("2001:db8:0:0:ff00::/96"
            .parse::<Setting>()
            .expect_err("refused")
            .contains("bits 64-71"));
        assert!("nat64"
            .parse::<Setting>()
            .expect_err("refused")
            .contains("64:ff9b::/96"));
        for s in ["auto", "off", "2001:db8:64:ff9b::/96"] {
            assert_eq!(s.parse::<Setting>().expect(s).to_string(), s);
        }
    }

    #[test]
    fn only_an_ipv6_only_host_synthesizes_and_status_says_how_it_knows() {
        let p: Ipv6Net = "2001:db8:64:ff9b::/96".parse().expect("p");
        let n = Nat64::new(Setting::Auto, "tern0");
        let server: SocketAddr = "203.0.113.10:3478".parse().expect("a");
        // An IPv4 route (the state before the first refresh): nothing changes.
        assert_eq!(n.dial(server), server);
        assert_eq!(n.status(), None);
        assert_eq!(n.unreachable_ipv4("http://203.0.113.10:443"), None);
        // IPv6 only, nothing discovered: no prefix, and the reason names NAT64. Loopback and
        // the host's own LAN stay reachable as they are.
        // want(): with an IPv4 route nothing is looked for; without one, an address with no
        // route asks for the prefix once (and a LAN address never does).
        let server_url = vec!["http://203.0.113.10:443".to_string()];
        assert!(!n.want(&server_url));
        n.state.write().expect("lock").ipv4_route = false;
        n.state.write().expect("lock").ipv4_nets = vec!["192.168.50.0/24".parse().expect("net")];
        n.state.write().expect("lock").wanted.clear();
        n.state.write().expect("lock").needed = false;
        assert!(!n.want(&["stun:192.168.50.2:3478".to_string()]));
        assert!(n.want(&server_url));
        assert!(!n.want(&server_url), "asked once");
        *n.state.write().expect("lock") = State {
            ipv4_route: false,
            ipv4_nets: vec!["192.168.50.0/24".parse().expect("net")],
            wanted: vec![Ipv4Addr::new(203, 0, 113, 10)],
            needed: true,
            discovered: None,
            error: "ipv4only.arpa has no IPv6 address at the resolver: it does no DNS64".into(),
        };
        assert_eq!(n.unreachable_ipv4("http://127.0.0.1:8080"), None);
        assert_eq!(n.unreachable_ipv4("http://192.168.50.2:8080"), None);
        assert_eq!(n.dial(server), server);
        let why = n
            .unreachable_ipv4("http://203.0.113.10:443")
            .expect("unreachable");
        assert!(
            why.contains("IPv6-only uplink") && why.contains("--nat64-prefix"),
            "{why}"
        );
        assert!(n
            .status()
            .expect("status")
            .line()
            .contains("no NAT64 prefix"));
        // Discovered.
        n.state.write().expect("lock").discovered = Some(p);
        assert_eq!(
            n.dial(server).to_string(),
            "[2001:db8:64:ff9b::cb00:710a]:3478"
        );
        assert_eq!(
            n.status().expect("status").line(),
            "IPv6-only uplink, NAT64 prefix 2001:db8:64:ff9b::/96 (discovered)"
        );
        // A LAN address is dialled as it is, even with a prefix.
        let lan: SocketAddr = "192.168.50.2:53".parse().expect("a");
        assert_eq!(n.dial(lan), lan);
        assert_eq!(n.url("http://127.0.0.1:1"), "http://127.0.0.1:1");
        let mut relay = pb::RelayConfig {
            stun_probe_urls: vec!["stun:203.0.113.10:3479".into()],
            ..Default::default()
        };
        n.relay(&mut relay);
        assert_eq!(
            relay.stun_probe_urls[0],
            "stun:[2001:db8:64:ff9b::cb00:710a]:3479"
        );
        assert_eq!(
            n.outside_url("http://[2001:db8:64:ff9b::cb00:710a]:443"),
            "http://203.0.113.10:443"
        );
        assert_eq!(
            n.outside_url("http://[2001:db8::1]:443"),
            "http://[2001:db8::1]:443"
        );
        // Configured, and different from the network's: both named.
        let c = Nat64::new(Setting::Prefix("64:ff9b::/96".parse().expect("p")), "tern0");
        *c.state.write().expect("lock") = State {
            ipv4_route: false,
            ipv4_nets: vec![],
            wanted: vec![Ipv4Addr::new(203, 0, 113, 10)],
            needed: true,
            discovered: Some(p),
            error: String::new(),
        };
        assert_eq!(c.dial(server).to_string(), "[64:ff9b::cb00:710a]:3478");
        let line = c.status().expect("status").line();
        assert!(
            line.contains("64:ff9b::/96 (configured)")
                && line.contains("the network announces 2001:db8:64:ff9b::/96"),
            "{line}"
        );
    }
}
