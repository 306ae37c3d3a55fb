//! The data-plane core alone (no sockets, no TUN): two `Node`s back to back, 1280-byte packets
//! encapsulated on one and decapsulated (cryptokey routing, policy) on the other. Prints ns per
//! packet and the heap allocations counted during the measured loop (expected: none).
//!   cargo run --release -p tern-tunnel --example bench_core

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;
use tern_tunnel::firewall::{Rule, UDP};
use tern_tunnel::{Decap, Node, PeerSpec};

/// The system allocator, counting allocations.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed unchanged to the system allocator; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn packet(payload: usize) -> Vec<u8> {
    let total = 28 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = UDP;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    p
}

fn main() {
    let (ka, kb) = ([1u8; 32], [2u8; 32]);
    let (mut a, mut b) = (Node::new(ka), Node::new(kb));
    let spec = |n: &Node, ip: &str, id: &str| PeerSpec {
        key: n.public_key(),
        id: id.into(),
        name: id.into(),
        overlay_ip: ip.parse().expect("ip"),
        allowed: vec![format!("{ip}/32").parse().expect("net")],
        online: true,
        relay_only: false,
    };
    let now = Instant::now();
    let sb = spec(&b, "100.64.0.2", "b");
    let sa = spec(&a, "100.64.0.1", "a");
    a.apply_peers(&[sb], now);
    b.apply_peers(&[sa], now);
    b.set_rules(
        Some("100.64.0.2".parse().expect("ip")),
        vec![Rule {
            src: "100.64.0.1/32".parse().expect("net"),
            proto: 0,
            ports: vec![],
            network: None,
        }],
    );
    a.set_tcp_relay(true);
    b.set_tcp_relay(true);
    let pa = b.peer_by_key(&a.public_key()).expect("a");
    let pb = a.peer_by_key(&b.public_key()).expect("b");
    let pkt = packet(1280 - 28);
    let mut wire = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let mut back = vec![0u8; 2048];
    // Handshake: a's first packet queues behind an initiation; b answers; a sends the queue.
    let init = a
        .encapsulate(&pkt, now, &mut wire)
        .expect("ok")
        .expect("init");
    let n = init.payload.len();
    let resp = match b.decapsulate(pa, &wire[..n], now, &mut out).expect("resp") {
        Decap::Network(t) => t.payload.to_vec(),
        other => panic!("{other:?}"),
    };
    let _ = a.decapsulate(pb, &resp, now, &mut back);
    while let Some(t) = a.poll_transmit(&mut back) {
        let d = t.payload.to_vec();
        let _ = b.decapsulate(pa, &d, now, &mut out);
    }
    for (label, iters) in [("warm-up", 20_000u64), ("measured", 500_000)] {
        let before = ALLOCS.load(Relaxed);
        let t0 = Instant::now();
        let mut delivered = 0u64;
        for _ in 0..iters {
            let now = Instant::now();
            let t = a
                .encapsulate(&pkt, now, &mut wire)
                .expect("ok")
                .expect("data");
            let n = t.payload.len();
            if let Ok(Decap::Tunnel(p)) = b.decapsulate(pa, &wire[..n], now, &mut out) {
                delivered += (p.len() == pkt.len()) as u64;
            }
        }
        let ns = t0.elapsed().as_nanos() as f64 / iters as f64;
        let allocs = ALLOCS.load(Relaxed) - before;
        assert_eq!(delivered, iters, "every packet delivered intact");
        if label == "measured" {
            println!(
                "tern-tunnel core, 1280-byte packets, encapsulate + decapsulate: {ns:.0} ns/packet \
                 ({:.2} Gbit/s of one core), {allocs} heap allocations in {iters} packets",
                1280.0 * 8.0 / ns
            );
        }
    }
}
