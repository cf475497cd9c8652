//! Scaling against the real kernel: scale-down with migration of queued connections, scale-up,
//! a scale-up that fails, and re-pinning of running workers.
use std::{thread, time::Duration};

use balancer::control::protocol::Reply;
use balancer_common::MAX_SLOTS;
use balancer_tests::{
    all_ready, balancer_bin, frame, get, ok, parse_cpu_list, pids, pin_thread, raw_exchange,
    read_answer, refusable_group, run_to_end, send_request, sum, two_or_more_cpus, worker_pids,
    Answer, Balancer, ErrorKind, SlotState,
};

#[test]
fn scale_down_under_load_moves_queued_connections_and_loses_none() {
    const QUEUED: usize = 400;
    const DURING: usize = 200;
    let bin = balancer_bin();
    // No stall detection: an evacuation of a busy slot would add to the migrate counters
    // that this test compares with the scale's own count.
    let b = Balancer::start(&[
        "--workers",
        "4",
        "--policy",
        "hash",
        "--stall-timeout",
        "0",
        "--",
        bin.to_str().unwrap(),
        "demo-worker",
        "--accept-delay",
        "10ms",
    ]);
    let addr = b.addrs[0];
    // Slow workers (100 accepts/s each): these pile up in all four queues.
    let mut conns: Vec<_> = (0..QUEUED)
        .map(|i| send_request(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let status = b.status();
    assert_eq!(status.slots.len(), 4, "{status:?}");
    let queued_before: u64 = status.slots[2..].iter().map(|s| u64::from(s.queue)).sum();
    let control = b.control.clone();
    let scaler = thread::spawn(move || {
        run_to_end(
            &[
                "workers",
                "scale",
                "2",
                "--control",
                control.to_str().unwrap(),
            ],
            |_| {},
        )
    });
    for i in 0..DURING {
        conns.push(
            send_request(addr).unwrap_or_else(|e| panic!("connection {i} during the scale: {e}")),
        );
        thread::sleep(Duration::from_millis(2));
    }
    let f = scaler.join().unwrap();
    let out = ok(&f).to_owned();
    let answers: Vec<Answer> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| read_answer(s).unwrap_or_else(|e| panic!("connection {i} lost: {e}")))
        .collect();
    assert_eq!(answers.len(), QUEUED + DURING);
    let status = b.status();
    assert_eq!(status.slots.len(), 2, "{status:?}");
    let migrated = sum(&status, |s| s.migrated);
    assert!(queued_before > 0, "the removed slots had a queue");
    assert!(
        migrated > 0,
        "the migrate program moved the closing sockets' queues: {status:?}"
    );
    assert!(
        out.contains(&format!("{migrated} queued connection(s) moved")),
        "{out}"
    );
    assert_eq!(sum(&status, |s| s.select_errors), 0, "{status:?}");
    let per_slot: Vec<u64> = status.slots.iter().map(|s| s.migrated).collect();
    println!(
        "scale 4 -> 2: {} connections, 0 lost, {queued_before} queued on the removed slots at the start, {migrated} migrated, per live slot {per_slot:?}",
        answers.len()
    );
    // Spread over both live slots, though the migrating connections' own hashes are the ones
    // that put them on the removed slots, and every queue is past the spill depth: each live
    // slot gets a fair draw. Fewer than a quarter of n for either slot has probability
    // 2 × P(Bin(n, 1/2) < n/4), under 3.1e-4 for n ≥ 50 (typically n ≈ 200 here: 1e-12).
    assert!(migrated >= 50, "{status:?}");
    assert!(
        per_slot.iter().all(|m| m * 4 >= migrated),
        "the migrated connections piled onto one slot: {per_slot:?}"
    );
}

/// A scale-up whose new worker dies before it is ready fails with the reason, and the
/// controller is free for the next command (no operation left pending).
#[test]
fn a_scale_up_whose_worker_fails_reports_it_and_takes_the_next_command() {
    let (mut b, flag, script) = refusable_group();
    let before = pids(&b.status());
    assert_eq!(before.len(), 2);
    std::fs::write(&flag, "").unwrap();
    let e = b.cli_error(&["workers", "scale", "3"]);
    assert_eq!(e.kind, ErrorKind::Failed, "{e:?}");
    // No kind tells why a change failed: the message must name the slot and the cause.
    assert!(
        e.message.contains("slot 2 is not ready") && e.message.contains("exited with status 3"),
        "{e:?}"
    );
    // Slot 2 exists but is not ready (its worker keeps refusing); the old slots are untouched.
    let status = b.status();
    assert_eq!(status.slots.len(), 3, "{status:?}");
    assert_ne!(status.slots[2].state, SlotState::Ready, "{status:?}");
    assert_eq!(worker_pids(&status.slots[..2]), before, "{status:?}");
    // The failing slot is out of the tables: every connection still reaches the old workers.
    for _ in 0..200 {
        let a = get(b.addrs[0]).unwrap();
        assert!(before.contains(&a.pid), "{a:?}");
    }
    let out = ok(&b.cli(&["workers", "scale", "2"])).to_owned();
    assert!(out.contains("scaled 3 -> 2 workers"), "{out}");
    let after = b.status();
    assert_eq!(pids(&after), before);
    assert!(all_ready(&after, 2), "{after:?}");
    let (status, report) = b.stop();
    assert!(status.success());
    assert_eq!(report.rows.len(), 2, "{report:?}");
    assert!(
        report.rows.iter().all(|r| r.counters.select_error == 0),
        "{report:?}"
    );
    let _ = std::fs::remove_file(&flag);
    let _ = std::fs::remove_file(&script);
}

/// The CPUs allowed to every thread of every process in process group `pgid`, by thread id.
fn group_affinity(pgid: u32) -> Vec<(u32, Vec<u32>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let pgrp: Option<u32> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let tid: u32 = t.file_name().to_string_lossy().parse().unwrap();
            let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
                continue;
            };
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap();
            out.push((tid, parse_cpu_list(list)));
        }
    }
    out
}

