//! What the periodic socket check found, told to the operator, and the workers left holding
//! a socket the group replaced restarted, one slot at a time, so that they serve the new one.
use log::{error, warn};

use super::{
    host::{Host, RepairOutcome, SocketFault},
    machine::Supervisor,
    operation::Responder,
};

impl<H: Host> Supervisor<H> {
    /// Checks and repairs the group's sockets (see [`Host::check_sockets`]).
    pub(super) fn check_sockets(&mut self) {
        for r in self.host.check_sockets() {
            let what = match r.fault {
                SocketFault::NotListening => "was no longer listening (shut down by its worker?)",
                SocketFault::NotPublished => "was no longer in the program's socket array",
            };
            let (slot, addr) = (r.slot, r.addr);
            match r.outcome {
                RepairOutcome::Repaired => {
                    warn!("slot {slot}: its socket on {addr} {what}: repaired");
                }
                RepairOutcome::Recreated => {
                    warn!("slot {slot}: its socket on {addr} {what}: a new one took its place; restarting the slot's worker to hand it over");
                }
                RepairOutcome::Failed(why) => {
                    error!(
                        "slot {slot}: its socket on {addr} {what}, and the repair failed: {why}"
                    );
                }
            }
            if r.replaced {
                self.mark_stale(slot);
            }
        }
        self.restart_stale();
    }

    /// Notes that `slot`'s worker holds a socket the group replaced. A slot without a worker
    /// needs nothing: its next worker gets the new socket.
    pub(super) fn mark_stale(&mut self, slot: u32) {
        if let Some(w) = self.slots.get(slot as usize).and_then(|s| s.current()) {
            self.stale.insert(slot, w.pid);
        }
    }

    /// Forgets the slots whose worker is no longer the one that held a replaced socket (a
    /// restart, or a death and respawn, gave them one of their own), then starts a rolling
    /// restart of the next one left, unless another operation runs. A restart that fails
    /// leaves the old worker, and the slot, to be tried again at the next check.
    pub(super) fn restart_stale(&mut self) {
        let slots = &self.slots;
        self.stale.retain(|slot, pid| {
            slots
                .get(*slot as usize)
                .and_then(|s| s.current())
                .is_some_and(|w| w.pid == *pid)
        });
        if self.op.is_some() || self.stopping() {
            return;
        }
        if let Some(&slot) = self.stale.keys().next() {
            self.start_restart(Some(slot), Responder::nobody());
        }
    }
}
