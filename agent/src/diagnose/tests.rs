use super::*;
use std::net::SocketAddr;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn stun(url: &str, server: &str, mapped: Option<&str>) -> StunResult {
    StunResult {
        url: url.into(),
        server: Some(addr(server)),
        mapped: mapped.map(addr),
        rtt_ms: mapped.map(|_| 0.4),
        error: mapped
            .is_none()
            .then(|| format!("no answer from {server} (UDP) within 2 s")),
    }
}

fn peer(name: &str, path: &str, code: &str) -> PeerFacts {
    PeerFacts {
        name: name.into(),
        overlay_ip: "100.64.0.3".into(),
        online: true,
        up: true,
        path: path.into(),
        reason_code: code.into(),
        reason: "direct ICE pair".into(),
        path_changes: 1,
        ping: Some(PingFacts {
            sent: 10,
            received: 10,
            avg_ms: Some(0.5),
            max_ms: Some(0.9),
        }),
        pmtu: Some(PmtuFacts {
            mtu: 1280,
            full_ok: true,
            small_ok: true,
            largest_ok: None,
        }),
        probe_rtt_ms: Some(0.6),
        probe_loss_pct: Some(0.0),
        in_map_secs: Some(3600),
        last_handshake_secs: Some(20),
        access: "all".into(),
    }
}

/// A healthy host: everything answers, NAT endpoint-independent, one direct peer.
fn clean() -> Facts {
    Facts {
        management: Reach {
            ok: true,
            detail: String::new(),
        },
        clock_offset_secs: Some(0),
        signal: true,
        tcp_relay: Some(Reach {
            ok: true,
            detail: String::new(),
        }),
        stun: vec![
            stun(
                "stun:203.0.113.10:3478",
                "203.0.113.10:3478",
                Some("203.0.113.11:4000"),
            ),
            stun(
                "stun:203.0.113.10:3479",
                "203.0.113.10:3479",
                Some("203.0.113.11:4000"),
            ),
        ],
        turn: vec![TurnResult {
            url: "turn:203.0.113.10:3478?transport=udp".into(),
            server: Some(addr("203.0.113.10:3478")),
            answered: true,
            relayed: Some(addr("203.0.113.10:50001")),
            rejected: None,
            relay_ports_open: Some(true),
            error: None,
        }],
        credentials_expire_unix: 2_000_000_000,
        now_unix: 1_900_000_000,
        nat_lifetime: vec![],
        relay_view: None,
        keepalive_secs: 25,
        peers: vec![peer("b", "direct", "direct")],
        overlay_conflict: None,
        routes: vec![],
        serving: vec![],
        ip_forward: Some(false),
        nat64: None,
        ipv4_unreachable: vec![],
        turn_load: vec![],
        map_peers: Some(1),
        pending_approval: false,
        nameservers_blocked: vec![],
        relay_loopback: vec![],
    }
}

fn codes(f: &Facts) -> Vec<String> {
    analyze(f).into_iter().map(|x| x.code).collect()
}

fn one<'a>(v: &'a [Finding], code: &str) -> &'a Finding {
    v.iter()
        .find(|x| x.code == code)
        .unwrap_or_else(|| panic!("no {code} in {v:?}"))
}

#[test]
fn a_clean_host_is_all_clear_and_nothing_else() {
    assert_eq!(codes(&clean()), vec!["all_clear"]);
    let r = Report {
        findings: analyze(&clean()),
        facts: clean(),
        took_ms: 2100,
        deep: false,
        bundle: None,
    };
    assert_eq!(r.worst(), None);
    let text = render(&r);
    assert!(text.contains("OK    all_clear"), "{text}");
    assert!(!text.contains("null") && !text.contains("do:"), "{text}");
    // An offline peer is information, not a problem of this host.
    let mut f = clean();
    f.peers[0].online = false;
    assert_eq!(codes(&f), vec!["all_clear", "peer_offline"]);
}

