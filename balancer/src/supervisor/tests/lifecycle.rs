//! Worker lifecycle: readiness, deaths, crash-loop backoff, grace kills.
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{
    advance, answered, ask, exit, fake_host::Call, last_started, pid, ready, settings,
    started_with, READY_TIMEOUT,
};
use crate::{
    control::protocol::{Request, SlotState},
    supervisor::{
        host::{Timer, WorkerExit},
        slot::{backoff, Phase, BACKOFF_MAX},
    },
};

#[test]
fn backoff_doubles_and_caps() {
    assert_eq!(backoff(0), Duration::ZERO);
    assert_eq!(backoff(1), Duration::from_millis(100));
    assert_eq!(backoff(2), Duration::from_millis(200));
    assert_eq!(backoff(4), Duration::from_millis(800));
    assert_eq!(backoff(20), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

#[test]
fn exit_reasons_name_the_signal() {
    use std::os::unix::process::ExitStatusExt;
    let killed = WorkerExit::from_wait(&Ok(std::process::ExitStatus::from_raw(9)));
    assert_eq!(killed, WorkerExit::Signal(9));
    assert_eq!(killed.to_string(), "was killed by signal 9 (SIGKILL)");
    let failed = WorkerExit::from_wait(&Ok(std::process::ExitStatus::from_raw(1 << 8)));
    assert_eq!(failed.to_string(), "exited with status 1");
}

/// The respawn delays scheduled so far.
fn respawn_delays(calls: &[Call]) -> Vec<Duration> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Schedule {
                delay,
                timer: Timer::Respawn { .. },
            } => Some(*delay),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn backoff_is_100_200_400_800_ms_and_a_stable_run_resets_it() {
    let mut sup = ready(1).await;
    for expected_ms in [100, 200, 400, 800] {
        let victim = pid(&sup, 0);
        sup.host_mut().take_calls();
        exit(&mut sup, victim, WorkerExit::Code(1)).await;
        assert_eq!(
            respawn_delays(&sup.host().calls),
            [Duration::from_millis(expected_ms)]
        );
        assert_eq!(sup.slots[0].state(Phase::Running), SlotState::BackingOff);
        // Nothing starts a moment before the delay is over, and the start comes on time.
        advance(&mut sup, Duration::from_millis(expected_ms - 1)).await;
        assert!(!sup
            .host()
            .calls
            .iter()
            .any(|c| matches!(c, Call::Spawn { .. })));
        advance(&mut sup, Duration::from_millis(1)).await;
        assert!(matches!(
            sup.host().calls.last(),
            Some(Call::Schedule { .. })
        ));
        assert!(sup
            .host()
            .calls
            .iter()
            .any(|c| matches!(c, Call::Spawn { slot: 0, .. })));
        assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Starting);
    }
    // A run of 10 s or more is stable (the worker was taken as ready meanwhile): the next
    // death respawns at once, and the streak starts over at 100 ms.
    advance(&mut sup, Duration::from_secs(10)).await;
    assert!(sup.slots[0].ready());
    let victim = pid(&sup, 0);
    sup.host_mut().take_calls();
    exit(&mut sup, victim, WorkerExit::Signal(9)).await;
    assert!(respawn_delays(&sup.host().calls).is_empty());
    assert!(
        matches!(
            sup.host().calls.as_slice(),
            [
                Call::Publish { .. },
                Call::Spawn { slot: 0, .. },
                Call::Schedule {
                    timer: Timer::ReadyTimeout(_),
                    ..
                }
            ]
        ),
        "{:?}",
        sup.host().calls
    );
    let victim = pid(&sup, 0);
    sup.host_mut().take_calls();
    exit(&mut sup, victim, WorkerExit::Code(1)).await;
    assert_eq!(
        respawn_delays(&sup.host().calls),
        [Duration::from_millis(100)]
    );
    assert_eq!(sup.slots[0].crashes.restarts, 6);
}

#[tokio::test]
async fn the_ready_timeout_promotes_and_ready_is_announced_once() {
    let mut sup = started_with(2, settings());
    let announced = |sup: &super::Sup| {
        sup.host()
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Announce(_)))
            .count()
    };
    advance(&mut sup, READY_TIMEOUT - Duration::from_millis(1)).await;
    assert!(sup.slots.iter().all(|s| !s.ready()));
    assert_eq!(announced(&sup), 0);
    advance(&mut sup, Duration::from_millis(1)).await;
    assert!(sup.slots.iter().all(|s| s.ready()));
    assert_eq!(
        sup.host()
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Announce(l) if l == "ready: 2 workers"))
            .count(),
        1
    );
    // A late READY=1 changes nothing (no second publish, no second announcement).
    let p0 = pid(&sup, 0);
    sup.host_mut().take_calls();
    sup.on_notify_ready(p0).await;
    assert!(sup.host().calls.is_empty(), "{:?}", sup.host().calls);
    // A respawned worker becoming ready does not announce again.
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
    advance(&mut sup, Duration::from_millis(100)).await;
    let p0 = last_started(&sup);
    sup.on_notify_ready(p0).await;
    assert!(sup.slots[0].ready());
    assert_eq!(announced(&sup), 0);
}

