//! Real servers as workers, unchanged, under load from a plain HTTP client: nginx through its
//! own socket inheritance (`--socket-protocol nginx`, stopped with QUIT), lighttpd (stopped
//! with INT) and gunicorn by socket activation. Each serves on every slot, goes through a
//! rolling restart, a scale down and up, and a `kill -9` of a slot's worker, without a single
//! failed connection. The configurations are docs/workers.md's recipes.
use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    all_ready, free_loopback_addr, group_members, ok, pids, wait_gone, Balancer, HttpAnswer,
    HttpLoad, Server, StatusReport,
};

/// Answers to wait for between two steps: enough that every slot took some.
const STEP_ANSWERS: u64 = 200;
const CLIENTS: usize = 2;

/// Each slot's `steered` counter.
fn steered(status: &StatusReport) -> Vec<u64> {
    status.slots.iter().map(|s| s.steered).collect()
}

/// Waits until `check` holds for the controller's status (20 s at most).
fn wait_status(b: &Balancer, what: &str, check: impl Fn(&StatusReport) -> bool) -> StatusReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = b.status();
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `STEP_ANSWERS` more answers, then checks that every slot's counter moved since
/// `before` (each slot's server accepted connections: none were left queued to time out).
fn every_slot_serves(b: &Balancer, load: &HttpLoad, before: &[u64], step: &str) -> Vec<u64> {
    load.wait_answers(STEP_ANSWERS);
    let after = steered(&b.status());
    assert_eq!(after.len(), before.len(), "{step}: {before:?} -> {after:?}");
    assert!(
        after.iter().zip(before).all(|(a, b)| a > b),
        "{step}: every slot takes connections: {before:?} -> {after:?}"
    );
    assert_eq!(load.failed(), 0, "{step}: failed connections");
    after
}

/// What identifies the slot that answered, for the servers that can say it.
fn answering_slot(server: Server, a: &HttpAnswer) -> Option<String> {
    match server {
        Server::Nginx => None,
        Server::Lighttpd => a.header("X-Balancer-Slot").map(str::to_owned),
        Server::Gunicorn => a
            .body
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("slot="))
            .map(str::to_owned),
    }
}

fn serve_through_everything(server: Server) {
    if !server.available() {
        return;
    }
    let addr = free_loopback_addr();
    // Dropped after the controller: kills the servers of a failed test.
    let run = server.setup(addr, 2);
    let mut b = Balancer::start(&run.args());
    assert_eq!(b.addrs, [addr]);
    let load = HttpLoad::start(addr, CLIENTS);
    let zero = vec![0; 2];
    let counts = every_slot_serves(&b, &load, &zero, "at start");

    // A rolling restart: each new server starts on the slot's socket, the old one gets the
    // stop signal once the new one is ready (taken as ready after --ready-timeout).
    let before = pids(&b.status());
    ok(&b.cli(&["workers", "restart"]));
    for old in &before {
        assert!(
            wait_gone(*old, Duration::from_secs(10)),
            "old {server:?} {old} still runs after its stop signal"
        );
    }
    let after = pids(&b.status());
    assert!(
        before.iter().zip(&after).all(|(a, b)| a != b),
        "{before:?} -> {after:?}"
    );
    let counts = every_slot_serves(&b, &load, &counts, "after the rolling restart");

    // Down to one slot (its socket closes, what was queued moves) and back to two.
    ok(&b.cli(&["workers", "scale", "1"]));
    let removed = after[1];
    assert!(
        wait_gone(removed, Duration::from_secs(10)),
        "slot 1's {server:?} {removed} still runs"
    );
    every_slot_serves(&b, &load, &counts[..1], "scaled down to 1");
    ok(&b.cli(&["workers", "scale", "2"]));
    wait_status(&b, "scaled up to 2", |s| all_ready(s, 2));
    let counts = every_slot_serves(&b, &load, &[counts[0], 0], "scaled up to 2");

    // kill -9 of slot 0's server, with no request of ours in its hands: a new one starts on
    // the same socket (slot 0's counter moves on) and what the dead one forked is gone too.
    let victim = pids(&b.status())[0];
    let group = group_members(victim);
    assert!(group.contains(&victim), "{group:?}");
    load.pause();
    // SAFETY: kill(2) on the worker the controller reported.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let status = wait_status(&b, "slot 0 respawned", |s| {
        all_ready(s, 2) && s.slots[0].pid.is_some_and(|p| p != victim)
    });
    assert_eq!(status.slots[0].restarts, 2, "{status:?}");
    for p in &group {
        assert!(
            wait_gone(*p, Duration::from_secs(5)),
            "pid {p} of the killed {server:?}'s group still runs"
        );
    }
    // Only now: until the controller reaped the master and killed what it left, a request
    // could land in an orphaned nginx worker and be cut with it.
    load.resume();
    every_slot_serves(&b, &load, &counts, "after kill -9");

    let (answers, failed) = load.finish();
    assert_eq!(failed, 0, "failed connections");
    let slots: BTreeSet<String> = answers
        .iter()
        .filter_map(|a| answering_slot(server, a))
        .collect();
    if server != Server::Nginx {
        assert_eq!(
            slots,
            ["0", "1"].map(str::to_owned).into(),
            "both slots answered"
        );
    }
    let final_steered = steered(&b.status());
    // The controller's own stop: new connections refused, queues drained, then the stop
    // signal; each server exits by itself within the grace.
    let (exit, report) = b.stop();
    assert!(exit.success(), "{exit:?}");
    assert!(report.rows.iter().all(|r| r.pid.is_none()), "{report:?}");
    let left = run.processes();
    assert!(
        left.is_empty(),
        "{server:?} processes left after the stop: {left:?}"
    );
    println!(
        "{server:?}: {} connections answered, {failed} failed; final steered per slot {:?}",
        answers.len(),
        final_steered
    );
}

#[test]
fn nginx_serves_through_restart_scale_and_kill() {
    serve_through_everything(Server::Nginx);
}

#[test]
fn lighttpd_serves_through_restart_scale_and_kill() {
    serve_through_everything(Server::Lighttpd);
}

#[test]
fn gunicorn_serves_through_restart_scale_and_kill() {
    serve_through_everything(Server::Gunicorn);
}
