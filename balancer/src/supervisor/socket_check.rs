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
                    warn!("slot {slot}: its socket on {addr} {what} and could not listen again: a new one took its place; restarting the slot's worker to hand it over");
                    self.stale.insert(slot);
                }
                RepairOutcome::Failed(why) => {
                    error!(
                        "slot {slot}: its socket on {addr} {what}, and the repair failed: {why}"
                    );
                }
            }
        }
        self.restart_stale();
    }

    /// Starts a rolling restart of the next slot whose worker holds a replaced socket, unless
    /// another operation runs (it is tried again at the next check) or the slot has no worker
    /// (its next one gets the new socket anyway).
    pub(super) fn restart_stale(&mut self) {
        if self.op.is_some() || self.stopping() {
            return;
        }
        while let Some(slot) = self.stale.pop_first() {
            let serving = self
                .slots
                .get(slot as usize)
                .is_some_and(|s| s.current().is_some());
            if serving {
                self.start_restart(Some(slot), Responder::nobody());
                return;
            }
        }
    }
}
