//! Runtime control against the real kernel: policy switches, weights, rolling restarts,
//! scaling with migration, drains, the control socket's defences, status, metrics, pinning.
use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use balancer::control::protocol::{decode_reply, Reply};
use balancer_common::{maps, PROGRAM_SELECT};
use balancer_tests::{
    alive, balancer_bin, get, online_cpus, parse_cli_error, parse_cpu_list, pin_thread, pinned_dir,
    read_answer, run_to_end, scratch_dir, send_request, two_or_more_cpus, unique_path, wait_gone,
    Answer, Balancer, BpfFs, ErrorKind, ErrorReply, PolicyName, SlotState, SlotStatus,
    StatusReport, IO_TIMEOUT,
};

/// Answers each client thread gets in a phase before the test moves on.
const PHASE_ANSWERS: u64 = 100;

/// An answer with the phase the request started in and the phase it ended in.
type Phased = (u32, u32, Answer);

/// A client loop on one CPU (or unpinned), bounded in count and time, recording every answer
/// with the phase it started and ended in.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    answered: Vec<Arc<AtomicU64>>,
    threads: Vec<thread::JoinHandle<Vec<Phased>>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, cpus: &[Option<u32>], phase: Arc<AtomicU32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let answered: Vec<Arc<AtomicU64>> =
            cpus.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let threads = cpus
            .iter()
            .zip(&answered)
            .map(|(&cpu, answered)| {
                let (stop, failed, phase) = (stop.clone(), failed.clone(), phase.clone());
                let answered = answered.clone();
                thread::spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_thread(cpu);
                    }
                    let deadline = Instant::now() + Duration::from_secs(40);
                    let mut out = Vec::new();
                    for _ in 0..40_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let before = phase.load(Ordering::SeqCst);
                        match get(addr) {
                            Ok(a) => {
                                out.push((before, phase.load(Ordering::SeqCst), a));
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                eprintln!("client: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        thread::sleep(Duration::from_micros(500));
                    }
                    out
                })
            })
            .collect();
        Self {
            stop,
            failed,
            answered,
            threads,
        }
    }

    /// Waits until every client thread has had `n` more answers (a phase long enough to judge,
    /// however slow the machine). Panics after 20 s.
    fn wait_answers(&self, n: u64) {
        let start: Vec<u64> = self
            .answered
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .answered
            .iter()
            .zip(&start)
            .any(|(a, s)| a.load(Ordering::SeqCst) < s + n)
        {
            assert!(
                Instant::now() < deadline,
                "the clients got fewer than {n} answers each in 20 s"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients; returns (answers per thread, failures).
    fn finish(self) -> (Vec<Vec<Phased>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let answers = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        (answers, self.failed.load(Ordering::Relaxed))
    }
}

fn ok(f: &balancer_tests::Finished) -> &str {
    assert!(
        f.status.success(),
        "command failed ({}):\n{}{}",
        f.status,
        f.stdout,
        f.stderr
    );
    &f.stdout
}

/// Every slot's worker pid, in slot order; panics when a slot has none.
fn pids(status: &StatusReport) -> Vec<u32> {
    worker_pids(&status.slots)
}

/// The worker pids of `slots`, in order; panics when a slot has none.
fn worker_pids(slots: &[SlotStatus]) -> Vec<u32> {
    slots
        .iter()
        .map(|s| {
            s.pid
                .unwrap_or_else(|| panic!("slot {} has no worker: {slots:?}", s.slot))
        })
        .collect()
}

/// A counter summed over every slot.
fn sum(status: &StatusReport, field: impl Fn(&SlotStatus) -> u64) -> u64 {
    status.slots.iter().map(field).sum()
}

/// Whether the status has exactly `n` slots, all ready.
fn all_ready(status: &StatusReport, n: usize) -> bool {
    status.slots.len() == n && status.slots.iter().all(|s| s.state == SlotState::Ready)
}

#[test]
fn policy_switches_under_load_lose_nothing_and_take_effect() {
    let cpus = online_cpus();
    let n = cpus.len();
    let b = Balancer::start(&["--policy", "cpu", "--workers", &n.to_string()]);
    let phase = Arc::new(AtomicU32::new(0));
    let load = Load::start(
        b.addrs[0],
        &cpus.iter().map(|c| Some(*c)).collect::<Vec<_>>(),
        phase.clone(),
    );
    // Phases 0 (cpu), 2 (hash) and 4 (cpu) are stable; 1 and 3 cover the switches, whose
    // moment of publication the client cannot know.
    let mut latencies = Vec::new();
    for (next, policy) in [(2, "hash"), (4, "cpu")] {
        load.wait_answers(PHASE_ANSWERS);
        phase.store(next - 1, Ordering::SeqCst);
        let f = b.cli(&["policy", "set", policy]);
        let out = ok(&f).to_owned();
        assert!(out.contains(&format!("policy {policy}")), "{out}");
        latencies.push(out.trim().to_owned());
        phase.store(next, Ordering::SeqCst);
    }
    load.wait_answers(PHASE_ANSWERS);
    let (answers, failed) = load.finish();
    assert_eq!(failed, 0, "connections failed across the policy switches");
    assert_eq!(answers.len(), n, "one client per CPU");
    for (pos, per_cpu) in answers.iter().enumerate() {
        let in_phase = |p: u32| -> Vec<&Answer> {
            per_cpu
                .iter()
                .filter(|(a, b, _)| *a == p && *b == p)
                .map(|(_, _, x)| x)
                .collect()
        };
        for p in [0, 4] {
            let v = in_phase(p);
            assert!(v.len() > 20, "phase {p}: {} answers", v.len());
            assert!(
                v.iter().all(|a| a.slot == pos as u32),
                "cpu policy (phase {p}): CPU {} must stay on slot {pos}",
                cpus[pos]
            );
        }
        let hashed: HashSet<u32> = in_phase(2).iter().map(|a| a.slot).collect();
        assert_eq!(
            hashed.len(),
            n,
            "hash policy spreads CPU {}'s connections",
            cpus[pos]
        );
    }
    let status = b.status();
    assert_eq!(status.policy, PolicyName::Cpu);
    assert!(
        sum(&status, |s| s.by_hash) > 0 && sum(&status, |s| s.by_cpu) > 0,
        "{status:?}"
    );
    assert_eq!(sum(&status, |s| s.select_errors), 0, "{status:?}");
    println!("policy switches: {latencies:?}");
}

#[test]
fn weights_1_to_3_give_shares_of_25_and_75_percent() {
    const CONNS: usize = 4000;
    let b = Balancer::start(&["--workers", "2", "--policy", "cpu"]);
    ok(&b.cli(&["policy", "set", "hash", "--weights", "1,3"]));
    let policy = b.policy();
    assert_eq!(policy.policy, PolicyName::Hash);
    assert_eq!(policy.weights, Some(vec![1, 3]));
    assert_eq!(policy.hash_buckets, [(0, 256), (1, 768)], "{policy:?}");
    let mut seen = [0usize; 2];
    for _ in 0..CONNS {
        seen[get(b.addrs[0]).unwrap().slot as usize] += 1;
    }
    let share = seen[0] as f64 / CONNS as f64;
    // sd of the share is 0.7 points at 4000 connections; ±4 points is > 5 sd.
    assert!(
        (share - 0.25).abs() <= 0.04,
        "slot 0 got {:.1} %: {seen:?}",
        share * 100.0
    );
    // Bad weights are refused as invalid (each request has one thing wrong with it) and
    // change nothing.
    for weights in [
        &["hash", "--weights", "1,2,3"][..],
        &["cpu", "--weights", "1,3"],
        &["hash", "--weights", "0,0"],
    ] {
        let mut args = vec!["policy", "set"];
        args.extend_from_slice(weights);
        let e = b.cli_error(&args);
        assert_eq!(e.kind, ErrorKind::Invalid, "{args:?}: {e:?}");
        assert_eq!(b.policy(), policy, "{args:?} changed the policy");
    }
    assert_eq!(b.status().weights, Some(vec![1, 3]));
    println!("weights 1:3 over {CONNS} connections: {seen:?}");
}

#[test]
fn rolling_restart_under_load_replaces_every_worker_and_loses_nothing() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let before = pids(&b.status());
    assert_eq!(before.len(), 2);
    let phase = Arc::new(AtomicU32::new(0));
    let load = Load::start(b.addrs[0], &[None, None], phase.clone());
    load.wait_answers(PHASE_ANSWERS);
    let f = b.cli(&["workers", "restart"]);
    let out = ok(&f).to_owned();
    // The reply comes once every new worker is ready and the old ones have SIGTERM; an old
    // worker may still take a connection until it handles the signal.
    for old in &before {
        assert!(
            wait_gone(*old, Duration::from_secs(10)),
            "old worker {old} still runs"
        );
    }
    phase.store(1, Ordering::SeqCst);
    load.wait_answers(PHASE_ANSWERS);
    let (answers, failed) = load.finish();
    assert_eq!(failed, 0, "connections failed during the rolling restart");
    let after = pids(&b.status());
    assert_eq!(after.len(), before.len(), "{before:?} -> {after:?}");
    for (old, new) in before.iter().zip(&after) {
        assert_ne!(old, new, "every pid changes: {before:?} -> {after:?}");
        assert!(out.contains(&format!("{old} -> {new}")), "{out}");
    }
    let late: HashSet<u32> = answers
        .iter()
        .flatten()
        .filter(|(a, _, _)| *a == 1)
        .map(|(_, _, x)| x.pid)
        .collect();
    assert!(!late.is_empty(), "answers after the restart");
    assert!(
        late.iter().all(|p| after.contains(p)),
        "{late:?} vs {after:?}"
    );
    let status = b.status();
    assert_eq!(status.slots.len(), 2, "{status:?}");
    assert!(
        status
            .slots
            .iter()
            .all(|s| s.restarts == 1 && s.state == SlotState::Ready),
        "{status:?}"
    );
    println!("rolling restart under load: {out}");
}

/// Two slots under `hash` whose workers run the demo worker, or exit with status 3 before they
/// are ready once the returned flag file exists. Returns (controller, flag, worker script).
fn refusable_group() -> (Balancer, std::path::PathBuf, std::path::PathBuf) {
    let flag = unique_path("refuse.flag");
    let script = unique_path("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e '{}' ]; then echo 'refusing to start' >&2; exit 3; fi\nexec '{}' demo-worker\n",
            flag.display(),
            balancer_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--",
        script.to_str().unwrap(),
    ]);
    (b, flag, script)
}

