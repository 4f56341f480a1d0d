//! Mock-driver tests of the vsock device: handshakes both ways, data and credit, closing,
//! refusals, malformed packets, limits, a flooding guest and a host peer that never reads.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::Bytes;

use super::connection::State;
use super::device::Vsock;
use super::packet::{op, Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_SEND};
use super::test_utils::{to_host, MockGuest, CID, RX_BUF};
use super::{CONN_BUF, MAX_CONNECTIONS, TX_QUEUE};
use crate::devices::virtio::VirtioDevice;

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Reads what is there without waiting.
fn read_now(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 65536];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    out
}

/// Whether the stream ends (EOF or reset; unread data before is skipped).
fn eof(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn host_connects_data_flows_both_ways_and_the_guest_closes() {
    let mut g = MockGuest::new();
    let (mut s, hport) = g.host_connect(1024);
    assert_eq!(g.dev.backend().connections(), 1);
    // Host to guest.
    s.write_all(b"hello guest").unwrap();
    g.host_events();
    let (h, data) = g.expect_one(op::RW);
    assert_eq!((h.src_port, h.dst_port, h.src_cid, h.dst_cid), (hport, 1024, HOST_CID, CID));
    assert_eq!(data, b"hello guest");
    assert_eq!(h.buf_alloc, CONN_BUF);
    // Guest to host.
    g.send(to_host(op::RW, 1024, hport), b"hello host");
    assert_eq!(read_exact_timeout(&mut s, 10), b"hello host");
    assert!(g.rx().is_empty(), "no credit update for 10 bytes");
    // The guest closes: the device answers with a RST and the host sees the end.
    g.send(Header { flags: SHUTDOWN_BOTH, ..to_host(op::SHUTDOWN, 1024, hport) }, &[]);
    let (rst, _) = g.expect_one(op::RST);
    assert_eq!(rst.dst_port, 1024);
    assert!(eof(&mut s));
    assert_eq!(g.dev.backend().connections(), 0);
    let m = g.dev.metrics().snapshot();
    assert_eq!((m.host_connections, m.closed, m.malformed), (1, 1, 0));
    assert_eq!(m.rx_bytes, 11);
    assert_eq!(m.tx_bytes, 10);
    assert!(g.irq.status() != 0, "interrupts raised");
}

#[test]
fn guest_connects_to_a_host_listener_and_the_host_hangs_up() {
    let mut g = MockGuest::new();
    let l = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
    g.post_rx(8);
    g.send(to_host(op::REQUEST, 777, 5000), &[]);
    let (h, _) = g.expect_one(op::RESPONSE);
    assert_eq!((h.src_port, h.dst_port), (5000, 777));
    let (mut s, _) = l.accept().unwrap();
    g.send(to_host(op::RW, 777, 5000), b"ping");
    assert_eq!(read_exact_timeout(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    drop(s);
    g.host_events();
    let got = g.rx();
    let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![op::RW, op::SHUTDOWN], "the data, then the end: {got:?}");
    assert_eq!(got[0].1, b"pong");
    assert_eq!(got[1].0.flags, SHUTDOWN_BOTH, "the host is gone both ways");
    // The guest acknowledges with a RST: the connection is gone.
    g.send(to_host(op::RST, 777, 5000), &[]);
    assert!(g.rx().is_empty(), "no answer to a RST");
    assert_eq!(g.dev.backend().connections(), 0);
    assert_eq!(g.dev.metrics().snapshot().guest_connections, 1);
}

#[test]
fn half_close_from_the_host_keeps_the_other_direction() {
    let mut g = MockGuest::new();
    let (mut s, hport) = g.host_connect(1024);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    g.host_events();
    let (h, _) = g.expect_one(op::SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND, "the host sends no more, but still reads");
    g.send(to_host(op::RW, 1024, hport), b"still here");
    assert_eq!(read_exact_timeout(&mut s, 10), b"still here");
    // Guest half-closes too: the host reads the end of the stream.
    g.send(Header { flags: SHUTDOWN_SEND, ..to_host(op::SHUTDOWN, 1024, hport) }, &[]);
    assert!(eof(&mut s));
}

#[test]
fn refused_connections() {
    let mut g = MockGuest::new();
    g.post_rx(8);
    // Nothing listens at uds_6000: RST.
    g.send(to_host(op::REQUEST, 1, 6000), &[]);
    let (h, _) = g.expect_one(op::RST);
    assert_eq!((h.src_port, h.dst_port), (6000, 1));
    // The guest refuses a host connection: the host stream ends without "OK".
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    g.host_events();
    let (req, _) = g.expect_one(op::REQUEST);
    g.send(to_host(op::RST, 99, req.src_port), &[]);
    assert!(eof(&mut s));
    // Malformed CONNECT lines are closed at once.
    for line in [
        &b"CONNECT\n"[..],
        b"CONNECT -1\n",
        b"CONNECT 99999999999\n",
        b"connect 5\n",
        b"CONNECT 1 \n",
        &[b'x'; 40],
    ] {
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(line).unwrap();
        g.host_events();
        assert!(eof(&mut s), "{:?}", String::from_utf8_lossy(line));
    }
    assert!(g.rx().is_empty(), "the guest heard of none of them");
    assert_eq!(g.dev.backend().connections(), 0);
    assert_eq!(g.dev.backend().handshakes(), 0);
    assert_eq!(g.dev.metrics().snapshot().refused, 8);
}

#[test]
fn a_driver_that_is_not_ready_refuses_host_connections() {
    let mut g = MockGuest::new();
    g.dev.reset();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    g.host_events();
    assert!(eof(&mut s));
}

#[test]
fn connect_line_may_come_in_pieces_and_data_after_ok_is_kept() {
    let mut g = MockGuest::new();
    g.post_rx(4);
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    g.host_events();
    assert!(g.rx().is_empty());
    assert_eq!(g.dev.backend().handshakes(), 1);
    s.write_all(b"ECT 1024\n").unwrap();
    g.host_events();
    let (req, _) = g.expect_one(op::REQUEST);
    g.send(to_host(op::RESPONSE, 1024, req.src_port), &[]);
    assert_eq!(
        read_exact_timeout(&mut s, 3 + req.src_port.to_string().len() + 1),
        format!("OK {}\n", req.src_port).as_bytes()
    );
}

#[test]
fn malformed_packets_get_a_rst_or_are_dropped() {
    let mut g = MockGuest::new();
    let (mut s, hport) = g.host_connect(1024);
    g.post_rx(16);
    let good = to_host(op::RW, 1024, hport);
    // A foreign source cid: dropped without an answer, the connection is untouched.
    g.send(Header { src_cid: 9, ..good }, b"x");
    assert!(g.rx().is_empty());
    assert_eq!(g.dev.backend().connections(), 1);
    // Header errors on unknown ports: a RST each.
    let stray = to_host(op::RW, 5, 6);
    for bad in [
        Header { type_: 2, ..stray },
        Header { op: 0, ..stray },
        Header { op: 99, ..stray },
        Header { dst_cid: 7, ..stray },
        Header { op: op::REQUEST, flags: 1, ..stray },
        Header { op: op::SHUTDOWN, flags: 0, ..stray },
        Header { op: op::SHUTDOWN, flags: 8, ..stray },
    ] {
        g.send(bad, &[]);
        let (h, _) = g.expect_one(op::RST);
        assert_eq!((h.src_port, h.dst_port), (6, 5));
    }
    // Payload on a control packet, on the live connection: RST, and it ends.
    g.send(to_host(op::CREDIT_UPDATE, 1024, hport), b"junk");
    g.expect_one(op::RST);
    assert_eq!(g.dev.backend().connections(), 0);
    assert!(eof(&mut s));
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.malformed, 9);
    assert_eq!(m.tx_packets, 1, "only the RESPONSE was well formed");
}

#[test]
fn malformed_chains_are_returned_and_answered_where_a_header_exists() {
    let mut g = MockGuest::new();
    g.post_rx(8);
    let mut h = to_host(op::RW, 5, 6);
    // Header claims 100 bytes, chain carries 10: RST.
    h.len = 100;
    let a = g.alloc(64);
    g.mem().write_slice(&h.to_bytes(), vm_memory::GuestAddress(a)).unwrap();
    let p = g.alloc(64);
    g.add_chain(TX_QUEUE, &[(a, HDR_LEN as u32, false), (p, 10, false)]);
    // Header claims more than 64 KiB: RST.
    h.len = MAX_PAYLOAD + 1;
    let b = g.alloc(64);
    g.mem().write_slice(&h.to_bytes(), vm_memory::GuestAddress(b)).unwrap();
    let big = g.alloc(u64::from(MAX_PAYLOAD) + 64);
    g.add_chain(TX_QUEUE, &[(b, HDR_LEN as u32, false), (big, MAX_PAYLOAD + 1, false)]);
    // No answer possible: shorter than a header, a device-writable buffer, outside memory.
    let c = g.alloc(64);
    g.add_chain(TX_QUEUE, &[(c, 20, false)]);
    g.add_chain(TX_QUEUE, &[(c, HDR_LEN as u32, true)]);
    g.add_chain(TX_QUEUE, &[(1 << 40, HDR_LEN as u32, false)]);
    g.dev.serve(|d| d.process_tx() | d.process_rx());
    let used = g.used(TX_QUEUE);
    assert_eq!(used.len(), 5, "every chain is returned");
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(g.rx_ops(), vec![op::RST, op::RST]);
    assert_eq!(g.dev.metrics().snapshot().malformed, 5);
}

#[test]
fn a_header_split_across_buffers_and_sharing_one_with_the_payload_parses() {
    let mut g = MockGuest::new();
    let (mut s, hport) = g.host_connect(1024);
    let mut h = to_host(op::RW, 1024, hport);
    h.len = 6;
    let mut bytes = h.to_bytes().to_vec();
    bytes.extend_from_slice(b"abcdef");
    let a = g.alloc(128);
    g.mem().write_slice(&bytes, vm_memory::GuestAddress(a)).unwrap();
    // 10 + 40 (header ends, 6 payload bytes follow in the same buffer).
    g.add_chain(TX_QUEUE, &[(a, 10, false), (a + 10, 40, false)]);
    g.dev.serve(Vsock::process_tx);
    assert_eq!(read_exact_timeout(&mut s, 6), b"abcdef");
}

#[test]
fn host_to_guest_data_stays_within_the_guests_credit() {
    let mut g = MockGuest::new();
    let l = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
    g.post_rx(64);
    let small = Header { buf_alloc: 8192, ..to_host(op::REQUEST, 40, 5000) };
    let small_update = Header { op: op::CREDIT_UPDATE, ..small };
    g.send(small, &[]);
    g.expect_one(op::RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&vec![7u8; 64 * 1024]).unwrap();
    g.host_events();
    let got = g.rx();
    let data: usize = got.iter().filter(|(h, _)| h.op == op::RW).map(|(_, d)| d.len()).sum();
    assert_eq!(data, 8192, "exactly the credit");
    assert!(got.iter().all(|(_, d)| d.len() <= RX_BUF as usize), "each packet fits its buffer");
    assert_eq!(got.last().unwrap().0.op, op::CREDIT_REQUEST, "then it asks for credit, once");
    g.host_events();
    assert!(g.rx().is_empty(), "nothing more without credit");
    // The guest read 8 KiB: the next 8 KiB come.
    g.send(Header { fwd_cnt: 8192, ..small_update }, &[]);
    let data: usize = g.rx().iter().filter(|(h, _)| h.op == op::RW).map(|(_, d)| d.len()).sum();
    assert_eq!(data, 8192);
    // A fwd_cnt past what was sent is a violation.
    g.send(Header { fwd_cnt: 1 << 20, ..small_update }, &[]);
    g.expect_one(op::RST);
    assert_eq!(g.dev.metrics().snapshot().violations, 1);
}

/// The guest sends on guest port 1024 (to host port `hport`), `sent` bytes already, as far as
/// its credit allows: until the device holds CONN_BUF the host has not taken. Returns the
/// bytes sent and the last `fwd_cnt` the device reported.
fn spend_credit(g: &mut MockGuest, hport: u32, mut sent: u64) -> (u64, u32) {
    let chunk = vec![7u8; MAX_PAYLOAD as usize];
    let mut fwd = 0u32;
    for _ in 0..64 {
        for (h, _) in g.rx() {
            if h.dst_port == 1024 {
                fwd = h.fwd_cnt;
            }
        }
        let credit = u64::from(CONN_BUF) - (sent - u64::from(fwd));
        if credit == 0 {
            break;
        }
        let n = credit.min(u64::from(MAX_PAYLOAD)) as usize;
        g.send(to_host(op::RW, 1024, hport), &chunk[..n]);
        sent += n as u64;
    }
    (sent, fwd)
}

#[test]
fn a_host_peer_that_never_reads_bounds_the_buffer_and_stalls_only_its_connection() {
    let mut g = MockGuest::new();
    let (slow, hport) = g.host_connect(1024);
    let (mut fast, fport) = g.host_connect(1025);
    g.post_rx(64);
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    // The guest sends within its credit: 256 KiB, which the unix socket partly takes.
    for _ in 0..(CONN_BUF / MAX_PAYLOAD) {
        g.send(to_host(op::RW, 1024, hport), &chunk);
    }
    // Whatever the socket took was credited back; the guest keeps sending only what its
    // credit allows, which stops once the device holds CONN_BUF.
    let (sent, fwd) = spend_credit(&mut g, hport, u64::from(CONN_BUF));
    assert_eq!(sent - u64::from(fwd), u64::from(CONN_BUF), "the guest's credit is used up");
    // The other connection is served as usual.
    g.send(to_host(op::RW, 1025, fport), b"still served");
    assert_eq!(read_exact_timeout(&mut fast, 12), b"still served");
    // Past its credit, the guest is reset; the held bytes never exceeded CONN_BUF.
    g.send(to_host(op::RW, 1024, hport), b"x");
    let ops = g.rx_ops();
    assert!(ops.contains(&op::RST), "{ops:?}");
    assert_eq!(g.dev.metrics().snapshot().violations, 1);
    assert_eq!(g.dev.backend().connections(), 1);
    drop(slow);
}

#[test]
fn a_flooding_guest_is_served_one_queue_at_a_time() {
    let mut g = MockGuest::new();
    g.post_rx(4);
    // 300 credit requests for unknown ports: each wants a RST.
    for i in 0..250 {
        g.queue_tx(to_host(op::CREDIT_REQUEST, 1000 + i, 9), &[]);
    }
    let kicked = |g: &MockGuest| g.dev.queue_events()[TX_QUEUE].read().is_ok();
    let _ = kicked(&g);
    g.dev.serve(|d| d.process_tx() | d.process_rx());
    assert_eq!(g.used(TX_QUEUE).len(), 250);
    assert_eq!(g.rx_ops(), vec![op::RST; 4], "as many RSTs as receive buffers");
    // The rest wait (bounded), and go out as buffers come.
    g.post_rx(100);
    g.dev.serve(Vsock::process_rx);
    assert_eq!(g.rx().len(), 100);
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.rsts_dropped, 0);
    // Beyond the orphan-RST limit they are dropped.
    for i in 0..250 {
        g.queue_tx(to_host(op::CREDIT_REQUEST, 2000 + i, 9), &[]);
    }
    g.dev.serve(Vsock::process_tx);
    assert!(g.dev.metrics().snapshot().rsts_dropped > 0);
}

