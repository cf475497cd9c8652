//! The supervisor's state and the small rules every handler shares: which slots are live,
//! publishing the tables, the layout pinning follows. The handlers live beside it, one file
//! per input (`lifecycle`, `requests`, `operation`, `sampling`, `shutdown`) and the read
//! models in `views`; none of them touches the world except through [`Host`].
use std::time::Instant;

use log::{error, info, warn};

use super::{
    cpu_meter::CpuMeter,
    host::{Host, Publish, SlotSnapshot, Timer},
    operation::Operation,
    pacing::Pacer,
    settings::{InheritedSlot, Settings, Steer},
    slot::{Ids, Membership, Occupant, Phase, Slot, Worker},
};
use balancer_common::Tables;

use crate::{
    control::protocol::PolicyName,
    policy::{build_tables, weights_void},
};

/// Supervises the workers of a socket group and serves control requests, through a [`Host`].
pub struct Supervisor<H: Host> {
    /// Every effect goes through here.
    pub(super) host: H,
    pub(super) settings: Settings,
    pub(super) steer: Steer,
    pub(super) slots: Vec<Slot>,
    pub(super) ids: Ids,
    /// The multi-step change in progress (at most one).
    pub(super) op: Option<Operation>,
    pub(super) phase: Phase,
    /// Whether `ready: N workers` was printed (once, when every slot first was ready).
    pub(super) announced_ready: bool,
    /// Whether this controller started the group (not adopted it): until every worker is
    /// first ready, every slot keeps its share.
    pub(super) fresh_start: bool,
    pub(super) started: Instant,
    /// How often the queues are sampled (see `pacing`).
    pub(super) pacer: Pacer,
    /// The controller's CPU time, for `status`.
    pub(super) cpu: CpuMeter,
    /// The last sample: accept-queue depth per slot, summed over the addresses.
    pub(super) depths: Vec<u32>,
    /// The last `STATUS=` the service manager was told (sent again only when it changes).
    pub(super) manager_status: String,
    /// When the group's sockets are next checked (see `socket_check`).
    pub(super) next_socket_check: Option<Instant>,
    /// Slots whose worker holds a socket the group replaced (slot → that worker's pid): each
    /// gets a rolling restart, until a worker of its own serves it.
    pub(super) stale: std::collections::BTreeMap<u32, u32>,
    /// Slots whose queue the stop's drain moved to others (once each).
    pub(super) drain_evacuated: std::collections::BTreeSet<u32>,
}

impl<H: Host> Supervisor<H> {
    /// A supervisor of `slots` empty slots; [`Supervisor::start`] starts their workers.
    pub fn new(host: H, settings: Settings, steer: Steer, slots: u32) -> Self {
        let started = host.now();
        Self {
            pacer: Pacer::new(settings.sample_interval),
            cpu: CpuMeter::new(started, host.cpu_time()),
            host,
            settings,
            steer,
            slots: (0..slots).map(|_| Slot::default()).collect(),
            ids: Ids::default(),
            op: None,
            phase: Phase::Running,
            announced_ready: false,
            fresh_start: false,
            started,
            depths: Vec::new(),
            manager_status: String::new(),
            next_socket_check: None,
            stale: Default::default(),
            drain_evacuated: Default::default(),
        }
    }

    /// Starts every slot's worker.
    pub fn start(&mut self) {
        self.fresh_start = true;
        self.host.store_sockets(0..self.slot_count());
        for slot in 0..self.slot_count() {
            self.spawn_current(slot);
        }
    }

