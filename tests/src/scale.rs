//! The scale harness (issue 16): a real `tern-server` process and N simulated agents, each with
//! its own key doing the real sealed login, holding a real Sync stream (applying full maps and
//! deltas as the agent does) and a signal stream over real gRPC, many agents per HTTP/2
//! connection. It measures the registration rate, the time until every agent has its first map,
//! and for a few changes how long they take to reach the streams they concern (p50/p99), how many
//! bytes they cost, and the server's memory and CPU.
//!
//! The network looks like a company: G teams of N/G agents whose policy connects each team
//! within itself, and one monitoring host every agent may reach (a policy from All to it), so an
//! edit of that policy concerns every agent.

use crate::{admin_login, bearer_value, TestAgent};
use anyhow::{anyhow, bail, Context};
use prost::Message;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_proto::management as pb;
use tonic::transport::Channel;

/// Agents per HTTP/2 connection (each holds two streams).
const PER_CONNECTION: usize = 50;
const PASSWORD: &str = "scale-admin-password";

/// One change and how it spread.
#[derive(Debug, Clone)]
pub struct Change {
    pub what: &'static str,
    /// Streams that received a message for it.
    pub reached: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Bytes of those messages, in all.
    pub bytes: usize,
    /// Server CPU seconds from the change until the last stream had it.
    pub cpu_secs: f64,
}

#[derive(Debug, Clone)]
pub struct Figures {
    pub agents: usize,
    pub registrations_per_sec: f64,
    pub all_first_maps_secs: f64,
    pub changes: Vec<Change>,
    pub server_rss_mb: f64,
    pub server_cpu_secs: f64,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} agents: {:.0} registrations/s; every agent had its first map {:.1} s after the streams opened; server RSS {:.0} MB, {:.1} CPU-s in all",
            self.agents,
            self.registrations_per_sec,
            self.all_first_maps_secs,
            self.server_rss_mb,
            self.server_cpu_secs
        )?;
        for c in &self.changes {
            writeln!(
                f,
                "  {}: reached {} streams, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, {:.1} kB sent, {:.2} server CPU-s",
                c.what,
                c.reached,
                c.p50_ms,
                c.p99_ms,
                c.max_ms,
                c.bytes as f64 / 1e3,
                c.cpu_secs
            )?;
        }
        Ok(())
    }
}

/// The server process, killed on drop.
struct Server {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn proc_figures(&self) -> (f64, f64) {
        let pid = self.child.id();
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1024.0;
        let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command name (which may hold spaces): utime is the 14th.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
            })
            .unwrap_or(0.0)
            / 100.0;
        (rss, cpu)
    }
}

async fn start_server() -> anyhow::Result<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let child = std::process::Command::new(crate::mesh::bin("tern-server"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &dir.path().display().to_string(),
            "--no-relay",
            "--public-ports",
            "off",
            "--log",
            "warn",
        ])
        .env("TERN_ADMIN_PASSWORD", PASSWORD)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting tern-server")?;
    let s = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let http = reqwest::Client::new();
    let t = Instant::now();
    while http
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("tern-server did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(s)
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }
}

/// What each agent received: (when, bytes, map serial after it).
type Log = Arc<Vec<Mutex<Vec<(Instant, usize, u64)>>>>;

