//! Keeping the group's sockets listening and in the program's socket arrays: the second half
//! of an evacuation (listen again, or a new socket in the old one's place), and the periodic
//! check that repairs what a worker did to its sockets (`shutdown`, another program).
use std::net::SocketAddr;

use log::warn;

use crate::{
    socket_group::{Relisten, SocketGroup},
    steering::Steering,
};

/// What an evacuation did to a slot's sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evacuation {
    /// A socket could not listen again and a new one took its place: the slot's worker holds
    /// a dead copy until it is restarted.
    pub recreated: bool,
    /// The addresses whose socket is not listening again, each with why (the others were
    /// evacuated).
    pub failed: Vec<String>,
}

/// What the periodic socket check found wrong with one slot's socket on one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketFault {
    /// It no longer listens (a worker called `shutdown` on it, say).
    NotListening,
    /// The program's socket array no longer holds it (empty, or another socket).
    NotPublished,
}

/// What the repair of a [`SocketFault`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepairOutcome {
    /// The same socket listens and is published again.
    Repaired,
    /// A new socket took its place: the slot's worker must be restarted to get it.
    Recreated,
    /// Not repaired, and why.
    Failed(String),
}

/// One fault the socket check found, and its repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketRepair {
    /// The slot.
    pub slot: u32,
    /// The listen address of the socket.
    pub addr: SocketAddr,
    /// What was wrong.
    pub fault: SocketFault,
    /// What the repair did.
    pub outcome: RepairOutcome,
    /// Whether a new socket took the old one's place (even if publishing it then failed):
    /// the slot's worker holds a dead copy until it is restarted.
    pub replaced: bool,
}

/// Evacuates `slot` (see [`SocketGroup::evacuate`]) and publishes whatever listens again.
pub fn evacuate(group: &mut SocketGroup, steering: &mut Steering, slot: u32) -> Evacuation {
    let mut evacuation = Evacuation::default();
    for (n, (addr, outcome)) in group.evacuate(slot).into_iter().enumerate() {
        match outcome {
            Ok(relisten) => {
                evacuation.recreated |= relisten == Relisten::Recreated;
                if let Err(e) = steering.set_socket(group, n, slot) {
                    evacuation.failed.push(format!("{addr}: {e}"));
                }
            }
            Err(e) => evacuation.failed.push(format!("{addr}: {e}")),
        }
    }
    evacuation
}

/// Finds the sockets that no longer listen or are no longer published, repairs them, and
/// attaches the program again.
pub fn check(group: &mut SocketGroup, steering: &mut Steering) -> Vec<SocketRepair> {
    let addr = |group: &SocketGroup, n: usize| -> Option<SocketAddr> {
        group.addresses.get(n).map(|a| a.addr)
    };
    let mut repairs = Vec::new();
    // A socket that stopped listening is replaced, not made to listen again: the worker that
    // shut it down meant to stop accepting on it, and connections queued there could wait on
    // it forever. The new socket left no socket array entry of its own: it is published
    // below, with the others the arrays do not hold, as part of the same repair.
    let mut relistened = Vec::new();
    for (n, slot) in group.not_listening() {
        let Some(at) = addr(group, n) else { continue };
        let (outcome, replaced) = match group.replace(n, slot) {
            Ok(()) => (RepairOutcome::Recreated, true),
            Err(e) => (
                RepairOutcome::Failed(format!("no new socket in its place: {e}")),
                false,
            ),
        };
        relistened.push((n, slot, repairs.len()));
        repairs.push(SocketRepair {
            slot,
            addr: at,
            fault: SocketFault::NotListening,
            outcome,
            replaced,
        });
    }
    for (n, slot) in steering.unpublished(group) {
        let Some(at) = addr(group, n) else { continue };
        let earlier = relistened
            .iter()
            .find(|(m, s, _)| (*m, *s) == (n, slot))
            .map(|(_, _, i)| *i);
        if let Some(RepairOutcome::Failed(_)) =
            earlier.and_then(|i| repairs.get(i)).map(|r| &r.outcome)
        {
            // Not listening: there is nothing to publish.
            continue;
        }
        let published = steering.set_socket(group, n, slot);
        match (earlier.and_then(|i| repairs.get_mut(i)), published) {
            (Some(_), Ok(())) => {}
            (Some(r), Err(e)) => {
                r.outcome =
                    RepairOutcome::Failed(format!("listening again, but not published: {e}"));
            }
            (None, published) => repairs.push(SocketRepair {
                slot,
                addr: at,
                fault: SocketFault::NotPublished,
                outcome: match published {
                    Ok(()) => RepairOutcome::Repaired,
                    Err(e) => RepairOutcome::Failed(e.to_string()),
                },
                replaced: false,
            }),
        }
    }
    if let Err(e) = steering.reattach(group) {
        warn!("attaching the steering program again: {e}");
    }
    repairs
}
