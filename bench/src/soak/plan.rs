//! The soak's schedule: which event comes next and with what parameters, drawn from a seeded
//! generator, so that a seed replays the same sequence of events. Pure: no process is
//! touched here.
use std::time::Duration;

/// The policies a flip chooses from.
pub const POLICIES: [&str; 4] = ["cpu", "hash", "round-robin", "least-loaded"];

/// SplitMix64: tiny, and its sequence for a seed never changes with a dependency's version,
/// which a printed seed that replays a run relies on.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (`lo` when `hi < lo`).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A duration uniform in `lo_ms..=hi_ms` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.between(lo_ms, hi_ms))
    }
}

/// The kinds of event, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    WorkerKill,
    WorkerStop,
    PolicyFlip,
    ScaleUp,
    ScaleDown,
    Drain,
    RollingRestart,
    ControllerKill,
    Upgrade,
}

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 9] = [
        Kind::WorkerKill,
        Kind::WorkerStop,
        Kind::PolicyFlip,
        Kind::ScaleUp,
        Kind::ScaleDown,
        Kind::Drain,
        Kind::RollingRestart,
        Kind::ControllerKill,
        Kind::Upgrade,
    ];

    /// Its name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Kind::WorkerKill => "worker SIGKILL",
            Kind::WorkerStop => "worker SIGSTOP + SIGCONT",
            Kind::PolicyFlip => "policy flip",
            Kind::ScaleUp => "scale up",
            Kind::ScaleDown => "scale down",
            Kind::Drain => "drain + undrain",
            Kind::RollingRestart => "rolling restart",
            Kind::ControllerKill => "controller kill -9 + restart",
            Kind::Upgrade => "balancer upgrade",
        }
    }
}

/// One event with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGKILL to the worker of `slot`.
    WorkerKill { slot: u32 },
    /// SIGSTOP to the worker of `slot`, SIGCONT `after` later.
    WorkerStop { slot: u32, after: Duration },
    /// `balancer policy set TO`.
    PolicyFlip { to: &'static str },
    /// `balancer workers scale TO` (from `from` workers).
    Scale { from: u32, to: u32 },
    /// `balancer drain --slot SLOT`, then `undrain` `after` later.
    Drain { slot: u32, after: Duration },
    /// `balancer workers restart [--slot SLOT]`.
    RollingRestart { slot: Option<u32> },
    /// SIGKILL to the controller, then `balancer run` with the same arguments.
    ControllerKill,
    /// `balancer upgrade` to the same binary.
    Upgrade,
}

impl Event {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Event::WorkerKill { .. } => Kind::WorkerKill,
            Event::WorkerStop { .. } => Kind::WorkerStop,
            Event::PolicyFlip { .. } => Kind::PolicyFlip,
            Event::Scale { from, to } if to > from => Kind::ScaleUp,
            Event::Scale { .. } => Kind::ScaleDown,
            Event::Drain { .. } => Kind::Drain,
            Event::RollingRestart { .. } => Kind::RollingRestart,
            Event::ControllerKill => Kind::ControllerKill,
            Event::Upgrade => Kind::Upgrade,
        }
    }

    /// One line for the progress output.
    pub fn describe(&self) -> String {
        match self {
            Event::WorkerKill { slot } => format!("SIGKILL the worker of slot {slot}"),
            Event::WorkerStop { slot, after } => {
                format!("SIGSTOP the worker of slot {slot}, SIGCONT after {after:?}")
            }
            Event::PolicyFlip { to } => format!("policy set {to}"),
            Event::Scale { from, to } => format!("workers scale {to} (from {from})"),
            Event::Drain { slot, after } => format!("drain slot {slot}, undrain after {after:?}"),
            Event::RollingRestart { slot: None } => "workers restart (every slot)".into(),
            Event::RollingRestart { slot: Some(s) } => format!("workers restart --slot {s}"),
            Event::ControllerKill => "kill -9 the controller, start it again".into(),
            Event::Upgrade => "balancer upgrade".into(),
        }
    }
}

/// The group size the schedule keeps to: never fewer than two workers, so that a stopped,
/// killed or drained worker always leaves a live one.
pub const MIN_WORKERS: u32 = 2;
/// The largest group the schedule scales to.
pub const MAX_WORKERS: u32 = 4;

/// The schedule: every kind once per round, in a random order, so that even a short pass
/// sees each kind; the parameters and the pauses between events are random too.
#[derive(Clone, Debug)]
pub struct Schedule {
    rng: Rng,
    deck: Vec<Kind>,
    workers: u32,
    policy: &'static str,
}

impl Schedule {
    /// A schedule for `seed`, for a group that starts with `workers` workers under `policy`.
    pub fn new(seed: u64, workers: u32, policy: &'static str) -> Self {
        Self {
            rng: Rng::new(seed),
            deck: Vec::new(),
            workers: workers.clamp(MIN_WORKERS, MAX_WORKERS),
            policy,
        }
    }

