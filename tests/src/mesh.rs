//! A mesh in network namespaces for end-to-end suites: `tern-server` on the lab's "public"
//! address and `tern` agents in homes behind NAT routers, driven through their CLIs and the
//! admin API (curl from the server's namespace).

use crate::netns::{workspace_bin, Lab, Nat, SERVER_IP};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

pub const MB20: &str = "20000000";
pub const ADMIN_PASSWORD: &str = "e2e-admin-password";

pub struct Mesh {
    pub lab: Lab,
    pub key: String,
    pub homes: Vec<String>,
    /// Extra `tern-server` flags (kept across restarts).
    pub server_args: Vec<String>,
    /// The port `api` and `api_text` call on the server's address (443; a replica's port).
    pub api_port: u16,
}

pub fn bin(name: &str) -> PathBuf {
    let p = workspace_bin(name);
    assert!(
        p.exists(),
        "{} not built (cargo build --workspace)",
        p.display()
    );
    p
}

/// Runs `tern up` (with `args` and only the CA variables in `envs`, on interface `iface`) that
/// is expected to give up on its own: waits up to `limit`; past that, kills it, removes the
/// interface it may have made and panics.
pub async fn tern_up_bounded(
    args: &[&std::ffi::OsStr],
    envs: &[(&str, &str)],
    iface: &str,
    limit: Duration,
) -> std::process::Output {
    let mut child = std::process::Command::new(bin("tern"))
        .args(["--interface", iface, "up"])
        .args(args)
        .env_remove("TERN_CA_FILE")
        .env_remove("TERN_RELAY_CA")
        // On the host itself: never touch its resolver.
        .env("TERN_NO_DNS", "true")
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tern");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::process::Command::new("ip")
                .args(["link", "del", iface])
                .status();
            panic!("tern up {args:?} still running after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.wait_with_output().expect("output")
}

pub fn skip() -> bool {
    if !crate::netns::available() {
        eprintln!("skipped: network-namespace tests need root and iproute2");
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI must run the namespace suite"
        );
        return true;
    }
    false
}

/// True (skip the suite) if a program it drives is missing; under CI that fails instead.
pub fn missing(programs: &[&str], packages: &str) -> bool {
    if programs.iter().all(|p| std::path::Path::new(p).exists()) {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this suite needs {packages} (Debian packages)"
    );
    eprintln!("SKIPPED: no {packages}");
    true
}

impl Mesh {
    /// Routes the lab's factory LAN (192.168.50.0/24) through `peer_id` for everyone (masquerade).
    pub fn route_lan_through(&self, peer_id: &str) {
        let r = self.api(
            "POST",
            "/api/routes",
            Some(&format!(
                r#"{{"network":"192.168.50.0/24","routing_peer":"{peer_id}","groups":["all"],"masquerade":true}}"#
            )),
        );
        assert_eq!(r["network"], "192.168.50.0/24", "{r}");
    }

    /// Deletes the policy called `name` (e.g. "default", the one that lets everyone reach
    /// everyone).
    pub fn delete_policy_named(&self, name: &str) {
        for pol in self
            .api("GET", "/api/policies", None)
            .as_array()
            .expect("policies")
        {
            if pol["name"] == name {
                self.api(
                    "DELETE",
                    &format!("/api/policies/{}", pol["id"].as_str().expect("id")),
                    None,
                );
            }
        }
    }

    pub fn new(nat_a: Nat, nat_b: Nat) -> Mesh {
        Mesh::with_server_args(nat_a, nat_b, &[])
    }

    /// Homes a and b behind the given NATs and a server started with `extra` flags.
    pub fn with_server_args(nat_a: Nat, nat_b: Nat, extra: &[&str]) -> Mesh {
        let mut m = Mesh::without_server(nat_a, nat_b, extra);
        m.start_server();
        m
    }

    /// The lab of [`Mesh::with_server_args`] with the server not started yet
    /// ([`Mesh::start_server`] starts it).
    pub fn without_server(nat_a: Nat, nat_b: Nat, extra: &[&str]) -> Mesh {
        let mut lab = Lab::new().expect("lab");
        let ha = lab.add_home("a", nat_a).expect("home a");
        let hb = lab.add_home("b", nat_b).expect("home b");
        Mesh {
            lab,
            key: String::new(),
            homes: vec![ha, hb],
            server_args: extra.iter().map(|s| s.to_string()).collect(),
            api_port: 443,
        }
    }

