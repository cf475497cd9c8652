//! The periodic socket check: its pace, and the restart of a worker whose socket the group
//! replaced (after a repair or an evacuation).
use std::time::Duration;

use super::{answered, ask, fake_host::Call, pid, ready, Sup};
use crate::{
    control::protocol::Request,
    supervisor::host::{Evacuation, RepairOutcome, SocketFault, SocketRepair},
};

async fn sample_ms(sup: &mut Sup, ms: u64) {
    super::run_for(sup, Duration::from_millis(ms)).await;
}

fn spawns(sup: &Sup) -> Vec<u32> {
    sup.host()
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::Spawn { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect()
}

fn recreated(slot: u32) -> SocketRepair {
    SocketRepair {
        slot,
        addr: "127.0.0.1:1".parse().unwrap(),
        fault: SocketFault::NotListening,
        outcome: RepairOutcome::Recreated,
        replaced: true,
    }
}

#[tokio::test]
async fn sockets_are_checked_once_a_second_not_on_every_sample() {
    let mut sup = ready(2).await;
    sample_ms(&mut sup, 2500).await;
    // At once, then after 1 s and 2 s.
    assert_eq!(sup.host().socket_checks, 3);
}

#[tokio::test]
async fn sockets_are_checked_even_when_nothing_is_sampled() {
    let mut sup = super::ready_with(2, super::settings_without_signal()).await;
    let mut rx = ask(
        &mut sup,
        Request::SetPolicy {
            policy: crate::control::protocol::PolicyName::Hash,
            weights: None,
            spill_depth: Some(0),
        },
    )
    .await;
    assert!(answered(&mut rx).is_ok());
    sample_ms(&mut sup, 2500).await;
    assert_eq!(sup.host().samples, 0, "nothing reads the load signal");
    assert_eq!(sup.host().socket_checks, 3);
}

#[tokio::test]
async fn a_replaced_socket_gets_its_worker_restarted_once() {
    let mut sup = ready(2).await;
    let old = pid(&sup, 1);
    super::advance(&mut sup, Duration::from_millis(1)).await;
    assert!(
        sup.on_tick().await,
        "the first check ran: the record is saved"
    );
    super::advance(&mut sup, Duration::from_millis(500)).await;
    assert!(
        !sup.on_tick().await,
        "a sample alone: the record stays as it is"
    );
    super::advance(&mut sup, Duration::from_millis(500)).await;
    sup.host_mut().socket_faults = vec![recreated(1)];
    assert!(
        sup.on_tick().await,
        "a restart started: the record must be saved"
    );
    assert_eq!(
        spawns(&sup),
        [1],
        "a successor for slot 1: {:?}",
        sup.host().calls
    );
    let successor = super::last_started(&sup);
    sup.on_notify_ready(successor).await;
    assert!(
        sup.host()
            .signals()
            .contains(&(old, nix::sys::signal::Signal::SIGTERM)),
        "the old worker retires: {:?}",
        sup.host().calls
    );
    // Repaired already: later checks find nothing, and nothing more is restarted.
    sample_ms(&mut sup, 2100).await;
    assert_eq!(spawns(&sup), [1]);
}

#[tokio::test]
async fn a_replaced_socket_waits_for_the_operation_in_progress() {
    let mut sup = ready(2).await;
    // Slot 0's restart is under way (its successor is not ready yet).
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    sup.host_mut().socket_faults = vec![recreated(1)];
    sample_ms(&mut sup, 1).await;
    assert_eq!(spawns(&sup), [0], "slot 1 waits: {:?}", sup.host().calls);
    let successor = super::last_started(&sup);
    sup.on_notify_ready(successor).await;
    assert!(answered(&mut rx).is_ok());
    // The next check (1 s later) starts slot 1's restart.
    sample_ms(&mut sup, 1000).await;
    assert_eq!(spawns(&sup), [0, 1]);
}

#[tokio::test]
async fn an_evacuation_that_replaced_a_socket_restarts_the_slot() {
    let mut sup = ready(2).await;
    sup.host_mut().evacuation = Evacuation {
        recreated: true,
        failed: Vec::new(),
    };
    // Slot 1 stalls (its queue does not shrink) and is evacuated.
    for _ in 0..400 {
        sup.host_mut().depths = vec![0, 5];
        sample_ms(&mut sup, 1).await;
        if sup
            .host()
            .calls
            .iter()
            .any(|c| matches!(c, Call::Evacuate { slot: 1 }))
        {
            break;
        }
    }
    assert!(
        sup.host()
            .calls
            .iter()
            .any(|c| matches!(c, Call::Evacuate { slot: 1 })),
        "{:?}",
        sup.host().calls
    );
    assert_eq!(spawns(&sup), [1], "{:?}", sup.host().calls);
}

#[tokio::test]
async fn a_replaced_socket_whose_restart_failed_is_restarted_again() {
    let mut sup = ready(2).await;
    let old = pid(&sup, 1);
    // Replaced, and publishing the new socket failed: the worker still must be restarted.
    sup.host_mut().socket_faults = vec![SocketRepair {
        outcome: RepairOutcome::Failed("no room".into()),
        ..recreated(1)
    }];
    sample_ms(&mut sup, 1).await;
    assert_eq!(spawns(&sup), [1], "{:?}", sup.host().calls);
    // The successor dies before it is ready: the old worker stays, holding the dead socket.
    let successor = super::last_started(&sup);
    super::exit(
        &mut sup,
        successor,
        crate::supervisor::host::WorkerExit::Code(1),
    )
    .await;
    assert_eq!(pid(&sup, 1), old);
    // The next check restarts it again; once a successor is ready, it is done.
    sample_ms(&mut sup, 1000).await;
    assert_eq!(spawns(&sup), [1, 1], "{:?}", sup.host().calls);
    let successor = super::last_started(&sup);
    sup.on_notify_ready(successor).await;
    sample_ms(&mut sup, 2000).await;
    assert_eq!(spawns(&sup), [1, 1]);
}
