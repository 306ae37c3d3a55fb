//! Plain WireGuard devices, in network namespaces: an admin adds a device and downloads its
//! `wg-quick` configuration; Debian's `wireguard-go` + `wg-quick` bring it up in a home behind
//! NAT; it pings a Tern peer and 192.168.50.10 behind the routing peer (same policies and routes
//! as any peer); the console's API shows its handshake and bytes; agents reach it through the
//! TCP relay without trying ICE; removed, it stops within 2 s. Plus the API's field errors.

use serde_json::Value;
use std::time::{Duration, Instant};
use tern_tests::mesh::{missing, skip, Mesh};
use tern_tests::netns::Nat;

/// Takes the device's interface down when the test ends, even on failure: wireguard-go keeps its
/// namespace alive after the lab deletes it, so it must stop first (it exits when its TUN goes).
struct WgQuickDown {
    ns: String,
    conf: std::path::PathBuf,
}

impl Drop for WgQuickDown {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "wg-quick", "down"])
            .arg(&self.conf)
            .output();
    }
}

fn ping_once(m: &Mesh, ns: &str, ip: &str) -> bool {
    m.lab
        .exec(ns, &["ping", "-c", "1", "-W", "1", ip])
        .status
        .success()
}

#[test]
fn a_plain_wireguard_device_reaches_peers_and_the_lan_and_is_revoked() {
    if skip() {
        return;
    }
    if missing(
        &["/usr/bin/wireguard-go", "/usr/bin/wg", "/usr/bin/wg-quick"],
        "wireguard-go and wireguard-tools",
    ) {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    let lan = m.lab.add_lan(&hb).expect("lan");
    m.lab.exec(&hb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let phone_home = m.lab.add_home("c", Nat::Easy).expect("home c");
    let _ = lan;
    m.start(&[("a", &ha), ("b", &hb)]);
    let a_ip = m.overlay_ip("a", &ha);
    let b_id = m.peer_id("b", &hb);
    m.route_lan_through(&b_id);

    // Bad input first: field errors, nothing created.
    for (body, want) in [
        (r#"{"name":""}"#, ("invalid", Some("name"))),
        (r#"{"name":"gina phone"}"#, ("invalid", Some("name"))),
        (
            r#"{"name":"ok","groups":["nope"]}"#,
            ("invalid", Some("groups")),
        ),
        (r#"{"name":"a"}"#, ("conflict", None)),
    ] {
        let r = m.api("POST", "/api/wireguard-devices", Some(body));
        assert_eq!(
            (r["error"].as_str().unwrap_or(""), r["field"].as_str()),
            want,
            "{body}: {r}"
        );
        assert!(!r["message"].as_str().unwrap_or("").is_empty(), "{r}");
    }

    // The admin adds the phone and downloads its configuration.
    let created = m.api(
        "POST",
        "/api/wireguard-devices",
        Some(r#"{"name":"Gina-Phone"}"#),
    );
    let config = created["config"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"));
    let phone_id = created["peer"]["id"].as_str().expect("id").to_string();
    let phone_ip = created["peer"]["overlay_ip"]
        .as_str()
        .expect("ip")
        .to_string();
    assert_eq!(created["peer"]["name"], "gina-phone", "{created}");
    assert_eq!(created["peer"]["dns_name"], "gina-phone.tern.internal");
    assert!(created["qr_svg"].as_str().unwrap_or("").contains("<svg"));
    assert!(config.contains("Endpoint = 203.0.113.10:51820"), "{config}");
    assert!(
        config.contains("192.168.50.0/24"),
        "the routed network is in AllowedIPs: {config}"
    );
    // The private key is shown once: the API never returns it again.
    let again = m.api_text(&format!("/api/peers/{phone_id}"));
    let private = config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .expect("private key");
    assert!(!again.contains(private), "{again}");

    // The agents learn of the device with their next map (a phone's owner takes longer than
    // that to scan the code).
    m.lab
        .wait_for("a knows the phone", Duration::from_secs(10), || {
            m.status("a", &ha).is_some_and(|s| {
                s["peers"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == "gina-phone"))
            })
        })
        .expect("a's map lists the phone");

    // wg-quick with wireguard-go, in a home behind NAT. The interface name is the file's (unique
    // per run: the userspace implementation's control socket is shared by all namespaces).
    let iface = format!("twg{}", std::process::id() % 100_000);
    let conf = m.lab.dir.path().join(format!("{iface}.conf"));
    std::fs::write(&conf, config).expect("write config");
    let wg_quick = |verb: &str| {
        let out = m.lab.exec(
            &phone_home,
            &[
                "env",
                "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
                "wg-quick",
                verb,
                conf.to_str().expect("utf8"),
            ],
        );
        assert!(
            out.status.success(),
            "wg-quick {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    wg_quick("up");
    let _down = WgQuickDown {
        ns: phone_home.clone(),
        conf: conf.clone(),
    };
    let t0 = Instant::now();
    let reached = m
        .lab
        .wait_for("the phone pings a", Duration::from_secs(30), || {
            ping_once(&m, &phone_home, &a_ip)
        });
    if let Err(e) = reached {
        let wg = m.lab.exec(&phone_home, &["wg", "show", &iface]);
        let routes = m.lab.exec(&phone_home, &["ip", "route"]);
        let addrs = m.lab.exec(&phone_home, &["ip", "addr"]);
        panic!(
            "{e}\nwg show: {}\n{}\n{}\n--- server log:\n{}\n--- a log:\n{}",
            String::from_utf8_lossy(&wg.stdout),
            String::from_utf8_lossy(&routes.stdout),
            String::from_utf8_lossy(&addrs.stdout),
            m.lab.log("server"),
            m.lab.log("a")
        );
    }
    eprintln!("the phone reached a {:?} after wg-quick up", t0.elapsed());
    m.lab
        .wait_for("the phone pings the LAN", Duration::from_secs(20), || {
            ping_once(&m, &phone_home, "192.168.50.10")
        })
        .unwrap_or_else(|e| panic!("{e}\n--- b log:\n{}", m.lab.log("b")));
    // And a reaches the phone (the other way round), through the TCP relay, without ICE.
    assert!(m.ping(&ha, &phone_ip), "a pings the phone");
    let st = m.status("a", &ha).expect("status");
    let phone = st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "gina-phone"))
        .unwrap_or_else(|| panic!("a lists the phone: {st:#}"))
        .clone();
    assert_eq!(phone["connection"], "tcp_relay", "{phone:#}");
    assert_eq!(phone["path_reason_code"], "hosted_device", "{phone:#}");
    let mut cmd = vec![tern_tests::mesh::bin("tern").display().to_string()];
    cmd.extend(m.agent_args("a"));
    cmd.push("status".into());
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let human = String::from_utf8_lossy(&m.lab.exec(&ha, &refs).stdout).to_string();
    eprintln!("tern status on a:\n{human}");
    assert!(
        human.contains("a WireGuard device the server hosts"),
        "{human}"
    );

    // The console sees its handshake, bytes and that it is online.
    let mut p = Value::Null;
    m.lab
        .wait_for("the device shows online", Duration::from_secs(10), || {
            p = m.api("GET", &format!("/api/peers/{phone_id}"), None);
            p["connected"] == true
        })
        .unwrap_or_else(|e| panic!("{e}: {p:#}"));
    let w = &p["wireguard"];
    assert!(
        w["last_handshake_secs"].as_u64().is_some_and(|s| s < 60),
        "{p:#}"
    );
    assert!(w["rx_bytes"].as_u64().unwrap_or(0) > 0, "{p:#}");
    assert!(w["tx_bytes"].as_u64().unwrap_or(0) > 0, "{p:#}");
    assert!(
        w["endpoint"]
            .as_str()
            .unwrap_or("")
            .starts_with("203.0.113.13:"),
        "its NAT's public address: {p:#}"
    );
    assert_eq!(p["os"], "WireGuard", "{p:#}");

    // Policies hold for the device as for any peer: phones may ping everyone, nobody may open
    // anything towards the phones. The server's core for the phone drops a's pings; the phone's
    // own pings to a still pass (and their replies).
    let phones = m.api("POST", "/api/groups", Some(r#"{"name":"phones"}"#));
    let phones = phones["id"].as_str().unwrap_or_else(|| panic!("{phones}"));
    m.api(
        "PUT",
        &format!("/api/peers/{phone_id}"),
        Some(&format!(r#"{{"groups":["{phones}"]}}"#)),
    );
    let p = m.api(
        "POST",
        "/api/policies",
        Some(&format!(
            r#"{{"name":"phones-ping","protocol":"icmp","bidirectional":false,"sources":["{phones}"],"destinations":["all"]}}"#
        )),
    );
    assert_eq!(p["name"], "phones-ping", "{p}");
    m.delete_policy_named("default");
    m.lab
        .wait_for(
            "a may no longer reach the phone",
            Duration::from_secs(10),
            || !ping_once(&m, &ha, &phone_ip),
        )
        .expect("policy enforced for the hosted device");
    assert!(ping_once(&m, &phone_home, &a_ip), "the phone still pings a");

    // A new configuration (lost phone, or routes added since): the old one stops at once, the
    // new one works.
    let re = m.api(
        "POST",
        &format!("/api/wireguard-devices/{phone_id}/config"),
        None,
    );
    let config2 = re["config"].as_str().unwrap_or_else(|| panic!("{re}"));
    assert!(!config2.contains(private), "new keys");
    m.lab
        .wait_for(
            "the old configuration stops",
            Duration::from_secs(3),
            || !ping_once(&m, &phone_home, &a_ip),
        )
        .expect("old keys refused");
    wg_quick("down");
    std::fs::write(&conf, config2).expect("write config");
    wg_quick("up");
    m.lab
        .wait_for(
            "the new configuration works",
            Duration::from_secs(15),
            || ping_once(&m, &phone_home, &a_ip),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("server")));
    let not_a_device = m.api(
        "POST",
        &format!("/api/wireguard-devices/{}/config", m.peer_id("a", &ha)),
        None,
    );
    assert_eq!(not_a_device["error"], "conflict", "{not_a_device}");

    // Removed: it stops within 2 s.
    let t0 = Instant::now();
    let _ = m.api("DELETE", &format!("/api/peers/{phone_id}"), None);
    m.lab
        .wait_for("the phone's tunnel closed", Duration::from_secs(2), || {
            m.lab.log("server").contains("WireGuard device removed:")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.lab.log("server")));
    let took = t0.elapsed();
    assert!(
        !ping_once(&m, &phone_home, &a_ip),
        "revoked: no more traffic"
    );
    assert!(!ping_once(&m, &phone_home, "192.168.50.10"));
    eprintln!("revoked after {took:?}");
}
