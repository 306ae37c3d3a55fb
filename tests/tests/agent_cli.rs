//! The `tern` CLI as a user meets it when the management URL is wrong: every mistake gets its own
//! message, in words, once (no "transport error: transport error"), and `tern up` exits instead
//! of hanging. Runs the real binary (as root: `tern up` checks for root first) against servers on
//! loopback; nothing here creates a TUN device, because every attempt fails before that.

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tern_tests::*;

/// `tern up` with `url`; returns (exited with success, stderr).
async fn up(url: &str, extra_env: &[(&str, &str)]) -> (bool, String) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, run) = (tmp.path().join("state"), tmp.path().join("run"));
    let out = tern_tests::mesh::tern_up_bounded(
        &[
            "--management-url".as_ref(),
            url.as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--run-dir".as_ref(),
            run.as_os_str(),
        ],
        extra_env,
        "terncli0",
        Duration::from_secs(30),
    )
    .await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TLS listener with a self-signed certificate for "localhost" that serves an empty router.
async fn tls_server() -> (
    u16,
    tempfile::NamedTempFile,
    tokio::sync::watch::Sender<bool>,
) {
    let (cert, key, pem) = tern_tests::self_signed_localhost();
    let mut ca = tempfile::NamedTempFile::new().expect("tmp");
    std::io::Write::write_all(&mut ca, pem.as_bytes()).expect("write");
    let cfg: Arc<rustls::ServerConfig> =
        tern_relay::tls::server_config(vec![cert], key).expect("server config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(tern_relay::tls::serve(
        listener,
        axum::Router::new(),
        Some(cfg),
        rx,
    ));
    (port, ca, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_management_url_mistake_gets_its_own_message() {
    init_tracing();
    if tern_tests::mesh::skip() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let plain = srv.base.trim_start_matches("http://").to_string();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }; // dropped: nothing listens there now
    let (tls_port, ca, _stop) = tls_server().await;

    let cases: Vec<(String, &str)> = vec![
        ("htp://127.0.0.1:8080".into(), "must start with https://"),
        ("127.0.0.1:8080".into(), "has no scheme"),
        ("http://:8080".into(), "has no host"),
        ("http://127.0.0.1:99999".into(), "a port is a number"),
        (format!("http://127.0.0.1:{closed}"), "connection refused"),
        (format!("https://{plain}"), "does not speak TLS"),
        (format!("http://localhost:{tls_port}"), "use https://"),
        (format!("https://localhost:{tls_port}"), "not trusted"),
    ];
    let mut messages = std::collections::HashSet::new();
    for (url, words) in &cases {
        let (ok, stderr) = up(url, &[]).await;
        assert!(!ok, "{url}: tern up must fail");
        assert!(
            stderr.contains(words),
            "{url}: expected {words:?} in:\n{stderr}"
        );
        for repeated in [
            "transport error: transport error",
            "tcp connect error: tcp connect error",
        ] {
            assert!(!stderr.contains(repeated), "{url}: {stderr}");
        }
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or(&stderr)
            .to_string();
        assert!(
            messages.insert(line.clone()),
            "{url}: same message as another mistake: {line}"
        );
        eprintln!("{url}\n  {line}");
        // Said once: no part of the message repeats.
        let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
        let distinct: std::collections::HashSet<&str> = parts.iter().copied().collect();
        assert_eq!(
            parts.len(),
            distinct.len(),
            "{url}: the message repeats itself: {line}"
        );
    }
    // With the CA given, the certificate is trusted and the next problem is named instead
    // (an empty server: not a Tern management service).
    let ca_path = ca.path().display().to_string();
    let (ok, stderr) = up(
        &format!("https://localhost:{tls_port}"),
        &[("TERN_CA_FILE", &ca_path)],
    )
    .await;
    assert!(!ok);
    assert!(!stderr.contains("not trusted"), "{stderr}");
    srv.stop().await;
    db.cleanup().await;
}