#[test]
fn a_new_worker_that_never_becomes_ready_leaves_the_old_one_serving() {
    let (b, flag, script) = refusable_group();
    let before = pids(&b.status());
    assert_eq!(before.len(), 2);
    std::fs::write(&flag, "").unwrap();
    let e = b.cli_error(&["workers", "restart", "--slot", "0"]);
    assert_eq!(e.kind, ErrorKind::Failed, "{e:?}");
    // No kind tells why a change failed: the message must name the cause.
    assert!(
        e.message
            .contains("exited with status 3 before it was ready"),
        "{e:?}"
    );
    // The old worker keeps serving: the same pids, ready, and slot 0 answered by it.
    let after = b.status();
    assert_eq!(pids(&after), before);
    assert!(all_ready(&after, 2), "{after:?}");
    assert_eq!(after.slots[0].restarts, 0, "{after:?}");
    let slot0: Vec<Answer> = (0..200)
        .map(|_| get(b.addrs[0]).unwrap())
        .filter(|a| a.slot == 0)
        .collect();
    assert!(!slot0.is_empty() && slot0.iter().all(|a| a.pid == before[0]));
    let _ = std::fs::remove_file(&flag);
    let _ = std::fs::remove_file(&script);
}

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
    println!(
        "scale 4 -> 2: {} connections, 0 lost, {queued_before} queued on the removed slots at the start, {migrated} migrated",
        answers.len()
    );
}

