//! Worker lifecycle decisions: starting a slot's worker (or a rolling restart's successor),
//! readiness, deaths and crash-loop respawns, retiring replaced workers, and the timers.
use std::time::Duration;

use log::{error, info, warn};
use nix::sys::signal::Signal;

use super::{
    host::{Event, Host, Timer, WorkerExit},
    machine::Supervisor,
    slot::{Generation, Membership, Occupant, Phase, Role, Worker},
};

impl<H: Host> Supervisor<H> {
    /// Handles an event from the host.
    pub async fn handle(&mut self, event: Event) {
        match event {
            Event::Exited {
                generation,
                pid,
                how,
            } => self.on_exit(generation, pid, &how).await,
            Event::Timer(timer) => self.on_timer(timer).await,
        }
    }

    async fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::ReadyTimeout(generation) => {
                let why = format!(
                    "no READY=1 within {}, taken as ready",
                    humantime::format_duration(self.settings.ready_timeout)
                );
                self.mark_ready(generation, &why).await;
            }
            Timer::Respawn { slot, token } => {
                let Some(s) = self.slots.get_mut(slot as usize) else {
                    return;
                };
                if self.phase == Phase::Running
                    && s.membership != Membership::Removing
                    && s.occupant == Occupant::BackingOff(token)
                {
                    s.occupant = Occupant::Vacant;
                    self.spawn_current(slot);
                }
            }
            Timer::GraceOver(generation) => {
                let Some((slot, Role::Retiring)) = self.find(generation) else {
                    return;
                };
                let retiring = &self.slots[slot as usize].retiring;
                if let Some(w) = retiring.iter().find(|w| w.generation == generation) {
                    let pid = w.pid;
                    warn!(
                        "slot {slot}: old worker pid {pid} still running after the {} grace: SIGKILL",
                        humantime::format_duration(self.settings.grace)
                    );
                    self.host.signal(pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// A worker said READY=1: the notify socket names its pid.
    pub async fn on_notify_ready(&mut self, pid: u32) {
        let generation = self.slots.iter().find_map(|s| {
            s.current()
                .into_iter()
                .chain(s.successor())
                .find(|w| w.pid == pid)
                .map(|w| w.generation)
        });
        if let Some(generation) = generation {
            self.mark_ready(generation, "READY=1").await;
        }
    }

    /// The slot and role of the worker of `generation`.
    pub(super) fn find(&self, generation: Generation) -> Option<(u32, Role)> {
        self.slots
            .iter()
            .enumerate()
            .find_map(|(i, s)| Some((i as u32, s.role_of(generation)?)))
    }

    /// Starts the worker that serves `slot` (the slot is vacant).
    pub(super) fn spawn_current(&mut self, slot: u32) {
        self.spawn(slot, Role::Current);
    }

    /// Starts a rolling restart's successor beside the slot's worker.
    pub(super) fn spawn_successor(&mut self, slot: u32) {
        self.spawn(slot, Role::Successor);
    }

    fn spawn(&mut self, slot: u32, role: Role) {
        let generation = self.ids.generation();
        let cpus = self.pinned_cpus(slot);
        let pid = match self.host.spawn(slot, generation, cpus.as_deref()) {
            Ok(pid) => pid,
            Err(e) => {
                error!("slot {slot}: cannot start a worker: {e}");
                if role == Role::Successor {
                    self.restart_failed(slot, &format!("cannot start ({e})"));
                } else {
                    self.scale_up_failed(slot, &format!("its worker cannot start ({e})"));
                    self.after_exit(slot, Duration::ZERO);
                }
                return;
            }
        };
        let worker = Worker {
            pid,
            generation,
            since: self.host.now(),
            ready: false,
        };
        let s = &mut self.slots[slot as usize];
        s.occupant = match (role, s.occupant) {
            (Role::Successor, Occupant::Serving(old)) => Occupant::Replacing {
                old: Some(old),
                new: worker,
            },
            (Role::Successor, Occupant::Replacing { old, .. }) => {
                Occupant::Replacing { old, new: worker }
            }
            (Role::Successor, _) => Occupant::Replacing {
                old: None,
                new: worker,
            },
            _ => Occupant::Serving(worker),
        };
        info!(
            "slot {slot}: started {}worker pid {pid}",
            if role == Role::Successor { "new " } else { "" }
        );
        self.host
            .schedule(self.settings.ready_timeout, Timer::ReadyTimeout(generation));
    }

    async fn on_exit(&mut self, generation: Generation, pid: u32, how: &WorkerExit) {
        let Some((slot, role)) = self.find(generation) else {
            return;
        };
        let s = &mut self.slots[slot as usize];
        let Some(worker) = s.take(generation, role) else {
            return;
        };
        if role == Role::Current {
            s.stall.reset();
        }
        let removing = s.membership == Membership::Removing;
        if self.phase == Phase::Stopping || role == Role::Retiring || removing {
            info!("slot {slot}: worker pid {pid} {how}");
            if removing {
                self.finish_scale_down().await;
            }
            return;
        }
        let lived = self.host.now().saturating_duration_since(worker.since);
        warn!(
            "slot {slot}: {}worker pid {pid} {how} after {}",
            if role == Role::Successor { "new " } else { "" },
            humantime::format_duration(round_ms(lived))
        );
        match role {
            Role::Current => {
                if worker.ready {
                    // First take the slot's share away: its socket stays open, and what is
                    // queued on it waits for the successor.
                    self.publish().await;
                }
                self.scale_up_failed(slot, &format!("its worker pid {pid} {how}"));
                if self.slots[slot as usize].successor().is_some() {
                    info!("slot {slot}: the new worker takes over when ready");
                } else {
                    self.after_exit(slot, lived);
                }
            }
            Role::Successor => {
                self.restart_failed(
                    slot,
                    &format!("the new worker pid {pid} {how} before it was ready"),
                );
                if self.slots[slot as usize].current().is_none() {
                    self.after_exit(slot, lived);
                }
            }
            Role::Retiring => {}
        }
    }

    /// Schedules the respawn of a slot whose worker died after running `lived`.
    fn after_exit(&mut self, slot: u32, lived: Duration) {
        let token = self.ids.token();
        let s = &mut self.slots[slot as usize];
        let delay = s.crashes.died(lived);
        if s.crashes.looping() {
            warn!(
                "slot {slot}: crash loop ({} quick exits in a row); next start in {}",
                s.crashes.quick_exits,
                humantime::format_duration(delay)
            );
        } else {
            info!(
                "slot {slot}: respawning in {}",
                humantime::format_duration(delay)
            );
        }
        if delay.is_zero() {
            self.spawn_current(slot);
        } else {
            s.occupant = Occupant::BackingOff(token);
            self.host.schedule(delay, Timer::Respawn { slot, token });
        }
    }

    async fn mark_ready(&mut self, generation: Generation, why: &str) {
        let Some((slot, role)) = self.find(generation) else {
            return;
        };
        let s = &mut self.slots[slot as usize];
        match (role, s.occupant) {
            (Role::Current, Occupant::Serving(mut w)) if !w.ready => {
                w.ready = true;
                s.occupant = Occupant::Serving(w);
                info!("slot {slot}: worker pid {} ready ({why})", w.pid);
                self.publish().await;
                self.scale_up_progress(slot);
            }
            (
                Role::Current,
                Occupant::Replacing {
                    old: Some(mut w),
                    new,
                },
            ) if !w.ready => {
                w.ready = true;
                s.occupant = Occupant::Replacing { old: Some(w), new };
                info!("slot {slot}: worker pid {} ready ({why})", w.pid);
                self.publish().await;
                self.scale_up_progress(slot);
            }
            (Role::Successor, Occupant::Replacing { old, mut new }) => {
                new.ready = true;
                s.occupant = Occupant::Serving(new);
                s.crashes.restarts += 1;
                info!("slot {slot}: new worker pid {} ready ({why})", new.pid);
                if let Some(old) = old {
                    self.retire(slot, old);
                }
                self.publish().await;
                self.restart_progress(slot, old.map(|w| w.pid), new.pid);
            }
            _ => return,
        }
        self.announce_if_ready();
    }

    /// Tells a replaced worker to stop (the stop signal): it finishes what it accepted while
    /// its successor accepts from the same queue; SIGKILL after the grace.
    pub(super) fn retire(&mut self, slot: u32, worker: Worker) {
        let signal = self.settings.stop_signal;
        info!("slot {slot}: {signal} to old worker pid {}", worker.pid);
        self.host.signal(worker.pid, signal);
        self.slots[slot as usize].retiring.push(worker);
        self.host
            .schedule(self.settings.grace, Timer::GraceOver(worker.generation));
    }
}

/// `d` to whole milliseconds, for logs.
pub(super) fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
