//! Connection limits of public services: a global cap and a cap per source address, so that one
//! source (or a flood of half-open connections from it) cannot starve the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub struct Limits {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection or flow; dropping it frees the slot.
pub struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max_total,
            max_per_source,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a connection from `ip`, or None if its source (an IPv4 address, an IPv6 /64:
    /// [`tern_proto::source_of`]) or the server is at its cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let ip = tern_proto::source_of(ip);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 >= self.max_total {
            return None;
        }
        let n = st.1.entry(ip).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        st.0 += 1;
        Some(Slot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections admitted and not yet ended.
    pub fn active(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.limits.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = st.0.saturating_sub(1);
        if let Some(n) = st.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_at_its_cap_does_not_block_another() {
        let l = Limits::new(5, 2);
        let a: IpAddr = "203.0.113.20".parse().expect("ip");
        let b: IpAddr = "203.0.113.21".parse().expect("ip");
        let s1 = l.admit(a).expect("first");
        let _s2 = l.admit(a).expect("second");
        assert!(l.admit(a).is_none(), "third from a is over its cap");
        assert!(l.admit(b).is_some(), "b is unaffected");
        drop(s1);
        assert!(l.admit(a).is_some(), "a freed a slot");
        // Every address of one IPv6 /64 is one source.
        let l = Limits::new(100, 2);
        let held: Vec<Slot> = (1..=2)
            .map(|i| {
                l.admit(format!("2001:db8:7:7::{i}").parse().expect("ip"))
                    .expect("within the cap")
            })
            .collect();
        assert!(
            l.admit("2001:db8:7:7::ffff".parse().expect("ip")).is_none(),
            "same /64"
        );
        assert!(
            l.admit("2001:db8:7:8::1".parse().expect("ip")).is_some(),
            "another /64"
        );
        drop(held);
    }

    #[test]
    fn the_global_cap_holds_across_sources() {
        let l = Limits::new(3, 10);
        let slots: Vec<_> = (1..=3u8)
            .map(|i| l.admit(IpAddr::from([198, 51, 100, i])).expect("admitted"))
            .collect();
        assert!(l.admit(IpAddr::from([198, 51, 100, 9])).is_none());
        assert_eq!(l.active(), 3);
        drop(slots);
        assert_eq!(l.active(), 0);
        assert!(l.state.lock().expect("lock").1.is_empty(), "no entry left");
    }
}
