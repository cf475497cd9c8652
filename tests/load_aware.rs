//! Load-aware steering against the real kernel: round-robin evenness, and a worker stopped
//! with SIGSTOP under an open-loop client, with and without load awareness.
use std::{
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    get, online_cpus, open_loop, pin_thread, two_or_more_cpus, Balancer, Fate, SlotState,
    SlotStatus, StatusReport,
};

const RATE: u32 = 1000;
const LOAD: Duration = Duration::from_secs(3);
/// Connections one open-loop run at `RATE` for `LOAD` makes (it returns one fate for each).
const LOAD_CONNECTIONS: usize = 3000;
const DEADLINE: Duration = Duration::from_secs(3);
const SLOW: Duration = Duration::from_secs(1);

/// These tests judge latency under an open-loop load on a 2-CPU machine: two at once would
/// each slow the other's workers. Every test here holds this lock.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Slot `i` of a status; panics with the status when there is no such slot.
fn slot(status: &StatusReport, i: usize) -> &SlotStatus {
    status
        .slots
        .get(i)
        .unwrap_or_else(|| panic!("no slot {i}: {status:?}"))
}

/// The worker pid of slot `i`; panics when it has none.
fn pid(status: &StatusReport, i: usize) -> i32 {
    slot(status, i)
        .pid
        .unwrap_or_else(|| panic!("slot {i} has no worker: {status:?}")) as i32
}

#[test]
fn round_robin_spreads_10000_connections_within_1_percent() {
    const SLOTS: usize = 4;
    const CONNS: usize = 10_000;
    let _serial = serial();
    // No stall detection: a worker descheduled for a while must not take its slot out of
    // the rotation that this test measures.
    let b = Balancer::start(&[
        "--workers",
        &SLOTS.to_string(),
        "--policy",
        "round-robin",
        "--stall-timeout",
        "0",
    ]);
    let mut seen = [0f64; SLOTS];
    for i in 0..CONNS {
        seen[get(b.addrs[0])
            .unwrap_or_else(|e| panic!("connection {i}: {e}"))
            .slot as usize] += 1.0;
    }
    let mean = CONNS as f64 / SLOTS as f64;
    let cv = (seen.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / SLOTS as f64).sqrt() / mean;
    assert!(cv <= 0.01, "coefficient of variation {cv:.4}: {seen:?}");
    let status = b.status();
    assert_eq!(status.slots.len(), SLOTS, "{status:?}");
    for (i, count) in seen.iter().enumerate() {
        assert_eq!(
            slot(&status, i).by_round_robin as f64,
            *count,
            "eBPF counters agree"
        );
    }
    println!(
        "round-robin over {SLOTS} slots: {seen:?}, CV {:.3} %",
        cv * 100.0
    );
}

/// Two workers; slot `victim`'s worker is stopped 0.5 s into a 3 s open-loop run at 1000
/// connections/s (each with a 3 s deadline) and continued when the load ends. Returns the
/// fates, the status after the slot came back, and the controller's log.
fn stopped_worker_run(
    args: &[&str],
    client_cpu: Option<u32>,
    victim: usize,
) -> (Vec<Fate>, StatusReport, String) {
    let mut all = vec!["--workers", "2"];
    all.extend_from_slice(args);
    let b = Balancer::start(&all);
    let addr = b.addrs[0];
    let slot_no = victim;
    let victim = pid(&b.status(), slot_no);
    let load = thread::spawn(move || {
        if let Some(cpu) = client_cpu {
            pin_thread(cpu);
        }
        open_loop(addr, RATE, LOAD, DEADLINE)
    });
    thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on the balancer's worker.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGSTOP) }, 0);
    thread::sleep(LOAD - Duration::from_millis(500));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGCONT) }, 0);
    let fates = load.join().unwrap();
    assert_eq!(fates.len(), LOAD_CONNECTIONS, "one fate per connection");
    // After SIGCONT the slot is back in the tables.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = b.status();
        if slot(&s, slot_no).state == SlotState::Ready {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot_no} did not return after SIGCONT: {s:?}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.slots.len(), 2, "{status:?}");
    assert_eq!(pid(&status, slot_no), victim, "the same worker, continued");
    // And it serves again, on its socket (re-listened after an evacuation, on the same port).
    let served = thread::spawn(move || {
        if let Some(cpu) = client_cpu {
            pin_thread(cpu);
        }
        (0..400)
            .filter(|_| get(addr).is_ok_and(|a| a.slot as usize == slot_no))
            .count()
    })
    .join()
    .unwrap();
    assert!(
        served > 0,
        "the continued worker takes connections again: {:?}\n{}",
        b.status(),
        b.stderr()
    );
    let log = b.stderr();
    (fates, status, log)
}

