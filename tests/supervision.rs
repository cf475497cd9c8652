//! Supervision against the real kernel: a killed worker loses no queued connection, a crash
//! loop is backed off, shutdown is orderly, and workers outlive a killed controller.
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    alive, balancer_bin, get, online_cpus, pin_thread, read_answer, send_request, wait_gone,
    Balancer, SlotState,
};

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid we were told about.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill({pid}, {sig})"
    );
}

/// The victim worker is stopped (so nothing it accepted is in flight), connections queue on
/// its socket, then it is SIGKILLed while a client keeps connecting: every connection must be
/// answered, the queued ones by the successor on the same socket.
#[test]
fn sigkill_of_a_worker_loses_no_connection() {
    const QUEUED: usize = 50;
    const DURING: usize = 200;
    let cpus = online_cpus();
    let n = cpus.len();
    let victim_cpu = *cpus.last().unwrap();
    let victim_slot = (n - 1) as u32;
    // Load awareness off: this test is about supervision alone, so every connection made on
    // the victim's CPU must queue on the victim's socket (no spill, no stall evacuation).
    let mut b = Balancer::start(&[
        "--policy",
        "cpu",
        "--workers",
        &n.to_string(),
        "--spill-depth",
        "0",
        "--stall-timeout",
        "0",
    ]);
    let addr = b.addrs[0];

    // A steady client on another CPU, bounded in count and time, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let steady = (n > 1).then(|| {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let cpu = cpus[0];
        thread::spawn(move || {
            pin_thread(cpu);
            let deadline = Instant::now() + Duration::from_secs(30);
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                match get(addr) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(1));
            }
        })
    });

    let (old_pid, answers) = thread::spawn(move || {
        pin_thread(victim_cpu);
        let warm: Vec<_> = (0..20)
            .map(|_| get(addr).expect("warm-up request"))
            .collect();
        assert!(warm.iter().all(|a| a.slot == victim_slot), "{warm:?}");
        let old_pid = warm[0].pid;
        kill(old_pid, libc::SIGSTOP);
        let queued: Vec<_> = (0..QUEUED)
            .map(|i| send_request(addr).unwrap_or_else(|e| panic!("queued connection {i}: {e}")))
            .collect();
        kill(old_pid, libc::SIGKILL);
        let mut during = Vec::new();
        for i in 0..DURING {
            during.push(
                send_request(addr).unwrap_or_else(|e| panic!("connection {i} after the kill: {e}")),
            );
            thread::sleep(Duration::from_millis(2));
        }
        let answers: Vec<_> = queued
            .into_iter()
            .chain(during)
            .enumerate()
            .map(|(i, s)| read_answer(s).unwrap_or_else(|e| panic!("connection {i} lost: {e}")))
            .collect();
        (old_pid, answers)
    })
    .join()
    .unwrap();

    let (queued, during) = answers.split_at(QUEUED);
    let successor = queued[0].pid;
    assert_ne!(
        successor, old_pid,
        "queued connections were answered by the successor"
    );
    assert!(
        queued
            .iter()
            .all(|a| a.slot == victim_slot && a.pid == successor),
        "every queued connection is accepted by the new worker on the same socket: {queued:?}"
    );
    if n > 1 {
        assert!(
            during.iter().any(|a| a.slot != victim_slot),
            "while the slot was down its CPU's connections went to live slots"
        );
    }
    assert!(during.iter().all(|a| a.pid != old_pid));

    let status = b.status();
    assert_eq!(status.slots.len(), n, "{status:?}");
    let victim = &status.slots[victim_slot as usize];
    assert_eq!(victim.slot, victim_slot, "{victim:?}");
    assert_eq!(victim.restarts, 1, "{victim:?}");
    assert_eq!(victim.pid, Some(successor), "{victim:?}");
    assert_eq!(victim.state, SlotState::Ready, "{victim:?}");
    // The SIGUSR1 table of the running controller says the same.
    let table = b.report();
    assert_eq!(table.rows.len(), n, "{table:?}");
    let row = &table.rows[victim_slot as usize];
    assert_eq!(
        (row.slot, row.pid, row.state, row.restarts),
        (victim_slot, Some(successor), SlotState::Ready, 1),
        "{table:?}"
    );
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = steady {
        t.join().unwrap();
    }
    let (status, report) = b.stop();
    assert!(status.success());
    assert_eq!(report.rows.len(), n, "{report:?}");
    assert!(
        report.rows.iter().all(|r| r.counters.select_error == 0),
        "{report:?}"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "steady client failures");
    println!(
        "killed worker {old_pid}: {} queued + {} later connections answered, steady client {} ok / {} failed",
        queued.len(),
        during.len(),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
}

