//! Steering against the real kernel: the cpu and hash policies, IPv6, several addresses.
use std::{collections::HashMap, thread};

use aya::maps::{Map, MapData};
use balancer::steering::SockArray;
use balancer_common::maps;
use balancer_tests::{get, online_cpus, pin_thread, pinned_dir, Answer, Balancer, BpfFs};

const PER_CPU: usize = 200;

#[test]
fn cpu_policy_keeps_every_connection_on_its_cpu() {
    let cpus = online_cpus();
    let n = cpus.len();
    assert!(n > 0, "no online CPU");
    let mut b = Balancer::start(&[
        "--policy",
        "cpu",
        "--workers",
        &n.to_string(),
        "--pin-workers",
    ]);
    let addr = b.addrs[0];
    let answers: Vec<(u32, Vec<Answer>)> = cpus
        .iter()
        .map(|&cpu| {
            thread::spawn(move || {
                pin_thread(cpu);
                let answers = (0..PER_CPU)
                    .map(|i| get(addr).unwrap_or_else(|e| panic!("cpu {cpu} connection {i}: {e}")))
                    .collect();
                (cpu, answers)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();

    let mut worker_of_slot = HashMap::new();
    for (pos, (cpu, answers)) in answers.iter().enumerate() {
        for a in answers {
            // One worker per CPU: CPU at position p of the online list owns slot p.
            assert_eq!(
                a.slot, pos as u32,
                "connection from CPU {cpu} went to slot {}",
                a.slot
            );
            assert_eq!(
                a.cpu, *cpu,
                "SO_INCOMING_CPU of a connection made on CPU {cpu}"
            );
            assert_eq!(*worker_of_slot.entry(a.slot).or_insert(a.pid), a.pid);
        }
    }
    // --pin-workers: worker p runs on CPU p only.
    for (pos, cpu) in cpus.iter().enumerate() {
        let pid = worker_of_slot[&(pos as u32)];
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned();
        assert_eq!(allowed, cpu.to_string(), "affinity of slot {pos}'s worker");
    }

    let (status, report) = b.stop();
    assert!(status.success(), "{status}");
    assert_eq!(report.rows.len(), n, "{report:?}");
    assert_eq!(report.unattributed, [], "{report:?}");
    for r in &report.rows {
        assert_eq!(
            r.counters.by_cpu, PER_CPU as u64,
            "eBPF counters of slot {}: {r:?}",
            r.slot
        );
        // Every connection was the cpu policy's first choice: no other selection path.
        assert_eq!(r.selected(), PER_CPU as u64, "{r:?}");
        assert_eq!(r.counters.select_error, 0, "{r:?}");
    }
}

#[test]
fn hash_policy_spreads_connections_over_all_slots() {
    const SLOTS: usize = 4;
    const CONNS: usize = 4000;
    let mut b = Balancer::start(&["--policy", "hash", "--workers", &SLOTS.to_string()]);
    let addr = b.addrs[0];
    let mut seen = [0u64; SLOTS];
    for i in 0..CONNS {
        let a = get(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        seen[a.slot as usize] += 1;
    }
    let (status, report) = b.stop();
    assert!(status.success());
    assert_eq!(report.rows.len(), SLOTS, "{report:?}");
    assert_eq!(report.unattributed, [], "{report:?}");
    let share = CONNS as f64 / SLOTS as f64;
    for r in &report.rows {
        let got = seen[r.slot as usize];
        // The workers' own count and the program's count agree exactly.
        assert_eq!(r.counters.by_hash, got, "slot {}: {r:?}", r.slot);
        // Every connection was the hash policy's first choice: no other selection path.
        assert_eq!(r.selected(), got, "{r:?}");
        assert_eq!(r.counters.select_error, 0, "{r:?}");
        // Binomial spread: sd ≈ 27 connections; ±20 % of the share is > 7 sd.
        let dev = (got as f64 - share).abs() / share;
        assert!(
            dev <= 0.20,
            "slot {} got {got} of {CONNS} (share {share}): {seen:?}",
            r.slot
        );
    }
    println!("hash spread over {SLOTS} slots, {CONNS} connections: {seen:?}");
}

#[test]
fn ipv6_and_two_listen_addresses_share_the_slots() {
    const CONNS: usize = 400;
    let mut b = Balancer::start(&[
        "--listen",
        "[::1]:0",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        "hash",
        "--workers",
        "2",
    ]);
    assert_eq!(b.addrs.len(), 2, "{:?}", b.addrs);
    assert!(
        b.addrs[0].is_ipv6() && b.addrs[1].is_ipv4(),
        "{:?}",
        b.addrs
    );
    let mut pid_of_slot: HashMap<u32, u32> = HashMap::new();
    let mut per_addr = Vec::new();
    for addr in b.addrs.clone() {
        let mut seen = [0u64; 2];
        for i in 0..CONNS {
            let a = get(addr).unwrap_or_else(|e| panic!("{addr} connection {i}: {e}"));
            seen[a.slot as usize] += 1;
            // The same worker serves its slot on both addresses: it got both sockets.
            assert_eq!(*pid_of_slot.entry(a.slot).or_insert(a.pid), a.pid);
        }
        assert!(seen.iter().all(|s| *s > 0), "{addr}: {seen:?}");
        per_addr.push((addr, seen));
    }
    let (status, report) = b.stop();
    assert!(status.success());
    // Two addresses of two slots each.
    assert_eq!(report.rows.len(), 4, "{report:?}");
    assert_eq!(per_addr.len(), 2);
    for (addr, seen) in per_addr {
        for slot in 0..2u32 {
            let r = report
                .rows
                .iter()
                .find(|r| r.addr == addr && r.slot == slot)
                .unwrap_or_else(|| panic!("no row for {addr} slot {slot}: {report:?}"));
            assert_eq!(r.counters.by_hash, seen[slot as usize], "{r:?}");
            assert_eq!(r.counters.select_error, 0, "{r:?}");
        }
    }
}

/// When the program's first choice cannot be selected (here its socket is taken out of the
/// socket array behind the controller's back), the program picks another live slot itself and
/// counts it. Left to the kernel's hash, the connection could land on the unselectable slot's
/// socket, which is still in the reuseport group.
#[test]
fn an_unselectable_first_choice_falls_back_to_a_live_slot() {
    const CONNECTIONS: usize = 400;
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("group");
    // No stall detection: an evacuation would take slot 1 out of the tables (or its socket
    // out of the group) for a moment, and leave the choice to the kernel.
    let mut b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--stall-timeout",
        "0",
        // No socket check either: it would publish the emptied entry again (its own test is
        // in tampering.rs).
        "--socket-check",
        "0",
        "--bpffs-dir",
        dir.to_str().unwrap(),
    ]);
    let pinned = pinned_dir(&dir, b.addrs[0]).join(maps::SOCKETS);
    let map = Map::from_map_data(MapData::from_pin(&pinned).unwrap()).unwrap();
    let mut sockets = SockArray::new(map).unwrap();
    sockets.clear_index(&0).unwrap();

    let started = std::time::Instant::now();
    let answers: Vec<Answer> = (0..CONNECTIONS)
        .map(|i| get(b.addrs[0]).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert!(
        answers.iter().all(|a| a.slot == 1),
        "every connection reaches the live slot: {:?}",
        answers.iter().filter(|a| a.slot != 1).collect::<Vec<_>>()
    );
    b.wait_stderr(
        |l| l.contains("slot 0 could not be selected"),
        std::time::Duration::from_secs(5),
    );
    let (status, report, log) = b.stop_with_log();
    let elapsed = started.elapsed();
    assert!(status.success());
    assert_eq!(report.rows.len(), 2, "{report:?}");
    let (slot0, slot1) = (&report.rows[0], &report.rows[1]);
    assert_eq!((slot0.slot, slot1.slot), (0, 1), "{report:?}");
    // About half the flows hash to slot 0: each is a failed first choice, then a fallback.
    assert!(
        slot0.counters.select_error > (CONNECTIONS / 4) as u64,
        "{report:?}"
    );
    assert_eq!(slot0.selected(), 0, "{report:?}");
    assert_eq!(
        slot1.counters.fallback, slot0.counters.select_error,
        "{report:?}"
    );
    assert_eq!(slot1.selected(), CONNECTIONS as u64, "{report:?}");
    assert_eq!(slot1.counters.select_error, 0, "{report:?}");
    // Each of those failures is counted, but the program logs at most once a second per CPU:
    // a failing slot cannot flood the log the controller reads on its own thread.
    let lines = log.matches("slot 0 could not be selected").count() as u64;
    let bound = online_cpus().len() as u64 * (elapsed.as_secs() + 1);
    assert!(
        (1..=bound).contains(&lines),
        "{lines} log lines for {} failed selections in {elapsed:?} (at most {bound}):\n{log}",
        slot0.counters.select_error
    );
    println!(
        "slot 0 unselectable: {} first choices failed, all {} fell back to slot 1",
        slot0.counters.select_error, slot1.counters.fallback
    );
}
