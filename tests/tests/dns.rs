//! Names instead of numbers, in network namespaces: agents resolve peers by name through their own
//! resolver (the host's resolv.conf points at it), a rename is resolvable within seconds, a
//! nameserver inside the factory LAN answers its domain for a laptop through the routing peer,
//! other names still resolve through the usual nameserver, and `tern down` as well as a kill -9
//! followed by a restart leave resolv.conf as it was. Plus the API's field errors.

use serde_json::Value;
use std::time::{Duration, Instant};
use tern_tests::mesh::{missing, skip, Mesh};
use tern_tests::netns::{Nat, LAB_RESOLV_CONF};

/// Addresses `name` resolves to in `ns`, through the namespace's resolv.conf (as any program
/// would: getent uses the C library's resolver).
fn resolve(m: &Mesh, ns: &str, name: &str) -> Vec<String> {
    let out = m.lab.exec(ns, &["getent", "ahostsv4", name]);
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn wait_resolves(m: &Mesh, ns: &str, name: &str, want: &str, limit: Duration) -> Duration {
    let mut last = vec![];
    m.lab
        .wait_for(&format!("{name} -> {want}"), limit, || {
            last = resolve(m, ns, name);
            last.iter().any(|a| a == want)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: got {last:?}\nresolv.conf:\n{}\n{}",
                std::fs::read_to_string(m.lab.resolv_conf(ns)).unwrap_or_default(),
                m.lab.log("a")
            )
        })
}

fn dnsmasq(m: &mut Mesh, label: &str, ns: &str, listen: &str, answers: &[&str]) {
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--conf-file=/dev/null".into(),
        "--user=root".into(),
        "--pid-file=".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={listen}"),
        "--log-queries".into(),
        "--log-facility=-".into(),
    ];
    args.extend(answers.iter().map(|a| format!("--address={a}")));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    m.lab
        .spawn(
            label,
            ns,
            std::path::Path::new("/usr/sbin/dnsmasq"),
            &refs,
            &[],
        )
        .expect("dnsmasq");
}

