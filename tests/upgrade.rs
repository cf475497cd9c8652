//! `balancer upgrade`: a new controller process takes the group over with zero loss; one that
//! fails leaves the old one in charge.
use std::{
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    alive, get, open_loop, run_to_end, unique_path, wait_gone, Balancer, ErrorKind, Fate,
};

#[test]
fn an_upgrade_under_load_keeps_every_worker_and_loses_nothing() {
    let mut b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let addr = b.addrs[0];
    let old = b.pid();
    let before: Vec<u32> = b.status().slots.iter().filter_map(|s| s.pid).collect();
    assert_eq!(before.len(), 2);
    // The new version: a copy of the binary at another path.
    let next = unique_path("balancer-next");
    std::fs::copy(balancer_tests::balancer_bin(), &next).expect("copy the binary");
    let open = thread::spawn(move || {
        open_loop(addr, 1000, Duration::from_secs(3), Duration::from_secs(5))
    });
    thread::sleep(Duration::from_millis(700));
    let steered_before: u64 = b.status().slots.iter().map(|s| s.steered).sum();
    assert!(steered_before > 0);
    // Status requests all through the handover: each is answered, by one controller or the
    // other.
    let control = b.control.to_str().expect("utf-8 path").to_owned();
    let stop_polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = stop_polling.clone();
        thread::spawn(move || {
            let mut answers = Vec::new();
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let f = run_to_end(&["status", "--json", "--control", &control], |_| {});
                answers.push(
                    serde_json::from_str::<balancer_tests::StatusReport>(&f.stdout)
                        .map(|s| s.pid)
                        .map_err(|e| format!("{}: {e}; {}", f.status, f.stderr)),
                );
            }
            answers
        })
    };
    let started = Instant::now();
    let f = b.cli(&["upgrade", "--binary", next.to_str().expect("utf-8 path")]);
    let took = started.elapsed();
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    let reply = f.stdout.trim().to_owned();
    assert!(
        reply.starts_with(&format!("upgraded: controller pid {old} (")),
        "{reply}"
    );
    let new: u32 = reply
        .split("-> pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {reply:?}"));
    assert_ne!(new, old);
    let fates = open.join().expect("open-loop client");
    stop_polling.store(true, std::sync::atomic::Ordering::Relaxed);
    let polled = poller.join().expect("status poller");
    let failed: Vec<_> = polled.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "status requests lost in the handover: {failed:?}"
    );
    let by: std::collections::HashSet<u32> = polled.iter().filter_map(|r| r.clone().ok()).collect();
    assert!(
        by.contains(&new),
        "no status answered by the new controller: {by:?}"
    );
    let slow = fates
        .iter()
        .filter(|f| !matches!(f, Fate::Answered(t) if *t <= Duration::from_secs(1)))
        .count();
    eprintln!(
        "upgrade under load: {} connections, {slow} slow or failed; the upgrade took {took:?}",
        fates.len()
    );
    assert_eq!(fates.len(), 3000);
    assert_eq!(slow, 0);
    // The new controller answers on the same path, with the same workers and counters.
    let status = b.status();
    assert_eq!(status.pid, new);
    assert_eq!(
        status.listen,
        [addr.to_string()],
        "the same group, not a new one"
    );
    let after: Vec<u32> = status.slots.iter().filter_map(|s| s.pid).collect();
    assert_eq!(after, before);
    // Counters continue (during the handover itself the kernel's hash steers: those
    // connections are not counted as steered).
    let steered: u64 = status.slots.iter().map(|s| s.steered).sum();
    assert!(
        steered > steered_before,
        "counters were reset: {steered_before} before, {steered} after"
    );
    // The old one is gone without stopping anything; the new one stops the workers.
    let (exit, _, _) = b.wait_exit();
    assert!(exit.success(), "{exit}");
    assert!(before.iter().all(|p| alive(*p)));
    let answer = get(addr).expect("answered after the handover");
    assert!(before.contains(&answer.pid), "{answer:?}");
    // SAFETY: SIGTERM to the controller this test started (through the upgrade).
    assert_eq!(unsafe { libc::kill(new as i32, libc::SIGTERM) }, 0);
    assert!(wait_gone(new, Duration::from_secs(20)));
    for p in before {
        assert!(
            wait_gone(p, Duration::from_secs(10)),
            "worker {p} outlived SIGTERM"
        );
    }
    let _ = std::fs::remove_file(next);
}

