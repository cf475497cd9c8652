//! Stalled-worker detection from sampled accept-queue depths.
//!
//! A slot is stalled when its queue is non-empty and has not shrunk between any two samples
//! for the stall timeout: a worker that accepts at all shows a drop now and then, even while
//! its queue grows overall; a stopped or wedged one never does. A stalled slot leaves the tables; it rejoins once its queue has drained.
//! When its queue was evacuated, "drained" proves nothing about the worker, so it rejoins
//! only after a hold-off, as a probe: a slot that stalls again soon after rejoining waits
//! twice as long the next time.
use std::time::{Duration, Instant};

/// Longest probe hold-off: how long a worker that resumed may wait, at worst, to be trusted
/// with new connections again.
const MAX_HOLD: Duration = Duration::from_secs(5);

/// Settings.
#[derive(Clone, Copy, Debug)]
pub struct StallConfig {
    /// How long a non-empty queue may go without shrinking.
    pub timeout: Duration,
    /// Kill the worker of a slot stalled this long.
    pub kill_after: Option<Duration>,
}

/// What the caller should do after an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// The slot just stalled with this many connections queued: take it out of the tables
    /// (and evacuate it, if evacuation is on).
    Stalled {
        /// Queue depth at detection.
        depth: u32,
    },
    /// Still stalled with connections queued, a stall timeout after the last evacuation
    /// attempt (stragglers, or an attempt that was skipped or failed): evacuate again.
    Evacuate,
    /// The slot drained: put it back.
    Rejoined {
        /// How long it was out.
        after: Duration,
    },
    /// Stalled past `kill_after`: kill the worker (once).
    Kill,
}

#[derive(Clone, Copy, Debug)]
struct Stalled {
    since: Instant,
    depth: u32,
    evacuated_at: Option<Instant>,
    /// When evacuation was last due (the stall itself counts as the first time).
    tried_at: Instant,
    killed: bool,
}

/// The stall state of one slot.
#[derive(Clone, Debug, Default)]
pub struct StallWatch {
    /// Start of the current window of a non-empty, never shrinking queue, and the depth at
    /// the last sample.
    window: Option<(Instant, u32)>,
    stalled: Option<Stalled>,
    hold: Duration,
    last_rejoin: Option<Instant>,
}

impl StallWatch {
    /// Takes one sample. `eligible` is false while the slot has no ready worker (then there
    /// is nothing to judge).
    pub fn observe(
        &mut self,
        depth: u32,
        now: Instant,
        eligible: bool,
        cfg: &StallConfig,
    ) -> Transition {
        let hold = self.hold;
        match &mut self.stalled {
            None => {
                if !eligible || depth == 0 {
                    self.window = None;
                    return Transition::None;
                }
                match self.window {
                    Some((_, last)) if depth < last => {
                        self.window = Some((now, depth));
                    }
                    Some((start, _)) if now.duration_since(start) >= cfg.timeout => {
                        self.hold = match self.last_rejoin {
                            Some(t) if now.duration_since(t) < cfg.timeout * 10 => {
                                // Never below the stall timeout, even when that is over
                                // MAX_HOLD (clamp would panic with min > max).
                                self.hold.saturating_mul(2).min(MAX_HOLD).max(cfg.timeout)
                            }
                            _ => cfg.timeout,
                        };
                        self.stalled = Some(Stalled {
                            since: now,
                            depth,
                            evacuated_at: None,
                            tried_at: now,
                            killed: false,
                        });
                        self.window = None;
                        return Transition::Stalled { depth };
                    }
                    Some((start, _)) => self.window = Some((start, depth)),
                    None => self.window = Some((now, depth)),
                }
                Transition::None
            }
            Some(st) => {
                if let Some(k) = cfg.kill_after {
                    if !st.killed && now.duration_since(st.since) >= k {
                        st.killed = true;
                        return Transition::Kill;
                    }
                }
                let held = st
                    .evacuated_at
                    .is_none_or(|at| now.duration_since(at) >= hold);
                if depth == 0 && held {
                    let after = now.duration_since(st.since);
                    self.stalled = None;
                    self.last_rejoin = Some(now);
                    return Transition::Rejoined { after };
                }
                if depth > 0 && now.duration_since(st.tried_at) >= cfg.timeout {
                    st.tried_at = now;
                    return Transition::Evacuate;
                }
                Transition::None
            }
        }
    }

