//! Deliberate shutdown (SIGTERM, SIGINT): no more respawns, the pending operation answered,
//! every worker — retiring ones included — told to stop, SIGKILL after the grace, then the
//! program detached and the final counters printed. The event loop does the waiting.
use nix::sys::signal::Signal;

use super::{
    host::Host,
    machine::Supervisor,
    slot::{Occupant, Phase, Slot},
};
use crate::control::protocol::{ErrorKind, ErrorReply};

impl<H: Host> Supervisor<H> {
    /// Stops respawning, answers the pending operation and sends SIGTERM to every worker.
    pub fn begin_shutdown(&mut self) {
        self.phase = Phase::Stopping;
        if let Some(op) = self.op.take() {
            op.into_responder().answer(Err(ErrorReply::new(
                ErrorKind::Failed,
                "the balancer is shutting down",
            )));
        }
        for s in &mut self.slots {
            if matches!(s.occupant, Occupant::BackingOff(_)) {
                s.occupant = Occupant::Vacant;
            }
        }
        self.host.tell_manager("STOPPING=1");
        self.signal_all(Signal::SIGTERM);
        self.tell_manager_status();
    }

    /// SIGKILL to every worker still running after the grace.
    pub fn kill_remaining(&mut self) {
        self.signal_all(Signal::SIGKILL);
    }

    /// The SIGTERM → SIGKILL grace.
    pub fn grace(&self) -> std::time::Duration {
        self.settings.grace
    }

    /// Whether any worker still runs.
    pub fn workers_left(&self) -> bool {
        self.slots.iter().any(|s| s.workers().next().is_some())
    }

    /// Detaches the program and prints the final counters.
    pub fn finish_shutdown(&mut self) {
        self.host.detach();
        self.print_report();
    }

    fn signal_all(&mut self, signal: Signal) {
        let pids: Vec<u32> = self
            .slots
            .iter()
            .flat_map(Slot::workers)
            .map(|w| w.pid)
            .collect();
        for pid in pids {
            self.host.signal(pid, signal);
        }
    }
}
