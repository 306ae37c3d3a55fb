//! Network-map benchmark (prints figures; not a test). An account of 5,000 peers, 100 groups and
//! 200 policies is registered in a real SQLite store through the store API; then it measures
//! (1) loading the snapshot + building the index, (2) one peer's map, (3) all maps for 1,000 peers.
//! Reference (issue 2): NetBird's own benchmark bands for 5,000 peers are 65-110 ms per sync.
//!
//!     cargo run --release -p tern-management --example bench_netmap [-- PEERS GROUPS POLICIES]

use std::sync::Arc;
use std::time::Instant;
use tern_management::grpc::LastSent;
use tern_management::model::Protocol;
use tern_management::netmap::{NetIndex, RelaySettings};
use tern_management::store::{PeerMeta, PolicyInput, Store};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (n_peers, n_groups, n_policies) = (arg(1, 5000), arg(2, 100), arg(3, 200));
    let dir = tempfile::tempdir()?;
    let store = Store::connect(&format!(
        "sqlite://{}",
        dir.path().join("bench.db").display()
    ))
    .await?;
    let t = Instant::now();
    let mut groups = vec![];
    for g in 0..n_groups {
        groups.push(store.create_group("bench", &format!("group-{g}")).await?.id);
    }
    let key = "tern_sk_benchbenchbenchbenchbenchbench";
    let new = tern_management::store::NewSetupKey::reusable("bench", vec![]);
    store
        .create_setup_key(
            "bench",
            &new,
            &tern_management::store::hash_secret(key),
            "tern_sk_benc",
        )
        .await?;
    let mut peer_ids = vec![];
    for i in 0..n_peers {
        let k = tern_proto::SecretKey::generate().public_key().to_base64();
        let meta = PeerMeta {
            hostname: format!("host-{i}"),
            os: "linux".into(),
            agent_version: "bench".into(),
        };
        let out = store.login_peer(&k, Some(key), &meta).await?;
        // Each peer in two groups (deterministic spread).
        let gs = vec![
            groups[i % n_groups].clone(),
            groups[(i * 7 + 3) % n_groups].clone(),
        ];
        store
            .update_peer("bench", &out.peer.id, None, Some(&gs), None, None)
            .await?;
        peer_ids.push(out.peer.id);
    }
    for p in 0..n_policies {
        let input = PolicyInput {
            name: format!("policy-{p}"),
            description: String::new(),
            enabled: true,
            protocol: if p % 3 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Any
            },
            ports: if p % 3 == 0 {
                vec!["22".parse().map_err(anyhow::Error::msg)?]
            } else {
                vec![]
            },
            bidirectional: p % 2 == 0,
            sources: vec![groups[p % n_groups].clone()],
            destinations: vec![groups[(p * 13 + 5) % n_groups].clone()],
        };
        store.put_policy("bench", None, &input).await?;
    }
    println!(
        "setup: {n_peers} peers, {n_groups} groups, {n_policies} policies registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let relay = RelaySettings {
        stun_urls: vec!["stun:relay.example:3478".into()],
        turn_urls: vec!["turn:relay.example:3478".into()],
        tcp_relay_urls: vec![],
        secret: b"bench".to_vec(),
        stun_probe_urls: vec![],
    };
    let mut loads = vec![];
    let mut idx = None;
    for _ in 0..5 {
        let t = Instant::now();
        let snap = store.snapshot().await?;
        let i = NetIndex::new(Arc::new(snap));
        loads.push(t.elapsed().as_secs_f64() * 1e3);
        idx = Some(i);
    }
    let idx = idx.ok_or_else(|| anyhow::anyhow!("no index"))?;
    let mut one = vec![];
    let mut sizes = (0, 0);
    for _ in 0..20 {
        let t = Instant::now();
        let m = idx
            .map_for(&peer_ids[0], &relay, 2_000_000_000)
            .ok_or_else(|| anyhow::anyhow!("no map"))?;
        one.push(t.elapsed().as_secs_f64() * 1e3);
        sizes = (m.remote_peers.len(), m.firewall_rules.len());
    }
    let t = Instant::now();
    let mut total_peers = 0usize;
    for id in peer_ids.iter().take(1000) {
        let m = idx
            .map_for(id, &relay, 2_000_000_000)
            .ok_or_else(|| anyhow::anyhow!("no map"))?;
        total_peers += m.remote_peers.len();
    }
    let all = t.elapsed().as_secs_f64() * 1e3;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "snapshot load + index (SQLite, whole account): median {:.1} ms over 5",
        med(&mut loads)
    );
    println!(
        "one peer's map: median {:.3} ms over 20 ({} remote peers, {} firewall rules)",
        med(&mut one),
        sizes.0,
        sizes.1
    );
    println!(
        "all maps for 1,000 peers: {:.1} ms total, {:.3} ms per map (avg {} remote peers per map)",
        all,
        all / 1000.0,
        total_peers / 1000
    );
    println!("reference: NetBird benchmark bands for 5,000 peers: 65-110 ms per sync");

    // Bytes per change to the first 1,000 peers' streams: whole maps vs deltas (issue 16).
    use prost::Message;
    let sample: Vec<String> = peer_ids.iter().take(1000).cloned().collect();
    let maps = |idx: &NetIndex| -> Vec<Option<tern_proto::management::NetworkMap>> {
        sample
            .iter()
            .map(|id| idx.map_for(id, &relay, 2_000_000_000))
            .collect()
    };
    let mut before = maps(&idx);
    let policy0 = store.policies().await?.into_iter().next();
    for change in ["a peer comes online", "a new peer joins", "a policy edit"] {
        match change {
            "a peer comes online" => store.set_peer_connected(&peer_ids[10], true).await?,
            "a new peer joins" => {
                let k = tern_proto::SecretKey::generate().public_key().to_base64();
                let meta = PeerMeta {
                    hostname: "newcomer".into(),
                    os: "linux".into(),
                    agent_version: "bench".into(),
                };
                let out = store.login_peer(&k, Some(key), &meta).await?;
                let gs = vec![groups[0].clone()];
                store
                    .update_peer("bench", &out.peer.id, None, Some(&gs), None, None)
                    .await?;
            }
            _ => {
                if let Some(p) = &policy0 {
                    let input = PolicyInput {
                        name: p.name.clone(),
                        description: "edited".into(),
                        enabled: true,
                        protocol: Protocol::Udp,
                        ports: vec!["53".parse().map_err(anyhow::Error::msg)?],
                        bidirectional: p.bidirectional,
                        sources: p.sources.clone(),
                        destinations: p.destinations.clone(),
                    };
                    store.put_policy("bench", Some(&p.id), &input).await?;
                }
            }
        }
        let after_idx = NetIndex::new(Arc::new(store.snapshot().await?));
        let after = maps(&after_idx);
        let (mut full, mut delta, mut told, mut untouched) = (0usize, 0usize, 0usize, 0usize);
        for (old, new) in before.iter().zip(&after) {
            let (Some(old), Some(new)) = (old, new) else {
                continue;
            };
            if tern_management::netmap::same_content(old, new) {
                untouched += 1;
                continue;
            }
            told += 1;
            // What a stream that sent `old` sends next, with and without deltas.
            for (deltas, bytes) in [(false, &mut full), (true, &mut delta)] {
                let mut last = LastSent::default();
                last.push(old.clone(), deltas);
                *bytes += last
                    .push(new.clone(), deltas)
                    .map_or(0, |m| m.encoded_len());
            }
        }
        println!(
            "{change}: {told} of 1,000 streams get a message ({untouched} nothing); whole maps {:.1} kB, deltas {:.1} kB ({:.1}x fewer bytes)",
            full as f64 / 1e3,
            delta as f64 / 1e3,
            full as f64 / (delta.max(1)) as f64
        );
        before = after;
    }
    store.close().await;
    Ok(())
}