/// `tern` run to completion with `args` (bounded to 30 s): (success, stdout + stderr).
async fn tern(args: &[&std::ffi::OsStr], env: &[(&str, &std::ffi::OsStr)]) -> (bool, String) {
    let mut c = tokio::process::Command::new(tern_tests::mesh::bin("tern"));
    c.args(args).kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("tern finished within 30 s")
        .expect("tern ran");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_install_joins_once_writes_the_unit_and_uninstall_removes_it() {
    init_tracing();
    if tern_tests::mesh::skip() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let tmp = tempfile::tempdir().expect("tmp");
    let (state, run, units) = (
        tmp.path().join("state"),
        tmp.path().join("run"),
        tmp.path().join("units"),
    );
    let dirs = |rest: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--state-dir".into(),
            state.clone().into(),
            "--run-dir".into(),
            run.clone().into(),
            "--interface".into(),
            "ternsvc0".into(),
        ];
        v.extend(rest.iter().map(|s| (*s).into()));
        v
    };
    let env = [("TERN_SYSTEMD_DIR", units.as_os_str())];
    // Not joined and no key: it says what to run.
    let args = dirs(&["service", "install"]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out) = tern(&refs, &env).await;
    assert!(!ok && out.contains("has not joined a network yet"), "{out}");
    // With a key: joins (the peer is registered), writes the unit.
    let args = dirs(&[
        "service",
        "install",
        "--management-url",
        &srv.base,
        "--setup-key",
        &srv.default_setup_key,
        "--hostname",
        "plc-gw",
    ]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out) = tern(&refs, &env).await;
    assert!(ok, "{out}");
    assert!(out.contains("tern: joined as plc-gw with 100."), "{out}");
    let unit = std::fs::read_to_string(units.join("tern-ternsvc0.service")).expect("unit");
    assert!(
        unit.contains(&format!(
            "--state-dir {} --run-dir {} --interface ternsvc0 up",
            state.canonicalize().expect("state").display(),
            run.display()
        )),
        "{unit}"
    );
    let peers = srv.get("/api/peers").await;
    assert!(peers.to_string().contains("plc-gw"), "{peers}");
    // Joined now: installing again needs no key, and takes `tern up`'s settings, which the
    // service (a bare `tern up`) then runs with: saved in the state directory.
    let args = dirs(&[
        "service",
        "install",
        "--nat64-prefix",
        "64:ff9b::/96",
        "--mtu",
        "1400",
        "--no-dns",
    ]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out) = tern(&refs, &env).await;
    assert!(ok && !out.contains("joined as"), "{out}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(
        (&saved["nat64_prefix"], &saved["mtu"], &saved["no_dns"]),
        (&json!("64:ff9b::/96"), &json!(1400), &json!(true)),
        "{saved}"
    );
    // A bad value is refused at the flag, with what a good one looks like.
    let args = dirs(&["service", "install", "--nat64-prefix", "64:ff9b::/95"]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out) = tern(&refs, &env).await;
    assert!(!ok && out.contains("RFC 6052"), "{out}");
    // Uninstall removes it; a second uninstall says there is nothing to remove.
    let args = dirs(&["service", "uninstall"]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, out) = tern(&refs, &env).await;
    assert!(ok && out.contains("stopped and removed"), "{out}");
    assert!(!units.join("tern-ternsvc0.service").exists());
    let (ok, out) = tern(&refs, &env).await;
    assert!(
        !ok && out.contains("no tern service is installed for ternsvc0"),
        "{out}"
    );
    srv.stop().await;
    db.cleanup().await;
}

/// `--version` on every binary a user runs (a refused `tern-server --version` was the first
/// thing an admin checking an install met).
#[test]
fn every_binary_answers_version() {
    for name in [
        "tern",
        "tern-server",
        "tern-management",
        "tern-relay",
        "tern-signal",
    ] {
        let out = std::process::Command::new(tern_tests::mesh::bin(name))
            .arg("--version")
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
            "{name}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
