//! The controller's own cost as `status` reports it: the sampling pace in force (slowed down
//! while every queue is empty, fast while one is not, none when nothing reads the load
//! signal) and its CPU time. How small that CPU time is belongs to `cargo xtask bench`.
use std::{
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{ok, Balancer, SamplingPace, StatusReport};

const FAST: SamplingPace = SamplingPace::Fast { every_us: 1000 };
const IDLE: SamplingPace = SamplingPace::Idle { every_us: 50_000 };

/// Waits (bounded) for a status that `ok` accepts; panics with the last one.
fn wait_status(b: &Balancer, what: &str, ok: impl Fn(&StatusReport) -> bool) -> StatusReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = b.status();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_reports_the_slow_pace_when_idle_and_the_fast_one_under_a_queue() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let idle = wait_status(&b, "slowed down when idle", |s| s.sampling == Some(IDLE));
    assert!(idle.controller_cpu_secs > 0.0, "{idle:?}");
    assert!(idle.controller_cpu_window_secs > 0.0, "{idle:?}");
    // Both workers stopped: every connection stays queued.
    let pids: Vec<i32> = idle
        .slots
        .iter()
        .filter_map(|s| s.pid)
        .map(|p| p as i32)
        .collect();
    assert_eq!(pids.len(), 2, "{idle:?}");
    for pid in &pids {
        // SAFETY: kill(2) on the balancer's worker.
        assert_eq!(unsafe { libc::kill(*pid, libc::SIGSTOP) }, 0);
    }
    let clients: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(b.addrs[0]).expect("connect"))
        .collect();
    let busy = wait_status(&b, "fast under a queue", |s| {
        s.sampling == Some(FAST) && s.slots.iter().map(|s| s.queue).sum::<u32>() > 0
    });
    for pid in &pids {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(*pid, libc::SIGCONT) }, 0);
    }
    drop(clients);
    // Drained (and every stall over): slow again.
    wait_status(&b, "slowed down again", |s| s.sampling == Some(IDLE));
    assert_eq!(busy.sample_interval_us, 1000);
}

#[test]
fn nothing_is_sampled_when_nothing_reads_the_load_signal() {
    let b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--spill-depth",
        "0",
        "--stall-timeout",
        "0",
    ]);
    assert_eq!(b.status().sampling, Some(SamplingPace::Off));
    // A policy that reads the depths turns sampling on at once.
    ok(&b.cli(&["policy", "set", "least-loaded"]));
    assert_eq!(b.status().sampling, Some(FAST));
}
