//! The agent's own stateful filter for packets that arrive through the tunnel (so enforcement does
//! not depend on the host firewall). A new inbound flow passes only if an inbound rule from the
//! network map allows it (source, protocol, destination port, and — on a routing peer — the routed
//! network); replies to flows this host opened pass; everything else is dropped and counted.
//! ICMP errors (unreachable, packet too big, time exceeded) pass when the packet they quote
//! belongs to a flow this side sent (as conntrack's RELATED): PMTU discovery needs them, and a
//! peer cannot use them to reach anything else.
//! Pure: the caller passes `now`, so tests are deterministic.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// IP protocol numbers the rules name.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// Idle lifetime of a tracked flow.
const FLOW_IDLE: Duration = Duration::from_secs(300);
/// Most flows tracked; past it, idle ones go first, then the oldest half.
const MAX_FLOWS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub src: IpNet,
    /// 0 = any.
    pub proto: u8,
    pub ports: Vec<(u16, u16)>,
    /// Routed network the rule opens; None = this host's own address.
    pub network: Option<IpNet>,
}

/// The five-tuple of a packet, from the point of view of this host: (proto, local, local port,
/// remote, remote port). ICMP echo uses its identifier as the local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Flow {
    proto: u8,
    local: IpAddr,
    lport: u16,
    remote: IpAddr,
    rport: u16,
}

/// Parsed header fields: (proto, src, dst, sport, dport, icmp error?).
fn parse(pkt: &[u8]) -> Option<(u8, IpAddr, IpAddr, u16, u16, bool)> {
    let (proto, src, dst, l4) = match pkt.first()? >> 4 {
        4 => {
            let ihl = ((pkt[0] & 0x0f) as usize) * 4;
            if pkt.len() < 20 || ihl < 20 || pkt.len() < ihl {
                return None;
            }
            let frag_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
            let src = IpAddr::from(<[u8; 4]>::try_from(&pkt[12..16]).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(&pkt[16..20]).ok()?);
            if frag_offset != 0 {
                // Non-first fragments carry no ports: judged as the flow's first fragment was
                // (tracked as port 0 both ways).
                return Some((pkt[9], src, dst, 0, 0, false));
            }
            (pkt[9], src, dst, &pkt[ihl..])
        }
        6 => {
            if pkt.len() < 40 {
                return None;
            }
            let src = IpAddr::from(<[u8; 16]>::try_from(&pkt[8..24]).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(&pkt[24..40]).ok()?);
            (pkt[6], src, dst, &pkt[40..])
        }
        _ => return None,
    };
    match proto {
        TCP | UDP if l4.len() >= 4 => Some((
            proto,
            src,
            dst,
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
            false,
        )),
        ICMP | ICMPV6 if l4.len() >= 8 => {
            let t = l4[0];
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            let error = if proto == ICMP {
                matches!(t, 3 | 11 | 12)
            } else {
                t < 128
            };
            Some((ICMP, src, dst, id, id, error))
        }
        _ => Some((proto, src, dst, 0, 0, false)),
    }
}

/// The flow of the packet an ICMP error quotes (a packet this side sent, seen from here).
fn quoted_flow(pkt: &[u8]) -> Option<Flow> {
    let icmp_at = match pkt.first()? >> 4 {
        4 => ((pkt[0] & 0x0f) as usize) * 4,
        _ => 40,
    };
    let quoted = pkt.get(icmp_at + 8..)?;
    let (proto, src, dst, sport, dport, _) = parse(quoted)?;
    Some(Flow {
        proto,
        local: src,
        lport: sport,
        remote: dst,
        rport: dport,
    })
}

#[derive(Default)]
pub struct Firewall {
    rules: Vec<Rule>,
    /// Outbound rules (`src` is the destination peer; what the peer's own filter lets in), by
    /// host address for one lookup per packet, and the few wider ones.
    out_hosts: HashMap<IpAddr, Vec<Rule>>,
    out_wide: Vec<Rule>,
    /// Flows this host opened that no outbound rule allows (every packet of them is counted).
    refused_out: HashMap<Flow, Instant>,
    local: Option<IpAddr>,
    /// Tracked flows: when last seen, and whether the peer opened it (an inbound rule let it
    /// in; such a flow lasts only while a rule still allows it).
    flows: HashMap<Flow, (Instant, bool)>,
    pub dropped: u64,
}

