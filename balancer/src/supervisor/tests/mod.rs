//! The supervisor's decisions against a fake host: no root, no processes, no real time.
//! Each test drives events, requests, samples and timers by hand and checks the effects the
//! supervisor asked for, in order.
mod adoption;
mod fake_host;
mod lifecycle;
mod operations;
mod pacing;
mod sockets;
mod states;
mod stop_signal;

use std::time::Duration;

use balancer_common::PolicyKind;
use tokio::sync::oneshot;

use self::fake_host::FakeHost;
use super::{
    host::{Event, WorkerExit},
    operation::Responder,
    settings::{Settings, Steer},
    Supervisor,
};
use crate::{
    control::protocol::{ErrorKind, Outcome, Request},
    policy::CpuLayout,
};

const READY_TIMEOUT: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(5);
const STALL_TIMEOUT: Duration = Duration::from_millis(300);

fn settings() -> Settings {
    Settings {
        layout: CpuLayout::contiguous(2),
        pin_workers: false,
        ready_timeout: READY_TIMEOUT,
        grace: GRACE,
        stop_signal: nix::sys::signal::Signal::SIGTERM,
        bpf_stats: false,
        sample_interval: Duration::from_millis(1),
        stall_timeout: STALL_TIMEOUT,
        evacuate: true,
        kill_stalled: None,
        socket_check: Duration::from_secs(1),
    }
}

/// Settings with stall detection off: with spill off and a policy other than least-loaded,
/// nothing reads the load signal.
fn settings_without_signal() -> Settings {
    Settings {
        stall_timeout: Duration::ZERO,
        ..settings()
    }
}

type Sup = Supervisor<FakeHost>;

/// A supervisor of `slots` slots whose workers were started (not yet ready).
fn started_with(slots: u32, settings: Settings) -> Sup {
    let steer = Steer {
        policy: PolicyKind::Hash,
        spill_depth: 16,
        weights: None,
    };
    let mut sup = Supervisor::new(FakeHost::new(slots), settings, steer, slots);
    sup.start();
    sup
}

/// A supervisor of `slots` slots whose workers all said READY=1; the calls so far are cleared.
async fn ready(slots: u32) -> Sup {
    ready_with(slots, settings()).await
}

async fn ready_with(slots: u32, settings: Settings) -> Sup {
    let mut sup = started_with(slots, settings);
    for slot in 0..slots {
        let pid = pid(&sup, slot);
        sup.on_notify_ready(pid).await;
    }
    sup.host_mut().take_calls();
    sup
}

/// The pid of the worker serving `slot`.
fn pid(sup: &Sup, slot: u32) -> u32 {
    sup.slots[slot as usize]
        .current()
        .unwrap_or_else(|| panic!("slot {slot} has no worker"))
        .pid
}

/// The pid of the last worker started.
fn last_started(sup: &Sup) -> u32 {
    sup.host().started.last().expect("a worker was started").pid
}

/// Ends worker `pid` as `how`.
async fn exit(sup: &mut Sup, pid: u32, how: WorkerExit) {
    let event = sup.host().exit_event(pid, how);
    sup.handle(event).await;
}

/// Moves time on by `by`, firing each timer that falls due at its own time (including timers
/// the handlers schedule meanwhile).
async fn advance(sup: &mut Sup, by: Duration) {
    let until = sup.host().now + by;
    while let Some(timer) = sup.host_mut().next_due(until) {
        sup.handle(Event::Timer(timer)).await;
    }
    sup.host_mut().now = until;
}

/// Runs the event loop's clock for `by`: the supervisor is woken when it asked to be (the
/// samples and socket checks it scheduled), timers fire in between.
async fn run_for(sup: &mut Sup, by: Duration) {
    let until = sup.host().now + by;
    // Bounded: a wake-up that is due but does nothing would otherwise spin here.
    for _ in 0..10_000_000 {
        let Some(wake) = sup.next_wake().filter(|at| *at <= until) else {
            break;
        };
        let wait = wake.saturating_duration_since(sup.host().now);
        advance(sup, wait).await;
        sup.on_tick().await;
    }
    advance(sup, until.saturating_duration_since(sup.host().now)).await;
}

/// Sends a request; the receiver has the outcome once the supervisor answered.
async fn ask(sup: &mut Sup, request: Request) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    sup.on_request(request, Responder::to(tx)).await;
    rx
}

/// The outcome, which must have been given already.
fn answered(rx: &mut oneshot::Receiver<Outcome>) -> Outcome {
    rx.try_recv().expect("the request was answered")
}

/// Whether the request is still waiting for its outcome.
fn pending(rx: &mut oneshot::Receiver<Outcome>) -> bool {
    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

/// The error kind of an outcome that must be an error.
fn error_kind(outcome: &Outcome) -> ErrorKind {
    match outcome {
        Err(e) => e.kind,
        Ok(reply) => panic!("expected an error, got {reply:?}"),
    }
}
