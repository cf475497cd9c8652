//! The servers' side of [`crate::limits`]: one table of admitted connections shared by the
//! accepting task and the connections' tasks, and each connection's place in it, which
//! tells the connection when it has to give way.
use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use tokio::sync::oneshot;

use crate::limits::{Admission, ConnId, Limits, Refusal};

type Shared<K> = Arc<Mutex<Limits<K, oneshot::Sender<()>>>>;

/// The connections admitted, by peer `K`.
pub struct Table<K>(Shared<K>);

fn lock<K>(
    table: &Mutex<Limits<K, oneshot::Sender<()>>>,
) -> MutexGuard<'_, Limits<K, oneshot::Sender<()>>> {
    // The accounting stays consistent whatever panicked while holding it.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: PartialEq> Table<K> {
    /// At most `per_peer` connections of one peer and `total` in all.
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self(Arc::new(Mutex::new(Limits::new(per_peer, total))))
    }

    /// Admits a connection of `peer` (true: another one was told to give way for it), or
    /// says why not.
    pub fn admit(&self, peer: K) -> Result<(Place<K>, bool), Refusal> {
        let (evict, evicted) = oneshot::channel();
        match lock(&self.0).admit(peer, evict, Instant::now()) {
            // Dropping the evicted connection's sender wakes it up to close.
            Admission::Admitted { id, evicted: gone } => Ok((
                Place {
                    id,
                    table: self.0.clone(),
                    evicted,
                },
                gone.is_some(),
            )),
            Admission::Refused(why) => Err(why),
        }
    }
}

/// An admitted connection's place: busy while its request is served, given up when dropped.
pub struct Place<K> {
    id: ConnId,
    table: Shared<K>,
    evicted: oneshot::Receiver<()>,
}

impl<K> Place<K> {
    /// Its request is being served: it may not be evicted.
    pub fn busy(&self) {
        lock(&self.table).busy(self.id);
    }

    /// It waits for its client again.
    pub fn waiting(&self) {
        lock(&self.table).waiting(self.id, Instant::now());
    }

    /// Resolves when the connection has to give way to a new one.
    pub async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }
}

impl<K> Drop for Place<K> {
    fn drop(&mut self) {
        lock(&self.table).leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_evicted_place_hears_it_and_a_dropped_one_frees_its_room() {
        let table = Table::new(1, 10);
        let (mut first, evicted) = table.admit("a").unwrap();
        assert!(!evicted);
        let (second, evicted) = table.admit("a").unwrap();
        assert!(evicted);
        tokio::time::timeout(std::time::Duration::from_secs(5), first.evicted())
            .await
            .expect("the first place hears that it has to go");
        second.busy();
        assert!(table.admit("a").is_err(), "a busy place stays");
        drop(second);
        assert!(table.admit("a").is_ok(), "a dropped place frees its room");
    }
}
