//! Sampling and stalls, shutdown, and the slot state table.
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{
    answered, ask, error_kind, exit, fake_host::Call, last_started, pending, pid, ready,
    ready_with, settings, Sup, STALL_TIMEOUT,
};
use crate::{
    control::protocol::{ErrorKind, Request, SlotState},
    supervisor::{
        host::WorkerExit,
        slot::{state_of, Generation, Membership, Occupant, Phase, TimerToken, Worker},
    },
};

/// Samples every millisecond for `ms` milliseconds with these queue depths.
async fn sample_for(sup: &mut Sup, depths: &[u32], ms: u64) {
    for _ in 0..ms {
        sup.host_mut().depths = depths.to_vec();
        super::advance(sup, Duration::from_millis(1)).await;
        sup.on_sample().await;
    }
}

fn count(sup: &Sup, what: impl Fn(&Call) -> bool) -> usize {
    sup.host().calls.iter().filter(|c| what(c)).count()
}

#[tokio::test]
async fn a_stalled_slot_is_evacuated_only_while_another_slot_is_live() {
    let mut sup = ready(2).await;
    // Slot 1 drained: when slot 0 stalls, no other slot is live.
    let mut rx = ask(&mut sup, Request::Drain { slot: 1 }).await;
    assert!(answered(&mut rx).is_ok());
    sup.host_mut().take_calls();
    let stall_ms = STALL_TIMEOUT.as_millis() as u64;
    sample_for(&mut sup, &[5, 0], stall_ms + 2).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Stalled);
    // Out of the tables (all slots count as live when none is: they queue for successors).
    assert!(sup
        .host()
        .calls
        .iter()
        .any(|c| matches!(c, Call::Publish { .. })));
    // Retried every stall timeout, never done while nothing else is live.
    sample_for(&mut sup, &[5, 0], 3 * stall_ms).await;
    assert_eq!(count(&sup, |c| matches!(c, Call::Evacuate { .. })), 0);
    let mut rx = ask(&mut sup, Request::Undrain { slot: 1 }).await;
    assert!(answered(&mut rx).is_ok());
    sample_for(&mut sup, &[5, 0], stall_ms + 1).await;
    assert_eq!(
        count(&sup, |c| matches!(c, Call::Evacuate { slot: 0 })),
        1,
        "{:?}",
        sup.host().calls
    );
    assert_eq!(sup.live(), [false, true]);
}

/// Samples every millisecond for `ms` milliseconds, leaving the queue depths as the host has
/// them (an evacuation empties a queue).
async fn sample_as_is(sup: &mut Sup, ms: u64) {
    for _ in 0..ms {
        super::advance(sup, Duration::from_millis(1)).await;
        sup.on_sample().await;
    }
}

#[tokio::test]
async fn a_stall_takes_the_slot_out_then_evacuates_it_once_and_it_rejoins() {
    let mut sup = ready(2).await;
    let stall_ms = STALL_TIMEOUT.as_millis() as u64;
    // A queue that shrinks now and then is no stall.
    for _ in 0..4 {
        sample_for(&mut sup, &[6, 0], stall_ms / 2).await;
        sample_for(&mut sup, &[5, 0], stall_ms / 2).await;
    }
    assert!(sup.host().calls.is_empty(), "{:?}", sup.host().calls);
    // A queue that stays at 5: stalled within the stall timeout.
    let mut waited = 0;
    while sup.slots[0].state(Phase::Running) != SlotState::Stalled {
        assert!(waited <= stall_ms, "no stall after {waited} ms");
        sample_for(&mut sup, &[5, 0], 1).await;
        waited += 1;
    }
    let calls = sup.host().calls.clone();
    let publish = calls
        .iter()
        .position(|c| matches!(c, Call::Publish { live, .. } if live == &[1]))
        .expect("the stalled slot leaves the tables");
    let evacuate = calls
        .iter()
        .position(|c| c == &Call::Evacuate { slot: 0 })
        .expect("its queue is evacuated");
    assert!(publish < evacuate, "{calls:?}");
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Stalled);
    // The queue is empty now: no second evacuation, and the slot rejoins after the hold-off.
    sample_as_is(&mut sup, 3 * stall_ms).await;
    assert_eq!(count(&sup, |c| matches!(c, Call::Evacuate { .. })), 1);
    assert_eq!(sup.live(), [true, true]);
    assert!(matches!(
        sup.host().calls.last(),
        Some(Call::Publish { live, .. }) if live == &[0, 1]
    ));
}

