//! Which event cost which connection: every failed connection is put on the event whose
//! window (start to settled, plus a margin) its lifetime overlaps; a worker SIGKILL's failures
//! whose client address the killed worker held are its losses "in hand", counted apart.
//! Pure: times are offsets from the soak's start.
use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use crate::plan::Kind;

/// How one connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// connect(2) failed (refused, or no SYN-ACK in time).
    Connect,
    /// Sending the request failed.
    Write,
    /// Reading the answer failed (reset).
    Read,
    /// The connection ended without a whole, valid answer.
    NoAnswer,
    /// No answer within the deadline.
    TimedOut,
}

/// A failed connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// When the client started it.
    pub start: Duration,
    /// When the client gave it up.
    pub end: Duration,
    /// The client's address, once connected.
    pub client: Option<SocketAddr>,
    /// How it failed.
    pub why: Why,
}

/// One event as it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Its kind.
    pub kind: Kind,
    /// When it began.
    pub start: Duration,
    /// When the group was settled again after it.
    pub end: Duration,
    /// For a worker SIGKILL: the client addresses of the connections the worker had
    /// accepted and still held when it was killed.
    pub held: HashSet<SocketAddr>,
}

/// The outcome of one kind of event.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    /// How many times it happened.
    pub events: u32,
    /// Failed connections put on it, beyond the ones below.
    pub failed: u64,
    /// Failed connections that a killed worker had accepted and held (worker SIGKILL only).
    pub lost_in_hand: u64,
    /// The longest time from its start to the group settled again.
    #[serde(rename = "longest_ms", serialize_with = "millis")]
    pub longest: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every failure, put on an event kind or on none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Per kind, in table order.
    pub rows: BTreeMap<Kind, Row>,
    /// Failures that overlap no event's window.
    pub unattributed: u64,
    /// Every failure by how it failed.
    pub by_why: BTreeMap<Why, u64>,
}

impl Attribution {
    /// Failures that count against the run: all but the killed workers' in-hand losses.
    pub fn counted_failures(&self) -> u64 {
        self.unattributed + self.rows.values().map(|r| r.failed).sum::<u64>()
    }
}

/// Puts each failure on an event. A failure overlapping several windows goes to a SIGKILL
/// whose worker held it, else to the latest window that began before it ended.
pub fn attribute(windows: &[Window], failures: &[Failure], margin: Duration) -> Attribution {
    let mut out = Attribution::default();
    for kind in Kind::ALL {
        out.rows.insert(kind, Row::default());
    }
    for w in windows {
        let row = out.rows.entry(w.kind).or_default();
        row.events += 1;
        row.longest = row.longest.max(w.end.saturating_sub(w.start));
    }
    for f in failures {
        *out.by_why.entry(f.why).or_default() += 1;
        let overlapping: Vec<&Window> = windows
            .iter()
            .filter(|w| f.start <= w.end + margin && w.start <= f.end)
            .collect();
        let in_hand = overlapping
            .iter()
            .find(|w| f.client.is_some_and(|c| w.held.contains(&c)));
        if let Some(w) = in_hand {
            out.rows.entry(w.kind).or_default().lost_in_hand += 1;
        } else if let Some(w) = overlapping.iter().max_by_key(|w| w.start) {
            out.rows.entry(w.kind).or_default().failed += 1;
        } else {
            out.unattributed += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn window(kind: Kind, start: u64, end: u64, held: &[SocketAddr]) -> Window {
        Window {
            kind,
            start: ms(start),
            end: ms(end),
            held: held.iter().copied().collect(),
        }
    }

    fn failure(start: u64, end: u64, client: Option<SocketAddr>) -> Failure {
        Failure {
            start: ms(start),
            end: ms(end),
            client,
            why: Why::Read,
        }
    }

    #[test]
    fn failures_go_to_the_window_they_overlap_or_to_none() {
        let a: SocketAddr = "127.0.0.2:40000".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:40001".parse().unwrap();
        let windows = [
            window(Kind::WorkerKill, 1000, 1200, &[a]),
            window(Kind::Upgrade, 3000, 3500, &[]),
        ];
        let failures = [
            // Held by the killed worker: its loss in hand.
            failure(1100, 1150, Some(a)),
            // During the kill, but not held: a counted failure of the kill.
            failure(1100, 1150, Some(b)),
            // Within the margin after the upgrade settled.
            failure(3600, 3700, None),
            // Started before the upgrade, failed during it.
            failure(2500, 3100, None),
            // Between events, beyond the margin: nobody's.
            failure(2000, 2100, None),
        ];
        let out = attribute(&windows, &failures, ms(300));
        let kill = &out.rows[&Kind::WorkerKill];
        assert_eq!((kill.events, kill.failed, kill.lost_in_hand), (1, 1, 1));
        assert_eq!(kill.longest, ms(200));
        assert_eq!(out.rows[&Kind::Upgrade].failed, 2);
        assert_eq!(out.rows[&Kind::PolicyFlip], Row::default());
        assert_eq!(out.unattributed, 1);
        assert_eq!(out.counted_failures(), 4);
        assert_eq!(out.by_why[&Why::Read], 5);
    }

    #[test]
    fn a_held_connection_wins_over_a_later_window_and_otherwise_the_latest_wins() {
        let a: SocketAddr = "127.0.0.3:50000".parse().unwrap();
        let windows = [
            window(Kind::WorkerKill, 1000, 1100, &[a]),
            window(Kind::PolicyFlip, 1150, 1160, &[]),
        ];
        let out = attribute(
            &windows,
            &[failure(900, 1155, Some(a)), failure(900, 1155, None)],
            ms(100),
        );
        assert_eq!(out.rows[&Kind::WorkerKill].lost_in_hand, 1);
        assert_eq!(out.rows[&Kind::WorkerKill].failed, 0);
        assert_eq!(out.rows[&Kind::PolicyFlip].failed, 1);
        assert_eq!(out.counted_failures(), 1);
    }

    #[test]
    fn no_failure_no_count() {
        let out = attribute(&[window(Kind::Drain, 0, 10, &[])], &[], ms(100));
        assert_eq!(out.counted_failures(), 0);
        assert_eq!(out.rows[&Kind::Drain].events, 1);
    }
}
