//! `balancer upgrade` and `SIGUSR2`, on the old controller's side: start the new binary, let
//! it adopt the group (see `handover`), and either exit leaving it in charge, or take
//! everything back when it fails.
use std::{ffi::OsString, path::PathBuf};

use log::{error, info, warn};
use tokio::sync::mpsc;

use super::{host::Host, machine::Supervisor, real_host::RealHost};
use crate::{
    activation,
    control::{
        client,
        protocol::{ErrorKind, ErrorReply, Request},
        server::{Command, ControlSocket},
    },
    group_state::GroupRecord,
    handover::{Successor, VERSION},
    notify::NotifySocket,
    steering,
};

/// What an upgrade needs from the process: its control socket, how it was started.
pub struct UpgradeContext {
    /// The control socket (a failed upgrade takes its path back).
    pub control: ControlSocket,
    /// Where the control socket is.
    pub control_path: PathBuf,
    /// The binary this controller was started from (re-resolved at upgrade time: a file
    /// replaced on disk is the new version).
    pub started_from: PathBuf,
    /// This controller's arguments, for the new one.
    pub args: Vec<OsString>,
    /// The group's name (the new controller finds the record by it).
    pub group: String,
    /// Where the program and maps are pinned, if anywhere.
    pub pin_dir: Option<PathBuf>,
}

/// Hands the group over to `binary` (default: the one we were started from). Ok: the new
/// controller is ready and in charge, with this message for the operator; the caller exits
/// without touching any worker. Err: we are still in charge.
pub async fn upgrade(
    sup: &mut Supervisor<RealHost>,
    ctx: &mut UpgradeContext,
    binary: Option<PathBuf>,
    watchdog: &mut Option<tokio::time::Interval>,
    notify: &mut NotifySocket,
) -> Result<(String, u32), ErrorReply> {
    if let Some(busy) = sup.busy() {
        return Err(busy);
    }
    let binary = binary.unwrap_or_else(|| ctx.started_from.clone());
    let binary = activation::resolve_program(binary.as_os_str()).map_err(|e| {
        ErrorReply::new(
            ErrorKind::Invalid,
            format!(
                "upgrade: {} cannot be the new controller ({e}); nothing was changed",
                binary.display()
            ),
        )
    })?;
    let me = std::process::id();
    info!("upgrade: starting {}", binary.display());
    let failed = |e: &dyn std::fmt::Display| {
        ErrorReply::new(
            ErrorKind::Failed,
            format!(
                "upgrade to {} failed: {e}; controller pid {me} stays in charge",
                binary.display()
            ),
        )
    };
    let mut next = Successor::start(&binary, &ctx.args).map_err(|e| failed(&e))?;
    // Nothing has changed until it says it runs.
    if let Err(e) = keep_watchdog(sup, watchdog, next.hello()).await {
        next.abandon();
        error!("{}", failed(&e));
        return Err(failed(&e));
    }
    // From here on the group is the successor's to take: our record is current, and our
    // socket arrays let go of the sockets (the kernel's hash steers until its are in).
    sup.host_mut().rewrite_record();
    sup.save_record();
    sup.host_mut().withdraw_sockets();
    let sockets = sup.host().socket_fds();
    let outcome = match next.go(&ctx.group, &sockets).await {
        Ok(()) => keep_watchdog(sup, watchdog, next.ready()).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok((pid, version)) => {
            let message = format!(
                "upgraded: controller pid {me} ({VERSION}) -> pid {pid} ({version}); every worker kept"
            );
            info!("{message}");
            Ok((message, pid))
        }
        Err(e) => {
            let pid = next.pid();
            next.abandon();
            let mut reply = failed(&e);
            // The would-be successor may have pinned its maps over ours: they would hold our
            // sockets in its socket arrays. Without pins until the next restart (a crash then
            // restarts the counters), but steering is ours again.
            if let Some(dir) = &ctx.pin_dir {
                steering::unpin_addresses(dir, &sup.host().addresses());
                warn!(
                    "upgrade failed: the pins under {} are removed until the controller restarts",
                    dir.display()
                );
            }
            stop_successors_workers(sup, pid);
            if let Err(e) = sup.host_mut().reclaim_steering() {
                reply
                    .message
                    .push_str(&format!("; taking the sockets back failed: {e}"));
            }
            if let Err(e) = notify.rebind() {
                reply.message.push_str(&format!(
                    "; taking the workers' notify socket back failed: {e}"
                ));
            }
            if let Err(e) = ctx.control.reclaim() {
                reply
                    .message
                    .push_str(&format!("; taking the control socket back failed: {e}"));
            }
            sup.host_mut().rewrite_record();
            sup.save_record();
            warn!(
                "upgrade: would-be successor pid {pid} killed; {}",
                reply.message
            );
            Err(reply)
        }
    }
}

/// Stops the workers a failed successor started (they are in its record, not in ours): they
/// would hold slots' sockets unsupervised.
fn stop_successors_workers(sup: &mut Supervisor<RealHost>, successor: u32) {
    let Ok(Some(record)) = GroupRecord::load(sup.host().record_dir()) else {
        return;
    };
    if record.controller.pid != successor {
        return;
    }
    let ours: Vec<u32> = sup.worker_pids();
    for w in record.slots.iter().filter_map(|s| s.worker.as_ref()) {
        if !ours.contains(&w.process.pid) && w.process.alive() {
            warn!(
                "upgrade failed: stopping worker pid {} that the would-be successor started",
                w.process.pid
            );
            let signal = sup.settings.stop_signal;
            sup.host_mut().signal(w.process.pid, signal);
        }
    }
}

/// Awaits `step`, telling the service manager's watchdog we are alive meanwhile (a handover
/// may take longer than its timeout).
async fn keep_watchdog<T>(
    sup: &mut Supervisor<RealHost>,
    watchdog: &mut Option<tokio::time::Interval>,
    step: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(step);
    loop {
        tokio::select! {
            out = &mut step => return out,
            _ = tick_watchdog(watchdog) => sup.host_mut().tell_manager("WATCHDOG=1"),
        }
    }
}

/// The next watchdog tick; never, without a watchdog.
pub async fn tick_watchdog(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// After a successful handover: the requests that reached us meanwhile are answered by the
/// new controller (forwarded to the control socket's path, which is its now).
pub async fn forward_pending(commands: &mut mpsc::Receiver<Command>, ctx: &UpgradeContext) {
    // Let the accept loop pick up the clients that connected before the path changed.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    while let Ok((request, reply)) = commands.try_recv() {
        let outcome = match request {
            Request::Upgrade { .. } => Err(ErrorReply::new(
                ErrorKind::Busy,
                "an upgrade has just replaced this controller: try again",
            )),
            request => client::call(&ctx.control_path, &request)
                .await
                .unwrap_or_else(|e| {
                    Err(ErrorReply::new(
                        ErrorKind::Failed,
                        format!("forwarding to the new controller: {e:#}"),
                    ))
                }),
        };
        let _ = reply.send(outcome);
    }
    // The server tasks write the last replies.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}
