//! Changes that take more than one step — rolling restart, scale up, scale down — and their
//! progress. At most one runs at a time; each holds a single-use [`Responder`] that is
//! consumed when the operation answers, so an operation can answer exactly once.
use std::collections::VecDeque;

use balancer_common::{PolicyKind, MAX_SLOTS};
use log::{error, info, warn};
use tokio::sync::oneshot;

use super::{
    host::{Host, Repin},
    machine::Supervisor,
    slot::{Membership, Occupant, Slot},
};
use crate::{
    control::protocol::{ErrorKind, ErrorReply, Outcome, Reply},
    policy::cpu_overflow,
};

/// Where an operation's outcome goes: a control client, or nobody (SIGHUP). Answering
/// consumes it.
#[derive(Debug)]
pub struct Responder(Option<oneshot::Sender<Outcome>>);

impl Responder {
    /// Answers a control client.
    pub fn to(tx: oneshot::Sender<Outcome>) -> Self {
        Self(Some(tx))
    }

    /// Nobody waits for the outcome (it is logged).
    pub fn nobody() -> Self {
        Self(None)
    }

    /// Sends the outcome (a client that went away is not an error).
    pub fn answer(self, outcome: Outcome) {
        if let Some(tx) = self.0 {
            let _ = tx.send(outcome);
        }
    }
}

/// A rolling restart: slots still to do, the one being done, what was done.
#[derive(Debug)]
pub struct Restart {
    queue: VecDeque<u32>,
    at: Option<u32>,
    done: Vec<String>,
    reply: Responder,
}

/// A multi-step change in progress.
#[derive(Debug)]
pub enum Operation {
    /// Replacing workers one slot at a time.
    Restart(Restart),
    /// New slots added; waiting for their workers to be ready.
    ScaleUp {
        /// New slots whose worker is not ready yet.
        waiting: Vec<u32>,
        /// The new slot count.
        target: u32,
        /// What the reply adds (weights reset, cpu-policy warning).
        note: String,
        /// Where the outcome goes.
        reply: Responder,
    },
    /// Removed slots out of the tables; waiting for their workers to exit.
    ScaleDown {
        /// The new slot count.
        target: u32,
        /// What the reply adds.
        note: String,
        /// Where the outcome goes.
        reply: Responder,
    },
}

impl Operation {
    /// The refusal of another change while this one runs.
    pub fn busy(&self) -> ErrorReply {
        let what = match self {
            Operation::Restart(_) => "a rolling restart",
            Operation::ScaleUp { .. } | Operation::ScaleDown { .. } => "a scale change",
        };
        ErrorReply::new(
            ErrorKind::Busy,
            format!("{what} is in progress: try again when it has finished"),
        )
    }

    /// Gives up the operation's responder (shutdown answers it).
    pub fn into_responder(self) -> Responder {
        match self {
            Operation::Restart(r) => r.reply,
            Operation::ScaleUp { reply, .. } | Operation::ScaleDown { reply, .. } => reply,
        }
    }
}

impl<H: Host> Supervisor<H> {
    /// Starts a rolling restart of `slot` (or all); `reply` gets the outcome when it ends, or
    /// the refusal now.
    pub(super) fn start_restart(&mut self, slot: Option<u32>, reply: Responder) {
        if let Some(op) = &self.op {
            reply.answer(Err(op.busy()));
            return;
        }
        let queue: VecDeque<u32> = match slot {
            Some(s) => {
                if let Err(e) = self.check_slot(s) {
                    reply.answer(Err(e));
                    return;
                }
                [s].into()
            }
            None => (0..self.slot_count()).collect(),
        };
        self.op = Some(Operation::Restart(Restart {
            queue,
            at: None,
            done: Vec::new(),
            reply,
        }));
        self.advance_restart();
    }

    /// SIGHUP: a rolling restart of every slot, nobody to answer (refusals are logged).
    pub fn restart_all(&mut self) {
        if let Some(op) = &self.op {
            warn!("SIGHUP ignored: {}", op.busy());
            return;
        }
        self.start_restart(None, Responder::nobody());
    }

