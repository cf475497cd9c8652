//! The load signal: every sample of the accept queues feeds the program's depth map and
//! stall detection, which takes stalled slots out of the tables, evacuates their queues and,
//! with `--kill-stalled`, kills their workers.
use log::{error, info, warn};
use nix::sys::signal::Signal;

use super::{host::Host, lifecycle::round_ms, machine::Supervisor, slot::Membership};
use crate::stall::Transition;

impl<H: Host> Supervisor<H> {
    /// Samples every accept queue and reacts to what stall detection makes of it.
    pub async fn on_sample(&mut self) {
        let started = self.host.now();
        let depths = self.host.sample_queues();
        self.sampling_spent += self.host.now().saturating_duration_since(started);
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
            for slot in evacuate {
                self.evacuate(slot);
            }
        }
    }

    /// Moves what is queued on a stalled slot to live slots (never when no other slot is live:
    /// the kernel would have nowhere to put the connections).
    fn evacuate(&mut self, slot: u32) {
        if !self.others_live(slot) {
            warn!("slot {slot}: not evacuated: no other slot is live");
            return;
        }
        let before = self.migrated_total();
        if let Err(e) = self.host.evacuate(slot) {
            error!("slot {slot}: evacuating its queue failed: {e}");
            return;
        }
        let now = self.host.now();
        self.slots[slot as usize].stall.evacuated(now);
        let moved = self.migrated_total().saturating_sub(before);
        info!("slot {slot}: evacuated {moved} queued connection(s) to live slots");
    }
}
