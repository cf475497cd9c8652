//! Worker supervision: one worker per slot, respawned on the same socket when it dies, with
//! the steering tables republished on every change so that new connections only go to slots
//! whose worker is ready.
use std::{
    ffi::OsString,
    io,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::Context;
use balancer_common::PolicyKind;
use log::{error, info, warn};
use nix::{
    sched::CpuSet,
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    activation::{self, WorkerLaunch},
    notify::{Notification, NotifySocket},
    policy::{build_tables, CpuLayout},
    report::{self, SlotView},
    socket_group::SocketGroup,
    steering::Steering,
};

/// First respawn delay of a crash loop; it doubles with every quick exit in a row.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest respawn delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting is respawned at once, its crash streak forgotten.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// After SIGKILL on shutdown, how long to wait for the exits to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// What the supervisor is told to run.
pub struct SupervisorConfig {
    /// Worker program (resolved) and arguments.
    pub command: Vec<OsString>,
    /// Number of slots.
    pub slots: u32,
    /// Active policy.
    pub policy: PolicyKind,
    /// CPU layout the tables are built for.
    pub layout: CpuLayout,
    /// Pin workers to their CPUs.
    pub pin_workers: bool,
    /// How long to wait for READY=1.
    pub ready_timeout: Duration,
    /// SIGTERM → SIGKILL grace on shutdown.
    pub grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Spawned, not yet ready: not in the tables.
    Starting { pid: u32, since: Instant },
    /// Ready: takes new connections.
    Ready { pid: u32, since: Instant },
    /// Dead, waiting for its respawn.
    BackingOff,
    /// Dead for good (shutdown).
    Stopped,
}

struct Slot {
    state: State,
    /// Bumped on every spawn; stale timers and exits carry an older one.
    generation: u64,
    restarts: u32,
    quick_exits: u32,
}

enum Event {
    Exited {
        slot: u32,
        generation: u64,
        pid: u32,
        status: io::Result<ExitStatus>,
    },
    ReadyTimeout {
        slot: u32,
        generation: u64,
    },
    Respawn {
        slot: u32,
        generation: u64,
    },
}

/// Supervises the workers of a socket group until SIGTERM or SIGINT.
pub struct Supervisor {
    config: SupervisorConfig,
    group: SocketGroup,
    steering: Steering,
    notify_env: String,
    fd_names: String,
    slots: Vec<Slot>,
    events: mpsc::UnboundedSender<Event>,
    stopping: bool,
    announced_ready: bool,
}

impl Supervisor {
    /// Runs the group: starts every worker, supervises them, and stops them in order on
    /// SIGTERM/SIGINT. Returns after every worker has exited.
    pub async fn run(
        config: SupervisorConfig,
        group: SocketGroup,
        steering: Steering,
    ) -> anyhow::Result<()> {
        let notify = NotifySocket::bind().context("creating the NOTIFY_SOCKET for workers")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let slots = (0..config.slots)
            .map(|_| Slot {
                state: State::BackingOff,
                generation: 0,
                restarts: 0,
                quick_exits: 0,
            })
            .collect();
        let mut sup = Self {
            fd_names: activation::fd_names(group.addresses.len()),
            notify_env: notify.env_value().to_owned(),
            config,
            group,
            steering,
            slots,
            events: tx,
            stopping: false,
            announced_ready: false,
        };
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        for slot in 0..sup.config.slots {
            sup.spawn(slot);
        }
        loop {
            tokio::select! {
                Some(event) = rx.recv() => sup.handle(event).await,
                msg = notify.recv() => match msg {
                    Ok(msg) => sup.on_notify(msg).await,
                    Err(e) => warn!("reading NOTIFY_SOCKET: {e}"),
                },
                _ = term.recv() => { info!("SIGTERM: stopping workers"); break; }
                _ = int.recv() => { info!("SIGINT: stopping workers"); break; }
                _ = usr1.recv() => sup.print_report(),
            }
        }
        sup.shutdown(&mut rx).await;
        Ok(())
    }

    fn spawn(&mut self, slot: u32) {
        let generation = {
            let s = &mut self.slots[slot as usize];
            s.generation += 1;
            s.generation
        };
        let cpus = if self.config.pin_workers {
            self.cpu_set(slot)
        } else {
            None
        };
        let launch = WorkerLaunch {
            command: &self.config.command,
            slot,
            sockets: self.group.slot_sockets(slot),
            fd_names: &self.fd_names,
            notify_socket: &self.notify_env,
            cpus,
        };
        let mut child = match activation::spawn(launch) {
            Ok(child) => child,
            Err(e) => {
                error!("slot {slot}: cannot start the worker: {e}");
                self.after_exit(slot, Duration::ZERO);
                return;
            }
        };
        let Some(pid) = child.id() else {
            error!("slot {slot}: the worker exited before its pid could be read");
            self.after_exit(slot, Duration::ZERO);
            return;
        };
        self.slots[slot as usize].state = State::Starting {
            pid,
            since: Instant::now(),
        };
        info!("slot {slot}: started worker pid {pid}");
        let tx = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Event::Exited {
                slot,
                generation,
                pid,
                status,
            });
        });
        self.after(
            self.config.ready_timeout,
            Event::ReadyTimeout { slot, generation },
        );
    }

    fn cpu_set(&self, slot: u32) -> Option<CpuSet> {
        let mut set = CpuSet::new();
        for cpu in self.config.layout.pinned_cpus(slot, self.config.slots) {
            if let Err(e) = set.set(cpu as usize) {
                warn!("slot {slot}: cannot pin to CPU {cpu}: {e}");
                return None;
            }
        }
        Some(set)
    }

    fn after(&self, delay: Duration, event: Event) {
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Exited {
                slot,
                generation,
                pid,
                status,
            } => {
                let s = &self.slots[slot as usize];
                if s.generation != generation {
                    return;
                }
                let lived = match s.state {
                    State::Starting { since, .. } | State::Ready { since, .. } => since.elapsed(),
                    State::BackingOff | State::Stopped => Duration::ZERO,
                };
                let was_ready = matches!(s.state, State::Ready { .. });
                let reason = describe_exit(&status);
                if self.stopping {
                    info!("slot {slot}: worker pid {pid} {reason}");
                    self.slots[slot as usize].state = State::Stopped;
                    return;
                }
                self.slots[slot as usize].state = State::BackingOff;
                if was_ready {
                    // First take the slot's share away: its socket stays open, and what is
                    // queued on it waits for the successor.
                    self.publish().await;
                }
                warn!(
                    "slot {slot}: worker pid {pid} {reason} after {}",
                    humantime::format_duration(round_ms(lived))
                );
                self.after_exit(slot, lived);
            }
            Event::ReadyTimeout { slot, generation } => {
                let s = &self.slots[slot as usize];
                if s.generation == generation && matches!(s.state, State::Starting { .. }) {
                    let why = format!(
                        "no READY=1 within {}, taken as ready",
                        humantime::format_duration(self.config.ready_timeout)
                    );
                    self.mark_ready(slot, &why).await;
                }
            }
            Event::Respawn { slot, generation } => {
                let s = &self.slots[slot as usize];
                if !self.stopping && s.generation == generation && s.state == State::BackingOff {
                    self.spawn(slot);
                }
            }
        }
    }

    /// Schedules the respawn of a slot whose worker died after running `lived`.
    fn after_exit(&mut self, slot: u32, lived: Duration) {
        let s = &mut self.slots[slot as usize];
        s.restarts += 1;
        s.state = State::BackingOff;
        s.quick_exits = if lived >= STABLE_AFTER {
            0
        } else {
            s.quick_exits + 1
        };
        let delay = backoff(s.quick_exits);
        if s.quick_exits >= 3 {
            warn!(
                "slot {slot}: crash loop ({} quick exits in a row); next start in {}",
                s.quick_exits,
                humantime::format_duration(delay)
            );
        } else {
            info!(
                "slot {slot}: respawning in {}",
                humantime::format_duration(delay)
            );
        }
        let generation = s.generation;
        if delay.is_zero() {
            self.spawn(slot);
        } else {
            self.after(delay, Event::Respawn { slot, generation });
        }
    }

    async fn on_notify(&mut self, msg: Notification) {
        if !msg.is_ready() {
            return;
        }
        let Some(pid) = msg.pid else { return };
        let slot = self
            .slots
            .iter()
            .position(|s| matches!(s.state, State::Starting { pid: p, .. } if p as i32 == pid));
        if let Some(slot) = slot {
            self.mark_ready(slot as u32, "READY=1").await;
        }
    }

    async fn mark_ready(&mut self, slot: u32, why: &str) {
        let State::Starting { pid, since } = self.slots[slot as usize].state else {
            return;
        };
        self.slots[slot as usize].state = State::Ready { pid, since };
        info!("slot {slot}: worker pid {pid} ready ({why})");
        self.publish().await;
        if !self.announced_ready
            && self
                .slots
                .iter()
                .all(|s| matches!(s.state, State::Ready { .. }))
        {
            self.announced_ready = true;
            report::line(&format!("ready: {} workers", self.slots.len()));
        }
    }

    fn live(&self) -> Vec<bool> {
        self.slots
            .iter()
            .map(|s| matches!(s.state, State::Ready { .. }))
            .collect()
    }

    async fn publish(&mut self) {
        let tables = build_tables(&self.config.layout, self.config.slots, &self.live());
        if let Err(e) = self.steering.publish(self.config.policy, &tables).await {
            // The previous tables stay active; they are valid, just not current.
            error!("publishing the steering tables failed: {e}");
        }
    }

    fn print_report(&self) {
        match self.steering.counters() {
            Ok(counters) => {
                let views: Vec<SlotView> = self.slots.iter().map(slot_view).collect();
                report::counters(&counters, &views);
            }
            Err(e) => error!("reading the steering counters: {e}"),
        }
    }

    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) {
        self.stopping = true;
        self.signal_all(Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + self.config.grace;
        let mut killed = false;
        while self.slots.iter().any(|s| pid_of(s.state).is_some()) {
            tokio::select! {
                Some(event) = rx.recv() => self.handle(event).await,
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    warn!("workers still running after the {} grace: SIGKILL",
                        humantime::format_duration(self.config.grace));
                    self.signal_all(Signal::SIGKILL);
                    killed = true;
                }
                _ = tokio::time::sleep_until(deadline + REAP_WAIT), if killed => {
                    error!("workers did not exit after SIGKILL; giving up on them");
                    break;
                }
            }
        }
        for s in &mut self.slots {
            if s.state != State::Stopped {
                s.state = State::Stopped;
            }
        }
        self.steering.detach(&self.group);
        self.print_report();
    }

    fn signal_all(&self, signal: Signal) {
        for s in &self.slots {
            if let Some(pid) = pid_of(s.state) {
                // The worker leads its own process group: this reaches its children too.
                if let Err(e) = killpg(Pid::from_raw(pid as i32), signal) {
                    warn!("{signal} to worker pid {pid}: {e}");
                }
            }
        }
    }
}