impl Firewall {
    /// New inbound rules. Flows a peer opened that no rule allows any more end now (a revoked
    /// policy must not leave its connections open); flows this host opened stay.
    pub fn set_rules(&mut self, local: Option<IpAddr>, rules: Vec<Rule>) {
        self.local = local;
        self.rules = rules;
        let mut flows = std::mem::take(&mut self.flows);
        flows.retain(|f, (_, by_peer)| {
            !*by_peer || self.admits(f.proto, f.remote, f.local, f.lport)
        });
        self.flows = flows;
    }

    /// Whether an inbound rule lets `src` open a flow of `proto` to `dst`:`dport`.
    fn admits(&self, proto: u8, src: IpAddr, dst: IpAddr, dport: u16) -> bool {
        let to_me = self.local == Some(dst);
        self.rules.iter().any(|r| {
            r.src.contains(&src)
                && match r.network {
                    None => to_me,
                    Some(n) => n.contains(&dst),
                }
                && (r.proto == 0 || r.proto == proto)
                && (r.ports.is_empty()
                    || ((proto == TCP || proto == UDP)
                        && r.ports.iter().any(|(a, b)| (*a..=*b).contains(&dport))))
        })
    }

    fn fresh(&self, f: &Flow, now: Instant) -> bool {
        self.flows
            .get(f)
            .is_some_and(|(seen, _)| now.saturating_duration_since(*seen) < FLOW_IDLE)
    }

    /// What the peers' filters let this host open (the map's outbound rules).
    pub fn set_out_rules(&mut self, rules: Vec<Rule>) {
        self.out_hosts.clear();
        self.out_wide.clear();
        for r in rules {
            if r.src.prefix_len() == r.src.max_prefix_len() {
                self.out_hosts.entry(r.src.addr()).or_default().push(r);
            } else {
                self.out_wide.push(r);
            }
        }
        self.refused_out.clear();
    }

    /// A packet from the TUN device (leaving through the tunnel): remember its flow. Returns
    /// false when it opens a flow to a peer (`to_peer`) that no outbound rule allows: the peer's
    /// filter will drop it (a reply to a flow the peer opened, or a flow already under way,
    /// is fine).
    pub fn outbound(&mut self, pkt: &[u8], now: Instant, to_peer: bool) -> bool {
        let Some((proto, src, dst, sport, dport, error)) = parse(pkt) else {
            return true;
        };
        if error {
            return true;
        }
        let flow = Flow {
            proto,
            local: src,
            lport: sport,
            remote: dst,
            rport: dport,
        };
        if !self.refused_out.is_empty() {
            if let Some(seen) = self.refused_out.get_mut(&flow) {
                *seen = now;
                self.track(flow, now, false);
                return false;
            }
        }
        // Cheapest first: most packets are allowed by a rule (a few comparisons); only then the
        // flow table (a reply to a flow the peer opened, or one under way).
        let opens = |r: &Rule| {
            r.src.contains(&dst)
                && (r.proto == 0 || r.proto == proto)
                && (r.ports.is_empty()
                    || ((proto == TCP || proto == UDP)
                        && r.ports.iter().any(|(a, b)| (*a..=*b).contains(&dport))))
        };
        let allowed = !to_peer
            || self
                .out_hosts
                .get(&dst)
                .is_some_and(|rs| rs.iter().any(opens))
            || self.out_wide.iter().any(opens)
            || self.fresh(&flow, now);
        if !allowed {
            if self.refused_out.len() >= 4096 {
                self.refused_out
                    .retain(|_, t| now.saturating_duration_since(*t) < FLOW_IDLE);
                if self.refused_out.len() >= 4096 {
                    self.refused_out.clear();
                }
            }
            self.refused_out.insert(flow, now);
        }
        // Tracked either way: replies (should a policy open the flow later) still pass.
        self.track(flow, now, false);
        allowed
    }

