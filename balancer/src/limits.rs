//! Admission of clients to the control socket and the metrics endpoint: at most so many at
//! once per peer and in all, and a client that is only holding its connection open (waiting
//! for it to say something) gives way to a new one. Pure accounting; the servers act on the
//! decisions (close the evicted connection, refuse the new one with a typed reply).
//!
//! Why evict instead of refusing: clients that connect and then say nothing would otherwise
//! lock every later client out until their read deadline, and come straight back. A client
//! whose request is being answered is never evicted, so each request in flight finishes.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// Identifies an admitted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(u64);

/// Why a connection was not admitted (every connection of the peer, or of everyone, is in
/// the middle of a request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The peer has this many connections, all busy.
    Peer(usize),
    /// There are this many connections, all busy.
    Total(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Peer(n) => write!(f, "this peer already has {n} requests in progress"),
            Refusal::Total(n) => write!(f, "{n} requests are already in progress"),
        }
    }
}

/// What to do with a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// Serve it as `id`; first close the connection whose handle is `evicted`, if any.
    Admitted {
        /// The new connection's id.
        id: ConnId,
        /// The handle of the connection that gave way.
        evicted: Option<T>,
    },
    /// Close it (after a short typed reply).
    Refused(Refusal),
}

struct Entry<K, T> {
    peer: K,
    /// Since when it has been waiting for its client; `None` while a request is served.
    waiting_since: Option<Instant>,
    handle: T,
}

/// The connections admitted, by peer `K`, each with the handle `T` that closes it.
pub struct Limits<K, T> {
    per_peer: usize,
    total: usize,
    next: u64,
    entries: BTreeMap<ConnId, Entry<K, T>>,
}

impl<K, T> Limits<K, T> {
    /// At most `per_peer` connections of one peer and `total` in all (each at least 1).
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            per_peer: per_peer.max(1),
            total: total.max(1),
            next: 0,
            entries: BTreeMap::new(),
        }
    }

    /// `id` is being answered: it may not be evicted until it waits again.
    pub fn busy(&mut self, id: ConnId) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.waiting_since = None;
        }
    }

    /// `id` waits for its client again from `now` (its answer was sent).
    pub fn waiting(&mut self, id: ConnId, now: Instant) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.waiting_since = Some(now);
        }
    }

    /// `id` is gone (or was evicted already: then nothing happens).
    pub fn leave(&mut self, id: ConnId) {
        self.entries.remove(&id);
    }

    /// Connections admitted and not gone.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no connection is admitted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: PartialEq, T> Limits<K, T> {
    /// Admits a new connection of `peer`, waiting for its client from `now`. At a limit, the
    /// longest-waiting connection gives way: the peer's own at the peer's limit, anyone's at
    /// the total; when none is waiting, the new one is refused.
    pub fn admit(&mut self, peer: K, handle: T, now: Instant) -> Admission<T> {
        let mut evicted = None;
        if self.count(&peer) >= self.per_peer {
            match self.longest_waiting(Some(&peer)) {
                Some(victim) => evicted = self.entries.remove(&victim).map(|e| e.handle),
                None => return Admission::Refused(Refusal::Peer(self.per_peer)),
            }
        } else if self.entries.len() >= self.total {
            match self.longest_waiting(None) {
                Some(victim) => evicted = self.entries.remove(&victim).map(|e| e.handle),
                None => return Admission::Refused(Refusal::Total(self.total)),
            }
        }
        let id = ConnId(self.next);
        self.next += 1;
        self.entries.insert(
            id,
            Entry {
                peer,
                waiting_since: Some(now),
                handle,
            },
        );
        Admission::Admitted { id, evicted }
    }

    fn count(&self, peer: &K) -> usize {
        self.entries.values().filter(|e| &e.peer == peer).count()
    }

    /// The connection (of `peer`, or of anyone) that has waited longest, if any waits.
    fn longest_waiting(&self, peer: Option<&K>) -> Option<ConnId> {
        self.entries
            .iter()
            .filter(|(_, e)| peer.is_none_or(|p| &e.peer == p))
            .filter_map(|(id, e)| e.waiting_since.map(|since| (since, *id)))
            .min()
            .map(|(_, id)| id)
    }
}