fn pid_of(state: State) -> Option<u32> {
    match state {
        State::Starting { pid, .. } | State::Ready { pid, .. } => Some(pid),
        State::BackingOff | State::Stopped => None,
    }
}

fn slot_view(s: &Slot) -> SlotView {
    let (pid, state) = match s.state {
        State::Starting { pid, .. } => (Some(pid), "starting"),
        State::Ready { pid, .. } => (Some(pid), "ready"),
        State::BackingOff => (None, "backing-off"),
        State::Stopped => (None, "stopped"),
    };
    SlotView {
        pid,
        state,
        restarts: s.restarts,
    }
}

/// Respawn delay after `quick_exits` short-lived runs in a row: none after a stable run, then
/// 100 ms, 200 ms, 400 ms … up to 30 s.
fn backoff(quick_exits: u32) -> Duration {
    match quick_exits {
        0 => Duration::ZERO,
        n => BACKOFF_BASE
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(BACKOFF_MAX),
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn describe_exit(status: &io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                let name = Signal::try_from(sig).map_or_else(|_| "?".to_owned(), |s| s.to_string());
                format!("was killed by signal {sig} ({name})")
            }
            _ => format!("ended ({s})"),
        },
        Err(e) => format!("could not be waited for ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            describe_exit(&Ok(ExitStatus::from_raw(9))),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(&Ok(ExitStatus::from_raw(1 << 8))),
            "exited with status 1"
        );
    }
}
