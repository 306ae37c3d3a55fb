//! The little of the DNS wire format (RFC 1035) the agent's resolver needs: read a query's header
//! and question, and build an answer to it. Everything else is forwarded byte for byte.

use std::net::IpAddr;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;

pub const RCODE_OK: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;

/// How long resolvers may keep our answers.
pub const TTL: u32 = 30;

/// A query's question, as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Opcode and RD bit, echoed in the answer.
    pub flags: u16,
    /// Lower case, without the trailing dot ("" = the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question ends (the answer copies the question bytes up to here).
    pub question_end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("shorter than a DNS header")]
    Short,
    #[error("not a query")]
    NotQuery,
    #[error("not exactly one question")]
    Questions,
    #[error("malformed name")]
    Name,
}

/// Reads a name at `pos` (following compression pointers, at most 16 jumps); returns it and
/// where the name ends at `pos`.
fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), WireError> {
    let mut out = String::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(pos).ok_or(WireError::Name)? as usize;
        match len {
            0 => {
                return Ok((out, end.unwrap_or(pos + 1)));
            }
            l if l & 0xC0 == 0xC0 => {
                let lo = *msg.get(pos + 1).ok_or(WireError::Name)? as usize;
                if end.is_none() {
                    end = Some(pos + 2);
                }
                jumps += 1;
                if jumps > 16 {
                    return Err(WireError::Name);
                }
                pos = ((l & 0x3F) << 8) | lo;
            }
            l if l <= 63 => {
                let label = msg.get(pos + 1..pos + 1 + l).ok_or(WireError::Name)?;
                if !out.is_empty() {
                    out.push('.');
                }
                for &b in label {
                    // Names we answer are letters, digits and '-'; anything else is kept
                    // (lower-cased) so it simply matches nothing of ours.
                    out.push((b as char).to_ascii_lowercase());
                }
                if out.len() > 255 {
                    return Err(WireError::Name);
                }
                pos += 1 + l;
            }
            _ => return Err(WireError::Name),
        }
    }
}

/// Reads a query (one question).
pub fn parse_query(msg: &[u8]) -> Result<Query, WireError> {
    if msg.len() < 12 {
        return Err(WireError::Short);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        return Err(WireError::NotQuery);
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    if qd != 1 {
        return Err(WireError::Questions);
    }
    let (name, end) = read_name(msg, 12)?;
    let t = msg.get(end..end + 4).ok_or(WireError::Name)?;
    Ok(Query {
        id,
        flags,
        name,
        qtype: u16::from_be_bytes([t[0], t[1]]),
        qclass: u16::from_be_bytes([t[2], t[3]]),
        question_end: end + 4,
    })
}

/// The opcode of a query (0 = standard query).
pub fn opcode(q: &Query) -> u8 {
    ((q.flags >> 11) & 0x0F) as u8
}

/// An authoritative answer to `q` (whose bytes are `msg`) with `rcode` and these addresses.
pub fn answer(msg: &[u8], q: &Query, rcode: u8, addrs: &[IpAddr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.question_end + addrs.len() * 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, the query's opcode and RD, AA, RA; the rcode.
    let flags = 0x8000 | (q.flags & 0x7900) | 0x0400 | 0x0080 | u16::from(rcode & 0x0F);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.question_end]);
    for a in addrs {
        // The name: a pointer to the question's.
        out.extend_from_slice(&[0xC0, 0x0C]);
        let (t, data): (u16, Vec<u8>) = match a {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// A bare error answer for a message we could not read as a query (just the header echoed).
pub fn error_header(msg: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None;
    }
    let mut out = vec![0u8; 12];
    out[0] = msg[0];
    out[1] = msg[1];
    out[2] = 0x80 | (msg[2] & 0x79);
    out[3] = 0x80 | (rcode & 0x0F);
    Some(out)
}

#[cfg(test)]
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_read_and_answered() {
        let q = build_query(0xBEEF, "Home-B.Tern.Internal", TYPE_A);
        let p = parse_query(&q).expect("query");
        assert_eq!(p.name, "home-b.tern.internal");
        assert_eq!((p.id, p.qtype, p.qclass), (0xBEEF, TYPE_A, CLASS_IN));
        assert_eq!(opcode(&p), 0);
        let a = answer(&q, &p, RCODE_OK, &["100.64.0.2".parse().expect("ip")]);
        assert_eq!(&a[0..2], &[0xBE, 0xEF]);
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[2] & 0x01, 0x01, "RD echoed");
        assert_eq!(a[3] & 0x0F, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[100, 64, 0, 2]);
        // The answer reads back as a message with the same question.
        assert_eq!(parse_query(&a), Err(WireError::NotQuery));
        let nx = answer(&q, &p, RCODE_NXDOMAIN, &[]);
        assert_eq!(nx[3] & 0x0F, RCODE_NXDOMAIN);
    }

    #[test]
    fn compression_loops_and_garbage_are_refused_not_followed() {
        let mut q = build_query(1, "a.b", TYPE_A);
        // A pointer to itself at the question.
        q.truncate(12);
        q.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        assert_eq!(parse_query(&q), Err(WireError::Name));
        assert_eq!(parse_query(&[0u8; 5]), Err(WireError::Short));
        // Random input never panics.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for n in 0..20_000 {
            let len = (n % 80) as usize;
            let m: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Ok(p) = parse_query(&m) {
                let _ = answer(&m, &p, RCODE_OK, &["::1".parse().expect("ip")]);
            }
            let _ = error_header(&m, RCODE_FORMERR);
        }
    }
}
