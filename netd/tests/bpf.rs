//! The C programs' logic, unit-tested with BPF_PROG_TEST_RUN on crafted packets
//! (nothing attached, no traffic), and the load errors of a refused program.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::net::Ipv4Addr;

use aya::Ebpf;
use grove_netd::dataplane::maps::{CidrVal, DynVal, SlotCfg, ACT_DENY, DIR_EGRESS};
use grove_netd::dataplane::{
    self, ip_key, monotonic_ns, program_fd, test_run, DataplaneError, DropReason, SlotMaps,
    EGRESS_PROGRAM, INGRESS_PROGRAM, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};
use grove_netd::packet::{self, checksum, Endpoints, PROTO_UDP};

const GUEST: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 2);
const GW: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
const SLOT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const GUEST_MAC: [u8; 6] = [2, 0x67, 0x72, 0, 0, 2];
const TAP_MAC: [u8; 6] = [2, 0x67, 0x72, 0, 0, 1];
const VETH_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xbb];

/// Programs loaded with their maps pinned in a directory removed on drop.
struct Loaded {
    bpf: Ebpf,
    maps: SlotMaps,
    dir: std::path::PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Ok(d) = std::fs::read_dir(&self.dir) {
            for f in d.flatten() {
                let _ = std::fs::remove_file(f.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn load(test: &str) -> Option<Loaded> {
    if !common::host_ready(test) {
        return None;
    }
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/grove/{}", common::unique_prefix()));
    let bpf = dataplane::load(dataplane::SLOT_OBJECT, &dir, &[EGRESS_PROGRAM, INGRESS_PROGRAM])
        .expect("programs load");
    let mut maps = SlotMaps::open(&dir).unwrap();
    maps.set_config(&SlotCfg {
        guest_ip: ip_key(GUEST),
        slot_ip: ip_key(SLOT),
        gw_ip: ip_key(GW),
        tap_ifindex: 11,
        veth_ifindex: 12,
        guest_mac: GUEST_MAC,
        tap_mac: TAP_MAC,
        veth_mac: VETH_MAC,
        host_mac: HOST_MAC,
        default_allow: 1,
        enabled: 1,
        pad: [0; 6],
    })
    .unwrap();
    Some(Loaded { bpf, maps, dir })
}

impl Loaded {
    fn run(&self, prog: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
        let r = test_run(program_fd(&self.bpf, prog).unwrap(), frame, 1).expect("test run");
        (r.retval, r.data)
    }
    fn egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(EGRESS_PROGRAM, frame)
    }
    fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(INGRESS_PROGRAM, frame)
    }
    fn drops(&self, r: DropReason) -> (u64, u64) {
        let c = self.maps.counters().unwrap();
        (c.egress.dropped(r), c.ingress.dropped(r))
    }
}

fn from_guest(dst: Ipv4Addr) -> Endpoints {
    Endpoints { src_mac: GUEST_MAC, dst_mac: TAP_MAC, src_ip: GUEST, dst_ip: dst }
}

fn to_slot(src: Ipv4Addr) -> Endpoints {
    Endpoints { src_mac: HOST_MAC, dst_mac: VETH_MAC, src_ip: src, dst_ip: SLOT }
}

/// Rewrites the IPv4 flags/fragment field and fixes the header checksum.
fn set_frag(frame: &mut [u8], frag: u16) {
    frame[20..22].copy_from_slice(&frag.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn egress_nat_rewrites_source_macs_and_checksums() {
    let Some(l) = load("egress_nat_rewrites_source_macs_and_checksums") else { return };
    for frame in [
        packet::udp_frame(&from_guest(REMOTE), 1234, 80, b"payload"),
        packet::tcp_frame(&from_guest(REMOTE), 1234, 80, 99, 0x18, b"data"),
        packet::icmp_echo_frame(&from_guest(REMOTE), 1, 1),
    ] {
        let (rv, out) = l.egress(&frame);
        assert_eq!(rv, TC_ACT_REDIRECT);
        let p = packet::parse(&out).unwrap();
        assert_eq!((p.src_ip, p.dst_ip), (SLOT, REMOTE));
        assert_eq!((p.src_mac, p.dst_mac), (VETH_MAC, HOST_MAC));
        assert!(p.ip_csum_ok && p.l4_csum_ok, "{p:?}");
        assert_eq!(out.len(), frame.len());
    }
    let c = l.maps.counters().unwrap();
    assert_eq!(c.egress.packets, 3);
}

#[test]
fn ingress_nat_rewrites_destination_and_exposed_ports() {
    let Some(mut l) = load("ingress_nat_rewrites_destination_and_exposed_ports") else { return };
    l.maps.set_exposures(&[(PROTO_UDP, 8080, 80)]).unwrap();
    let (rv, out) = l.ingress(&packet::udp_frame(&to_slot(REMOTE), 5000, 8080, b"in"));
    assert_eq!(rv, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.src_ip, p.dst_ip, p.ports), (REMOTE, GUEST, Some((5000, 80))));
    assert_eq!((p.src_mac, p.dst_mac), (TAP_MAC, GUEST_MAC));
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    // The guest's answer from port 80 leaves from slot port 8080.
    let (rv, out) = l.egress(&packet::udp_frame(&from_guest(REMOTE), 80, 5000, b"out"));
    assert_eq!(rv, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.src_ip, p.ports), (SLOT, Some((8080, 5000))));
    assert!(p.l4_csum_ok);
    // Not for the slot address: left to the slot namespace.
    let other = Endpoints { dst_ip: Ipv4Addr::new(10, 201, 0, 1), ..to_slot(REMOTE) };
    assert_eq!(l.ingress(&packet::udp_frame(&other, 1, 2, b"")).0, TC_ACT_OK);
}

#[test]
fn icmp_errors_have_their_quoted_header_translated() {
    let Some(l) = load("icmp_errors_have_their_quoted_header_translated") else { return };
    // What the guest sent, as it left the slot (source = slot address).
    let sent = packet::udp_frame(&Endpoints { src_ip: SLOT, ..from_guest(REMOTE) }, 1234, 80, b"x");
    let quoted = &sent[14..14 + 28];
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0, 0x05, 0xdc]; // fragmentation needed, MTU 1500
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let frame = packet::ipv4_frame(&to_slot(REMOTE), packet::PROTO_ICMP, &icmp, 0);
    let (rv, out) = l.ingress(&frame);
    assert_eq!(rv, TC_ACT_REDIRECT);
    let p = packet::parse(&out).unwrap();
    assert!(p.ip_csum_ok && p.l4_csum_ok, "ICMP checksum after translating the quote");
    let inner = &out[14 + 20 + 8..14 + 20 + 8 + 20];
    assert_eq!(&inner[12..16], &GUEST.octets(), "quoted source is the guest's address");
    assert_eq!(checksum(inner), 0, "quoted header checksum fixed");
}

#[test]
fn fragments_are_translated_without_touching_later_payloads() {
    let Some(l) = load("fragments_are_translated_without_touching_later_payloads") else { return };
    // First fragment (MF set, offset 0): the UDP checksum covers the whole
    // datagram, so once MF is cleared again the updated checksum must verify.
    let mut first = packet::udp_frame(&from_guest(REMOTE), 1234, 80, &[5u8; 64]);
    set_frag(&mut first, 0x2000);
    let (rv, mut out) = l.egress(&first);
    assert_eq!(rv, TC_ACT_REDIRECT);
    set_frag(&mut out, 0);
    let p = packet::parse(&out).unwrap();
    assert_eq!(p.src_ip, SLOT);
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    // A later fragment: only the IPv4 header changes.
    let mut later = packet::udp_frame(&from_guest(REMOTE), 1234, 80, &[5u8; 64]);
    set_frag(&mut later, 100);
    let (rv, out) = l.egress(&later);
    assert_eq!(rv, TC_ACT_REDIRECT);
    assert_eq!(&out[26..30], &SLOT.octets());
    assert_eq!(checksum(&out[14..34]), 0);
    assert_eq!(&out[34..], &later[34..], "bytes after the IPv4 header are untouched");
}

#[test]
fn bad_checksums_and_truncated_headers() {
    let Some(l) = load("bad_checksums_and_truncated_headers") else { return };
    let good = packet::udp_frame(&from_guest(REMOTE), 1234, 80, b"abcdef");
    // A bad IPv4 header checksum is dropped (nothing downstream would check it).
    let mut bad_ip = good.clone();
    bad_ip[24] ^= 0x55;
    assert_eq!(l.egress(&bad_ip).0, TC_ACT_SHOT);
    // A bad UDP checksum passes but stays bad: the update is incremental.
    let mut bad_udp = good.clone();
    let n = bad_udp.len();
    bad_udp[n - 1] ^= 0x01;
    let (rv, out) = l.egress(&bad_udp);
    assert_eq!(rv, TC_ACT_REDIRECT);
    assert!(!packet::parse(&out).unwrap().l4_csum_ok);
    // UDP without a checksum keeps none.
    let mut no_csum = good.clone();
    no_csum[40..42].copy_from_slice(&[0, 0]);
    let (_, out) = l.egress(&no_csum);
    assert_eq!(packet::parse(&out).unwrap().udp_csum_field, Some(0));
    // Truncations: a total length beyond the frame; a TCP header cut short;
    // IHL < 5. (BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4
    // header before running the program; on a tap the program's loads fail and
    // it drops them as malformed, the same path.)
    let tcp = packet::tcp_frame(&from_guest(REMOTE), 1, 2, 3, 0x02, &[]);
    let mut short_tcp = packet::ipv4_frame(&from_guest(REMOTE), packet::PROTO_TCP, &tcp[34..44], 0);
    short_tcp.truncate(44);
    let mut long_len = good.clone();
    long_len.truncate(good.len() - 4);
    let mut ihl = good.clone();
    ihl[14] = 0x44;
    let before = l.drops(DropReason::Malformed).0;
    for f in [&long_len[..], &short_tcp[..], &ihl[..], &bad_ip[..]] {
        assert_eq!(l.egress(f).0, TC_ACT_SHOT, "{} bytes", f.len());
    }
    assert_eq!(l.drops(DropReason::Malformed).0 - before, 4);
}

#[test]
fn guest_rules_spoofing_ipv6_dns_and_arp() {
    let Some(l) = load("guest_rules_spoofing_ipv6_dns_and_arp") else { return };
    let spoof_ip = Endpoints { src_ip: Ipv4Addr::new(172, 31, 255, 3), ..from_guest(REMOTE) };
    let spoof_mac = Endpoints { src_mac: [2, 0, 0, 0, 0, 9], ..from_guest(REMOTE) };
    assert_eq!(l.egress(&packet::udp_frame(&spoof_ip, 1, 2, b"")).0, TC_ACT_SHOT);
    assert_eq!(l.egress(&packet::udp_frame(&spoof_mac, 1, 2, b"")).0, TC_ACT_SHOT);
    assert_eq!(l.drops(DropReason::Spoof).0, 2);
    // IPv6 is dropped both ways.
    let mut v6 = vec![0u8; 14 + 40 + 8];
    v6[..6].copy_from_slice(&TAP_MAC);
    v6[6..12].copy_from_slice(&GUEST_MAC);
    v6[12..14].copy_from_slice(&packet::ETH_P_IPV6.to_be_bytes());
    v6[14] = 0x60;
    assert_eq!(l.egress(&v6).0, TC_ACT_SHOT);
    assert_eq!(l.ingress(&v6).0, TC_ACT_SHOT);
    assert_eq!(l.drops(DropReason::Ipv6), (1, 1));
    // DNS only to the gateway (the resolver); the gateway gets the stack.
    assert_eq!(l.egress(&packet::udp_frame(&from_guest(REMOTE), 3333, 53, b"q")).0, TC_ACT_SHOT);
    assert_eq!(
        l.egress(&packet::tcp_frame(&from_guest(REMOTE), 3333, 53, 1, 2, b"")).0,
        TC_ACT_SHOT
    );
    assert_eq!(l.drops(DropReason::Dns).0, 2);
    assert_eq!(l.egress(&packet::udp_frame(&from_guest(GW), 3333, 53, b"q")).0, TC_ACT_OK);
    // ARP goes to the namespace's stack; other EtherTypes are dropped.
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&packet::ETH_P_ARP.to_be_bytes());
    assert_eq!(l.egress(&arp).0, TC_ACT_OK);
    arp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    assert_eq!(l.egress(&arp).0, TC_ACT_SHOT);
    assert_eq!(l.drops(DropReason::NotIp).0, 1);
}

