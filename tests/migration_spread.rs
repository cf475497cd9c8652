//! Migration of half-open connections against the real kernel (the `TCP_NEW_SYN_RECV` case of
//! the kernel's migrate_reuseport selftest): connections whose handshake is not complete when
//! their listener closes move, when it completes, to the live slots, spread over them.
use std::{io::Write, net::TcpStream, time::Duration};

use balancer_tests::{
    balancer_bin, ok, read_answer, sum, wait_syn_recv, AckDrop, Balancer, IO_TIMEOUT,
};

/// Connections held half-open.
const HALF_OPEN: usize = 200;

/// The request the demo worker answers (it answers once it has read the header).
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: balancer\r\n\r\n";

/// 4 workers under `hash`; 200 connections wait for their final ACK (nftables drops it) when
/// the group scales to 2. Once the ACKs pass, every connection is answered, and the ones that
/// were on the removed slots are spread over both live slots, not piled onto one.
#[test]
fn half_open_connections_migrate_on_scale_down_spread_over_the_live_slots() {
    let bin = balancer_bin();
    // An address of the loopback net no other test listens on; the nftables rule matches it
    // and this controller's port only. No spilling and no stall detection: every migrated
    // connection is the program's migrate path, and only the scale-down migrates.
    let b = Balancer::start(&[
        "--listen",
        "127.77.0.1:0",
        "--workers",
        "4",
        "--policy",
        "hash",
        "--spill-depth",
        "0",
        "--stall-timeout",
        "0",
        "--",
        bin.to_str().unwrap(),
        "demo-worker",
    ]);
    let addr = b.addrs[0];
    let ack_drop = AckDrop::install(addr);
    // The client's connect completes on the SYN-ACK; its ACK is dropped, so the server keeps
    // a request socket. The default 5 SYN-ACK retries keep it for over a minute.
    let mut conns: Vec<TcpStream> = (0..HALF_OPEN)
        .map(|i| {
            TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let held = wait_syn_recv(addr, HALF_OPEN, Duration::from_secs(10));
    assert_eq!(
        held, HALF_OPEN,
        "every connection is half-open on the server"
    );
    let before = b.status();
    assert_eq!(before.slots.len(), 4, "{before:?}");
    assert_eq!(sum(&before, |s| s.by_hash), HALF_OPEN as u64, "{before:?}");
    assert_eq!(sum(&before, |s| u64::from(s.queue)), 0, "{before:?}");
    // What the removed slots' listeners held: it moves when the handshakes complete.
    let on_removed: u64 = before.slots[2..].iter().map(|s| s.by_hash).sum();

    let out = ok(&b.cli(&["workers", "scale", "2"])).to_owned();
    ack_drop.remove();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c.write_all(REQUEST)
            .unwrap_or_else(|e| panic!("connection {i}: sending: {e}"));
    }
    let answers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| read_answer(c).unwrap_or_else(|e| panic!("connection {i} lost: {e}")))
        .collect();
    assert_eq!(answers.len(), HALF_OPEN);
    assert!(answers.iter().all(|a| a.slot < 2), "{answers:?}");

    let after = b.status();
    assert_eq!(after.slots.len(), 2, "{after:?}");
    assert_eq!(sum(&after, |s| s.select_errors), 0, "{after:?}");
    let migrated: Vec<u64> = after.slots.iter().map(|s| s.migrated).collect();
    let total: u64 = migrated.iter().sum();
    println!(
        "scale 4 -> 2 with {HALF_OPEN} half-open: {on_removed} on the removed slots, migrated per live slot {migrated:?}; reply: {out}"
    );
    // Binomial(200, 1/2) under a fair hash: below 50 with probability < 1e-12.
    assert!(on_removed >= 50, "{before:?}");
    assert_eq!(
        total, on_removed,
        "each connection of a removed slot migrated once: {after:?}"
    );
    // Spread: with each migrated connection going to either live slot with probability 1/2,
    // one of the two gets fewer than a quarter of n with probability 2 × P(Bin(n, 1/2) < n/4):
    // 3.1e-4 for n = 50, 1.8e-7 for n = 100; over n ~ Bin(200, 1/2) as here, 4.6e-7. A
    // program that piles them onto one slot gives the other 0.
    for (slot, m) in migrated.iter().enumerate() {
        assert!(
            *m * 4 >= total,
            "slot {slot} got {m} of the {total} migrated connections: {migrated:?}"
        );
    }
    // Answers agree with the counters: each live slot answered what was steered to it at the
    // start and what migrated to it.
    for (slot, s) in after.slots.iter().enumerate() {
        let answered = answers.iter().filter(|a| a.slot == slot as u32).count() as u64;
        assert_eq!(
            answered,
            before.slots[slot].by_hash + s.migrated,
            "slot {slot}: {after:?}"
        );
    }
}
