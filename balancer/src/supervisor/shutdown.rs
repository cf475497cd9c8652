//! Deliberate shutdown (SIGTERM, SIGINT): no more respawns, the pending operation answered,
//! new connections refused while the workers drain what is queued (for up to the grace), then
//! every worker — retiring ones included — sent the stop signal, SIGKILL after the grace, then the
//! program detached and the final counters printed. The event loop does the waiting.
//!
//! The drain is what keeps a stop from costing connections: the controller holds every
//! socket, so anything still queued when it exits is reset, and a worker told to stop first
//! would stop accepting while its queue kept filling.
use std::time::Duration;

use log::error;
use nix::sys::signal::Signal;

use super::{
    host::Host,
    machine::Supervisor,
    slot::{Occupant, Phase, Slot},
};
use crate::control::protocol::{ErrorKind, ErrorReply};

/// How much longer than the drain and the stop's grace the refusal lasts (the reaping of the
/// workers, and room to spare).
const REFUSAL_MARGIN: Duration = Duration::from_secs(10);

impl<H: Host> Supervisor<H> {
    /// Stops respawning, answers the pending operation and has the program refuse new
    /// connections; the workers keep accepting what is queued ([`Supervisor::drained`]) until
    /// [`Supervisor::stop_workers`].
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
        // Longer than the stop can take (the drain and the stop each get the grace, then the
        // reaping): should this controller die before it ends, the workers, which outlive
        // it, serve new connections again after that, instead of refusing them for good.
        let refusal = self
            .settings
            .grace
            .saturating_mul(2)
            .saturating_add(REFUSAL_MARGIN);
        if let Err(e) = self.host.refuse_new(refusal) {
            error!("cannot refuse new connections while the workers drain: {e}; new connections still queue until the sockets close");
        }
        self.tell_manager_status();
    }

    /// Whether every slot's worker has accepted everything queued on its socket, and no
    /// connection is still in its handshake (sampled now). A connection whose client's
    /// `connect` already returned may still be waiting for its final ACK: it joins a queue
    /// when that arrives, and is waited for too.
    ///
    /// A queue no worker will take (its slot has no worker, or a stalled one) is moved to the
    /// slots that drain, once per slot; if none can take it, it is waited for with the rest.
    pub fn drained(&mut self) -> bool {
        let depths = self.host.sample_queues();
        let mut empty = true;
        for i in 0..self.slots.len() {
            let depth: u32 = depths.iter().filter_map(|a| a.get(i)).sum();
            if depth == 0 {
                continue;
            }
            let s = &self.slots[i];
            let stuck = s.current().is_none() || s.stall.is_stalled();
            if stuck && !self.drain_evacuated.contains(&(i as u32)) {
                self.drain_evacuated.insert(i as u32);
                self.evacuate(i as u32);
                continue;
            }
            // A slot without a worker whose queue could not be moved has no one to drain it.
            empty &= self.slots[i].current().is_none();
        }
        empty && self.host.half_open() == 0
    }

    /// The stop signal to every worker (after the drain).
    pub fn stop_workers(&mut self) {
        self.signal_all(self.settings.stop_signal);
    }

    /// SIGKILL to every worker still running after the grace.
    pub fn kill_remaining(&mut self) {
        self.signal_all(Signal::SIGKILL);
    }

    /// The stop signal → SIGKILL grace.
    pub fn grace(&self) -> std::time::Duration {
        self.settings.grace
    }

    /// How often queues are sampled (the drain's pace).
    pub fn sample_interval(&self) -> std::time::Duration {
        self.settings.sample_interval
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
