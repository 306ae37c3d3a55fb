//! Employees add their laptops by signing in, end to end: real `tern up` agents without a setup
//! key in network namespaces, a real server with single sign-on through the loopback identity
//! provider, and headless Chromium approving the codes the agents print. Then the console as a
//! `user` (only their devices) and as an `auditor` (everything, no controls), and a disabled user
//! as the agent reports it.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tern_tests::idp::Idp;
use tern_tests::mesh::bin;
use tern_tests::netns::{forward_into, Lab};
use tern_tests::webdriver::{screenshot_dir, Browser};
use tern_tests::*;

const AUDIENCE: &str = "tern-console";

/// The code and link an agent printed, once it has.
fn printed_code(lab: &Lab, who: &str) -> Option<(String, String)> {
    let log = lab.log(who);
    let url = log.lines().find_map(|l| {
        l.trim()
            .contains("/device?code=")
            .then(|| l.trim().to_string())
    })?;
    let code = url.rsplit('=').next()?.to_string();
    Some((url, code))
}

struct Device {
    who: String,
    ns: String,
    args: Vec<String>,
}

impl Device {
    fn new(lab: &mut Lab, who: &str) -> Device {
        let ns = lab.add_bare(who).expect("namespace");
        let st = lab.dir.path().join(who);
        let args = vec![
            "--state-dir".into(),
            st.join("state").display().to_string(),
            "--run-dir".into(),
            st.join("run").display().to_string(),
            "--interface".into(),
            "tern0".into(),
        ];
        Device {
            who: who.into(),
            ns,
            args,
        }
    }