    pub fn start_server(&mut self) {
        let lab = &mut self.lab;
        let data = lab.dir.path().join("server");
        let srv = lab.ns("srv");
        let listen = format!("{SERVER_IP}:443");
        let relay = format!("{SERVER_IP}:3478");
        // TERN_TEST_SERVER_LOG: another log filter for the lab's server (debugging a suite).
        let log = std::env::var("TERN_TEST_SERVER_LOG")
            .unwrap_or_else(|_| "info,turn::server=off".to_string());
        let mut args = vec![
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().expect("utf8"),
            "--relay-udp-listen",
            &relay,
            "--relay-public-ip",
            SERVER_IP,
            "--relay-ports",
            "50000-50999",
            "--log",
            &log,
        ];
        args.extend(self.server_args.iter().map(String::as_str));
        lab.spawn(
            "server",
            &srv,
            &bin("tern-server"),
            &args,
            &[("TERN_ADMIN_PASSWORD", ADMIN_PASSWORD)],
        )
        .expect("server");
        let mut key = String::new();
        let restart = !self.key.is_empty();
        if restart {
            lab.wait_for("server restarted", Duration::from_secs(30), || {
                lab.log("server").contains("Agents join with")
            })
            .expect("server restart");
            return;
        }
        lab.wait_for("server setup key", Duration::from_secs(30), || {
            let log = lab.log("server");
            if log.contains("error:") {
                panic!("tern-server did not start:\n{log}");
            }
            key = lab
                .log("server")
                .lines()
                .find_map(|l| {
                    l.split_once("Setup key:")
                        .map(|(_, v)| v.split_whitespace().next().unwrap_or("").to_string())
                })
                .unwrap_or_default();
            !key.is_empty()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log("server")));
        self.key = key;
    }

    pub fn agent_args(&self, who: &str) -> Vec<String> {
        let st = self.lab.dir.path().join(who);
        vec![
            "--state-dir".into(),
            st.join("state").display().to_string(),
            "--run-dir".into(),
            st.join("run").display().to_string(),
            "--interface".into(),
            "tern0".into(),
        ]
    }