#[tokio::test]
async fn a_ready_worker_that_dies_leaves_the_tables_before_anything_else() {
    let mut sup = ready(2).await;
    let victim = pid(&sup, 0);
    exit(&mut sup, victim, WorkerExit::Signal(9)).await;
    let calls = &sup.host().calls;
    assert_eq!(
        calls.first(),
        Some(&Call::Publish {
            policy: balancer_common::PolicyKind::Hash,
            live: vec![1]
        }),
        "{calls:?}"
    );
    assert!(matches!(
        calls.get(1),
        Some(Call::Schedule {
            timer: Timer::Respawn { slot: 0, .. },
            ..
        })
    ));
    assert_eq!(calls.len(), 2, "{calls:?}");
}

#[tokio::test]
async fn a_replaced_worker_gets_sigterm_then_sigkill_only_after_the_grace() {
    let mut sup = ready(1).await;
    let old = pid(&sup, 0);
    let mut rx = ask(&mut sup, Request::Restart { slot: None }).await;
    let new = last_started(&sup);
    assert_ne!(new, old);
    assert!(
        sup.host().signals().is_empty(),
        "nothing is stopped before the new one is ready"
    );
    sup.on_notify_ready(new).await;
    assert!(answered(&mut rx).is_ok());
    assert_eq!(sup.host().signals(), [(old, Signal::SIGTERM)]);
    assert_eq!(pid(&sup, 0), new);
    advance(&mut sup, super::GRACE - Duration::from_millis(1)).await;
    assert_eq!(sup.host().signals(), [(old, Signal::SIGTERM)]);
    advance(&mut sup, Duration::from_millis(1)).await;
    assert_eq!(
        sup.host().signals(),
        [(old, Signal::SIGTERM), (old, Signal::SIGKILL)]
    );
    // A worker that exits within the grace is not killed.
    exit(&mut sup, old, WorkerExit::Signal(9)).await;
    sup.host_mut().take_calls();
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    let newer = last_started(&sup);
    sup.on_notify_ready(newer).await;
    assert!(answered(&mut rx).is_ok());
    exit(&mut sup, new, WorkerExit::Code(0)).await;
    advance(&mut sup, super::GRACE).await;
    assert_eq!(sup.host().signals(), [(new, Signal::SIGTERM)]);
    assert!(sup.slots[0].retiring.is_empty());
}

#[tokio::test]
async fn the_service_manager_hears_ready_once_status_changes_and_stopping() {
    let mut sup = started_with(2, settings());
    assert!(!sup.host().manager.iter().any(|m| m == "READY=1"));
    let p0 = pid(&sup, 0);
    sup.on_notify_ready(p0).await;
    assert!(
        !sup.host().manager.iter().any(|m| m == "READY=1"),
        "not before every worker is ready"
    );
    let p1 = pid(&sup, 1);
    sup.on_notify_ready(p1).await;
    assert_eq!(
        sup.host().manager,
        [
            "STATUS=1 of 2 slots live, policy hash",
            "STATUS=2 of 2 slots live, policy hash",
            "READY=1"
        ]
    );
    // A death and a respawn change the status, never READY=1 again.
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
    advance(&mut sup, Duration::from_millis(100)).await;
    let p0 = last_started(&sup);
    sup.on_notify_ready(p0).await;
    let manager = &sup.host().manager;
    assert_eq!(manager.iter().filter(|m| *m == "READY=1").count(), 1);
    assert_eq!(
        manager[3..],
        [
            "STATUS=1 of 2 slots live, policy hash",
            "STATUS=2 of 2 slots live, policy hash"
        ]
    );
    sup.host_mut().manager.clear();
    sup.begin_shutdown();
    assert_eq!(
        sup.host().manager,
        ["STOPPING=1", "STATUS=stopping: 2 worker(s) still running"]
    );
}

#[tokio::test]
async fn at_start_every_slot_keeps_its_share_until_all_are_ready() {
    let mut sup = started_with(2, settings());
    let p0 = pid(&sup, 0);
    sup.on_notify_ready(p0).await;
    let last_publish = |sup: &super::Sup| {
        sup.host()
            .calls
            .iter()
            .rev()
            .find_map(|c| match c {
                Call::Publish { live, .. } => Some(live.clone()),
                _ => None,
            })
            .expect("a publish")
    };
    assert_eq!(
        last_publish(&sup),
        [0, 1],
        "slot 1's worker is starting: it keeps its share"
    );
    let p1 = pid(&sup, 1);
    sup.on_notify_ready(p1).await;
    assert_eq!(last_publish(&sup), [0, 1]);
    // After start, a slot whose worker is gone leaves the tables as ever.
    exit(&mut sup, p1, WorkerExit::Signal(9)).await;
    assert_eq!(last_publish(&sup), [0]);
}

#[tokio::test]
async fn a_slot_that_never_gets_ready_at_start_leaves_after_the_ready_timeout() {
    let mut sup = started_with(2, settings());
    let p0 = pid(&sup, 0);
    sup.on_notify_ready(p0).await;
    let p1 = pid(&sup, 1);
    // Slot 1's worker dies before it is ready, and its successor is slow.
    exit(&mut sup, p1, WorkerExit::Code(1)).await;
    advance(&mut sup, READY_TIMEOUT).await;
    // Past the ready timeout: only what is ready takes connections.
    let p0_again = pid(&sup, 0);
    assert_eq!(p0_again, p0);
    let mut rx = super::ask(
        &mut sup,
        crate::control::protocol::Request::Drain { slot: 1 },
    )
    .await;
    let _ = super::answered(&mut rx);
    assert!(matches!(
        sup.host().calls.iter().rev().find(|c| matches!(c, Call::Publish { .. })),
        Some(Call::Publish { live, .. }) if live == &[0]
    ));
}
