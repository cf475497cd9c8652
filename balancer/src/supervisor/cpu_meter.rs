//! The controller's own CPU time per second of wall time, over a recent window, for
//! `status`: read from the process's CPU clock (every thread, the wake-ups included), not
//! from timing a part of the work.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The window the rate is taken over, once the controller has run that long.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Marks closer together than this are not kept (a client asking in a loop must not grow
/// the list).
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Readings of the process's CPU time: `(when, CPU time so far)`.
#[derive(Clone, Debug)]
pub struct CpuMeter {
    marks: VecDeque<(Instant, Duration)>,
}

/// CPU time per second of wall time over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuRate {
    /// CPU seconds per wall second (1.0: one CPU busy).
    pub per_sec: f64,
    /// The window it was measured over.
    pub window: Duration,
}

impl CpuMeter {
    /// A meter whose first reading is `cpu` at `now`.
    pub fn new(now: Instant, cpu: Duration) -> Self {
        Self {
            marks: VecDeque::from([(now, cpu)]),
        }
    }

    /// Whether a reading at `now` would be kept (reading the CPU clock is a system call: not
    /// at every sample).
    pub fn wants_mark(&self, now: Instant) -> bool {
        self.marks
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= MARK_EVERY)
    }

    /// Keeps a reading; only the newest one older than [`WINDOW`] and those after it stay.
    pub fn mark(&mut self, now: Instant, cpu: Duration) {
        if !self.wants_mark(now) {
            return;
        }
        self.marks.push_back((now, cpu));
        while self
            .marks
            .get(1)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
        {
            self.marks.pop_front();
        }
    }

    /// The rate from the oldest reading kept (about [`WINDOW`] ago, or the start) to `now`.
    pub fn rate(&self, now: Instant, cpu: Duration) -> CpuRate {
        let (at, then) = self.marks.front().copied().unwrap_or((now, cpu));
        let window = now.saturating_duration_since(at);
        let spent = cpu.saturating_sub(then);
        CpuRate {
            per_sec: if window.is_zero() {
                0.0
            } else {
                spent.as_secs_f64() / window.as_secs_f64()
            },
            window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_rate_covers_about_the_last_window_once_the_controller_ran_that_long() {
        let t0 = Instant::now();
        // A busy start (100 ms of CPU), then 1 ms of CPU per second.
        let mut m = CpuMeter::new(t0, Duration::ZERO);
        let cpu_at = |s: u32| 100 * MS + s.saturating_sub(1) * MS;
        for s in 1..=30 {
            m.mark(t0 + Duration::from_secs(u64::from(s)), cpu_at(s));
        }
        let now = t0 + Duration::from_secs(30) + 500 * MS;
        let r = m.rate(now, cpu_at(30));
        assert!(
            r.window >= WINDOW && r.window <= WINDOW + Duration::from_secs(1),
            "{r:?}"
        );
        assert!((r.per_sec - 0.001).abs() < 0.0002, "{r:?}");
    }

    #[test]
    fn early_on_the_rate_covers_everything_since_the_start() {
        let t0 = Instant::now();
        let m = CpuMeter::new(t0, Duration::ZERO);
        let r = m.rate(t0 + Duration::from_secs(2), 20 * MS);
        assert_eq!(r.window, Duration::from_secs(2));
        assert!((r.per_sec - 0.01).abs() < 1e-9);
    }

    #[test]
    fn readings_asked_for_in_a_loop_are_not_all_kept() {
        let t0 = Instant::now();
        let mut m = CpuMeter::new(t0, Duration::ZERO);
        for i in 0..100_000u32 {
            m.mark(t0 + MS * i, MS * (i / 100));
        }
        assert!(m.marks.len() <= 12, "{}", m.marks.len());
    }
}