    /// Starts agents (with the setup key) and waits until each answers `tern status`.
    pub fn start(&mut self, agents: &[(&str, &String)]) {
        for (who, ns) in agents {
            self.up(who, ns, true);
        }
        self.lab
            .wait_for("agents up", Duration::from_secs(30), || {
                agents
                    .iter()
                    .all(|(who, ns)| self.status(who, ns).is_some())
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\n{}",
                    agents
                        .iter()
                        .map(|(w, _)| self.lab.log(w))
                        .collect::<Vec<_>>()
                        .join("\n---\n")
                )
            });
    }

    pub fn peer_id(&self, who: &str, ns: &str) -> String {
        self.status(who, ns).expect("status")["peer_id"]
            .as_str()
            .expect("peer id")
            .to_string()
    }

    pub fn up(&mut self, who: &str, ns: &str, with_key: bool) {
        self.up_with(who, ns, with_key, &format!("http://{SERVER_IP}:443"), &[]);
    }

    pub fn up_with(&mut self, who: &str, ns: &str, with_key: bool, url: &str, extra: &[&str]) {
        let mut args = self.agent_args(who);
        args.extend([
            "up".into(),
            "--management-url".into(),
            url.to_string(),
            "--hostname".into(),
            who.into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        if with_key {
            args.extend(["--setup-key".into(), self.key.clone()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let ns = ns.to_string();
        self.lab
            .spawn(
                who,
                &ns,
                &bin("tern"),
                &refs,
                &[("TERN_LOG", "info,webrtc_ice=warn,turn=warn")],
            )
            .expect("agent");
    }

    /// Runs `tern <args>` as agent `who` (its state and run directories) in `ns`.
    pub fn tern(&self, who: &str, ns: &str, args: &[&str]) -> std::process::Output {
        let mut full = vec![bin("tern").display().to_string()];
        full.extend(self.agent_args(who));
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.lab.exec(ns, &refs)
    }

    /// `tern diagnose --json [extra]` by `who`: (report, exit success).
    pub fn diagnose(&self, who: &str, ns: &str, extra: &[&str]) -> (Value, bool) {
        let mut args = vec!["diagnose", "--json"];
        args.extend(extra);
        let out = self.tern(who, ns, &args);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "diagnose output is not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (v, out.status.success())
    }

    pub fn status(&self, who: &str, ns: &str) -> Option<Value> {
        let mut args = self.agent_args(who);
        args.extend(["status".into(), "--json".into()]);
        let mut full = vec![bin("tern").display().to_string()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = self.lab.exec(ns, &refs);
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn overlay_ip(&self, who: &str, ns: &str) -> String {
        let s = self
            .status(who, ns)
            .unwrap_or_else(|| panic!("no status from {who}:\n{}", self.lab.log(who)));
        s["overlay_address"]
            .as_str()
            .expect("address")
            .split('/')
            .next()
            .expect("ip")
            .to_string()
    }

    /// Waits until `who` reports a connected peer over `kind`; returns the peer's status.
    pub fn wait_connection(&self, who: &str, ns: &str, kind: &str, limit: Duration) -> Value {
        let mut last = Value::Null;
        let r = self
            .lab
            .wait_for(&format!("{who} connected via {kind}"), limit, || {
                if let Some(s) = self.status(who, ns) {
                    last = s.clone();
                    if let Some(p) = s["peers"].as_array().and_then(|a| a.first()) {
                        return p["state"] == "connected" && p["connection"] == kind;
                    }
                }
                false
            });
        if let Err(e) = r {
            panic!(
                "{e}\nlast status: {last:#}\n--- {who} log:\n{}\n--- server log:\n{}",
                self.lab.log(who),
                self.lab.log("server")
            );
        }
        last["peers"][0].clone()
    }

    pub fn ping(&self, ns: &str, ip: &str) -> bool {
        self.lab
            .exec(ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", ip])
            .status
            .success()
    }

    /// Sends 20 MB from `from_ns` to `ip` (in `to_ns`) over TCP; checks the checksum matches.
    /// Returns the source address the receiver saw.
    pub fn transfer(&mut self, from_ns: &str, to_ns: &str, ip: &str, label: &str) -> String {
        let tool = bin("tern-nettool");
        let to_ns = to_ns.to_string();
        self.lab
            .spawn(label, &to_ns, &tool, &["serve", "5001"], &[])
            .expect("sink");
        self.lab
            .wait_for("sink listening", Duration::from_secs(10), || {
                self.lab.log(label).contains("listening")
            })
            .expect("sink");
        let out = self.lab.exec(
            from_ns,
            &[
                tool.to_str().expect("utf8"),
                "send",
                &format!("{ip}:5001"),
                MB20,
            ],
        );
        let sent = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "send failed: {sent}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got = String::new();
        self.lab
            .wait_for("sink result", Duration::from_secs(30), || {
                got = self.lab.log(label).lines().nth(1).unwrap_or("").to_string();
                !got.is_empty()
            })
            .expect("sink finished");
        let (sent_hash, got_hash) = (
            sent.split_whitespace().next(),
            got.split_whitespace().next(),
        );
        assert_eq!(
            sent_hash, got_hash,
            "20 MB arrived intact (sent {sent}, got {got})"
        );
        assert_eq!(got.split_whitespace().nth(1), Some(MB20));
        eprintln!(
            "{label}: 20 MB in {}",
            sent.split_whitespace().nth(2).unwrap_or("?")
        );
        got.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    }

    /// A GET as an admin from inside the server namespace (curl); returns the body as text.
    pub fn api_text(&self, path: &str) -> String {
        let auth = self.admin_auth();
        let url = format!("http://{SERVER_IP}:{}{path}", self.api_port);
        let out = self
            .lab
            .exec(&self.lab.ns("srv"), &["curl", "-sS", "-H", &auth, &url]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An admin API call made from inside the server namespace (curl); returns the JSON reply.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let srv = self.lab.ns("srv");
        let auth = self.admin_auth();
        let url = format!("http://{SERVER_IP}:{}{path}", self.api_port);
        let mut args = vec![
            "curl",
            "-sS",
            "-X",
            method,
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
        ];
        if let Some(b) = body {
            args.extend(["-d", b]);
        }
        args.push(&url);
        let out = self.lab.exec(&srv, &args);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `authorization: Bearer ...` for the admin (signed in through the API).
    fn admin_auth(&self) -> String {
        let srv = self.lab.ns("srv");
        let login_url = format!("http://{SERVER_IP}:{}/api/auth/login", self.api_port);
        let login = self.lab.exec(
            &srv,
            &[
                "curl",
                "-sS",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                &format!(r#"{{"username":"admin","password":"{ADMIN_PASSWORD}"}}"#),
                &login_url,
            ],
        );
        let token: Value = serde_json::from_slice(&login.stdout).expect("login reply");
        format!(
            "authorization: Bearer {}",
            token["token"].as_str().expect("token")
        )
    }
}