#[test]
fn no_udp_answer_at_all_is_udp_blocked_and_one_silent_port_is_named() {
    let mut f = clean();
    for s in &mut f.stun {
        s.mapped = None;
        s.error = Some("no answer".into());
    }
    f.turn[0] = TurnResult {
        url: f.turn[0].url.clone(),
        server: f.turn[0].server,
        error: Some("no answer".into()),
        ..TurnResult::default()
    };
    f.peers[0].path = "tcp_relay".into();
    f.peers[0].reason_code = "ice_failed".into();
    let v = analyze(&f);
    let b = one(&v, "udp_blocked");
    assert_eq!(b.severity, Severity::Error);
    assert!(
        b.evidence.contains("203.0.113.10:3478") && b.evidence.contains("TCP relay"),
        "{}",
        b.evidence
    );
    assert!(
        !v.iter()
            .any(|x| x.code == "turn_unreachable" || x.code == "stun_unreachable"),
        "one cause, not three: {v:?}"
    );
    assert!(one(&v, "peer_relayed").evidence.contains("udp_blocked"));

    // A wrong TURN port: STUN answers, the TURN URL does not.
    let mut f = clean();
    f.turn[0] = TurnResult {
        url: "turn:203.0.113.10:3480?transport=udp".into(),
        server: Some(addr("203.0.113.10:3480")),
        error: Some("no answer from 203.0.113.10:3480 (UDP) within 2 s".into()),
        ..TurnResult::default()
    };
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["turn_unreachable"]);
    assert_eq!(v[0].subject, "turn:203.0.113.10:3480?transport=udp");
    assert!(v[0].advice.contains("--turn-urls"));
    let r = Report {
        findings: v,
        facts: f,
        took_ms: 2100,
        deep: false,
        bundle: None,
    };
    let text = render(&r);
    assert!(
        text.contains(
            "ERROR turn_unreachable [turn:203.0.113.10:3480?transport=udp]: the TURN server"
        ) && text.contains("      seen: no answer from 203.0.113.10:3480")
            && text.contains("      do:   Check the address and port in --turn-urls"),
        "{text}"
    );
}

#[test]
fn rejected_credentials_name_the_secret_and_the_clock() {
    let mut f = clean();
    f.turn[0].relayed = None;
    f.turn[0].relay_ports_open = None;
    f.turn[0].rejected = Some((401, "Unauthorized".into()));
    let v = analyze(&f);
    let a = one(&v, "turn_auth_failed");
    assert!(a.advice.contains("same secret"), "{}", a.advice);
    assert!(!a.evidence.contains("clock is"), "{}", a.evidence);
    f.clock_offset_secs = Some(-400);
    let v = analyze(&f);
    assert!(one(&v, "turn_auth_failed")
        .evidence
        .contains("400 s off the server's"));
    assert_eq!(one(&v, "clock_skew").severity, Severity::Error);
    assert!(one(&v, "clock_skew").evidence.contains("ahead of"));
    // Credentials past their expiry (by the server's clock).
    let mut f = clean();
    f.credentials_expire_unix = f.now_unix - 10;
    assert_eq!(codes(&f), vec!["turn_credentials_expired"]);
    // Any other refusal is named with its code.
    let mut f = clean();
    f.turn[0].relayed = None;
    f.turn[0].rejected = Some((486, "Allocation Quota Reached".into()));
    assert!(one(&analyze(&f), "turn_refused").evidence.contains("486"));
}

#[test]
fn a_closed_relay_port_range_is_named() {
    let mut f = clean();
    f.turn[0].relay_ports_open = Some(false);
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["relay_ports_closed"]);
    assert!(v[0].evidence.contains("203.0.113.10:50001"));
}

