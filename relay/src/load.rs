//! The TURN relay's own load, measured every second over the last few seconds: what it relays
//! (datagrams and bits per second, in total and per allocation), what the kernel dropped on the
//! way out (a full device queue: a saturated uplink) and on the way in (datagrams not read in
//! time: the relay's CPU), and what waits below its sockets to go out (the uplink's queue, and
//! about how long it takes to drain). `tern diagnose` reads it through management and names an
//! overloaded relay with these figures instead of calling the path slow.

use crate::metrics::Metrics;
use crate::udp::UdpShared;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How often the relay samples, and how many samples the rates are taken over.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const WINDOW: usize = 5;
/// An uplink queue that takes this long to drain makes the relay overloaded (a round trip
/// through the relay grows by as much).
pub const QUEUE_OVERLOADED_MS: f64 = 100.0;
/// Drops (of what the relay handled in the window) that make it overloaded, and the fewest
/// drops that count (a lone drop is noise).
const DROP_SHARE: f64 = 0.005;
const MIN_DROPS: u64 = 10;

/// What `GET /load` answers: the relay's TURN URLs and its load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub turn_urls: Vec<String>,
    pub load: Load,
}

/// One allocation's share.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationLoad {
    /// The TURN username (`<expiry>:<peer id>` for Tern's agents).
    pub user: String,
    pub datagrams_per_sec: f64,
    pub bits_per_sec: f64,
}

/// The relay's load over its last few seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Seconds the rates are taken over (0 before two samples).
    pub window_secs: f64,
    pub datagrams_per_sec: f64,
    pub bits_per_sec: f64,
    /// Datagrams the kernel dropped on the way out (device queue full) or that could not be
    /// sent, per second.
    pub send_drops_per_sec: f64,
    /// Datagrams dropped on the way in because the relay did not read them in time, per second.
    pub receive_drops_per_sec: f64,
    /// Bytes sent by the relay's sockets that have not gone out yet (the uplink's queue).
    pub unsent_bytes: u64,
    /// About how long that queue takes to drain at the rate the uplink takes (None: nothing
    /// queued, or nothing going out).
    pub queue_ms: Option<f64>,
    pub allocations: u64,
    pub per_allocation: Vec<AllocationLoad>,
    pub overloaded: bool,
    /// Why it is overloaded, in words with the figures (empty when it is not).
    pub why: String,
}

/// Cumulative counters at one instant.
#[derive(Debug, Clone, Default)]
struct Sample {
    at: Option<Instant>,
    datagrams: u64,
    bytes: u64,
    send_drops: u64,
    receive_drops: u64,
    /// Per allocation (by client address): user, datagrams, bytes.
    allocs: HashMap<SocketAddr, (String, u64, u64)>,
}

