//! How often the accept queues are sampled: a pure decision from what the last samples saw and
//! which features read the load signal. Waking up every millisecond to read empty queues cost
//! more than anything else the controller does, so the pace follows the need:
//!
//! - no sampling at all when nothing reads the signal (no spill, no stall detection, policy
//!   not least-loaded);
//! - `--sample-interval` while any queue is non-empty, a stall is watched, or least-loaded is
//!   the policy (it picks from the sampled depths on every connection);
//! - otherwise, once every queue has been empty for [`QUIET_BEFORE_BACKOFF`], the interval
//!   doubles at each sample up to [`SLOWEST`]; the first non-empty sample brings it back.
//!
//! So a queue that starts to build is seen at most one slow interval late, and from then on
//! everything that reads the signal sees it as before.
use std::time::{Duration, Instant};

use balancer_common::PolicyKind;

/// The slowest pace while the load signal is needed but every queue is empty: a stall is
/// detected at most this much later than the stall timeout.
pub const SLOWEST: Duration = Duration::from_millis(50);

/// How long every queue must have been empty before the pace slows: a burst's queues come and
/// go within milliseconds, and should not make the pace swing.
pub const QUIET_BEFORE_BACKOFF: Duration = Duration::from_millis(100);

/// What the pace depends on, besides the samples themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    /// Some enabled feature reads the load signal.
    pub needed: bool,
    /// The signal must stay fresh whatever the queues: least-loaded is the policy, or a
    /// stall is being watched.
    pub urgent: bool,
}

impl Demand {
    /// What the steering state and stall detection ask of the load signal. Spill applies to
    /// the cpu and hash policies only; round-robin ignores the depths.
    pub fn of(policy: PolicyKind, spill_depth: u32, stall_detection: bool, watching: bool) -> Self {
        let least_loaded = policy == PolicyKind::LeastLoaded;
        let spill = spill_depth > 0 && matches!(policy, PolicyKind::Cpu | PolicyKind::Hash);
        Self {
            needed: least_loaded || spill || stall_detection,
            urgent: least_loaded || watching,
        }
    }
}

/// The pace in force, as `status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Nothing reads the load signal: no sampling.
    Off,
    /// Sampling at `--sample-interval`.
    Fast(Duration),
    /// Every queue has been empty for a while: sampling at this (longer) interval.
    Idle(Duration),
}

impl Pace {
    /// The interval in force, if sampling.
    pub fn interval(self) -> Option<Duration> {
        match self {
            Self::Off => None,
            Self::Fast(d) | Self::Idle(d) => Some(d),
        }
    }
}

/// The sampling pace (see the module documentation).
#[derive(Clone, Debug)]
pub struct Pacer {
    fast: Duration,
    slowest: Duration,
    /// The interval after the last sample.
    interval: Duration,
    /// When the last sample was taken (`None`: never).
    last: Option<Instant>,
    /// Since when every sample has found every queue empty (and nothing urgent).
    quiet_since: Option<Instant>,
}

impl Pacer {
    /// A pacer that samples every `fast` when busy. A `fast` slower than [`SLOWEST`] is never
    /// slowed down further.
    pub fn new(fast: Duration) -> Self {
        Self {
            fast,
            slowest: SLOWEST.max(fast),
            interval: fast,
            last: None,
            quiet_since: None,
        }
    }

    /// Takes note of a sample taken at `now`: `busy` when some queue was non-empty.
    pub fn sampled(&mut self, now: Instant, busy: bool, demand: Demand) {
        self.last = Some(now);
        if busy || demand.urgent || !demand.needed {
            self.quiet_since = None;
            self.interval = self.fast;
            return;
        }
        let since = *self.quiet_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= QUIET_BEFORE_BACKOFF {
            self.interval = self.interval.saturating_mul(2).min(self.slowest);
        }
    }

    /// When the next sample is due (`None`: no sampling). A sample that became urgent (the
    /// policy changed to least-loaded) is due at once; it was never due, at start.
    pub fn due(&self, demand: Demand, now: Instant) -> Option<Instant> {
        if !demand.needed {
            return None;
        }
        let Some(last) = self.last else {
            return Some(now);
        };
        let interval = if demand.urgent {
            self.fast
        } else {
            self.interval
        };
        Some(last + interval)
    }