#[test]
fn a_crash_loop_is_backed_off() {
    let mut b = balancer_tests::Balancer::start_unready(&["--workers", "1", "--", "/bin/false"]);
    thread::sleep(Duration::from_secs(3));
    assert!(b
        .wait_line(|l| l.starts_with("ready:"), Duration::ZERO)
        .is_none());
    let log = b.stderr();
    let starts = log.matches("slot 0: started worker").count();
    // 100 ms, 200 ms, 400 ms, 800 ms, 1.6 s: five starts in three seconds, not hundreds.
    assert!((3..=7).contains(&starts), "{starts} starts in 3 s:\n{log}");
    assert!(
        log.contains("exited with status 1"),
        "the reason is logged:\n{log}"
    );
    assert!(log.contains("crash loop"), "{log}");
    let (status, _) = b.stop();
    assert!(status.success());
}

/// The distinct pids that answered 200 connections (by hash they reach every live worker).
fn answering_pids(b: &Balancer) -> Vec<u32> {
    let mut pids: Vec<u32> = (0..200).map(|_| get(b.addrs[0]).unwrap().pid).collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The pids of the workers answering, once all `n` of them are known to be up.
fn serving_pids(b: &Balancer, n: usize) -> Vec<u32> {
    let pids = answering_pids(b);
    assert_eq!(pids.len(), n, "every worker answers");
    pids
}

#[test]
fn sigterm_stops_every_worker_and_exits_zero() {
    let mut b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let pids = serving_pids(&b, 2);
    let (status, report) = b.stop();
    assert!(status.success(), "{status}");
    assert_eq!(report.rows.len(), 2, "{report:?}");
    assert!(
        report
            .rows
            .iter()
            .all(|r| r.state == SlotState::Stopped && r.pid.is_none()),
        "{report:?}"
    );
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(2)),
            "worker {pid} outlived the controller"
        );
    }
}

#[test]
fn workers_keep_serving_when_the_controller_is_killed() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let addr = b.addrs[0];
    let pids = serving_pids(&b, 2);
    // SIGKILL of the controller alone; whatever still runs of its tag is killed when `crashed`
    // is dropped, after the assertions.
    let crashed = b.crash();
    let mut answered_by = std::collections::HashSet::new();
    for _ in 0..200 {
        let a = get(addr).expect("a worker answers without its controller");
        answered_by.insert(a.pid);
    }
    let mut expected: Vec<u32> = pids.clone();
    expected.sort_unstable();
    let mut got: Vec<u32> = answered_by.into_iter().collect();
    got.sort_unstable();
    assert_eq!(got, expected, "both workers serve on");
    for pid in pids {
        assert!(
            balancer_tests::alive(pid),
            "worker {pid} died with the controller"
        );
    }
    drop(crashed);
}

/// The controller is its workers' subreaper: what a worker forks and orphans is reparented
/// to the controller, which reaps it (no zombie, nothing lost to init).
#[test]
fn a_workers_orphaned_children_are_reaped_by_the_controller() {
    let bin = balancer_bin();
    let script = format!("(sleep 60 &); exec {} demo-worker", bin.display());
    let mut b = Balancer::start(&["--workers", "1", "--", "sh", "-c", &script]);
    let controller = b.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    let orphan = loop {
        let found = balancer_tests::tagged_pids(b.tag()).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's sleep never showed up"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let ppid = std::fs::read_to_string(format!("/proc/{orphan}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
        });
    assert_eq!(ppid, Some(controller), "the orphan went to the controller");
    kill(orphan, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the orphan was not reaped (zombie)"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let (status, _) = b.stop();
    assert!(status.success());
}

