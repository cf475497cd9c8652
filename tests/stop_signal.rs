//! `--stop-signal` against a worker that exits at once on SIGTERM, cutting the connections in
//! its hands, and drains only on SIGINT (tests/workers/term_exits_int_drains.py: each answer
//! takes 100 ms, so it always holds some). Rolling restarts under load lose connections with
//! the default signal and none with `--stop-signal INT`.
use std::{
    path::PathBuf,
    sync::{atomic::AtomicU32, Arc},
    time::Duration,
};

use balancer_tests::{ok, pids, wait_gone, Balancer, Load};

/// Client threads: enough that every worker always has answers in progress.
const CLIENTS: usize = 8;
/// Rolling restarts per run.
const ROUNDS: usize = 2;
/// Answers per client thread between steps (each takes 100 ms).
const STEP: u64 = 5;

fn worker_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workers/term_exits_int_drains.py")
}

/// Rolling restarts under load with `stop_args`; returns (connections answered, failed).
fn restarts_under_load(stop_args: &[&str]) -> (usize, u64) {
    let python = "/usr/bin/python3";
    assert!(
        std::path::Path::new(python).exists(),
        "{python} is missing: run `cargo xtask setup` (gunicorn's package brings it)"
    );
    let script = worker_script();
    let mut args = vec![
        "--workers",
        "2",
        "--policy",
        "hash",
        "--ready-timeout",
        "300ms",
    ];
    args.extend(stop_args);
    args.extend(["--", python, script.to_str().unwrap()]);
    let b = Balancer::start(&args);
    let load = Load::start(b.addrs[0], &[None; CLIENTS], Arc::new(AtomicU32::new(0)));
    load.wait_answers(STEP);
    for _ in 0..ROUNDS {
        let before = pids(&b.status());
        ok(&b.cli(&["workers", "restart"]));
        for old in &before {
            assert!(
                wait_gone(*old, Duration::from_secs(10)),
                "old worker {old} still runs"
            );
        }
        load.wait_answers(STEP);
    }
    let (answers, failed) = load.finish();
    (answers.iter().map(Vec::len).sum(), failed)
}

#[test]
fn the_workers_own_stop_signal_loses_nothing_where_sigterm_cuts_connections() {
    let (answered, failed) = restarts_under_load(&["--stop-signal", "INT"]);
    println!("--stop-signal INT: {answered} answered, {failed} failed");
    assert_eq!(
        failed, 0,
        "SIGINT lets the old worker finish what it accepted"
    );
    let (answered, failed) = restarts_under_load(&[]);
    println!("default (SIGTERM): {answered} answered, {failed} failed");
    assert!(
        failed > 0,
        "the worker exits at once on SIGTERM with answers in progress: the default signal must cost connections here, or this test shows nothing"
    );
}