/// At most one log line per period about refused and evicted clients, with how many there
/// were since the last one: a flood of connections must not become a flood of log lines.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    /// One line per `every` at most.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one event at `now`; returns how many to report when a line is due.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, base: Instant) -> Instant {
        base + Duration::from_secs(secs)
    }

    fn admitted<T: std::fmt::Debug>(a: Admission<T>) -> (ConnId, Option<T>) {
        match a {
            Admission::Admitted { id, evicted } => (id, evicted),
            other => panic!("refused: {other:?}"),
        }
    }

    #[test]
    fn under_the_limits_everyone_is_admitted_and_nobody_evicted() {
        let t = Instant::now();
        let mut l = Limits::new(2, 4);
        for (i, peer) in ["a", "a", "b", "b"].into_iter().enumerate() {
            let (_, evicted) = admitted(l.admit(peer, i, at(i as u64, t)));
            assert_eq!(evicted, None);
        }
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn at_the_peer_limit_the_peers_longest_waiting_connection_gives_way() {
        let t = Instant::now();
        let mut l = Limits::new(2, 10);
        let (first, _) = admitted(l.admit("a", "a1", at(0, t)));
        admitted(l.admit("b", "b1", at(0, t)));
        admitted(l.admit("a", "a2", at(1, t)));
        // "b1" waited as long as "a1" but is another peer's: never touched by "a".
        let (_, evicted) = admitted(l.admit("a", "a3", at(2, t)));
        assert_eq!(evicted, Some("a1"));
        assert_eq!(l.len(), 3);
        // The evicted connection's own leave changes nothing.
        l.leave(first);
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn a_busy_connection_is_never_evicted_and_when_all_are_busy_the_new_one_is_refused() {
        let t = Instant::now();
        let mut l = Limits::new(2, 10);
        let (a1, _) = admitted(l.admit("a", 1, at(0, t)));
        let (a2, _) = admitted(l.admit("a", 2, at(1, t)));
        l.busy(a1);
        // a2 waits, a1 is busy: a2 gives way although a1 is older.
        let (a3, evicted) = admitted(l.admit("a", 3, at(2, t)));
        assert_eq!(evicted, Some(2));
        l.leave(a2);
        l.busy(a3);
        assert_eq!(
            l.admit("a", 4, at(3, t)),
            Admission::Refused(Refusal::Peer(2))
        );
        // Back to waiting: evictable again.
        l.waiting(a1, at(4, t));
        let (_, evicted) = admitted(l.admit("a", 5, at(5, t)));
        assert_eq!(evicted, Some(1));
    }

    #[test]
    fn at_the_total_limit_the_longest_waiting_of_anyone_gives_way() {
        let t = Instant::now();
        let mut l = Limits::new(2, 3);
        let (a1, _) = admitted(l.admit("a", "a1", at(0, t)));
        admitted(l.admit("b", "b1", at(1, t)));
        admitted(l.admit("c", "c1", at(2, t)));
        l.busy(a1);
        let (_, evicted) = admitted(l.admit("d", "d1", at(3, t)));
        assert_eq!(evicted, Some("b1"));
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn at_the_total_limit_with_everyone_busy_the_new_one_is_refused() {
        let t = Instant::now();
        let mut l = Limits::new(5, 2);
        let (a, _) = admitted(l.admit(0u32, (), t));
        let (b, _) = admitted(l.admit(1u32, (), t));
        l.busy(a);
        l.busy(b);
        assert_eq!(l.admit(2, (), t), Admission::Refused(Refusal::Total(2)));
        l.leave(a);
        admitted(l.admit(2, (), t));
        assert!(!l.is_empty());
    }

    #[test]
    fn the_throttle_reports_the_first_event_then_a_count_per_period() {
        let t = Instant::now();
        let mut th = Throttle::new(Duration::from_secs(10));
        assert_eq!(th.note(t), Some(1));
        for s in 1..=5 {
            assert_eq!(th.note(at(s, t)), None);
        }
        assert_eq!(th.note(at(10, t)), Some(6));
        assert_eq!(th.note(at(11, t)), None);
    }

    #[test]
    fn zero_limits_still_admit_one() {
        let mut l = Limits::new(0, 0);
        admitted(l.admit((), (), Instant::now()));
        assert_eq!(l.len(), 1);
    }
}