#[test]
fn nat_mapping_per_destination_and_short_mapping_lifetimes() {
    let mut f = clean();
    f.stun[1].mapped = Some(addr("203.0.113.11:61234"));
    f.peers[0].path = "turn_relay".into();
    f.peers[0].reason_code = "ice_no_direct_pair".into();
    let v = analyze(&f);
    assert!(one(&v, "nat_symmetric")
        .evidence
        .contains("203.0.113.11:61234 by 203.0.113.10:3479"));
    assert!(one(&v, "peer_relayed").evidence.contains("nat_symmetric"));
    assert_eq!(one(&v, "peer_relayed").severity, Severity::Warning);
    // TURN for a cause both sides' facts give: said as information, without a referral.
    let mut f = clean();
    f.peers[0].path = "turn_relay".into();
    f.peers[0].reason_code = "no_common_family".into();
    f.peers[0].reason =
        "no address family in common: this host has IPv6 only, the peer IPv4 only".into();
    let v = analyze(&f);
    let r = one(&v, "peer_relayed");
    assert_eq!(r.severity, Severity::Info, "{v:?}");
    assert!(r.evidence.contains("[no_common_family]") && !r.evidence.contains("on the peer"));
    assert_eq!(codes(&f), vec!["all_clear", "peer_relayed"]);
    // One STUN endpoint only: nothing can be said.
    let mut f = clean();
    f.stun.truncate(1);
    assert_eq!(codes(&f), vec!["all_clear"]);
    // Deep: gone after 12 s idle, shorter than the 25 s keepalive.
    let mut f = clean();
    f.nat_lifetime = vec![(12, Some(false)), (24, Some(false)), (48, Some(false))];
    let v = analyze(&f);
    assert!(one(&v, "nat_timeout_short")
        .evidence
        .contains("gone after 12 s"));
    // Kept for 24 s, gone at 48: longer than the keepalive, fine.
    f.nat_lifetime = vec![(12, Some(true)), (24, Some(true)), (48, Some(false))];
    assert_eq!(codes(&f), vec!["all_clear"]);
}

#[test]
fn loss_slowness_flapping_and_black_holes_per_peer() {
    let mut f = clean();
    f.peers[0].path = "turn_relay".into();
    f.peers[0].reason_code = "ice_no_direct_pair".into();
    f.peers[0].ping = Some(PingFacts {
        sent: 10,
        received: 2,
        avg_ms: Some(352.0),
        max_ms: Some(400.0),
    });
    let v = analyze(&f);
    let l = one(&v, "path_loss");
    assert_eq!(l.severity, Severity::Error);
    assert!(
        l.evidence.contains("80% of 10") && l.evidence.contains("(via TURN)"),
        "{}",
        l.evidence
    );
    assert!(one(&v, "path_slow").evidence.contains("352 ms"));
    // No reply at all while the session is up: the peer's policy may drop ICMP; no loss claimed.
    let mut f = clean();
    f.peers[0].ping = Some(PingFacts {
        sent: 10,
        received: 0,
        avg_ms: None,
        max_ms: None,
    });
    f.peers[0].pmtu = Some(PmtuFacts {
        mtu: 1280,
        full_ok: false,
        small_ok: false,
        largest_ok: None,
    });
    assert_eq!(codes(&f), vec!["all_clear"]);
    // ... unless the data plane's own probes (which need no policy) saw the loss.
    let mut g = f.clone();
    g.peers[0].probe_loss_pct = Some(42.0);
    g.peers[0].probe_rtt_ms = Some(310.0);
    let v = analyze(&g);
    assert!(one(&v, "path_loss")
        .evidence
        .contains("42% of the last minute's in-tunnel probes"));
    assert!(one(&v, "path_slow").evidence.contains("310 ms"));
    // Large packets die, small ones pass.
    f.peers[0].pmtu = Some(PmtuFacts {
        mtu: 1280,
        full_ok: false,
        small_ok: true,
        largest_ok: Some(1172),
    });
    let v = analyze(&f);
    assert!(one(&v, "pmtu_blackhole").evidence.contains("--mtu 1168"));
    // Flapping.
    let mut f = clean();
    f.peers[0].path_changes = 6;
    assert_eq!(codes(&f), vec!["path_flapping"]);
    // No handshake at all.
    let mut f = clean();
    f.peers[0].up = false;
    f.peers[0].reason = "ICE failed 3 times".into();
    f.peers[0].last_handshake_secs = Some(400);
    assert_eq!(codes(&f), vec!["peer_unreachable"]);
    assert!(
        one(&analyze(&f), "peer_unreachable")
            .evidence
            .contains("the last 6 min ago"),
        "{:?}",
        analyze(&f)
    );
    // A peer added 10 s ago has had no handshake yet: it is connecting, not unreachable.
    f.peers[0].last_handshake_secs = None;
    f.peers[0].in_map_secs = Some(10);
    f.peers[0].reason = "ICE is starting; the TCP relay carries traffic meanwhile".into();
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["all_clear", "peer_connecting"], "{v:?}");
    assert!(one(&v, "peer_connecting").evidence.contains("for 10 s"));
    // Still none after the grace: unreachable, saying how long it has been.
    f.peers[0].in_map_secs = Some(75);
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["peer_unreachable"]);
    assert!(
        one(&v, "peer_unreachable")
            .evidence
            .contains("in the 75 s since it joined the map"),
        "{v:?}"
    );
}