    fn advance_restart(&mut self) {
        loop {
            let Some(Operation::Restart(r)) = self.op.as_mut() else {
                return;
            };
            let Some(next) = r.queue.pop_front() else {
                let summary = if r.done.is_empty() {
                    "nothing to restart".to_owned()
                } else {
                    format!("restarted: {}", r.done.join(", "))
                };
                info!("rolling restart done; {summary}");
                if let Some(op) = self.op.take() {
                    op.into_responder()
                        .answer(Ok(Reply::Done { message: summary }));
                }
                return;
            };
            let s = &mut self.slots[next as usize];
            if s.membership == Membership::Removing {
                continue;
            }
            if s.current().is_none() {
                // Down or backing off: start it now instead of replacing anything.
                r.done.push(format!("slot {next} (was down)"));
                s.occupant = Occupant::Vacant;
                s.crashes.quick_exits = 0;
                self.spawn_current(next);
                continue;
            }
            r.at = Some(next);
            self.spawn_successor(next);
            return;
        }
    }

    /// A successor became ready in `slot`, replacing `old` with `new`.
    pub(super) fn restart_progress(&mut self, slot: u32, old: Option<u32>, new: u32) {
        let Some(Operation::Restart(r)) = self.op.as_mut() else {
            return;
        };
        if r.at != Some(slot) {
            return;
        }
        r.done.push(format!(
            "slot {slot} pid {} -> {new}",
            old.map_or("-".into(), |p| p.to_string())
        ));
        self.advance_restart();
    }

    /// The restart of `slot` failed: the operation ends with the reason.
    pub(super) fn restart_failed(&mut self, slot: u32, why: &str) {
        if !matches!(&self.op, Some(Operation::Restart(r)) if r.at == Some(slot)) {
            return;
        }
        let Some(Operation::Restart(r)) = self.op.take() else {
            return;
        };
        let old = self.slots[slot as usize].current().map_or(
            "no worker is running; the slot is respawned as usual".to_owned(),
            |w| format!("the old worker (pid {}) keeps serving", w.pid),
        );
        let mut message = format!("rolling restart stopped at slot {slot}: {why}; {old}");
        if !r.done.is_empty() {
            message.push_str(&format!(" (already restarted: {})", r.done.join(", ")));
        }
        error!("{message}");
        r.reply
            .answer(Err(ErrorReply::new(ErrorKind::Failed, message)));
    }

    /// Starts changing the slot count to `target`.
    pub(super) async fn start_scale(&mut self, target: u32, reply: Responder) {
        if let Some(op) = &self.op {
            reply.answer(Err(op.busy()));
            return;
        }
        if !(1..=MAX_SLOTS).contains(&target) {
            reply.answer(Err(ErrorReply::new(
                ErrorKind::Invalid,
                format!("{target} workers: give 1 to {MAX_SLOTS}"),
            )));
            return;
        }
        let n = self.slot_count();
        if target == n {
            reply.answer(Ok(Reply::Done {
                message: format!("already {n} workers"),
            }));
            return;
        }
        if target < n && !self.slots[..target as usize].iter().any(Slot::live) {
            reply.answer(Err(ErrorReply::new(
                ErrorKind::Invalid,
                format!("scaling to {target} would leave no slot taking new connections (slots 0..{} are drained or down): undrain them or wait for their workers first", target - 1),
            )));
            return;
        }
        let mut notes = Vec::new();
        // Weights are per slot: a scale resets them, once it is under way (a scale that
        // fails to start keeps them).
        let reset_weights = self.steer.weights.is_some();
        if reset_weights {
            notes.push("hash weights reset to equal shares".to_owned());
        }
        if self.steer.policy == PolicyKind::Cpu {
            if let Some(warning) = cpu_overflow(&self.settings.layout, target) {
                warn!("{warning}");
                notes.push(format!("warning: {warning}"));
            }
        }
        let note: String = notes.iter().map(|n| format!("; {n}")).collect();
        if target > n {
            if let Err(e) = self.host.grow(n, target) {
                reply.answer(Err(ErrorReply::new(ErrorKind::Failed, e.to_string())));
                return;
            }
        }
        if reset_weights {
            warn!("scaling resets the hash weights to equal shares");
            self.steer.weights = None;
        }
        if target > n {
            self.scale_up(n, target, note, reply).await;
        } else {
            self.scale_down(n, target, note, reply).await;
        }
    }

    /// The group already grew to `target` sockets: new slots, their workers, the reply once
    /// they are ready.
    async fn scale_up(&mut self, n: u32, target: u32, note: String, reply: Responder) {
        self.host.store_sockets(n..target);
        self.slots.extend((n..target).map(|_| Slot::default()));
        let note = match self.repin_workers(n, target).await {
            Some(problem) => format!("{note}; warning: {problem}"),
            None => note,
        };
        info!(
            "scaling {n} -> {target}: starting slots {n}..{}",
            target - 1
        );
        self.op = Some(Operation::ScaleUp {
            waiting: (n..target).collect(),
            target,
            note,
            reply,
        });
        for slot in n..target {
            self.spawn_current(slot);
        }
        self.publish().await;
    }

