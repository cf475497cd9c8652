//! The controller is not a single point of failure: killed, its workers keep serving; started
//! again with the same arguments, it adopts them (same pids, same sockets, counters kept)
//! and controls them as its own. Every load loop is bounded; every process is cleaned up by
//! the harness's tag, even when a test fails.
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use balancer_common::PROGRAM_SELECT;
use balancer_tests::{
    alive, get, open_loop, pinned_dir, run_to_end, tagged_pids, wait_gone, Balancer, BpfFs, Fate,
    SlotState,
};

/// Connections whose first byte took longer than this count as slow.
const SLOW: Duration = Duration::from_secs(1);

/// A closed-loop client (one connection after another), bounded in count and time.
struct Steady {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl Steady {
    fn start(addr: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            for _ in 0..200_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                match get(addr) {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("steady client: {e}");
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
        Self {
            stop,
            ok,
            failed,
            thread,
        }
    }

    /// Waits until `n` more answers came in (the load really runs at this point).
    fn wait_answers(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the steady client stalled");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("steady client");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn worker_pids(b: &Balancer) -> Vec<u32> {
    let status = b.status();
    status
        .slots
        .iter()
        .map(|s| s.pid.expect("every slot has a worker"))
        .collect()
}

/// Sends `sig` to a worker of this test.
fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a worker of this test.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill({pid}, {sig})"
    );
}

/// SIGKILLs a worker of this test and waits until it is gone.
fn kill_worker(pid: u32) {
    // SAFETY: kill(2) on a worker of this test.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "worker {pid} survived SIGKILL"
    );
}

fn steered(b: &Balancer) -> u64 {
    b.status().slots.iter().map(|s| s.steered).sum()
}

#[test]
fn a_killed_controller_loses_no_connection_and_a_restart_adopts_its_workers() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let addr = b.addrs[0];
    let before = worker_pids(&b);
    assert_eq!(before.len(), 2);
    let controller = b.pid();
    let steady = Steady::start(addr);
    steady.wait_answers(50);
    // 1000 connections/s open loop across the kill and the restart.
    let open = thread::spawn(move || open_loop(addr, 1000, Duration::from_secs(3), SLOW * 5));
    thread::sleep(Duration::from_millis(500));
    let crashed = b.crash();
    assert!(!alive(controller));
    // Without a controller the workers serve on.
    steady.wait_answers(50);
    for pid in &before {
        assert!(alive(*pid), "worker {pid} died with the controller");
    }
    let counted = Instant::now();
    let mut b = crashed.restart();
    let adoption = counted.elapsed();
    assert!(
        b.stdout_lines()
            .iter()
            .any(|l| l.starts_with("adopted 2 worker(s) of group")),
        "{:?}",
        b.stdout_lines()
    );
    let fates = open.join().expect("open-loop client");
    steady.wait_answers(50);
    let (ok, failed) = steady.finish();
    let slow = fates
        .iter()
        .filter(|f| !matches!(f, Fate::Answered(t) if *t <= SLOW))
        .count();
    eprintln!(
        "controller kill -9 + restart: open loop {} connections, {slow} slow or failed; closed loop {ok} ok, {failed} failed; adoption took {adoption:?}",
        fates.len()
    );
    assert_eq!(fates.len(), 3000);
    assert_eq!(slow, 0, "connections over 1 s or failed across the crash");
    assert_eq!(failed, 0);
    // The same workers, now the new controller's.
    assert_eq!(worker_pids(&b), before);
    let status = b.status();
    assert_ne!(status.pid, controller);
    assert!(status.slots.iter().all(|s| s.state == SlotState::Ready));
    // Counters continue: what the dead controller's program counted is kept.
    assert!(steered(&b) as usize >= fates.len(), "counters were reset");
    let (exit, _) = b.stop();
    assert!(exit.success(), "{exit}");
    for pid in before {
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "worker {pid} survived SIGTERM"
        );
    }
}