#[test]
fn local_conflicts_and_routing_peer_forwarding() {
    let mut f = clean();
    f.overlay_conflict = Some("overlay range conflict: 100.64.0.0/10 overlaps 100.64.1.0/24 on wwan0, which this host is attached to".into());
    f.routes = vec![
        RouteFacts {
            network: "192.168.50.0/24".into(),
            via: "gw".into(),
            state: "conflict: 192.168.50.0/24 overlaps 192.168.50.0/24 on eth0, which this host is attached to".into(),
            access: "all".into(),
        },
        RouteFacts {
            network: "10.9.0.0/16".into(),
            via: String::new(),
            state: "no connected routing peer".into(),
            access: "all".into(),
        },
        RouteFacts {
            network: "10.8.0.0/16".into(),
            via: "gw".into(),
            state: "installed".into(),
            access: "all".into(),
        },
        RouteFacts {
            network: "10.7.0.0/16".into(),
            via: "gw".into(),
            state: "installed".into(),
            access: "none".into(),
        },
    ];
    f.serving = vec!["192.168.60.0/24 (masquerade)".into()];
    f.ip_forward = Some(false);
    let mut c = codes(&f);
    c.sort();
    assert_eq!(
        c,
        vec![
            "forwarding_off",
            "overlay_conflict",
            "route_conflict",
            "route_no_access",
            "route_unserved"
        ]
    );
    f.ip_forward = Some(true);
    assert!(!codes(&f).contains(&"forwarding_off".to_string()));
}

#[test]
fn the_relays_own_drops_during_the_checks_are_named() {
    use tern_proto::relay_ws::RelayView;
    let mut f = clean();
    let before = RelayView {
        dropped_from_you: 5,
        dropped_to_you: 0,
        no_recipient_from_you: 0,
        queued_to_you_bytes: 0,
        queue_limit_bytes: 1 << 20,
        drops_total: 100,
        clients: 2,
    };
    f.relay_view = Some((before, before));
    assert_eq!(codes(&f), vec!["all_clear"], "old drops are not news");
    let after = RelayView {
        dropped_from_you: 905,
        drops_total: 1000,
        ..before
    };
    f.relay_view = Some((before, after));
    let v = analyze(&f);
    let r = one(&v, "relay_overloaded");
    assert_eq!(r.severity, Severity::Error);
    assert!(
        r.evidence.contains("dropped 900 datagrams from this host"),
        "{}",
        r.evidence
    );
    let full = RelayView {
        queued_to_you_bytes: 800 << 10,
        ..before
    };
    f.relay_view = Some((before, full));
    assert_eq!(
        one(&analyze(&f), "relay_overloaded").severity,
        Severity::Warning
    );
    // Datagrams for a peer that is not connected to the relay are not the relay's load.
    let absent = RelayView {
        no_recipient_from_you: 40,
        ..before
    };
    f.relay_view = Some((before, absent));
    let v = analyze(&f);
    assert!(
        !codes(&f).contains(&"relay_overloaded".to_string()),
        "{v:?}"
    );
    assert!(
        one(&v, "relay_peer_absent")
            .evidence
            .contains("40 datagrams from this host"),
        "{v:?}"
    );
}

#[test]
fn management_down_and_signal_down_are_told_apart() {
    let mut f = clean();
    f.management = Reach {
        ok: false,
        detail: "nothing listens on 203.0.113.10:443".into(),
    };
    f.signal = false;
    assert_eq!(codes(&f), vec!["management_unreachable"]);
    let mut f = clean();
    f.signal = false;
    f.tcp_relay = Some(Reach {
        ok: false,
        detail: "not connected to https://x/relay".into(),
    });
    let mut c = codes(&f);
    c.sort();
    assert_eq!(c, vec!["signal_unreachable", "tcp_relay_unreachable"]);
}

