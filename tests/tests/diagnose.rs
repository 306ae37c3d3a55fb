//! `tern diagnose` in the namespace lab: each cause is injected for real (nftables on the routers
//! and the server, conntrack timeouts, a wrong TURN URL, a TURN server with another
//! secret, an address in the overlay range), the fault is shown to have taken effect, and the
//! affected agent's `tern diagnose --json` must name it with its documented code. The clean
//! baseline must report nothing but `all_clear`. Two labs, each with one server for all its
//! scenarios. Root only (skipped elsewhere, not in CI).

use serde_json::Value;
use std::time::{Duration, Instant};
use tern_tests::mesh::{bin, skip, Mesh};
use tern_tests::netns::{Nat, SERVER_IP};

/// `tern diagnose --json [extra]` by `who`: (report, exit success).
fn diagnose(m: &Mesh, who: &str, ns: &str, extra: &[&str]) -> (Value, bool) {
    m.diagnose(who, ns, extra)
}

fn codes(r: &Value) -> Vec<String> {
    r["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn finding<'a>(r: &'a Value, code: &str) -> &'a Value {
    r["findings"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["code"] == code))
        .unwrap_or_else(|| panic!("no {code} finding in {r:#}"))
}

/// Runs diagnose until it names `code` (the data plane may need a moment to notice a fault).
fn wait_finding(
    m: &Mesh,
    who: &str,
    ns: &str,
    code: &str,
    extra: &[&str],
    limit: Duration,
) -> Value {
    let t0 = Instant::now();
    loop {
        let (r, ok) = diagnose(m, who, ns, extra);
        if codes(&r).iter().any(|c| c == code) {
            assert!(!ok, "diagnose exits 1 when it finds {code}");
            return r;
        }
        if t0.elapsed() > limit {
            panic!(
                "diagnose never named {code} within {limit:?}: {r:#}\n--- {who} log:\n{}",
                m.lab.log(who)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn human(m: &Mesh, who: &str, ns: &str) -> String {
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args(who));
    args.push("diagnose".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = m.lab.exec(ns, &refs);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn drop_table(m: &Mesh, ns: &str, table: &str) {
    let out = m.lab.exec(ns, &["nft", "delete", "table", "inet", table]);
    assert!(out.status.success(), "removing {table}");
}

fn nft_counter(m: &Mesh, ns: &str, table: &str) -> u64 {
    let out = m.lab.exec(ns, &["nft", "list", "table", "inet", table]);
    String::from_utf8_lossy(&out.stdout)
        .split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn easy_nat_clean_baseline_then_black_hole_closed_relay_ports_overlay_conflict_nat_timeout_udp_blocked(
) {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    m.start(&[("a", &ha), ("b", &hb)]);
    let ip_b = m.overlay_ip("b", &hb);
    m.wait_connection("a", &ha, "direct", Duration::from_secs(60));

    // 1. Clean network: all clear, nothing else (no false alarm), within the 10 s bound.
    let (r, ok) = diagnose(&m, "a", &ha, &[]);
    assert_eq!(codes(&r), vec!["all_clear"], "{r:#}");
    assert!(ok, "all clear exits 0");
    eprintln!("figure: default diagnose run time {} ms", r["took_ms"]);
    assert!(r["took_ms"].as_u64().unwrap_or(u64::MAX) <= 10_000, "{r:#}");
    let facts = &r["facts"];
    assert_eq!(
        facts["stun"].as_array().map(Vec::len),
        Some(2),
        "the map's STUN port and the alternate one: {facts:#}"
    );
    assert_eq!(facts["turn"][0]["relay_ports_open"], true, "{facts:#}");
    assert_eq!(facts["peers"][0]["ping"]["received"], 10, "{facts:#}");
    assert_eq!(facts["peers"][0]["pmtu"]["full_ok"], true, "{facts:#}");
    let text = human(&m, "a", &ha);
    eprintln!("clean baseline, as the user reads it:\n{text}");
    assert!(
        text.contains("OK    all_clear") && text.contains("peer b: direct, 10/10 echo replies"),
        "{text}"
    );
    assert!(!text.contains("null"), "{text}");

    // The path's own round trip, measured by in-tunnel probes, in status.
    let st = m.status("a", &ha).expect("status");
    let p = &st["peers"][0];
    assert_eq!(p["path_reason_code"], "direct", "{p:#}");
    assert!(p["latency_ms"].as_f64().is_some_and(|r| r > 0.0), "{p:#}");

    // A debug bundle: the files a supporter needs, and no secret the agent holds.
    let bundle = m.lab.dir.path().join("a-bundle.tar.gz");
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args("a"));
    args.extend([
        "diagnose".into(),
        "--bundle".into(),
        bundle.display().to_string(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = m.lab.exec(&ha, &refs);
    assert!(out.status.success(), "{out:?}");
    let unpacked = m.lab.dir.path().join("a-bundle");
    std::fs::create_dir_all(&unpacked).expect("dir");
    let x = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&bundle)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .expect("tar");
    assert!(x.status.success(), "{x:?}");
    let dir = unpacked.join("tern-diagnose");
    let mut all = String::new();
    for f in [
        "status.json",
        "diagnose.json",
        "diagnose.txt",
        "log.txt",
        "system.txt",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!text.trim().is_empty(), "{f} is empty");
        all.push_str(&text);
    }
    assert!(
        all.contains("tunnel up") && all.contains("nft list ruleset"),
        "log and system state are in"
    );
    let state = m.lab.dir.path().join("a").join("state");
    let private = std::fs::read_to_string(state.join("private.key")).expect("key");
    for (what, secret) in [
        ("private key", private.trim()),
        ("setup key", m.key.as_str()),
    ] {
        assert!(!secret.is_empty());
        assert!(!all.contains(secret), "the bundle leaks the {what}");
    }

    // 2. A middlebox on A's uplink drops large UDP datagrams without a word: full-size packets
    //    through the tunnel die, small ones pass.
    let ra = m.lab.ns("ra");
    m.lab
        .nft(
            &ra,
            "table inet tern_diag_mtu {\n  chain forward {\n    type filter hook forward priority -10; policy accept;\n    meta l4proto udp ip length > 1200 counter drop\n  }\n}\n",
        )
        .expect("black hole");
    let big = m.lab.exec(
        &ha,
        &[
            "ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1252", &ip_b,
        ],
    );
    assert!(!big.status.success(), "full-size packets must die now");
    assert!(m.ping(&ha, &ip_b), "small packets still pass");
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "pmtu_blackhole",
        &["--peer", "b"],
        Duration::from_secs(20),
    );
    let f = finding(&r, "pmtu_blackhole");
    assert_eq!(f["subject"], "b");
    assert!(
        f["evidence"].as_str().unwrap_or("").contains("--mtu 11"),
        "the largest size that passes (about 1,170 bytes) is suggested: {f:#}"
    );
    drop_table(&m, &ra, "tern_diag_mtu");

    // 3. The server's firewall closes the TURN relay port range: allocations succeed, nothing
    //    comes back through them.
    let srv = m.lab.ns("srv");
    m.lab
        .nft(
            &srv,
            "table inet tern_diag_ports {\n  chain input {\n    type filter hook input priority -10; policy accept;\n    udp dport 50000-50999 counter drop\n  }\n}\n",
        )
        .expect("close relay ports");
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "relay_ports_closed",
        &[],
        Duration::from_secs(20),
    );
    assert!(
        nft_counter(&m, &srv, "tern_diag_ports") > 0,
        "the firewall dropped the probe"
    );
    assert_eq!(r["facts"]["turn"][0]["relay_ports_open"], false);
    drop_table(&m, &srv, "tern_diag_ports");

    // 4. An uplink in the overlay range (carriers use 100.64.0.0/10 for CGNAT too).
    let add = |args: &[&str]| assert!(m.lab.exec(&ha, args).status.success(), "{args:?}");
    add(&[
        "ip", "link", "add", "wwan9", "type", "veth", "peer", "name", "wwan9p",
    ]);
    add(&["ip", "addr", "add", "100.127.3.1/24", "dev", "wwan9"]);
    add(&["ip", "link", "set", "wwan9", "up"]);
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "overlay_conflict",
        &[],
        Duration::from_secs(10),
    );
    assert!(
        finding(&r, "overlay_conflict")["evidence"]
            .as_str()
            .unwrap_or("")
            .contains("wwan9"),
        "{r:#}"
    );
    add(&["ip", "link", "del", "wwan9"]);

    // 5. A route that overlaps A's own LAN, served by B (the admin confirmed the overlap): A does
    //    not install it and says why; B serves it with IP forwarding switched off behind its back.
    let b_id = m.peer_id("b", &hb);
    let r = m.api(
        "POST",
        "/api/routes",
        Some(&format!(
            r#"{{"confirm_overlap":true,"network":"192.0.2.0/24","routing_peer":"{b_id}","groups":["all"]}}"#
        )),
    );
    let route_id = r["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string();
    let r = wait_finding(&m, "a", &ha, "route_conflict", &[], Duration::from_secs(30));
    assert_eq!(finding(&r, "route_conflict")["subject"], "192.0.2.0/24");
    m.lab
        .wait_for("b serves the route", Duration::from_secs(30), || {
            m.status("b", &hb)
                .is_some_and(|s| s["serving"].as_array().is_some_and(|a| !a.is_empty()))
        })
        .expect("serving");
    let off = m.lab.exec(&hb, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    assert!(off.status.success());
    let r = wait_finding(&m, "b", &hb, "forwarding_off", &[], Duration::from_secs(10));
    assert!(
        finding(&r, "forwarding_off")["evidence"]
            .as_str()
            .unwrap_or("")
            .contains("192.0.2.0/24"),
        "{r:#}"
    );
    let _ = m.lab.exec(&hb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    m.api("DELETE", &format!("/api/routes/{route_id}"), None);

    // 6. --deep: A's NAT forgets idle UDP mappings after 8 s (the keepalive is 25 s).
    let sysctl = m.lab.exec(
        &ra,
        &[
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=8",
            "net.netfilter.nf_conntrack_udp_timeout_stream=8",
        ],
    );
    assert!(sysctl.status.success(), "{sysctl:?}");
    let t0 = Instant::now();
    let (r, _) = diagnose(&m, "a", &ha, &["--deep"]);
    eprintln!("figure: --deep diagnose run time {:?}", t0.elapsed());
    let f = finding(&r, "nat_timeout_short");
    assert!(
        f["evidence"].as_str().unwrap_or("").contains("after 12 s"),
        "{f:#}"
    );
    let _ = m.lab.exec(
        &ra,
        &[
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=30",
            "net.netfilter.nf_conntrack_udp_timeout_stream=120",
        ],
    );

    // 7. A's network lets no UDP out: the path falls back to the TCP relay and diagnose says
    //    why, once, instead of one finding per server.
    m.lab.nft(&ra, "table inet tern_block {\n  chain forward {\n    type filter hook forward priority -10; policy accept;\n    iifname \"eth1\" meta l4proto udp drop\n  }\n}\n").expect("block udp");
    m.lab.flush_nat(&ra).expect("flush");
    m.wait_connection("a", &ha, "tcp_relay", Duration::from_secs(60));
    let r = wait_finding(&m, "a", &ha, "udp_blocked", &[], Duration::from_secs(20));
    let c = codes(&r);
    assert!(
        !c.iter()
            .any(|c| c == "stun_unreachable" || c == "turn_unreachable"),
        "{r:#}"
    );
    assert!(
        finding(&r, "peer_relayed")["evidence"]
            .as_str()
            .unwrap_or("")
            .contains("udp_blocked"),
        "{r:#}"
    );
    // 8. B's downlink is slow (1 Mbit/s) and A blasts 20 Mbit/s at it through the TCP relay: the
    //    relay's queue to B fills and it drops; A's diagnose hears it from the relay itself.
    let rb = m.lab.ns("rb");
    let tbf = m.lab.exec(
        &rb,
        &[
            "tc", "qdisc", "add", "dev", "eth1", "root", "tbf", "rate", "1mbit", "burst", "32kbit",
            "latency", "400ms",
        ],
    );
    assert!(tbf.status.success(), "{tbf:?}");
    m.lab
        .spawn(
            "blast",
            &ha,
            &bin("tern-nettool"),
            &["udp-blast", &format!("{ip_b}:9"), "20", "20"],
            &[],
        )
        .expect("blast");
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "relay_overloaded",
        &["--peer", "b"],
        Duration::from_secs(20),
    );
    eprintln!(
        "figure: relay's view under overload: {}",
        finding(&r, "relay_overloaded")["evidence"]
    );
    m.lab.stop("blast");
    let _ = m
        .lab
        .exec(&rb, &["tc", "qdisc", "del", "dev", "eth1", "root"]);

    let text = human(&m, "a", &ha);
    eprintln!("UDP blocked, as the user reads it:\n{text}");
    assert!(
        text.contains("ERROR udp_blocked: this network blocks outgoing UDP")
            && text.contains("do:   Allow outgoing UDP"),
        "{text}"
    );
}

#[test]
fn hard_nat_is_named_then_a_lossy_relay_a_wrong_turn_port_and_a_turn_secret_mismatch() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Hard, Nat::Hard);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    m.start(&[("a", &ha), ("b", &hb)]);
    m.wait_connection("a", &ha, "turn_relay", Duration::from_secs(90));

    // 1. Both behind NATs that map per destination: relayed through TURN, and both the path's
    //    reason (from both sides' facts) and diagnose say so.
    let r = wait_finding(&m, "a", &ha, "nat_symmetric", &[], Duration::from_secs(10));
    let relayed = finding(&r, "peer_relayed");
    let ev = relayed["evidence"].as_str().unwrap_or("");
    assert!(
        ev.contains("[nat_symmetric_both]") && ev.contains("both NATs give a new public port"),
        "{relayed:#}"
    );
    assert!(!ev.contains("on the peer"), "no referral: {relayed:#}");
    for (who, ns) in [("a", &ha), ("b", &hb)] {
        let st = m.status(who, ns).expect("status");
        assert_eq!(
            st["peers"][0]["path_reason_code"], "nat_symmetric_both",
            "{who}: {st:#}"
        );
    }
    eprintln!(
        "symmetric NATs, as the user reads it:\n{}",
        human(&m, "a", &ha)
    );

    // 2. An overloaded TURN relay: the server's uplink throttled to 4 Mbit/s (tbf, up to 800 ms
    //    queued) while a sends 6 Mbit/s to b through the relay. The relay measures its own queue
    //    and drops; diagnose names it with those figures, not as a slow or lossy path, and the
    //    console's status shows it.
    let srv = m.lab.ns("srv");
    let ip_b = m.overlay_ip("b", &hb);
    let tc = |m: &Mesh, args: &[&str]| {
        let mut full = vec!["tc", "qdisc"];
        full.extend(args);
        let out = m.lab.exec(&srv, &full);
        assert!(out.status.success(), "tc {args:?}: {:?}", out);
    };
    let shape = "add dev eth0 root tbf rate 4mbit burst 32kbit latency 800ms";
    tc(&m, &shape.split(' ').collect::<Vec<_>>());
    m.lab
        .spawn(
            "blast",
            &ha,
            &bin("tern-nettool"),
            &["udp-blast", &format!("{ip_b}:9"), "6", "30"],
            &[],
        )
        .expect("blast");
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "relay_overloaded",
        &["--peer", "b"],
        Duration::from_secs(40),
    );
    let f = finding(&r, "relay_overloaded");
    let ev = f["evidence"].as_str().unwrap_or("");
    eprintln!(
        "overloaded TURN relay, as the user reads it:\n{}",
        human(&m, "a", &ha)
    );
    // (This host's own share shows only when its own allocation carries the stream: ICE may
    // as well have chosen the pair through b's.)
    assert!(
        ev.contains("the TURN relay says:")
            && ev.contains("wait to go out on its uplink")
            && ev.contains("Mbit/s"),
        "{f:#}"
    );
    assert!(
        !codes(&r)
            .iter()
            .any(|c| c == "path_slow" || c == "path_loss"),
        "not called a slow path: {r:#}"
    );
    let st = m.api("GET", "/api/status", None);
    let load = &st["relay"]["load"];
    assert!(load["bits_per_sec"].as_f64() > Some(1e6), "{st:#}");
    m.lab.stop("blast");
    tc(&m, &["del", "dev", "eth0", "root"]);
    // Once the load is gone, the relay says so within its window.
    m.lab
        .wait_for(
            "the relay's load back to normal",
            Duration::from_secs(20),
            || m.api("GET", "/api/status", None)["relay"]["load"]["overloaded"] == false,
        )
        .expect("relay recovers");

    // 3. The map names a TURN port nothing listens on.
    m.lab.stop("server");
    m.server_args = vec![
        "--turn-urls".into(),
        format!("turn:{SERVER_IP}:3480?transport=udp"),
    ];
    m.start_server();
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "turn_unreachable",
        &[],
        Duration::from_secs(60),
    );
    assert!(
        finding(&r, "turn_unreachable")["subject"]
            .as_str()
            .unwrap_or("")
            .contains(":3480"),
        "{r:#}"
    );

    // 4. A coturn whose secret differs from management's: it answers 401 to the credentials.
    let coturn = m.lab.dir.path().join("coturn.pid");
    m.lab
        .spawn(
            "coturn",
            &srv,
            std::path::Path::new("/usr/bin/turnserver"),
            &[
                "-n",
                "--listening-ip",
                SERVER_IP,
                "--listening-port",
                "3490",
                "--relay-ip",
                SERVER_IP,
                "--min-port",
                "51000",
                "--max-port",
                "51100",
                "--use-auth-secret",
                "--static-auth-secret",
                "not-the-management-secret",
                "--realm",
                "tern",
                "--no-tcp",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--log-file",
                "stdout",
                "--pidfile",
                coturn.to_str().expect("utf8"),
            ],
            &[],
        )
        .expect("coturn");
    m.lab
        .wait_for("coturn listening", Duration::from_secs(10), || {
            String::from_utf8_lossy(&m.lab.exec(&srv, &["ss", "-uln"]).stdout).contains(":3490")
        })
        .expect("coturn up");
    m.lab.stop("server");
    m.server_args = vec![
        "--turn-urls".into(),
        format!("turn:{SERVER_IP}:3490?transport=udp"),
    ];
    m.start_server();
    let r = wait_finding(
        &m,
        "a",
        &ha,
        "turn_auth_failed",
        &[],
        Duration::from_secs(60),
    );
    let f = finding(&r, "turn_auth_failed");
    assert!(
        f["evidence"].as_str().unwrap_or("").contains("401"),
        "{f:#}"
    );
}
