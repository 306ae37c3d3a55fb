//! The core with no root and no sockets: two (or more) `Node`s wired back to back through a
//! simulated wire, time passed in.

use rand::{Rng, RngCore};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tern_tunnel::firewall::{Rule, TCP, UDP};
use tern_tunnel::*;

const BUF: usize = 2048;

fn key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// An IPv4 packet with a UDP (or TCP) header and `payload`.
fn packet(proto: u8, src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (ip(src), ip(dst)) else {
        panic!("v4 only")
    };
    let l4 = if proto == TCP { 20 } else { 8 };
    let total = 20 + l4 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&s.octets());
    p[16..20].copy_from_slice(&d.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        p[32] = 5 << 4;
        p[33] = 0x02; // SYN
    } else {
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    }
    p[20 + l4..].copy_from_slice(payload);
    p
}

struct Side {
    node: Node,
    ip: &'static str,
    secret: [u8; 32],
}

fn spec(s: &Side, name: &str) -> PeerSpec {
    PeerSpec {
        key: s.node.public_key(),
        id: name.into(),
        name: name.into(),
        overlay_ip: ip(s.ip),
        allowed: vec![format!("{}/32", s.ip).parse().expect("net")],
        online: true,
        relay_only: false,
    }
}

fn allow_all_from(src: &str) -> Rule {
    Rule {
        src: format!("{src}/32").parse().expect("net"),
        proto: 0,
        ports: vec![],
        network: None,
    }
}

/// Two nodes that know each other, each allowing everything from the other, relay "up".
fn pair(now: Instant) -> (Side, Side) {
    let (ka, kb) = (key(), key());
    let mut a = Side {
        node: Node::new(ka),
        ip: "100.64.0.1",
        secret: ka,
    };
    let mut b = Side {
        node: Node::new(kb),
        ip: "100.64.0.2",
        secret: kb,
    };
    let (sa, sb) = (spec(&a, "a"), spec(&b, "b"));
    a.node.apply_peers(&[sb], now);
    b.node.apply_peers(&[sa], now);
    a.node.set_rules(Some(ip(a.ip)), vec![allow_all_from(b.ip)]);
    b.node.set_rules(Some(ip(b.ip)), vec![allow_all_from(a.ip)]);
    a.node.set_tcp_relay(true);
    b.node.set_tcp_relay(true);
    (a, b)
}

/// Delivers datagrams between the nodes until the wire is empty; returns the packets each side
/// wrote to its TUN device, and the errors decapsulation reported.
fn pump(
    sides: &mut [&mut Side],
    wire: &mut VecDeque<(usize, [u8; 32], Vec<u8>)>,
    now: Instant,
) -> (Vec<Vec<Vec<u8>>>, Vec<String>) {
    let mut tun = vec![vec![]; sides.len()];
    let mut errors = vec![];
    let mut buf = vec![0u8; BUF];
    let mut guard = 0;
    while let Some((to, from_key, d)) = wire.pop_front() {
        guard += 1;
        assert!(guard < 10_000, "the wire never settles");
        let from_idx = sides
            .iter()
            .position(|s| s.node.public_key() == from_key)
            .expect("sender");
        let me = sides[to].node.public_key();
        let Some(peer) = sides[to].node.peer_by_key(&from_key) else {
            continue;
        };
        match sides[to].node.decapsulate(peer, &d, now, &mut buf) {
            Ok(Decap::Tunnel(p)) => tun[to].push(p.to_vec()),
            Ok(Decap::Network(t)) => wire.push_back((from_idx, me, t.payload.to_vec())),
            Ok(Decap::Nothing) => {}
            Err(e) => errors.push(e.to_string()),
        }
        while let Some(t) = sides[to].node.poll_transmit(&mut buf) {
            let dest = sides
                .iter()
                .position(|s| {
                    s.node.peer_by_key(&me).is_some()
                        && Some(t.peer) == sides[to].node.peer_by_key(&s.node.public_key())
                })
                .expect("destination");
            wire.push_back((dest, me, t.payload.to_vec()));
        }
    }
    (tun, errors)
}

/// Encapsulates `pkt` on side `from` and puts what comes out on the wire towards `to`.
fn send(
    sides: &mut [&mut Side],
    from: usize,
    to: usize,
    pkt: &[u8],
    wire: &mut VecDeque<(usize, [u8; 32], Vec<u8>)>,
    now: Instant,
) -> Result<(), Error> {
    let mut buf = vec![0u8; BUF];
    let me = sides[from].node.public_key();
    if let Some(t) = sides[from].node.encapsulate(pkt, now, &mut buf)? {
        wire.push_back((to, me, t.payload.to_vec()));
    }
    Ok(())
}