#[tokio::test]
async fn kill_stalled_kills_a_stalled_worker_exactly_once() {
    let mut s = settings();
    s.kill_stalled = Some(Duration::from_secs(1));
    s.evacuate = false;
    let mut sup = ready_with(2, s).await;
    let p0 = pid(&sup, 0);
    let stall_ms = STALL_TIMEOUT.as_millis() as u64;
    sample_for(&mut sup, &[5, 0], stall_ms + 1).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Stalled);
    assert_eq!(count(&sup, |c| matches!(c, Call::Evacuate { .. })), 0);
    let kills = |sup: &Sup| {
        count(sup, |c| {
            c == &Call::Signal {
                pid: p0,
                signal: Signal::SIGKILL,
            }
        })
    };
    sample_for(&mut sup, &[5, 0], 990).await;
    assert_eq!(kills(&sup), 0, "not before --kill-stalled");
    sample_for(&mut sup, &[5, 0], 20).await;
    assert_eq!(kills(&sup), 1);
    sample_for(&mut sup, &[5, 0], 2000).await;
    assert_eq!(kills(&sup), 1, "killed exactly once");
    // Its death clears the stall: the successor serves, in the tables once ready.
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
    sample_as_is(&mut sup, 100).await;
    let p0 = last_started(&sup);
    sup.on_notify_ready(p0).await;
    sup.host_mut().depths = vec![0, 0];
    sample_as_is(&mut sup, 5).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::Ready);
    assert_eq!(sup.live(), [true, true]);
}

