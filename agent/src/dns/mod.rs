//! Names instead of numbers: the agent answers `<peer>.<domain>` itself (from the network map),
//! sends queries for nameserver groups' domains to their nameservers inside the network, and
//! everything else to the host's usual nameservers; and it points the host at itself for those
//! names (systemd-resolved split DNS when present, else /etc/resolv.conf, restored on `tern down`
//! and after a crash).

pub mod host;
pub mod server;
pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use tern_proto::management as pb;

/// How names resolve on this host, for `tern status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// "off" (`--no-dns`), "waiting" (for the map), "on" or "failed".
    pub state: String,
    /// Where the agent answers, e.g. "100.64.0.2:53".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resolver: String,
    /// How the host is pointed at it: "systemd-resolved" or "resolv.conf".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Names the agent answers or routes: the peers' domain and nameserver groups' domains.
    #[serde(default)]
    pub domains: Vec<String>,
    /// What went wrong, when state is "failed" (or the host could not be pointed at us).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Nameservers of the map this host may not query (no policy lets DNS through), in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<String>,
}

impl Status {
    /// One line for `tern status`.
    pub fn line(&self) -> String {
        match self.state.as_str() {
            "on" if self.error.is_empty() => format!(
                "DNS: {} answered at {} (host set up through {})",
                self.domains.join(", "),
                self.resolver,
                self.host
            ),
            "on" => format!(
                "DNS: {} answered at {}, but the host is not pointed at it: {}",
                self.domains.join(", "),
                self.resolver,
                self.error
            ),
            "failed" => format!("DNS: off: {}", self.error),
            "waiting" => "DNS: waiting for the network map".to_string(),
            _ => "DNS: off (--no-dns): peer names do not resolve on this host".to_string(),
        }
    }
}

/// What the resolver knows, from the map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// e.g. "tern.internal" (lower case, no trailing dot); empty = no peer names.
    pub domain: String,
    /// Peer label -> address.
    pub records: HashMap<String, IpAddr>,
    /// (domains, nameservers) per nameserver group.
    pub groups: Vec<(Vec<String>, Vec<SocketAddr>)>,
}

impl Config {
    pub fn from_map(d: &pb::DnsConfig) -> Config {
        let records = d
            .records
            .iter()
            .filter_map(|r| Some((r.name.to_ascii_lowercase(), r.ip.parse().ok()?)))
            .collect();
        let groups = d
            .nameservers
            .iter()
            .map(|g| {
                let servers = g
                    .servers
                    .iter()
                    .filter_map(|s| {
                        s.parse::<SocketAddr>()
                            .ok()
                            .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
                    })
                    .collect();
                let domains = g.domains.iter().map(|x| x.to_ascii_lowercase()).collect();
                (domains, servers)
            })
            .collect();
        Config {
            domain: d.domain.trim_end_matches('.').to_ascii_lowercase(),
            records,
            groups,
        }
    }