#[test]
fn two_cores_handshake_and_carry_packets_both_ways() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let mut wire = VecDeque::new();
    let ping = packet(UDP, a.ip, b.ip, 4000, 5000, b"hello b");
    let mut sides = [&mut a, &mut b];
    send(&mut sides, 0, 1, &ping, &mut wire, now).expect("encapsulate");
    assert_eq!(wire.len(), 1, "a handshake initiation");
    assert_eq!(wire[0].2[0], 1, "message type 1");
    let (tun, errors) = pump(&mut sides, &mut wire, now);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        tun[1],
        vec![ping.clone()],
        "b received the queued packet after the handshake"
    );
    let pong = packet(UDP, b.ip, a.ip, 5000, 4000, b"hello a");
    let mut sides = [&mut a, &mut b];
    send(&mut sides, 1, 0, &pong, &mut wire, now).expect("encapsulate");
    assert_eq!(
        wire[0].2[0], 4,
        "data straight away on the established session"
    );
    let (tun, _) = pump(&mut sides, &mut wire, now);
    assert_eq!(tun[0], vec![pong]);
    let st = a.node.status(now);
    assert!(st[0].up && st[0].path == PathKind::TcpRelay, "{st:?}");
    assert!(st[0].rx_bytes > 0 && st[0].tx_bytes > 0);
}

#[test]
fn in_tunnel_probes_measure_the_path_whatever_the_policy_and_never_reach_the_tun() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    // b's policy lets nothing in from a: probes need no policy.
    b.node.set_rules(Some(ip(b.ip)), vec![]);
    let mut wire = VecDeque::new();
    let mut sides = [&mut a, &mut b];
    let ping = packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, b"x");
    send(&mut sides, 0, 1, &ping, &mut wire, now).expect("encapsulate");
    let (tun, _) = pump(&mut sides, &mut wire, now);
    assert!(tun[1].is_empty(), "the policy dropped the ordinary packet");
    assert_eq!(a.node.status(now)[0].loss, None, "nothing measured yet");
    // A tick: one probe each way is due; each is answered by the other core itself.
    let mut buf = vec![0u8; BUF];
    let t1 = now + Duration::from_millis(10);
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let mut sides = [&mut a, &mut b];
        sides[from].node.handle_timeout(t1);
        let me = sides[from].node.public_key();
        while let Some(t) = sides[from].node.poll_transmit(&mut buf) {
            wire.push_back((to, me, t.payload.to_vec()));
        }
        assert!(!wire.is_empty(), "a probe is sent");
        let (tun, errors) = pump(&mut sides, &mut wire, t1 + Duration::from_millis(30));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(
            tun.iter().all(Vec::is_empty),
            "probes never reach a TUN device: {tun:?}"
        );
    }
    for s in [&a, &b] {
        let st = &s.node.status(t1 + Duration::from_secs(4))[0];
        assert_eq!(st.rtt, Some(Duration::from_millis(30)), "{st:?}");
        assert_eq!(st.loss, Some((1, 0)));
    }
    // Not due again for 5 s; a probe that gets no answer counts as lost after 3 s.
    a.node.handle_timeout(t1 + Duration::from_secs(1));
    while a.node.poll_transmit(&mut buf).is_some() {}
    let t2 = t1 + probe::EVERY;
    a.node.handle_timeout(t2);
    let mut sent = 0;
    while a.node.poll_transmit(&mut buf).is_some() {
        sent += 1;
    }
    assert_eq!(sent, 1, "one probe, dropped on the floor");
    let st = &a.node.status(t2 + probe::TIMEOUT)[0];
    assert_eq!(st.loss, Some((2, 1)));
    // A new path (the relay went away): old figures describe another path and are forgotten.
    a.node.set_tcp_relay(false);
    assert_eq!(a.node.status(t2 + probe::TIMEOUT)[0].loss, None);
}

/// `b` lets in only TCP 22 from a (100.64.0.1).
fn ssh_from_a_only(b: &mut Side) {
    b.node.set_rules(
        Some(ip(b.ip)),
        vec![Rule {
            src: "100.64.0.1/32".parse().expect("net"),
            proto: TCP,
            ports: vec![(22, 22)],
            network: None,
        }],
    );
}

