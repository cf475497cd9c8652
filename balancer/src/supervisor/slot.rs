//! One slot's state as explicit types, and the pure rules over them: who occupies it
//! ([`Occupant`]), whether it belongs in the tables ([`Membership`]), its crash-loop record
//! ([`CrashLoop`]), and the one table that names its [`SlotState`].
use std::time::{Duration, Instant};

use crate::{control::protocol::SlotState, stall::StallWatch};

/// First respawn delay of a crash loop; it doubles with every quick exit in a row.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest respawn delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting is respawned at once, its crash streak forgotten.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Which start of a worker an event is about: a pid can be reused, a generation cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

/// Which respawn timer of a slot is the current one (older ones are ignored when they fire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerToken(pub u64);

/// Hands out generations and timer tokens, never the same number twice.
#[derive(Debug, Default)]
pub struct Ids(u64);

impl Ids {
    /// The next generation.
    pub fn generation(&mut self) -> Generation {
        self.0 += 1;
        Generation(self.0)
    }

    /// The next timer token.
    pub fn token(&mut self) -> TimerToken {
        self.0 += 1;
        TimerToken(self.0)
    }
}

/// A worker process the supervisor started (or adopted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    /// Its pid (leader of its own process group).
    pub pid: u32,
    /// Which start it is.
    pub generation: Generation,
    /// When it was started.
    pub since: Instant,
    /// Whether it said READY=1 (or was taken as ready after the timeout).
    pub ready: bool,
}

/// Who serves the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occupant {
    /// Nobody, and no respawn is pending.
    Vacant,
    /// The worker died; its successor starts when the timer with this token fires.
    BackingOff(TimerToken),
    /// One worker, ready or starting.
    Serving(Worker),
    /// A rolling restart: `new` starts on the same socket while `old` (if it still runs)
    /// keeps serving; `new` takes over once it is ready.
    Replacing {
        /// The worker being replaced; `None` when it died while `new` was starting.
        old: Option<Worker>,
        /// Its successor, not yet ready.
        new: Worker,
    },
}

/// Whether the slot belongs in the tables, as far as the operator and scaling are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// In the tables whenever its worker is ready and not stalled.
    Active,
    /// Taken out by the operator (`drain`); its worker keeps running.
    Drained,
    /// Being scaled away: out of the tables, its workers stopping, its sockets closing after.
    Removing,
}

/// Whether the supervisor is running or stopping everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Supervising: dead workers are respawned.
    Running,
    /// Shutting down: no respawn, every worker told to stop.
    Stopping,
}

/// A worker's role in its slot, for the events that name it by generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The worker serving the slot.
    Current,
    /// The successor of a rolling restart, not yet ready.
    Successor,
    /// Told to stop; finishing what it accepted.
    Retiring,
}

/// A slot's crash-loop record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashLoop {
    /// Times the slot's worker was replaced (deaths and restarts).
    pub restarts: u32,
    /// Short-lived runs in a row.
    pub quick_exits: u32,
}

impl CrashLoop {
    /// Records a death after `lived`; returns the respawn delay.
    pub fn died(&mut self, lived: Duration) -> Duration {
        self.restarts += 1;
        self.quick_exits = if lived >= STABLE_AFTER {
            0
        } else {
            self.quick_exits.saturating_add(1)
        };
        backoff(self.quick_exits)
    }

    /// Whether the slot is in a crash loop worth a warning.
    pub fn looping(&self) -> bool {
        self.quick_exits >= 3
    }
}

/// Respawn delay after `quick_exits` short-lived runs in a row: none after a stable run, then
/// 100 ms, 200 ms, 400 ms … up to 30 s.
pub fn backoff(quick_exits: u32) -> Duration {
    match quick_exits {
        0 => Duration::ZERO,
        n => BACKOFF_BASE
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(BACKOFF_MAX),
    }
}

/// One worker slot: its occupant, membership, retiring workers, crash record and stall watch.
#[derive(Clone, Debug)]
pub struct Slot {
    /// Who serves it.
    pub occupant: Occupant,
    /// Whether it belongs in the tables.
    pub membership: Membership,
    /// Replaced workers told to stop, finishing what they accepted.
    pub retiring: Vec<Worker>,
    /// Its crash-loop record.
    pub crashes: CrashLoop,
    /// Stall detection on its accept queue.
    pub stall: StallWatch,
    /// Since when it has had no ready worker, and when its queue was last moved out for
    /// that (a crash-looping slot must not hold its queue through the backoff).
    pub unready: Option<(Instant, Option<Instant>)>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            occupant: Occupant::Vacant,
            membership: Membership::Active,
            retiring: Vec::new(),
            crashes: CrashLoop::default(),
            stall: StallWatch::default(),
            unready: None,
        }
    }
}

