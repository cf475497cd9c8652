//! The load signal: every sample of the accept queues feeds the program's depth map and
//! stall detection, which takes stalled slots out of the tables, evacuates their queues and,
//! with `--kill-stalled`, kills their workers; and the queue of a slot that has had no ready
//! worker for the stall timeout (a crash loop) is moved to live slots too. The event loop
//! wakes up only when a sample (at the pace `pacing` decides) or a socket check is due.
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::sys::signal::Signal;

use super::{
    host::Host,
    lifecycle::round_ms,
    machine::Supervisor,
    pacing::{Demand, Pace},
    slot::Membership,
};
use crate::stall::Transition;

impl<H: Host> Supervisor<H> {
    /// What the enabled features ask of the load signal now.
    pub(super) fn demand(&self) -> Demand {
        Demand::of(
            self.steer.policy,
            self.steer.spill_depth,
            !self.settings.stall_timeout.is_zero(),
            self.slots.iter().any(|s| s.stall.is_stalled()),
        )
    }

    /// The sampling pace in force.
    pub fn pace(&self) -> Pace {
        self.pacer.pace(self.demand())
    }

    /// When the event loop must next call [`Supervisor::on_tick`]: the next sample or socket
    /// check, whichever is first; `None` when neither will ever be due (nothing reads the load
    /// signal and the socket check is off).
    pub fn next_wake(&self) -> Option<Instant> {
        let now = self.host.now();
        let sample = self.pacer.due(self.demand(), now);
        let check = self.socket_check_due(now);
        match (sample, check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn socket_check_due(&self, now: Instant) -> Option<Instant> {
        if self.settings.socket_check.is_zero() {
            return None;
        }
        Some(self.next_socket_check.unwrap_or(now))
    }

    /// Does what is due: a sample, a socket check, or both. Returns whether what the group's
    /// record keeps may have changed: a socket check ran, or an operation started (a restart
    /// of a worker whose socket was replaced); a sample changes nothing else it keeps.
    pub async fn on_tick(&mut self) -> bool {
        let idle = self.op.is_none();
        let now = self.host.now();
        if self
            .pacer
            .due(self.demand(), now)
            .is_some_and(|at| at <= now)
        {
            self.on_sample().await;
        }
        // A check due before the next sample runs with this one: one wake-up, not two.
        let slack = match self.pace() {
            Pace::Off => Duration::ZERO,
            pace => pace.interval().unwrap_or_default(),
        };
        let checked = self
            .socket_check_due(now)
            .is_some_and(|at| at <= now + slack);
        if checked {
            self.next_socket_check = Some(now + self.settings.socket_check);
            self.check_sockets();
        }
        if self.cpu.wants_mark(now) {
            let cpu = self.host.cpu_time();
            self.cpu.mark(now, cpu);
        }
        checked || (idle && self.op.is_some())
    }

    /// Samples every accept queue and reacts to what stall detection makes of it.
    pub async fn on_sample(&mut self) {
        let depths = self.host.sample_queues();
        let cfg = self.settings.stall();
        let now = self.host.now();
        let detect = !self.settings.stall_timeout.is_zero();
        let mut changed = false;
        let mut evacuate = Vec::new();
        self.depths = (0..self.slots.len())
            .map(|i| depths.iter().filter_map(|a| a.get(i)).sum())
            .collect();
        for (i, s) in self.slots.iter_mut().enumerate() {
            let depth = self.depths[i];
            let eligible = s.ready() && s.membership != Membership::Removing && detect;
            match s.stall.observe(depth, now, eligible, &cfg) {
                Transition::None => {}
                Transition::Stalled { depth } => {
                    warn!(
                        "slot {i}: stalled (queue of {depth} did not shrink for {}); out of the tables",
                        humantime::format_duration(cfg.timeout)
                    );
                    changed = true;
                    evacuate.push(i as u32);
                }
                Transition::Evacuate => evacuate.push(i as u32),
                Transition::Rejoined { after } => {
                    info!(
                        "slot {i}: queue drained; back in the tables after {}",
                        humantime::format_duration(round_ms(after))
                    );
                    changed = true;
                }
                Transition::Kill => {
                    if let Some(w) = s.current() {
                        warn!(
                            "slot {i}: stalled for {}: SIGKILL to worker pid {} (--kill-stalled)",
                            humantime::format_duration(cfg.kill_after.unwrap_or_default()),
                            w.pid
                        );
                        self.host.signal(w.pid, Signal::SIGKILL);
                    }
                }
            }
        }
        if changed {
            self.publish().await;
        }
        if self.settings.evacuate {
            evacuate.extend(self.unready_too_long(now));
            for slot in evacuate {
                self.evacuate(slot);
            }
        }
        let busy = self.depths.iter().any(|d| *d > 0);
        let demand = self.demand();
        self.pacer.sampled(now, busy, demand);
    }

    /// Slots that have had no ready worker for the stall timeout (a worker that keeps
    /// crashing, backing off up to 30 s) with connections queued: their queue goes to live
    /// slots, at most once per stall timeout, as a stalled slot's would.
    fn unready_too_long(&mut self, now: std::time::Instant) -> Vec<u32> {
        let timeout = self.settings.stall_timeout;
        let mut due = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.ready() || s.membership == Membership::Removing || timeout.is_zero() {
                s.unready = None;
                continue;
            }
            let (since, last) = *s.unready.get_or_insert((now, None));
            let waited = now.saturating_duration_since(last.unwrap_or(since));
            // A worker that is starting gets its ready timeout to take its queue (at start
            // every slot's worker is starting); one backing off after a crash does not.
            let workerless = s.current().is_none();
            if workerless && waited >= timeout && self.depths.get(i).is_some_and(|d| *d > 0) {
                s.unready = Some((since, Some(now)));
                due.push(i as u32);
            }
        }
        due
    }

    /// Moves what is queued on a stalled (or workerless) slot to live slots (never when no
    /// other slot is live: the kernel would have nowhere to put the connections).
    pub(super) fn evacuate(&mut self, slot: u32) {
        if !self.others_live(slot) {
            warn!("slot {slot}: not evacuated: no other slot is live");
            return;
        }
        let before = self.migrated_total();
        let evacuation = match self.host.evacuate(slot) {
            Ok(evacuation) => evacuation,
            Err(e) => {
                error!("slot {slot}: evacuating its queue failed: {e}");
                return;
            }
        };
        for failed in &evacuation.failed {
            error!(
                "slot {slot}: after its evacuation, its socket is not listening again: {failed}"
            );
        }
        if evacuation.recreated {
            warn!("slot {slot}: a socket could not listen again after its evacuation: a new one took its place; restarting the slot's worker to hand it over");
            self.mark_stale(slot);
            self.restart_stale();
        }
        let now = self.host.now();
        self.slots[slot as usize].stall.evacuated(now);
        let moved = self.migrated_total().saturating_sub(before);
        info!("slot {slot}: evacuated {moved} queued connection(s) to live slots");
    }
}