/// A socket-activated server that does not speak sd_notify: here the demo worker with
/// NOTIFY_SOCKET removed, started through `env` like any third-party command.
#[test]
fn a_worker_without_sd_notify_is_ready_after_the_timeout() {
    let bin = balancer_bin();
    let started = Instant::now();
    let mut b = Balancer::start(&[
        "--workers",
        "2",
        "--ready-timeout",
        "400ms",
        "--",
        "env",
        "-u",
        "NOTIFY_SOCKET",
        bin.to_str().unwrap(),
        "demo-worker",
    ]);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let log = b.wait_stderr(
        |l| l.contains("no READY=1 within 400ms"),
        Duration::from_secs(5),
    );
    assert!(log.contains("no READY=1 within 400ms"), "{log}");
    for _ in 0..20 {
        get(b.addrs[0]).expect("served by the socket-activated worker");
    }
    let (status, _) = b.stop();
    assert!(status.success());
}

/// A worker that ignores SIGTERM (and whose `sleep` children inherit that) keeps running
/// through the grace, is SIGKILLed when it runs out, and the controller still exits 0.
#[test]
fn a_worker_that_ignores_sigterm_is_killed_after_the_grace() {
    const GRACE: Duration = Duration::from_secs(1);
    /// How long before the grace runs out the worker must still be seen alive.
    const BEFORE: Duration = Duration::from_millis(200);
    let mut b = Balancer::start(&[
        "--workers",
        "1",
        "--ready-timeout",
        "100ms",
        "--grace",
        "1s",
        "--",
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 1; done",
    ]);
    let status = b.status();
    assert_eq!(status.slots.len(), 1, "{status:?}");
    assert_eq!(status.slots[0].state, SlotState::Ready, "{status:?}");
    let worker = status.slots[0].pid.expect("slot 0 has a worker");
    assert!(alive(worker));

    let sent = Instant::now();
    b.signal(libc::SIGTERM);
    // The controller's grace starts when it gets the signal, after `sent`: until then the
    // worker must survive its SIGTERM.
    while sent.elapsed() < GRACE - BEFORE {
        assert!(
            alive(worker),
            "worker {worker} died {:?} after the controller's SIGTERM, within the {GRACE:?} grace",
            sent.elapsed()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        wait_gone(worker, Duration::from_secs(5)),
        "worker {worker} still runs {:?} after SIGTERM, past the {GRACE:?} grace",
        sent.elapsed()
    );
    let gone = sent.elapsed();
    assert!(
        gone >= GRACE,
        "worker {worker} went after {gone:?}, before the grace"
    );
    let (status, report, log) = b.wait_exit();
    let stopped = sent.elapsed();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        stopped >= GRACE,
        "the stop took {stopped:?}, less than the grace"
    );
    assert_eq!(report.rows.len(), 1, "{report:?}");
    let row = &report.rows[0];
    assert_eq!(
        (row.slot, row.pid, row.state, row.restarts),
        (0, None, SlotState::Stopped, 0),
        "{report:?}"
    );
}

/// An upgrade replaces the balancer binary under a running controller: respawns must still
/// work (the trampoline and the demo worker come from /proc/self/exe, not the path).
#[test]
fn workers_respawn_after_the_binary_was_replaced_on_disk() {
    let dir = balancer_tests::unique_path("upgrade");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("balancer");
    std::fs::copy(balancer_bin(), &copy).unwrap();
    let mut b = Balancer::start_binary(&copy, &["--workers", "2", "--policy", "hash"]);
    b.wait_line(|l| l.starts_with("ready:"), balancer_tests::START_TIMEOUT)
        .expect("ready");
    let before = serving_pids(&b, 2);
    std::fs::remove_dir_all(&dir).unwrap();
    kill(before[0], libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Until the successor is ready its slot is out of the tables, so fewer pids answer.
        let now = answering_pids(&b);
        if now.len() == 2 && !now.contains(&before[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no respawn after the binary was removed:\n{}",
            b.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(!b.stderr().contains("cannot start"), "{}", b.stderr());
}

/// `--user`: the worker runs as that user, with no capability left and no way back to root,
/// and still serves, and still reports READY=1 (the only way to be ready here).
#[test]
fn workers_run_unprivileged_with_user() {
    let mut b = Balancer::start(&[
        "--workers",
        "1",
        "--user",
        "65534:65534",
        "--ready-timeout",
        "60s",
    ]);
    let pid = b.status().slots[0].pid.expect("a worker");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "65534");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    let a = get(b.addrs[0]).expect("the unprivileged worker serves");
    assert_eq!(a.pid, pid);
    let (exit, _) = b.stop();
    assert!(exit.success());
}