    /// A decapsulated packet about to enter this host: true if it may pass. `via_sender` says
    /// whether an address is reached through the peer that sent the packet (an ICMP error about
    /// a flow must come from the peer that flow goes to: from another, it would be a way in).
    pub fn inbound(
        &mut self,
        pkt: &[u8],
        now: Instant,
        via_sender: impl Fn(IpAddr) -> bool,
    ) -> bool {
        let Some((proto, src, dst, sport, dport, error)) = parse(pkt) else {
            self.dropped += 1;
            return false;
        };
        if error {
            // It must quote a flow this side sent (recently), be addressed to that flow's
            // sender (this host, or a host on a network it serves), not to anyone else here, and
            // come from the peer the flow goes to.
            let related = quoted_flow(pkt)
                .is_some_and(|f| f.local == dst && via_sender(f.remote) && self.fresh(&f, now));
            if !related {
                self.dropped += 1;
            }
            return related;
        }
        let flow = Flow {
            proto,
            local: dst,
            lport: dport,
            remote: src,
            rport: sport,
        };
        if let Some((seen, _)) = self.flows.get_mut(&flow) {
            if now.saturating_duration_since(*seen) < FLOW_IDLE {
                *seen = now;
                return true;
            }
        }
        let allowed = self.admits(proto, src, dst, dport);
        if allowed {
            self.track(flow, now, true);
        } else {
            self.dropped += 1;
        }
        allowed
    }