    /// Records that the slot's queue was just evacuated.
    pub fn evacuated(&mut self, now: Instant) {
        if let Some(st) = &mut self.stalled {
            st.evacuated_at = Some(now);
            st.tried_at = now;
        }
    }

    /// Forgets everything (the slot's worker was replaced).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Whether the slot is out of the tables as stalled.
    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// Why the slot is stalled, for `status`.
    pub fn describe(&self, now: Instant) -> Option<String> {
        let st = self.stalled?;
        Some(format!(
            "stalled {} ago: queue of {} did not shrink{}",
            humantime::format_duration(Duration::from_millis(
                now.duration_since(st.since).as_millis() as u64
            )),
            st.depth,
            if st.evacuated_at.is_some() {
                "; queue evacuated, rejoins as a probe once drained"
            } else {
                "; rejoins once its queue drains"
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: StallConfig = StallConfig {
        timeout: Duration::from_millis(300),
        kill_after: None,
    };

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_queue_that_does_not_shrink_stalls_after_the_timeout() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        assert_eq!(w.observe(3, t0, true, &CFG), Transition::None);
        assert_eq!(w.observe(5, at(t0, 150), true, &CFG), Transition::None);
        assert_eq!(w.observe(9, at(t0, 299), true, &CFG), Transition::None);
        assert_eq!(
            w.observe(9, at(t0, 300), true, &CFG),
            Transition::Stalled { depth: 9 }
        );
        assert!(w.is_stalled());
    }

    #[test]
    fn progress_or_an_empty_queue_restarts_the_window() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, true, &CFG);
        // Shrank since the last sample: the worker is accepting.
        assert_eq!(w.observe(4, at(t0, 250), true, &CFG), Transition::None);
        assert_eq!(w.observe(6, at(t0, 400), true, &CFG), Transition::None);
        // Growing overall but dropping now and then is progress too.
        assert_eq!(w.observe(5, at(t0, 420), true, &CFG), Transition::None);
        assert_eq!(w.observe(9, at(t0, 440), true, &CFG), Transition::None);
        w.observe(0, at(t0, 450), true, &CFG);
        assert_eq!(w.observe(7, at(t0, 500), true, &CFG), Transition::None);
        assert_eq!(w.observe(7, at(t0, 799), true, &CFG), Transition::None);
        assert_eq!(
            w.observe(7, at(t0, 800), true, &CFG),
            Transition::Stalled { depth: 7 }
        );
    }

    #[test]
    fn an_overloaded_worker_that_still_accepts_is_not_stalled() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        // Sampled every 10 ms for 2 s, the queue grows by one each time, except that every
        // 100 ms the worker's accepts outpace arrivals once: it falls behind, but it works.
        let mut depth = 5u32;
        for step in 0..200u64 {
            depth = if step % 10 == 9 { depth - 1 } else { depth + 1 };
            assert_eq!(
                w.observe(depth, at(t0, step * 10), true, &CFG),
                Transition::None,
                "step {step}"
            );
        }
    }