    /// How many workers the group has once every event so far is done.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The pause before the next event, and the event.
    pub fn next_event(&mut self) -> (Duration, Event) {
        if self.deck.is_empty() {
            self.deck = Kind::ALL.to_vec();
            // Fisher-Yates.
            for i in (1..self.deck.len()).rev() {
                let j = self.rng.between(0, i as u64) as usize;
                self.deck.swap(i, j);
            }
        }
        let kind = self.deck.pop().unwrap_or(Kind::PolicyFlip);
        let pause = self.rng.millis(100, 500);
        (pause, self.event(kind))
    }

    fn slot(&mut self) -> u32 {
        self.rng.between(0, u64::from(self.workers) - 1) as u32
    }

    fn event(&mut self, kind: Kind) -> Event {
        match kind {
            Kind::WorkerKill => Event::WorkerKill { slot: self.slot() },
            Kind::WorkerStop => Event::WorkerStop {
                slot: self.slot(),
                after: self.rng.millis(200, 1500),
            },
            Kind::PolicyFlip => {
                let others: Vec<&'static str> =
                    POLICIES.into_iter().filter(|p| *p != self.policy).collect();
                let to = others[self.rng.between(0, others.len() as u64 - 1) as usize];
                self.policy = to;
                Event::PolicyFlip { to }
            }
            // At a bound, the other direction: every draw is an event that changes the size.
            Kind::ScaleUp | Kind::ScaleDown => {
                let from = self.workers;
                let up = (kind == Kind::ScaleUp && from < MAX_WORKERS) || from <= MIN_WORKERS;
                let to = if up {
                    self.rng
                        .between(u64::from(from) + 1, u64::from(MAX_WORKERS))
                } else {
                    self.rng
                        .between(u64::from(MIN_WORKERS), u64::from(from) - 1)
                } as u32;
                self.workers = to;
                Event::Scale { from, to }
            }
            Kind::Drain => Event::Drain {
                slot: self.slot(),
                after: self.rng.millis(200, 1500),
            },
            Kind::RollingRestart => {
                let slot = (self.rng.between(0, 1) == 1).then(|| self.slot());
                Event::RollingRestart { slot }
            }
            Kind::ControllerKill => Event::ControllerKill,
            Kind::Upgrade => Event::Upgrade,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(seed: u64, n: usize) -> Vec<(Duration, Event)> {
        let mut s = Schedule::new(seed, 3, "cpu");
        (0..n).map(|_| s.next_event()).collect()
    }

    #[test]
    fn a_seed_replays_the_same_events_and_another_seed_does_not() {
        assert_eq!(events(42, 200), events(42, 200));
        assert_ne!(events(42, 200), events(43, 200));
    }

    #[test]
    fn every_kind_comes_once_per_round() {
        let all = events(7, 9 * 50);
        for round in all.chunks(9) {
            let mut kinds: Vec<Kind> = round.iter().map(|(_, e)| e.kind()).collect();
            kinds.sort();
            // A scale draw at a bound goes the other way: up and down share their two draws.
            let scales = kinds
                .iter()
                .filter(|k| matches!(k, Kind::ScaleUp | Kind::ScaleDown))
                .count();
            assert_eq!(scales, 2, "{kinds:?}");
            kinds.retain(|k| !matches!(k, Kind::ScaleUp | Kind::ScaleDown));
            kinds.dedup();
            assert_eq!(kinds.len(), 7, "{kinds:?}");
        }
    }

    #[test]
    fn events_keep_to_the_bounds_and_always_change_something() {
        let mut s = Schedule::new(1, 3, "cpu");
        let (mut workers, mut policy) = (3, "cpu");
        let mut seen_up_and_down = (false, false);
        for _ in 0..20_000 {
            let (pause, e) = s.next_event();
            assert!((Duration::from_millis(100)..=Duration::from_millis(500)).contains(&pause));
            match e {
                Event::WorkerKill { slot } | Event::RollingRestart { slot: Some(slot) } => {
                    assert!(slot < workers)
                }
                Event::WorkerStop { slot, after } | Event::Drain { slot, after } => {
                    assert!(slot < workers);
                    assert!(after <= Duration::from_millis(1500));
                }
                Event::PolicyFlip { to } => {
                    assert_ne!(to, policy);
                    policy = to;
                }
                Event::Scale { from, to } => {
                    assert_eq!(from, workers);
                    assert_ne!(from, to);
                    assert!((MIN_WORKERS..=MAX_WORKERS).contains(&to));
                    seen_up_and_down.0 |= to > from;
                    seen_up_and_down.1 |= to < from;
                    workers = to;
                }
                Event::RollingRestart { slot: None } | Event::ControllerKill | Event::Upgrade => {}
            }
            assert_eq!(s.workers(), workers);
        }
        assert_eq!(seen_up_and_down, (true, true));
    }
}
