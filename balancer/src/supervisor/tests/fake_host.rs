//! A fake [`Host`]: records every effect in order, hands out pids, keeps timers for the test
//! to fire, moves time only when told, and checks the tables invariant on every publish.
use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use balancer_common::{PolicyKind, SlotCounters};
use nix::sys::signal::Signal;

use crate::{
    report::SlotView,
    steering::AddressCounters,
    supervisor::{
        host::{
            Evacuation, Event, Host, HostError, Publish, Repin, SlotSnapshot, SocketRepair, Timer,
            WorkerExit,
        },
        settings::Steer,
        slot::Generation,
    },
};

/// One effect, as the supervisor asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Spawn {
        slot: u32,
        pid: u32,
    },
    /// An adopted worker is watched.
    Watch {
        slot: u32,
        pid: u32,
    },
    SpawnFailed {
        slot: u32,
    },
    Signal {
        pid: u32,
        signal: Signal,
    },
    Schedule {
        delay: Duration,
        timer: Timer,
    },
    /// The policy and the slots the published tables name as live.
    Publish {
        policy: PolicyKind,
        live: Vec<u32>,
    },
    Grow {
        from: u32,
        to: u32,
    },
    Shrink {
        to: u32,
    },
    Evacuate {
        slot: u32,
    },
    Repin(Vec<Repin>),
    Announce(String),
    PrintCounters(Vec<SlotView>),
    RefuseNew {
        for_at_most: Duration,
    },
    Detach,
}

/// A worker the fake started.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    pub pid: u32,
    pub generation: Generation,
}

pub struct FakeHost {
    pub now: Instant,
    pub calls: Vec<Call>,
    pub started: Vec<Started>,
    /// Pending timers: when due, and what.
    pub timers: Vec<(Instant, Timer)>,
    /// Slots whose next spawns fail.
    pub failing_slots: HashSet<u32>,
    /// Sockets per address the group has (what the socket arrays hold).
    pub group_slots: u32,
    /// What the next samples read: depth per slot (one address).
    pub depths: Vec<u32>,
    /// Connections the migrate program moved, as the counters show.
    pub migrated: u64,
    /// Whether growing the group fails (no more sockets).
    pub fail_grow: bool,
    /// Whether publishing the tables fails (a map update refused).
    pub fail_publish: bool,
    /// The slots whose sockets are in the service manager's descriptor store.
    pub stored: std::collections::BTreeSet<u32>,
    /// The last record saved for a successor.
    pub record: Vec<SlotSnapshot>,
    /// What the service manager was told, in order (kept apart from `calls`, which are the
    /// effects on workers, sockets and maps).
    pub manager: Vec<String>,
    /// How many queued connections the next shrink migrates (closing sockets moves them).
    pub migrate_on_shrink: u64,
    /// What every evacuation reports.
    pub evacuation: Evacuation,
    /// What the next socket check finds (then nothing).
    pub socket_faults: Vec<SocketRepair>,
    /// Socket checks so far.
    pub socket_checks: u32,
    /// Connections in their handshake, as the next drain checks see them.
    pub half_open: usize,
    /// Samples taken so far.
    pub samples: u32,
    /// The controller's CPU time, as the test sets it.
    pub cpu: Duration,
    next_pid: u32,
}

impl FakeHost {
    pub fn new(slots: u32) -> Self {
        Self {
            now: Instant::now(),
            calls: Vec::new(),
            started: Vec::new(),
            timers: Vec::new(),
            failing_slots: HashSet::new(),
            group_slots: slots,
            depths: vec![0; slots as usize],
            migrated: 0,
            migrate_on_shrink: 0,
            evacuation: Evacuation::default(),
            socket_faults: Vec::new(),
            socket_checks: 0,
            half_open: 0,
            samples: 0,
            cpu: Duration::ZERO,
            manager: Vec::new(),
            record: Vec::new(),
            stored: Default::default(),
            fail_grow: false,
            fail_publish: false,
            next_pid: 1000,
        }
    }

    /// The generation a pid was started under.
    pub fn generation_of(&self, pid: u32) -> Generation {
        self.started
            .iter()
            .find(|s| s.pid == pid)
            .map(|s| s.generation)
            .unwrap_or_else(|| panic!("pid {pid} was never started"))
    }

    /// The exit event of `pid`.
    pub fn exit_event(&self, pid: u32, how: WorkerExit) -> Event {
        Event::Exited {
            generation: self.generation_of(pid),
            pid,
            how,
        }
    }

    /// Takes the earliest timer due by `until`, moving the clock to its time.
    pub fn next_due(&mut self, until: Instant) -> Option<Timer> {
        let (i, _) = self
            .timers
            .iter()
            .enumerate()
            .filter(|(_, (at, _))| *at <= until)
            .min_by_key(|(_, (at, _))| *at)?;
        let (at, timer) = self.timers.remove(i);
        self.now = self.now.max(at);
        Some(timer)
    }

    /// Forgets the calls recorded so far; returns them.
    pub fn take_calls(&mut self) -> Vec<Call> {
        std::mem::take(&mut self.calls)
    }

    /// The signals sent, in order.
    pub fn signals(&self) -> Vec<(u32, Signal)> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Signal { pid, signal } => Some((*pid, *signal)),
                _ => None,
            })
            .collect()
    }
}

impl Host for FakeHost {
    fn now(&self) -> Instant {
        self.now
    }

    fn cpu_time(&self) -> Duration {
        self.cpu
    }

