//! The event loop: worker events and timers from the host, READY=1 from the notify socket,
//! control requests, the sampling tick and the controller's signals, each handed to the
//! supervisor one at a time; then the ordered shutdown.
use std::time::Duration;

use anyhow::Context;
use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use super::{
    host::{Event, Host},
    machine::Supervisor,
    operation::Responder,
    real_host::{RealHost, Workers},
    settings::SupervisorConfig,
    signals::Signals,
    upgrade::{forward_pending, tick_watchdog, upgrade, UpgradeContext},
};
use crate::{
    alarm::Alarm,
    control::{
        protocol::{ErrorKind, ErrorReply, Reply, Request},
        server::Command,
    },
    notify::NotifySocket,
    service_manager::ServiceManager,
    socket_group::SocketGroup,
    steering::Steering,
};

/// After SIGKILL on shutdown, how long to wait for the exits to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// How the controller ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on purpose: every worker stopped, the record removed.
    Stopped,
    /// Handed over to a new controller (an upgrade): workers, sockets, program, pins and
    /// record are its now; nothing of them may be touched on the way out.
    HandedOver,
}

/// Runs the group: starts every worker, supervises them, serves `commands`, and stops the
/// workers in order on SIGTERM/SIGINT. Returns after every worker has exited. `manager`
/// hears READY=1, STATUS=, STOPPING=1 and, with a watchdog, WATCHDOG=1 from this loop.
pub async fn run(
    config: SupervisorConfig,
    group: SocketGroup,
    steering: Steering,
    mut commands: mpsc::Receiver<Command>,
    manager: ServiceManager,
    mut upgrades: UpgradeContext,
    signals: Signals,
) -> anyhow::Result<Exit> {
    let (start, settings, steer) = config.split();
    let owner = start.credentials.as_ref().map(|c| (c.uid, c.gid));
    let mut notify = NotifySocket::bind_in(&start.record_dir, owner).with_context(|| {
        format!(
            "creating the NOTIFY_SOCKET for workers in {} (with --user, owned by the workers' user)",
            start.record_dir.display()
        )
    })?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Workers outlive us, but while we run we reap what they leave: a worker's orphaned
    // children are reparented to us, not to init.
    // SAFETY: prctl with an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } < 0 {
        warn!(
            "cannot become the workers' subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut chld = signal(SignalKind::child())?;
    // Without a watchdog the timer never fires: no wake-up is added.
    let mut watchdog = manager
        .watchdog_interval()
        .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let workers = Workers {
        command: start.command,
        notify_env: notify.env_value().to_owned(),
        adopted: start.adopted_pidfds,
        credentials: start.credentials,
        protocol: start.socket_protocol,
    };
    let host = RealHost::new(group, steering, workers, tx, manager, start.record_dir);
    let Signals {
        mut term,
        mut int,
        mut hup,
        mut usr1,
        mut usr2,
    } = signals;
    let mut alarm = Alarm::new().context("creating the controller's timer (timerfd)")?;
    let mut sup = Supervisor::new(host, settings, steer, start.slots);
    match start.inherited {
        Some(inherited) => sup.adopt(inherited).await,
        None => sup.start(),
    }
    sup.save_record();
    loop {
        // No fixed tick: the loop sleeps until the next sample or socket check is due (see
        // `pacing`), or for ever when neither is.
        let wake = sup.next_wake();
        tokio::select! {
            woke = alarm.wait_until(wake) => {
                if let Err(e) = woke {
                    error!("the controller's timer (timerfd) failed: {e}; waiting on the runtime's timer this once");
                    sleep_until(wake).await;
                }
                // Samples change nothing the record keeps; a socket check, or a restart a
                // sample started, may.
                if !sup.on_tick().await {
                    continue;
                }
            }
            _ = chld.recv() => reap(&mut sup).await,
            Some(event) = rx.recv() => sup.handle(event).await,
            msg = notify.recv() => match msg {
                Ok(msg) => {
                    if let (true, Some(pid)) = (msg.is_ready(), msg.pid) {
                        if let Ok(pid) = u32::try_from(pid) {
                            sup.on_notify_ready(pid).await;
                        }
                    }
                }
                Err(e) => warn!("reading NOTIFY_SOCKET: {e}"),
            },
            Some((request, reply)) = commands.recv() => {
                if let Request::Upgrade { binary } = request {
                    match upgrade(&mut sup, &mut upgrades, binary, &mut watchdog, &mut notify).await {
                        Ok((message, successor)) => {
                            let _ = reply.send(Ok(Reply::Done { message }));
                            forward_pending(&mut commands, &upgrades).await;
                            forward_stop(&mut term, &mut int, successor).await;
                            sup.print_report();
                            return Ok(Exit::HandedOver);
                        }
                        Err(e) => { let _ = reply.send(Err(e)); }
                    }
                } else if request.changes_state() && sup.host().handing_over() {
                    // Until the old controller has let go, a change could be lost with us.
                    let _ = reply.send(Err(ErrorReply::new(
                        ErrorKind::Busy,
                        "this controller is still taking over from the previous one: try again in a moment",
                    )));
                } else {
                    sup.on_request(request, Responder::to(reply)).await;
                }
            }
            _ = usr2.recv() => {
                info!("SIGUSR2: upgrading");
                match upgrade(&mut sup, &mut upgrades, None, &mut watchdog, &mut notify).await {
                    Ok((_, successor)) => {
                        forward_pending(&mut commands, &upgrades).await;
                        forward_stop(&mut term, &mut int, successor).await;
                        sup.print_report();
                        return Ok(Exit::HandedOver);
                    }
                    Err(e) => warn!("SIGUSR2: {e}"),
                }
            }
            _ = term.recv() => { info!("SIGTERM: stopping workers"); break; }
            _ = int.recv() => { info!("SIGINT: stopping workers"); break; }
            _ = hup.recv() => {
                info!("SIGHUP: rolling restart of every slot");
                sup.restart_all();
            }
            _ = usr1.recv() => sup.print_report(),
            _ = tick_watchdog(&mut watchdog) => sup.host_mut().tell_manager("WATCHDOG=1"),
        }
        sup.save_record();
    }
    shutdown(&mut sup, &mut rx, &mut chld).await;
    Ok(Exit::Stopped)
}

/// Sleeps until `at`; for ever when `None`.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// A SIGTERM or SIGINT that arrived while we handed over was meant for the service: it goes
/// to the controller now in charge.
async fn forward_stop(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    successor: u32,
) {
    let pending = |r: Result<Option<()>, _>| matches!(r, Ok(Some(())));
    let stop = pending(tokio::time::timeout(Duration::ZERO, term.recv()).await)
        | pending(tokio::time::timeout(Duration::ZERO, int.recv()).await);
    if stop {
        info!("a stop request came during the handover: SIGTERM to controller pid {successor}");
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(successor as i32),
            nix::sys::signal::Signal::SIGTERM,
        ) {
            warn!("SIGTERM to controller pid {successor}: {e}");
        }
    }
}