fn slow(fates: &[Fate]) -> usize {
    fates
        .iter()
        .filter(|f| !matches!(f, Fate::Answered(t) if *t <= SLOW))
        .count()
}

fn summary(name: &str, fates: &[Fate]) -> String {
    let failed = fates.iter().filter(|f| **f == Fate::Failed).count();
    let timed_out = fates.iter().filter(|f| **f == Fate::TimedOut).count();
    let mut ttfb: Vec<Duration> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Answered(t) => Some(*t),
            _ => None,
        })
        .collect();
    ttfb.sort_unstable();
    let pct =
        |p: f64| ttfb.get(((ttfb.len() as f64 * p) as usize).min(ttfb.len().saturating_sub(1)));
    format!(
        "{name}: {} connections, {} with first byte > 1 s ({:.2} %), {timed_out} timed out, {failed} failed; TTFB p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
        fates.len(),
        slow(fates),
        100.0 * slow(fates) as f64 / fates.len() as f64,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        ttfb.last()
    )
}

#[test]
fn plain_hash_hangs_on_a_stopped_worker() {
    // No spill, no stall detection: the kernel-hash behaviour, steered by our table.
    let _serial = serial();
    let (fates, _, _) = stopped_worker_run(
        &[
            "--policy",
            "hash",
            "--spill-depth",
            "0",
            "--stall-timeout",
            "0",
        ],
        None,
        1,
    );
    println!("{}", summary("hash (no load awareness)", &fates));
    assert!(
        slow(&fates) * 10 >= fates.len(),
        "about half the connections wait for the stopped worker: {}",
        summary("hash", &fates)
    );
}

#[test]
fn least_loaded_routes_around_a_stopped_worker() {
    // Slot 0: its socket was the first bound, so this also proves an evacuated socket keeps
    // the group's port.
    let _serial = serial();
    let (fates, status, _) = stopped_worker_run(&["--policy", "least-loaded"], None, 0);
    println!("{}", summary("least-loaded", &fates));
    assert!(
        slow(&fates) * 200 <= fates.len(),
        "{}",
        summary("least-loaded", &fates)
    );
    assert!(fates.iter().all(|f| *f != Fate::Failed));
    assert!(slot(&status, 1).by_least_loaded > 0, "{status:?}");
    assert!(
        slot(&status, 1).migrated > 0,
        "slot 0's queue was evacuated: {status:?}"
    );
}

#[test]
fn cpu_with_spill_routes_around_a_stopped_worker() {
    let cpus = two_or_more_cpus();
    // Every connection is made on the victim's CPU, so the cpu policy's first choice is
    // always the stopped worker: only spill and stall handling can save them.
    let _serial = serial();
    let (fates, status, _) = stopped_worker_run(&["--policy", "cpu"], Some(cpus[1]), 1);
    println!("{}", summary("cpu + spill", &fates));
    assert!(
        slow(&fates) * 200 <= fates.len(),
        "{}",
        summary("cpu + spill", &fates)
    );
    assert!(fates.iter().all(|f| *f != Fate::Failed));
    assert!(slot(&status, 0).spilled > 0, "{status:?}");
    assert!(
        slot(&status, 0).migrated > 0,
        "the stalled queue was evacuated: {status:?}"
    );
}