#[test]
fn policy_precedence_expiry_logging_and_rate() {
    let Some(mut l) = load("policy_precedence_expiry_logging_and_rate") else { return };
    let f = packet::udp_frame(&from_guest(REMOTE), 1, 443, b"x");
    // Deny 192.0.2.0/24: dropped and logged with its rule id.
    l.maps
        .cidr_insert(
            Ipv4Addr::new(192, 0, 2, 0),
            24,
            CidrVal { rule_id: 7, action: ACT_DENY, pad: [0; 3] },
        )
        .unwrap();
    assert_eq!(l.egress(&f).0, TC_ACT_SHOT);
    let d = l.maps.drain_denials();
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].remote, d[0].port, d[0].proto, d[0].rule_id, d[0].reason),
        (REMOTE, 443, 17, 7, DropReason::Policy)
    );
    // A learnt address does not open an explicit CIDR deny ...
    let live = DynVal { expires_ns: monotonic_ns() + 60_000_000_000, rule_id: 0x1_0000, pad: 0 };
    l.maps.dyn_insert(REMOTE, live).unwrap();
    assert_eq!(l.egress(&f).0, TC_ACT_SHOT);
    // ... but opens the default deny while it lives, not after it expired.
    l.maps.cidr_remove(Ipv4Addr::new(192, 0, 2, 0), 24).unwrap();
    let mut cfg = l.maps.config().unwrap();
    cfg.default_allow = 0;
    l.maps.set_config(&cfg).unwrap();
    assert_eq!(l.egress(&f).0, TC_ACT_REDIRECT);
    l.maps.dyn_insert(REMOTE, DynVal { expires_ns: monotonic_ns() - 1, ..live }).unwrap();
    assert_eq!(l.egress(&f).0, TC_ACT_SHOT);
    // Inbound from a denied address is refused too (replies only from allowed ones).
    assert_eq!(l.ingress(&packet::udp_frame(&to_slot(REMOTE), 443, 1, b"")).0, TC_ACT_SHOT);
    l.maps.drain_denials();
    // Rate: a 3000-byte burst at a negligible rate passes two 1042-byte frames.
    cfg.default_allow = 1;
    l.maps.set_config(&cfg).unwrap();
    l.maps.set_rate(DIR_EGRESS, 1, 3000).unwrap();
    let big = packet::udp_frame(&from_guest(REMOTE), 1, 443, &[0; 1000]);
    let verdicts: Vec<u32> = (0..3).map(|_| l.egress(&big).0).collect();
    assert_eq!(verdicts, vec![TC_ACT_REDIRECT, TC_ACT_REDIRECT, TC_ACT_SHOT]);
    assert_eq!(l.drops(DropReason::Rate).0, 1);
    // Disabled slot: everything dropped as unconfigured.
    cfg.enabled = 0;
    l.maps.set_config(&cfg).unwrap();
    assert_eq!(l.egress(&f).0, TC_ACT_SHOT);
    assert_eq!(l.drops(DropReason::Unconfigured).0, 1);
}

#[test]
fn a_refused_program_names_itself_and_the_verifier_reason() {
    if !common::host_ready("a_refused_program_names_itself_and_the_verifier_reason") {
        return;
    }
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/grove/{}", common::unique_prefix()));
    let err = dataplane::load(dataplane::BAD_OBJECT, &dir, &["grove_bad"]).unwrap_err();
    let _ = std::fs::remove_dir(&dir);
    let msg = err.to_string();
    assert!(msg.contains("grove_bad"), "{msg}");
    match err {
        DataplaneError::ProgramLoad { program, reason, log, .. } => {
            assert_eq!(program, "grove_bad");
            assert!(
                reason.contains("invalid access to packet")
                    || reason.contains("outside of the packet"),
                "{reason}\n{log}"
            );
            assert!(msg.contains(&reason));
        }
        other => panic!("not a load error: {other:?}"),
    }
}