#[test]
fn sources_outside_the_peers_addresses_and_policy_refusals_are_dropped() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    // b lets in only TCP 22 from a.
    ssh_from_a_only(&mut b);
    let mut wire = VecDeque::new();
    let mut sides = [&mut a, &mut b];
    let ssh = packet(TCP, "100.64.0.1", "100.64.0.2", 40000, 22, b"");
    send(&mut sides, 0, 1, &ssh, &mut wire, now).expect("send");
    let (tun, errors) = pump(&mut sides, &mut wire, now);
    assert_eq!(tun[1].len(), 1, "TCP 22 passes: {errors:?}");
    for (pkt, why) in [
        (
            packet(UDP, "100.64.0.1", "100.64.0.2", 1, 53, b"q"),
            "policy",
        ),
        (
            packet(TCP, "100.64.0.1", "100.64.0.2", 40000, 80, b""),
            "policy",
        ),
        (
            packet(TCP, "10.9.9.9", "100.64.0.2", 40000, 22, b""),
            "not among",
        ),
    ] {
        send(&mut sides, 0, 1, &pkt, &mut wire, now).expect("send");
        let (tun, errors) = pump(&mut sides, &mut wire, now);
        assert!(tun[1].is_empty(), "dropped: {why}");
        assert!(errors.iter().any(|e| e.contains(why)), "{why}: {errors:?}");
    }
    assert_eq!(
        b.node.dropped(),
        (2, 1),
        "counted: (policy, not the sender's)"
    );
    // Nothing leaves for an address no peer owns.
    let mut buf = vec![0u8; BUF];
    assert!(matches!(
        a.node
            .encapsulate(&packet(UDP, a.ip, "100.64.9.9", 1, 2, b"x"), now, &mut buf),
        Err(Error::NoRoute(_))
    ));
}

#[test]
fn routed_networks_go_to_the_chosen_routing_peer_and_fail_over() {
    let now = Instant::now();
    let (mut a, mut gw1) = pair(now);
    let kc = key();
    let mut gw2 = Side {
        node: Node::new(kc),
        ip: "100.64.0.3",
        secret: kc,
    };
    let specs = [spec(&gw1, "gw1"), spec(&gw2, "gw2")];
    a.node.apply_peers(&specs, now);
    gw2.node.apply_peers(&[spec(&a, "a")], now);
    gw2.node
        .set_rules(Some(ip(gw2.ip)), vec![allow_all_from(a.ip)]);
    gw2.node.set_tcp_relay(true);
    let g1 = a.node.peer_by_mgmt_id("gw1").expect("gw1");
    let g2 = a.node.peer_by_mgmt_id("gw2").expect("gw2");
    let lan: ipnet::IpNet = "192.168.50.0/24".parse().expect("net");
    a.node.set_routes(vec![(lan, g1)], now);
    let mut buf = vec![0u8; BUF];
    let to_lan = packet(UDP, a.ip, "192.168.50.10", 1, 502, b"modbus");
    assert_eq!(
        a.node
            .encapsulate(&to_lan, now, &mut buf)
            .expect("ok")
            .expect("tx")
            .peer,
        g1
    );
    // Replies from the LAN come from gw1, and only gw1 may send them.
    let mut wire = VecDeque::new();
    let mut sides = [&mut a, &mut gw1, &mut gw2];
    send(
        &mut sides,
        0,
        1,
        &packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, b"hi"),
        &mut wire,
        now,
    )
    .expect("send");
    send(
        &mut sides,
        0,
        2,
        &packet(UDP, "100.64.0.1", "100.64.0.3", 1, 2, b"hi"),
        &mut wire,
        now,
    )
    .expect("send");
    pump(&mut sides, &mut wire, now);
    let reply = packet(UDP, "192.168.50.10", "100.64.0.1", 502, 1, b"ok");
    send(&mut sides, 1, 0, &reply, &mut wire, now).expect("send");
    let (tun, errors) = pump(&mut sides, &mut wire, now);
    // a's policy only knows gw1's own address; LAN replies are replies to a's own flow.
    assert_eq!(tun[0], vec![reply.clone()], "{errors:?}");
    send(&mut sides, 2, 0, &reply, &mut wire, now).expect("send");
    let (tun, errors) = pump(&mut sides, &mut wire, now);
    assert!(
        tun[0].is_empty() && errors.iter().any(|e| e.contains("not among")),
        "{errors:?}"
    );
    // Failover: gw2 now serves the network.
    a.node.set_routes(vec![(lan, g2)], now);
    assert_eq!(
        a.node
            .encapsulate(&to_lan, now, &mut buf)
            .expect("ok")
            .expect("tx")
            .peer,
        g2
    );
    let st = a.node.status(now);
    assert_eq!(
        st.iter().find(|s| s.peer == g2).expect("gw2").routed,
        vec![lan]
    );
}