#[test]
fn the_connection_limit_holds() {
    let mut g = MockGuest::new();
    let l = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
    l.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    let mut ops = Vec::new();
    for i in 0..=MAX_CONNECTIONS as u32 {
        g.post_rx(1);
        g.send(to_host(op::REQUEST, 10_000 + i, 5000), &[]);
        if let Ok((s, _)) = l.accept() {
            accepted.push(s);
        }
        ops.extend(g.rx_ops());
    }
    assert_eq!(ops.iter().filter(|&&o| o == op::RESPONSE).count(), MAX_CONNECTIONS);
    assert_eq!(ops.last(), Some(&op::RST), "one too many");
    assert_eq!(g.dev.backend().connections(), MAX_CONNECTIONS);
    // A host connection is refused too.
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 1\n").unwrap();
    // One wake-up handles at most EVENTS_PER_WAKE events (the 256 streams' first edges
    // come first); the event loop comes back while the set stays readable.
    for _ in 0..3 {
        g.host_events();
    }
    assert!(eof(&mut s));
}

#[test]
fn deadlines_end_silent_handshakes_and_unanswered_connections() {
    let mut g = MockGuest::new();
    g.post_rx(4);
    let mut silent = UnixStream::connect(&g.uds).unwrap();
    g.host_events();
    let mut unanswered = UnixStream::connect(&g.uds).unwrap();
    unanswered.write_all(b"CONNECT 4\n").unwrap();
    g.host_events();
    let (req, _) = g.expect_one(op::REQUEST);
    g.dev
        .backend_mut()
        .expire_at(std::time::Instant::now() + super::CONNECT_TIMEOUT + Duration::from_secs(1));
    g.dev.serve(Vsock::process_rx);
    let (rst, _) = g.expect_one(op::RST);
    assert_eq!(rst.src_port, req.src_port);
    assert!(eof(&mut silent));
    assert!(eof(&mut unanswered));
    assert_eq!(g.dev.metrics().snapshot().timeouts, 2);
}