    async fn scale_down(&mut self, n: u32, target: u32, note: String, reply: Responder) {
        info!(
            "scaling {n} -> {target}: removing slots {target}..{}",
            n - 1
        );
        for s in &mut self.slots[target as usize..] {
            s.membership = Membership::Removing;
            if matches!(s.occupant, Occupant::BackingOff(_)) {
                s.occupant = Occupant::Vacant;
            }
        }
        // First out of the tables, so nothing new lands on the closing sockets.
        self.publish().await;
        let note = match self.repin_workers(n, target).await {
            Some(problem) => format!("{note}; warning: {problem}"),
            None => note,
        };
        for slot in target..n {
            let s = &mut self.slots[slot as usize];
            let workers: Vec<_> = s.current().into_iter().chain(s.successor()).collect();
            s.occupant = Occupant::Vacant;
            for w in workers {
                self.retire(slot, w);
            }
        }
        self.op = Some(Operation::ScaleDown {
            target,
            note,
            reply,
        });
        self.finish_scale_down().await;
    }

    /// With `--pin-workers`, after the layout went from `old` to `new` slots: moves the running
    /// workers of the slots whose CPUs changed.
    async fn repin_workers(&mut self, old: u32, new: u32) -> Option<String> {
        if !self.settings.pin_workers {
            return None;
        }
        let layout = &self.settings.layout;
        let mut plan = Vec::new();
        for slot in 0..old.min(new) {
            let cpus = layout.pinned_cpus(slot, new);
            if cpus == layout.pinned_cpus(slot, old) {
                continue;
            }
            for w in self.slots[slot as usize].workers() {
                plan.push(Repin {
                    slot,
                    pid: w.pid,
                    cpus: cpus.clone(),
                });
            }
        }
        if plan.is_empty() {
            return None;
        }
        self.host.repin(plan).await
    }

    /// A new slot's worker became ready.
    pub(super) fn scale_up_progress(&mut self, slot: u32) {
        let Some(Operation::ScaleUp { waiting, .. }) = self.op.as_mut() else {
            return;
        };
        waiting.retain(|s| *s != slot);
        if !waiting.is_empty() {
            return;
        }
        if let Some(Operation::ScaleUp {
            target,
            note,
            reply,
            ..
        }) = self.op.take()
        {
            let message = format!(
                "scaled to {target} workers; every new slot is ready and in the tables{note}"
            );
            info!("{message}");
            reply.answer(Ok(Reply::Done { message }));
        }
    }

    /// A new slot's worker died or could not start: the scale-up fails (the slot stays, and
    /// is respawned with backoff) and the controller takes the next command.
    pub(super) fn scale_up_failed(&mut self, slot: u32, why: &str) {
        if !matches!(&self.op, Some(Operation::ScaleUp { waiting, .. }) if waiting.contains(&slot))
        {
            return;
        }
        if let Some(Operation::ScaleUp { target, reply, .. }) = self.op.take() {
            let message = format!(
                "scaled to {target} slots, but slot {slot} is not ready: {why}; it is respawned with backoff (see `balancer status`)"
            );
            error!("{message}");
            reply.answer(Err(ErrorReply::new(ErrorKind::Failed, message)));
        }
    }

    /// Once every removed slot's workers are gone, closes their sockets: the kernel migrates
    /// what was queued on them through the program to live slots.
    pub(super) async fn finish_scale_down(&mut self) {
        let Some(Operation::ScaleDown { target, .. }) = self.op else {
            return;
        };
        if self.slots[target as usize..]
            .iter()
            .any(|s| s.workers().next().is_some())
        {
            return;
        }
        let before = self.migrated_total();
        let n = self.slot_count();
        self.host.unstore_sockets(target..n);
        self.host.shrink(target);
        self.slots.truncate(target as usize);
        self.publish().await;
        // Closing moves the accept queues at once: this count is theirs. A connection still in
        // its handshake there moves later, when its ACK (or its SYN-ACK retransmit timer)
        // reaches the closed listener; only the `migrated` counters of status see it.
        let moved = self.migrated_total().saturating_sub(before);
        if let Some(Operation::ScaleDown { note, reply, .. }) = self.op.take() {
            let message = format!(
                "scaled {n} -> {target} workers; {moved} queued connection(s) moved to live slots; \
                 those still in their handshake move at its next packet \
                 (MIGRATED in `balancer status`){note}"
            );
            info!("{message}");
            reply.answer(Ok(Reply::Done { message }));
        }
    }
}