    /// The pace in force.
    pub fn pace(&self, demand: Demand) -> Pace {
        if !demand.needed {
            Pace::Off
        } else if demand.urgent || self.interval == self.fast {
            Pace::Fast(self.fast)
        } else {
            Pace::Idle(self.interval)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(1);
    const NEEDED: Demand = Demand {
        needed: true,
        urgent: false,
    };

    /// Samples every queue empty, each at the time the pacer said it was due, until `until`;
    /// returns the intervals it asked for.
    fn run_quiet(
        p: &mut Pacer,
        now: &mut Instant,
        until: Duration,
        demand: Demand,
    ) -> Vec<Duration> {
        let end = *now + until;
        let mut asked = Vec::new();
        while *now < end {
            p.sampled(*now, false, demand);
            let next = p.due(demand, *now).expect("sampling");
            asked.push(next - *now);
            *now = next;
        }
        asked
    }

    #[test]
    fn empty_queues_back_off_by_doubling_to_the_slowest_after_a_quiet_while() {
        let mut p = Pacer::new(FAST);
        let mut now = Instant::now();
        let asked = run_quiet(&mut p, &mut now, Duration::from_secs(1), NEEDED);
        // Fast for the quiet while, then 2, 4, ... 50 ms.
        let fast = asked.iter().take_while(|d| **d == FAST).count();
        assert_eq!(fast, QUIET_BEFORE_BACKOFF.as_millis() as usize);
        let ms: Vec<u128> = asked[fast..].iter().map(Duration::as_millis).collect();
        assert_eq!(&ms[..6], &[2, 4, 8, 16, 32, 50]);
        assert!(ms[6..].iter().all(|m| *m == 50), "{ms:?}");
        assert_eq!(p.pace(NEEDED), Pace::Idle(SLOWEST));
    }

    #[test]
    fn the_first_non_empty_sample_brings_the_fast_pace_back() {
        let mut p = Pacer::new(FAST);
        let mut now = Instant::now();
        run_quiet(&mut p, &mut now, Duration::from_secs(1), NEEDED);
        p.sampled(now, true, NEEDED);
        assert_eq!(p.due(NEEDED, now), Some(now + FAST));
        assert_eq!(p.pace(NEEDED), Pace::Fast(FAST));
        // And the quiet while starts over: no back-off right after the queue empties.
        now += FAST;
        p.sampled(now, false, NEEDED);
        assert_eq!(p.due(NEEDED, now), Some(now + FAST));
    }

    #[test]
    fn nothing_reading_the_signal_means_no_sampling() {
        let mut p = Pacer::new(FAST);
        let now = Instant::now();
        let off = Demand::of(PolicyKind::Hash, 0, false, false);
        assert_eq!(
            off,
            Demand {
                needed: false,
                urgent: false
            }
        );
        assert_eq!(p.due(off, now), None);
        assert_eq!(p.pace(off), Pace::Off);
        // Round-robin ignores the spill depth.
        let rr = Demand::of(PolicyKind::RoundRobin, 16, false, false);
        assert!(!rr.needed);
        p.sampled(now, true, off);
        assert_eq!(p.due(off, now), None);
    }

    #[test]
    fn least_loaded_or_a_watched_stall_keeps_the_fast_pace_even_when_queues_are_empty() {
        for demand in [
            Demand::of(PolicyKind::LeastLoaded, 0, false, false),
            Demand::of(PolicyKind::Hash, 0, true, true),
        ] {
            let mut p = Pacer::new(FAST);
            let mut now = Instant::now();
            let asked = run_quiet(&mut p, &mut now, Duration::from_secs(1), demand);
            assert!(asked.iter().all(|d| *d == FAST), "{demand:?}");
            assert_eq!(p.pace(demand), Pace::Fast(FAST));
        }
    }

    #[test]
    fn a_backed_off_pacer_samples_at_once_when_the_policy_becomes_least_loaded() {
        let mut p = Pacer::new(FAST);
        let mut now = Instant::now();
        run_quiet(&mut p, &mut now, Duration::from_secs(1), NEEDED);
        let ll = Demand::of(PolicyKind::LeastLoaded, 16, true, false);
        // The last sample was a slow interval ago: the next one is overdue.
        assert!(p.due(ll, now).is_some_and(|at| at <= now));
        // Turned on after being off: due at once.
        let mut q = Pacer::new(FAST);
        assert_eq!(q.due(NEEDED, now), Some(now));
        q.sampled(now, false, Demand::of(PolicyKind::Hash, 0, false, false));
        assert!(q
            .due(NEEDED, now + Duration::from_secs(5))
            .is_some_and(|at| at <= now + FAST));
    }

    #[test]
    fn a_slow_sample_interval_is_never_slowed_further() {
        let slow = Duration::from_millis(200);
        let mut p = Pacer::new(slow);
        let mut now = Instant::now();
        let asked = run_quiet(&mut p, &mut now, Duration::from_secs(5), NEEDED);
        assert!(asked.iter().all(|d| *d == slow), "{asked:?}");
    }
}
