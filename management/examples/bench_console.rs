//! Console polling benchmark (prints figures; not a test). The console's live pages poll
//! `/api/peers` (and the overview `/api/status`) every 3 s per open tab; this measures what one
//! poll costs on a real server (SQLite, HTTP over loopback, a signed-in admin) as the network
//! grows, next to the floor of the same server: `/healthz` (one tiny query) in the same run.
//! "unchanged" is the usual poll: the browser revalidates with the list's ETag and gets a 304.
//! Every online peer reports 20 connections, as agents in a busy mesh do.
//!
//!     cargo run --release -p tern-management --example bench_console [-- PEERS...]

use std::time::{Duration, Instant};
use tern_management::model::PeerConnection;
use tern_management::server::{self, ServerConfig};
use tern_management::store::PeerMeta;

const ROUNDS: usize = 30;

async fn timed(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    if_none_match: Option<&str>,
    gzip: bool,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut times = vec![];
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut req = http.get(url).bearer_auth(token);
        if let Some(e) = if_none_match {
            req = req.header("if-none-match", e);
        }
        if gzip {
            // Bytes on the wire as a browser receives them (not decoded here).
            req = req.header("accept-encoding", "gzip");
        }
        let body = req.send().await?.error_for_status()?.bytes().await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times, bytes))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000, 3000]
    } else {
        sizes
    };
    println!(
        "{:>6}  {:<12} {:>9} {:>9} {:>10}  {:>14}",
        "peers", "endpoint", "p50 ms", "p90 ms", "bytes", "CPU-ms/min/tab"
    );
    for n in sizes {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let running = server::start(ServerConfig::new("127.0.0.1:0".parse()?, url)).await?;
        let store = &running.state.store;
        let first = tern_management::bootstrap::first_start(store, "admin", Some("bench-password"))
            .await?
            .ok_or_else(|| anyhow::anyhow!("database not fresh"))?;
        let mut ids = vec![];
        for i in 0..n {
            let k = tern_proto::SecretKey::generate().public_key().to_base64();
            let meta = PeerMeta {
                hostname: format!("host-{i}"),
                os: "linux".into(),
                agent_version: "bench".into(),
            };
            let out = store.login_peer(&k, Some(&first.setup_key), &meta).await?;
            store.set_peer_connected(&out.peer.id, true).await?;
            ids.push(out.peer.id);
        }
        for (i, id) in ids.iter().enumerate() {
            let conns = (1..=20)
                .map(|d| PeerConnection {
                    peer_id: ids[(i + d) % ids.len()].clone(),
                    kind: if d % 3 == 0 { "turn_relay" } else { "direct" }.into(),
                    rtt_ms: Some(12),
                    reason: None,
                    loss_pct: None,
                    peer_name: None,
                })
                .collect();
            running.state.set_connections(id, conns);
        }
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let login: serde_json::Value = http
            .post(format!("{base}/api/auth/login"))
            .json(&serde_json::json!({"username": "admin", "password": "bench-password"}))
            .send()
            .await?
            .json()
            .await?;
        let token = login["token"].as_str().unwrap_or_default().to_string();
        for (name, path, conditional, gzip) in [
            ("/healthz", "/healthz", false, false),
            ("/api/peers", "/api/peers", false, false),
            ("  gzip", "/api/peers", false, true),
            ("  unchanged", "/api/peers", true, true),
            ("/api/status", "/api/status", false, false),
        ] {
            // The validator the console's browser sends back on its next poll.
            let etag = if conditional {
                http.get(format!("{base}/api/peers"))
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            } else {
                None
            };
            let cond = etag.as_deref();
            let (t, bytes) = timed(&http, &format!("{base}{path}"), &token, cond, gzip).await?;
            let p50 = t[t.len() / 2];
            let p90 = t[t.len() * 9 / 10];
            // One poll every 3 s = 20 per minute per open tab (wall time, an upper bound on CPU).
            println!(
                "{n:>6}  {name:<12} {p50:>9.2} {p90:>9.2} {bytes:>10}  {:>14.0}",
                p50 * 20.0
            );
        }
        running.stop(Duration::from_secs(1)).await;
    }
    Ok(())
}
