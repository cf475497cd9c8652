//! Runtime worker control against the real kernel: rolling restarts, a replacement that never
//! becomes ready, drains, SIGHUP.
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    alive, all_ready, get, ok, pids, refusable_group, wait_gone, Answer, Balancer, ErrorKind, Load,
    SlotState, PHASE_ANSWERS,
};

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

/// A slot whose worker keeps crashing does not hold what is queued on it through its
/// backoff: once it has had no worker for the stall timeout, its queue moves to live slots.
#[test]
fn a_crash_looping_slot_hands_its_queue_to_the_live_slots() {
    let flag = balancer_tests::unique_path("crash.flag");
    let (mut b, script) = balancer_tests::refusing_group(&format!(
        "[ -e '{}' ] && [ \"$BALANCER_SLOT\" = 1 ]",
        flag.display()
    ));
    let workers = pids(&b.status());
    assert_eq!(workers.len(), 2);
    std::fs::write(&flag, "").unwrap();
    // Stopped, so that it holds no accepted connection; killed before stall detection could
    // act; from then on slot 1's worker exits at every start.
    // SAFETY: kill(2) on a worker of this test.
    unsafe { libc::kill(workers[1] as i32, libc::SIGSTOP) };
    let queued: Vec<_> = (0..60)
        .map(|_| balancer_tests::send_request(b.addrs[0]).expect("connected"))
        .collect();
    // SAFETY: as above.
    unsafe { libc::kill(workers[1] as i32, libc::SIGKILL) };
    let answers: Vec<Answer> = queued
        .into_iter()
        .map(|s| {
            balancer_tests::read_answer(s)
                .expect("a connection queued on the crash-looping slot was never served")
        })
        .collect();
    assert_eq!(answers.len(), 60);
    assert!(answers.iter().all(|a| a.pid == workers[0]), "{answers:?}");
    // Moved by the migrate program (counted on the slot where they land).
    let status = b.status();
    assert!(status.slots[0].migrated > 0, "{status:?}");
    let _ = std::fs::remove_file(&flag);
    let _ = std::fs::remove_file(&script);
    let (status, _) = b.stop();
    assert!(status.success());
}
