//! Doing one event to the group, and waiting until it is over: the CLI replies once an
//! operation is done, a restarted controller once it is ready, and every event ends with the
//! group settled again (every slot with a ready worker), so that events never overlap.
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{group::Group, hands, plan::Event};

/// How long the group may take to settle after an event.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Sleeps `d`, waking early when `stop` is set; whether it slept the whole time.
pub fn sleep_unless(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    true
}

fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) on a worker of the group under test.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        bail!(
            "signal {sig} to worker pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Does `event`; `workers` is the group's size once it is done. Returns, for a worker
/// SIGKILL, the client addresses of the connections the worker held when it died. Holding a
/// worker stopped or a slot drained ends early (and in order) when `stop` is set.
pub fn apply(
    group: &mut Group,
    event: &Event,
    workers: u32,
    stop: &AtomicBool,
) -> Result<HashSet<SocketAddr>> {
    let mut held = HashSet::new();
    let slot_arg = |s: u32| s.to_string();
    match event {
        Event::WorkerKill { slot } => {
            let pid = group.worker_pid(*slot)?;
            // Stopped first, so that what it holds is read while it can take nothing more.
            signal(pid, libc::SIGSTOP)?;
            let stopped = hands::wait_stopped(pid, Duration::from_secs(2));
            let look = if stopped {
                hands::held_connections(pid, group.addr)
            } else {
                Err(anyhow::anyhow!("worker pid {pid} did not stop within 2 s"))
            };
            signal(pid, libc::SIGKILL)?;
            held = look.context("reading what the killed worker held")?;
        }
        Event::WorkerStop { slot, after } => {
            let pid = group.worker_pid(*slot)?;
            signal(pid, libc::SIGSTOP)?;
            sleep_unless(*after, stop);
            // Whatever happened meanwhile, what was stopped is continued.
            signal(pid, libc::SIGCONT)?;
        }
        Event::PolicyFlip { to } => {
            group.cli(&["policy".as_ref(), "set".as_ref(), to.as_ref()])?;
        }
        Event::Scale { to, .. } => {
            group.cli(&[
                "workers".as_ref(),
                "scale".as_ref(),
                to.to_string().as_ref(),
            ])?;
        }
        Event::Drain { slot, after } => {
            let s = slot_arg(*slot);
            group.cli(&["drain".as_ref(), "--slot".as_ref(), s.as_ref()])?;
            sleep_unless(*after, stop);
            group.cli(&["undrain".as_ref(), "--slot".as_ref(), s.as_ref()])?;
        }
        Event::RollingRestart { slot } => {
            let mut args: Vec<String> = vec!["workers".into(), "restart".into()];
            if let Some(s) = slot {
                args.extend(["--slot".into(), slot_arg(*s)]);
            }
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
            group.cli(&args)?;
        }
        Event::ControllerKill => group.kill_and_restart_controller()?,
        Event::Upgrade => group.upgrade()?,
    }
    group.settle(workers, SETTLE_TIMEOUT)?;
    Ok(held)
}