    #[test]
    fn a_slot_without_a_ready_worker_is_not_judged() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, false, &CFG);
        assert_eq!(w.observe(5, at(t0, 1000), false, &CFG), Transition::None);
        assert!(!w.is_stalled());
    }

    #[test]
    fn without_evacuation_it_rejoins_when_the_queue_drains() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, true, &CFG);
        w.observe(5, at(t0, 300), true, &CFG);
        // Evacuation is asked for again (a caller with evacuation off ignores it); the slot
        // stays out until its queue drains.
        assert_eq!(w.observe(5, at(t0, 2000), true, &CFG), Transition::Evacuate);
        assert!(w.is_stalled());
        assert_eq!(
            w.observe(0, at(t0, 2100), true, &CFG),
            Transition::Rejoined {
                after: Duration::from_millis(1800)
            }
        );
    }

    #[test]
    fn after_evacuation_it_rejoins_as_a_probe_with_a_growing_hold_off() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, true, &CFG);
        assert_eq!(
            w.observe(5, at(t0, 300), true, &CFG),
            Transition::Stalled { depth: 5 }
        );
        w.evacuated(at(t0, 301));
        // Empty at once, but that proves nothing: hold off for the stall timeout.
        assert_eq!(w.observe(0, at(t0, 400), true, &CFG), Transition::None);
        assert!(matches!(
            w.observe(0, at(t0, 601), true, &CFG),
            Transition::Rejoined { .. }
        ));
        // Stalls again right away: the next hold-off doubles.
        w.observe(2, at(t0, 700), true, &CFG);
        assert_eq!(
            w.observe(2, at(t0, 1000), true, &CFG),
            Transition::Stalled { depth: 2 }
        );
        w.evacuated(at(t0, 1000));
        assert_eq!(w.observe(0, at(t0, 1500), true, &CFG), Transition::None);
        assert!(matches!(
            w.observe(0, at(t0, 1600), true, &CFG),
            Transition::Rejoined { .. }
        ));
    }

    #[test]
    fn stragglers_after_an_evacuation_are_evacuated_again() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, true, &CFG);
        w.observe(5, at(t0, 300), true, &CFG);
        w.evacuated(at(t0, 300));
        assert_eq!(w.observe(1, at(t0, 400), true, &CFG), Transition::None);
        assert_eq!(w.observe(1, at(t0, 600), true, &CFG), Transition::Evacuate);
    }

    #[test]
    fn a_skipped_evacuation_is_tried_again() {
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, true, &CFG);
        assert_eq!(
            w.observe(5, at(t0, 300), true, &CFG),
            Transition::Stalled { depth: 5 }
        );
        // The caller could not evacuate (no other slot was live): no evacuated() call.
        assert_eq!(w.observe(5, at(t0, 500), true, &CFG), Transition::None);
        assert_eq!(w.observe(5, at(t0, 600), true, &CFG), Transition::Evacuate);
        assert_eq!(w.observe(5, at(t0, 700), true, &CFG), Transition::None);
        assert_eq!(w.observe(5, at(t0, 900), true, &CFG), Transition::Evacuate);
    }

    #[test]
    fn kill_after_fires_once() {
        let cfg = StallConfig {
            kill_after: Some(Duration::from_millis(500)),
            ..CFG
        };
        let t0 = Instant::now();
        let mut w = StallWatch::default();
        w.observe(5, t0, true, &cfg);
        w.observe(5, at(t0, 300), true, &cfg);
        assert_eq!(w.observe(5, at(t0, 700), true, &cfg), Transition::Evacuate);
        assert_eq!(w.observe(5, at(t0, 800), true, &cfg), Transition::Kill);
        assert_eq!(w.observe(5, at(t0, 900), true, &cfg), Transition::None);
    }

    #[test]
    fn a_stall_timeout_over_the_longest_hold_never_panics() {
        // --stall-timeout 6s (over MAX_HOLD): a second stall soon after rejoining.
        let cfg = StallConfig {
            timeout: Duration::from_secs(6),
            kill_after: None,
        };
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        let mut t = 0;
        for round in 0..3 {
            // A queue that never shrinks for the timeout: stalled.
            let mut stalled = false;
            for _ in 0..8 {
                if let Transition::Stalled { .. } = w.observe(5, at(t0, t), true, &cfg) {
                    stalled = true;
                }
                t += 1000;
            }
            assert!(stalled, "round {round}");
            w.evacuated(at(t0, t));
            // Drained: it rejoins after the hold-off, which is the timeout itself.
            let mut rejoined = false;
            for _ in 0..8 {
                if let Transition::Rejoined { .. } = w.observe(0, at(t0, t), true, &cfg) {
                    rejoined = true;
                    break;
                }
                t += 1000;
            }
            assert!(rejoined, "round {round}");
        }
    }
}
