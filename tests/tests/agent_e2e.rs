//! End-to-end: real `tern-server` and `tern` agents on real TUN devices in network namespaces
//! behind nftables NAT routers, with real traffic (ping, a 20 MB TCP transfer with checksum).
//! Needs root (namespaces, TUN); skipped with a message otherwise. Run alone with
//! `cargo nextest run -p tern-tests --test agent_e2e`.

use serde_json::Value;
use std::time::{Duration, Instant};
use tern_tests::mesh::{bin, skip, Mesh};
use tern_tests::netns::{Nat, NAT64_PREFIX, SERVER_IP, SERVER_NAT64};

/// `who`'s status entry for the lab's LAN route.
fn route_of(m: &Mesh, who: &str, ns: &str) -> Option<Value> {
    m.status(who, ns).and_then(|s| {
        s["routes"].as_array().and_then(|rs| {
            rs.iter()
                .find(|r| r["network"] == "192.168.50.0/24")
                .cloned()
        })
    })
}

fn first_ping(m: &Mesh, ns: &str, ip: &str, started: Instant) -> Duration {
    m.lab
        .wait_for("first ping", Duration::from_secs(60), || {
            m.lab
                .exec(ns, &["ping", "-c", "1", "-W", "1", ip])
                .status
                .success()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    started.elapsed()
}

#[test]
fn a_easy_nat_both_sides_gives_a_direct_path_and_g_restart_keeps_the_address() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let t0 = Instant::now();
    m.start(&[("a", &ha), ("b", &hb)]);
    let ip_a = m.overlay_ip("a", &ha);
    let ip_b = m.overlay_ip("b", &hb);
    eprintln!(
        "figure: tern up -> first ping (easy/easy): {:?}",
        first_ping(&m, &ha, &ip_b, t0)
    );
    let p = m.wait_connection("a", &ha, "direct", Duration::from_secs(60));
    eprintln!("a sees b: {p}");
    assert!(m.ping(&ha, &ip_b), "ping a -> b");
    let (ok, out) = tern_ping(&m, "a", &ha, "b", 2);
    assert!(
        ok && out.contains(": direct,") && out.contains("2/2 answered"),
        "{out}"
    );
    let (ok, out) = tern_ping(&m, "a", &ha, "nobody", 1);
    assert!(!ok && out.contains("no peer named \"nobody\""), "{out}");
    assert!(m.ping(&hb, &ip_a), "ping b -> a");
    m.transfer(&ha, &hb, &ip_b, "sink-a-b");

    // `tern status | head` as a user pipes it: a reader that goes away ends the command
    // quietly (exit 0), not with a panic about a broken pipe.
    let cmd = format!(
        "set -o pipefail; {} {} status -d | true",
        bin("tern").display(),
        m.agent_args("a").join(" ")
    );
    let out = m.lab.exec(&ha, &["bash", "-c", &cmd]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("panicked"),
        "{:?}: {err}",
        out.status
    );

    // The admin API (and console) show what the agent itself reports: a reaches b directly.
    let (id_a, id_b) = (m.peer_id("a", &ha), m.peer_id("b", &hb));
    m.lab
        .wait_for("a's connection report", Duration::from_secs(15), || {
            let peer = m.api("GET", &format!("/api/peers/{id_a}"), None);
            peer["connections"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["peer_id"] == id_b.as_str() && c["kind"] == "direct")
            })
        })
        .expect("management shows a -> b as direct");

    // g. restart A without the setup key: same overlay address, tunnel back.
    m.lab.stop("a");
    m.up("a", &ha, false);
    m.lab
        .wait_for("a back", Duration::from_secs(30), || {
            m.status("a", &ha).is_some()
        })
        .expect("a back");
    assert_eq!(
        m.overlay_ip("a", &ha),
        ip_a,
        "same overlay IP after a restart without setup key"
    );
    first_ping(&m, &ha, &ip_b, Instant::now());
}