fn tern(m: &Mesh, who: &str, ns: &str, cmd: &[&str]) -> std::process::Output {
    let mut full = vec![tern_tests::mesh::bin("tern").display().to_string()];
    full.extend(m.agent_args(who));
    full.extend(cmd.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    m.lab.exec(ns, &refs)
}

fn resolv_conf(m: &Mesh, ns: &str) -> String {
    std::fs::read_to_string(m.lab.resolv_conf(ns)).unwrap_or_default()
}

#[test]
fn peers_by_name_a_lan_nameserver_and_the_hosts_resolver_put_back() {
    if skip() {
        return;
    }
    if missing(&["/usr/sbin/dnsmasq"], "dnsmasq (dnsmasq-base)") {
        return;
    }
    let mut m = Mesh::new(Nat::Easy, Nat::Easy);
    let (ha, hb) = (m.homes[0].clone(), m.homes[1].clone());
    // The usual nameserver of every lab namespace (203.0.113.53, on the lab's internet), and
    // the factory's own DNS inside its LAN behind b.
    let inet_dns = m
        .lab
        .add_internet_host("dns", "203.0.113.53")
        .expect("dns host");
    dnsmasq(
        &mut m,
        "inet-dns",
        &inet_dns,
        "203.0.113.53",
        &["/example.com/203.0.113.77"],
    );
    let lan = m.lab.add_lan(&hb).expect("lan");
    m.lab.exec(&hb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    dnsmasq(
        &mut m,
        "lan-dns",
        &lan,
        "192.168.50.10",
        &["/plc.factory.local/192.168.50.10"],
    );
    assert_eq!(
        resolve(&m, &ha, "www.example.com"),
        vec!["203.0.113.77"],
        "the lab's DNS works before tern"
    );

    m.start(&[("a", &ha), ("b", &hb)]);
    let b_ip = m.overlay_ip("b", &hb);
    let b_id = m.peer_id("b", &hb);

    // a resolves b by name (and pings it by name); other names still resolve as before.
    let took = wait_resolves(&m, &ha, "b.tern.internal", &b_ip, Duration::from_secs(20));
    eprintln!("b.tern.internal resolvable on a {took:?} after the agents answered");
    let conf = resolv_conf(&m, &ha);
    assert!(conf.starts_with("# Written by tern"), "{conf}");
    assert!(
        conf.contains("options timeout:1 attempts:2"),
        "options kept: {conf}"
    );
    assert_eq!(resolve(&m, &ha, "www.example.com"), vec!["203.0.113.77"]);
    assert!(
        resolve(&m, &ha, "nobody.tern.internal").is_empty(),
        "NXDOMAIN"
    );
    m.lab
        .wait_for("ping b by name", Duration::from_secs(20), || {
            m.lab
                .exec(&ha, &["ping", "-c", "1", "-W", "1", "b.tern.internal"])
                .status
                .success()
        })
        .expect("ping by name");

    // A rename is resolvable within 2 s.
    let t0 = Instant::now();
    let r = m.api(
        "PUT",
        &format!("/api/peers/{b_id}"),
        Some(r#"{"name":"Factory GW"}"#),
    );
    assert_eq!(r["dns_name"], "factory-gw.tern.internal", "{r}");
    wait_resolves(
        &m,
        &ha,
        "factory-gw.tern.internal",
        &b_ip,
        Duration::from_secs(2),
    );
    eprintln!("a rename resolvable after {:?}", t0.elapsed());
    assert!(
        resolve(&m, &ha, "b.tern.internal").is_empty(),
        "the old name is gone"
    );

    // The factory's nameserver behind b answers factory.local for a.
    m.route_lan_through(&b_id);
    let ns = m.api(
        "POST",
        "/api/nameservers",
        Some(r#"{"name":"factory","domains":["factory.local"],"nameservers":["192.168.50.10"],"groups":["all"]}"#),
    );
    assert_eq!(ns["domains"][0], "factory.local", "{ns}");
    let took = wait_resolves(
        &m,
        &ha,
        "plc.factory.local",
        "192.168.50.10",
        Duration::from_secs(20),
    );
    eprintln!("plc.factory.local through the routing peer after {took:?}");
    assert!(
        m.lab.log("lan-dns").contains("plc.factory.local"),
        "asked the LAN's DNS"
    );
    let human = String::from_utf8_lossy(&tern(&m, "a", &ha, &["status"]).stdout).to_string();
    eprintln!("tern status on a:\n{human}");
    assert!(
        human.contains(&format!(
            "DNS: factory.local, tern.internal answered at {}:53 (host set up through resolv.conf)",
            m.overlay_ip("a", &ha)
        )),
        "{human}"
    );
    assert_eq!(
        resolve(&m, &ha, "www.example.com"),
        vec!["203.0.113.77"],
        "other names as before"
    );

    // Policies that let a reach the LAN on TCP 80 only: the factory's nameserver is out of
    // reach, and status, diagnose and `tern ping` say it is the policy (not a silent timeout,
    // not the path).
    m.delete_policy_named("default");
    let web_only = m.api(
        "POST",
        "/api/policies",
        Some(r#"{"name":"web-only","protocol":"tcp","ports":["80"],"bidirectional":false,"sources":["all"],"destinations":["all"]}"#),
    );
    assert_eq!(web_only["name"], "web-only", "{web_only}");
    let mut text = String::new();
    m.lab
        .wait_for("status names the blocked nameserver", Duration::from_secs(20), || {
            text = String::from_utf8_lossy(&tern(&m, "a", &ha, &["status"]).stdout).to_string();
            text.contains("factory.local -> 192.168.50.10:53: the policies do not let this host send DNS (udp 53) into 192.168.50.0/24 (they allow tcp 80)")
        })
        .unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let (r, ok) = m.diagnose("a", &ha, &[]);
    assert!(!ok, "{r:#}");
    assert!(
        r["findings"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x["code"] == "nameserver_blocked")),
        "{r:#}"
    );
    let out = tern(&m, "a", &ha, &["ping", "-c", "1", "192.168.50.10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the policies do not let this host send ICMP into 192.168.50.0/24 (they allow tcp 80)"),
        "{err}"
    );
    // Everyone to everyone again.
    m.api(
        "POST",
        "/api/policies",
        Some(r#"{"name":"default","protocol":"any","bidirectional":true,"sources":["all"],"destinations":["all"]}"#),
    );
    m.delete_policy_named("web-only");
    wait_resolves(
        &m,
        &ha,
        "plc.factory.local",
        "192.168.50.10",
        Duration::from_secs(20),
    );

    // Bad input: field errors.
    for (path, body, field) in [
        (
            "/api/nameservers",
            r#"{"name":"x","domains":["factory.local"],"nameservers":["10.9.9.9"],"groups":["all"]}"#,
            "nameservers",
        ),
        (
            "/api/nameservers",
            r#"{"name":"y","domains":["bad_domain!"],"nameservers":["192.168.50.10"],"groups":["all"]}"#,
            "domains",
        ),
        (
            "/api/nameservers",
            r#"{"name":"z","domains":["tern.internal"],"nameservers":["192.168.50.10"],"groups":["all"]}"#,
            "domains",
        ),
    ] {
        let r = m.api("POST", path, Some(body));
        assert_eq!(
            (r["error"].as_str(), r["field"].as_str()),
            (Some("invalid"), Some(field)),
            "{body}: {r}"
        );
    }
    let dup = m.api(
        "POST",
        "/api/nameservers",
        Some(r#"{"name":"factory","domains":["other.local"],"nameservers":["192.168.50.10"],"groups":["all"]}"#),
    );
    assert_eq!(dup["error"], "conflict", "{dup}");
    let settings = m.api("GET", "/api/settings", None);
    let mut s = settings.clone();
    s.as_object_mut().expect("obj").remove("network_serial");
    s["dns_domain"] = Value::from("nodots");
    let r = m.api("PUT", "/api/settings", Some(&s.to_string()));
    assert_eq!(r["field"], "dns_domain", "{r}");

    // tern down puts resolv.conf back exactly.
    let out = tern(&m, "a", &ha, &["down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.lab
        .wait_for("resolv.conf restored", Duration::from_secs(10), || {
            resolv_conf(&m, &ha) == LAB_RESOLV_CONF
        })
        .unwrap_or_else(|e| panic!("{e}: {}", resolv_conf(&m, &ha)));
    m.lab.stop("a");
    // A clean stop says what it did, not that an earlier run failed.
    let log = m.lab.log("a");
    assert!(
        log.contains("restored as it was before tern started")
            && !log.contains("did not stop cleanly"),
        "{log}"
    );
    let gw_resolves = |m: &Mesh| {
        wait_resolves(
            m,
            &ha,
            "factory-gw.tern.internal",
            &b_ip,
            Duration::from_secs(20),
        );
    };

    // kill -9 leaves our file behind; the next start puts the original back first, and tern down
    // leaves it as it was.
    m.up("a", &ha, false);
    gw_resolves(&m);
    m.lab.crash("a");
    assert!(
        resolv_conf(&m, &ha).starts_with("# Written by tern"),
        "a crash cannot clean up"
    );
    m.up("a", &ha, false);
    gw_resolves(&m);
    assert!(
        m.lab
            .log("a")
            .contains("restored /etc/resolv.conf as it was"),
        "{}",
        m.lab.log("a")
    );
    let out = tern(&m, "a", &ha, &["down"]);
    assert!(out.status.success());
    m.lab
        .wait_for(
            "resolv.conf restored after the crash",
            Duration::from_secs(10),
            || resolv_conf(&m, &ha) == LAB_RESOLV_CONF,
        )
        .unwrap_or_else(|e| panic!("{e}: {}", resolv_conf(&m, &ha)));
    assert_eq!(resolve(&m, &ha, "www.example.com"), vec!["203.0.113.77"]);
}
