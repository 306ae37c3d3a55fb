//! Public services end to end (issue 12): outside hosts with no agent on the lab's "internet"
//! reach a factory LAN device (192.168.50.10) through `tern-server`'s public ports; the routing
//! peer that carries them sits behind a symmetric NAT (and later has UDP blocked), and a second one
//! sits on an IPv6-only uplink behind NAT64. One server and lab for the whole suite. Needs root;
//! run alone with `cargo nextest run -p tern-tests --test public_services`.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tern_tests::mesh::{bin, skip, Mesh, MB20};
use tern_tests::netns::{Nat, NAT64_PREFIX, SERVER_IP, SERVER_NAT64};

const OUT: &str = "203.0.113.20";
const OUT2: &str = "203.0.113.21";
const OUT3: &str = "203.0.113.22";

fn tool() -> String {
    bin("tern-nettool").display().to_string()
}

/// Runs tern-nettool in `ns`; (success, stdout, stderr).
fn nettool(m: &Mesh, ns: &str, args: &[&str]) -> (bool, String, String) {
    let t = tool();
    let mut full = vec![t.as_str()];
    full.extend(args);
    let out = m.lab.exec(ns, &full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// Starts a tern-nettool server in `ns` and waits until it listens.
fn server(m: &mut Mesh, label: &str, ns: &str, args: &[&str]) {
    let t = bin("tern-nettool");
    m.lab.spawn(label, ns, &t, args, &[]).expect("spawn");
    m.lab
        .wait_for(label, Duration::from_secs(10), || {
            m.lab.log(label).contains("listening")
        })
        .unwrap_or_else(|e| panic!("{e}: {}", m.lab.log(label)));
}

fn public(port: u16) -> String {
    format!("{SERVER_IP}:{port}")
}

fn service_body(
    name: &str,
    protocol: &str,
    port: u16,
    target: &str,
    tport: u16,
    allowed: &[&str],
) -> Value {
    json!({
        "name": name, "protocol": protocol, "public_port": port,
        "target_ip": target, "target_port": tport, "allowed_sources": allowed,
    })
}

fn create(m: &Mesh, body: &Value) -> Value {
    let s = m.api("POST", "/api/services", Some(&body.to_string()));
    assert!(s["id"].is_string(), "service created: {s}");
    s
}

fn service(m: &Mesh, id: &str) -> Value {
    m.api("GET", &format!("/api/services/{id}"), None)
}

/// Polls `cond` every 50 ms up to `limit`; returns how long it took.
fn quickly(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}");
}

/// Uploads 20 MB through `port` to a sink in `lan` (PROXY-aware if `proxy`) and downloads 20 MB
/// from the source on the LAN's 5022 through `down_port`; checks both SHA-256 and returns the
/// source address the sink saw.
fn both_ways(
    m: &mut Mesh,
    from: &str,
    lan: &str,
    up_port: u16,
    down_port: u16,
    label: &str,
    proxy: bool,
) -> String {
    let mut args = vec!["serve", "5021"];
    if proxy {
        args.push("--proxy");
    }
    server(m, label, lan, &args);
    let (ok, sent, err) = nettool(m, from, &["send", &public(up_port), MB20]);
    assert!(
        ok,
        "upload through the public port: {sent} {err}\n{}",
        m.lab.log("server")
    );
    let mut got = String::new();
    m.lab
        .wait_for("sink result", Duration::from_secs(30), || {
            got = m.lab.log(label).lines().nth(1).unwrap_or("").to_string();
            !got.is_empty()
        })
        .expect("sink finished");
    m.lab.stop(label);
    let f = |s: &str, i: usize| s.split_whitespace().nth(i).unwrap_or("").to_string();
    assert_eq!(
        f(&sent, 0),
        f(&got, 0),
        "20 MB arrived intact (sent {sent}, got {got})"
    );
    assert_eq!(f(&got, 1), MB20);
    let (ok, fetched, err) = nettool(m, from, &["fetch", &public(down_port), MB20]);
    assert!(ok, "download through the public port: {fetched} {err}");
    let source_hash = m
        .lab
        .log("source")
        .lines()
        .filter_map(|l| l.strip_prefix("sent "))
        .map(|l| f(l, 0))
        .next()
        .unwrap_or_default();
    assert_eq!(f(&fetched, 0), source_hash, "20 MB downloaded intact");
    eprintln!(
        "{label}: 20 MB up in {}, down in {}",
        f(&sent, 2),
        f(&fetched, 2)
    );
    f(&got, 2)
}

#[test]
fn outside_hosts_reach_factory_ports_through_the_server() {
    if skip() {
        return;
    }
    let mut m = Mesh::with_server_args(Nat::Easy, Nat::Hard, &["--public-ports", "10000-10099"]);
    let hb = m.homes[1].clone();
    let lan = m.lab.add_lan(&hb).expect("lan");
    let out = m.lab.add_internet_host("out", OUT).expect("out");
    let out2 = m.lab.add_internet_host("out2", OUT2).expect("out2");
    let out3 = m.lab.add_internet_host("out3", OUT3).expect("out3");
    m.start(&[("gw", &hb)]);
    let gw_id = m.peer_id("gw", &hb);
    m.route_lan_through(&gw_id);

    // The factory device's services.
    server(&mut m, "echo", &lan, &["echo", "5020"]);
    server(&mut m, "source", &lan, &["source", "5022", MB20]);
    server(&mut m, "udp-echo", &lan, &["udp-echo", "5030"]);

    let plc = create(
        &m,
        &service_body(
            "plc",
            "tcp",
            10001,
            "192.168.50.10",
            5020,
            &[&format!("{OUT}/32"), &format!("{OUT2}/32")],
        ),
    );
    let mut up = service_body(
        "upload",
        "tcp",
        10002,
        "192.168.50.10",
        5021,
        &["0.0.0.0/0"],
    );
    up["proxy_protocol"] = json!(true);
    let up_id = create(&m, &up)["id"].as_str().expect("id").to_string();
    create(
        &m,
        &service_body(
            "download",
            "tcp",
            10003,
            "192.168.50.10",
            5022,
            &["0.0.0.0/0"],
        ),
    );
    let udp = create(
        &m,
        &service_body(
            "telemetry",
            "udp",
            10004,
            "192.168.50.10",
            5030,
            &["0.0.0.0/0"],
        ),
    );
    assert_eq!(plc["public_address"], format!("{SERVER_IP}:10001"), "{plc}");
    let plc_id = plc["id"].as_str().expect("id").to_string();

    // The routing peer learns what it carries; the first connection works within seconds.
    let t0 = Instant::now();
    m.lab
        .wait_for(
            "first connection through the public port",
            Duration::from_secs(30),
            || nettool(&m, &out, &["connects", &public(10001), "1"]).0,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{:?}\n--- gw\n{}\n--- server\n{}",
                m.status("gw", &hb),
                m.lab.log("gw"),
                m.lab.log("server")
            )
        });
    eprintln!(
        "figure: first public connection {:?} after the services were created",
        t0.elapsed()
    );
    m.lab
        .wait_for(
            "gw lists the four services it carries",
            Duration::from_secs(10),
            || {
                m.status("gw", &hb)
                    .is_some_and(|st| st["services"].as_array().map(Vec::len) == Some(4))
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}", m.status("gw", &hb)));
    let via = service(&m, &plc_id)["reached_via"].clone();
    assert_eq!(via, "routing peer gw", "{via}");

    // TCP: 20 MB each way, intact; with PROXY protocol the device sees the outside host.
    let seen = both_ways(&mut m, &out, &lan, 10002, 10003, "sink-proxy", true);
    assert_eq!(seen, OUT, "the PROXY header names the outside client");
    // Every uploaded byte is counted, also those sent while the tunnel was being set up.
    let stats = service(&m, &up_id)["stats"].clone();
    assert!(
        stats["bytes_in"].as_u64() >= Some(20_000_000),
        "20 MB went in: {stats}"
    );

    // 100 concurrent connections of 1 MB each (echoed back and compared).
    let (ok, res, err) = nettool(&m, &out, &["burst", &public(10001), "100", "1000000"]);
    assert!(ok, "burst: {res} {err}\n{}", m.lab.log("server"));
    assert_eq!(res, "ok 100 of 100");
    let (_, times, _) = nettool(&m, &out, &["connects", &public(10001), "50"]);
    eprintln!("figure: connection set-up through the public port (50 connects): {times} ms");

    // UDP: 1,000 request/response datagrams from two outside hosts at once; every reply reaches
    // the host that asked.
    let t = bin("tern-nettool");
    let dst = public(10004);
    m.lab
        .spawn("ping-out2", &out2, &t, &["udp-ping", &dst, "1000"], &[])
        .expect("spawn");
    let (ok, res, err) = nettool(&m, &out, &["udp-ping", &dst, "1000"]);
    assert!(ok, "{err}");
    let mut res2 = String::new();
    m.lab
        .wait_for("second UDP client", Duration::from_secs(60), || {
            res2 = m.lab.log("ping-out2").trim().to_string();
            res2.starts_with("sent")
        })
        .expect("second client done");
    eprintln!("figure: UDP through the public port: {res} / {res2}");
    assert_eq!(res, "sent 1000 received 1000 wrong 0");
    assert_eq!(res2, "sent 1000 received 1000 wrong 0");
    let u = service(&m, udp["id"].as_str().expect("id"));
    assert!(
        u["stats"]["connections_total"].as_u64() >= Some(2),
        "two flows: {u}"
    );

    // A source outside allowed_sources is refused (and counted).
    let t0 = Instant::now();
    let (ok, _, _) = nettool(&m, &out3, &["connects", &public(10001), "1"]);
    assert!(!ok, "203.0.113.22 is not allowed");
    assert!(t0.elapsed() < Duration::from_secs(2), "refused at once");
    assert!(service(&m, &plc_id)["stats"]["refused_allowlist"].as_u64() >= Some(1));

    // 10,000 half-open connections from one source do not stop another source.
    let flood = format!(
        "ulimit -n 20000; exec {} flood {} 10000 60",
        tool(),
        public(10001)
    );
    let sh = std::path::PathBuf::from("/bin/sh");
    m.lab
        .spawn("flood", &out, &sh, &["-c", &flood], &[])
        .expect("flood");
    m.lab
        .wait_for("flood connections opened", Duration::from_secs(60), || {
            m.lab.log("flood").contains("opened")
        })
        .unwrap_or_else(|e| panic!("{e}: {}", m.lab.log("flood")));
    eprintln!("flood: {}", m.lab.log("flood").trim());
    let (ok, res, err) = nettool(&m, &out2, &["burst", &public(10001), "4", "1000000"]);
    assert!(
        ok && res == "ok 4 of 4",
        "second source during the flood: {res} {err}"
    );
    let stats = service(&m, &plc_id)["stats"].clone();
    assert!(
        stats["refused_limit"].as_u64() > Some(9_000),
        "the flood hit the per-source cap: {stats}"
    );
    m.lab.stop("flood");

    // Disabling closes the port within a second and ends its connections.
    m.lab
        .spawn("hold", &out, &t, &["hold", &public(10001), "30"], &[])
        .expect("hold");
    m.lab
        .wait_for("held connection", Duration::from_secs(10), || {
            m.lab.log("hold").contains("connected")
        })
        .expect("connected");
    std::thread::sleep(Duration::from_millis(300));
    let mut off = service_body(
        "plc",
        "tcp",
        10001,
        "192.168.50.10",
        5020,
        &[&format!("{OUT}/32"), &format!("{OUT2}/32")],
    );
    off["enabled"] = json!(false);
    let t0 = Instant::now();
    let r = m.api(
        "PUT",
        &format!("/api/services/{plc_id}"),
        Some(&off.to_string()),
    );
    assert_eq!(r["enabled"], false, "{r}");
    let took = quickly(
        "held connection closed after disabling",
        Duration::from_secs(3),
        || m.lab.log("hold").contains("closed after"),
    );
    eprintln!(
        "figure: disabling closed the open connection after {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "closed within a second ({took:?})"
    );
    assert!(
        !nettool(&m, &out, &["connects", &public(10001), "1"]).0,
        "port closed"
    );
    let on = m.api(
        "PUT",
        &format!("/api/services/{plc_id}"),
        Some(
            &service_body(
                "plc",
                "tcp",
                10001,
                "192.168.50.10",
                5020,
                &[&format!("{OUT}/32"), &format!("{OUT2}/32")],
            )
            .to_string(),
        ),
    );
    assert_eq!(on["enabled"], true, "{on}");

    // The routing peer stops: new connections are refused at once and the API says why. With UDP
    // blocked at its router, it comes back and serves again (tunnels need only TCP).
    m.lab
        .wait_for("service back on", Duration::from_secs(10), || {
            nettool(&m, &out, &["connects", &public(10001), "1"]).0
        })
        .expect("re-enabled");
    m.lab.stop("gw");
    let t0 = Instant::now();
    let (ok, _, _) = nettool(&m, &out, &["connects", &public(10001), "1"]);
    assert!(!ok, "no agent, no connection");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refused at once, took {:?}",
        t0.elapsed()
    );
    let err = service(&m, &plc_id)["stats"]["last_error"].clone();
    assert_eq!(err, "target agent gw is offline", "{err}");
    let rb = m.lab.ns("rb");
    m.lab
        .nft(&rb, "table inet tern_noudp {\n  chain no_udp {\n    type filter hook forward priority -5; policy accept;\n    meta l4proto udp drop\n  }\n}\n")
        .expect("block UDP");
    m.up("gw", &hb, false);
    m.lab
        .wait_for(
            "served again after the restart",
            Duration::from_secs(60),
            || nettool(&m, &out, &["connects", &public(10001), "1"]).0,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("gw")));
    let seen = both_ways(&mut m, &out, &lan, 10002, 10003, "sink-noudp", true);
    assert_eq!(seen, OUT);

    // `tern expose`: refused until an admin allows one of the peer's groups, then a local port of
    // the routing peer is public while the command runs and gone within a second after Ctrl-C.
    server(&mut m, "local-echo", &hb, &["echo", "8080"]);
    let mut expose = vec![bin("tern").display().to_string()];
    expose.extend(m.agent_args("gw"));
    expose.extend(["expose", "tcp", "8080", "--public-port", "10050"].map(String::from));
    let refs: Vec<&str> = expose.iter().map(String::as_str).collect();
    let denied = m.lab.exec(&hb, &refs);
    let msg = String::from_utf8_lossy(&denied.stderr).to_string();
    assert!(
        !denied.status.success() && msg.contains("Settings"),
        "refused, saying how to allow it: {msg}"
    );
    let g = m.api("POST", "/api/groups", Some(r#"{"name":"sharers"}"#));
    let gid = g["id"].as_str().expect("group id").to_string();
    let p = m.api(
        "PUT",
        &format!("/api/peers/{}", m.peer_id("gw", &hb)),
        Some(&format!(r#"{{"name":"gw","groups":["all","{gid}"]}}"#)),
    );
    assert!(p["groups"].to_string().contains(&gid), "{p}");
    let mut settings = m.api("GET", "/api/settings", None);
    let obj = settings.as_object_mut().expect("settings");
    obj.remove("network_serial");
    obj.insert("expose_groups".into(), json!([gid]));
    let s = m.api("PUT", "/api/settings", Some(&settings.to_string()));
    assert_eq!(s["expose_groups"], json!([gid]), "{s}");
    let tern = bin("tern");
    m.lab
        .spawn("expose", &hb, &tern, &refs[1..], &[])
        .expect("expose");
    m.lab
        .wait_for("expose running", Duration::from_secs(10), || {
            m.lab.log("expose").contains("publishing")
        })
        .unwrap_or_else(|e| panic!("{e}: {}", m.lab.log("expose")));
    eprintln!("{}", m.lab.log("expose").trim());
    m.lab
        .wait_for("exposed port reachable", Duration::from_secs(20), || {
            nettool(&m, &out3, &["connects", &public(10050), "1"]).0
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("gw")));
    let listed = m.api("GET", "/api/services", None);
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .any(|s| s["public_port"] == 10050 && s["ephemeral"] == true),
        "{listed}"
    );
    let t0 = Instant::now();
    m.lab.stop("expose");
    quickly("exposed port closed", Duration::from_secs(3), || {
        !nettool(&m, &out3, &["connects", &public(10050), "1"]).0
    });
    eprintln!(
        "figure: tern expose port closed {:?} after the command was stopped",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_millis(1500));

    // The same TCP check with a routing peer on an IPv6-only uplink behind NAT64.
    let h6 = m.lab.add_nat64_home().expect("nat64 home");
    let lan6 = m
        .lab
        .add_lan_named(&h6, "lan6", "192.168.60")
        .expect("lan6");
    m.up_with(
        "gw6",
        &h6,
        true,
        &format!("http://[{SERVER_NAT64}]:443"),
        &["--nat64-prefix", NAT64_PREFIX],
    );
    m.lab
        .wait_for("gw6 up", Duration::from_secs(30), || {
            m.status("gw6", &h6).is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("gw6")));
    let gw6 = m.peer_id("gw6", &h6);
    let r = m.api(
        "POST",
        "/api/routes",
        Some(&format!(
            r#"{{"network":"192.168.60.0/24","routing_peer":"{gw6}","groups":["all"]}}"#
        )),
    );
    assert_eq!(r["network"], "192.168.60.0/24", "{r}");
    m.lab.stop("source");
    server(&mut m, "source", &lan6, &["source", "5022", MB20]);
    create(
        &m,
        &service_body(
            "upload6",
            "tcp",
            10060,
            "192.168.60.10",
            5021,
            &["0.0.0.0/0"],
        ),
    );
    create(
        &m,
        &service_body(
            "download6",
            "tcp",
            10061,
            "192.168.60.10",
            5022,
            &["0.0.0.0/0"],
        ),
    );
    m.lab
        .wait_for(
            "NAT64 routing peer carries its services",
            Duration::from_secs(30),
            || nettool(&m, &out, &["fetch", &public(10061), MB20]).0,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("gw6")));
    both_ways(&mut m, &out, &lan6, 10060, 10061, "sink-nat64", false);
    // Its status names the address outsiders use, not the NAT64 form it dials.
    let st = m.status("gw6", &h6).expect("status");
    let published: Vec<String> = st["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["public_address"].as_str().map(str::to_string))
        .collect();
    assert!(
        !published.is_empty()
            && published
                .iter()
                .all(|a| a.starts_with(&format!("{SERVER_IP}:"))),
        "{published:?}"
    );

    // A removed routing peer carries nothing more (security review, round two, item 3): a
    // connection held through it ends, new ones are refused.
    m.lab
        .spawn(
            "hold-removed",
            &out,
            &t,
            &["hold", &public(10001), "30"],
            &[],
        )
        .expect("hold");
    m.lab
        .wait_for("held connection", Duration::from_secs(10), || {
            m.lab.log("hold-removed").contains("connected")
        })
        .expect("connected");
    let gw_now = m.peer_id("gw", &hb);
    m.api("DELETE", &format!("/api/peers/{gw_now}"), None);
    let took = quickly(
        "held connection closed after its routing peer was removed",
        Duration::from_secs(5),
        || m.lab.log("hold-removed").contains("closed after"),
    );
    eprintln!("figure: removing the routing peer closed the open connection after {took:?}");
    assert!(
        !nettool(&m, &out, &["connects", &public(10001), "1"]).0,
        "no carrier, no connection"
    );

    // Metrics name every service.
    let text = m.api_text("/metrics");
    assert!(text.contains("tern_public_service_connections_total{service=\"plc\",protocol=\"tcp\",port=\"10001\"}"), "{text}");
}