#[test]
fn c_udp_blocked_on_one_side_falls_back_to_the_tcp_relay() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    // Home A's network lets no UDP out: only TCP (443 to the server) works.
    let ra = m.lab.ns("ra");
    m.lab.nft(&ra, "table inet tern_block {\n  chain forward {\n    type filter hook forward priority -10; policy accept;\n    iifname \"eth1\" meta l4proto udp drop\n  }\n}\n").expect("block udp");
    let t0 = Instant::now();
    m.start(&[("a", &ha), ("b", &hb)]);
    let ip_b = m.overlay_ip("b", &hb);
    eprintln!(
        "figure: tern up -> first ping (UDP blocked): {:?}",
        first_ping(&m, &ha, &ip_b, t0)
    );
    m.wait_connection("a", &ha, "tcp_relay", Duration::from_secs(60));
    assert!(m.ping(&ha, &ip_b));
    m.transfer(&ha, &hb, &ip_b, "sink-tcp");
    // UDP comes back: `tern ping` follows the path from the TCP relay to direct and stops at the
    // first direct reply (bounded by its count); a pair that settles on TURN is upgraded.
    let out = m
        .lab
        .exec(&ra, &["nft", "delete", "table", "inet", "tern_block"]);
    assert!(out.status.success(), "{out:?}");
    m.lab.flush_nat(&ra).expect("flush");
    let t0 = Instant::now();
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args("a"));
    args.extend(["ping", "b", "-c", "90", "--until-direct"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = m.lab.exec(&ha, &refs);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // From the TCP relay (through TURN first when a pair settles there, then upgraded) to
    // direct.
    assert!(
        text.contains("via the TCP relay")
            && text.contains("path changed:")
            && text.contains("-> direct")
            && text.contains(": direct,"),
        "{text}"
    );
    eprintln!("figure: UDP back -> direct path in {:?}", t0.elapsed());
}

/// `tern ping TARGET -c N` run by `who` in `ns`: (exit success, stdout + stderr).
fn tern_ping(m: &Mesh, who: &str, ns: &str, target: &str, n: u32) -> (bool, String) {
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args(who));
    args.extend(["ping".into(), target.into(), "-c".into(), n.to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = m.lab.exec(ns, &refs);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn b_hard_nat_both_sides_is_relayed_through_turn() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Hard, Nat::Hard);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let t0 = Instant::now();
    m.start(&[("a", &ha), ("b", &hb)]);
    let ip_b = m.overlay_ip("b", &hb);
    eprintln!(
        "figure: tern up -> first ping (hard/hard): {:?}",
        first_ping(&m, &ha, &ip_b, t0)
    );
    m.wait_connection("a", &ha, "turn_relay", Duration::from_secs(90));
    assert!(m.ping(&ha, &ip_b));
    // Relayed through an agent's own allocation on its WireGuard port: a shows its relayed
    // address, and one end of the pair is a relayed address on the server.
    let st = m.status("a", &ha).expect("status");
    let relayed = st["relays"][0]["relayed"].as_str().unwrap_or("");
    assert!(relayed.starts_with(&format!("{SERVER_IP}:")), "{st:#}");
    let pair = format!(
        "{} -> {}",
        st["peers"][0]["local_candidate"].as_str().unwrap_or(""),
        st["peers"][0]["remote_candidate"].as_str().unwrap_or("")
    );
    assert!(pair.contains(&format!("relay {SERVER_IP}:")), "{pair}");
    eprintln!("TURN pair at a: {pair}");
    // `tern ping` names the path each reply took.
    let (ok, out) = tern_ping(&m, "a", &ha, "b", 2);
    assert!(
        ok && out.contains("reply from b (") && out.contains("via TURN"),
        "{out}"
    );
    m.transfer(&ha, &hb, &ip_b, "sink-turn");
}

#[test]
fn d_path_mtu_black_hole_does_not_stop_a_bulk_transfer() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    m.lab.pmtu_blackhole(1280).expect("black hole");
    // The black hole is real: a 1,400-byte DF ping to the server dies silently.
    let probe = m.lab.exec(
        &ha,
        &[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1372", SERVER_IP,
        ],
    );
    assert!(
        !probe.status.success(),
        "a 1400-byte DF packet must not cross the 1280 path"
    );
    m.start(&[("a", &ha), ("b", &hb)]);
    let ip_b = m.overlay_ip("b", &hb);
    m.wait_connection("a", &ha, "direct", Duration::from_secs(60));
    m.transfer(&ha, &hb, &ip_b, "sink-pmtu");
    // Full-size packets through the tunnel (1280-byte inner, 1340 outer) make it too.
    let big = m.lab.exec(
        &ha,
        &[
            "ping", "-c", "3", "-W", "2", "-M", "do", "-s", "1252", &ip_b,
        ],
    );
    assert!(
        big.status.success(),
        "1280-byte pings through the tunnel: {}",
        String::from_utf8_lossy(&big.stdout)
    );
}

#[test]
fn e_tunnels_survive_a_control_plane_outage_and_f_nat_rebinding() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    m.start(&[("a", &ha), ("b", &hb)]);
    let ip_b = m.overlay_ip("b", &hb);
    m.wait_connection("a", &ha, "direct", Duration::from_secs(60));

    // e. Management, signal and relay go away: the direct tunnel keeps working.
    m.lab.stop("server");
    // Once the agent itself reports management unreachable, the outage is real on its side.
    m.lab
        .wait_for(
            "a reports management unreachable",
            Duration::from_secs(10),
            || {
                m.status("a", &ha)
                    .is_some_and(|s| s["management"] == false && s["signal"] == false)
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}", m.status("a", &ha)));
    assert!(m.ping(&ha, &ip_b), "ping with the control plane down");
    // Restarted: agents resync, and a newly joined third peer becomes reachable.
    m.start_server();
    let hc = m.lab.add_home("c", Nat::Easy).expect("home c");
    m.up("c", &hc, true);
    m.lab
        .wait_for("c up", Duration::from_secs(60), || {
            m.status("c", &hc).is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("c")));
    let ip_c = m.overlay_ip("c", &hc);
    let took = m
        .lab
        .wait_for("a reaches the new peer c", Duration::from_secs(60), || {
            m.lab
                .exec(&ha, &["ping", "-c", "1", "-W", "1", &ip_c])
                .status
                .success()
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n--- a:\n{}\n--- c:\n{}",
                m.lab.log("a"),
                m.lab.log("c")
            )
        });
    eprintln!("figure: after the restart, a reached new peer c in {took:?}");

    // f. Router A forgets its NAT mappings (conntrack flushed): traffic resumes within 5 s.
    assert!(m.ping(&ha, &ip_b));
    let ra = m.lab.ns("ra");
    m.lab.flush_nat(&ra).expect("flush");
    let t0 = Instant::now();
    let resumed = m.lab.wait_for(
        "traffic after NAT rebinding",
        Duration::from_secs(5),
        || {
            m.lab
                .exec(&ha, &["ping", "-c", "1", "-W", "1", &ip_b])
                .status
                .success()
        },
    );
    eprintln!(
        "figure: traffic resumed {:?} after the NAT flush",
        t0.elapsed()
    );
    resumed.unwrap_or_else(|e| panic!("{e}\n--- a:\n{}", m.lab.log("a")));
}