    /// The domains the host should send to us (the peers' domain and the groups').
    pub fn routed_domains(&self) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(self.domain.clone())
            .filter(|d| !d.is_empty())
            .chain(self.groups.iter().flat_map(|g| g.0.iter().cloned()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// The nameservers of `cfg`'s groups this host may not query through the tunnel, each in words:
/// those at a peer's overlay address or inside a routed network where no policy lets this host
/// send DNS (UDP to their port), and those in the `overlay` range at no peer of this host's map
/// (no policy connects it with them at all). `peers`: (overlay address, what the policies let
/// this host send it); `routes`: (routed network, what this host may reach in it). Nameservers
/// outside the tunnel are the host's business, not the policies'.
pub fn blocked_nameservers(
    cfg: &Config,
    peers: &[(IpAddr, String)],
    routes: &[(ipnet::IpNet, String)],
    overlay: Option<&ipnet::IpNet>,
) -> Vec<String> {
    let mut out = vec![];
    for (domains, servers) in &cfg.groups {
        for s in servers {
            let (access, place) = match peers.iter().find(|(ip, _)| *ip == s.ip()) {
                Some((_, a)) => (a.as_str(), "to it".to_string()),
                None => match routes
                    .iter()
                    .filter(|(n, _)| n.contains(&s.ip()))
                    .max_by_key(|(n, _)| n.prefix_len())
                {
                    Some((n, a)) => (a.as_str(), format!("into {n}")),
                    None if overlay.is_some_and(|o| o.contains(&s.ip())) => (
                        "none",
                        "to it (no policy connects this host with it)".to_string(),
                    ),
                    None => continue,
                },
            };
            if tern_proto::access_allows(access, "udp", s.port()) {
                continue;
            }
            let allowed = match access {
                "" | "none" => "nothing".to_string(),
                a => a.to_string(),
            };
            out.push(format!(
                "{} -> {s}: the policies do not let this host send DNS (udp {}) {place} (they allow {allowed}); queries for these names time out",
                domains.join(", "),
                s.port()
            ));
        }
    }
    out
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer it ourselves: rcode and addresses.
    Answer(u8, Vec<IpAddr>),
    /// Send it to these nameservers, in order.
    Forward(Vec<SocketAddr>),
}

fn under(name: &str, domain: &str) -> bool {
    name == domain || name.strip_suffix(domain).is_some_and(|p| p.ends_with('.'))
}

/// Where a query goes (a pure function of the configuration; `upstream` = the host's usual
/// nameservers).
pub fn decide(cfg: &Config, q: &wire::Query, upstream: &[SocketAddr]) -> Decision {
    use wire::*;
    if !cfg.domain.is_empty() && under(&q.name, &cfg.domain) {
        if opcode(q) != 0 {
            return Decision::Answer(RCODE_NOTIMP, vec![]);
        }
        let label = q
            .name
            .strip_suffix(&cfg.domain)
            .map(|p| p.trim_end_matches('.'))
            .unwrap_or("");
        let Some(ip) = cfg.records.get(label).filter(|_| !label.is_empty()) else {
            // The domain itself exists (no addresses); any other name under it does not.
            let rcode = if label.is_empty() {
                RCODE_OK
            } else {
                RCODE_NXDOMAIN
            };
            return Decision::Answer(rcode, vec![]);
        };
        let fits = match q.qtype {
            TYPE_A => ip.is_ipv4(),
            TYPE_AAAA => ip.is_ipv6(),
            TYPE_ANY => true,
            _ => false,
        };
        let class_ok = q.qclass == CLASS_IN || q.qclass == 255;
        // A name that exists but has no record of this type: NOERROR without answers.
        return Decision::Answer(RCODE_OK, if fits && class_ok { vec![*ip] } else { vec![] });
    }
    // The most specific nameserver group whose domain contains the name.
    let best = cfg
        .groups
        .iter()
        .flat_map(|(domains, servers)| domains.iter().map(move |d| (d, servers)))
        .filter(|(d, s)| under(&q.name, d) && !s.is_empty())
        .max_by_key(|(d, _)| d.len());
    match best {
        Some((_, servers)) => Decision::Forward(servers.clone()),
        None if upstream.is_empty() => Decision::Answer(RCODE_SERVFAIL, vec![]),
        None => Decision::Forward(upstream.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;

    #[test]
    fn nameservers_no_policy_lets_dns_reach_are_named() {
        let cfg = Config {
            domain: "tern.internal".into(),
            records: HashMap::new(),
            groups: vec![
                (
                    vec!["factory.local".into()],
                    vec!["192.168.50.2:53".parse().expect("a")],
                ),
                (
                    vec!["office.lan".into()],
                    vec!["100.64.0.9:5353".parse().expect("a")],
                ),
                (
                    vec!["home.arpa".into()],
                    vec!["10.0.0.1:53".parse().expect("a")],
                ),
            ],
        };
        let routes = vec![(
            "192.168.50.0/24".parse().expect("net"),
            "tcp 502, 80".to_string(),
        )];
        let peers = vec![("100.64.0.9".parse().expect("ip"), "udp 5353".to_string())];
        let overlay: ipnet::IpNet = "100.64.0.0/10".parse().expect("net");
        let b = blocked_nameservers(&cfg, &peers, &routes, Some(&overlay));
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(
            b[0],
            "factory.local -> 192.168.50.2:53: the policies do not let this host send DNS (udp 53) into 192.168.50.0/24 (they allow tcp 502, 80); queries for these names time out"
        );
        // Allowed once a policy opens udp 53 there.
        let routes = vec![(
            "192.168.50.0/24".parse().expect("net"),
            "tcp 502, 80; udp 53".to_string(),
        )];
        assert!(blocked_nameservers(&cfg, &peers, &routes, Some(&overlay)).is_empty());
        // A nameserver at a peer that is not in this host's map at all.
        let b = blocked_nameservers(&cfg, &[], &routes, Some(&overlay));
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].starts_with("office.lan -> 100.64.0.9:5353: the policies do not let this host send DNS (udp 5353) to it (no policy connects this host with it)"),
            "{b:?}"
        );
    }

    fn cfg() -> Config {
        let mut c = Config {
            domain: "tern.internal".into(),
            ..Default::default()
        };
        c.records
            .insert("home-b".into(), "100.64.0.3".parse().expect("ip"));
        c.groups.push((
            vec!["factory.local".into()],
            vec!["192.168.50.2:53".parse().expect("addr")],
        ));
        c.groups.push((
            vec!["plc.factory.local".into()],
            vec!["192.168.50.3:53".parse().expect("addr")],
        ));
        c
    }

    fn q(name: &str, t: u16) -> Query {
        parse_query(&build_query(7, name, t)).expect("query")
    }

    #[test]
    fn peers_are_answered_and_everything_else_goes_where_it_belongs() {
        let c = cfg();
        let up: Vec<SocketAddr> = vec!["203.0.113.53:53".parse().expect("addr")];
        let ip: IpAddr = "100.64.0.3".parse().expect("ip");
        assert_eq!(
            decide(&c, &q("home-b.tern.internal", TYPE_A), &up),
            Decision::Answer(RCODE_OK, vec![ip])
        );
        assert_eq!(
            decide(&c, &q("HOME-B.tern.internal.", TYPE_A), &up),
            Decision::Answer(RCODE_OK, vec![ip])
        );
        assert_eq!(
            decide(&c, &q("home-b.tern.internal", TYPE_AAAA), &up),
            Decision::Answer(RCODE_OK, vec![]),
            "NODATA, not NXDOMAIN"
        );
        assert_eq!(
            decide(&c, &q("gone.tern.internal", TYPE_A), &up),
            Decision::Answer(RCODE_NXDOMAIN, vec![])
        );
        assert_eq!(
            decide(&c, &q("x.home-b.tern.internal", TYPE_A), &up),
            Decision::Answer(RCODE_NXDOMAIN, vec![])
        );
        assert_eq!(
            decide(&c, &q("tern.internal", TYPE_A), &up),
            Decision::Answer(RCODE_OK, vec![])
        );
        assert_eq!(
            decide(&c, &q("notern.internal", TYPE_A), &up),
            Decision::Forward(up.clone()),
            "a suffix is not a subdomain"
        );
        assert_eq!(
            decide(&c, &q("hmi.factory.local", TYPE_A), &up),
            Decision::Forward(vec!["192.168.50.2:53".parse().expect("a")])
        );
        assert_eq!(
            decide(&c, &q("plc.factory.local", TYPE_A), &up),
            Decision::Forward(vec!["192.168.50.3:53".parse().expect("a")]),
            "the most specific group"
        );
        assert_eq!(
            decide(&c, &q("example.com", TYPE_A), &up),
            Decision::Forward(up)
        );
        assert_eq!(
            decide(&c, &q("example.com", TYPE_A), &[]),
            Decision::Answer(RCODE_SERVFAIL, vec![])
        );
    }
}
