//! A controller that takes over what a dead one left: adopted workers are watched, not
//! started; missing slots get a worker; drains, restarts and readiness carry over.
use std::time::Duration;

use balancer_common::PolicyKind;

use super::{advance, exit, fake_host::Call, fake_host::FakeHost, last_started, pid, settings};
use crate::{
    control::protocol::SlotState,
    supervisor::{
        host::{SlotSnapshot, Timer, WorkerExit},
        settings::{InheritedSlot, Steer},
        slot::Phase,
        Supervisor,
    },
};

fn adopted(slots: Vec<InheritedSlot>) -> super::Sup {
    let n = slots.len() as u32;
    let steer = Steer {
        policy: PolicyKind::Hash,
        spill_depth: 16,
        weights: None,
    };
    Supervisor::new(FakeHost::new(n), settings(), steer, n)
}

fn inherited(worker: Option<(u32, bool)>, drained: bool, restarts: u32) -> InheritedSlot {
    InheritedSlot {
        worker,
        drained,
        restarts,
        retiring: Vec::new(),
    }
}

#[tokio::test]
async fn adopted_workers_serve_on_and_a_slot_without_one_gets_a_new_worker() {
    let slots = vec![
        inherited(Some((501, true)), false, 2),
        inherited(Some((502, true)), true, 0),
        inherited(None, false, 5),
    ];
    let mut sup = adopted(slots.clone());
    sup.adopt(slots).await;
    let calls = sup.host().calls.clone();
    assert_eq!(calls[0], Call::Watch { slot: 0, pid: 501 });
    assert_eq!(calls[1], Call::Watch { slot: 1, pid: 502 });
    assert!(matches!(calls[2], Call::Spawn { slot: 2, .. }), "{calls:?}");
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Spawn { slot: 0 | 1, .. })),
        "an adopted worker is never started again: {calls:?}"
    );
    // The adopted ready worker is in the tables at once; the drained one stays out.
    assert!(matches!(calls.last(), Some(Call::Publish { live, .. }) if live == &[0]));
    let states: Vec<SlotState> = sup.slots.iter().map(|s| s.state(Phase::Running)).collect();
    assert_eq!(
        states,
        [SlotState::Ready, SlotState::Draining, SlotState::Starting]
    );
    let restarts: Vec<u32> = sup.slots.iter().map(|s| s.crashes.restarts).collect();
    assert_eq!(restarts, [2, 0, 5]);
    assert!(!calls.iter().any(|c| matches!(c, Call::Announce(_))));
    // Ready once the new worker is.
    let new = last_started(&sup);
    sup.on_notify_ready(new).await;
    let announced: Vec<&Call> = sup
        .host()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Announce(_)))
        .collect();
    assert_eq!(announced, [&Call::Announce("ready: 3 workers".into())]);
    // The record a successor would read names the same workers.
    sup.save_record();
    assert_eq!(
        sup.host().record,
        [
            SlotSnapshot {
                pid: Some(501),
                ready: true,
                drained: false,
                restarts: 2,
                others: vec![]
            },
            SlotSnapshot {
                pid: Some(502),
                ready: true,
                drained: true,
                restarts: 0,
                others: vec![]
            },
            SlotSnapshot {
                pid: Some(new),
                ready: true,
                drained: false,
                restarts: 5,
                others: vec![]
            },
        ]
    );
}

#[tokio::test]
async fn an_adopted_worker_that_dies_is_respawned_like_our_own() {
    let slots = vec![
        inherited(Some((601, true)), false, 0),
        inherited(Some((602, true)), false, 0),
    ];
    let mut sup = adopted(slots.clone());
    sup.adopt(slots).await;
    assert!(
        sup.host()
            .calls
            .iter()
            .any(|c| *c == Call::Announce("ready: 2 workers".into())),
        "every adopted worker was ready"
    );
    sup.host_mut().take_calls();
    exit(
        &mut sup,
        601,
        WorkerExit::Unknown("exited (adopted)".into()),
    )
    .await;
    let calls = sup.host().calls.clone();
    assert!(
        matches!(&calls[0], Call::Publish { live, .. } if live == &[1]),
        "{calls:?}"
    );
    assert!(calls.iter().any(|c| matches!(
        c,
        Call::Schedule {
            timer: Timer::Respawn { slot: 0, .. },
            ..
        }
    )));
    advance(&mut sup, Duration::from_secs(1)).await;
    let successor = pid(&sup, 0);
    assert_ne!(successor, 601);
    assert_eq!(sup.slots[0].crashes.restarts, 1);
}

#[tokio::test]
async fn an_adopted_worker_that_was_not_ready_gets_the_ready_timeout() {
    let slots = vec![inherited(Some((701, false)), false, 0)];
    let mut sup = adopted(slots.clone());
    sup.adopt(slots).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Starting);
    advance(&mut sup, super::READY_TIMEOUT).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Ready);
    assert!(sup
        .host()
        .calls
        .iter()
        .any(|c| *c == Call::Announce("ready: 1 workers".into())));
}

#[tokio::test]
async fn workers_the_dead_controller_was_replacing_are_stopped_as_it_would_have() {
    let mut slot = inherited(Some((801, true)), false, 1);
    slot.retiring = vec![802];
    let slots = vec![slot];
    let mut sup = adopted(slots.clone());
    sup.adopt(slots).await;
    assert!(sup
        .host()
        .calls
        .contains(&Call::Watch { slot: 0, pid: 802 }));
    assert_eq!(
        sup.host().signals(),
        [(802, nix::sys::signal::Signal::SIGTERM)]
    );
    assert_eq!(pid(&sup, 0), 801, "the slot's own worker serves on");
    // Recorded as retiring (a successor would stop it too), SIGKILL after the grace.
    sup.save_record();
    assert_eq!(sup.host().record[0].others, [802]);
    advance(&mut sup, super::GRACE).await;
    assert_eq!(
        sup.host().signals(),
        [
            (802, nix::sys::signal::Signal::SIGTERM),
            (802, nix::sys::signal::Signal::SIGKILL)
        ]
    );
    exit(&mut sup, 802, WorkerExit::Unknown("exited".into())).await;
    assert!(sup.slots[0].retiring.is_empty());
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Ready);
}