    /// The host, for the event loop and the tests.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// The host, mutably.
    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.phase == Phase::Stopping
    }

    pub(super) fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Which slots take new connections.
    pub(super) fn live(&self) -> Vec<bool> {
        self.slots.iter().map(Slot::live).collect()
    }

    /// Whether any slot other than `slot` is live.
    pub(super) fn others_live(&self, slot: u32) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(i, s)| i as u32 != slot && s.live())
    }

    /// The slot count that pinning follows: every slot but those a scale-down is removing
    /// (always the last ones), so that the survivors take over the removed slots' CPUs at once.
    pub(super) fn layout_slots(&self) -> u32 {
        self.slots
            .iter()
            .filter(|s| s.membership != Membership::Removing)
            .count() as u32
    }

    /// The CPUs a worker of `slot` is pinned to, with `--pin-workers`.
    pub(super) fn pinned_cpus(&self, slot: u32) -> Option<Vec<u32>> {
        self.settings
            .pin_workers
            .then(|| self.settings.layout.pinned_cpus(slot, self.layout_slots()))
    }

    /// The tables for the slots live now. They are built over the slots that stay (those a
    /// scale-down removes are the last ones): even when no slot is live and every slot
    /// counts as live, no entry names a slot whose socket is about to close.
    pub(super) fn tables(&self) -> (Vec<bool>, Box<Tables>) {
        let staying = self.layout_slots().max(1);
        let mut live = self.live();
        live.truncate(staying as usize);
        // At start, until every worker is ready (within the ready timeout), every slot with a
        // worker keeps its share, so that the first worker to be ready does not take every
        // connection. With no slot live, connections must queue somewhere: preferably on a
        // slot whose worker runs (starting, drained or stalled) rather than on one with no
        // worker at all (the tables fall back to every slot only when no worker runs).
        let starting = self.fresh_start
            && !self.announced_ready
            && self.host.now() < self.started + self.settings.ready_timeout;
        let queue_on = if starting {
            self.slots
                .iter()
                .take(staying as usize)
                .map(|s| s.current().is_some() && s.membership == Membership::Active)
                .collect()
        } else if live.iter().any(|l| *l) {
            live.clone()
        } else {
            self.slots
                .iter()
                .take(staying as usize)
                .map(|s| s.current().is_some())
                .collect()
        };
        let weights = self.steer.weights.as_deref();
        let tables = build_tables(&self.settings.layout, staying, &queue_on, weights);
        (live, tables)
    }

    /// Builds the tables for the slots live now and publishes them.
    pub(super) async fn publish(&mut self) {
        if let Err(e) = self.try_publish().await {
            // The previous tables stay active; they are valid, just not current.
            error!("publishing the steering tables failed: {e}");
        }
    }

    /// Like [`Supervisor::publish`], for a change the operator asked for: the error goes
    /// back to them (and the change is rolled back by the caller).
    pub(super) async fn try_publish(&mut self) -> Result<(), super::host::HostError> {
        let (live, tables) = self.tables();
        if weights_void(&live, self.steer.weights.as_deref()) {
            warn!("every live slot has weight 0: hash shares are equal until a weighted slot is live again");
        }
        let publish = Publish {
            policy: self.steer.policy,
            spill_depth: self.steer.spill_depth,
            tables: &tables,
        };
        let published = self.host.publish(publish).await;
        self.tell_manager_status();
        published
    }

    /// Every worker's pid (current, successors, retiring).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .flat_map(Slot::workers)
            .map(|w| w.pid)
            .collect()
    }

    /// Keeps the group's record for a successor controller (the host writes it when it
    /// changed).
    pub fn save_record(&mut self) {
        let slots: Vec<SlotSnapshot> = self
            .slots
            .iter()
            .map(|s| SlotSnapshot {
                pid: s.current().map(|w| w.pid),
                ready: s.ready(),
                drained: s.membership == Membership::Drained,
                restarts: s.crashes.restarts,
                others: s
                    .successor()
                    .into_iter()
                    .chain(s.retiring.iter().copied())
                    .map(|w| w.pid)
                    .collect(),
            })
            .collect();
        self.host.save_record(&slots, &self.steer);
    }

    /// Takes over the slots a dead controller left: their adopted workers are watched and
    /// serve on (ready ones in the tables at once), the others get a new worker.
    pub async fn adopt(&mut self, inherited: Vec<InheritedSlot>) {
        self.host.store_sockets(0..self.slot_count());
        let mut inherited = inherited.into_iter();
        for slot in 0..self.slot_count() {
            let s = inherited.next().unwrap_or(InheritedSlot {
                worker: None,
                drained: false,
                restarts: 0,
                retiring: Vec::new(),
            });
            // A restart's successor or a replaced worker the dead controller left: stopped as
            // it would have stopped it.
            for pid in &s.retiring {
                let generation = self.ids.generation();
                self.host.watch_adopted(slot, generation, *pid);
                let worker = Worker {
                    pid: *pid,
                    generation,
                    since: self.host.now(),
                    ready: true,
                };
                info!("slot {slot}: adopted worker pid {pid} is not the slot's: stopping it");
                self.retire(slot, worker);
            }
            let state = &mut self.slots[slot as usize];
            state.membership = if s.drained {
                Membership::Drained
            } else {
                Membership::Active
            };
            state.crashes.restarts = s.restarts;
            let Some((pid, ready)) = s.worker else {
                self.spawn_current(slot);
                continue;
            };
            let generation = self.ids.generation();
            state.occupant = Occupant::Serving(Worker {
                pid,
                generation,
                since: self.host.now(),
                ready,
            });
            self.host.watch_adopted(slot, generation, pid);
            info!(
                "slot {slot}: adopted worker pid {pid}{}",
                if ready { " (ready)" } else { "" }
            );
            if !ready {
                self.host
                    .schedule(self.settings.ready_timeout, Timer::ReadyTimeout(generation));
            }
        }
        self.publish().await;
        self.announce_if_ready();
    }

    /// Prints `ready: N workers` and tells the service manager READY=1, once: the first time
    /// every slot's worker is ready.
    pub(super) fn announce_if_ready(&mut self) {
        if !self.announced_ready && self.slots.iter().all(|s| s.ready()) {
            self.announced_ready = true;
            let line = format!("ready: {} workers", self.slots.len());
            self.host.announce(&line);
            self.host.tell_manager("READY=1");
        }
    }

    /// Tells the service manager how many slots take connections, when that changed.
    pub(super) fn tell_manager_status(&mut self) {
        let status = match self.phase {
            Phase::Running => format!(
                "{} of {} slots live, policy {}",
                self.slots.iter().filter(|s| s.live()).count(),
                self.slots.len(),
                PolicyName::from(self.steer.policy)
            ),
            Phase::Stopping => format!(
                "stopping: {} worker(s) still running",
                self.slots
                    .iter()
                    .map(|s| s.workers().count())
                    .sum::<usize>()
            ),
        };
        if status != self.manager_status {
            self.host.tell_manager(&format!("STATUS={status}"));
            self.manager_status = status;
        }
    }

    /// Connections moved by the migrate program so far, over every slot and address.
    pub(super) fn migrated_total(&self) -> u64 {
        self.host.counters().map_or(0, |c| {
            c.iter()
                .flat_map(|a| a.slots.iter())
                .map(|s| s.migrated)
                .sum()
        })
    }
}