#[test]
fn every_code_has_advice_and_a_line_in_the_docs() {
    let readme = include_str!("../../../docs/agent.md");
    for (code, meaning, advice) in CODES {
        assert!(!advice.is_empty() && !meaning.is_empty(), "{code}");
        assert!(
            readme.contains(&format!("`{code}`")),
            "docs/agent.md lacks the diagnose code `{code}`"
        );
    }
    // Findings only use documented codes.
    let mut f = clean();
    f.management.ok = false;
    f.turn[0].relay_ports_open = Some(false);
    for x in analyze(&f) {
        assert!(!advice(&x.code).is_empty(), "{} undocumented", x.code);
    }
}

#[test]
fn an_ipv6_only_host_without_nat64_is_told_so_not_that_udp_or_the_relay_fails() {
    // Everything of the server is an IPv4 literal this host cannot dial: every UDP probe and the
    // TCP relay fail, for one reason.
    let mut f = clean();
    for s in &mut f.stun {
        s.mapped = None;
        s.error = Some("no answer".into());
    }
    for t in &mut f.turn {
        t.answered = false;
        t.relayed = None;
        t.relay_ports_open = None;
    }
    f.tcp_relay = Some(Reach {
        ok: false,
        detail: "Network is unreachable".into(),
    });
    f.nat64 = Some(crate::nat64::Status {
        error: "ipv4only.arpa has no IPv6 address at the resolver: it does no DNS64".into(),
        ..Default::default()
    });
    f.ipv4_unreachable = vec![
        "stun:203.0.113.10:3478".into(),
        "ws://203.0.113.10:443/relay".into(),
    ];
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["nat64_missing"], "{v:?}");
    let e = &one(&v, "nat64_missing").evidence;
    assert!(
        e.contains("does no DNS64") && e.contains("stun:203.0.113.10:3478"),
        "{e}"
    );
    assert!(one(&v, "nat64_missing").advice.contains("--nat64-prefix"));

    // The same host with its prefix, everything answering: nothing to report.
    let mut f = clean();
    f.nat64 = Some(crate::nat64::Status {
        prefix: "2001:db8:64:ff9b::/96".into(),
        source: "discovered".into(),
        ..Default::default()
    });
    assert_eq!(codes(&f), vec!["all_clear"]);
    // A configured prefix the network does not announce is named.
    f.nat64 = Some(crate::nat64::Status {
        prefix: "64:ff9b::/96".into(),
        source: "configured".into(),
        discovered: "2001:db8:64:ff9b::/96".into(),
        ..Default::default()
    });
    assert!(one(&analyze(&f), "nat64_prefix_mismatch")
        .evidence
        .contains("2001:db8:64:ff9b::/96"));
}

#[test]
fn an_overloaded_turn_relay_is_named_with_its_own_figures_not_as_a_slow_path() {
    let mut f = clean();
    f.peers[0].path = "turn_relay".into();
    f.peers[0].reason_code = "nat_symmetric_both".into();
    f.peers[0].reason = "both NATs give a new public port per destination".into();
    f.peers[0].ping = Some(PingFacts {
        sent: 10,
        received: 2,
        avg_ms: Some(351.0),
        max_ms: Some(402.0),
    });
    // Without the relay's word: the path's own findings.
    let v = analyze(&f);
    assert!(codes(&f).contains(&"path_slow".to_string()), "{v:?}");
    assert!(codes(&f).contains(&"path_loss".to_string()), "{v:?}");
    // The relay says its uplink is saturated: that is the finding, with both sets of figures.
    f.turn_load = vec![TurnLoad {
        url: "turn:203.0.113.10:3478?transport=udp".into(),
        bits_per_sec: 10.2e6,
        datagrams_per_sec: 1270.0,
        send_drops_per_sec: 2400.0,
        receive_drops_per_sec: 0.0,
        unsent_bytes: 400 << 10,
        queue_ms: 320.0,
        overloaded: true,
        why: "400 KiB wait to go out on its uplink (about 320 ms); its uplink dropped 2400 datagrams/s (65% of what it sent)".into(),
        yours_bits_per_sec: 9.8e6,
    }];
    let v = analyze(&f);
    let codes_now = codes(&f);
    assert!(
        !codes_now.contains(&"path_slow".to_string())
            && !codes_now.contains(&"path_loss".to_string()),
        "{v:?}"
    );
    let r = one(&v, "relay_overloaded");
    assert_eq!(r.severity, Severity::Error);
    assert_eq!(r.subject, "turn:203.0.113.10:3478?transport=udp");
    for want in [
        "about 320 ms",
        "65% of what it sent",
        "10.2 Mbit/s",
        "9.8 Mbit/s of it for this host",
        "b: round trip 351 ms, 8 of 10 echo requests lost",
    ] {
        assert!(r.evidence.contains(want), "{want}: {}", r.evidence);
    }
    // An overloaded relay this host does not use (not in its map, no allocation there) is not
    // this host's problem.
    f.turn_load[0].url = "turn:198.51.100.99:3478?transport=udp".into();
    f.turn_load[0].yours_bits_per_sec = 0.0;
    assert!(!codes(&f).contains(&"relay_overloaded".to_string()));
    // On an IPv6-only host the map's URL is the NAT64 form of the relay's own.
    f.turn[0].url = "turn:[64:ff9b::cb00:710a]:3478?transport=udp".into();
    f.turn_load[0].url = "turn:203.0.113.10:3478?transport=udp".into();
    f.nat64 = Some(crate::nat64::Status {
        prefix: "64:ff9b::/96".into(),
        source: "discovered".into(),
        ..Default::default()
    });
    assert!(codes(&f).contains(&"relay_overloaded".to_string()));
    // A busy relay that is not overloaded changes nothing.
    f.turn_load[0].overloaded = false;
    assert!(!codes(&f).contains(&"relay_overloaded".to_string()));
}