/// New connections refused, the queues drained (for up to the grace), then the stop signal to
/// every worker, SIGKILL after the grace, then waits for the exits (at most [`REAP_WAIT`] more) and
/// detaches the program.
async fn shutdown(
    sup: &mut Supervisor<RealHost>,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    chld: &mut tokio::signal::unix::Signal,
) {
    sup.begin_shutdown();
    let grace = sup.grace();
    drain(sup, rx, chld, grace).await;
    sup.stop_workers();
    let deadline = tokio::time::Instant::now() + grace;
    let mut killed = false;
    while sup.workers_left() {
        tokio::select! {
            _ = chld.recv() => reap(sup).await,
            Some(event) = rx.recv() => exit_only(sup, event).await,
            _ = tokio::time::sleep_until(deadline), if !killed => {
                warn!("workers still running after the {} grace: SIGKILL",
                    humantime::format_duration(grace));
                sup.kill_remaining();
                killed = true;
            }
            _ = tokio::time::sleep_until(deadline + REAP_WAIT), if killed => {
                error!("workers did not exit after SIGKILL; giving up on them");
                break;
            }
        }
    }
    sup.finish_shutdown();
    // Stopped on purpose: there is nothing for a successor to adopt.
    sup.host_mut().forget_record();
}

/// Lets the workers accept what is queued while the program refuses new connections, until
/// every queue is empty or `grace` has passed.
async fn drain(
    sup: &mut Supervisor<RealHost>,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    chld: &mut tokio::signal::unix::Signal,
    grace: Duration,
) {
    let every = sup.sample_interval();
    let start = tokio::time::Instant::now();
    // The first sample comes one interval after the switch: a SYN that a program run read
    // the old config for has been queued by then, and is waited for.
    let mut tick = tokio::time::interval_at(start + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => if sup.drained() {
                info!("queues drained in {}: stopping workers",
                    humantime::format_duration(super::lifecycle::round_ms(start.elapsed())));
                return;
            },
            _ = chld.recv() => reap(sup).await,
            Some(event) = rx.recv() => exit_only(sup, event).await,
            _ = tokio::time::sleep_until(start + grace) => {
                warn!("queues not drained after the {} grace: stopping workers anyway",
                    humantime::format_duration(grace));
                return;
            }
        }
    }
}

/// SIGCHLD: every child that ended, handed to the supervisor.
async fn reap(sup: &mut Supervisor<RealHost>) {
    for event in sup.host_mut().reap() {
        sup.handle(event).await;
    }
}

/// While stopping, timers no longer matter: only exits are waited for.
async fn exit_only(sup: &mut Supervisor<RealHost>, event: Event) {
    if let Event::Exited { .. } = event {
        sup.handle(event).await;
    }
}