impl Slot {
    /// The worker serving the slot now (ready or starting), if any.
    pub fn current(&self) -> Option<Worker> {
        match self.occupant {
            Occupant::Serving(w) | Occupant::Replacing { old: Some(w), .. } => Some(w),
            _ => None,
        }
    }

    /// A rolling restart's successor, if one is starting.
    pub fn successor(&self) -> Option<Worker> {
        match self.occupant {
            Occupant::Replacing { new, .. } => Some(new),
            _ => None,
        }
    }

    /// Every running worker of the slot: current, successor and retiring.
    pub fn workers(&self) -> impl Iterator<Item = Worker> + '_ {
        self.current()
            .into_iter()
            .chain(self.successor())
            .chain(self.retiring.iter().copied())
    }

    /// The role of the worker of `generation` in this slot, if it is one of its workers.
    pub fn role_of(&self, generation: Generation) -> Option<Role> {
        if self.current().is_some_and(|w| w.generation == generation) {
            Some(Role::Current)
        } else if self.successor().is_some_and(|w| w.generation == generation) {
            Some(Role::Successor)
        } else if self.retiring.iter().any(|w| w.generation == generation) {
            Some(Role::Retiring)
        } else {
            None
        }
    }

    /// Removes the worker of `generation` in `role` from the slot and returns it. A current
    /// worker that dies during a rolling restart leaves its successor starting alone.
    pub fn take(&mut self, generation: Generation, role: Role) -> Option<Worker> {
        match role {
            Role::Current => {
                let w = self.current().filter(|w| w.generation == generation)?;
                self.occupant = match self.occupant {
                    Occupant::Replacing { new, .. } => Occupant::Replacing { old: None, new },
                    _ => Occupant::Vacant,
                };
                Some(w)
            }
            Role::Successor => {
                let Occupant::Replacing { old, new } = self.occupant else {
                    return None;
                };
                if new.generation != generation {
                    return None;
                }
                self.occupant = old.map_or(Occupant::Vacant, Occupant::Serving);
                Some(new)
            }
            Role::Retiring => {
                let i = self
                    .retiring
                    .iter()
                    .position(|w| w.generation == generation)?;
                Some(self.retiring.remove(i))
            }
        }
    }

    /// Whether its worker is ready.
    pub fn ready(&self) -> bool {
        self.current().is_some_and(|w| w.ready)
    }

    /// Whether the slot takes new connections: a ready worker, an active member, not stalled.
    pub fn live(&self) -> bool {
        self.ready() && self.membership == Membership::Active && !self.stall.is_stalled()
    }

    /// What the slot is doing (see [`state_of`]).
    pub fn state(&self, phase: Phase) -> SlotState {
        state_of(
            self.occupant,
            self.membership,
            self.stall.is_stalled(),
            phase,
        )
    }
}

/// The slot state table: which (occupant, membership, stalled, phase) reads as which state.
/// `status`, `--json`, Prometheus and the counters table all show this one value.
pub fn state_of(
    occupant: Occupant,
    membership: Membership,
    stalled: bool,
    phase: Phase,
) -> SlotState {
    let current = match occupant {
        Occupant::Serving(w) | Occupant::Replacing { old: Some(w), .. } => Some(w),
        _ => None,
    };
    match (membership, current, occupant) {
        (Membership::Removing, _, _) => SlotState::Removing,
        (_, Some(_), _) if stalled => SlotState::Stalled,
        (Membership::Drained, Some(w), _) if w.ready => SlotState::Draining,
        (_, Some(w), _) if w.ready => SlotState::Ready,
        (_, Some(_), _) | (_, None, Occupant::Replacing { .. }) => SlotState::Starting,
        (_, None, Occupant::BackingOff(_)) => SlotState::BackingOff,
        (_, None, _) if phase == Phase::Stopping => SlotState::Stopped,
        (_, None, _) => SlotState::Down,
    }
}
