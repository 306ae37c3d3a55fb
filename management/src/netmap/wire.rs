//! A peer's map written straight to protobuf bytes: the same bytes as `map_for`'s map encoded
//! without its serial (the unit tests compare them), made without building the map. Remote peers
//! and DNS records are encoded once per index and copied into every map that lists them; rules
//! are written from the plan without allocating. A stream that already sent a map compares these
//! bytes with the last ones and makes its delta from both (`LastSent::push_encoded`).

use super::{peer_config, NetIndex, RelaySettings, RuleKey};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tern_proto::management as pb;

/// NetworkMap's fields (proto/management.proto).
const PEER_CONFIG: u32 = 2;
const REMOTE_PEERS: u32 = 3;
const FIREWALL_RULES: u32 = 4;
const ROUTES: u32 = 5;
const SERVED_ROUTES: u32 = 6;
const RELAY: u32 = 7;
const PENDING_APPROVAL: u32 = 8;
const SERVED_SERVICES: u32 = 9;
const DNS: u32 = 10;

/// A length-delimited field of `len` bytes: its key, length and value together.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_delimited(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// A proto3 string field (left out when empty).
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        put_delimited(tag, s.as_bytes(), buf);
    }
}

/// A proto3 enum or uint32 field (left out when zero; negative enums take ten bytes).
fn int_len(tag: u32, v: i64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v as u64)
    }
}

fn put_int(tag: u32, v: i64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v as u64, buf);
    }
}

fn put_message(tag: u32, m: &impl Message, buf: &mut Vec<u8>) {
    prost::encoding::message::encode(tag, m, buf);
}

impl NetIndex {
    /// `map_for(peer_id, ..)` encoded without its serial, written to `out` (cleared first);
    /// returns the map's serial, or None if the peer is not in the snapshot.
    pub fn map_bytes_for(
        &self,
        peer_id: &str,
        relay: &RelaySettings,
        creds_expire_unix: i64,
        out: &mut Vec<u8>,
    ) -> Option<u64> {
        let plan = self.plan(peer_id)?;
        let me = &self.snap.peers[plan.me];
        let settings = &self.snap.settings;
        out.clear();
        put_message(PEER_CONFIG, &peer_config(me, settings), out);
        for &i in &plan.visible {
            put_delimited(REMOTE_PEERS, self.remote_peer_bytes(i), out);
        }
        for k in &plan.rules {
            self.put_rule(k, out);
        }
        for r in &plan.routes {
            put_message(ROUTES, r, out);
        }
        for r in &plan.served {
            put_message(SERVED_ROUTES, r, out);
        }
        if let Some(r) = self.relay_for(plan.me, relay, creds_expire_unix) {
            put_message(RELAY, &r, out);
        }
        put_int(PENDING_APPROVAL, i64::from(!me.approved), out);
        for s in self.served_services(plan.me) {
            put_message(SERVED_SERVICES, &s, out);
        }
        self.put_dns(plan.me, &plan.visible, out);
        Some(settings.network_serial.max(0) as u64)
    }

    /// Peer `i` as a `RemotePeer`, encoded the first time a map lists it.
    fn remote_peer_bytes(&self, i: usize) -> &[u8] {
        self.wire.peers[i].get_or_init(|| self.remote_peer(i).encode_to_vec())
    }

    fn dns_record_bytes(&self, i: usize) -> &[u8] {
        self.wire.records[i].get_or_init(|| self.dns_record(i).encode_to_vec())
    }

    /// A `FirewallRule` (fields 1-6) from its plan.
    fn put_rule(&self, k: &RuleKey<'_>, out: &mut Vec<u8>) {
        let port_len = |p: &crate::model::PortRange| {
            int_len(1, i64::from(p.start)) + int_len(2, i64::from(p.end))
        };
        let cidr = self.cidrs[k.peer].as_str();
        let len = str_len(1, cidr)
            + int_len(2, i64::from(k.direction))
            + int_len(3, i64::from(k.protocol))
            + k.ports
                .iter()
                .map(|p| delimited_len(4, port_len(p)))
                .sum::<usize>()
            + str_len(5, k.policy_id.as_str())
            + str_len(6, k.network.as_str());
        encode_key(FIREWALL_RULES, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        put_str(1, cidr, out);
        put_int(2, i64::from(k.direction), out);
        put_int(3, i64::from(k.protocol), out);
        for p in k.ports {
            encode_key(4, WireType::LengthDelimited, out);
            encode_varint(port_len(p) as u64, out);
            put_int(1, i64::from(p.start), out);
            put_int(2, i64::from(p.end), out);
        }
        put_str(5, k.policy_id.as_str(), out);
        put_str(6, k.network.as_str(), out);
    }

    /// The `DnsConfig` (domain, records, nameservers), as `dns_for` makes it.
    fn put_dns(&self, me: usize, visible: &[usize], out: &mut Vec<u8>) {
        let domain = self.snap.settings.dns_domain.as_str();
        let order = self.dns_order(me, visible);
        let nameservers: Vec<pb::NameserverGroup> = self.nameservers_for(me).collect();
        let len = str_len(1, domain)
            + order
                .iter()
                .map(|&i| delimited_len(2, self.dns_record_bytes(i).len()))
                .sum::<usize>()
            + nameservers
                .iter()
                .map(|n| delimited_len(3, n.encoded_len()))
                .sum::<usize>();
        encode_key(DNS, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        put_str(1, domain, out);
        for &i in &order {
            put_delimited(2, self.dns_record_bytes(i), out);
        }
        for n in &nameservers {
            put_message(3, n, out);
        }
    }
}

/// Per index: each peer's `RemotePeer` and `DnsRecord` bytes, made when a map first needs them
/// (most changes rebuild few maps, so an index does not encode every peer up front).
pub(super) struct Encoded {
    peers: Vec<std::sync::OnceLock<Vec<u8>>>,
    records: Vec<std::sync::OnceLock<Vec<u8>>>,
}

impl Encoded {
    pub(super) fn new(peers: usize) -> Self {
        Encoded {
            peers: (0..peers).map(|_| Default::default()).collect(),
            records: (0..peers).map(|_| Default::default()).collect(),
        }
    }
}