#[test]
fn without_evacuation_only_the_connections_queued_before_detection_wait() {
    let cpus = two_or_more_cpus();
    let _serial = serial();
    let (fates, status, log) = stopped_worker_run(
        &["--policy", "cpu", "--evacuate", "false"],
        Some(cpus[1]),
        1,
    );
    println!("{}", summary("cpu + spill, no evacuation", &fates));
    let waited = slow(&fates);
    // What queued on the stopped worker before the stall was detected (spill caps it near 16)
    // waits for SIGCONT; nothing else does, and nothing fails. The log gives that queue.
    let queued: usize = log
        .split("slot 1: stalled (queue of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stall of slot 1 in the log:\n{log}"));
    assert!(waited > 0, "the stopped worker's queue really waited");
    // A few more can land between the sample that detects the stall and the table update
    // (at 1000/s, 10 is 10 ms of delay there).
    assert!(
        waited <= queued + 10,
        "{waited} waited, {queued} queued at detection: {}",
        summary("no evacuation", &fates)
    );
    assert!(fates.iter().all(|f| *f != Fate::Failed));
    assert_eq!(slot(&status, 0).migrated, 0, "{status:?}");
}

#[test]
fn spill_does_not_trigger_while_workers_keep_up() {
    let _serial = serial();
    let cpus = online_cpus();
    let b = Balancer::start(&[
        "--workers",
        &cpus.len().to_string(),
        "--policy",
        "cpu",
        "--pin-workers",
        "--spill-depth",
        "8",
    ]);
    let addr = b.addrs[0];
    let threads: Vec<_> = cpus
        .iter()
        .enumerate()
        .map(|(pos, &cpu)| {
            thread::spawn(move || {
                pin_thread(cpu);
                for _ in 0..500 {
                    let a = get(addr).unwrap();
                    assert_eq!(a.slot, pos as u32, "locality from CPU {cpu}");
                    assert_eq!(a.cpu, cpu);
                }
                // And open-loop at a rate the workers easily keep up with.
                open_loop(addr, 300, Duration::from_secs(1), DEADLINE)
            })
        })
        .collect();
    assert_eq!(threads.len(), cpus.len());
    for t in threads {
        let fates = t.join().unwrap();
        // 300 connections/s for 1 s.
        assert_eq!(fates.len(), 300, "one fate per connection");
        assert!(fates.iter().all(|f| matches!(f, Fate::Answered(_))));
    }
    let status = b.status();
    assert_eq!(status.slots.len(), cpus.len(), "{status:?}");
    for s in &status.slots {
        assert_eq!(s.spilled, 0, "{status:?}");
        assert_eq!(s.by_hash, 0, "{status:?}");
        assert_eq!(s.steered, s.by_cpu, "{status:?}");
    }
}

#[test]
fn kill_stalled_replaces_a_stuck_worker() {
    let _serial = serial();
    let b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--kill-stalled",
        "300ms",
    ]);
    let addr = b.addrs[0];
    let victim = pid(&b.status(), 1);
    // SAFETY: kill(2) on the balancer's worker.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGSTOP) }, 0);
    let fates = open_loop(addr, 500, Duration::from_millis(600), DEADLINE);
    // 500 connections/s for 0.6 s.
    assert_eq!(fates.len(), 300, "one fate per connection");
    assert!(
        fates.iter().all(|f| matches!(f, Fate::Answered(_))),
        "{fates:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = b.status();
        let now = slot(&s, 1);
        if now.pid.is_some_and(|p| p as i32 != victim) && now.state == SlotState::Ready {
            assert_eq!(now.restarts, 1, "{s:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled worker was not replaced: {s:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(b.stderr().contains("--kill-stalled"), "{}", b.stderr());
}
