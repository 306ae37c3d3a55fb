//! Longest-prefix match from an address to a value (the peer that owns it): a binary trie per
//! address family, nodes in one vector. A lookup walks at most 32 (IPv4) or 128 (IPv6) nodes and
//! allocates nothing.

use ipnet::IpNet;
use std::net::IpAddr;

#[derive(Clone, Debug)]
struct Node<T> {
    child: [u32; 2],
    value: Option<T>,
}

#[derive(Clone, Debug)]
struct Trie<T> {
    /// nodes[0] is the root (the /0 prefix).
    nodes: Vec<Node<T>>,
}

impl<T: Clone> Trie<T> {
    fn new() -> Self {
        Trie {
            nodes: vec![Node {
                child: [0, 0],
                value: None,
            }],
        }
    }

    /// Bit `i` (0 = most significant) of a `width`-bit key held in a u128.
    fn bit(key: u128, width: u32, i: u32) -> usize {
        ((key >> (width - 1 - i)) & 1) as usize
    }

    fn insert(&mut self, key: u128, width: u32, len: u32, value: T) -> Option<T> {
        let mut n = 0usize;
        for i in 0..len {
            let b = Self::bit(key, width, i);
            let next = self.nodes[n].child[b] as usize;
            n = if next == 0 {
                self.nodes.push(Node {
                    child: [0, 0],
                    value: None,
                });
                let id = self.nodes.len() - 1;
                self.nodes[n].child[b] = id as u32;
                id
            } else {
                next
            };
        }
        self.nodes[n].value.replace(value)
    }

    fn get(&self, key: u128, width: u32) -> Option<&T> {
        let mut n = 0usize;
        let mut best = self.nodes[0].value.as_ref();
        for i in 0..width {
            let next = self.nodes[n].child[Self::bit(key, width, i)] as usize;
            if next == 0 {
                break;
            }
            n = next;
            if let Some(v) = &self.nodes[n].value {
                best = Some(v);
            }
        }
        best
    }
}

/// A prefix -> value map with longest-prefix lookup. Rebuilt with [`AllowedIps::retain`] when
/// entries go (removals are rare: a network map change), which also compacts it.
#[derive(Clone, Debug)]
pub struct AllowedIps<T> {
    v4: Trie<T>,
    v6: Trie<T>,
    entries: Vec<(IpNet, T)>,
}

impl<T: Clone> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Trie::new(),
            v6: Trie::new(),
            entries: vec![],
        }
    }
}

fn key(net: &IpNet) -> (u128, u32, u32) {
    match net {
        IpNet::V4(n) => (u32::from(n.network()) as u128, 32, n.prefix_len() as u32),
        IpNet::V6(n) => (u128::from(n.network()), 128, n.prefix_len() as u32),
    }
}

impl<T: Clone> AllowedIps<T> {
    /// Maps `net` to `value` (replacing an equal prefix's value).
    pub fn insert(&mut self, net: IpNet, value: T) {
        let net = net.trunc();
        let (k, width, len) = key(&net);
        let trie = if width == 32 {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if trie.insert(k, width, len, value.clone()).is_some() {
            self.entries.retain(|(n, _)| *n != net);
        }
        self.entries.push((net, value));
    }

    /// The value of the longest prefix containing `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<&T> {
        match ip {
            IpAddr::V4(a) => self.v4.get(u32::from(a) as u128, 32),
            IpAddr::V6(a) => self.v6.get(u128::from(a), 128),
        }
    }

    /// Keeps the entries `keep` accepts and rebuilds the tries.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet, &T) -> bool) {
        let entries = std::mem::take(&mut self.entries);
        *self = AllowedIps::default();
        for (n, v) in entries {
            if keep(&n, &v) {
                self.insert(n, v);
            }
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = &(IpNet, T)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_longest_prefix_wins() {
        let mut a = AllowedIps::default();
        a.insert(net("192.168.50.0/24"), 1);
        a.insert(net("192.168.50.128/25"), 2);
        a.insert(net("100.64.0.7/32"), 3);
        a.insert(net("2001:db8::/32"), 4);
        a.insert(net("2001:db8::1/128"), 5);
        assert_eq!(a.get(ip("192.168.50.10")), Some(&1));
        assert_eq!(a.get(ip("192.168.50.200")), Some(&2));
        assert_eq!(a.get(ip("100.64.0.7")), Some(&3));
        assert_eq!(a.get(ip("100.64.0.8")), None);
        assert_eq!(a.get(ip("2001:db8::2")), Some(&4));
        assert_eq!(a.get(ip("2001:db8::1")), Some(&5));
        assert_eq!(a.get(ip("10.0.0.1")), None);
    }

    #[test]
    fn host_bits_are_ignored_and_equal_prefixes_replace() {
        let mut a = AllowedIps::default();
        a.insert(net("192.168.50.7/24"), 1);
        a.insert(net("192.168.50.0/24"), 2);
        assert_eq!(a.get(ip("192.168.50.99")), Some(&2));
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn retain_removes_and_keeps_the_rest() {
        let mut a = AllowedIps::default();
        a.insert(net("0.0.0.0/0"), 0);
        a.insert(net("192.168.50.0/24"), 1);
        a.insert(net("192.168.50.10/32"), 2);
        a.retain(|_, v| *v != 2);
        assert_eq!(a.get(ip("192.168.50.10")), Some(&1));
        a.retain(|_, v| *v != 1);
        assert_eq!(
            a.get(ip("192.168.50.10")),
            Some(&0),
            "the default route remains"
        );
    }

    #[test]
    fn matches_a_linear_scan_on_random_tables() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        for _ in 0..20 {
            let mut a = AllowedIps::default();
            let mut list: Vec<(IpNet, usize)> = vec![];
            for v in 0..200 {
                let len = rng.gen_range(8..=32u8);
                let n: IpNet = ipnet::Ipv4Net::new(rng.gen::<u32>().into(), len)
                    .expect("net")
                    .trunc()
                    .into();
                list.retain(|(x, _)| *x != n);
                list.push((n, v));
                a.insert(n, v);
            }
            for _ in 0..2000 {
                // Half the probes fall inside some entry, half anywhere.
                let (n, _) = list[rng.gen_range(0..list.len())];
                let host = match n {
                    IpNet::V4(n) => {
                        u32::from(n.network()) | (rng.gen::<u32>() & !u32::from(n.netmask()))
                    }
                    IpNet::V6(_) => unreachable!(),
                };
                let any = rng.gen::<u32>();
                let probe =
                    IpAddr::from(std::net::Ipv4Addr::from(if rng.gen() { host } else { any }));
                let want = list
                    .iter()
                    .filter(|(n, _)| n.contains(&probe))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, v)| v);
                assert_eq!(a.get(probe), want, "{probe}");
            }
        }
    }
}
