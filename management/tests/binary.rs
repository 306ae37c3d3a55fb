//! Starts the real `tern-server` binary with its embedded defaults (SQLite in a data dir), signs in
//! with the credentials it prints once, stops it with SIGTERM, and restarts it on the same data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--relay-udp-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .env_remove("TERN_ADMIN_PASSWORD")
            .env_remove("TERN_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tern-server");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Server { child, lines }
    }

    /// Stdout lines until one contains `until` (or 30 s pass).
    fn read_until(&self, until: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = vec![];
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let done = l.contains(until);
            got.push(l);
            if done {
                return got;
            }
        }
        panic!("tern-server did not print {until:?}; printed: {got:#?}");
    }

    /// SIGTERM; returns the exit status and what was printed after the last read.
    fn terminate(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                let rest =
                    std::iter::from_fn(|| self.lines.recv_timeout(Duration::from_secs(2)).ok())
                        .collect();
                return (s, rest);
            }
            assert!(
                Instant::now() < deadline,
                "tern-server did not exit within 15 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value_after(lines: &[String], label: &str) -> String {
    lines
        .iter()
        .find_map(|l| {
            l.split_once(label)
                .map(|(_, v)| v.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("no {label:?} in {lines:#?}"))
}

async fn login(http: &reqwest::Client, base: &str, password: &str) -> reqwest::Response {
    http.post(format!("{base}/api/auth/login"))
        .json(&serde_json::json!({ "username": "admin", "password": password }))
        .send()
        .await
        .expect("login request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_server_starts_with_defaults_and_answers_with_printed_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = Server::start(dir.path());
    let lines = srv.read_until("Setup key:");
    let base = value_after(&lines, "Console and API:")
        .trim_end_matches('/')
        .to_string();
    let password = value_after(&lines, "Admin password:");
    let setup_key = value_after(&lines, "Setup key:");
    assert!(setup_key.starts_with("tern_sk_"), "{setup_key}");
    assert!(
        dir.path().join("tern.db").exists(),
        "SQLite database in the data dir"
    );

    let http = reqwest::Client::new();
    let r = login(&http, &base, &password).await;
    assert_eq!(r.status(), 200);
    let token = r.json::<serde_json::Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let keys: serde_json::Value = http
        .get(format!("{base}/api/setup-keys"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(keys[0]["name"], "default");
    assert_eq!(
        keys[0]["key_prefix"].as_str().expect("prefix"),
        &setup_key[..12]
    );
    assert_eq!(login(&http, &base, "not-the-password").await.status(), 401);

    let (status, _) = srv.terminate();
    assert!(status.success(), "graceful exit on SIGTERM, got {status}");

    // Restart on the same data: no new credentials, the old password still works.
    let mut srv = Server::start(dir.path());
    let lines = srv.read_until("Agents join with:");
    let base = value_after(&lines, "Console and API:")
        .trim_end_matches('/')
        .to_string();
    assert_eq!(
        login(&http, &base, &password).await.status(),
        200,
        "data survived the restart"
    );
    let (status, rest) = srv.terminate();
    assert!(status.success());
    assert!(
        !rest
            .iter()
            .any(|l| l.contains("First start") || l.contains("Admin password")),
        "credentials printed again: {rest:?}"
    );
}