#[test]
fn receive_buffers_that_are_too_small_or_read_only_are_returned_unused() {
    let mut g = MockGuest::new();
    let a = g.alloc(64);
    g.add_chain(super::RX_QUEUE, &[(a, 20, true)]);
    g.add_chain(super::RX_QUEUE, &[(a, 64, false)]);
    g.send(to_host(op::REQUEST, 1, 6000), &[]);
    assert_eq!(g.used(super::RX_QUEUE), vec![(0, 0), (1, 0)]);
    assert_eq!(g.dev.metrics().snapshot().bad_rx_buffers, 2);
    // The RST still waits for a good buffer.
    g.post_rx(1);
    g.dev.serve(Vsock::process_rx);
    g.expect_one(op::RST);
}

#[test]
fn config_space_holds_the_cid_and_reset_drops_connections() {
    let mut g = MockGuest::new();
    let mut b = [0u8; 8];
    g.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut hi = [9u8; 4];
    g.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [9u8; 4];
    g.dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    let (mut s, _) = g.host_connect(1024);
    g.dev.reset();
    assert!(!g.dev.is_activated());
    assert_eq!(g.dev.backend().connections(), 0);
    assert!(eof(&mut s));
}

#[test]
fn closing_waits_for_the_host_to_take_the_last_bytes() {
    let mut g = MockGuest::new();
    let (mut s, hport) = g.host_connect(1024);
    g.post_rx(16);
    // Fill the host socket so some bytes stay in the device.
    let chunk = vec![3u8; MAX_PAYLOAD as usize];
    for _ in 0..4 {
        g.send(to_host(op::RW, 1024, hport), &chunk);
    }
    assert!(!g.rx_ops().contains(&op::RST));
    g.send(Header { flags: SHUTDOWN_BOTH, ..to_host(op::SHUTDOWN, 1024, hport) }, &[]);
    let pending = g.rx_ops();
    assert!(!pending.contains(&op::RST), "not before the host has the bytes: {pending:?}");
    // The host reads everything; the device then flushes the rest and sends the RST.
    let mut got = read_now(&mut s);
    for _ in 0..100 {
        g.host_events();
        got.extend(read_now(&mut s));
        if g.rx_ops().contains(&op::RST) {
            break;
        }
    }
    got.extend(read_now(&mut s));
    assert_eq!(got.len(), 4 * MAX_PAYLOAD as usize, "no byte lost");
    assert_eq!(g.dev.backend().connections(), 0);
}

