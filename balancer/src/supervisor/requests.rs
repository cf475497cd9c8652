//! Control requests: validation, and the one-step changes (policy, drain, undrain). Restart
//! and scale start an [`super::operation::Operation`].
use log::{info, warn};

use super::{
    host::Host, machine::Supervisor, operation::Responder, pacing::Pace, slot::Membership,
};
use crate::{
    control::protocol::{ErrorKind, ErrorReply, Outcome, PolicyName, Reply, Request},
    policy::cpu_overflow,
};

impl<H: Host> Supervisor<H> {
    /// Serves one control request; `reply` gets the outcome, now or when an operation ends.
    pub async fn on_request(&mut self, request: Request, reply: Responder) {
        if self.stopping() {
            reply.answer(Err(ErrorReply::new(
                ErrorKind::Failed,
                "the balancer is shutting down",
            )));
            return;
        }
        let outcome = match request {
            Request::Status => {
                // Unsampled, the queue column would be stale: one sample for the reader.
                if self.pace() == Pace::Off {
                    self.on_sample().await;
                }
                let (now, cpu) = (self.host.now(), self.host.cpu_time());
                self.cpu.mark(now, cpu);
                Ok(Reply::Status(self.status()))
            }
            Request::Policy => Ok(Reply::Policy(self.policy_report())),
            Request::SetPolicy {
                policy,
                weights,
                spill_depth,
            } => self.set_policy(policy, weights, spill_depth).await,
            Request::Drain { slot } => self.set_drained(slot, true).await,
            Request::Undrain { slot } => self.set_drained(slot, false).await,
            Request::Restart { slot } => return self.start_restart(slot, reply),
            Request::Scale { workers } => return self.start_scale(workers, reply).await,
            // The event loop serves it (it replaces the whole process); a supervisor driven
            // without one cannot.
            Request::Upgrade { .. } => Err(ErrorReply::new(
                ErrorKind::Failed,
                "this controller cannot hand over: no event loop serves upgrades",
            )),
        };
        reply.answer(outcome);
    }

    /// The refusal of a change while an operation runs, if one does.
    pub fn busy(&self) -> Option<ErrorReply> {
        self.op.as_ref().map(|op| op.busy())
    }

    /// Whether `slot` exists and is not being scaled away.
    pub(super) fn check_slot(&self, slot: u32) -> Result<(), ErrorReply> {
        match self.slots.get(slot as usize) {
            None => Err(ErrorReply::new(
                ErrorKind::Invalid,
                format!("there is no slot {slot}: slots are 0..{}", self.slots.len()),
            )),
            Some(s) if s.membership == Membership::Removing => Err(ErrorReply::new(
                ErrorKind::Busy,
                format!("slot {slot} is being scaled away"),
            )),
            Some(_) => Ok(()),
        }
    }

    async fn set_policy(
        &mut self,
        policy: PolicyName,
        weights: Option<Vec<u32>>,
        spill_depth: Option<u32>,
    ) -> Outcome {
        if let Some(w) = &weights {
            check_weights(policy, w, self.slots.len())?;
        }
        let started = self.host.now();
        let previous = self.steer.clone();
        self.steer.policy = policy.into();
        self.steer.weights = weights;
        if let Some(d) = spill_depth {
            self.steer.spill_depth = d;
        }
        if let Err(e) = self.try_publish().await {
            self.steer = previous;
            return Err(ErrorReply::new(
                ErrorKind::Failed,
                format!(
                    "policy {policy} was not published ({e}); the previous policy stays in force"
                ),
            ));
        }
        let took = self.host.now().saturating_duration_since(started);
        let spill = match (policy, self.steer.spill_depth) {
            (PolicyName::Cpu | PolicyName::Hash, 0) => ", no spill".to_owned(),
            (PolicyName::Cpu | PolicyName::Hash, d) => format!(", spill at queue depth {d}"),
            _ => String::new(),
        };
        let text = format!(
            "policy {policy}{}{spill} published in {} µs",
            self.steer
                .weights
                .as_ref()
                .map_or(String::new(), |w| format!(
                    " (weights {})",
                    w.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                )),
            took.as_micros()
        );
        let text = match (
            policy,
            cpu_overflow(&self.settings.layout, self.slot_count()),
        ) {
            (PolicyName::Cpu, Some(warning)) => {
                warn!("{warning}");
                format!("{text}; warning: {warning}")
            }
            _ => text,
        };
        info!("{text}");
        Ok(Reply::Done { message: text })
    }

    async fn set_drained(&mut self, slot: u32, drained: bool) -> Outcome {
        self.check_slot(slot)?;
        let is_drained = self.slots[slot as usize].membership == Membership::Drained;
        if is_drained == drained {
            return Ok(Reply::Done {
                message: format!(
                    "slot {slot} is already {}",
                    if drained { "drained" } else { "in the tables" }
                ),
            });
        }
        if drained && !self.others_live(slot) {
            return Err(ErrorReply::new(
                ErrorKind::Invalid,
                format!("draining slot {slot} would leave no slot taking new connections: undrain or start another first"),
            ));
        }
        let previous = self.slots[slot as usize].membership;
        self.slots[slot as usize].membership = if drained {
            Membership::Drained
        } else {
            Membership::Active
        };
        if let Err(e) = self.try_publish().await {
            self.slots[slot as usize].membership = previous;
            return Err(ErrorReply::new(
                ErrorKind::Failed,
                format!(
                    "slot {slot} was not {} ({e}): the tables are unchanged",
                    if drained { "drained" } else { "undrained" }
                ),
            ));
        }
        let pid = self.slots[slot as usize]
            .current()
            .map_or("no worker".to_owned(), |w| format!("worker pid {}", w.pid));
        let message = if drained {
            format!("slot {slot} drained: no new connections; its {pid} keeps running and serves what is queued")
        } else {
            format!("slot {slot} undrained: it takes new connections again ({pid})")
        };
        info!("{message}");
        Ok(Reply::Done { message })
    }
}

/// Weights shape the hash table: one per slot, not all zero.
fn check_weights(policy: PolicyName, weights: &[u32], slots: usize) -> Result<(), ErrorReply> {
    if policy != PolicyName::Hash {
        return Err(ErrorReply::new(
            ErrorKind::Invalid,
            "--weights shape the hash table: use them with `policy set hash`",
        ));
    }
    if weights.len() != slots {
        return Err(ErrorReply::new(
            ErrorKind::Invalid,
            format!(
                "{} weights for {slots} slots: give one weight per slot",
                weights.len()
            ),
        ));
    }
    if weights.iter().all(|x| *x == 0) {
        return Err(ErrorReply::new(
            ErrorKind::Invalid,
            "every weight is 0: at least one slot must have a positive weight",
        ));
    }
    Ok(())
}
