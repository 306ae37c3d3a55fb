//! Path probes inside the tunnel: every few seconds each node sends every peer with a live session
//! a tiny IPv4 packet (protocol 253, RFC 3692's experimental number, from its overlay address to
//! the peer's) that the peer's node answers itself: it never reaches either host's IP stack or
//! policy filter, so it measures the path in use (direct, via TURN or via the TCP relay), round
//! trip and loss, whatever the policies allow, at one small packet per peer per interval.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// IP protocol number of probes.
pub const PROTO: u8 = 253;
const MAGIC: &[u8; 7] = b"TERNPRB";
const REQUEST: u8 = 1;
const REPLY: u8 = 2;
/// A probe packet: 20-byte IPv4 header + magic, kind, sequence number.
pub const LEN: usize = 20 + 7 + 1 + 4;
/// One probe per peer this often.
pub const EVERY: Duration = Duration::from_secs(5);
/// A probe with no reply after this long is lost.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// Probes remembered per peer (one minute at 5 s).
pub const WINDOW: usize = 12;

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes a probe packet into `buf`.
pub fn build(buf: &mut [u8; LEN], src: Ipv4Addr, dst: Ipv4Addr, reply: bool, seq: u32) {
    buf.fill(0);
    buf[0] = 0x45;
    buf[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
    buf[8] = 64;
    buf[9] = PROTO;
    buf[12..16].copy_from_slice(&src.octets());
    buf[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&buf[..20]);
    buf[10..12].copy_from_slice(&c.to_be_bytes());
    buf[20..27].copy_from_slice(MAGIC);
    buf[27] = if reply { REPLY } else { REQUEST };
    buf[28..32].copy_from_slice(&seq.to_be_bytes());
}

/// A probe inside `pkt`: (is a reply, sequence number, source, destination).
pub fn parse(pkt: &[u8]) -> Option<(bool, u32, Ipv4Addr, Ipv4Addr)> {
    if pkt.len() < LEN || pkt[0] != 0x45 || pkt[9] != PROTO || &pkt[20..27] != MAGIC {
        return None;
    }
    let reply = match pkt[27] {
        REQUEST => false,
        REPLY => true,
        _ => return None,
    };
    let seq = u32::from_be_bytes([pkt[28], pkt[29], pkt[30], pkt[31]]);
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    Some((reply, seq, src, dst))
}

/// The recent probes to one peer.
#[derive(Debug, Default)]
pub struct Probes {
    next_seq: u32,
    last_sent: Option<Instant>,
    /// (sequence, sent at, round trip once answered)
    sent: VecDeque<(u32, Instant, Option<Duration>)>,
}

/// Round trip and loss of a path over the last minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathQuality {
    /// The latest answered probe's round trip.
    pub rtt: Duration,
    /// Settled probes (answered, or unanswered for [`TIMEOUT`]) and how many of them were lost.
    pub settled: u32,
    pub lost: u32,
}

impl Probes {
    pub fn due(&self, now: Instant) -> bool {
        self.last_sent
            .is_none_or(|t| now.saturating_duration_since(t) >= EVERY)
    }

    /// Records a probe sent now; returns its sequence number.
    pub fn sent(&mut self, now: Instant) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.last_sent = Some(now);
        if self.sent.len() == WINDOW {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now, None));
        seq
    }

    /// A reply arrived: true if it answered a probe still remembered and not yet answered.
    pub fn answered(&mut self, seq: u32, now: Instant) -> bool {
        match self
            .sent
            .iter_mut()
            .find(|(s, _, rtt)| *s == seq && rtt.is_none())
        {
            Some((_, at, rtt)) => {
                *rtt = Some(now.saturating_duration_since(*at));
                true
            }
            None => false,
        }
    }

    /// Forgets everything (the path changed: old figures describe another path).
    pub fn reset(&mut self) {
        self.sent.clear();
    }

    pub fn quality(&self, now: Instant) -> Option<PathQuality> {
        let rtt = self.sent.iter().rev().find_map(|(_, _, r)| *r)?;
        let settled: Vec<&(u32, Instant, Option<Duration>)> = self
            .sent
            .iter()
            .filter(|(_, at, r)| r.is_some() || now.saturating_duration_since(*at) >= TIMEOUT)
            .collect();
        Some(PathQuality {
            rtt,
            settled: settled.len() as u32,
            lost: settled.iter().filter(|(_, _, r)| r.is_none()).count() as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_through_build_and_parse_with_a_valid_header() {
        let mut b = [0u8; LEN];
        let (a, z) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
        build(&mut b, a, z, false, 7);
        assert_eq!(parse(&b), Some((false, 7, a, z)));
        assert_eq!(checksum(&b[..20]), 0, "the header checksum verifies");
        assert_eq!(crate::packet::dst(&b), Some(z.into()));
        build(&mut b, z, a, true, 7);
        assert_eq!(parse(&b), Some((true, 7, z, a)));
        b[20] = b'X';
        assert_eq!(parse(&b), None, "not our magic: an ordinary packet");
        assert_eq!(parse(&b[..LEN - 1]), None);
    }

    #[test]
    fn quality_counts_answers_and_losses_over_the_window() {
        let t = Instant::now();
        let mut p = Probes::default();
        assert!(p.due(t));
        assert_eq!(p.quality(t), None, "nothing answered yet");
        let s0 = p.sent(t);
        assert!(!p.due(t + Duration::from_secs(1)));
        assert!(p.answered(s0, t + Duration::from_millis(40)));
        assert!(!p.answered(s0, t + Duration::from_millis(50)), "duplicate");
        let _lost = p.sent(t + EVERY);
        let s2 = p.sent(t + EVERY * 2);
        assert!(p.answered(s2, t + EVERY * 2 + Duration::from_millis(10)));
        let q = p
            .quality(t + EVERY * 2 + Duration::from_millis(20))
            .expect("q");
        assert_eq!(q.rtt, Duration::from_millis(10), "the latest answer");
        assert_eq!((q.settled, q.lost), (3, 1));
        for i in 0..20 {
            p.sent(t + EVERY * (3 + i));
        }
        assert!(
            p.quality(t + EVERY * 30).is_none(),
            "answers fell out of the window"
        );
        p.reset();
        assert!(p.quality(t).is_none());
    }
}