#[test]
fn a_closing_connection_stays_while_the_host_keeps_reading() {
    let mut g = MockGuest::new();
    let (mut s, hport) = g.host_connect(1024);
    g.post_rx(16);
    // The socket full and the device holding its whole buffer (as in the test above).
    let (sent, fwd) = spend_credit(&mut g, hport, 0);
    assert_eq!(sent - u64::from(fwd), u64::from(CONN_BUF));
    let closed_at = std::time::Instant::now();
    g.send(Header { flags: SHUTDOWN_BOTH, ..to_host(op::SHUTDOWN, 1024, hport) }, &[]);
    assert!(!g.rx_ops().contains(&op::RST));
    // The host reads what its socket holds, late: the device moves more bytes, which
    // restarts the clock. (A unix socket reports writable again only once most of its
    // buffer is free, so the reader must take that much for the device to see progress.)
    std::thread::sleep(Duration::from_millis(50));
    let mut got = read_now(&mut s);
    g.host_events();
    assert_eq!(g.dev.backend().connections(), 1, "the device still holds bytes");
    // Past the first deadline but within one of the last progress: still there.
    g.dev.backend_mut().expire_at(closed_at + super::CLOSE_TIMEOUT + Duration::from_millis(10));
    g.dev.serve(Vsock::process_rx);
    assert!(!g.rx_ops().contains(&op::RST), "a reading host was cut off");
    assert_eq!(g.dev.metrics().snapshot().timeouts, 0);
    // The host reads the rest: every byte, then the RST.
    for _ in 0..100 {
        got.extend(read_now(&mut s));
        g.host_events();
        if g.rx_ops().contains(&op::RST) {
            break;
        }
    }
    got.extend(read_now(&mut s));
    assert_eq!(got.len() as u64, sent, "no byte lost");
    assert_eq!(g.dev.backend().connections(), 0);
}