#[test]
fn a_failed_upgrade_leaves_the_old_controller_in_charge() {
    let mut b = Balancer::start(&["--workers", "2"]);
    let before: Vec<u32> = b.status().slots.iter().filter_map(|s| s.pid).collect();
    // A binary that exits at once.
    let e = b.cli_error(&["upgrade", "--binary", "/bin/false"]);
    assert_eq!(e.kind, ErrorKind::Failed, "{}", e.message);
    assert!(
        e.message
            .contains(&format!("controller pid {} stays in charge", b.pid())),
        "{}",
        e.message
    );
    // One that cannot run at all changes nothing either.
    let not_executable = unique_path("not-a-binary");
    std::fs::write(&not_executable, "not a program").expect("scratch file");
    let e = b.cli_error(&[
        "upgrade",
        "--binary",
        not_executable.to_str().expect("utf-8 path"),
    ]);
    let _ = std::fs::remove_file(&not_executable);
    assert_eq!(e.kind, ErrorKind::Invalid, "{}", e.message);
    let status = b.status();
    assert_eq!(status.pid, b.pid());
    let after: Vec<u32> = status.slots.iter().filter_map(|s| s.pid).collect();
    assert_eq!(after, before);
    for _ in 0..50 {
        assert!(get(b.addrs[0]).is_ok());
    }
    // Still fully in charge.
    let f = b.cli(&["workers", "scale", "3"]);
    assert!(f.status.success(), "{}", f.stderr);
    assert_eq!(b.status().slots.len(), 3);
    let (exit, _) = b.stop();
    assert!(exit.success());
}

/// A new controller that fails after the old one let go of the group (here: a successor that
/// refuses its pin directory once it has been told to take over): the old one takes the
/// sockets back and steers again, and the reply quotes the successor's reason.
#[test]
fn an_upgrade_that_fails_after_the_handover_began_is_rolled_back() {
    // Ready only by READY=1 (the timeout is far beyond the test): a restart after the
    // rollback shows that the workers' notify socket is the old controller's again.
    let mut b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--ready-timeout",
        "60s",
    ]);
    let addr = b.addrs[0];
    let before: Vec<u32> = b.status().slots.iter().filter_map(|s| s.pid).collect();
    let wrapper = unique_path("balancer-broken");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} \"$@\" --bpffs-dir /proc\n",
            balancer_tests::balancer_bin().display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let e = b.cli_error(&["upgrade", "--binary", wrapper.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&wrapper);
    assert_eq!(e.kind, ErrorKind::Failed, "{}", e.message);
    assert!(
        e.message.contains("not on a BPF filesystem"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains(&format!("controller pid {} stays in charge", b.pid())),
        "{}",
        e.message
    );
    // Steering is the old controller's again: every connection is counted as steered by it.
    let status = b.status();
    assert_eq!(status.pid, b.pid());
    assert_eq!(
        status
            .slots
            .iter()
            .filter_map(|s| s.pid)
            .collect::<Vec<_>>(),
        before
    );
    let steered = |b: &Balancer| -> u64 { b.status().slots.iter().map(|s| s.steered).sum() };
    let errors = |b: &Balancer| -> u64 { b.status().slots.iter().map(|s| s.select_errors).sum() };
    let (s0, e0) = (steered(&b), errors(&b));
    for _ in 0..100 {
        assert!(before.contains(&get(addr).expect("answered").pid));
    }
    assert_eq!(
        steered(&b),
        s0 + 100,
        "the program selects the old controller's sockets again"
    );
    assert_eq!(errors(&b), e0);
    let f = b.cli(&["workers", "restart"]);
    assert!(f.status.success(), "{}", f.stderr);
    let restarted: Vec<u32> = b.status().slots.iter().filter_map(|s| s.pid).collect();
    assert!(restarted.iter().all(|p| !before.contains(p)));
    let (exit, _) = b.stop();
    assert!(exit.success());
    for p in before.into_iter().chain(restarted) {
        assert!(wait_gone(p, Duration::from_secs(10)));
    }
}

/// SIGUSR2 upgrades too, to the binary at the path the controller was started from.
#[test]
fn sigusr2_upgrades_to_the_binary_the_controller_was_started_from() {
    let mut b = Balancer::start(&["--workers", "1"]);
    let old = b.pid();
    let worker = b.status().slots[0].pid.expect("a worker");
    b.signal(libc::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        let f = run_to_end(
            &[
                "status",
                "--json",
                "--control",
                b.control.to_str().expect("utf-8"),
            ],
            |_| {},
        );
        if let Ok(s) = serde_json::from_str::<balancer_tests::StatusReport>(&f.stdout) {
            if s.pid != old {
                assert_eq!(s.slots[0].pid, Some(worker), "the worker was kept");
                break s.pid;
            }
        }
        assert!(Instant::now() < deadline, "SIGUSR2 did not upgrade");
        thread::sleep(Duration::from_millis(50));
    };
    let (exit, _, _) = b.wait_exit();
    assert!(exit.success(), "{exit}");
    assert!(alive(worker));
    // SAFETY: SIGTERM to the controller this test started (through the upgrade).
    assert_eq!(unsafe { libc::kill(new as i32, libc::SIGTERM) }, 0);
    assert!(wait_gone(new, Duration::from_secs(20)));
    assert!(wait_gone(worker, Duration::from_secs(10)));
}
