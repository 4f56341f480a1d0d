//! Conntrack scrubbing through ctnetlink (NETLINK_NETFILTER): flush a slot's
//! namespace, and delete the entries of the host namespace that involve a slot's
//! address, so the next sandbox in the slot inherits no connection state. Call
//! these inside the namespace (see [`crate::netns::NsHandle::run`]).

use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
/// Entries deleted per call at most (a dump is bounded too).
pub const MAX_ENTRIES: usize = 65536;

/// Errors of conntrack operations.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("ctnetlink {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ConntrackError {
    move |source| ConntrackError::Io { what, source }
}

fn message(kind: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_INET, version 0, res_id 0.
    m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

fn open() -> Result<Socket, ConntrackError> {
    let mut s = Socket::new(NETLINK_NETFILTER).map_err(io("socket"))?;
    s.bind_auto().map_err(io("bind"))?;
    s.connect(&SocketAddr::new(0, 0)).map_err(io("connect"))?;
    Ok(s)
}

/// Netlink messages in a buffer: (type, payload after the netlink header).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(at..at + 16)?;
        let len = usize::try_from(u32::from_ne_bytes([h[0], h[1], h[2], h[3]])).ok()?;
        if len < 16 || at + len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let payload = &buf[at + 16..at + len];
        at += (len + 3) & !3;
        Some((kind, payload))
    })
}

/// Attributes in a buffer: (type without flags, payload, whole attribute bytes).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(at..at + 4)?;
        let len = usize::from(u16::from_ne_bytes([h[0], h[1]]));
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([h[2], h[3]]) & !NLA_F_NESTED;
        let whole = &buf[at..at + len];
        at += (len + 3) & !3;
        Some((kind, &whole[4..], whole))
    })
}

fn wait_ack(s: &Socket) -> Result<(), ConntrackError> {
    let (buf, _) = s.recv_from_full().map_err(io("receive"))?;
    for (kind, payload) in messages(&buf) {
        if kind == NLMSG_ERROR && payload.len() >= 4 {
            let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
            // ENOENT: the entry went away meanwhile; fine.
            if code != 0 && code != -libc::ENOENT {
                return Err(io("request")(std::io::Error::from_raw_os_error(-code)));
            }
        }
    }
    Ok(())
}

/// Flushes every IPv4 conntrack entry of the calling thread's namespace.
pub fn flush() -> Result<(), ConntrackError> {
    let s = open()?;
    s.send(&message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 1, &[]), 0)
        .map_err(io("send flush"))?;
    wait_ack(&s)
}

/// The (source, destination) addresses of a tuple nest.
fn tuple_addrs(tuple: &[u8]) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
    let mut out = (None, None);
    for (k, ip, _) in attrs(tuple) {
        if k != CTA_TUPLE_IP {
            continue;
        }
        for (k, v, _) in attrs(ip) {
            let a = (v.len() == 4).then(|| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
            match k {
                CTA_IP_V4_SRC => out.0 = a,
                CTA_IP_V4_DST => out.1 = a,
                _ => {}
            }
        }
    }
    out
}

/// From a dump, the original tuples (whole attributes) of entries whose either
/// tuple involves `addr`.
fn matching_tuples(buf: &[u8], addr: Ipv4Addr, out: &mut Vec<Vec<u8>>) -> bool {
    let mut done = false;
    for (kind, payload) in messages(buf) {
        if kind == NLMSG_DONE || kind == NLMSG_ERROR {
            done = true;
            continue;
        }
        let Some(body) = payload.get(4..) else { continue };
        let mut orig = None;
        let mut hit = false;
        for (k, v, whole) in attrs(body) {
            if k == CTA_TUPLE_ORIG || k == CTA_TUPLE_REPLY {
                let (s, d) = tuple_addrs(v);
                hit |= s == Some(addr) || d == Some(addr);
                if k == CTA_TUPLE_ORIG {
                    orig = Some(whole.to_vec());
                }
            }
        }
        if let (true, Some(t)) = (hit, orig) {
            if out.len() < MAX_ENTRIES {
                out.push(t);
            }
        }
    }
    done
}

/// The original tuples of the entries in the calling thread's namespace that
/// involve `addr` (at most `MAX_ENTRIES`), read from a dump on `s`.
fn dump_involving(s: &Socket, addr: Ipv4Addr) -> Result<Vec<Vec<u8>>, ConntrackError> {
    s.send(&message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, &[]), 0)
        .map_err(io("send dump"))?;
    let mut tuples = Vec::new();
    loop {
        let (buf, _) = s.recv_from_full().map_err(io("receive dump"))?;
        if buf.is_empty() || matching_tuples(&buf, addr, &mut tuples) {
            break;
        }
    }
    Ok(tuples)
}

/// How many conntrack entries of the calling thread's namespace have `addr` as
/// source or destination in either tuple (what [`delete_involving`] would delete).
pub fn count_involving(addr: Ipv4Addr) -> Result<usize, ConntrackError> {
    Ok(dump_involving(&open()?, addr)?.len())
}

/// Deletes the conntrack entries of the calling thread's namespace whose
/// original or reply tuple has `addr` as source or destination; returns how many.
pub fn delete_involving(addr: Ipv4Addr) -> Result<usize, ConntrackError> {
    let s = open()?;
    let tuples = dump_involving(&s, addr)?;
    for (i, t) in tuples.iter().enumerate() {
        let seq = u32::try_from(i + 2).unwrap_or(u32::MAX);
        s.send(&message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, t), 0)
            .map_err(io("send delete"))?;
        wait_ack(&s)?;
    }
    Ok(tuples.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + payload.len()).unwrap().to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn tuple(kind: u16, s: [u8; 4], d: [u8; 4]) -> Vec<u8> {
        let ip = [attr(CTA_IP_V4_SRC, &s), attr(CTA_IP_V4_DST, &d)].concat();
        attr(kind | NLA_F_NESTED, &attr(CTA_TUPLE_IP | NLA_F_NESTED, &ip))
    }

    #[test]
    fn dumps_are_filtered_by_address_in_either_tuple() {
        let e1 = [
            tuple(CTA_TUPLE_ORIG, [10, 0, 0, 2], [1, 1, 1, 1]),
            tuple(CTA_TUPLE_REPLY, [1, 1, 1, 1], [10, 0, 0, 2]),
        ]
        .concat();
        let e2 = [
            tuple(CTA_TUPLE_ORIG, [10, 0, 0, 9], [1, 1, 1, 1]),
            tuple(CTA_TUPLE_REPLY, [1, 1, 1, 1], [10, 0, 0, 9]),
        ]
        .concat();
        let e3 = [
            tuple(CTA_TUPLE_ORIG, [1, 1, 1, 1], [5, 5, 5, 5]),
            tuple(CTA_TUPLE_REPLY, [10, 0, 0, 2], [1, 1, 1, 1]),
        ]
        .concat();
        let mut buf = Vec::new();
        for e in [&e1, &e2, &e3] {
            buf.extend_from_slice(&message(0, 0, 0, e));
        }
        let mut hdr = message(0, 0, 0, &[]);
        hdr[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf.extend_from_slice(&hdr);
        let mut out = Vec::new();
        assert!(matching_tuples(&buf, Ipv4Addr::new(10, 0, 0, 2), &mut out));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], tuple(CTA_TUPLE_ORIG, [10, 0, 0, 2], [1, 1, 1, 1]));
        // Truncated input stops parsing without panicking.
        for i in 0..buf.len() {
            let mut o = Vec::new();
            let _ = matching_tuples(&buf[..i], Ipv4Addr::new(10, 0, 0, 2), &mut o);
        }
    }
}