/// The side of the pair that offers (the greater public key).
/// One peer's status on side `x` at `t`.
fn status_of(x: &Side, peer: PeerId, t: Instant) -> PeerStatus {
    x.node
        .status(t)
        .into_iter()
        .find(|s| s.peer == peer)
        .expect("peer")
}

fn offering(now: Instant) -> (Side, PeerId) {
    let (a, b) = pair(now);
    let (x, other) = if a
        .node
        .controlling(a.node.peer_by_key(&b.node.public_key()).expect("b"))
    {
        (a, b)
    } else {
        (b, a)
    };
    let peer = x.node.peer_by_key(&other.node.public_key()).expect("peer");
    (x, peer)
}

fn events(n: &mut Node) -> Vec<Event> {
    std::iter::from_fn(|| n.poll_event()).collect()
}

fn ice(session: u64, kind: PathKind, remote: &str) -> IceEvent {
    IceEvent::Connected(IcePath {
        session,
        kind,
        local: "host 192.0.2.2:40000".into(),
        remote: format!("srflx {remote}:41000"),
        remote_addr: ip(remote),
        endpoint: Some(std::net::SocketAddr::new(ip(remote), 41000)),
    })
}

#[test]
fn path_choice_and_reason_follow_ice_success_failure_and_lateness() {
    let t0 = Instant::now();
    let (mut x, peer) = offering(t0);
    let status = |x: &Side, t: Instant| status_of(x, peer, t);
    x.node.handle_timeout(t0);
    assert!(events(&mut x.node).contains(&Event::StartIce { peer }));
    x.node.handle_timeout(t0 + Duration::from_secs(1));
    assert!(
        !events(&mut x.node).contains(&Event::StartIce { peer }),
        "one start at a time"
    );
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 1 }, t0);
    let s = status(&x, t0);
    assert_eq!(s.path, PathKind::TcpRelay);
    assert!(
        s.reason.contains("ICE is connecting") && s.reason.contains("TCP relay carries"),
        "{}",
        s.reason
    );
    assert_eq!(s.reason_code, "ice_connecting");
    // Success: direct.
    x.node
        .handle_ice_event(peer, ice(1, PathKind::Direct, "203.0.113.12"), t0);
    assert!(events(&mut x.node).contains(&Event::PathChanged {
        peer,
        kind: PathKind::Direct
    }));
    assert_eq!(status(&x, t0).reason, "direct ICE pair");
    assert_eq!(status(&x, t0).reason_code, "direct");
    // A stale session's result is refused and closed.
    x.node
        .handle_ice_event(peer, ice(99, PathKind::TurnRelay, "203.0.113.10"), t0);
    assert_eq!(
        events(&mut x.node),
        vec![Event::StopIce { peer, session: 99 }]
    );
    assert_eq!(status(&x, t0).path, PathKind::Direct);
    // Lost (e.g. NAT rebinding): back to the relay at once, ICE again within a second.
    x.node
        .handle_ice_event(peer, IceEvent::Lost { session: 1 }, t0);
    let ev = events(&mut x.node);
    assert!(
        ev.contains(&Event::StopIce { peer, session: 1 })
            && ev.contains(&Event::PathChanged {
                peer,
                kind: PathKind::TcpRelay
            }),
        "{ev:?}"
    );
    x.node.handle_timeout(t0 + Duration::from_millis(500));
    assert!(events(&mut x.node).is_empty());
    x.node.handle_timeout(t0 + Duration::from_secs(1));
    assert!(
        events(&mut x.node).contains(&Event::StartIce { peer }),
        "retried after the loss"
    );
    // Late: an attempt with no pair within 20 s fails by itself.
    let t1 = t0 + Duration::from_secs(1);
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 2 }, t1);
    x.node.handle_timeout(t1 + ICE_ATTEMPT);
    let ev = events(&mut x.node);
    assert!(ev.contains(&Event::StopIce { peer, session: 2 }), "{ev:?}");
    let s = status(&x, t1 + ICE_ATTEMPT);
    assert!(
        s.reason.contains("ICE failed 1 times") && s.reason.contains("no ICE pair within 20 s"),
        "{}",
        s.reason
    );
    assert_eq!(s.reason_code, "ice_failed");
    // Via TURN is named as such.
    let t2 = t1 + ICE_ATTEMPT + Duration::from_secs(10);
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 3 }, t2);
    x.node
        .handle_ice_event(peer, ice(3, PathKind::TurnRelay, "203.0.113.10"), t2);
    assert_eq!(status(&x, t2).path, PathKind::TurnRelay);
    assert!(status(&x, t2).reason.contains("TURN"));
    assert_eq!(status(&x, t2).reason_code, "ice_no_direct_pair");
    // Once both sides' reachability is known, the reason is what it is: here an IPv6-only host
    // and an IPv4-only peer. The peer's report alone (this host not measured yet) says nothing.
    use tern_tunnel::reach::{Mapping, Reach};
    x.node.set_peer_reach(
        peer,
        Reach {
            ipv4: true,
            ipv6: false,
            mapping: Mapping::EndpointDependent,
            public: true,
        },
    );
    assert_eq!(status(&x, t2).reason_code, "ice_no_direct_pair");
    let here = Reach {
        ipv4: false,
        ipv6: true,
        mapping: Mapping::EndpointIndependent,
        public: true,
    };
    x.node.set_reach(here, t2);
    assert_eq!(x.node.fresh_reach(t2), Some(here));
    assert_eq!(
        x.node.fresh_reach(t2 + tern_tunnel::REACH_FRESH),
        None,
        "measured again after a while"
    );
    x.node.set_peer_reach(
        peer,
        Reach {
            ipv4: true,
            ipv6: false,
            mapping: Mapping::EndpointDependent,
            public: true,
        },
    );
    let s = status(&x, t2);
    assert_eq!(
        (s.path, s.reason_code),
        (PathKind::TurnRelay, "no_common_family")
    );
    assert!(
        s.reason
            .contains("this host has IPv6 only, the peer IPv4 only"),
        "{}",
        s.reason
    );
    // The host's addresses change: measured again at the next session, the reason kept meanwhile.
    x.node.retry_ice_now(t2);
    assert_eq!(x.node.fresh_reach(t2), None);
    assert_eq!(status(&x, t2).reason_code, "no_common_family");
}