    fn spawn(
        &mut self,
        slot: u32,
        generation: Generation,
        _cpus: Option<&[u32]>,
    ) -> Result<u32, HostError> {
        assert!(slot < self.group_slots, "slot {slot} has no socket");
        if self.failing_slots.contains(&slot) {
            self.calls.push(Call::SpawnFailed { slot });
            return Err(HostError::Spawn(std::io::Error::from_raw_os_error(
                libc::ENOENT,
            )));
        }
        self.next_pid += 1;
        let pid = self.next_pid;
        self.started.push(Started { pid, generation });
        self.calls.push(Call::Spawn { slot, pid });
        Ok(pid)
    }

    fn watch_adopted(&mut self, slot: u32, generation: Generation, pid: u32) {
        self.started.push(Started { pid, generation });
        self.calls.push(Call::Watch { slot, pid });
    }

    fn store_sockets(&mut self, slots: std::ops::Range<u32>) {
        for slot in slots {
            assert!(
                slot < self.group_slots,
                "storing slot {slot}, which has no socket"
            );
            self.stored.insert(slot);
        }
    }

    fn unstore_sockets(&mut self, slots: std::ops::Range<u32>) {
        for slot in slots {
            self.stored.remove(&slot);
        }
    }

    fn save_record(&mut self, slots: &[SlotSnapshot], _steer: &Steer) {
        self.record = slots.to_vec();
    }

    fn signal(&mut self, pid: u32, signal: Signal) {
        self.calls.push(Call::Signal { pid, signal });
    }

    fn schedule(&mut self, delay: Duration, timer: Timer) {
        self.timers.push((self.now + delay, timer));
        self.calls.push(Call::Schedule { delay, timer });
    }

    async fn publish(&mut self, p: Publish<'_>) -> Result<(), HostError> {
        if self.fail_publish {
            return Err(HostError::Spawn(std::io::Error::from_raw_os_error(
                libc::ENOMEM,
            )));
        }
        let live: Vec<u32> = p.tables.live[..p.tables.n_live as usize].to_vec();
        // The invariant: every entry names a slot whose socket is in the array.
        for s in p
            .tables
            .live
            .iter()
            .take(p.tables.n_live as usize)
            .chain(p.tables.buckets.iter())
            .chain(p.tables.cpu.iter())
        {
            assert!(
                *s < self.group_slots,
                "published tables name slot {s}, but the group has {} sockets",
                self.group_slots
            );
        }
        self.calls.push(Call::Publish {
            policy: p.policy,
            live,
        });
        Ok(())
    }

    fn grow(&mut self, from: u32, to: u32) -> Result<(), HostError> {
        assert_eq!(from, self.group_slots);
        if self.fail_grow {
            return Err(HostError::Spawn(std::io::Error::from_raw_os_error(
                libc::EMFILE,
            )));
        }
        self.calls.push(Call::Grow { from, to });
        self.group_slots = to;
        self.depths.resize(to as usize, 0);
        Ok(())
    }

    fn shrink(&mut self, to: u32) {
        assert!(
            self.stored.iter().all(|s| *s < to),
            "closing sockets still in the descriptor store: {:?}",
            self.stored
        );
        self.calls.push(Call::Shrink { to });
        self.group_slots = to;
        self.depths.truncate(to as usize);
        self.migrated += std::mem::take(&mut self.migrate_on_shrink);
    }

    fn evacuate(&mut self, slot: u32) -> Result<Evacuation, HostError> {
        self.calls.push(Call::Evacuate { slot });
        // The queue moves to the live slots.
        if let Some(d) = self.depths.get_mut(slot as usize) {
            *d = 0;
        }
        Ok(self.evacuation.clone())
    }

    fn check_sockets(&mut self) -> Vec<SocketRepair> {
        self.socket_checks += 1;
        std::mem::take(&mut self.socket_faults)
    }

    fn sample_queues(&mut self) -> Vec<Vec<u32>> {
        self.samples += 1;
        vec![self.depths.clone()]
    }

    fn half_open(&mut self) -> usize {
        self.half_open
    }

    async fn repin(&mut self, plan: Vec<Repin>) -> Option<String> {
        self.calls.push(Call::Repin(plan));
        None
    }

    fn counters(&self) -> Result<Vec<AddressCounters>, HostError> {
        let mut slots = vec![SlotCounters::default(); self.group_slots as usize];
        if let Some(first) = slots.first_mut() {
            first.migrated = self.migrated;
        }
        Ok(vec![AddressCounters {
            addr: self.addresses()[0],
            slots,
            unattributed: SlotCounters::default(),
        }])
    }

    fn program_stats(&self) -> Option<(u64, u64)> {
        None
    }

    fn addresses(&self) -> Vec<SocketAddr> {
        vec![SocketAddr::from(([127, 0, 0, 1], 8080))]
    }

    fn announce(&mut self, line: &str) {
        self.calls.push(Call::Announce(line.to_owned()));
    }

    fn tell_manager(&mut self, text: &str) {
        self.manager.push(text.to_owned());
    }

    fn print_counters(&mut self, slots: &[SlotView]) {
        self.calls.push(Call::PrintCounters(slots.to_vec()));
    }

    fn refuse_new(&mut self, for_at_most: Duration) -> Result<(), HostError> {
        self.calls.push(Call::RefuseNew { for_at_most });
        Ok(())
    }

    fn detach(&mut self) {
        self.calls.push(Call::Detach);
    }
}
