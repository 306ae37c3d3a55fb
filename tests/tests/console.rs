//! The admin console in headless Chromium (Debian's chromium + chromedriver): an admin signs in,
//! hands out a setup key, watches a peer come online, writes a policy, meets a route error, and
//! signs out. Screenshots of the main pages go to `artifacts/screenshots/` (docs/testing.md).
//!
//! Without Chromium the test says so and passes, except under CI=true, where it fails.

use serde_json::{json, Value};
use std::time::Duration;
use tern_management::state::ManagementOptions;
use tern_proto::management as pb;
use tern_tests::webdriver::{screenshot_dir, Browser};
use tern_tests::*;

const T: Duration = Duration::from_secs(10);

fn browser_available() -> bool {
    tern_tests::webdriver::available()
}

/// A fresh server (SQLite) and a browser window; None when Chromium is missing outside CI.
struct Console {
    db: TestDb,
    server: TestServer,
    b: Browser,
}

impl Console {
    async fn start(opts: ManagementOptions, width: u32, height: u32) -> Option<Console> {
        if !browser_available() {
            return None;
        }
        let db = TestDb::new(Backend::Sqlite).await.expect("db");
        let server = TestServer::start_with(&db.url, opts).await.expect("server");
        let b = Browser::start(width, height).await.expect("browser");
        Some(Console { db, server, b })
    }

    async fn finish(self) {
        drop(self.b);
        self.server.stop().await;
        self.db.cleanup().await;
    }
}

/// The console's session token, as the browser holds it.
async fn session_token(b: &Browser) -> String {
    let v = b
        .execute(
            "return JSON.parse(sessionStorage.getItem('tern.session')).token",
            vec![],
        )
        .await
        .expect("token");
    v.as_str().expect("token string").to_string()
}

async fn sign_in(b: &Browser, base: &str, user: &str, password: &str) -> anyhow::Result<()> {
    b.goto(&format!("{base}/")).await?;
    let u = b.wait("#signin-form input[name=username]", T).await?;
    b.clear(&u).await?;
    b.type_into(&u, user).await?;
    let p = b.wait("#signin-form input[name=password]", T).await?;
    b.clear(&p).await?;
    b.type_into(&p, password).await?;
    // Enter submits, as on any sign-in form.
    b.keys("\u{E007}").await?;
    Ok(())
}

/// Opens a page from the navigation (no reload) and waits for its heading.
async fn open(b: &Browser, route: &str, heading: &str) -> anyhow::Result<()> {
    // As a user would: back at the top of a long page, where the navigation is not under the
    // header.
    b.execute("window.scrollTo(0, 0)", vec![]).await?;
    let link = b.wait(&format!("nav a[data-route={route}]"), T).await;
    match link {
        Ok(l) if b.displayed(&l).await.unwrap_or(false) => b.click(&l).await?,
        // Phone-size window: the navigation sits behind the menu button.
        _ => {
            b.execute(&format!("location.hash = '#/{route}'"), vec![])
                .await?;
        }
    }
    b.wait_text(&format!(".page[data-page={route}] h1"), heading, T)
        .await?;
    Ok(())
}

async fn shot(b: &Browser, name: &str) -> anyhow::Result<()> {
    let path = screenshot_dir().join(format!("{name}.png"));
    b.screenshot(&path).await?;
    let len = std::fs::metadata(&path)?.len();
    assert!(len > 5_000, "{name}.png is only {len} bytes");
    Ok(())
}

/// Clicks the visible element matching `css`.
async fn click(b: &Browser, css: &str) -> anyhow::Result<()> {
    let e = b.wait(css, T).await?;
    b.click(&e).await
}

/// Clicks the element matching `css` whose text contains `text`.
async fn click_text(b: &Browser, css: &str, text: &str) -> anyhow::Result<()> {
    let e = b.wait_text(css, text, T).await?;
    b.click(&e).await
}

/// Picks an option of a <select> (as a user's choice: value set, change event fired).
async fn choose(b: &Browser, css: &str, value: &str) -> anyhow::Result<()> {
    b.wait(css, T).await?;
    let ok = b
        .execute(
            "const s = document.querySelector(arguments[0]); \
             if (![...s.options].some(o => o.value === arguments[1])) return false; \
             s.value = arguments[1]; s.dispatchEvent(new Event('change')); return true;",
            vec![json!(css), json!(value)],
        )
        .await?;
    anyhow::ensure!(ok == json!(true), "{css} has no option {value:?}");
    Ok(())
}