#[test]
fn an_adopted_group_is_controlled_like_one_the_controller_started() {
    // No stall detection: the stopped worker's queue must wait for its successor.
    let b = Balancer::start(&["--workers", "2", "--policy", "hash", "--stall-timeout", "0"]);
    let addr = b.addrs[0];
    let mut b = b.crash().restart();
    let adopted = worker_pids(&b);
    // A killed adopted worker is respawned on its slot's socket and serves what queued there:
    // stopped first, so that it holds no accepted connection when it dies (what a worker had
    // accepted dies with it; what waits in the queue must not).
    kill(adopted[0], libc::SIGSTOP);
    let queued: Vec<_> = (0..60)
        .map(|_| balancer_tests::send_request(addr).expect("connected"))
        .collect();
    kill(adopted[0], libc::SIGKILL);
    let answers: Vec<_> = queued
        .into_iter()
        .map(|s| balancer_tests::read_answer(s).expect("a queued connection was lost"))
        .collect();
    let successor = b.status().slots[0].pid.expect("slot 0 respawned");
    assert_ne!(successor, adopted[0]);
    assert!(
        answers.iter().any(|a| a.pid == successor),
        "slot 0's queue was served by its successor"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = b.status();
        if s.slots[0].state == SlotState::Ready {
            assert_eq!(s.slots[0].restarts, 1);
            break;
        }
        assert!(Instant::now() < deadline, "slot 0 was not respawned: {s:?}");
        thread::sleep(Duration::from_millis(20));
    }
    let steady = Steady::start(addr);
    steady.wait_answers(20);
    let ok = |args: &[&str]| {
        let f = b.cli(args);
        assert!(f.status.success(), "{args:?}: {}", f.stderr);
    };
    ok(&["policy", "set", "hash"]);
    assert_eq!(
        b.status().policy,
        balancer::control::protocol::PolicyName::Hash
    );
    ok(&["drain", "--slot", "1"]);
    assert_eq!(b.status().slots[1].state, SlotState::Draining);
    ok(&["undrain", "--slot", "1"]);
    let before = worker_pids(&b);
    ok(&["workers", "restart"]);
    let after = worker_pids(&b);
    assert_eq!(after.len(), 2);
    assert!(
        before.iter().zip(&after).all(|(a, b)| a != b),
        "{before:?} -> {after:?}"
    );
    ok(&["workers", "scale", "3"]);
    assert_eq!(b.status().slots.len(), 3);
    ok(&["workers", "scale", "2"]);
    assert_eq!(b.status().slots.len(), 2);
    steady.wait_answers(20);
    let (_, failed) = steady.finish();
    assert_eq!(failed, 0);
    let (exit, _) = b.stop();
    assert!(exit.success(), "{exit}");
    // The adopted worker that the restart replaced is gone too.
    assert!(wait_gone(adopted[1], Duration::from_secs(10)));
}

#[test]
fn a_worker_that_dies_while_no_controller_runs_gets_a_successor_after_adoption() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let addr = b.addrs[0];
    let before = worker_pids(&b);
    let crashed = b.crash();
    kill_worker(before[1]);
    // The other slot serves everything meanwhile (the program's selections of the dead
    // slot fail over to a live one).
    for _ in 0..100 {
        let a = get(addr).expect("answered without a controller");
        assert_eq!(a.pid, before[0]);
    }
    let mut b = crashed.restart();
    assert!(b
        .stdout_lines()
        .iter()
        .any(|l| l.starts_with("adopted 1 worker(s) of group")));
    let after = worker_pids(&b);
    assert_eq!(after[0], before[0], "the live worker is adopted");
    assert_ne!(after[1], before[1]);
    let served: std::collections::HashSet<u32> =
        (0..200).map(|_| get(addr).expect("answered").pid).collect();
    assert_eq!(served.len(), 2, "both slots serve again: {served:?}");
    let (exit, _) = b.stop();
    assert!(exit.success());
}