/// A scale-up whose new worker dies before it is ready fails with the reason, and the
/// controller is free for the next command (no operation left pending).
#[test]
fn a_scale_up_whose_worker_fails_reports_it_and_takes_the_next_command() {
    let (b, flag, script) = refusable_group();
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
    let b = Balancer::start(&[
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

#[test]
fn a_drained_slot_gets_nothing_new_while_its_worker_stays_up() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let worker1 = pids(&b.status())[1];
    ok(&b.cli(&["drain", "--slot", "1"]));
    let status = b.status();
    assert_eq!(status.slots.len(), 2, "{status:?}");
    assert_eq!(status.slots[0].state, SlotState::Ready, "{status:?}");
    assert_eq!(status.slots[1].state, SlotState::Draining, "{status:?}");
    assert_eq!(b.policy().live, [0], "only slot 0 is in the tables");
    for _ in 0..400 {
        assert_eq!(
            get(b.addrs[0]).unwrap().slot,
            0,
            "a drained slot takes no new connection"
        );
    }
    assert!(alive(worker1), "the drained slot's worker keeps running");
    // Draining the last live slot, or a slot that does not exist, is invalid and changes
    // nothing.
    for slot in ["0", "7"] {
        let e = b.cli_error(&["drain", "--slot", slot]);
        assert_eq!(e.kind, ErrorKind::Invalid, "drain --slot {slot}: {e:?}");
        assert_eq!(
            b.policy().live,
            [0],
            "drain --slot {slot} changed the tables"
        );
    }
    ok(&b.cli(&["undrain", "--slot", "1"]));
    // Scaling down to drained slots only would leave nothing taking connections: refused.
    ok(&b.cli(&["drain", "--slot", "0"]));
    let e = b.cli_error(&["workers", "scale", "1"]);
    assert_eq!(e.kind, ErrorKind::Invalid, "{e:?}");
    let status = b.status();
    assert_eq!(status.slots.len(), 2, "{status:?}");
    assert_eq!(status.slots[0].state, SlotState::Draining, "{status:?}");
    assert_eq!(status.slots[1].state, SlotState::Ready, "{status:?}");
    ok(&b.cli(&["undrain", "--slot", "0"]));
    let back = (0..400)
        .filter(|_| get(b.addrs[0]).unwrap().slot == 1)
        .count();
    assert!(back > 0, "an undrained slot takes connections again");
    assert_eq!(pids(&b.status())[1], worker1);
}

/// Sends raw bytes on a new connection to the control socket; returns the one reply frame,
/// decoded by the library.
fn raw_exchange(path: &std::path::Path, bytes: &[u8]) -> Result<Reply, ErrorReply> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    decode_reply(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

#[test]
fn the_control_socket_answers_bad_requests_and_stays_up_unchanged() {
    let b = Balancer::start(&["--workers", "2"]);
    let before = b.status();
    assert_eq!(before.slots.len(), 2, "{before:?}");
    let policy_before = b.policy();
    for (bytes, kind) in [
        (
            b"this is not a frame at all\n".to_vec(),
            ErrorKind::TooLarge,
        ),
        ((1u32 << 30).to_be_bytes().to_vec(), ErrorKind::TooLarge),
        (frame(b"{{{ not json"), ErrorKind::Malformed),
        (
            frame(br#"{"version":1,"request":{"type":"explode"}}"#),
            ErrorKind::UnknownRequest,
        ),
        (
            frame(br#"{"version":7,"request":{"type":"status"}}"#),
            ErrorKind::WrongVersion,
        ),
        (
            frame(br#"{"version":1,"request":{"type":"scale","workers":"lots"}}"#),
            ErrorKind::UnknownRequest,
        ),
    ] {
        match raw_exchange(&b.control, &bytes) {
            Err(e) => {
                assert_eq!(e.kind, kind, "{e:?}");
                assert!(!e.message.is_empty(), "{e:?}");
            }
            Ok(reply) => panic!("expected a {kind:?} error, got {reply:?}"),
        }
    }
    // A good request on the same kind of connection still works.
    match raw_exchange(
        &b.control,
        &frame(br#"{"version":1,"request":{"type":"policy"}}"#),
    ) {
        Ok(Reply::Policy(p)) => assert_eq!(p, policy_before),
        other => panic!("expected the policy, got {other:?}"),
    }
    let after = b.status();
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(after.policy, PolicyName::Cpu);
    assert_eq!(after.policy, before.policy);
    assert_eq!(b.policy(), policy_before);
    let mode = std::fs::metadata(&b.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_peer_of_another_uid_may_not_change_anything() {
    const NOBODY: u32 = 65534;
    let b = Balancer::start(&["--workers", "2"]);
    // A copy of the CLI that uid 65534 can execute, wherever the build tree is.
    let dir = unique_path("nobody");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(scratch_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = dir.join("balancer");
    std::fs::copy(balancer_bin(), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new(&cli)
            .args(args)
            .arg("--control")
            .arg(&b.control)
            .arg("--json")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let refused = |args: &[&str]| -> ErrorReply {
        let (success, out, err) = as_nobody(args);
        assert!(!success, "{args:?} as uid {NOBODY} must fail: {out}");
        parse_cli_error(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{err}"))
    };
    let before = b.status();
    assert_eq!(before.slots.len(), 2, "{before:?}");
    let policy_before = b.policy();
    // Mode 0600: the socket itself keeps other users out. The CLI cannot connect, so there is
    // no reply and no kind: its message must name the cause and the fix.
    let (success, out, err) = as_nobody(&["policy", "set", "hash"]);
    assert!(!success && err.contains("permission denied"), "{err}");
    assert!(err.contains("run as root"), "{err}");
    assert!(out.is_empty(), "no reply to print: {out}");
    // Opened up by an operator: the controller still checks SO_PEERCRED on every change.
    std::fs::set_permissions(&b.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = refused(&["policy", "set", "hash"]);
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    // No field carries the peer's uid: the message is the evidence that SO_PEERCRED was read.
    assert!(e.message.contains("uid 65534 "), "{e:?}");
    let e = refused(&["workers", "scale", "1"]);
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    let (success, out, err) = as_nobody(&["status"]);
    assert!(success, "reading is allowed to whoever can connect: {err}");
    let seen: StatusReport = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(pids(&seen), pids(&before));
    let status = b.status();
    assert_eq!(status.policy, PolicyName::Cpu);
    assert_eq!(status.slots.len(), 2, "{status:?}");
    assert_eq!(
        pids(&status),
        pids(&before),
        "nothing was restarted or scaled"
    );
    assert_eq!(b.policy(), policy_before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_json_matches_the_workers() {
    let b = Balancer::start(&["--workers", "3", "--policy", "hash"]);
    let mut served: HashMap<u32, u32> = HashMap::new();
    for _ in 0..300 {
        let a = get(b.addrs[0]).unwrap();
        served.insert(a.slot, a.pid);
    }
    let status = b.status();
    assert_eq!(status.pid, b.pid());
    assert_eq!(status.listen, [b.addrs[0].to_string()]);
    assert_eq!(status.policy, PolicyName::Hash);
    assert_eq!(status.slots.len(), 3, "{status:?}");
    for (i, s) in status.slots.iter().enumerate() {
        assert_eq!(s.slot, i as u32, "{status:?}");
        assert_eq!(s.pid, Some(served[&s.slot]), "slot {}", s.slot);
        assert_eq!(s.state, SlotState::Ready, "{s:?}");
        assert!(alive(served[&s.slot]));
    }
    assert_eq!(sum(&status, |s| s.steered), 300);
    let table = ok(&b.cli(&["status"])).to_owned();
    assert!(table.contains("SLOT") && table.contains("QUEUE"), "{table}");
}

#[test]
fn sighup_restarts_every_slot() {
    let b = Balancer::start(&["--workers", "2"]);
    let before = pids(&b.status());
    assert_eq!(before.len(), 2);
    b.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = b.status();
        let now = pids(&s);
        assert_eq!(now.len(), 2, "{s:?}");
        if now.iter().zip(&before).all(|(a, b)| a != b) && all_ready(&s, 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not restart every slot: {before:?} -> {now:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let b = Balancer::start(&["--workers", "2", "--metrics", "127.0.0.1:0", "--bpf-stats"]);
    let url = b
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .expect("metrics line")
        .trim_end_matches("/metrics")
        .to_owned();
    for _ in 0..10 {
        get(b.addrs[0]).unwrap();
    }
    let mut s = std::net::TcpStream::connect(&url).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with("balancer_selections_total{") && l.contains("path=\"cpu\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 10, "{text}");
    for family in [
        "balancer_select_errors_total",
        "balancer_worker_restarts_total",
        "balancer_accept_queue_depth",
        "balancer_worker_state{slot=\"0\",state=\"ready\"} 1",
        "balancer_policy_info{policy=\"cpu\"} 1",
        "balancer_program_runs_total",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let status = b.status();
    assert!(
        status.bpf_ns_per_selection.is_some_and(|ns| ns > 0.0),
        "{status:?}"
    );
}

#[test]
fn program_and_maps_are_pinned_for_bpftool_and_unpinned_on_exit() {
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("group");
    let b = Balancer::start(&["--workers", "2", "--bpffs-dir", dir.to_str().unwrap()]);
    let addr_dir = pinned_dir(&dir, b.addrs[0]);
    for name in [
        PROGRAM_SELECT,
        maps::SOCKETS,
        maps::CONFIG,
        maps::TABLES,
        maps::COUNTERS,
    ] {
        assert!(
            addr_dir.join(name).exists(),
            "{name} pinned under {}",
            addr_dir.display()
        );
    }
    let (status, _) = b.stop();
    assert!(status.success());
    assert!(!dir.exists(), "unpinned on a clean exit");
}

#[test]
fn a_second_controller_on_the_same_control_socket_is_refused() {
    let b = Balancer::start(&["--workers", "1"]);
    let f = run_to_end(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--control",
            b.control.to_str().unwrap(),
        ],
        |_| {},
    );
    assert!(!f.status.success());
    assert!(
        f.stderr.contains(&format!(
            "another balancer (pid {}) is already running",
            b.pid()
        )),
        "{}",
        f.stderr
    );
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
