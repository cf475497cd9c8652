//! Multi-step operations: rolling restart, scale up and down, their replies, refusals and
//! the effect order.
use nix::sys::signal::Signal;

use super::{
    advance, answered, ask, error_kind, exit, fake_host::Call, last_started, pending, pid, ready,
};
use crate::{
    control::protocol::{ErrorKind, Reply, Request, SlotState},
    supervisor::{host::WorkerExit, slot::Phase},
};

#[tokio::test]
async fn a_successor_that_dies_before_ready_fails_the_restart_and_keeps_the_old_worker() {
    let mut sup = ready(2).await;
    let old = pid(&sup, 0);
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    assert!(pending(&mut rx));
    let new = last_started(&sup);
    assert_eq!(sup.slots[0].successor().map(|w| w.pid), Some(new));
    exit(&mut sup, new, WorkerExit::Code(3)).await;
    let outcome = answered(&mut rx);
    assert_eq!(error_kind(&outcome), ErrorKind::Failed);
    let message = outcome.unwrap_err().message;
    assert!(
        message.contains(&format!("old worker (pid {old}) keeps serving")),
        "{message}"
    );
    assert_eq!(pid(&sup, 0), old);
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Ready);
    assert!(
        sup.host().signals().is_empty(),
        "the old worker was not signalled"
    );
    // Not respawned with backoff: the old worker still serves.
    assert!(!sup.host().calls.iter().any(|c| matches!(
        c,
        Call::Schedule {
            timer: crate::supervisor::host::Timer::Respawn { .. },
            ..
        }
    )));
    // The controller is free for the next command.
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(1) }).await;
    assert!(pending(&mut rx));
    let new1 = last_started(&sup);
    sup.on_notify_ready(new1).await;
    assert!(answered(&mut rx).is_ok());
}

#[tokio::test]
async fn a_scale_up_whose_worker_cannot_start_fails_and_frees_the_controller() {
    let mut sup = ready(2).await;
    sup.host_mut().failing_slots.insert(2);
    let mut rx = ask(&mut sup, Request::Scale { workers: 3 }).await;
    let outcome = answered(&mut rx);
    assert_eq!(error_kind(&outcome), ErrorKind::Failed);
    assert!(outcome.unwrap_err().message.contains("slot 2 is not ready"));
    assert_eq!(sup.slots.len(), 3);
    assert_eq!(sup.slots[2].state(Phase::Running), SlotState::BackingOff);
    assert!(sup.op.is_none());
    // The next command is served, not refused as busy.
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    assert!(pending(&mut rx));
    // Once it can start, the slot's worker comes up by the backoff.
    sup.host_mut().failing_slots.clear();
    advance(&mut sup, std::time::Duration::from_millis(100)).await;
    assert!(sup
        .host()
        .calls
        .iter()
        .any(|c| matches!(c, Call::Spawn { slot: 2, .. })));
}

#[tokio::test]
async fn sighup_during_a_scale_is_ignored_and_a_second_request_gets_busy() {
    let mut sup = ready(2).await;
    let mut rx = ask(&mut sup, Request::Scale { workers: 3 }).await;
    assert!(pending(&mut rx));
    let new = last_started(&sup);
    sup.host_mut().take_calls();
    sup.restart_all();
    assert!(sup.host().calls.is_empty(), "{:?}", sup.host().calls);
    for request in [
        Request::Restart { slot: None },
        Request::Scale { workers: 4 },
    ] {
        let mut second = ask(&mut sup, request).await;
        assert_eq!(error_kind(&answered(&mut second)), ErrorKind::Busy);
    }
    // Status is still served during the scale.
    let mut status = ask(&mut sup, Request::Status).await;
    assert!(matches!(answered(&mut status), Ok(Reply::Status(_))));
    sup.on_notify_ready(new).await;
    assert!(answered(&mut rx).is_ok());
    assert_eq!(sup.live(), [true, true, true]);
}

