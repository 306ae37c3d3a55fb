//! What one change costs the server per sync stream (prints figures; not a test), on the scale
//! harness's network (`tests/src/scale.rs`): teams of 100 peers whose policy connects each team
//! within itself, and one monitoring host every peer may reach. Every peer's stream has sent its
//! first map; then the monitoring policy is edited (every map changes by one rule) and each stream
//! does what `run_sync` does: write its map as bytes, compare them with the last ones sent, make
//! the delta.
//! Single-threaded, so the figures are CPU time per stream.
//!
//!     cargo run --release -p tern-management --example bench_push [-- PEERS [DB_FILE]]
//!
//! With DB_FILE, the network is registered there once and reused by later runs (registering
//! 10,000 peers takes minutes).

use std::sync::Arc;
use std::time::Instant;
use tern_management::grpc::LastSent;
use tern_management::model::Protocol;
use tern_management::netmap::{NetIndex, RelaySettings};
use tern_management::store::{NewSetupKey, PeerMeta, PolicyInput, Store};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let db = std::env::args()
        .nth(2)
        .map_or_else(|| dir.path().join("bench.db"), std::path::PathBuf::from);
    let reuse = db.exists();
    let store = Store::connect(&format!("sqlite://{}", db.display())).await?;
    // (peer ids, the monitoring policy's id, the monitoring group, its ports now)
    let (ids, mon_policy, mon, ports) = if reuse {
        let ids: Vec<String> = store.peers().await?.into_iter().map(|p| p.id).collect();
        let pol = store
            .policies()
            .await?
            .into_iter()
            .find(|p| p.name == "monitoring")
            .ok_or_else(|| anyhow::anyhow!("{}: no monitoring policy", db.display()))?;
        println!("reusing {} ({} peers)", db.display(), ids.len());
        let group = pol.destinations.first().cloned().unwrap_or_default();
        (ids, pol.id, group, pol.ports)
    } else {
        let (ids, pol, group) = setup(&store, n).await?;
        (ids, pol, group, vec!["9100".to_string()])
    };
    let mon_ports = |ports: &[&str]| policy("monitoring", Protocol::Tcp, ports, false, "all", &mon);
    let relay = RelaySettings {
        stun_urls: vec!["stun:relay.example:3478".into()],
        turn_urls: vec!["turn:relay.example:3478".into()],
        tcp_relay_urls: vec!["wss://relay.example/relay".into()],
        secret: b"bench".to_vec(),
        stun_probe_urls: vec![],
    };
    let expiry = 2_000_000_000;
    let before = NetIndex::new(Arc::new(store.snapshot().await?));
    let mut streams: Vec<LastSent> = ids.iter().map(|_| LastSent::default()).collect();
    let t = Instant::now();
    let mut first_bytes = 0;
    for (id, last) in ids.iter().zip(&mut streams) {
        let map = before.map_for(id, &relay, expiry);
        let msg = map.and_then(|m| last.push(m, true));
        first_bytes += msg.map_or(0, |m| prost::Message::encoded_len(&m));
    }
    let first = t.elapsed().as_secs_f64();
    println!(
        "first maps: {:.1} us per stream, {:.1} kB per map",
        first * 1e6 / ids.len() as f64,
        first_bytes as f64 / 1e3 / ids.len() as f64
    );

    store
        .put_policy(
            "bench",
            Some(&mon_policy),
            &mon_ports(if ports.len() == 1 {
                &["9100", "9256"]
            } else {
                &["9100"]
            })?,
        )
        .await?;
    let t = Instant::now();
    let snap = Arc::new(store.snapshot().await?);
    let load = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let after = NetIndex::new(snap).with_changes_since(&before);
    let build = t.elapsed().as_secs_f64();
    let affected = after.since().map_or(ids.len(), |s| s.affected.len());
    let (mut map_secs, mut push_secs, mut sent_bytes, mut sent) = (0.0, 0.0, 0, 0);
    for (id, last) in ids.iter().zip(&mut streams) {
        let t = Instant::now();
        let mut bytes = Vec::with_capacity(last.encoded_len());
        let serial = after.map_bytes_for(id, &relay, expiry, &mut bytes);
        map_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let msg = serial.and_then(|s| {
            last.push_encoded(bytes, s, true, || {
                after.map_for(id, &relay, expiry).unwrap_or_default()
            })
        });
        push_secs += t.elapsed().as_secs_f64();
        if let Some(m) = msg {
            sent += 1;
            sent_bytes += prost::Message::encoded_len(&m);
        }
    }
    let per = |s: f64| s * 1e6 / ids.len() as f64;
    println!(
        "a policy edit every peer sees: snapshot {:.0} ms, index {:.0} ms ({affected} streams affected); per stream: map {:.1} us + compare and delta {:.1} us = {:.1} us; {sent} messages, {:.0} B each; all streams {:.2} CPU-s",
        load * 1e3,
        build * 1e3,
        per(map_secs),
        per(push_secs),
        per(map_secs + push_secs),
        sent_bytes as f64 / sent.max(1) as f64,
        load + build + map_secs + push_secs
    );
    store.close().await;
    Ok(())
}

