//! A small, bounded DNS message parser and builder: just what the slot resolver
//! needs (one question, A/CNAME answers) and what tests need to run a zone.
//! Every length and pointer is checked; name compression pointers must point
//! backwards and are followed at most [`MAX_POINTERS`] times; messages are at
//! most [`MAX_MESSAGE`] bytes. Fuzzed by `netd/fuzz` (target `dns`).

use std::net::Ipv4Addr;

/// Largest message handled (EDNS over UDP rarely exceeds this).
pub const MAX_MESSAGE: usize = 4096;
/// Compression pointers followed per name.
pub const MAX_POINTERS: usize = 16;
/// Resource records read per message.
pub const MAX_RECORDS: usize = 64;
/// Type A.
pub const TYPE_A: u16 = 1;
/// Type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// Response codes.
pub const RCODE_NOERROR: u8 = 0;
/// Server failure.
pub const RCODE_SERVFAIL: u8 = 2;
/// No such name.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Refused.
pub const RCODE_REFUSED: u8 = 5;

/// Errors of DNS parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("message of {0} bytes (want 12..={MAX_MESSAGE})")]
    Size(usize),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("bad name at byte {0}")]
    BadName(usize),
    #[error("not a standard query with one question")]
    NotAQuery,
    #[error("not a response to the query sent")]
    NotTheResponse,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Lower-case, no trailing dot ("" for the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past the question (header + question bytes).
    pub question_end: usize,
}

/// A parsed response, reduced to what the resolver needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    /// A records reachable from the question name through CNAMEs, with TTLs.
    pub addrs: Vec<(Ipv4Addr, u32)>,
}

fn be16(b: &[u8], at: usize) -> Result<u16, DnsError> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(DnsError::Truncated(at))
}

fn be32(b: &[u8], at: usize) -> Result<u32, DnsError> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(DnsError::Truncated(at))
}

/// Reads the name at `at`; returns it (lower-case, dotted) and the offset after
/// it in the original position.
fn read_name(b: &[u8], at: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut pos = at;
    let mut end = None;
    let mut hops = 0;
    loop {
        let len = *b.get(pos).ok_or(DnsError::Truncated(pos))?;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    let after = pos + 1;
                    return Ok((name, end.unwrap_or(after)));
                }
                let l = usize::from(len);
                let label = b.get(pos + 1..pos + 1 + l).ok_or(DnsError::Truncated(pos))?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &c in label {
                    if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                        return Err(DnsError::BadName(pos));
                    }
                    name.push(char::from(c.to_ascii_lowercase()));
                }
                if name.len() > 253 {
                    return Err(DnsError::BadName(pos));
                }
                pos += 1 + l;
            }
            0xc0 => {
                let target = usize::from(be16(b, pos)? & 0x3fff);
                hops += 1;
                if hops > MAX_POINTERS || target >= pos {
                    return Err(DnsError::BadName(pos));
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return Err(DnsError::BadName(pos)),
        }
    }
}

fn check_size(b: &[u8]) -> Result<(), DnsError> {
    if b.len() < 12 || b.len() > MAX_MESSAGE {
        return Err(DnsError::Size(b.len()));
    }
    Ok(())
}

/// Parses a standard query (QR=0, opcode 0, one question, no answers).
pub fn parse_query(b: &[u8]) -> Result<Query, DnsError> {
    check_size(b)?;
    let flags = be16(b, 2)?;
    let (qd, an, ns) = (be16(b, 4)?, be16(b, 6)?, be16(b, 8)?);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qd != 1 || an != 0 || ns != 0 {
        return Err(DnsError::NotAQuery);
    }
    let (name, after) = read_name(b, 12)?;
    Ok(Query {
        id: be16(b, 0)?,
        name,
        qtype: be16(b, after)?,
        qclass: be16(b, after + 2)?,
        question_end: after + 4,
    })
}

/// Parses the response to `q`: same id, QR=1, same question; collects the A
/// records of the question name and of the names it is a CNAME of.
pub fn parse_response(b: &[u8], q: &Query) -> Result<Response, DnsError> {
    check_size(b)?;
    let id = be16(b, 0)?;
    let flags = be16(b, 2)?;
    if id != q.id || flags & 0x8000 == 0 || be16(b, 4)? != 1 {
        return Err(DnsError::NotTheResponse);
    }
    let (qname, after) = read_name(b, 12)?;
    if qname != q.name || be16(b, after)? != q.qtype {
        return Err(DnsError::NotTheResponse);
    }
    let ancount = usize::from(be16(b, 6)?).min(MAX_RECORDS);
    let mut pos = after + 4;
    let mut records = Vec::new();
    for _ in 0..ancount {
        let (owner, p) = read_name(b, pos)?;
        let rtype = be16(b, p)?;
        let class = be16(b, p + 2)?;
        let ttl = be32(b, p + 4)?;
        let rdlen = usize::from(be16(b, p + 8)?);
        let rdata_at = p + 10;
        let rdata = b.get(rdata_at..rdata_at + rdlen).ok_or(DnsError::Truncated(rdata_at))?;
        if class == CLASS_IN {
            match rtype {
                TYPE_A if rdlen == 4 => {
                    records.push((
                        owner,
                        Rdata::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
                        ttl,
                    ));
                }
                TYPE_CNAME => {
                    let (target, _) = read_name(b, rdata_at)?;
                    records.push((owner, Rdata::Cname(target), ttl));
                }
                _ => {}
            }
        }
        pos = rdata_at + rdlen;
    }
    // Follow the CNAME chain from the question name (bounded by the record count).
    let mut names = vec![q.name.clone()];
    for _ in 0..records.len() {
        let next = records.iter().find_map(|(o, r, _)| match r {
            Rdata::Cname(t) if names.contains(o) && !names.contains(t) => Some(t.clone()),
            _ => None,
        });
        match next {
            Some(t) => names.push(t),
            None => break,
        }
    }
    let addrs = records
        .iter()
        .filter_map(|(o, r, ttl)| match r {
            Rdata::A(a) if names.contains(o) => Some((*a, *ttl)),
            _ => None,
        })
        .collect();
    Ok(Response { id, rcode: u8::try_from(flags & 0xf).unwrap_or(0), addrs })
}