struct Agent {
    agent: TestAgent,
    token: String,
    /// Kept open while the agent is "online".
    signal: Option<tokio::sync::mpsc::Sender<tern_proto::signal::Outbound>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

async fn open_streams(a: &mut Agent, i: usize, log: &Log) -> anyhow::Result<()> {
    let mut stream = a.agent.sync_with(&a.token, true).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", bearer_value(&a.token));
    let _inbound = a.agent.signal().open(req).await?.into_inner();
    a.signal = Some(tx);
    let log = log.clone();
    a.reader = Some(tokio::spawn(async move {
        let _inbound = _inbound;
        let mut map: Option<pb::NetworkMap> = None;
        while let Ok(Some(m)) = stream.message().await {
            let bytes = m.encoded_len();
            let next = if let Some(full) = m.network_map {
                Some(full)
            } else if let (Some(d), Some(cur)) = (m.delta, map.as_ref()) {
                tern_proto::mapdelta::apply(cur, &d).ok()
            } else {
                None
            };
            let Some(next) = next else {
                return; // a gap: an agent would reopen; the harness counts it as lost
            };
            let serial = next.serial;
            map = Some(next);
            if let Some(l) = log.get(i) {
                l.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), bytes, serial));
            }
        }
    }));
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs the harness with `n` agents in `teams` teams; every wait is bounded by `limit`.
pub async fn run(n: usize, teams: usize, limit: Duration) -> anyhow::Result<Figures> {
    let server = start_server().await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    // The first start creates the admin account just after the server starts answering.
    let t = Instant::now();
    let token = loop {
        match admin_login(&http, &server.base, "admin", PASSWORD).await {
            Ok(t) => break t,
            Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let api = Api {
        http,
        base: server.base.clone(),
        token,
    };
    // Teams, their keys and policies; the monitor; no everyone-to-everyone policy.
    for p in api
        .call(reqwest::Method::GET, "/api/policies", None)
        .await?
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let id = p["id"].as_str().unwrap_or_default();
        api.call(
            reqwest::Method::DELETE,
            &format!("/api/policies/{id}"),
            None,
        )
        .await?;
    }
    let monitor_group = api
        .call(
            reqwest::Method::POST,
            "/api/groups",
            Some(json!({"name": "monitoring"})),
        )
        .await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut keys = vec![];
    let mut team_policies = vec![];
    for t in 0..teams {
        let g = api
            .call(
                reqwest::Method::POST,
                "/api/groups",
                Some(json!({"name": format!("team-{t}")})),
            )
            .await?["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let pol = api.call(reqwest::Method::POST, "/api/policies", Some(json!({"name": format!("team-{t}"), "protocol": "any", "sources": [g], "destinations": [g]}))).await?;
        team_policies.push((
            pol["id"].as_str().unwrap_or_default().to_string(),
            g.clone(),
        ));
        let k = api
            .call(
                reqwest::Method::POST,
                "/api/setup-keys",
                Some(json!({"name": format!("team-{t}"), "reusable": true, "auto_groups": [g]})),
            )
            .await?["key"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        keys.push(k);
    }
    let mon_key = api
        .call(
            reqwest::Method::POST,
            "/api/setup-keys",
            Some(json!({"name": "monitoring", "reusable": true, "auto_groups": [monitor_group]})),
        )
        .await?["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mon_policy = api
        .call(reqwest::Method::POST, "/api/policies", Some(json!({"name": "monitoring", "protocol": "tcp", "ports": ["9100"], "bidirectional": false, "sources": ["all"], "destinations": [monitor_group]})))
        .await?;
    let mon_policy_id = mon_policy["id"].as_str().unwrap_or_default().to_string();

    // Connections, then registrations (64 at a time).
    let conns = n.div_ceil(PER_CONNECTION) + 1;
    let mut channels: Vec<Channel> = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(Channel::from_shared(server.base.clone())?.connect().await?);
    }
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = vec![];
    for i in 0..=n {
        let ch = channels[i / PER_CONNECTION].clone();
        let key = if i == n {
            mon_key.clone()
        } else {
            keys[i % teams].clone()
        };
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            let agent = TestAgent::with_channel(ch, &format!("agent-{i}"));
            let l = agent.login(Some(&key)).await?;
            Ok::<_, tonic::Status>(Agent {
                agent,
                token: l.peer_token,
                signal: None,
                reader: None,
            })
        }));
    }
    let mut agents = vec![];
    for t in tasks {
        agents.push(t.await?.map_err(|e| anyhow!("registration: {e}"))?);
    }
    let registrations_per_sec = (n + 1) as f64 / t.elapsed().as_secs_f64();

    // Streams; wait until every agent holds its first map.
    let log: Log = Arc::new((0..=n).map(|_| Mutex::new(vec![])).collect());
    let t = Instant::now();
    // Agents connect concurrently, as a fleet coming back after a server restart does.
    let mut opened = vec![];
    for (i, mut a) in agents.into_iter().enumerate() {
        let (log, sem) = (log.clone(), sem.clone());
        opened.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            open_streams(&mut a, i, &log).await.map(|()| a)
        }));
    }
    let mut agents = vec![];
    for o in opened {
        agents.push(o.await??);
    }
    let have_first = |log: &Log| {
        log.iter()
            .filter(|l| !l.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
            .count()
    };
    while have_first(&log) < n + 1 {
        if t.elapsed() > limit {
            bail!(
                "only {} of {} agents had a map after {limit:?}",
                have_first(&log),
                n + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_first_maps_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut changes = vec![];
    for what in [
        "a policy edit (every agent)",
        "a team's policy edit (one team)",
        "a new peer (one team)",
        "a peer going offline (one team)",
    ] {
        // Quiet first: no stream receives anything for a second (the previous change and the
        // connection storm have settled), so what follows belongs to this change.
        let total = |log: &Log| -> usize {
            log.iter()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).len())
                .sum()
        };
        let settle = Instant::now();
        let (mut seen, mut since) = (total(&log), Instant::now());
        while since.elapsed() < Duration::from_secs(1) && settle.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = total(&log);
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
        }
        for l in log.iter() {
            l.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        let serial_now = || async {
            api.call(reqwest::Method::GET, "/api/settings", None)
                .await
                .map(|v| v["network_serial"].as_u64().unwrap_or(0))
        };
        let s0 = serial_now().await?;
        let (_, cpu0) = server.proc_figures();
        let t0 = Instant::now();
        let want_all = what.starts_with("a policy");
        match what {
            "a policy edit (every agent)" => {
                api.call(reqwest::Method::PUT, &format!("/api/policies/{mon_policy_id}"), Some(json!({"name": "monitoring", "protocol": "tcp", "ports": ["9100", "9256"], "bidirectional": false, "sources": ["all"], "destinations": [monitor_group]}))).await?;
            }
            "a team's policy edit (one team)" => {
                let (id, g) = &team_policies[0];
                api.call(reqwest::Method::PUT, &format!("/api/policies/{id}"), Some(json!({"name": "team-0", "protocol": "tcp", "ports": ["22", "443"], "sources": [g], "destinations": [g]}))).await?;
            }
            "a new peer (one team)" => {
                let agent = TestAgent::with_channel(channels[conns - 1].clone(), "newcomer");
                agent
                    .login(Some(&keys[0]))
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            }
            _ => {
                let a = &mut agents[1];
                a.signal = None;
                if let Some(r) = a.reader.take() {
                    r.abort();
                }
            }
        }
        // The serial that carries the change: the server's right after it (the disconnect is
        // recorded a moment later: any newer serial).
        let target = if what.starts_with("a peer going") {
            s0 + 1
        } else {
            serial_now().await?
        };
        // Per stream: the first message at or past the target, and the bytes up to it.
        let arrivals = |log: &Log| -> Vec<(Instant, usize)> {
            log.iter()
                .filter_map(|l| {
                    let l = l.lock().unwrap_or_else(|e| e.into_inner());
                    let i = l.iter().position(|(_, _, serial)| *serial >= target)?;
                    Some((l[i].0, l[..=i].iter().map(|x| x.1).sum()))
                })
                .collect()
        };
        // Until every stream has it (the policy edit), or 2 s without another arrival.
        let mut last_count = 0;
        let mut quiet_since = Instant::now();
        loop {
            let count = arrivals(&log).len();
            if want_all && count > n {
                break;
            }
            if count != last_count {
                last_count = count;
                quiet_since = Instant::now();
            }
            if !want_all && count > 0 && quiet_since.elapsed() > Duration::from_secs(2) {
                break;
            }
            if t0.elapsed() > limit {
                if want_all {
                    bail!("{what}: reached {count} of {} streams in {limit:?}", n + 1);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, cpu1) = server.proc_figures();
        let got = arrivals(&log);
        let bytes = got.iter().map(|x| x.1).sum();
        let mut lat: Vec<f64> = got
            .iter()
            .map(|(at, _)| at.duration_since(t0).as_secs_f64() * 1e3)
            .collect();
        changes.push(Change {
            what,
            reached: lat.len(),
            p50_ms: percentile(&mut lat, 0.5),
            p99_ms: percentile(&mut lat, 0.99),
            max_ms: percentile(&mut lat, 1.0),
            bytes,
            cpu_secs: cpu1 - cpu0,
        });
    }
    let (rss, cpu) = server.proc_figures();
    drop(agents);
    Ok(Figures {
        agents: n,
        registrations_per_sec,
        all_first_maps_secs,
        changes,
        server_rss_mb: rss,
        server_cpu_secs: cpu,
    })
}