#[tokio::test]
async fn shutdown_answers_the_pending_operation_and_signals_every_worker() {
    let mut sup = ready(2).await;
    let (old0, p1) = (pid(&sup, 0), pid(&sup, 1));
    // Slot 0 restarted: its old worker is retiring.
    let mut rx = ask(&mut sup, Request::Restart { slot: Some(0) }).await;
    let new0 = last_started(&sup);
    sup.on_notify_ready(new0).await;
    assert!(answered(&mut rx).is_ok());
    // Slot 1's restart is under way: its successor is starting.
    let mut pending_restart = ask(&mut sup, Request::Restart { slot: Some(1) }).await;
    let new1 = last_started(&sup);
    assert!(pending(&mut pending_restart));
    sup.host_mut().take_calls();
    sup.begin_shutdown();
    assert_eq!(
        error_kind(&answered(&mut pending_restart)),
        ErrorKind::Failed
    );
    // New connections are refused first; the workers keep accepting what is queued.
    // For as long as the stop can take (grace 5 s twice, 10 s to spare), not for good: the
    // refusal outlives a controller killed while it stops, and must end.
    assert_eq!(
        sup.host().calls,
        [Call::RefuseNew {
            for_at_most: Duration::from_secs(20)
        }]
    );
    sup.stop_workers();
    let mut termed: Vec<u32> = sup
        .host()
        .signals()
        .into_iter()
        .filter(|(_, s)| *s == Signal::SIGTERM)
        .map(|(p, _)| p)
        .collect();
    termed.sort_unstable();
    let mut all = vec![old0, new0, p1, new1];
    all.sort_unstable();
    assert_eq!(termed, all);
    // Requests are refused while stopping; an exit is not respawned.
    let mut rx = ask(&mut sup, Request::Status).await;
    assert_eq!(error_kind(&answered(&mut rx)), ErrorKind::Failed);
    sup.host_mut().take_calls();
    exit(&mut sup, p1, WorkerExit::Code(0)).await;
    super::advance(&mut sup, Duration::from_secs(1)).await;
    assert!(
        !sup.host()
            .calls
            .iter()
            .any(|c| matches!(c, Call::Spawn { .. })),
        "{:?}",
        sup.host().calls
    );
    sup.kill_remaining();
    let killed: Vec<u32> = sup.host().signals().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        killed.len(),
        3,
        "SIGKILL to the three still running: {killed:?}"
    );
    assert!(!killed.contains(&p1));
    for p in [old0, new0, new1] {
        assert!(sup.workers_left());
        exit(&mut sup, p, WorkerExit::Signal(9)).await;
    }
    assert!(!sup.workers_left());
    sup.host_mut().take_calls();
    sup.finish_shutdown();
    let calls = sup.host().calls.clone();
    assert_eq!(calls.first(), Some(&Call::Detach));
    match calls.get(1) {
        Some(Call::PrintCounters(views)) => {
            assert_eq!(views.len(), 2);
            assert!(
                views.iter().all(|v| v.state == SlotState::Stopped),
                "{views:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Every occupant shape the table distinguishes.
fn occupants() -> Vec<(&'static str, Occupant)> {
    let w = |ready| Worker {
        pid: 1,
        generation: Generation(1),
        since: Instant::now(),
        ready,
    };
    vec![
        ("vacant", Occupant::Vacant),
        ("backing-off", Occupant::BackingOff(TimerToken(1))),
        ("starting", Occupant::Serving(w(false))),
        ("ready", Occupant::Serving(w(true))),
        (
            "successor alone",
            Occupant::Replacing {
                old: None,
                new: w(false),
            },
        ),
        (
            "starting, replaced",
            Occupant::Replacing {
                old: Some(w(false)),
                new: w(false),
            },
        ),
        (
            "ready, replaced",
            Occupant::Replacing {
                old: Some(w(true)),
                new: w(false),
            },
        ),
    ]
}

#[test]
fn every_slot_shape_maps_to_exactly_one_state() {
    use SlotState::*;
    // (occupant, membership) -> state while running and not stalled; then the rules for
    // stalls and for stopping.
    let table: [(&str, [SlotState; 3]); 7] = [
        ("vacant", [Down, Down, Removing]),
        ("backing-off", [BackingOff, BackingOff, Removing]),
        ("starting", [Starting, Starting, Removing]),
        ("ready", [Ready, Draining, Removing]),
        ("successor alone", [Starting, Starting, Removing]),
        ("starting, replaced", [Starting, Starting, Removing]),
        ("ready, replaced", [Ready, Draining, Removing]),
    ];
    let mut seen = std::collections::HashSet::new();
    let mut shapes = 0;
    for (name, occupant) in occupants() {
        let row = table
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a row per occupant");
        let has_worker = name.contains("ready") || name.starts_with("starting");
        for (m, membership) in [
            Membership::Active,
            Membership::Drained,
            Membership::Removing,
        ]
        .into_iter()
        .enumerate()
        {
            for stalled in [false, true] {
                for phase in [Phase::Running, Phase::Stopping] {
                    shapes += 1;
                    let got = state_of(occupant, membership, stalled, phase);
                    let expected = match row.1[m] {
                        Removing => Removing,
                        _ if stalled && has_worker => Stalled,
                        Down if phase == Phase::Stopping => Stopped,
                        s => s,
                    };
                    assert_eq!(
                        got, expected,
                        "{name}, {membership:?}, stalled {stalled}, {phase:?}"
                    );
                    seen.insert(got);
                }
            }
        }
    }
    assert_eq!(shapes, 7 * 3 * 2 * 2);
    for state in SlotState::ALL {
        assert!(seen.contains(&state), "{state} is never shown");
        assert_eq!(state.as_str().parse::<SlotState>(), Ok(state));
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            format!("\"{}\"", state.as_str())
        );
    }
}

#[tokio::test]
async fn a_crash_looping_slot_does_not_hold_its_queue_through_the_backoff() {
    let mut sup = ready(2).await;
    let stall_ms = STALL_TIMEOUT.as_millis() as u64;
    // Slot 0's worker keeps dying at once: its respawns back off.
    for _ in 0..4 {
        let victim = pid(&sup, 0);
        exit(&mut sup, victim, WorkerExit::Code(1)).await;
        sample_for(&mut sup, &[7, 0], 20).await;
        if sup.slots[0].current().is_some() {
            continue;
        }
        // Backing off: wait for the respawn.
        let mut waited = 0;
        while sup.slots[0].current().is_none() {
            sample_for(&mut sup, &[7, 0], 1).await;
            waited += 1;
            assert!(waited < 10_000);
        }
    }
    let victim = pid(&sup, 0);
    exit(&mut sup, victim, WorkerExit::Code(1)).await;
    assert_eq!(sup.slots[0].state(Phase::Running), SlotState::BackingOff);
    // Its queue has waited the stall timeout since the slot lost its worker: moved out.
    let evacuations = |sup: &Sup| count(sup, |c| c == &Call::Evacuate { slot: 0 });
    assert!(evacuations(&sup) >= 1, "moved out during the crash loop");
    let before = evacuations(&sup);
    sample_for(&mut sup, &[7, 0], stall_ms - 2).await;
    assert!(
        evacuations(&sup) <= before + 1,
        "at most once per stall timeout"
    );
    // Not while it serves: a ready worker's queue is stall detection's business.
    let mut s = ready(2).await;
    sample_for(&mut s, &[3, 0], 5).await;
    sample_for(&mut s, &[2, 0], 5).await;
    assert_eq!(count(&s, |c| matches!(c, Call::Evacuate { .. })), 0);
}

#[tokio::test]
async fn a_stop_waits_for_the_queues_of_running_workers_only() {
    let mut sup = ready(2).await;
    let p0 = pid(&sup, 0);
    sup.host_mut().take_calls();
    sup.host_mut().depths = vec![3, 1];
    sup.begin_shutdown();
    assert!(!sup.drained(), "both workers still have connections queued");
    sup.host_mut().depths = vec![3, 0];
    assert!(!sup.drained(), "slot 0's worker still has 3 to accept");
    assert!(
        sup.host().signals().is_empty(),
        "no worker is told to stop while it drains: {:?}",
        sup.host().calls
    );
    // A connection still in its handshake is waited for: its final ACK queues it.
    sup.host_mut().depths = vec![0, 0];
    sup.host_mut().half_open = 1;
    assert!(!sup.drained());
    sup.host_mut().half_open = 0;
    assert!(sup.drained());
    // Slot 0's worker dies with 3 queued: no one is respawned to accept them, so they move
    // to slot 1, whose worker drains them (once: the next check waits for slot 1).
    sup.host_mut().depths = vec![3, 0];
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
    sup.host_mut().take_calls();
    assert!(sup.drained(), "the fake moved slot 0's queue at once");
    assert_eq!(sup.host().calls, [Call::Evacuate { slot: 0 }]);
    sup.host_mut().depths = vec![0, 2];
    assert!(!sup.drained());
    assert_eq!(sup.host().calls, [Call::Evacuate { slot: 0 }]);
}