/// Asserts that every thread of the worker's process group, its forked child included, may
/// run exactly on `cpus`.
fn assert_pinned(pgid: u32, cpus: &[u32], when: &str) {
    let threads = group_affinity(pgid);
    // The worker's own threads plus the `sleep` it forked.
    assert!(threads.len() >= 2, "{when}: {threads:?}");
    assert!(
        threads.iter().all(|(_, allowed)| allowed == cpus),
        "{when}: every thread of worker {pgid} on {cpus:?}: {threads:?}"
    );
}

/// With `--pin-workers`, a scale changes which CPUs' connections each slot gets: the running
/// workers (every thread, and the processes they forked) move with it.
#[test]
fn a_scale_repins_the_running_workers_and_their_children() {
    let cpus = two_or_more_cpus();
    let bin = balancer_bin();
    let n = cpus.len().to_string();
    let mut b = Balancer::start(&[
        "--workers",
        &n,
        "--policy",
        "cpu",
        "--pin-workers",
        "--",
        "sh",
        "-c",
        "sleep 30 & exec \"$0\" demo-worker",
        bin.to_str().unwrap(),
    ]);
    let slot0 = pids(&b.status())[0];
    assert_pinned(slot0, &cpus[..1], "one worker per CPU");

    ok(&b.cli(&["workers", "scale", "1"]));
    let status = b.status();
    assert_eq!(pids(&status), vec![slot0], "the same worker stays");
    assert_eq!(status.slots[0].cpus, cpus, "{status:?}");
    assert_pinned(slot0, &cpus, "after scaling to one worker");
    // Every CPU's connections now reach it.
    let addr = b.addrs[0];
    for &cpu in &cpus {
        let a = thread::spawn(move || {
            pin_thread(cpu);
            get(addr).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!((a.pid, a.cpu), (slot0, cpu));
    }

    ok(&b.cli(&["workers", "scale", &n]));
    let after = pids(&b.status());
    assert_eq!(after.len(), cpus.len(), "{after:?}");
    assert_eq!(after[0], slot0);
    assert_pinned(slot0, &cpus[..1], "after scaling back");
    assert_pinned(after[1], &cpus[1..2], "a new slot's worker");
    let (status, _) = b.stop();
    assert!(status.success());
}

#[test]
fn scale_up_new_slots_take_traffic_once_ready() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let out = ok(&b.cli(&["workers", "scale", "4"])).to_owned();
    assert!(out.contains("scaled to 4 workers"), "{out}");
    let status = b.status();
    assert!(all_ready(&status, 4), "{status:?}");
    let mut seen = [0u32; 4];
    for _ in 0..800 {
        seen[get(b.addrs[0]).unwrap().slot as usize] += 1;
    }
    assert!(seen[2] > 0 && seen[3] > 0, "{seen:?}");
    let f = b.cli(&["workers", "scale", "0"]);
    assert!(!f.status.success());
}

/// A migration burst runs on the closing thread's CPU: the program spreads it by flow hash
/// over the live slots instead of following the cpu policy to one slot.
#[test]
fn scale_down_spreads_migrated_connections_over_the_live_slots() {
    let cpus = two_or_more_cpus();
    let bin = balancer_bin();
    // 4 slots on 2 CPUs: CPU 0's connections go to slots 0 and 2; slot 2 is removed.
    let b = Balancer::start(&[
        "--workers",
        "4",
        "--policy",
        "cpu",
        "--spill-depth",
        "0",
        "--",
        bin.to_str().unwrap(),
        "demo-worker",
        "--accept-delay",
        "20ms",
    ]);
    let addr = b.addrs[0];
    let cpu0 = cpus[0];
    let conns = thread::spawn(move || {
        pin_thread(cpu0);
        (0..200)
            .map(|i| send_request(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let out = ok(&b.cli(&["workers", "scale", "2"])).to_owned();
    for (i, s) in conns.into_iter().enumerate() {
        read_answer(s).unwrap_or_else(|e| panic!("connection {i} lost: {e}"));
    }
    let status = b.status();
    let migrated: Vec<u64> = status.slots.iter().map(|s| s.migrated).collect();
    assert_eq!(migrated.len(), 2, "{status:?}");
    assert!(
        migrated.iter().all(|m| *m > 0),
        "both live slots took part of the migrated queue: {migrated:?} ({out})"
    );
}

/// The controller's own range check on `scale`, which the CLI never lets a request reach
/// (clap refuses 0 and 129 first): raw frames asking for 0 and for MAX_SLOTS + 1 workers are
/// refused as `invalid`, naming the range, and change nothing.
#[test]
fn a_raw_scale_to_zero_or_past_the_limit_is_refused_and_changes_nothing() {
    let b = Balancer::start(&["--workers", "2"]);
    let before = b.status();
    assert_eq!(before.slots.len(), 2, "{before:?}");
    let policy_before = b.policy();
    let scale = |workers: u32| {
        let payload =
            format!(r#"{{"version":1,"request":{{"type":"scale","workers":{workers}}}}}"#);
        raw_exchange(&b.control, &frame(payload.as_bytes()))
    };
    for workers in [0, MAX_SLOTS + 1] {
        match scale(workers) {
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Invalid, "{workers} workers: {e:?}");
                assert!(
                    e.message.contains(&format!("give 1 to {MAX_SLOTS}")),
                    "{workers} workers: {e:?}"
                );
            }
            Ok(reply) => panic!("scale to {workers} workers was accepted: {reply:?}"),
        }
        let after = b.status();
        assert_eq!(after.slots.len(), 2, "after {workers}: {after:?}");
        assert_eq!(pids(&after), pids(&before), "after {workers}");
        let states = |s: &balancer_tests::StatusReport| -> Vec<SlotState> {
            s.slots.iter().map(|slot| slot.state).collect()
        };
        assert_eq!(states(&after), states(&before), "after {workers}");
    }
    assert_eq!(b.policy(), policy_before);
    // The same raw path reaches the range check's other side: an in-range scale is served.
    match scale(2) {
        Ok(Reply::Done { message }) => assert!(message.contains("already 2"), "{message}"),
        other => panic!("a scale to the current size: {other:?}"),
    }
}