/// Fills the input `name` inside `scope`.
async fn fill(b: &Browser, scope: &str, name: &str, value: &str) -> anyhow::Result<()> {
    let e = b.wait(&format!("{scope} [name={name}]"), T).await?;
    b.clear(&e).await?;
    b.type_into(&e, value).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_admin_journey_in_chromium() {
    // Public services bind on loopback, in a range around a port known to be free.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut opts = fast_options();
    opts.public.bind = "127.0.0.1".parse().expect("ip");
    opts.public.ports = Some((free, free.saturating_add(10)));
    let Some(console) = Console::start(opts, 1280, 900).await else {
        return;
    };
    let (server, b) = (&console.server, &console.b);
    let base = server.base.clone();

    // --- Sign-in: a wrong password is refused in words, the username stays typed.
    sign_in(b, &base, "admin", "not-the-password")
        .await
        .expect("sign-in form");
    b.wait_text("#signin-form .form-error", "wrong username or password", T)
        .await
        .expect("sign-in error shown");
    let u = b
        .wait("#signin-form input[name=username]", T)
        .await
        .expect("username");
    assert_eq!(
        b.property(&u, "value").await.expect("value"),
        json!("admin"),
        "the form keeps what was typed"
    );
    shot(b, "01-sign-in-error").await.expect("shot");
    sign_in(b, &base, "admin", ADMIN_PASSWORD)
        .await
        .expect("sign in");
    b.wait_text(".page[data-page=overview] h1", "Overview", T)
        .await
        .expect("overview after sign-in");
    b.wait_text("#relay-health", "healthy", T)
        .await
        .expect("embedded relay answers STUN");
    shot(b, "02-overview").await.expect("shot");

    // --- Setup key: created with options, shown once with a copy button.
    open(b, "setup-keys", "Setup keys")
        .await
        .expect("keys page");
    click_text(b, ".page-head button", "New setup key")
        .await
        .expect("click");
    fill(b, "#setup-key-form", "name", "Factory gateway")
        .await
        .expect("name");
    click(b, "#setup-key-form input[name=reusable]")
        .await
        .expect("check reusable");
    fill(b, "#setup-key-form", "usage_limit", "5")
        .await
        .expect("limit");
    click(b, "#setup-key-form button[type=submit]")
        .await
        .expect("create key");
    let secret = b.wait("#new-key code.secret", T).await.expect("key shown");
    let key = b.text(&secret).await.expect("key text");
    assert!(
        key.starts_with("tern_sk_") && key.len() > 20,
        "key shown: {key:?}"
    );
    b.wait("#new-key button[data-action=copy]", T)
        .await
        .expect("copy button");
    // The join line is ready to paste: the server's public URL and this very key.
    let hint = b.wait("#new-key .join-hint", T).await.expect("join hint");
    let hint = b.text(&hint).await.expect("hint text");
    assert!(
        hint.contains(&format!(
            "tern up --management-url {base} --setup-key {key}"
        )),
        "{hint}"
    );
    // As a service the way README says (tern service install), not a unit file to fetch.
    assert!(
        hint.contains(&format!(
            "sudo tern service install --management-url {base} --setup-key {key}"
        )) && hint.contains("docker run")
            && !hint.contains("systemctl"),
        "{hint}"
    );
    shot(b, "03-setup-key-created").await.expect("shot");
    let keys = server.get("/api/setup-keys").await;
    let listed = keys
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"] == "Factory gateway")
        .expect("key listed by the API")
        .clone();
    assert_eq!(listed["reusable"], true);
    assert_eq!(listed["usage_limit"], 5);
    assert!(
        key.starts_with(listed["key_prefix"].as_str().expect("prefix")),
        "the shown key is the created one"
    );
    // Read once: after hiding it, neither the page nor the API has it any more.
    click_text(b, "#new-key button", "Done")
        .await
        .expect("hide");
    b.goto(&format!("{base}/#/setup-keys"))
        .await
        .expect("reload keys page");
    b.wait_text(".page[data-page=setup-keys] td", "Factory gateway", T)
        .await
        .expect("key listed");
    let html = b
        .execute("return document.documentElement.outerHTML", vec![])
        .await
        .expect("html");
    assert!(
        !html.as_str().unwrap_or("").contains(&key),
        "the key must not be shown again"
    );
    assert!(!keys.to_string().contains(&key), "the API never returns it");
    // The first start's key expires in 24 h; "Never expire" lifts that, after asking.
    click_text(b, "tr[data-key] button", "Never expire")
        .await
        .expect("never expire");
    b.wait_text("dialog", "Anyone holding it can join", T)
        .await
        .expect("asks first");
    click_text(b, "dialog button", "Never expire")
        .await
        .expect("confirm");
    b.wait_text(".notice", "no longer expires", T)
        .await
        .expect("done");
    let keys = server.get("/api/setup-keys").await;
    let first = keys
        .as_array()
        .and_then(|k| k.iter().find(|k| k["name"] == "default"))
        .expect("first key");
    assert!(first["expires_at"].is_null(), "{first}");

    // --- A peer registers with that key; the peers page shows it online without a reload.
    open(b, "peers", "Peers").await.expect("peers page");
    b.execute("window.__noReload = 42", vec![])
        .await
        .expect("mark page");
    let agent = TestAgent::new(server, "factory-gw").await;
    let login = agent.login(Some(&key)).await.expect("register with key");
    let _stream = agent.sync(&login.peer_token).await.expect("sync stream");
    let row = b
        .wait_text("tr[data-peer]", "factory-gw", Duration::from_secs(15))
        .await
        .expect("peer appears");
    let _ = row;
    b.wait_text("tr[data-peer] td.status", "online", Duration::from_secs(15))
        .await
        .expect("peer shown online");
    // With one peer the picture holds it, left of the relay, inside the drawing.
    open(b, "overview", "Overview").await.expect("overview");
    b.wait("svg.network a.node", T).await.expect("the one node");
    let inside = b
        .execute(
            "const svg = document.querySelector('svg.network'); const h = svg.viewBox.baseVal.height, w = svg.viewBox.baseVal.width; \
             return [...svg.querySelectorAll('a.node circle')].map((c) => { const x = c.cx.baseVal.value, y = c.cy.baseVal.value; return x >= 16 && x <= w - 16 && y >= 16 && y <= h - 16; })",
            vec![],
        )
        .await
        .expect("node position");
    assert_eq!(
        inside,
        json!([true]),
        "the one peer is drawn inside the picture"
    );
    shot(b, "04a-network-one-peer").await.expect("shot");
    open(b, "peers", "Peers").await.expect("peers page");
    // A second peer and a connection report: the console shows how they reach each other.
    let agent2 = TestAgent::new(server, "laptop-anna").await;
    let login2 = agent2.login(Some(&key)).await.expect("register 2");
    let _stream2 = agent2.sync(&login2.peer_token).await.expect("sync 2");
    let mut req = tonic::Request::new(pb::StatusReport {
        connections: vec![pb::PeerConnection {
            peer_id: login2.peer_id.clone(),
            kind: "turn_relay".into(),
            rtt_ms: 23,
            reason_code: "ice_no_direct_pair".into(),
            probes_settled: 12,
            probes_lost: 3,
        }],
        // factory-gw reaches the factory LAN (its route below is served).
        reachable_networks: vec!["192.168.50.0/24".into()],
        routes: vec![],
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&login.peer_token));
    agent.mgmt().report_status(req).await.expect("report");
    b.wait_text(
        "tr[data-peer] .conns",
        "TURN relay",
        Duration::from_secs(15),
    )
    .await
    .expect("connection type shown");
    // ... and why it is relayed, in words.
    b.wait_text(
        "tr[data-peer] .conns",
        "no direct pair got through the NATs",
        Duration::from_secs(5),
    )
    .await
    .expect("relay reason shown");
    b.wait_text("tr[data-peer] .conns", "25% loss", Duration::from_secs(5))
        .await
        .expect("path loss shown");
    // The search box narrows the table to matching rows.
    let search = b.wait(".table-search", T).await.expect("search box");
    b.type_into(&search, "factory").await.expect("type");
    b.wait_text(".search-count", "1 of 2 shown", T)
        .await
        .expect("one of two peers shown");
    let hidden = b
        .execute(
            "return [...document.querySelectorAll('tr[data-peer]')].filter((r) => r.hidden).map((r) => r.textContent.includes('laptop-anna'))",
            vec![],
        )
        .await
        .expect("rows");
    assert_eq!(hidden, json!([true]), "laptop-anna's row is hidden");
    let marker = b
        .execute("return window.__noReload", vec![])
        .await
        .expect("marker");
    assert_eq!(marker, json!(42), "updates arrived without a page reload");
    // At 1280 px every row's actions are in view, the relayed path's reason included.
    b.execute(
        "const s = document.querySelector('.table-search'); s.value = ''; s.dispatchEvent(new Event('input', { bubbles: true }));",
        vec![],
    )
    .await
    .expect("clear search");
    let shown = b
        .execute(
            "return [...document.querySelectorAll('tr[data-peer]')].filter((r) => !r.hidden).length",
            vec![],
        )
        .await
        .expect("rows");
    assert_eq!(shown, json!(2), "both rows again");
    let visible = b
        .execute(
            "return [...document.querySelectorAll('tr[data-peer] td.row-actions button')].map((e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth; })",
            vec![],
        )
        .await
        .expect("buttons");
    assert!(
        visible
            .as_array()
            .is_some_and(|v| v.len() >= 4 && v.iter().all(|x| x == true)),
        "Edit and Delete of each peer are within the 1280 px window: {visible}"
    );
    shot(b, "04-peers").await.expect("shot");
    open(b, "overview", "Overview").await.expect("overview");
    b.wait_text("#peers-online", "2 / 2", T)
        .await
        .expect("overview counts");
    b.wait_text(".card", "0 direct · 1 relayed", T)
        .await
        .expect("overview connections");
    // The network picture: both peers as nodes, their path as a TURN edge through the relay.
    b.wait("svg.network .edge.turn_relay", T)
        .await
        .expect("a relayed edge in the picture");
    let nodes = b.find_all("svg.network a.node").await.expect("nodes");
    assert_eq!(nodes.len(), 2, "one node per peer");
    b.wait("svg.network .relay-node", T)
        .await
        .expect("the relay in the picture");
    shot(b, "05-network").await.expect("shot");
    // Click through to the gateway's page: its path to laptop-anna, why it is relayed, its
    // groups and its events.
    click(
        b,
        &format!("svg.network a.node[data-peer=\"{}\"]", login.peer_id),
    )
    .await
    .expect("click the gateway's node");
    b.wait_text(".peer-page", "factory-gw", T)
        .await
        .expect("peer page");
    b.wait_text(".peer-page tr[data-kind=turn_relay]", "laptop-anna", T)
        .await
        .expect("its path to laptop-anna");
    b.wait_text(
        ".peer-page tr[data-kind=turn_relay]",
        "no direct pair got through the NATs",
        T,
    )
    .await
    .expect("why it is relayed");
    b.wait_text(".peer-page", "registered peer", T)
        .await
        .expect("its recent events in words");
    b.wait_text(".peer-page .endpoint", "127.0.0.1:", T)
        .await
        .expect("its public address as the server sees it");
    shot(b, "05b-peer").await.expect("shot");

    // --- Access policy: an invalid port is explained next to the field; then created.
    open(b, "policies", "Access policies")
        .await
        .expect("policies page");
    click_text(b, ".page-head button", "New policy")
        .await
        .expect("click");
    fill(b, "#policy-form", "name", "Anna to gateway SSH")
        .await
        .expect("name");
    click(b, "#policy-form input[name=sources][value=all]")
        .await
        .expect("src");
    click(b, "#policy-form input[name=destinations][value=all]")
        .await
        .expect("dst");
    choose(b, "#policy-form select[name=protocol]", "tcp")
        .await
        .expect("choose tcp");
    fill(b, "#policy-form", "ports", "22, 70000")
        .await
        .expect("ports");
    click(b, "#policy-form button[type=submit]")
        .await
        .expect("submit");
    b.wait_text(
        "#policy-form .field[data-field=ports] .field-error",
        "70000",
        T,
    )
    .await
    .expect("port error next to the ports field");
    fill(b, "#policy-form", "ports", "22")
        .await
        .expect("fix ports");
    click(b, "#policy-form button[type=submit]")
        .await
        .expect("submit again");
    b.wait_text("tr[data-policy]", "Anna to gateway SSH", T)
        .await
        .expect("policy listed");
    let policies = server.get("/api/policies").await;
    let p = policies
        .as_array()
        .expect("policies")
        .iter()
        .find(|p| p["name"] == "Anna to gateway SSH")
        .expect("policy created")
        .clone();
    assert_eq!(p["protocol"], "tcp");
    assert_eq!(p["ports"], json!(["22"]));
    // Switching off the catch-all policy asks first, says what it means, and the row shows it.
    let default_switch = ".page[data-page=policies] tr[data-policy] .switch input[aria-label='Policy default enabled']";
    click(b, default_switch).await.expect("switch default off");
    b.wait_text("dialog", "can reach every other peer", T)
        .await
        .expect("the catch-all asks first");
    click_text(b, "dialog button", "Disable")
        .await
        .expect("confirm");
    b.wait_text(".notice", "default disabled", T)
        .await
        .expect("disabled");
    b.wait_text("tr.disabled", "(disabled)", T)
        .await
        .expect("the row looks disabled");
    shot(b, "05-policies").await.expect("shot");
    click(b, default_switch).await.expect("switch default on");
    b.wait_text(".notice", "default enabled", T)
        .await
        .expect("enabling needs no confirmation");

    // --- Route: a malformed CIDR is refused next to the network field; input is kept.
    open(b, "routes", "Routes").await.expect("routes page");
    click_text(b, ".page-head button", "New route")
        .await
        .expect("click");
    fill(b, "#route-form", "network", "192.168.50.300/24")
        .await
        .expect("network");
    choose(b, "#route-form select[name=routing_peer]", &login.peer_id)
        .await
        .expect("choose routing peer");
    click(b, "#route-form input[name=groups][value=all]")
        .await
        .expect("dist");
    click(b, "#route-form button[type=submit]")
        .await
        .expect("submit");
    let err = b
        .wait_text(
            "#route-form .field[data-field=network] .field-error",
            "CIDR",
            T,
        )
        .await
        .expect("CIDR error next to the network field");
    let msg = b.text(&err).await.expect("text");
    assert!(msg.contains("192.168.50.300/24"), "names the input: {msg}");
    let net = b
        .wait("#route-form input[name=network]", T)
        .await
        .expect("network input");
    assert_eq!(
        b.property(&net, "value").await.expect("value"),
        json!("192.168.50.300/24")
    );
    assert_eq!(
        b.property(&net, "ariaInvalid").await.expect("aria"),
        json!("true")
    );
    shot(b, "06-route-error").await.expect("shot");
    fill(b, "#route-form", "network", "192.168.50.0/24")
        .await
        .expect("fix");
    click(b, "#route-form button[type=submit]")
        .await
        .expect("submit");
    b.wait_text("tr[data-route]", "192.168.50.0/24", T)
        .await
        .expect("route listed");
    // A new route follows the policies unless the admin opens it on purpose; the row says which.
    b.wait_text(
        "tr[data-route] .route-access",
        "as policies towards the routing peer allow",
        T,
    )
    .await
    .expect("policy-governed by default");
    click_text(b, "tr[data-route] button", "Edit")
        .await
        .expect("edit route");
    click(b, "#route-form input[name=open_to_groups]")
        .await
        .expect("open to the distribution groups");
    click(b, "#route-form button[type=submit]")
        .await
        .expect("save");
    b.wait_text(
        "tr[data-route] .route-access",
        "open to distribution groups",
        T,
    )
    .await
    .expect("the row says it is open");
    assert_eq!(
        server.get("/api/routes").await[0]["open_to_groups"],
        true,
        "saved"
    );
    // factory-gw reported that it reaches 192.168.50.0/24: the route says who serves it.
    b.wait_text("tr[data-route] .serving", "served by factory-gw", T)
        .await
        .expect("served by the routing peer");
    // laptop-anna reports that it installed the route but no policy lets it use the network:
    // the route row names it with the reason.
    let mut req = tonic::Request::new(pb::StatusReport {
        connections: vec![],
        reachable_networks: vec![],
        routes: vec![pb::RouteReport {
            network: "192.168.50.0/24".into(),
            state: "no_access".into(),
            routing_peer_id: login.peer_id.clone(),
            detail: "no policy lets this peer use 192.168.50.0/24; factory-gw drops its traffic"
                .into(),
        }],
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&login2.peer_token));
    agent2.mgmt().report_status(req).await.expect("report");
    b.wait_text(
        "tr[data-route] .route-clients",
        "laptop-anna: installed, but no policy lets it use the network",
        T,
    )
    .await
    .expect("the client's route state is shown");
    shot(b, "07-routes").await.expect("shot");
    // The network picture shows the factory LAN hanging off its routing peer.
    open(b, "overview", "Overview").await.expect("overview");
    b.wait(
        &format!(
            "svg.network .lan[data-network=\"192.168.50.0/24\"][data-peer=\"{}\"]",
            login.peer_id
        ),
        T,
    )
    .await
    .expect("the LAN behind factory-gw");
    // The LAN's box does not cover its router's name (nor any other name).
    let overlaps = b
        .execute(
            "const svg = document.querySelector('svg.network'); const boxes = [...svg.querySelectorAll('.lan rect')].map((r) => r.getBBox()); \
             const names = [...svg.querySelectorAll('a.node text')].map((t) => t.getBBox()); \
             const hit = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height; \
             return boxes.length ? boxes.some((l) => names.some((n) => hit(l, n))) : 'no LAN drawn'",
            vec![],
        )
        .await
        .expect("boxes");
    assert_eq!(overlaps, json!(false), "a LAN box covers a name");
    shot(b, "07b-network-lan").await.expect("shot");

    // --- Public service: a port outside the server's range is explained at the field; then the
    // service is published and listed with its address and the peer that carries it; disabling
    // asks first.
    open(b, "services", "Public services")
        .await
        .expect("services page");
    click_text(b, ".page-head button", "New public service")
        .await
        .expect("click");
    fill(b, "#service-form", "name", "PLC Modbus")
        .await
        .expect("name");
    fill(b, "#service-form", "public_port", "80")
        .await
        .expect("port");
    fill(b, "#service-form", "target_ip", "192.168.50.10")
        .await
        .expect("target");
    fill(b, "#service-form", "target_port", "502")
        .await
        .expect("target port");
    fill(b, "#service-form", "allowed_sources", "198.51.100.0/24")
        .await
        .expect("sources");
    click(b, "#service-form button[type=submit]")
        .await
        .expect("submit");
    b.wait_text(
        "#service-form .field[data-field=public_port] .field-error",
        "outside the ports this server may publish",
        T,
    )
    .await
    .expect("port error next to the public port field");
    fill(b, "#service-form", "public_port", &free.to_string())
        .await
        .expect("fix port");
    click(b, "#service-form button[type=submit]")
        .await
        .expect("submit again");
    b.wait_text("tr[data-service]", &format!("127.0.0.1:{free}"), T)
        .await
        .expect("service listed with its address");
    b.wait_text("tr[data-service]", "routing peer factory-gw", T)
        .await
        .expect("the routing peer that carries it");
    shot(b, "07b-public-services").await.expect("shot");
    click(b, "tr[data-service] .switch input")
        .await
        .expect("switch");
    b.wait_text("dialog", "closes", T)
        .await
        .expect("disabling asks first");
    click_text(b, "dialog button", "Disable")
        .await
        .expect("confirm");
    b.wait_text(".notice", "PLC Modbus disabled", T)
        .await
        .expect("disabled");
    let svc = server.get("/api/services").await;
    assert_eq!(svc[0]["enabled"], false, "{svc}");
    assert_eq!(svc[0]["allowed_sources"], json!(["198.51.100.0/24"]));

    // --- Settings: an MTU below 1280 is explained at the field; peer approval switched on.
    open(b, "settings", "Settings").await.expect("settings");
    fill(b, "#settings-form", "mtu", "1000").await.expect("mtu");
    click(b, "#settings-form input[name=peer_approval_required]")
        .await
        .expect("check");
    click(b, "#settings-form button[type=submit]")
        .await
        .expect("save");
    b.wait_text(
        "#settings-form .field[data-field=mtu] .field-error",
        "1280",
        T,
    )
    .await
    .expect("MTU error at the field");
    assert_eq!(
        server.get("/api/settings").await["peer_approval_required"],
        false,
        "nothing saved from a refused form"
    );
    fill(b, "#settings-form", "mtu", "1280").await.expect("mtu");
    click(b, "#settings-form button[type=submit]")
        .await
        .expect("save");
    b.wait_text(".notice", "Settings saved", T)
        .await
        .expect("saved");
    assert_eq!(
        server.get("/api/settings").await["peer_approval_required"],
        true
    );
    shot(b, "10-settings").await.expect("shot");

    // --- A peer joining now waits for approval; the admin approves it from the peers page.
    open(b, "peers", "Peers").await.expect("peers");
    let agent3 = TestAgent::new(server, "contractor-pc").await;
    let login3 = agent3.login(Some(&key)).await.expect("register 3");
    let _stream3 = agent3.sync(&login3.peer_token).await.expect("sync 3");
    b.wait_text(
        &format!("tr[data-peer=\"{}\"]", login3.peer_id),
        "awaiting approval",
        Duration::from_secs(15),
    )
    .await
    .expect("pending peer flagged");
    let approve = b
        .wait(
            &format!(
                "tr[data-peer=\"{}\"] button[data-action=approve]",
                login3.peer_id
            ),
            T,
        )
        .await
        .expect("approve button");
    b.click(&approve).await.expect("approve");
    b.wait_text(".notice", "approved", T)
        .await
        .expect("approved notice");
    let p3 = server.get(&format!("/api/peers/{}", login3.peer_id)).await;
    assert_eq!(p3["approved"], true);

    // --- A plain WireGuard device from the peers page: a bad name is refused at the field, then
    // the configuration (with its private key) and a QR code are shown once.
    click_text(b, ".page-head button", "Add WireGuard device")
        .await
        .expect("add a WireGuard device");
    let name = b
        .wait("#wireguard-device-form input[name=name]", T)
        .await
        .expect("name field");
    b.type_into(&name, "gina phone").await.expect("type");
    click(b, "#wireguard-device-form button[type=submit]")
        .await
        .expect("submit");
    b.wait_text(
        "#wireguard-device-form .field[data-field=name] .field-error",
        "letters, digits and dashes",
        T,
    )
    .await
    .expect("name error at the field");
    b.clear(&name).await.expect("clear");
    b.type_into(&name, "gina-phone").await.expect("type");
    click(b, "#wireguard-device-form button[type=submit]")
        .await
        .expect("submit");
    b.wait_text("#new-wireguard-device pre", "[Interface]", T)
        .await
        .expect("the configuration is shown");
    b.wait_text("#new-wireguard-device pre", "Endpoint = 127.0.0.1:", T)
        .await
        .expect("with the server's endpoint");
    b.wait("#new-wireguard-device img.qr", T)
        .await
        .expect("a QR code");
    b.wait_text("#new-wireguard-device a[download]", "gina-phone.conf", T)
        .await
        .expect("a download link");
    b.wait_text("td.owner", "WireGuard device", Duration::from_secs(15))
        .await
        .expect("the device in the peer list");
    shot(b, "04b-wireguard-device").await.expect("shot");
    click_text(b, "#new-wireguard-device button", "Done")
        .await
        .expect("hide it");
    click_text(b, "a.peer-link", "gina-phone")
        .await
        .expect("the device's page");
    b.wait_text(".peer-page .wireguard", "none since the server started", T)
        .await
        .expect("its WireGuard facts");
    b.wait_text(".peer-page dd", "a plain WireGuard device (no agent)", T)
        .await
        .expect("no agent");
    open(b, "peers", "Peers").await.expect("back to the peers");
    // A lost configuration: new keys, shown once again.
    click(b, "button[data-action=reissue]")
        .await
        .expect("new config");
    click_text(b, "dialog button.danger", "New configuration")
        .await
        .expect("confirm");
    b.wait_text("#new-wireguard-device pre", "PrivateKey = ", T)
        .await
        .expect("the new configuration");
    click_text(b, "#new-wireguard-device button", "Done")
        .await
        .expect("hide it");

    // --- Group members are chosen on the group's own page, in one dialog.
    let (st, line) = server.post("/api/groups", json!({"name": "Line 2"})).await;
    assert_eq!(st, 201, "{line}");
    let line_id = line["id"].as_str().expect("id").to_string();
    open(b, "groups", "Groups").await.expect("groups page");
    click_text(b, &format!("tr[data-group='{line_id}'] button"), "Members")
        .await
        .expect("members");
    click(
        b,
        &format!("#members-form input[name=peers][value='{}']", login.peer_id),
    )
    .await
    .expect("pick factory-gw");
    click(b, "#members-form button[type=submit]")
        .await
        .expect("save members");
    b.wait_text(".notice", "Line 2: 1 peer", T)
        .await
        .expect("saved");
    b.wait_text(&format!("tr[data-group='{line_id}'] td"), "1", T)
        .await
        .expect("the count follows");
    let gw = server.get(&format!("/api/peers/{}", login.peer_id)).await;
    assert!(gw["groups"].to_string().contains(&line_id), "{gw}");

    // --- The remaining pages render (and are captured).
    for (route, heading, name) in [
        ("groups", "Groups", "08-groups"),
        ("audit", "Audit log", "09-audit"),
        ("users", "Users", "11-users-tokens"),
        ("dns", "DNS", "07c-dns"),
    ] {
        open(b, route, heading).await.expect(route);
        shot(b, name).await.expect("shot");
    }
    // The audit log filters by action.
    open(b, "audit", "Audit log").await.expect("audit");
    fill(b, "#audit-filter", "action", "policy.")
        .await
        .expect("filter");
    click(b, "#audit-filter button[type=submit]")
        .await
        .expect("filter");
    b.wait_text(".page[data-page=audit] td", "disabled policy", T)
        .await
        .expect("policy events in words");
    let rows = b
        .find_all(".page[data-page=audit] tbody tr")
        .await
        .expect("rows");
    let hex_id = |t: &str| {
        t.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w.len() >= 12 && w.chars().all(|c| c.is_ascii_hexdigit()))
    };
    for r in &rows {
        let t = b.text(r).await.expect("row");
        assert!(t.contains("policy"), "filtered row: {t}");
        assert!(!hex_id(&t), "an internal id in the audit log: {t}");
    }
    let names = b
        .find_all(".page[data-page=audit] td")
        .await
        .expect("cells");
    let mut all = String::new();
    for c in &names {
        all.push_str(&b.text(c).await.expect("cell"));
        all.push('\n');
    }
    assert!(all.contains("policy default"), "{all}");
    assert!(all.contains("enabled policy"), "{all}");

    // --- Phone-size window: navigation behind a menu, page still usable.
    b.set_size(390, 844).await.expect("phone size");
    open(b, "peers", "Peers").await.expect("peers on phone");
    shot(b, "12-peers-phone").await.expect("shot");
    let menu = b.wait("button.menu", T).await.expect("menu button");
    b.click(&menu).await.expect("open menu");
    b.wait("nav a[data-route=routes]", T)
        .await
        .expect("nav visible after menu");
    shot(b, "13-menu-phone").await.expect("shot");
    b.set_size(1280, 900).await.expect("desktop");

    // --- Sign out: back to the sign-in page, and the session token is dead on the server.
    let token = session_token(b).await;
    let ok = server
        .http
        .get(server.url("/api/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(ok.status(), 200);
    let out = b.wait("#signout", T).await.expect("sign-out button");
    b.click(&out).await.expect("sign out");
    b.wait_text("#signin-form", "You have signed out", T)
        .await
        .expect("signed out");
    let after = server
        .http
        .get(server.url("/api/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(after.status(), 401, "logout ends the session on the server");
    let stored = b
        .execute("return sessionStorage.getItem('tern.session')", vec![])
        .await
        .expect("storage");
    assert_eq!(stored, Value::Null, "nothing left in the browser");
    // Going back to a page needs a new sign-in.
    b.goto(&format!("{base}/#/peers")).await.expect("goto");
    b.wait("#signin-form", T)
        .await
        .expect("sign-in required again");

    console.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyboard_only_sign_in_and_dialogs() {
    let Some(console) = Console::start(fast_options(), 1024, 768).await else {
        return;
    };
    let (server, b) = (&console.server, &console.b);

    // Keyboard only: the username field has focus; Tab to the password, Enter to submit.
    b.goto(&format!("{}/", server.base)).await.expect("open");
    b.wait("#signin-form input[name=username]", T)
        .await
        .expect("form");
    let focused = b
        .execute("return document.activeElement.name", vec![])
        .await
        .expect("focus");
    assert_eq!(
        focused,
        json!("username"),
        "sign-in starts in the username field"
    );
    b.keys("admin\u{E004}").await.expect("type + tab");
    b.keys(ADMIN_PASSWORD).await.expect("password");
    b.keys("\u{E007}").await.expect("enter");
    b.wait_text(".page[data-page=overview] h1", "Overview", T)
        .await
        .expect("signed in by keyboard");

    // A dialog opens from the keyboard, traps focus in its first field, and Escape closes it.
    b.execute("location.hash = '#/groups'", vec![])
        .await
        .expect("groups");
    let new_group = b
        .wait_text(".page-head button", "New group", T)
        .await
        .expect("button");
    b.execute("arguments[0].focus()", vec![new_group.as_arg()])
        .await
        .expect("focus button");
    b.keys("\u{E007}").await.expect("enter opens the dialog");
    b.wait("dialog[open] input[name=name]", T)
        .await
        .expect("dialog open");
    let focused = b
        .execute("return document.activeElement.name", vec![])
        .await
        .expect("focus");
    assert_eq!(focused, json!("name"), "focus moves into the dialog");
    b.keys("\u{E00C}").await.expect("escape");
    b.wait_gone("dialog[open]", T)
        .await
        .expect("Escape closes the dialog");

    console.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_returns_to_sign_in_and_is_refused_by_the_api() {
    let mut opts = fast_options();
    opts.admin_session_ttl = Duration::from_secs(3);
    let Some(console) = Console::start(opts, 1024, 768).await else {
        return;
    };
    let (server, b) = (&console.server, &console.b);
    sign_in(b, &server.base, "admin", ADMIN_PASSWORD)
        .await
        .expect("sign in");
    b.wait("#signout", T).await.expect("signed in");
    let token = session_token(b).await;
    // The session ends on its own: the console returns to sign-in and says why.
    b.wait_text("#signin-form", "expired", Duration::from_secs(15))
        .await
        .expect("expiry shown");
    let r = server
        .http
        .get(server.url("/api/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(
        r.status(),
        401,
        "the server refuses the expired session too"
    );
    console.finish().await;
}