#[test]
fn failed_attempts_back_off_and_a_new_chance_resets_the_delay() {
    let t0 = Instant::now();
    let (mut x, peer) = offering(t0);
    let mut t = t0;
    let mut starts = vec![];
    let mut session = 0;
    // Simulated 15 minutes in 250 ms steps; every attempt fails at once.
    while t < t0 + Duration::from_secs(900) {
        x.node.handle_timeout(t);
        for e in events(&mut x.node) {
            if e == (Event::StartIce { peer }) {
                starts.push(t.duration_since(t0).as_secs());
                session += 1;
                x.node
                    .handle_ice_event(peer, IceEvent::Started { session }, t);
                x.node.handle_ice_event(
                    peer,
                    IceEvent::Failed {
                        session,
                        why: "checks failed".into(),
                    },
                    t,
                );
            }
        }
        t += Duration::from_millis(250);
    }
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(&gaps[..6], &[2, 4, 8, 16, 32, 64], "doubling: {starts:?}");
    assert!(
        gaps[6..].iter().all(|g| *g == 120),
        "capped at 120 s: {gaps:?}"
    );
    // Relayed -> direct: a new chance (address change) retries now, from the minimum delay.
    x.node.retry_ice_now(t);
    x.node.handle_timeout(t);
    assert!(events(&mut x.node).contains(&Event::StartIce { peer }));
    session += 1;
    x.node
        .handle_ice_event(peer, IceEvent::Started { session }, t);
    x.node
        .handle_ice_event(peer, ice(session, PathKind::Direct, "203.0.113.12"), t);
    assert_eq!(x.node.status(t)[0].path, PathKind::Direct);
    // An offline peer is not tried at all.
    let mut s = x.node.status(t)[0].spec.clone();
    s.online = false;
    x.node.apply_peers(&[s], t);
    x.node.handle_ice_event(peer, IceEvent::Lost { session }, t);
    for i in 0..100 {
        x.node.handle_timeout(t + Duration::from_secs(i));
    }
    assert!(!events(&mut x.node).contains(&Event::StartIce { peer }));
    assert!(x.node.status(t)[0]
        .reason
        .contains("not connected to management"));
}