/// Samples the relay's counters and sockets; [`LoadMeter::load`] is the latest figure.
pub struct LoadMeter {
    shared: Arc<UdpShared>,
    samples: Mutex<VecDeque<Sample>>,
    /// Receive drops of sockets gone since (their counts stay in the total).
    gone_drops: Mutex<(u64, HashMap<SocketAddr, u64>)>,
    latest: RwLock<Load>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LoadMeter {
    pub fn new(shared: Arc<UdpShared>) -> Arc<LoadMeter> {
        Arc::new(LoadMeter {
            shared,
            samples: Mutex::new(VecDeque::with_capacity(WINDOW + 1)),
            gone_drops: Mutex::new((0, HashMap::new())),
            latest: RwLock::new(Load::default()),
        })
    }

    /// The latest figures.
    pub fn load(&self) -> Load {
        self.latest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Samples every [`SAMPLE_EVERY`] until the relay (the meter's owner) goes.
    pub async fn run(me: std::sync::Weak<LoadMeter>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(m) = me.upgrade() else { return };
            m.sample(Instant::now());
        }
    }

    /// One sample: counters, and what the kernel holds for each socket.
    pub fn sample(&self, now: Instant) {
        let m = &self.shared.metrics;
        let allocs = self.shared.fast.all();
        let mut unsent = 0u64;
        let mut live_drops = 0u64;
        if let Some(info) = self
            .shared
            .main_socket()
            .and_then(|s| tern_udp::meminfo(&*s))
        {
            unsent += info.unsent_bytes;
            live_drops += info.receive_drops;
        }
        let mut per = HashMap::with_capacity(allocs.len());
        let mut drops_now: HashMap<SocketAddr, u64> = HashMap::with_capacity(allocs.len());
        for c in &allocs {
            if let Some(info) = tern_udp::meminfo(&*c.relay) {
                unsent += info.unsent_bytes;
                live_drops += info.receive_drops;
                drops_now.insert(c.client, info.receive_drops);
            }
            let (d, b) = c.relayed();
            per.insert(c.client, (c.user.clone(), d, b));
        }
        // A socket that went keeps its drops in the total.
        let gone = {
            let mut g = lock(&self.gone_drops);
            let (sum, last) = &mut *g;
            for (client, n) in last.iter() {
                if !drops_now.contains_key(client) {
                    *sum += n;
                }
            }
            *last = drops_now;
            *sum
        };
        let s = Sample {
            at: Some(now),
            datagrams: Metrics::get(&m.turn_packets_relayed_total),
            bytes: Metrics::get(&m.turn_bytes_relayed_total),
            send_drops: Metrics::get(&m.turn_send_failures_total)
                + tern_udp::udp_send_queue_drops().unwrap_or(0),
            receive_drops: live_drops + gone,
            allocs: per,
        };
        let load = {
            let mut samples = lock(&self.samples);
            samples.push_back(s);
            while samples.len() > WINDOW + 1 {
                samples.pop_front();
            }
            match (samples.front(), samples.back()) {
                (Some(a), Some(b)) => figures(a, b, unsent, allocs.len() as u64),
                _ => Load::default(),
            }
        };
        Metrics::set(&m.turn_unsent_bytes, load.unsent_bytes);
        Metrics::set(
            &m.turn_queue_ms,
            load.queue_ms.map_or(0, |q| q.round() as u64),
        );
        Metrics::set(&m.turn_bits_per_sec, load.bits_per_sec.round() as u64);
        Metrics::set(&m.turn_overloaded, u64::from(load.overloaded));
        *self.latest.write().unwrap_or_else(|e| e.into_inner()) = load;
    }
}

/// The load between two samples, with `unsent` bytes below the sockets now.
fn figures(a: &Sample, b: &Sample, unsent: u64, allocations: u64) -> Load {
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.saturating_duration_since(x).as_secs_f64(),
        _ => 0.0,
    };
    if secs <= 0.0 {
        return Load {
            unsent_bytes: unsent,
            allocations,
            ..Load::default()
        };
    }
    let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    let datagrams = b.datagrams.saturating_sub(a.datagrams);
    let send_drops = b.send_drops.saturating_sub(a.send_drops);
    let receive_drops = b.receive_drops.saturating_sub(a.receive_drops);
    let bytes_per_sec = rate(a.bytes, b.bytes);
    // What the uplink takes: what the relay sent, less the share the kernel dropped.
    let kept = if datagrams + send_drops == 0 {
        1.0
    } else {
        datagrams as f64 / (datagrams + send_drops) as f64
    };
    let drain = bytes_per_sec * kept;
    let queue_ms = (unsent > 0 && drain > 0.0).then(|| unsent as f64 * 1000.0 / drain);
    let mut per_allocation: Vec<AllocationLoad> = b
        .allocs
        .iter()
        .map(|(client, (user, d, by))| {
            let (d0, b0) = a
                .allocs
                .get(client)
                .map_or((0, 0), |(_, d0, b0)| (*d0, *b0));
            AllocationLoad {
                user: user.clone(),
                datagrams_per_sec: rate(d0, *d),
                bits_per_sec: rate(b0, *by) * 8.0,
            }
        })
        .collect();
    per_allocation.sort_by(|x, y| y.bits_per_sec.total_cmp(&x.bits_per_sec));
    // Drops count only while the relay relays (the kernel's send-queue counter is the whole
    // host's, and also counts waits on a full socket buffer that the relay sits out).
    let handled = datagrams + send_drops + receive_drops;
    let too_many = |drops: u64| {
        datagrams > 0 && drops >= MIN_DROPS && drops as f64 >= handled as f64 * DROP_SHARE
    };
    let mut why = vec![];
    if let Some(q) = queue_ms.filter(|q| *q >= QUEUE_OVERLOADED_MS) {
        why.push(format!(
            "{} KiB wait to go out on its uplink (about {q:.0} ms)",
            unsent / 1024
        ));
    }
    if too_many(send_drops) {
        why.push(format!(
            "{:.0} datagrams/s dropped on the way out ({:.0}% of what it sent: its uplink queue is full)",
            send_drops as f64 / secs,
            send_drops as f64 * 100.0 / (datagrams + send_drops).max(1) as f64
        ));
    }
    if too_many(receive_drops) {
        why.push(format!(
            "it could not read {:.0} datagrams/s in time (its CPU)",
            receive_drops as f64 / secs
        ));
    }
    Load {
        window_secs: secs,
        datagrams_per_sec: rate(a.datagrams, b.datagrams),
        bits_per_sec: bytes_per_sec * 8.0,
        send_drops_per_sec: send_drops as f64 / secs,
        receive_drops_per_sec: receive_drops as f64 / secs,
        unsent_bytes: unsent,
        queue_ms,
        allocations,
        per_allocation,
        overloaded: !why.is_empty(),
        why: why.join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, datagrams: u64, bytes: u64, send_drops: u64) -> Sample {
        Sample {
            at: Some(at),
            datagrams,
            bytes,
            send_drops,
            receive_drops: 0,
            allocs: HashMap::from([(
                "198.51.100.2:4000".parse().expect("addr"),
                ("1700000000:peer-a".to_string(), datagrams / 2, bytes / 2),
            )]),
        }
    }

    #[test]
    fn a_saturated_uplink_is_named_with_its_queue_and_drops_and_a_busy_one_is_not() {
        let t0 = Instant::now();
        let t5 = t0 + Duration::from_secs(5);
        // 5 s at 10,000 datagrams/s of 1,250 bytes (100 Mbit/s), nothing dropped or queued.
        let a = sample(t0, 0, 0, 0);
        let b = sample(t5, 50_000, 62_500_000, 0);
        let l = figures(&a, &b, 0, 2);
        assert!((l.bits_per_sec - 100e6).abs() < 1.0, "{l:?}");
        assert!(!l.overloaded, "busy is not overloaded: {l:?}");
        assert_eq!(l.queue_ms, None);
        assert_eq!(l.per_allocation[0].user, "1700000000:peer-a");
        assert!((l.per_allocation[0].bits_per_sec - 50e6).abs() < 1.0);
        // The uplink takes a third of it: 2 of 3 datagrams dropped, 400 KiB waiting.
        let b = sample(t5, 50_000, 62_500_000, 100_000);
        let l = figures(&a, &b, 4000 << 10, 2);
        assert!(l.overloaded, "{l:?}");
        let q = l.queue_ms.expect("queue");
        assert!((q - 983.0).abs() < 5.0, "4000 KiB at 1/3 of 12.5 MB/s: {q}");
        assert!(l.why.contains("4000 KiB wait to go out"), "{}", l.why);
        assert!(
            l.why
                .contains("20000 datagrams/s dropped on the way out (67%"),
            "{}",
            l.why
        );
        // A few drops among many are noise; drops while nothing is relayed are someone else's.
        let b = sample(t5, 50_000, 62_500_000, 5);
        assert!(!figures(&a, &b, 0, 2).overloaded);
        let b = sample(t5, 0, 0, 500);
        assert!(!figures(&a, &b, 0, 0).overloaded, "an idle relay");
        // Before two samples: nothing to say.
        assert!(!figures(&a, &a, 0, 0).overloaded);
    }
}
