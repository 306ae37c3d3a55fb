//! Why a pair runs through a relay, told from facts of both sides rather than guessed on one:
//! each agent measures its own [`Reach`] (the address families it has a route for, how its NAT
//! maps, whether a STUN server saw a public address) and sends it to the peer at the start of
//! every ICE session. [`relay_cause`] turns the two into a cause that is true of one side (or of
//! both), in words and as a stable code, instead of "run `tern diagnose` on the peer".

/// How this host's NAT maps one local UDP port (RFC 4787 §4.1), from two STUN servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mapping {
    /// Not measured (one STUN server, or none answered).
    #[default]
    Unknown,
    /// One public address for every destination (a full cone, port-preserving masquerade, or no
    /// NAT at all): a peer can reach the address a STUN server saw.
    EndpointIndependent,
    /// A new public port per destination ("symmetric"): the address a STUN server saw is of no
    /// use to a peer.
    EndpointDependent,
}

/// What one agent knows of its own reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reach {
    /// The host has a default route of this family (not through the tunnel).
    pub ipv4: bool,
    pub ipv6: bool,
    pub mapping: Mapping,
    /// A STUN server answered: the host has a public address it can tell the peer.
    pub public: bool,
}

fn families(r: &Reach) -> &'static str {
    match (r.ipv4, r.ipv6) {
        (true, true) => "IPv4 and IPv6",
        (true, false) => "IPv4 only",
        (false, true) => "IPv6 only",
        (false, false) => "no default route",
    }
}

/// Why a pair between `here` and `peer` could not go direct: (code, words). The code is one of
/// `no_common_family`, `no_public_address_here`, `no_public_address_peer`, `nat_symmetric_both`,
/// `nat_symmetric_here`, `nat_symmetric_peer`, or `ice_no_direct_pair` when neither side's facts
/// explain it (or the peer did not report them).
pub fn relay_cause(here: &Reach, peer: Option<&Reach>) -> (&'static str, String) {
    let Some(peer) = peer else {
        return (
            "ice_no_direct_pair",
            "no direct pair got through the NATs (the peer did not report its side: an older agent)"
                .into(),
        );
    };
    if !(here.ipv4 && peer.ipv4 || here.ipv6 && peer.ipv6) {
        return (
            "no_common_family",
            format!(
                "no address family in common: this host has {}, the peer {}; a direct path needs both on one family",
                families(here),
                families(peer)
            ),
        );
    }
    if !here.public {
        return (
            "no_public_address_here",
            "no STUN server answered this host over UDP, so the peer has no public address of it to reach".into(),
        );
    }
    if !peer.public {
        return (
            "no_public_address_peer",
            "no STUN server answered the peer over UDP, so it has no public address to offer"
                .into(),
        );
    }
    use Mapping::EndpointDependent as Dep;
    match (here.mapping, peer.mapping) {
        (Dep, Dep) => (
            "nat_symmetric_both",
            "both NATs give a new public port per destination (symmetric), so neither side can reach the other's".into(),
        ),
        (Dep, _) => (
            "nat_symmetric_here",
            "this host's NAT gives a new public port per destination (symmetric), and the peer's NAT admits only replies".into(),
        ),
        (_, Dep) => (
            "nat_symmetric_peer",
            "the peer's NAT gives a new public port per destination (symmetric), and this host's NAT admits only replies".into(),
        ),
        _ => (
            "ice_no_direct_pair",
            "no direct pair got through although both NATs keep one public port per host: a firewall on one side filters UDP between them".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(v4: bool, v6: bool, mapping: Mapping) -> Reach {
        Reach {
            ipv4: v4,
            ipv6: v6,
            mapping,
            public: true,
        }
    }

    #[test]
    fn each_side_names_a_cause_that_is_true_of_one_side() {
        use Mapping::*;
        let gw = reach(false, true, EndpointIndependent);
        let laptop = reach(true, false, EndpointDependent);
        for (a, b) in [(gw, laptop), (laptop, gw)] {
            let (code, words) = relay_cause(&a, Some(&b));
            assert_eq!(code, "no_common_family");
            assert!(
                words.contains("IPv6 only") && words.contains("IPv4 only"),
                "{words}"
            );
        }
        let easy = reach(true, false, EndpointIndependent);
        let hard = reach(true, false, EndpointDependent);
        assert_eq!(relay_cause(&hard, Some(&easy)).0, "nat_symmetric_here");
        assert_eq!(relay_cause(&easy, Some(&hard)).0, "nat_symmetric_peer");
        assert_eq!(relay_cause(&hard, Some(&hard)).0, "nat_symmetric_both");
        // The same two sides agree on the cause, each from its own point of view.
        assert!(relay_cause(&easy, Some(&hard))
            .1
            .starts_with("the peer's NAT"));
        assert!(relay_cause(&hard, Some(&easy))
            .1
            .starts_with("this host's NAT"));
        let dual = reach(true, true, Unknown);
        assert_eq!(relay_cause(&dual, Some(&gw)).0, "ice_no_direct_pair");
        let silent = Reach {
            public: false,
            ..easy
        };
        assert_eq!(
            relay_cause(&silent, Some(&easy)).0,
            "no_public_address_here"
        );
        assert_eq!(
            relay_cause(&easy, Some(&silent)).0,
            "no_public_address_peer"
        );
        let (code, words) = relay_cause(&easy, None);
        assert_eq!(code, "ice_no_direct_pair");
        assert!(words.contains("older agent"), "{words}");
    }
}