#[tokio::test]
async fn scale_down_publishes_then_stops_then_shrinks_after_the_last_exit() {
    let mut sup = ready(4).await;
    assert_eq!(
        sup.host().stored.iter().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "every socket is in the service manager's store"
    );
    let (p2, p3) = (pid(&sup, 2), pid(&sup, 3));
    sup.host_mut().migrated = 7;
    sup.host_mut().migrate_on_shrink = 5;
    let mut rx = ask(&mut sup, Request::Scale { workers: 2 }).await;
    let calls = sup.host_mut().take_calls();
    let publish = calls
        .iter()
        .position(|c| matches!(c, Call::Publish { live, .. } if live == &[0, 1]))
        .expect("the removed slots leave the tables");
    let term2 = calls
        .iter()
        .position(|c| {
            c == &Call::Signal {
                pid: p2,
                signal: Signal::SIGTERM,
            }
        })
        .expect("SIGTERM to slot 2's worker");
    let term3 = calls
        .iter()
        .position(|c| {
            c == &Call::Signal {
                pid: p3,
                signal: Signal::SIGTERM,
            }
        })
        .expect("SIGTERM to slot 3's worker");
    assert!(publish < term2 && publish < term3, "{calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, Call::Shrink { .. })));
    assert_eq!(sup.slots[2].state(Phase::Running), SlotState::Removing);
    assert!(pending(&mut rx));
    exit(&mut sup, p2, WorkerExit::Code(0)).await;
    assert!(
        sup.host().calls.is_empty(),
        "nothing closes while a worker runs"
    );
    assert!(pending(&mut rx));
    exit(&mut sup, p3, WorkerExit::Code(0)).await;
    assert_eq!(
        sup.host().calls,
        [
            Call::Shrink { to: 2 },
            Call::Publish {
                policy: balancer_common::PolicyKind::Hash,
                live: vec![0, 1]
            }
        ]
    );
    match answered(&mut rx) {
        Ok(Reply::Done { message }) => {
            assert!(
                message.contains("scaled 4 -> 2 workers; 5 queued"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sup.slots.len(), 2);
    assert!(sup.op.is_none());
    assert_eq!(
        sup.host().stored.iter().copied().collect::<Vec<_>>(),
        [0, 1]
    );
}

#[tokio::test]
async fn drain_and_scale_refuse_to_leave_no_live_slot() {
    let mut sup = ready(2).await;
    let mut rx = ask(&mut sup, Request::Drain { slot: 1 }).await;
    assert!(answered(&mut rx).is_ok());
    assert_eq!(sup.slots[1].state(Phase::Running), SlotState::Draining);
    let mut rx = ask(&mut sup, Request::Drain { slot: 0 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Invalid);
    assert_eq!(sup.live(), [true, false]);
    let mut rx = ask(&mut sup, Request::Undrain { slot: 1 }).await;
    assert!(answered(&mut rx).is_ok());
    let mut rx = ask(&mut sup, Request::Drain { slot: 0 }).await;
    assert!(answered(&mut rx).is_ok());
    sup.host_mut().take_calls();
    let mut rx = ask(&mut sup, Request::Scale { workers: 1 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Invalid);
    assert_eq!(sup.slots.len(), 2);
    assert!(sup.host().calls.is_empty(), "a refusal changes nothing");
    // A slot whose worker died (backing off) counts as not live too.
    let mut rx = ask(&mut sup, Request::Undrain { slot: 0 }).await;
    assert!(answered(&mut rx).is_ok());
    let p0 = pid(&sup, 0);
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
    let mut rx = ask(&mut sup, Request::Drain { slot: 1 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Invalid);
    let mut rx = ask(&mut sup, Request::Scale { workers: 1 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Invalid);
    let mut rx = ask(&mut sup, Request::Drain { slot: 7 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Invalid);
}

#[tokio::test]
async fn an_old_worker_dying_mid_restart_leaves_the_successor_to_take_over() {
    let mut sup = ready(2).await;
    let old = pid(&sup, 0);
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    let new = last_started(&sup);
    sup.host_mut().take_calls();
    exit(&mut sup, old, WorkerExit::Signal(9)).await;
    // Out of the tables; not respawned: the successor is already starting.
    assert_eq!(
        sup.host().calls,
        [Call::Publish {
            policy: balancer_common::PolicyKind::Hash,
            live: vec![1]
        }]
    );
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Starting);
    assert!(sup.slots[0].current().is_none());
    assert!(pending(&mut rx));
    sup.on_notify_ready(new).await;
    assert!(matches!(
        sup.host().calls.last(),
        Some(Call::Publish { live, .. }) if live == &[0, 1]
    ));
    match answered(&mut rx) {
        Ok(Reply::Done { message }) => {
            assert_eq!(message, format!("restarted: slot 0 pid - -> {new}"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pid(&sup, 0), new);
    assert_eq!(sup.slots[0].crashes.restarts, 1);
    assert!(sup.host().signals().is_empty(), "nothing left to stop");
}

#[tokio::test]
async fn a_restart_counts_and_a_starting_worker_being_replaced_can_still_become_ready() {
    let mut sup = super::started_with(1, super::settings());
    let first = pid(&sup, 0);
    // Restart while the first worker is still starting.
    let mut rx = ask(&mut sup, Request::Restart { slot: None }).await;
    let new = last_started(&sup);
    sup.on_notify_ready(first).await;
    assert!(sup.slots[0].ready(), "the old worker serves meanwhile");
    assert!(matches!(
        sup.host().calls.iter().rev().find(|c| matches!(c, Call::Publish { .. })),
        Some(Call::Publish { live, .. }) if live == &[0]
    ));
    sup.on_notify_ready(new).await;
    assert!(answered(&mut rx).is_ok());
    assert_eq!(sup.slots[0].crashes.restarts, 1);
    assert_eq!(sup.host().signals(), [(first, Signal::SIGTERM)]);
}

#[tokio::test]
async fn restarting_a_backing_off_slot_starts_it_now_and_forgets_its_crash_streak() {
    let mut sup = ready(2).await;
    for _ in 0..3 {
        let victim = pid(&sup, 0);
        exit(&mut sup, victim, WorkerExit::Code(1)).await;
        advance(&mut sup, std::time::Duration::from_secs(1)).await;
    }
    let victim = pid(&sup, 0);
    exit(&mut sup, victim, WorkerExit::Code(1)).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::BackingOff);
    assert_eq!(sup.slots[0].crashes.quick_exits, 4);
    sup.host_mut().take_calls();
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    assert!(
        matches!(answered(&mut rx), Ok(Reply::Done { message }) if message.contains("slot 0 (was down)"))
    );
    assert!(matches!(
        sup.host().calls.first(),
        Some(Call::Spawn { slot: 0, .. })
    ));
    // The old backoff timer no longer starts anything; the next quick death waits 100 ms.
    let spawned = |sup: &super::Sup| {
        sup.host()
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Spawn { .. }))
            .count()
    };
    advance(&mut sup, std::time::Duration::from_secs(2)).await;
    assert_eq!(spawned(&sup), 1);
    let victim = pid(&sup, 0);
    sup.host_mut().take_calls();
    exit(&mut sup, victim, WorkerExit::Code(1)).await;
    assert!(sup.host().calls.iter().any(|c| matches!(
        c,
        Call::Schedule { delay, timer: crate::supervisor::host::Timer::Respawn { .. } }
            if *delay == std::time::Duration::from_millis(100)
    )));
}

#[tokio::test]
async fn a_new_slot_whose_worker_dies_fails_the_scale_up_and_frees_the_controller() {
    let mut sup = ready(2).await;
    let mut rx = ask(&mut sup, Request::Scale { workers: 3 }).await;
    let new = last_started(&sup);
    assert!(pending(&mut rx));
    exit(&mut sup, new, WorkerExit::Code(2)).await;
    let outcome = answered(&mut rx);
    assert_eq!(error_kind(&outcome), ErrorKind::Failed);
    assert!(outcome
        .unwrap_err()
        .message
        .contains(&format!("its worker pid {new} exited with status 2")));
    assert!(sup.op.is_none());
    assert_eq!(sup.slots[2].state(Phase::Running), SlotState::BackingOff);
}

#[tokio::test]
async fn a_scale_up_that_cannot_grow_the_group_changes_nothing_and_keeps_the_weights() {
    let mut sup = ready(2).await;
    let mut rx = ask(
        &mut sup,
        Request::SetPolicy {
            policy: crate::control::protocol::PolicyName::Hash,
            weights: Some(vec![1, 3]),
            spill_depth: None,
        },
    )
    .await;
    assert!(answered(&mut rx).is_ok());
    sup.host_mut().fail_grow = true;
    sup.host_mut().take_calls();
    let mut rx = ask(&mut sup, Request::Scale { workers: 3 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Failed);
    assert_eq!(sup.slots.len(), 2);
    assert_eq!(sup.steer.weights, Some(vec![1, 3]));
    assert!(sup.host().calls.is_empty(), "{:?}", sup.host().calls);
    assert!(sup.op.is_none());
    // A scale that goes ahead resets them, and says so.
    sup.host_mut().fail_grow = false;
    let mut rx = ask(&mut sup, Request::Scale { workers: 3 }).await;
    let new = last_started(&sup);
    sup.on_notify_ready(new).await;
    assert!(
        matches!(answered(&mut rx), Ok(Reply::Done { message }) if message.contains("hash weights reset"))
    );
    assert_eq!(sup.steer.weights, None);
    assert_eq!(
        sup.host().stored.iter().copied().collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[tokio::test]
async fn tables_never_name_a_slot_being_removed_even_when_no_slot_is_live() {
    let mut sup = ready(3).await;
    let (p0, p1, p2) = (pid(&sup, 0), pid(&sup, 1), pid(&sup, 2));
    let mut rx = ask(&mut sup, Request::Scale { workers: 2 }).await;
    assert!(pending(&mut rx));
    // Both survivors die while slot 2's worker is still finishing.
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
    exit(&mut sup, p1, WorkerExit::Signal(9)).await;
    let published: Vec<Vec<u32>> = sup
        .host()
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::Publish { live, .. } => Some(live.clone()),
            _ => None,
        })
        .collect();
    assert!(!published.is_empty());
    assert!(
        published.iter().all(|live| !live.contains(&2)),
        "{published:?}"
    );
    assert_eq!(
        published.last(),
        Some(&vec![0, 1]),
        "all staying slots queue for their successors"
    );
    exit(&mut sup, p2, WorkerExit::Code(0)).await;
    assert!(answered(&mut rx).is_ok());
}

#[tokio::test]
async fn a_policy_or_drain_that_cannot_be_published_fails_and_changes_nothing() {
    let mut sup = ready(2).await;
    sup.host_mut().fail_publish = true;
    let before = sup.steer.clone();
    let mut rx = ask(
        &mut sup,
        Request::SetPolicy {
            policy: crate::control::protocol::PolicyName::Cpu,
            weights: None,
            spill_depth: Some(4),
        },
    )
    .await;
    let outcome = answered(&mut rx);
    assert_eq!(error_kind(&outcome), ErrorKind::Failed);
    assert!(outcome
        .unwrap_err()
        .message
        .contains("previous policy stays"));
    assert_eq!(sup.steer, before, "rolled back");
    let mut rx = ask(&mut sup, Request::Drain { slot: 1 }).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Failed);
    assert_eq!(sup.slots[1].state(Phase::Running), SlotState::Ready);
    // Once publishing works again, so do both.
    sup.host_mut().fail_publish = false;
    let mut rx = ask(&mut sup, Request::Drain { slot: 1 }).await;
    assert!(answered(&mut rx).is_ok());
    assert_eq!(sup.slots[1].state(Phase::Running), SlotState::Draining);
}

#[tokio::test]
async fn with_no_live_slot_connections_queue_where_a_worker_runs() {
    let mut sup = ready(2).await;
    let mut rx = ask(&mut sup, Request::Drain { slot: 0 }).await;
    assert!(answered(&mut rx).is_ok());
    let p1 = pid(&sup, 1);
    exit(&mut sup, p1, WorkerExit::Signal(9)).await;
    assert_eq!(sup.live(), [false, false]);
    // Slot 0's (drained) worker runs; slot 1 has none while it backs off.
    assert!(matches!(
        sup.host().calls.iter().rev().find(|c| matches!(c, Call::Publish { .. })),
        Some(Call::Publish { live, .. }) if live == &[0]
    ));
}