fn policy(
    name: &str,
    protocol: Protocol,
    ports: &[&str],
    bidirectional: bool,
    src: &str,
    dst: &str,
) -> anyhow::Result<PolicyInput> {
    Ok(PolicyInput {
        name: name.into(),
        description: String::new(),
        enabled: true,
        protocol,
        ports: ports
            .iter()
            .map(|p| p.parse().map_err(anyhow::Error::msg))
            .collect::<Result<_, _>>()?,
        bidirectional,
        sources: vec![src.into()],
        destinations: vec![dst.into()],
    })
}

/// Registers the scale harness's network: returns the peers' ids, the monitoring policy's id and
/// the monitoring group's id.
async fn setup(store: &Store, n: usize) -> anyhow::Result<(Vec<String>, String, String)> {
    let t = Instant::now();
    for p in store.policies().await? {
        store.delete_policy("bench", &p.id).await?;
    }
    let setup_key = |g: &str| NewSetupKey::reusable(g, vec![g.to_string()]);
    let monitor = store.create_group("bench", "monitoring").await?.id;
    let mut keys = vec![];
    for t in 0..n.div_ceil(100) {
        let g = store.create_group("bench", &format!("team-{t}")).await?.id;
        let p = policy(&format!("team-{t}"), Protocol::Any, &[], true, &g, &g)?;
        store.put_policy("bench", None, &p).await?;
        let secret = format!("tern_sk_team{t:04}benchbenchbenchbenchbench");
        let hash = tern_management::store::hash_secret(&secret);
        store
            .create_setup_key("bench", &setup_key(&g), &hash, &secret[..12])
            .await?;
        keys.push(secret);
    }
    let mon_policy = store
        .put_policy(
            "bench",
            None,
            &policy(
                "monitoring",
                Protocol::Tcp,
                &["9100"],
                false,
                "all",
                &monitor,
            )?,
        )
        .await?;
    let mon_secret = "tern_sk_monitorbenchbenchbenchbenchbench".to_string();
    let hash = tern_management::store::hash_secret(&mon_secret);
    store
        .create_setup_key("bench", &setup_key(&monitor), &hash, &mon_secret[..12])
        .await?;
    let mut ids = vec![];
    for i in 0..=n {
        let k = tern_proto::SecretKey::generate().public_key().to_base64();
        let meta = PeerMeta {
            hostname: format!("host-{i}"),
            os: "linux".into(),
            agent_version: "bench".into(),
        };
        let key = if i == n { &mon_secret } else { &keys[i / 100] };
        ids.push(store.login_peer(&k, Some(key), &meta).await?.peer.id);
    }
    println!(
        "setup: {n} peers in teams of 100 and one monitor, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok((ids, mon_policy.id, monitor))
}
