//! `--stop-signal`: every worker told to finish and exit gets the configured signal (rolling
//! restart, scale-down, shutdown after the drain), SIGKILL after the grace; a stalled worker
//! killed by `--kill-stalled` still gets SIGKILL at once.
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{
    advance, answered, ask, exit, fake_host::Call, last_started, pid, ready_with, settings,
    Settings, STALL_TIMEOUT,
};
use crate::{control::protocol::Request, supervisor::host::WorkerExit};

fn quitting() -> Settings {
    Settings {
        stop_signal: Signal::SIGQUIT,
        ..settings()
    }
}

#[tokio::test]
async fn a_rolling_restart_stops_the_old_worker_with_the_stop_signal_then_sigkill() {
    let mut sup = ready_with(1, quitting()).await;
    let old = pid(&sup, 0);
    let mut rx = ask(&mut sup, Request::Restart { slot: None }).await;
    let new = last_started(&sup);
    sup.on_notify_ready(new).await;
    assert!(answered(&mut rx).is_ok());
    assert_eq!(sup.host().signals(), [(old, Signal::SIGQUIT)]);
    advance(&mut sup, super::GRACE).await;
    assert_eq!(
        sup.host().signals(),
        [(old, Signal::SIGQUIT), (old, Signal::SIGKILL)],
        "SIGKILL after the grace, as with the default signal"
    );
}

#[tokio::test]
async fn a_scale_down_stops_the_removed_workers_with_the_stop_signal() {
    let mut sup = ready_with(3, quitting()).await;
    let (p1, p2) = (pid(&sup, 1), pid(&sup, 2));
    let _rx = ask(&mut sup, Request::Scale { workers: 1 }).await;
    let mut signals = sup.host().signals();
    signals.sort_unstable_by_key(|(p, _)| *p);
    let mut want = vec![(p1, Signal::SIGQUIT), (p2, Signal::SIGQUIT)];
    want.sort_unstable_by_key(|(p, _)| *p);
    assert_eq!(signals, want);
}

#[tokio::test]
async fn shutdown_refuses_new_connections_first_then_sends_the_stop_signal() {
    let mut sup = ready_with(2, quitting()).await;
    let (p0, p1) = (pid(&sup, 0), pid(&sup, 1));
    sup.begin_shutdown();
    assert!(
        matches!(sup.host().calls[..], [Call::RefuseNew { .. }]),
        "no worker is signalled before the queues drain: {:?}",
        sup.host().calls
    );
    sup.stop_workers();
    assert_eq!(
        sup.host().signals(),
        [(p0, Signal::SIGQUIT), (p1, Signal::SIGQUIT)]
    );
    sup.kill_remaining();
    assert_eq!(
        sup.host().signals()[2..],
        [(p0, Signal::SIGKILL), (p1, Signal::SIGKILL)]
    );
}

#[tokio::test]
async fn a_stalled_worker_is_killed_not_asked_to_stop() {
    let mut s = quitting();
    s.kill_stalled = Some(Duration::from_millis(100));
    s.evacuate = false;
    let mut sup = ready_with(2, s).await;
    let p0 = pid(&sup, 0);
    let ms = STALL_TIMEOUT.as_millis() as u64 + 200;
    for _ in 0..ms {
        sup.host_mut().depths = vec![5, 0];
        advance(&mut sup, Duration::from_millis(1)).await;
        sup.on_sample().await;
    }
    assert_eq!(sup.host().signals(), [(p0, Signal::SIGKILL)]);
    exit(&mut sup, p0, WorkerExit::Signal(9)).await;
}
