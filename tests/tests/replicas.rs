//! Two `tern-server` replicas (management + signal + relay each) on one PostgreSQL, agents in
//! namespaces spread over them: a peer on replica 1 and a peer on replica 2 exchange ICE
//! candidates (signal crosses replicas) and connect directly; a write on replica 1 reaches the
//! agent on replica 2; replica 1 is killed (-9) while pings flow: the tunnel keeps carrying
//! traffic, its agent is back on replica 2 within 5 s, and an admin write made on replica 2 during
//! the failover reaches everyone. Both replicas' TURN servers are in every map: an agent allocates
//! on the nearest that answers its probes and moves when that one stops answering.

use serde_json::Value;
use std::time::{Duration, Instant};
use tern_tests::mesh::{bin, skip, Mesh, ADMIN_PASSWORD};
use tern_tests::netns::{forward_into, Nat, SERVER_IP};
use tern_tests::{Backend, TestDb};

const R1: &str = "http://203.0.113.10:443";
const R2: &str = "http://203.0.113.10:444";

fn peer_named(status: &Value, name: &str) -> bool {
    status["peers"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["name"] == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_postgres_and_agents_survive_losing_one() {
    if skip() {
        return;
    }
    if tern_tests::postgres_url().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the replica suite: set TERN_TEST_POSTGRES_URL"
        );
        eprintln!("SKIPPED: replicas need PostgreSQL (TERN_TEST_POSTGRES_URL)");
        return;
    }
    assert_eq!(SERVER_IP, "203.0.113.10");
    let db = TestDb::new(Backend::Postgres).await.expect("database");
    let pg_port: u16 = db
        .url
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .and_then(|h| h.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432);
    let mut m = Mesh::without_server(Nat::Easy, Nat::Easy, &["--database-url", &db.url]);
    // The replicas run in the server's namespace; PostgreSQL on this host's loopback.
    let srv = m.lab.ns("srv");
    let _pg = forward_into(&srv, pg_port).expect("forward PostgreSQL");
    m.start_server();
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let data2 = m.lab.dir.path().join("server2");
    let (listen2, relay2) = (format!("{SERVER_IP}:444"), format!("{SERVER_IP}:3578"));
    m.lab
        .spawn(
            "server2",
            &srv,
            &bin("tern-server"),
            &[
                "--listen",
                &listen2,
                "--data-dir",
                data2.to_str().expect("utf8"),
                "--database-url",
                &db.url,
                "--relay-udp-listen",
                &relay2,
                "--relay-public-ip",
                SERVER_IP,
                "--relay-ports",
                "51000-51999",
                "--wireguard-listen",
                "off",
                "--public-ports",
                "off",
            ],
            &[("TERN_ADMIN_PASSWORD", ADMIN_PASSWORD)],
        )
        .expect("replica 2");
    m.lab
        .wait_for("replica 2 up", Duration::from_secs(30), || {
            let log = m.lab.log("server2");
            assert!(!log.contains("error:"), "replica 2 did not start:\n{log}");
            log.contains("Agents join with")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("server2")));

    // a prefers replica 1, b replica 2.
    let (a_urls, b_urls) = (format!("{R1},{R2}"), format!("{R2},{R1}"));
    m.up_with("a", &ha, true, &a_urls, &[]);
    m.up_with("b", &hb, true, &b_urls, &[]);
    let s = m
        .lab
        .wait_for("both agents up", Duration::from_secs(30), || {
            m.status("a", &ha).is_some_and(|s| s["management"] == true)
                && m.status("b", &hb).is_some_and(|s| s["management"] == true)
        });
    s.unwrap_or_else(|e| panic!("{e}\n{}\n{}", m.lab.log("a"), m.lab.log("b")));
    let sa = m.status("a", &ha).expect("a");
    let sb = m.status("b", &hb).expect("b");
    assert_eq!(sa["management_url"], R1, "{sa:#}");
    assert_eq!(sb["management_url"], R2, "{sb:#}");
    assert_eq!(sa["management_replicas"], 2);

    // Candidates cross replicas: a (on 1) and b (on 2) connect directly.
    m.wait_connection("a", &ha, "direct", Duration::from_secs(30));
    m.wait_connection("b", &hb, "direct", Duration::from_secs(30));
    let status = m.api("GET", "/api/status", None);
    let replicas = status["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{status:#}");
    assert_eq!(status["peers_online"], 2, "{status:#}");
    // Every agent is given both replicas' relays, the oldest replica's first: all meet on one TCP
    // relay whichever replica they use.
    let relay_urls = |s: &Value| -> Vec<String> {
        s["relay"]["urls"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let tcp_relays = |s: &Value| -> Vec<String> {
        relay_urls(s)
            .into_iter()
            .filter(|u| u.starts_with("ws"))
            .collect()
    };
    let want = vec![
        format!("ws://{SERVER_IP}:443/relay"),
        format!("ws://{SERVER_IP}:444/relay"),
    ];
    assert_eq!(tcp_relays(&status), want, "{status:#}");
    m.api_port = 444;
    let status2 = m.api("GET", "/api/status", None);
    assert_eq!(
        tcp_relays(&status2),
        want,
        "replica 2 hands out the same: {status2:#}"
    );
    m.api_port = 443;

    // Both replicas' TURN servers are in the maps: a probes them and allocates on the nearest that
    // answers. When the one in use stops answering (its port blocked at a), a moves to the other.
    let relays = |s: &Value| -> Vec<(String, String)> {
        s["relays"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["url"].as_str().unwrap_or("").to_string(),
                            r["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let preferred = |s: &Value| -> Option<String> {
        relays(s)
            .into_iter()
            .find(|(_, st)| st == "preferred")
            .map(|(u, _)| u)
    };
    m.lab
        .wait_for(
            "a probed both TURN servers",
            Duration::from_secs(25),
            || {
                m.status("a", &ha).is_some_and(|s| {
                    let r = relays(&s);
                    r.len() == 2
                        && r.iter()
                            .all(|(_, st)| st == "preferred" || st == "answering")
                        && preferred(&s).is_some()
                })
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{:#}", m.status("a", &ha).unwrap_or_default()));
    let first = preferred(&m.status("a", &ha).expect("a")).expect("preferred");
    let port = first
        .rsplit(':')
        .next()
        .unwrap_or("")
        .split('?')
        .next()
        .unwrap_or("")
        .to_string();
    assert!(port == "3478" || port == "3578", "{first}");
    let t = Instant::now();
    m.lab
        .nft(
            &ha,
            &format!(
                "table inet tern_relay_block {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {SERVER_IP} udp dport {port} drop\n  }}\n}}\n"
            ),
        )
        .expect("block a TURN server");
    m.lab
        .wait_for(
            "a moved to the other TURN server",
            Duration::from_secs(35),
            || {
                m.status("a", &ha).is_some_and(|s| {
                    let p = preferred(&s);
                    // a's own allocation moved with it.
                    let allocated = s["relays"].as_array().is_some_and(|a| {
                        a.iter()
                            .any(|r| r["state"] == "preferred" && r["relayed"].is_string())
                    });
                    p.is_some()
                        && p.as_deref() != Some(first.as_str())
                        && allocated
                        && relays(&s).contains(&(first.clone(), "no_answer".to_string()))
                })
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{:#}", m.status("a", &ha).unwrap_or_default()));
    eprintln!(
        "a's TURN server {first} stopped answering; a preferred the other {:?} later",
        t.elapsed()
    );
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args("a"));
    args.push("status".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let human = String::from_utf8_lossy(&m.lab.exec(&ha, &refs).stdout).to_string();
    eprintln!("tern status on a with one TURN server blocked:\n{human}");
    assert!(
        human.contains(&format!(
            "{} (no answer)",
            first.strip_suffix("?transport=udp").unwrap_or(&first)
        )) && human.contains("ms, in use, relayed address "),
        "{human}"
    );
    m.lab
        .exec(&ha, &["nft", "delete", "table", "inet", "tern_relay_block"]);

    // A write on replica 1 reaches b's stream on replica 2.
    let a_id = m.peer_id("a", &ha);
    let b_id = m.peer_id("b", &hb);
    let t = Instant::now();
    let r = m.api(
        "PUT",
        &format!("/api/peers/{a_id}"),
        Some(r#"{"name":"a-one"}"#),
    );
    assert_eq!(r["name"], "a-one", "{r}");
    m.lab
        .wait_for("b sees a's new name", Duration::from_secs(10), || {
            m.status("b", &hb).is_some_and(|s| peer_named(&s, "a-one"))
        })
        .expect("a write on replica 1 reaches an agent on replica 2");
    eprintln!(
        "a change on replica 1 reached the agent on replica 2 in {:?}",
        t.elapsed()
    );

    // Pings from a to b through the tunnel while replica 1 dies.
    let b_ip = m.overlay_ip("b", &hb);
    m.lab
        .spawn(
            "ping",
            &ha,
            std::path::Path::new("/usr/bin/ping"),
            &["-c", "80", "-i", "0.1", "-W", "1", &b_ip],
            &[],
        )
        .expect("ping");
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    m.lab.crash("server");
    // The admin works on replica 2 meanwhile: renames b while a is moving.
    m.api_port = 444;
    let r = m.api(
        "PUT",
        &format!("/api/peers/{b_id}"),
        Some(r#"{"name":"b-two"}"#),
    );
    assert_eq!(r["name"], "b-two", "{r}");
    let back = m
        .lab
        .wait_for("a back on replica 2", Duration::from_secs(15), || {
            m.status("a", &ha)
                .is_some_and(|s| s["management"] == true && s["management_url"] == R2)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("a")));
    let back = killed.elapsed().max(back);
    eprintln!("a was back on replica 2 {back:?} after replica 1 was killed");
    assert!(
        back < Duration::from_secs(5),
        "a took {back:?} to move to replica 2 (target 5 s)\n{}",
        m.lab.log("a")
    );
    // The agents' TCP relay (replica 1's, first in every map) died with it: they move to the next
    // relay of the list at once, long before replica 1 is taken for dead.
    let moved = m
        .lab
        .wait_for("TCP relay on replica 2", Duration::from_secs(8), || {
            let on_two = |who: &str| {
                m.lab.log(who).lines().any(|l| {
                    l.contains("TCP relay connected")
                        && l.contains(":444/relay")
                        && l.contains("fallback=true")
                })
            };
            on_two("a") && on_two("b")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("a")));
    eprintln!(
        "both agents were on replica 2's TCP relay {:?} after replica 1 was killed",
        killed.elapsed().max(moved)
    );
    // What the person at a reads.
    let mut args = vec![bin("tern").display().to_string()];
    args.extend(m.agent_args("a"));
    args.push("status".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let human = String::from_utf8_lossy(&m.lab.exec(&ha, &refs).stdout).to_string();
    eprintln!("tern status on a after the failover:\n{human}");
    assert!(
        human.contains(&format!("Management connected at {R2} (one of 2 replicas)")),
        "{human}"
    );
    // The write made during the failover reached a, and nothing of it was lost.
    m.lab
        .wait_for("a sees b's new name", Duration::from_secs(10), || {
            m.status("a", &ha).is_some_and(|s| peer_named(&s, "b-two"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{:#}", m.status("a", &ha).unwrap_or_default()));
    let peers = m.api("GET", "/api/peers", None);
    let names: Vec<(&str, bool)> = peers
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| (p["name"].as_str().unwrap_or(""), p["connected"] == true))
        .collect();
    assert!(names.contains(&("a-one", true)), "{names:?}");
    assert!(names.contains(&("b-two", true)), "{names:?}");

    // Once replica 1 is taken for dead (no heartbeat for 12 s), its relay leaves the maps and the
    // agents' TCP relay connection moves to replica 2's.
    let t = Instant::now();
    m.lab
        .wait_for(
            "replica 1's relay leaves the maps",
            Duration::from_secs(30),
            || {
                let s = m.api("GET", "/api/status", None);
                tcp_relays(&s) == vec![format!("ws://{SERVER_IP}:444/relay")]
                    && s["replicas"].as_array().map(Vec::len) == Some(1)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{:#}", m.api("GET", "/api/status", None)));
    m.lab
        .wait_for(
            "a's TCP relay on replica 2",
            Duration::from_secs(15),
            || {
                m.status("a", &ha).is_some_and(|s| s["tcp_relay"] == true)
                    && m.status("b", &hb).is_some_and(|s| s["tcp_relay"] == true)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("a")));
    eprintln!(
        "replica 1 was taken for dead and the agents were on replica 2's TCP relay {:?} later",
        t.elapsed()
    );

    // The tunnel carried traffic throughout.
    m.lab
        .wait_for("pings done", Duration::from_secs(20), || {
            m.lab.log("ping").contains("packets transmitted")
        })
        .expect("ping finished");
    let log = m.lab.log("ping");
    let summary = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_string();
    let received: u32 = summary
        .split(", ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!("pings through the tunnel while a replica died: {summary}");
    assert!(
        received >= 76,
        "the tunnel must keep carrying traffic (at most 5% lost): {summary}"
    );
    drop(m);
    db.cleanup().await;
}