#[test]
fn an_empty_map_is_named_unless_approval_is_why() {
    let mut f = clean();
    f.peers.clear();
    f.map_peers = Some(0);
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["no_peers"], "{v:?}");
    assert!(one(&v, "no_peers")
        .advice
        .contains("groups for devices added by sign-in"));
    f.pending_approval = true;
    assert_eq!(codes(&f), vec!["all_clear"]);
    // `--peer NAME` narrowed the list, the map is not empty.
    f.pending_approval = false;
    f.map_peers = Some(3);
    assert_eq!(codes(&f), vec!["all_clear"]);
}

#[test]
fn unanswered_echoes_are_explained_by_what_the_policies_allow() {
    let mut f = clean();
    f.peers[0].ping = Some(PingFacts {
        sent: 10,
        received: 0,
        avg_ms: None,
        max_ms: None,
    });
    let text = |f: &Facts| {
        render(&Report {
            findings: analyze(f),
            facts: f.clone(),
            ..Default::default()
        })
    };
    assert!(text(&f).contains("no echo replies although the policies allow ICMP"));
    f.peers[0].access = "tcp 502, 80".into();
    let t = text(&f);
    assert!(
        t.contains("no echo replies (the policies allow tcp 502, 80, not ICMP)"),
        "{t}"
    );
    assert!(!t.contains("may not allow"), "{t}");
}

#[test]
fn a_nameserver_no_policy_reaches_is_named() {
    let mut f = clean();
    f.nameservers_blocked = vec!["factory.local -> 192.168.50.2:53: the policies do not let this host send DNS (udp 53) into 192.168.50.0/24 (they allow tcp 502, 80); queries for these names time out".into()];
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["nameserver_blocked"], "{v:?}");
    assert!(one(&v, "nameserver_blocked")
        .evidence
        .contains("factory.local -> 192.168.50.2:53"));
}

#[test]
fn a_server_advertising_its_loopback_is_named_not_udp_blocked() {
    let mut f = clean();
    for s in &mut f.stun {
        s.mapped = None;
        s.error = Some("no answer".into());
    }
    for t in &mut f.turn {
        t.answered = false;
        t.relayed = None;
        t.relay_ports_open = None;
    }
    f.tcp_relay = Some(Reach {
        ok: false,
        detail: "connection refused".into(),
    });
    f.relay_loopback = vec![
        "stun:127.0.0.1:3478".into(),
        "ws://127.0.0.1:8080/relay".into(),
    ];
    let v = analyze(&f);
    assert_eq!(codes(&f), vec!["relay_loopback"], "{v:?}");
    assert!(one(&v, "relay_loopback").advice.contains("--public-url"));
}