#[test]
fn an_ice_pair_through_the_tunnel_itself_is_refused() {
    let t0 = Instant::now();
    let (mut x, peer) = offering(t0);
    let other = x.node.peer_ids().next().expect("peer");
    x.node
        .set_routes(vec![("198.51.100.0/24".parse().expect("net"), other)], t0);
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 7 }, t0);
    x.node
        .handle_ice_event(peer, ice(7, PathKind::Direct, "198.51.100.2"), t0);
    assert!(events(&mut x.node).contains(&Event::StopIce { peer, session: 7 }));
    let s = &x.node.status(t0)[0];
    assert_eq!(s.path, PathKind::TcpRelay);
    assert!(
        s.reason.contains("through the tunnel itself"),
        "{}",
        s.reason
    );
    // A route installed later captures a working pair: dropped, retried.
    x.node.set_routes(vec![], t0);
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 8 }, t0);
    x.node
        .handle_ice_event(peer, ice(8, PathKind::Direct, "198.51.100.2"), t0);
    assert_eq!(x.node.status(t0)[0].path, PathKind::Direct);
    events(&mut x.node);
    x.node
        .set_routes(vec![("198.51.100.0/24".parse().expect("net"), other)], t0);
    assert!(events(&mut x.node).contains(&Event::StopIce { peer, session: 8 }));
}

#[test]
fn a_thousand_peers_come_and_go_without_touching_an_established_session() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let mut wire = VecDeque::new();
    let mut sides = [&mut a, &mut b];
    send(
        &mut sides,
        0,
        1,
        &packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, b"x"),
        &mut wire,
        now,
    )
    .expect("send");
    pump(&mut sides, &mut wire, now);
    let b_spec = spec(&b, "b");
    let mut many = vec![b_spec.clone()];
    for i in 0..1000u32 {
        let k = key();
        let addr = IpAddr::from([100, 65, (i >> 8) as u8, i as u8]);
        many.push(PeerSpec {
            key: k,
            id: format!("p{i}"),
            name: format!("p{i}"),
            overlay_ip: addr,
            allowed: vec![ipnet::IpNet::from(addr)],
            online: true,
            relay_only: false,
        });
    }
    let before = a.node.peer_by_key(&b.node.public_key());
    a.node.apply_peers(&many, now);
    assert_eq!(a.node.peer_ids().count(), 1001);
    let mut buf = vec![0u8; BUF];
    let t = a
        .node
        .encapsulate(
            &packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, b"y"),
            now,
            &mut buf,
        )
        .expect("ok")
        .expect("tx");
    assert_eq!(t.payload[0], 4, "data on the old session, no new handshake");
    a.node.apply_peers(&[b_spec], now);
    assert_eq!(a.node.peer_ids().count(), 1);
    assert_eq!(
        a.node.peer_by_key(&b.node.public_key()),
        before,
        "same peer, same session"
    );
    let t = a
        .node
        .encapsulate(
            &packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, b"z"),
            now,
            &mut buf,
        )
        .expect("ok")
        .expect("tx");
    assert_eq!(t.payload[0], 4);
    let _ = &a.secret;
}

#[test]
fn random_datagrams_and_packets_never_panic_and_nothing_forbidden_gets_through() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    ssh_from_a_only(&mut b);
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; BUF];
    let peer_a = b.node.peer_by_key(&a.node.public_key()).expect("a");
    // Garbage from the network: nothing reaches the TUN device.
    for _ in 0..20_000 {
        let len = rng.gen_range(0..1600);
        let mut d = vec![0u8; len];
        rng.fill_bytes(&mut d);
        if len >= 4 && rng.gen_bool(0.7) {
            d[0] = rng.gen_range(1..=4);
            d[1..4].fill(0);
        }
        if let Ok(Decap::Tunnel(p)) = b.node.decapsulate(peer_a, &d, now, &mut buf) {
            panic!("garbage delivered: {p:?}");
        }
        while b.node.poll_transmit(&mut buf).is_some() {}
    }
    // Random inner packets over a real session: only TCP 22 from a's own address is delivered.
    let mut wire = VecDeque::new();
    let mut sides = [&mut a, &mut b];
    for i in 0..3000 {
        let proto = [TCP, UDP, 1, 0, 255][rng.gen_range(0..5)];
        let src = if rng.gen_bool(0.8) {
            "100.64.0.1"
        } else {
            "100.64.7.7"
        };
        let dport = if rng.gen_bool(0.5) { 22 } else { rng.gen() };
        let mut pkt = packet(
            if proto == TCP { TCP } else { UDP },
            src,
            "100.64.0.2",
            rng.gen(),
            dport,
            &[i as u8; 16],
        );
        pkt[9] = proto;
        if rng.gen_bool(0.1) {
            let cut = rng.gen_range(1..pkt.len());
            pkt.truncate(cut);
        }
        let _ = send(&mut sides, 0, 1, &pkt, &mut wire, now);
        let (tun, _) = pump(&mut sides, &mut wire, now);
        for p in &tun[1] {
            assert_eq!(
                packet::src(p),
                Some(ip("100.64.0.1")),
                "only a's own address"
            );
            assert_eq!(p[9], TCP, "only TCP");
            assert_eq!(u16::from_be_bytes([p[22], p[23]]), 22, "only port 22");
        }
    }
    // Garbage from the TUN device: errors, no panic.
    for _ in 0..20_000 {
        let len = rng.gen_range(0..1500);
        let mut p = vec![0u8; len];
        rng.fill_bytes(&mut p);
        let _ = a.node.encapsulate(&p, now, &mut buf);
    }
    let mut small = [0u8; 64];
    assert!(matches!(
        a.node.encapsulate(
            &packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, &[0; 100]),
            now,
            &mut small
        ),
        Err(Error::BufferTooSmall)
    ));
}