    fn up(&self, lab: &mut Lab, url: &str, extra: &[&str]) {
        let mut args = self.args.clone();
        args.extend(["up", "--management-url", url, "--hostname", &self.who].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(
            &self.who,
            &self.ns,
            &bin("tern"),
            &refs,
            &[("TERN_LOG", "info,webrtc_ice=warn,turn=warn")],
        )
        .expect("agent");
    }

    fn tern(&self, lab: &Lab, cmd: &[&str]) -> std::process::Output {
        let mut full = vec![bin("tern").display().to_string()];
        full.extend(self.args.iter().cloned());
        full.extend(cmd.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        lab.exec(&self.ns, &refs)
    }

    fn status(&self, lab: &Lab) -> Option<Value> {
        serde_json::from_slice(&self.tern(lab, &["status", "--json"]).stdout).ok()
    }

    fn wait_code(&self, lab: &Lab) -> (String, String) {
        let mut found = None;
        lab.wait_for(
            &format!("{} prints its code", self.who),
            Duration::from_secs(20),
            || {
                found = printed_code(lab, &self.who);
                found.is_some()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log(&self.who)));
        found.expect("code")
    }
}

async fn approve_in_browser(b: &Browser, url: &str, host: &str) {
    let t = Duration::from_secs(15);
    b.goto(url).await.expect("open the printed link");
    b.wait_text("#device-result", &format!("Add {host} to the network?"), t)
        .await
        .expect("the device is shown before approval");
    let ok = b.wait("#device-approve", t).await.expect("approve button");
    b.click(&ok).await.expect("approve");
    b.wait_text("#device-outcome", "Approved by gina@example.com", t)
        .await
        .expect("approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employees_add_their_laptops_by_signing_in() {
    if tern_tests::mesh::skip() {
        return;
    }
    if !tern_tests::webdriver::available() {
        return;
    }
    let idp = Idp::start(AUDIENCE).await.expect("idp");
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let mut opts = fast_options();
    opts.oidc = Some(idp.config(AUDIENCE, Some("groups")));
    let server = TestServer::start_with(&db.url, opts).await.expect("server");
    let port: u16 = server
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let (s, eng) = server
        .post("/api/groups", json!({"name": "engineering"}))
        .await;
    assert_eq!(s, 201, "{eng}");
    let eng_id = eng["id"].as_str().expect("id").to_string();
    // An appliance joined with a setup key, which gina must not see.
    let gw = TestAgent::new(&server, "factory-gw").await;
    gw.login(Some(&server.default_setup_key)).await.expect("gw");

    let mut lab = Lab::new().expect("lab");
    let one = Device::new(&mut lab, "gina-laptop");
    let two = Device::new(&mut lab, "gina-desktop");
    let _f1 = forward_into(&one.ns, port).expect("forward");
    let _f2 = forward_into(&two.ns, port).expect("forward");
    let url = format!("http://127.0.0.1:{port}");

    // An agent without a setup key prints where to sign in and its code, then waits.
    one.up(&mut lab, &url, &[]);
    let (link, code) = one.wait_code(&lab);
    let log = lab.log(&one.who);
    eprintln!("tern up without a setup key, as the person reads it:\n{log}");
    assert!(log.contains("sign in with your company account"), "{log}");
    assert!(
        log.contains(&format!(
            "open {url}/device on any device and enter the code {code}"
        )),
        "{log}"
    );
    assert!(!log.contains("null"), "{log}");

    // Gina opens the link, signs in through the provider and approves the device.
    let b = Browser::start(1280, 900).await.expect("browser");
    let t = Duration::from_secs(15);
    idp.set_user(
        json!({"sub": "gina", "email": "gina@example.com", "groups": ["staff", "engineering"]}),
    );
    b.goto(&link).await.expect("open");
    b.wait_text("#signin-form", "Sign in to approve your device", t)
        .await
        .expect("sign-in page says why");
    let sso = b.wait("#sso", t).await.expect("SSO button");
    b.click(&sso).await.expect("click");
    b.wait_text("#device-result", "Add gina-laptop to the network?", t)
        .await
        .expect("back on the approval page after signing in");
    b.screenshot(&screenshot_dir().join("20-approve-a-device.png"))
        .await
        .expect("shot");
    let ok = b.wait("#device-approve", t).await.expect("approve");
    b.click(&ok).await.expect("click");
    b.wait_text("#device-outcome", "Approved by gina@example.com", t)
        .await
        .expect("approved");
    lab.wait_for("gina-laptop up", Duration::from_secs(20), || {
        one.status(&lab).is_some()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log(&one.who)));
    assert!(lab.log(&one.who).contains("tern: sign-in approved"));

    // It is gina's, in the group her provider names.
    let peers = server.get("/api/peers").await;
    let laptop = peers
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["name"] == "gina-laptop")
        .expect("registered")
        .clone();
    assert_eq!(laptop["owner"], "gina@example.com", "{laptop}");
    assert!(
        laptop["groups"]
            .as_array()
            .expect("groups")
            .contains(&json!(eng_id)),
        "{laptop}"
    );

    // A code denied in the console: the agent says so and stops.
    two.up(&mut lab, &url, &[]);
    let (_, code2) = two.wait_code(&lab);
    b.goto(&format!("{}/#/device", server.base))
        .await
        .expect("open");
    let form = b
        .wait("#device-form input[name=code]", t)
        .await
        .expect("code field");
    b.type_into(&form, &code2.to_lowercase().replace('-', " "))
        .await
        .expect("type");
    b.keys("\u{E007}").await.expect("enter");
    let deny = b.wait("#device-deny", t).await.expect("deny");
    b.click(&deny).await.expect("click");
    b.wait_text("#device-outcome", "Denied by gina@example.com", t)
        .await
        .expect("denied");
    lab.wait_for("the denied agent exits", Duration::from_secs(15), || {
        lab.log(&two.who).contains("denied this device's sign-in")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log(&two.who)));
    lab.stop(&two.who);
    // A wrong code on the page: refused in words.
    b.goto(&format!("{}/#/device/BCDF-GHJK", server.base))
        .await
        .expect("open");
    b.wait_text(
        "#device-error",
        "no sign-in is waiting for the code BCDF-GHJK",
        t,
    )
    .await
    .expect("wrong code refused");
    // Nobody approves: the agent gives up with what to do.
    let out = two.tern(
        &lab,
        &["up", "--management-url", &url, "--sign-in-timeout", "3"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("within 3 s: run tern up again for a new code"),
        "{err}"
    );

    // Her second device: she is signed in already, one click.
    two.up(&mut lab, &url, &[]);
    let (link2, _) = two.wait_code(&lab);
    approve_in_browser(&b, &link2, "gina-desktop").await;
    lab.wait_for("gina-desktop up", Duration::from_secs(20), || {
        two.status(&lab).is_some()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log(&two.who)));
    // Her devices see each other (through the TCP relay: these namespaces have no UDP path).
    lab.wait_for(
        "the laptop sees the desktop",
        Duration::from_secs(20),
        || {
            one.status(&lab).is_some_and(|s| {
                s["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|x| x["name"] == "gina-desktop"))
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log(&one.who)));

    // The console as gina: her devices only.
    b.goto(&format!("{}/#/devices", server.base))
        .await
        .expect("open");
    b.wait_text(".page[data-page=devices] h1", "My devices", t)
        .await
        .expect("my devices");
    b.wait_text(".page[data-page=devices] table", "gina-desktop", t)
        .await
        .expect("listed");
    let rows = b
        .find_all(".page[data-page=devices] tbody tr")
        .await
        .expect("rows");
    assert_eq!(rows.len(), 2, "her two devices, not the appliance");
    let nav = b.find_all("nav a").await.expect("nav");
    let mut items = vec![];
    for a in &nav {
        items.push(b.text(a).await.expect("text"));
    }
    assert_eq!(items, vec!["My devices", "Add a device"], "a user's menu");
    b.screenshot(&screenshot_dir().join("21-my-devices.png"))
        .await
        .expect("shot");

    // An auditor sees everything and can change nothing.
    let (s, v) = server
        .post(
            "/api/users",
            json!({"username": "rex", "password": "rex-password-12", "role": "auditor"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let out = b.wait("#signout", t).await.expect("sign out");
    b.click(&out).await.expect("click");
    let user = b
        .wait("#signin-form input[name=username]", t)
        .await
        .expect("form");
    b.type_into(&user, "rex").await.expect("type");
    let pw = b
        .wait("#signin-form input[name=password]", t)
        .await
        .expect("pw");
    b.type_into(&pw, "rex-password-12").await.expect("type");
    b.keys("\u{E007}").await.expect("enter");
    b.wait_text(".page[data-page=overview] h1", "Overview", t)
        .await
        .expect("auditor signed in");
    b.goto(&format!("{}/#/peers", server.base))
        .await
        .expect("open");
    b.wait_text(".page[data-page=peers] table", "factory-gw", t)
        .await
        .expect("all peers");
    b.wait_text(".page[data-page=peers] table", "gina@example.com", t)
        .await
        .expect("owners shown");
    for sel in [
        ".page[data-page=peers] td.row-actions button",
        ".page-head .actions button",
    ] {
        for e in b.find_all(sel).await.expect("find") {
            assert!(
                !b.displayed(&e).await.expect("displayed"),
                "{sel} shown to an auditor"
            );
        }
    }
    b.goto(&format!("{}/#/settings", server.base))
        .await
        .expect("open");
    b.wait_text(".page[data-page=settings] h1", "Settings", t)
        .await
        .expect("settings");
    assert!(
        b.find_all("#settings-form button[type=submit]")
            .await
            .expect("find")
            .is_empty(),
        "no save button for an auditor"
    );
    b.screenshot(&screenshot_dir().join("22-auditor-settings.png"))
        .await
        .expect("shot");

    // Disabling gina: her devices are told, and say so in `tern status`.
    let users = server.get("/api/users").await;
    let gina = users
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["username"] == "gina@example.com")
        .expect("gina")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let t0 = Instant::now();
    let (s, _) = server
        .put(&format!("/api/users/{gina}"), json!({"disabled": true}))
        .await;
    assert_eq!(s, 200);
    let mut human = String::new();
    lab.wait_for(
        "the laptop says its user is disabled",
        Duration::from_secs(15),
        || {
            human = String::from_utf8_lossy(&one.tern(&lab, &["status"]).stdout).to_string();
            human.contains("this device's user is disabled")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{human}\n{}", lab.log(&one.who)));
    eprintln!(
        "the laptop reported its disabled user after {:?}",
        t0.elapsed()
    );
    assert!(!human.contains("null"), "{human}");
    lab.wait_for("the laptop drops its peers", Duration::from_secs(5), || {
        one.status(&lab)
            .is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.is_empty()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log(&one.who)));
    eprintln!("tern status of a device whose user is disabled:\n{human}");

    drop(b);
    lab.stop(&one.who);
    lab.stop(&two.who);
    server.stop().await;
    db.cleanup().await;
}