#[test]
fn a_closing_connection_whose_host_stalls_is_reset_at_the_deadline() {
    let mut g = MockGuest::new();
    let (s, hport) = g.host_connect(1024);
    g.post_rx(16);
    let chunk = vec![6u8; MAX_PAYLOAD as usize];
    for _ in 0..4 {
        g.send(to_host(op::RW, 1024, hport), &chunk);
    }
    g.send(Header { flags: SHUTDOWN_BOTH, ..to_host(op::SHUTDOWN, 1024, hport) }, &[]);
    assert!(!g.rx_ops().contains(&op::RST));
    g.dev
        .backend_mut()
        .expire_at(std::time::Instant::now() + super::CLOSE_TIMEOUT + Duration::from_millis(10));
    g.dev.serve(Vsock::process_rx);
    g.expect_one(op::RST);
    assert_eq!(g.dev.metrics().snapshot().timeouts, 1);
    assert_eq!(g.dev.backend().connections(), 0);
    drop(s);
}

#[test]
fn connection_state_starts_right() {
    let (a, _b) = UnixStream::pair().unwrap();
    let c = super::connection::Conn::host_initiated(a, 1 << 30, 1024, std::time::Instant::now());
    assert_eq!(c.state, State::Connecting);
    assert!(c.wants_rx(), "a REQUEST to send");
    assert_eq!(c.peer_credit(), 0, "no credit before the guest answers");
}

#[test]
fn data_for_a_host_that_is_gone_is_dropped_without_credit() {
    let mut g = MockGuest::new();
    let (s, hport) = g.host_connect(1024);
    g.post_rx(32);
    drop(s);
    g.host_events();
    let got = g.rx();
    let sd = got.iter().find(|(h, _)| h.op == op::SHUTDOWN).expect("a SHUTDOWN");
    assert_eq!(sd.0.flags, SHUTDOWN_BOTH);
    // The guest had not seen it yet and keeps sending: dropped, never credited back, so it
    // stops when its credit is spent instead of streaming into nothing.
    let chunk = vec![0u8; MAX_PAYLOAD as usize];
    for _ in 0..(CONN_BUF / MAX_PAYLOAD) {
        g.send(to_host(op::RW, 1024, hport), &chunk);
    }
    let ops = g.rx_ops();
    assert!(!ops.contains(&op::CREDIT_UPDATE), "{ops:?}");
    g.send(to_host(op::RW, 1024, hport), b"x");
    g.expect_one(op::RST);
    assert_eq!(g.dev.metrics().snapshot().violations, 1);
}