#[test]
fn a_group_whose_workers_are_all_gone_starts_anew() {
    let bpffs = BpfFs::mount();
    let under = bpffs.path().join("group");
    let dir = under.to_str().expect("utf-8 path").to_owned();
    let b = Balancer::start(&["--workers", "2", "--bpffs-dir", &dir]);
    let tag = b.tag().to_owned();
    let pins = pinned_dir(&under, b.addrs[0]);
    let program_id = |pins: &std::path::Path| {
        aya::programs::SkReuseport::from_pin(
            pins.join(PROGRAM_SELECT),
            aya::programs::SkReuseportAttachType::SelectOrMigrate,
        )
        .expect("the program is pinned")
        .info()
        .expect("program info")
        .id()
    };
    let stale = program_id(&pins);
    let before = worker_pids(&b);
    let crashed = b.crash();
    for pid in &before {
        kill_worker(*pid);
    }
    // The dead controller's pins are still there...
    assert_eq!(program_id(&pins), stale);
    let mut b = crashed.restart();
    assert!(
        !b.stdout_lines().iter().any(|l| l.starts_with("adopted")),
        "{:?}",
        b.stdout_lines()
    );
    // ... until the new controller replaced them with its own.
    assert_ne!(program_id(&pins), stale, "stale pins were kept");
    let after = worker_pids(&b);
    assert!(after.iter().all(|p| !before.contains(p)));
    assert!(get(b.addrs[0]).is_ok());
    let (exit, _) = b.stop();
    assert!(exit.success());
    assert!(!pins.exists(), "pins left after a clean stop");
    assert!(tagged_pids(&tag).is_empty(), "{:?}", tagged_pids(&tag));
}

#[test]
fn a_live_controller_keeps_its_group() {
    let mut b = Balancer::start(&["--workers", "1"]);
    let listen = b.addrs[0].to_string();
    let f = run_to_end(
        &[
            "run",
            "--listen",
            &listen,
            "--control",
            "/nonexistent/x.sock",
        ],
        |_| {},
    );
    assert!(!f.status.success());
    assert!(
        f.stderr
            .contains(&format!("live controller (pid {})", b.pid())),
        "{}",
        f.stderr
    );
    assert!(get(b.addrs[0]).is_ok());
    let (exit, _) = b.stop();
    assert!(exit.success());
}

#[test]
fn a_reused_pid_is_never_adopted_or_signalled() {
    use balancer::group_state::GroupRecord;
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let addr = b.addrs[0];
    let before = worker_pids(&b);
    let crashed = b.crash();
    // Slot 0's worker dies and its pid is "reused": the record is made to name another
    // process (a test child) under the dead worker's start time.
    kill_worker(before[0]);
    let mut impostor = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    let dir = std::path::PathBuf::from(format!(
        "{}/127_0_0_1_{}",
        balancer::group_state::STATE_ROOT,
        addr.port()
    ));
    let mut record = GroupRecord::load(&dir)
        .expect("readable record")
        .expect("the dead controller's record");
    let worker = record.slots[0].worker.as_mut().expect("slot 0's worker");
    assert_eq!(worker.process.pid, before[0]);
    worker.process.pid = impostor.id();
    record.save(&dir).expect("record rewritten");
    let mut b = crashed.restart();
    assert!(b
        .stdout_lines()
        .iter()
        .any(|l| l.starts_with("adopted 1 worker(s) of group")));
    let after = worker_pids(&b);
    assert_ne!(after[0], impostor.id(), "a reused pid was adopted");
    assert_eq!(after[1], before[1]);
    let (exit, _) = b.stop();
    assert!(exit.success());
    let untouched = matches!(impostor.try_wait(), Ok(None));
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(untouched, "the process on the reused pid was signalled");
}

/// A worker adopted before it was ready still reports READY=1 to the controller that adopted
/// it: the notify socket's path belongs to the group, not to one controller.
#[test]
fn an_adopted_worker_that_was_still_starting_reports_ready_to_its_new_controller() {
    let bin = balancer_tests::balancer_bin();
    let script = format!("sleep 2; exec {} demo-worker", bin.display());
    // Ready only by READY=1: the timeout is far beyond what this test waits.
    let b = Balancer::start_unready(&[
        "--workers",
        "1",
        "--ready-timeout",
        "60s",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let mut b = b.crash().restart_unready();
    let started = Instant::now();
    let ready = b.wait_line(|l| l.starts_with("ready:"), Duration::from_secs(20));
    assert!(
        ready.is_some(),
        "the adopted worker's READY=1 never reached the new controller: {}",
        b.stderr()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(b.status().slots[0].state, SlotState::Ready);
    let (exit, _) = b.stop();
    assert!(exit.success());
}