enum Rdata {
    A(Ipv4Addr),
    Cname(String),
}

/// An answer to `query` (the bytes received) with `rcode` and the given A
/// records for the question name, no other section. Used by the resolver for
/// refusals (NXDOMAIN, NODATA) and by test zones.
pub fn build_answer(query: &[u8], q: &Query, rcode: u8, addrs: &[(Ipv4Addr, u32)]) -> Vec<u8> {
    let mut m = query[..q.question_end].to_vec();
    let rd = be16(query, 2).unwrap_or(0) & 0x0100;
    // QR, RD as asked, RA, rcode.
    let flags = 0x8000 | rd | 0x0080 | u16::from(rcode & 0xf);
    m[2..4].copy_from_slice(&flags.to_be_bytes());
    let an = u16::try_from(addrs.len()).unwrap_or(0);
    m[6..8].copy_from_slice(&an.to_be_bytes());
    m[8..12].copy_from_slice(&[0, 0, 0, 0]);
    for (a, ttl) in addrs {
        m.extend_from_slice(&[0xc0, 12]); // pointer to the question name
        m.extend_from_slice(&TYPE_A.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&a.octets());
    }
    m
}

/// A query for `name` (A unless `qtype` says otherwise), recursion desired.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + name.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(u8::try_from(label.len()).unwrap_or(63));
        m.extend_from_slice(label.as_bytes());
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
    fn query_round_trip() {
        let b = build_query(0x1234, "WWW.Example.com", TYPE_A);
        let q = parse_query(&b).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype, q.qclass),
            (0x1234, "www.example.com", TYPE_A, CLASS_IN)
        );
        assert_eq!(q.question_end, b.len());
    }

    #[test]
    fn answers_parse_back_and_follow_cnames() {
        let b = build_query(7, "a.test", TYPE_A);
        let q = parse_query(&b).unwrap();
        let r = build_answer(&b, &q, RCODE_NOERROR, &[("10.0.0.1".parse().unwrap(), 60)]);
        let p = parse_response(&r, &q).unwrap();
        assert_eq!(p.addrs, vec![("10.0.0.1".parse().unwrap(), 60)]);
        // a.test CNAME b.test; b.test A 10.0.0.2; c.test A 10.0.0.3 (unrelated).
        let mut m = build_answer(&b, &q, RCODE_NOERROR, &[]);
        m[7] = 3;
        m.extend_from_slice(&[
            0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 8, 1, b'b', 4, b't', b'e', b's', b't', 0,
        ]);
        let b_at = m.len() - 8;
        m.extend_from_slice(&[
            0xc0,
            u8::try_from(b_at).unwrap(),
            0,
            1,
            0,
            1,
            0,
            0,
            0,
            40,
            0,
            4,
            10,
            0,
            0,
            2,
        ]);
        m.extend_from_slice(&[
            1, b'c', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1, 0, 0, 0, 40, 0, 4, 10, 0, 0, 3,
        ]);
        let p = parse_response(&m, &q).unwrap();
        assert_eq!(p.addrs, vec![("10.0.0.2".parse().unwrap(), 40)]);
    }

    #[test]
    fn hostile_messages_are_refused() {
        let b = build_query(7, "a.test", TYPE_A);
        let q = parse_query(&b).unwrap();
        assert_eq!(parse_query(&b[..11]), Err(DnsError::Size(11)));
        assert!(parse_query(&b[..15]).is_err());
        // A self-pointing name.
        let mut loopy = b.clone();
        loopy[12] = 0xc0;
        loopy[13] = 12;
        assert!(matches!(parse_query(&loopy), Err(DnsError::BadName(_))));
        // A response with another id, or to another name.
        let mut r = build_answer(&b, &q, 0, &[]);
        r[1] ^= 1;
        assert_eq!(parse_response(&r, &q), Err(DnsError::NotTheResponse));
        // A record running past the end.
        let mut r = build_answer(&b, &q, 0, &[("1.2.3.4".parse().unwrap(), 1)]);
        r.truncate(r.len() - 2);
        assert!(matches!(parse_response(&r, &q), Err(DnsError::Truncated(_))));
        // Responses are not queries.
        assert_eq!(parse_query(&build_answer(&b, &q, 0, &[])), Err(DnsError::NotAQuery));
        // Bad label bytes.
        let mut bad = b.clone();
        bad[13] = b'/';
        assert!(matches!(parse_query(&bad), Err(DnsError::BadName(_))));
        assert_eq!(parse_query(&vec![0; MAX_MESSAGE + 1]), Err(DnsError::Size(MAX_MESSAGE + 1)));
    }
}