#[test]
fn datagrams_on_the_shared_socket_find_their_peer_and_the_path_follows_a_rebinding() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    let pb_on_a = a.node.peer_by_key(&b.node.public_key()).expect("b");
    let pa_on_b = b.node.peer_by_key(&a.node.public_key()).expect("a");
    let e1: std::net::SocketAddr = "203.0.113.12:41000".parse().expect("addr");
    let e2: std::net::SocketAddr = "203.0.113.12:53999".parse().expect("addr");
    // A direct pair to b at e1.
    a.node
        .handle_ice_event(pb_on_a, IceEvent::Started { session: 1 }, t0);
    a.node
        .handle_ice_event(pb_on_a, ice(1, PathKind::Direct, "203.0.113.12"), t0);
    let mut buf = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    // Handshake: a's initiation is found on b by its static key, b's answer on a by index.
    let init = a
        .node
        .encapsulate(&packet(UDP, a.ip, b.ip, 1, 2, b"x"), t0, &mut buf)
        .expect("ok")
        .expect("tx");
    assert_eq!(init.to, Some(e1));
    let init = init.payload.to_vec();
    assert_eq!(b.node.peer_for_datagram(&init), Some(pa_on_b));
    let Ok(Decap::Network(resp)) = b.node.decapsulate(pa_on_b, &init, t0, &mut out) else {
        panic!("a handshake response");
    };
    let resp = resp.payload.to_vec();
    assert_eq!(a.node.peer_for_datagram(&resp), Some(pb_on_a));
    assert!(a.node.decapsulate_from(e1, &resp, t0, &mut out).is_ok());
    // a's queued packet confirms the session to b.
    while let Some(t) = a.node.poll_transmit(&mut out) {
        let d = t.payload.to_vec();
        let _ = b.node.decapsulate(pa_on_b, &d, t0, &mut buf);
    }
    // b's NAT rebinds: its data now comes from e2, and a answers there.
    let data = b
        .node
        .encapsulate(&packet(UDP, b.ip, a.ip, 2, 1, b"y"), t0, &mut buf)
        .expect("ok")
        .expect("tx")
        .payload
        .to_vec();
    assert_eq!(a.node.peer_for_datagram(&data), Some(pb_on_a));
    assert!(matches!(
        a.node.decapsulate_from(e2, &data, t0, &mut out),
        Ok(Decap::Tunnel(_))
    ));
    let next = a
        .node
        .encapsulate(&packet(UDP, a.ip, b.ip, 1, 2, b"z"), t0, &mut buf)
        .expect("ok")
        .expect("tx");
    assert_eq!(next.to, Some(e2), "the path follows the peer");
    // Forged or stale datagrams find no peer and move nothing.
    let mut forged = data.clone();
    forged[6] ^= 0x5a; // another receiver index (bytes 4..8, the low byte is the session)
    assert_eq!(a.node.peer_for_datagram(&forged), None);
    assert!(a.node.decapsulate_from(e1, &forged, t0, &mut out).is_err());
    let mut tampered = data;
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(a
        .node
        .decapsulate_from(e1, &tampered, t0, &mut out)
        .is_err());
    assert_eq!(
        a.node
            .encapsulate(&packet(UDP, a.ip, b.ip, 1, 2, b"w"), t0, &mut buf)
            .expect("ok")
            .expect("tx")
            .to,
        Some(e2),
        "unauthenticated input moves nothing"
    );
}