    /// Remembers flow `f` as seen at `now`; a new one as opened by the peer (`by_peer`) or by
    /// this host (an existing flow keeps who opened it).
    fn track(&mut self, f: Flow, now: Instant, by_peer: bool) {
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&f) {
            self.flows
                .retain(|_, (t, _)| now.saturating_duration_since(*t) < FLOW_IDLE);
            if self.flows.len() >= MAX_FLOWS {
                let mut ages: Vec<Instant> = self.flows.values().map(|(t, _)| *t).collect();
                ages.sort();
                let cutoff = ages[ages.len() / 2];
                self.flows.retain(|_, (t, _)| *t > cutoff);
            }
        }
        self.flows
            .entry(f)
            .and_modify(|(t, _)| *t = now)
            .or_insert((now, by_peer));
    }

    #[cfg(test)]
    pub fn flows(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every address is reached through the sending peer (one peer in these tests).
    fn any(_: IpAddr) -> bool {
        true
    }

    #[test]
    fn flows_no_outbound_rule_allows_are_told_apart_from_replies() {
        let t = Instant::now();
        let mut f = Firewall::default();
        f.set_rules(
            Some("100.64.0.1".parse().expect("ip")),
            vec![Rule {
                src: "100.64.0.2/32".parse().expect("net"),
                proto: TCP,
                ports: vec![(22, 22)],
                network: None,
            }],
        );
        f.set_out_rules(vec![Rule {
            src: "100.64.0.3/32".parse().expect("net"),
            proto: UDP,
            ports: vec![(53, 53)],
            network: None,
        }]);
        // 100.64.0.2 may open SSH to us; our replies are fine, our own new flows to it are not.
        assert!(f.inbound(
            &v4(TCP, [100, 64, 0, 2], [100, 64, 0, 1], 40000, 22),
            t,
            any
        ));
        assert!(f.outbound(
            &v4(TCP, [100, 64, 0, 1], [100, 64, 0, 2], 22, 40000),
            t,
            true
        ));
        assert!(!f.outbound(
            &v4(TCP, [100, 64, 0, 1], [100, 64, 0, 2], 5000, 80),
            t,
            true
        ));
        assert!(
            !f.outbound(
                &v4(TCP, [100, 64, 0, 1], [100, 64, 0, 2], 5000, 80),
                t,
                true
            ),
            "every packet of a refused flow counts"
        );
        // To 100.64.0.3 only UDP 53.
        assert!(f.outbound(
            &v4(UDP, [100, 64, 0, 1], [100, 64, 0, 3], 5000, 53),
            t,
            true
        ));
        assert!(!f.outbound(
            &v4(UDP, [100, 64, 0, 1], [100, 64, 0, 3], 5000, 54),
            t,
            true
        ));
        // Not to a peer's own address (a routed network): not judged here.
        assert!(f.outbound(
            &v4(TCP, [100, 64, 0, 1], [192, 168, 50, 10], 5000, 80),
            t,
            false
        ));
    }

    fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn icmp(src: [u8; 4], dst: [u8; 4], typ: u8, id: u16) -> Vec<u8> {
        let mut p = v4(ICMP, src, dst, 0, 0);
        p[20] = typ;
        p[24..26].copy_from_slice(&id.to_be_bytes());
        p
    }

    const ME: [u8; 4] = [100, 64, 0, 1];
    const LAPTOP: [u8; 4] = [100, 64, 0, 2];
    const OTHER: [u8; 4] = [100, 64, 0, 3];

    fn ssh_only() -> Firewall {
        let mut f = Firewall::default();
        f.set_rules(
            Some(IpAddr::from(ME)),
            vec![Rule {
                src: "100.64.0.2/32".parse().expect("net"),
                proto: TCP,
                ports: vec![(22, 22)],
                network: None,
            }],
        );
        f
    }

    #[test]
    fn only_the_allowed_port_opens_new_flows() {
        let mut f = ssh_only();
        let t = Instant::now();
        assert!(
            f.inbound(&v4(TCP, LAPTOP, ME, 40000, 22), t, any),
            "ssh from laptop"
        );
        assert!(
            !f.inbound(&v4(TCP, LAPTOP, ME, 40000, 80), t, any),
            "other port"
        );
        assert!(
            !f.inbound(&v4(UDP, LAPTOP, ME, 40000, 22), t, any),
            "other protocol"
        );
        assert!(!f.inbound(&icmp(LAPTOP, ME, 8, 7), t, any), "ping");
        assert!(
            !f.inbound(&v4(TCP, OTHER, ME, 40000, 22), t, any),
            "other peer"
        );
        assert_eq!(f.dropped, 4);
    }

    #[test]
    fn replies_to_our_own_flows_pass_and_expire() {
        let mut f = ssh_only();
        let t = Instant::now();
        f.outbound(&v4(TCP, ME, OTHER, 50000, 443), t, false);
        assert!(
            f.inbound(&v4(TCP, OTHER, ME, 443, 50000), t, any),
            "reply passes"
        );
        assert!(
            !f.inbound(&v4(TCP, OTHER, ME, 443, 50001), t, any),
            "not our flow"
        );
        f.outbound(&icmp(ME, OTHER, 8, 99), t, false);
        assert!(f.inbound(&icmp(OTHER, ME, 0, 99), t, any), "echo reply");
        assert!(
            !f.inbound(
                &v4(TCP, OTHER, ME, 443, 50000),
                t + FLOW_IDLE + Duration::from_secs(1),
                any
            ),
            "idle flow expired"
        );
    }

    #[test]
    fn routed_networks_and_icmp_errors() {
        let mut f = Firewall::default();
        f.set_rules(
            Some(IpAddr::from(ME)),
            vec![Rule {
                src: "100.64.0.0/10".parse().expect("net"),
                proto: 0,
                ports: vec![],
                network: Some("192.168.50.0/24".parse().expect("net")),
            }],
        );
        let t = Instant::now();
        assert!(
            f.inbound(&v4(TCP, LAPTOP, [192, 168, 50, 10], 1, 22), t, any),
            "into the routed LAN"
        );
        assert!(
            !f.inbound(&v4(TCP, LAPTOP, ME, 1, 22), t, any),
            "the rule opens the LAN, not this host"
        );
        assert!(
            !f.inbound(&icmp(LAPTOP, ME, 3, 0), t, any),
            "an ICMP error about nothing this host sent is dropped"
        );
        // An ICMP "fragmentation needed" quoting a packet this host sent passes (PMTU).
        let sent = v4(TCP, ME, [192, 168, 50, 10], 40000, 502);
        f.outbound(&sent, t, false);
        let mut err = icmp([192, 168, 50, 1], ME, 3, 0);
        err[21] = 4;
        err.truncate(28); // IP header + ICMP header, then the quoted packet
        err.extend_from_slice(&sent[..28]);
        assert!(f.inbound(&err, t, any), "related to our own flow");
        let other = v4(TCP, ME, [192, 168, 50, 10], 40001, 502);
        let mut forged = icmp([192, 168, 50, 1], ME, 3, 0);
        forged.truncate(28);
        forged.extend_from_slice(&other[..28]);
        assert!(
            !f.inbound(&forged, t, any),
            "quoting a flow this host never sent"
        );
        // Quoting our flow but addressed to another host (here a LAN host): dropped.
        let mut misaddressed = icmp([192, 168, 50, 1], [192, 168, 50, 20], 3, 0);
        misaddressed.truncate(28);
        misaddressed.extend_from_slice(&sent[..28]);
        assert!(
            !f.inbound(&misaddressed, t, any),
            "an ICMP error goes to the sender of the flow it quotes"
        );
        assert!(!f.inbound(&[0x45, 0, 0], t, any), "truncated");
    }

    #[test]
    fn flow_table_is_bounded() {
        let mut f = ssh_only();
        let t = Instant::now();
        for i in 0..(MAX_FLOWS as u32 + 5000) {
            let port = (i % 60000) as u16 + 1;
            let host = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            f.outbound(
                &v4(UDP, ME, host, port, 53),
                t + Duration::from_micros(i as u64),
                false,
            );
        }
        assert!(f.flows() <= MAX_FLOWS);
    }

    /// Security review, round two, item 6: a policy revoked while a connection it let in is open
    /// ends that connection (its packets are dropped from then on); flows this host opened stay.
    #[test]
    fn revoking_the_rule_that_let_a_flow_in_ends_it() {
        let t = Instant::now();
        let mut f = Firewall::default();
        let me: IpAddr = "100.64.0.1".parse().expect("ip");
        let ssh = Rule {
            src: "100.64.0.2/32".parse().expect("net"),
            proto: TCP,
            ports: vec![(22, 22)],
            network: None,
        };
        f.set_rules(Some(me), vec![ssh]);
        assert!(f.inbound(
            &v4(TCP, [100, 64, 0, 2], [100, 64, 0, 1], 40000, 22),
            t,
            any
        ));
        // This host's own connection to the peer.
        f.outbound(
            &v4(TCP, [100, 64, 0, 1], [100, 64, 0, 2], 50000, 443),
            t,
            false,
        );
        f.set_rules(Some(me), vec![]);
        assert!(
            !f.inbound(
                &v4(TCP, [100, 64, 0, 2], [100, 64, 0, 1], 40000, 22),
                t,
                any
            ),
            "the peer's flow ended with its rule"
        );
        assert!(
            f.inbound(
                &v4(TCP, [100, 64, 0, 2], [100, 64, 0, 1], 443, 50000),
                t,
                any
            ),
            "replies to this host's own flow still pass"
        );
    }

    /// Security review, round two, item 9: an ICMP error about this host's flow with one peer is
    /// taken only from that peer, not from another (allowed only tcp/22) forging it.
    #[test]
    fn icmp_errors_about_a_flow_come_only_from_the_peer_it_goes_to() {
        let t = Instant::now();
        let mut f = Firewall::default();
        f.set_rules(Some(ME.into()), vec![]);
        // This host (B) talks to a third peer at 100.64.0.7.
        let to_third = v4(TCP, ME, [100, 64, 0, 7], 40001, 443);
        f.outbound(&to_third, t, false);
        let mut err = icmp([100, 64, 0, 7], ME, 3, 4);
        err.truncate(28);
        err.extend_from_slice(&to_third[..28]);
        let third: IpAddr = "100.64.0.7".parse().expect("ip");
        assert!(
            f.inbound(&err, t, |ip| ip == third),
            "from the peer the flow goes to"
        );
        // The same error sent by the laptop (another peer, whose addresses exclude 100.64.0.7).
        assert!(
            !f.inbound(&err, t, |ip| ip != third),
            "from another peer it is dropped"
        );
    }
}