#[test]
fn routing_peer_takes_a_nat_ed_laptop_into_the_factory_lan_and_conflicts_are_refused() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Hard, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let lan = m.lab.add_lan(&hb).expect("lan");
    m.lab.exec(&hb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    m.start(&[("a", &ha), ("b", &hb)]);
    let b_id = m.status("b", &hb).expect("status")["peer_id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = m.api("POST", "/api/routes", Some(&format!(
        r#"{{"network":"192.168.50.0/24","routing_peer":"{b_id}","groups":["all"],"masquerade":true,"description":"factory"}}"#
    )));
    assert_eq!(r["network"], "192.168.50.0/24", "route created: {r}");
    // A route that overlaps the laptop's own LAN (192.0.2.0/24): management warns (a reports
    // that it reaches that network), and if the admin confirms, a does not install it.
    let body = format!(r#"{{"network":"192.0.2.0/24","routing_peer":"{b_id}","groups":["all"]}}"#);
    let mut warned = Value::Null;
    m.lab
        .wait_for(
            "the overlap with a's LAN is flagged",
            Duration::from_secs(20),
            || {
                warned = m.api("POST", "/api/routes", Some(&body));
                if let Some(id) = warned["id"].as_str() {
                    // a had not reported its networks yet: undo and ask again.
                    m.api("DELETE", &format!("/api/routes/{id}"), None);
                    return false;
                }
                warned["error"] == "needs_confirmation"
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {warned}"));
    assert!(
        warned["message"]
            .as_str()
            .unwrap_or("")
            .contains("which a reaches directly"),
        "{warned}"
    );
    assert_eq!(warned["field"], "network");
    let confirmed = body.replacen('{', r#"{"confirm_overlap":true,"#, 1);
    let r2 = m.api("POST", "/api/routes", Some(&confirmed));
    assert_eq!(r2["network"], "192.0.2.0/24", "{r2}");
    m.lab
        .wait_for("route installed on a", Duration::from_secs(30), || {
            m.status("a", &ha).is_some_and(|s| {
                s["routes"].as_array().is_some_and(|rs| {
                    rs.iter()
                        .any(|r| r["network"] == "192.168.50.0/24" && r["state"] == "installed")
                        && rs.iter().any(|r| r["network"] == "192.0.2.0/24")
                })
            })
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", m.status("a", &ha), m.lab.log("a")));
    let s = m.status("a", &ha).expect("status");
    let conflict = s["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["network"] == "192.0.2.0/24")
        .expect("listed")
        .clone();
    assert!(
        conflict["state"]
            .as_str()
            .expect("state")
            .starts_with("conflict"),
        "{conflict}"
    );
    let kernel = m.lab.exec(
        &ha,
        &["ip", "route", "show", "192.0.2.0/24", "dev", "tern0"],
    );
    assert!(
        String::from_utf8_lossy(&kernel.stdout).trim().is_empty(),
        "conflicting route not installed"
    );
    let b_status = m.status("b", &hb).expect("status");
    assert!(
        b_status["serving"].to_string().contains("192.168.50.0/24"),
        "{b_status}"
    );
    // Management checks routes against what the routing peer reports it reaches: b has the
    // factory LAN, but no route to a's home network 192.0.2.0/24.
    let serving = |net: &str| -> String {
        m.api("GET", "/api/routes", None)
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["network"] == net).cloned())
            .and_then(|r| r["serving"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    m.lab
        .wait_for(
            "the route shows it is served by b",
            Duration::from_secs(15),
            || serving("192.168.50.0/24") == "served by b",
        )
        .unwrap_or_else(|e| panic!("{e}: {}", serving("192.168.50.0/24")));
    let not_served = serving("192.0.2.0/24");
    assert!(
        not_served.starts_with("not served: b has no route to 192.0.2.0/24"),
        "{not_served}"
    );

    let t0 = Instant::now();
    m.lab
        .wait_for(
            "laptop pings the LAN device",
            Duration::from_secs(60),
            || {
                m.lab
                    .exec(&ha, &["ping", "-c", "1", "-W", "1", "192.168.50.10"])
                    .status
                    .success()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n--- a\n{}\n--- b\n{}", m.lab.log("a"), m.lab.log("b")));
    eprintln!(
        "figure: laptop reached the LAN device {:?} after the route was installed",
        t0.elapsed()
    );
    let seen = m.transfer(&ha, &lan, "192.168.50.10", "sink-lan");
    assert_eq!(
        seen, "192.168.50.1",
        "with masquerade the LAN device sees the routing peer's LAN address"
    );

    // Crash and restart: the stale table is replaced, not piled up; the LAN is served again.
    let tables = |m: &Mesh| {
        String::from_utf8_lossy(&m.lab.exec(&hb, &["nft", "list", "tables"]).stdout)
            .matches("tern_tern0")
            .count()
    };
    assert_eq!(tables(&m), 1, "routing peer has its table while up");
    m.lab.crash("b");
    assert_eq!(tables(&m), 1, "a crash leaves the table behind");
    m.up("b", &hb, false);
    m.lab
        .wait_for(
            "LAN served again after the crash",
            Duration::from_secs(60),
            || {
                m.lab
                    .exec(&ha, &["ping", "-c", "1", "-W", "1", "192.168.50.10"])
                    .status
                    .success()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("b")));
    assert_eq!(tables(&m), 1, "one table after the restart");
    // Clean removal: tern down on the routing peer deletes its nftables table.
    let table = |m: &Mesh| tables(m) > 0;
    let mut down = vec![bin("tern").display().to_string()];
    down.extend(m.agent_args("b"));
    down.push("down".into());
    let refs: Vec<&str> = down.iter().map(String::as_str).collect();
    assert!(m.lab.exec(&hb, &refs).status.success());
    m.lab
        .wait_for("rules removed", Duration::from_secs(10), || !table(&m))
        .expect("nft table removed on tern down");
}

#[test]
fn policies_are_enforced_by_the_agents() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let hc = m.lab.add_home("c", Nat::Easy).expect("home c");
    m.start(&[("a", &ha), ("b", &hb), ("c", &hc)]);
    let (a_id, b_id) = (m.peer_id("a", &ha), m.peer_id("b", &hb));
    let ip_b = m.overlay_ip("b", &hb);
    let ip_a = m.overlay_ip("a", &ha);
    // staff (a) -> servers (b): TCP 5001 only; the default All<->All policy goes away.
    let staff = m.api("POST", "/api/groups", Some(r#"{"name":"staff"}"#))["id"]
        .as_str()
        .expect("group")
        .to_string();
    let servers = m.api("POST", "/api/groups", Some(r#"{"name":"servers"}"#))["id"]
        .as_str()
        .expect("group")
        .to_string();
    m.api(
        "PUT",
        &format!("/api/peers/{a_id}"),
        Some(&format!(r#"{{"groups":["{staff}"]}}"#)),
    );
    m.api(
        "PUT",
        &format!("/api/peers/{b_id}"),
        Some(&format!(r#"{{"groups":["{servers}"]}}"#)),
    );
    let p = m.api(
        "POST",
        "/api/policies",
        Some(&format!(
            r#"{{"name":"sink-only","protocol":"tcp","ports":["5001"],"bidirectional":false,"sources":["{staff}"],"destinations":["{servers}"]}}"#
        )),
    );
    assert_eq!(p["name"], "sink-only", "{p}");
    m.delete_policy_named("default");
    // c is in no policy: its map empties and it reaches nobody.
    m.lab
        .wait_for("c sees nobody", Duration::from_secs(20), || {
            m.status("c", &hc)
                .is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.is_empty()))
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", m.status("c", &hc)));
    assert!(
        !m.lab
            .exec(&hc, &["ping", "-c", "1", "-W", "1", &ip_b])
            .status
            .success(),
        "c reaches nobody"
    );
    m.wait_connection("a", &ha, "direct", Duration::from_secs(60));
    // a -> b: TCP 5001 works, ping does not; b -> a: nothing new.
    m.transfer(&ha, &hb, &ip_b, "sink-policy");
    assert!(
        !m.lab
            .exec(&ha, &["ping", "-c", "2", "-W", "1", &ip_b])
            .status
            .success(),
        "ping is not allowed"
    );
    assert!(
        !m.lab
            .exec(&hb, &["ping", "-c", "2", "-W", "1", &ip_a])
            .status
            .success(),
        "b may not open flows to a"
    );
    let dropped = m.status("b", &hb).expect("status")["firewall_dropped"]
        .as_u64()
        .unwrap_or(0);
    assert!(dropped >= 2, "b counted the dropped pings: {dropped}");
    // Both ends count: a counted the pings no policy allows as it sent them, and each side's
    // status says what it may send to the other.
    let peer_of = |who: &str, ns: &str| m.status(who, ns).expect("status")["peers"][0].clone();
    let a_view = peer_of("a", &ha);
    assert_eq!(a_view["access"], "tcp 5001", "{a_view}");
    assert!(
        a_view["sent_without_policy"].as_u64().unwrap_or(0) >= 2,
        "a counted its pings: {a_view}"
    );
    let b_view = peer_of("b", &hb);
    assert_eq!(b_view["access"], "none", "{b_view}");
    assert!(
        b_view["sent_without_policy"].as_u64().unwrap_or(0) >= 2,
        "b counted its pings: {b_view}"
    );

    // An admin removes c: its agent says so and stops retrying (it does not claim an outage).
    let c_id = m.peer_id("c", &hc);
    m.api("DELETE", &format!("/api/peers/{c_id}"), None);
    m.lab
        .wait_for("c says it was removed", Duration::from_secs(30), || {
            m.status("c", &hc)
                .is_some_and(|s| s["management_refused"] == "removed")
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", m.status("c", &hc), m.lab.log("c")));
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args("c"));
    args.push("status".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let human = String::from_utf8_lossy(&m.lab.exec(&hc, &refs).stdout).into_owned();
    assert!(human.contains("an admin removed this peer"), "{human}");
    assert!(!human.contains("null"), "{human}");
}

#[test]
fn ha_routing_peers_fail_over_within_ten_seconds() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Hard, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let hc = m.lab.add_home("c", Nat::Easy).expect("home c");
    let lan = m.lab.add_shared_lan(&[&hb, &hc]).expect("lan");
    m.start(&[("a", &ha), ("b", &hb), ("c", &hc)]);
    let (b_id, c_id) = (m.peer_id("b", &hb), m.peer_id("c", &hc));
    for (peer, metric) in [(&b_id, 10), (&c_id, 20)] {
        let r = m.api(
            "POST",
            "/api/routes",
            Some(&format!(r#"{{"network":"192.168.50.0/24","routing_peer":"{peer}","metric":{metric},"groups":["all"],"masquerade":true}}"#)),
        );
        assert_eq!(r["network"], "192.168.50.0/24", "{r}");
    }
    let via = |m: &Mesh| -> String {
        m.status("a", &ha)
            .and_then(|s| {
                s["routes"]
                    .as_array()?
                    .iter()
                    .find(|r| r["network"] == "192.168.50.0/24" && r["state"] == "installed")
                    .cloned()
            })
            .map(|r| r["peer_id"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    m.lab
        .wait_for(
            "route via the preferred peer b",
            Duration::from_secs(30),
            || via(&m) == b_id,
        )
        .expect("via b");
    m.lab
        .wait_for("LAN reachable", Duration::from_secs(60), || {
            m.lab
                .exec(&ha, &["ping", "-c", "1", "-W", "1", "192.168.50.10"])
                .status
                .success()
        })
        .expect("ping via b");
    assert_eq!(
        m.transfer(&ha, &lan, "192.168.50.10", "sink-ha-b"),
        "192.168.50.1",
        "served by b"
    );

    // The preferred routing peer goes down.
    m.lab.stop("b");
    let t0 = Instant::now();
    let took = m
        .lab
        .wait_for("traffic through c", Duration::from_secs(10), || {
            m.lab
                .exec(&ha, &["ping", "-c", "1", "-W", "1", "192.168.50.10"])
                .status
                .success()
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", m.status("a", &ha), m.lab.log("a")));
    eprintln!("figure: failover to the second routing peer took {took:?}");
    assert_eq!(via(&m), c_id, "route now via c");
    assert!(t0.elapsed() <= Duration::from_secs(10));
    assert_eq!(
        m.transfer(&ha, &lan, "192.168.50.10", "sink-ha-c"),
        "192.168.50.2",
        "served by c"
    );
    // No flapping: stays on c.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(via(&m), c_id);
}

#[test]
fn route_access_follows_policies_tcp_only_for_staff() {
    if skip() {
        return;
    }
    let mut m = Mesh::new(Nat::Hard, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let hc = m.lab.add_home("c", Nat::Easy).expect("home c");
    let lan = m.lab.add_lan(&hb).expect("lan");
    m.start(&[("a", &ha), ("b", &hb), ("c", &hc)]);
    let (a_id, b_id) = (m.peer_id("a", &ha), m.peer_id("b", &hb));
    let staff = m.api("POST", "/api/groups", Some(r#"{"name":"staff"}"#))["id"]
        .as_str()
        .expect("group")
        .to_string();
    let access = m.api("POST", "/api/groups", Some(r#"{"name":"factory-ssh"}"#))["id"]
        .as_str()
        .expect("group")
        .to_string();
    m.api(
        "PUT",
        &format!("/api/peers/{a_id}"),
        Some(&format!(r#"{{"groups":["{staff}"]}}"#)),
    );
    let r = m.api(
        "POST",
        "/api/routes",
        Some(&format!(
            r#"{{"network":"192.168.50.0/24","routing_peer":"{b_id}","groups":["all"],"access_groups":["{access}"],"masquerade":true}}"#
        )),
    );
    assert_eq!(r["access_groups"][0], access.as_str(), "{r}");
    let p = m.api(
        "POST",
        "/api/policies",
        Some(&format!(
            r#"{{"name":"staff-to-factory","protocol":"tcp","ports":["5001"],"bidirectional":false,"sources":["{staff}"],"destinations":["{access}"]}}"#
        )),
    );
    assert_eq!(p["name"], "staff-to-factory", "{p}");
    let installed = |m: &Mesh, who: &str, ns: &str| {
        m.status(who, ns).is_some_and(|s| {
            s["routes"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|r| r["state"] == "installed"))
        })
    };
    m.lab
        .wait_for("routes installed", Duration::from_secs(30), || {
            installed(&m, "a", &ha) && installed(&m, "c", &hc)
        })
        .expect("routes");
    // staff laptop: TCP 5001 into the LAN works (replies pass), ping does not.
    let seen = m.transfer(&ha, &lan, "192.168.50.10", "sink-acl");
    assert_eq!(seen, "192.168.50.1");
    assert!(
        !m.lab
            .exec(&ha, &["ping", "-c", "2", "-W", "1", "192.168.50.10"])
            .status
            .success(),
        "ping is not allowed"
    );
    // A peer outside staff gets nothing, not even TCP 5001.
    let tool = bin("tern-nettool");
    let lan2 = lan.clone();
    m.lab
        .spawn("sink-acl-c", &lan2, &tool, &["serve", "5001"], &[])
        .expect("sink");
    m.lab
        .wait_for("sink", Duration::from_secs(10), || {
            m.lab.log("sink-acl-c").contains("listening")
        })
        .expect("sink");
    let out = m.lab.exec(
        &hc,
        &[
            tool.to_str().expect("utf8"),
            "send",
            "192.168.50.10:5001",
            "1000",
        ],
    );
    assert!(
        !out.status.success(),
        "c must not reach the LAN: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!m
        .lab
        .exec(&hc, &["ping", "-c", "2", "-W", "1", "192.168.50.10"])
        .status
        .success());
    // ... and is told why: its map says no policy opens the network for it, its status and
    // diagnose say so in words, and the console's API lists it per route.

    assert_eq!(route_of(&m, "c", &hc).expect("c's route")["access"], "none");
    assert_eq!(
        route_of(&m, "a", &ha).expect("a's route")["access"],
        "tcp 5001"
    );
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args("c"));
    args.push("status".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = String::from_utf8_lossy(&m.lab.exec(&hc, &refs).stdout).to_string();
    assert!(
        text.contains("installed, but no policy lets this peer use it (b drops its traffic; "),
        "{text}"
    );
    // c counts what it sent in vain (the TCP attempt and the pings above), as b does.
    let sent = route_of(&m, "c", &hc).expect("c's route")["sent_without_policy"]
        .as_u64()
        .unwrap_or(0);
    assert!(sent > 0, "c counted the packets no policy allows");
    let mut clients = Value::Null;
    m.lab
        .wait_for("route clients reported", Duration::from_secs(40), || {
            clients = m.api("GET", "/api/routes", None)[0]["clients"].clone();
            clients.as_array().is_some_and(|c| c.len() == 2)
        })
        .unwrap_or_else(|e| panic!("{e}: {clients}"));
    let state_of = |name: &str| {
        clients
            .as_array()
            .and_then(|a| a.iter().find(|c| c["peer_name"] == name))
            .map(|c| c["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state_of("a").as_deref(), Some("installed"), "{clients}");
    assert_eq!(state_of("c").as_deref(), Some("no_access"), "{clients}");

    // A route without access groups follows the policies towards its routing peer (as subnet
    // routes follow the ACLs in Tailscale): with "staff -> factory tcp 5001" as the only policy
    // (b is in factory), a reaches port 5001 of the LAN and not port 22, and its status says
    // what is open.
    let factory = m.api("POST", "/api/groups", Some(r#"{"name":"factory"}"#))["id"]
        .as_str()
        .expect("group")
        .to_string();
    m.api(
        "PUT",
        &format!("/api/peers/{b_id}"),
        Some(&format!(r#"{{"groups":["{factory}"]}}"#)),
    );
    m.delete_policy_named("default");
    m.delete_policy_named("staff-to-factory");
    let p = m.api(
        "POST",
        "/api/policies",
        Some(&format!(
            r#"{{"name":"staff-to-gw","protocol":"tcp","ports":["5001"],"bidirectional":false,"sources":["{staff}"],"destinations":["{factory}"]}}"#
        )),
    );
    assert_eq!(p["name"], "staff-to-gw", "{p}");
    let route_id = m.api("GET", "/api/routes", None)[0]["id"]
        .as_str()
        .expect("route id")
        .to_string();
    let put_route = |m: &Mesh, open: bool| {
        let r = m.api(
            "PUT",
            &format!("/api/routes/{route_id}"),
            Some(&format!(
                r#"{{"network":"192.168.50.0/24","routing_peer":"{b_id}","groups":["all"],"masquerade":true,"open_to_groups":{open}}}"#
            )),
        );
        assert_eq!(r["open_to_groups"], open, "{r}");
    };
    put_route(&m, false);
    let mut last = None;
    m.lab
        .wait_for(
            "a's route follows the policy",
            Duration::from_secs(20),
            || {
                last = route_of(&m, "a", &ha);
                last.as_ref().is_some_and(|r| r["access"] == "tcp 5001")
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {last:?}"));
    let status_text =
        |m: &Mesh| String::from_utf8_lossy(&m.tern("a", &ha, &["status"]).stdout).to_string();
    let text = status_text(&m);
    assert!(
        text.contains("installed (policies allow tcp 5001)"),
        "{text}"
    );
    m.lab.stop("sink-acl-c");
    let seen = m.transfer(&ha, &lan, "192.168.50.10", "sink-policy");
    assert_eq!(seen, "192.168.50.1");
    m.lab
        .spawn("ssh-like", &lan, &tool, &["serve", "22"], &[])
        .expect("sink");
    m.lab
        .wait_for("port 22 listening", Duration::from_secs(10), || {
            m.lab.log("ssh-like").contains("listening")
        })
        .expect("sink");
    let to22 = |m: &Mesh| {
        m.lab.exec(
            &ha,
            &[
                tool.to_str().expect("utf8"),
                "send",
                "192.168.50.10:22",
                "1000",
            ],
        )
    };
    assert!(!to22(&m).status.success(), "port 22 is not open to a");
    // Open to the distribution groups, explicitly: port 22 too, and status says so.
    put_route(&m, true);
    m.lab
        .wait_for("a's route is open", Duration::from_secs(20), || {
            last = route_of(&m, "a", &ha);
            last.as_ref()
                .is_some_and(|r| r["open_to_groups"] == true && r["access"] == "all")
        })
        .unwrap_or_else(|e| panic!("{e}: {last:?}"));
    let text = status_text(&m);
    assert!(
        text.contains("installed, open to its distribution groups (all of the network, whatever the policies say)"),
        "{text}"
    );
    let out = to22(&m);
    assert!(
        out.status.success(),
        "port 22 with the route open: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The factory's own uplink: an IPv6-only gateway behind the carrier's NAT64 with a DNS64
/// resolver, a laptop behind an IPv4 NAT, the server on IPv4 only. Without DNS64 and without a
/// prefix, `tern up` says that NAT64 is missing and what to do; with DNS64 it finds the prefix
/// itself (IPv4 management URL, no flag), serves the LAN, and comes back the same from a bare
/// `tern up`; both sides name why their pair is relayed (no common address family) and
/// `tern diagnose` finds nothing wrong on either side.
#[test]
fn routing_peer_on_an_ipv6_only_uplink_behind_nat64_still_serves_the_lan() {
    if skip() {
        return;
    }
    assert!(
        std::path::Path::new("/usr/sbin/tayga").exists(),
        "tayga missing: apt-get install tayga (scripts/test does)"
    );
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let ha = m.homes[0].clone();
    let h6 = m.lab.add_nat64_home().expect("nat64 home");
    let lan = m.lab.add_lan(&h6).expect("lan");
    // The uplink really is IPv6 only: IPv4 literals are unreachable, the NAT64 address works.
    assert!(!m
        .lab
        .exec(&h6, &["ping", "-c", "1", "-W", "1", SERVER_IP])
        .status
        .success());
    m.lab
        .wait_for("NAT64 path", Duration::from_secs(10), || {
            m.lab
                .exec(&h6, &["ping", "-6", "-c", "1", "-W", "1", SERVER_NAT64])
                .status
                .success()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("tayga")));
    let url = format!("http://{SERVER_IP}:443");

    // 1. A resolver without DNS64 and no --nat64-prefix: the error names NAT64 and what to do.
    m.lab.carrier_resolver(&h6, false).expect("resolver");
    let tern = bin("tern").display().to_string();
    let mut args = vec!["timeout".to_string(), "60".into(), tern.clone()];
    args.extend(m.agent_args("gw-no-dns64"));
    args.extend(["up", "--management-url", &url, "--setup-key", &m.key].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = m.lab.exec(&h6, &refs);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no IPv4 route (an IPv6-only uplink)")
            && err.contains("no NAT64 prefix was found")
            && err.contains("does no DNS64")
            && err.contains("--nat64-prefix"),
        "{err}"
    );
    assert_eq!(err.matches("error:").count(), 1, "said once: {err}");

    // 2. With the carrier's DNS64: the IPv4 URL and no prefix flag.
    m.lab.carrier_resolver(&h6, true).expect("resolver");
    m.up("a", &ha, true);
    m.up("gw", &h6, true);
    m.lab
        .wait_for("agents up", Duration::from_secs(30), || {
            m.status("a", &ha).is_some() && m.status("gw", &h6).is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("gw")));
    let gw_id = m.peer_id("gw", &h6);
    let discovered = |m: &Mesh| {
        let mut last = serde_json::Value::Null;
        m.lab
            .wait_for(
                "gw on NAT64 with TURN and the TCP relay",
                Duration::from_secs(30),
                || {
                    last = m.status("gw", &h6).unwrap_or_default();
                    last["tcp_relay"] == true
                        && last["relays"][0]["relayed"]
                            .as_str()
                            .is_some_and(|r| r.starts_with(&format!("{SERVER_IP}:")))
                },
            )
            .unwrap_or_else(|e| panic!("{e}\n{last:#}\n--- gw\n{}", m.lab.log("gw")));
        assert_eq!(last["nat64"]["prefix"], NAT64_PREFIX, "{last:#}");
        assert_eq!(last["nat64"]["source"], "discovered", "{last:#}");
        let out = m.tern("gw", &h6, &["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!(
                "IPv6-only uplink, NAT64 prefix {NAT64_PREFIX} (discovered)"
            )),
            "{text}"
        );
    };
    discovered(&m);
    m.route_lan_through(&gw_id);
    let t0 = Instant::now();
    let reaches_lan = |m: &Mesh, what: &str| {
        m.lab
            .wait_for(what, Duration::from_secs(90), || {
                m.lab
                    .exec(&ha, &["ping", "-c", "1", "-W", "1", "192.168.50.10"])
                    .status
                    .success()
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\n{:?}\n--- gw\n{}",
                    m.status("gw", &h6),
                    m.lab.log("gw")
                )
            })
    };
    reaches_lan(&m, "laptop reaches the LAN behind the IPv6-only router");
    eprintln!(
        "figure: LAN behind NAT64 reachable {:?} after the route was created",
        t0.elapsed()
    );
    let seen = m.transfer(&ha, &lan, "192.168.50.10", "sink-nat64");
    assert_eq!(seen, "192.168.50.1");

    // Then UDP through TURN: the router has no IPv4 of its own and the laptop no IPv6, so no
    // direct pair is possible; both sides say exactly that. The router keeps its allocation
    // through NAT64 (an IPv4 relayed address).
    let relayed = |m: &Mesh, who: &str, ns: &str| {
        let mut last = serde_json::Value::Null;
        m.lab
            .wait_for(
                &format!("{who} relays through TURN for want of a common family"),
                Duration::from_secs(60),
                || {
                    last = m.status(who, ns).unwrap_or_default();
                    last["peers"][0]["connection"] == "turn_relay"
                        && last["peers"][0]["path_reason_code"] == "no_common_family"
                },
            )
            .unwrap_or_else(|e| panic!("{e}\n{last:#}\n--- {who}\n{}", m.lab.log(who)));
        last
    };
    let last = relayed(&m, "gw", &h6);
    let words = last["peers"][0]["path_reason"].as_str().unwrap_or("");
    assert!(
        words.contains("this host has IPv6 only, the peer IPv4 only"),
        "{words}"
    );
    let on_a = relayed(&m, "a", &ha);
    assert!(
        on_a["peers"][0]["path_reason"]
            .as_str()
            .is_some_and(|w| w.contains("this host has IPv4 only, the peer IPv6 only")),
        "{on_a:#}"
    );
    let seen = m.transfer(&ha, &lan, "192.168.50.10", "sink-nat64-udp");
    assert_eq!(seen, "192.168.50.1");
    // The console's data: the server has the reason from both sides' reports.
    m.lab
        .wait_for(
            "both reports reach the server",
            Duration::from_secs(20),
            || {
                let peers = m.api("GET", "/api/peers", None);
                let reasons: Vec<String> = peers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|p| p["connections"].as_array().cloned().unwrap_or_default())
                    .filter_map(|c| c["reason"].as_str().map(str::to_string))
                    .collect();
                reasons.len() == 2 && reasons.iter().all(|r| r == "no_common_family")
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {}", m.api("GET", "/api/peers", None)));

    // 3. diagnose on this working network: nothing wrong on either side, and the relayed pair
    // is explained, not referred to the peer.
    for (who, ns) in [("gw", &h6), ("a", &ha)] {
        let human = |args: &[&str]| {
            let out = m.tern(who, ns, args);
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        eprintln!(
            "--- {who}: tern status -d\n{}--- {who}: tern diagnose\n{}",
            human(&["status", "-d"]),
            human(&["diagnose"])
        );
        let (r, ok) = m.diagnose(who, ns, &[]);
        let bad: Vec<&serde_json::Value> = r["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["severity"] != "info")
            .collect();
        assert!(bad.is_empty() && ok, "{who}: {bad:#?}\n{r:#}");
        let relayed = r["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["code"] == "peer_relayed")
            .unwrap_or_else(|| panic!("{who}: {r:#}"));
        let ev = relayed["evidence"].as_str().unwrap_or("");
        assert!(
            ev.contains("no_common_family") && !ev.contains("on the peer"),
            "{who}: {ev}"
        );
        if who == "gw" {
            assert_eq!(
                r["facts"]["turn"][0]["relay_ports_open"], true,
                "the relay echo goes through NAT64 too: {r:#}"
            );
            let alt = r["facts"]["stun"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|s| !s["mapped"].is_null());
            assert!(alt, "both STUN ports answer through NAT64: {r:#}");
        }
    }

    // 4. Stopped, and started again with a bare `tern up` (as the service does): the same.
    m.lab.stop("gw");
    let mut args = m.agent_args("gw");
    args.push("up".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    m.lab
        .spawn(
            "gw",
            &h6,
            &bin("tern"),
            &refs,
            &[("TERN_LOG", "info,webrtc_ice=warn,turn=warn")],
        )
        .expect("bare tern up");
    discovered(&m);
    reaches_lan(&m, "the LAN again after a bare tern up");
    let seen = m.transfer(&ha, &lan, "192.168.50.10", "sink-nat64-again");
    assert_eq!(seen, "192.168.50.1");
}