#[test]
fn a_turn_path_is_upgraded_to_direct_with_backoff_and_kept_meanwhile() {
    let t0 = Instant::now();
    let (mut x, peer) = offering(t0);
    let status = |x: &Side, t: Instant| status_of(x, peer, t);
    // Settled on TURN.
    x.node.handle_timeout(t0);
    assert!(events(&mut x.node).contains(&Event::StartIce { peer }));
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 1 }, t0);
    x.node
        .handle_ice_event(peer, ice(1, PathKind::TurnRelay, "203.0.113.10"), t0);
    let _ = events(&mut x.node);
    assert_eq!(status(&x, t0).path, PathKind::TurnRelay);
    // No upgrade attempt before UPGRADE_MIN, one at it.
    x.node
        .handle_timeout(t0 + UPGRADE_MIN - Duration::from_secs(1));
    assert!(!events(&mut x.node).contains(&Event::StartIce { peer }));
    let t1 = t0 + UPGRADE_MIN;
    x.node.handle_timeout(t1);
    assert!(events(&mut x.node).contains(&Event::StartIce { peer }));
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 2 }, t1);
    assert!(
        !events(&mut x.node).contains(&Event::StopIce { peer, session: 1 }),
        "the TURN pair keeps carrying traffic during the attempt"
    );
    let s = status(&x, t1);
    assert_eq!(
        (s.path, s.reason_code),
        (PathKind::TurnRelay, "ice_no_direct_pair")
    );
    // The attempt finds TURN again: the old pair stays, the new one is closed, and the next
    // attempt waits twice as long.
    x.node
        .handle_ice_event(peer, ice(2, PathKind::TurnRelay, "203.0.113.10"), t1);
    assert_eq!(
        events(&mut x.node),
        vec![Event::StopIce { peer, session: 2 }]
    );
    assert_eq!(x.node.ice_session(peer), Some(1));
    x.node.handle_timeout(t1 + UPGRADE_MIN);
    assert!(!events(&mut x.node).contains(&Event::StartIce { peer }));
    let t2 = t1 + UPGRADE_MIN * 2;
    x.node.handle_timeout(t2);
    assert!(events(&mut x.node).contains(&Event::StartIce { peer }));
    // A failed attempt is no failure of the path in use.
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 3 }, t2);
    x.node.handle_ice_event(
        peer,
        IceEvent::Failed {
            session: 3,
            why: "no pair".into(),
        },
        t2,
    );
    let _ = events(&mut x.node);
    assert_eq!(status(&x, t2).path, PathKind::TurnRelay);
    // Later an attempt finds a direct pair: the path upgrades and the TURN session closes.
    let t3 = t2 + UPGRADE_MAX;
    x.node.handle_timeout(t3);
    assert!(events(&mut x.node).contains(&Event::StartIce { peer }));
    x.node
        .handle_ice_event(peer, IceEvent::Started { session: 4 }, t3);
    x.node
        .handle_ice_event(peer, ice(4, PathKind::Direct, "203.0.113.12"), t3);
    let ev = events(&mut x.node);
    assert!(
        ev.contains(&Event::StopIce { peer, session: 1 })
            && ev.contains(&Event::PathChanged {
                peer,
                kind: PathKind::Direct
            }),
        "{ev:?}"
    );
    assert_eq!(status(&x, t3).reason_code, "direct");
    // Direct: no more upgrade attempts.
    x.node.handle_timeout(t3 + UPGRADE_MAX * 2);
    assert!(!events(&mut x.node).contains(&Event::StartIce { peer }));
}

#[test]
fn packets_into_a_routed_network_no_policy_opens_are_counted_by_the_sender() {
    let now = Instant::now();
    let (mut a, b) = pair(now);
    let gw = a.node.peer_by_key(&b.node.public_key()).expect("b");
    let lan: ipnet::IpNet = "192.168.50.0/24".parse().expect("net");
    a.node.set_routes(vec![(lan, gw)], now);
    a.node.set_denied(vec![lan]);
    let mut buf = vec![0u8; BUF];
    for _ in 0..3 {
        let pkt = packet(TCP, "100.64.0.1", "192.168.50.10", 4000, 22, b"");
        let _ = a.node.encapsulate(&pkt, now, &mut buf);
    }
    let to_b = packet(UDP, "100.64.0.1", "100.64.0.2", 1, 2, b"x");
    let _ = a.node.encapsulate(&to_b, now, &mut buf);
    assert_eq!(a.node.denied_counts(), &[(lan, 3)]);
    // The map changes but the network stays denied: the count stays; opened: gone.
    a.node.set_denied(vec![lan]);
    assert_eq!(a.node.denied_counts(), &[(lan, 3)]);
    a.node.set_denied(vec![]);
    assert!(a.node.denied_counts().is_empty());
}
