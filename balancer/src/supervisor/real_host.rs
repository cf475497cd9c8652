//! The real [`Host`]: worker processes (socket activation, process groups, `waitpid` through
//! tokio), tokio timers, and the socket group together with its steering maps, so that
//! growing, shrinking and evacuating change both or neither.
use std::{
    collections::HashMap,
    ffi::OsString,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use nix::{
    errno::Errno,
    sys::{
        signal::{killpg, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
};

use super::{
    host::{
        Evacuation, Event, Host, HostError, Publish, Repin, SlotSnapshot, SocketRepair, Timer,
        WorkerExit,
    },
    settings::Steer,
    slot::Generation,
};
use crate::{
    activation::{self, SocketProtocol, WorkerLaunch},
    affinity, fd_store, group_repair,
    group_state::{self, GroupRecord, ProcessId, SlotRecord, WorkerRecord, RECORD_VERSION},
    handover::SocketFd,
    policy::CpuLayout,
    report::{self, SlotView},
    service_manager::ServiceManager,
    socket_group::SocketGroup,
    steering::{AddressCounters, Steering},
};

/// How the host starts workers, and the ones it inherits.
pub struct Workers {
    /// The worker program and its arguments.
    pub command: Vec<OsString>,
    /// `NOTIFY_SOCKET` for the workers.
    pub notify_env: String,
    /// Pidfds of the workers a dead controller left (adopted at start).
    pub adopted: Vec<(u32, OwnedFd)>,
    /// Who the workers run as (`--user`).
    pub credentials: Option<crate::credentials::Credentials>,
    /// How the workers are told of their sockets.
    pub protocol: SocketProtocol,
}

/// Processes, sockets, maps and timers of one controller.
pub struct RealHost {
    group: SocketGroup,
    steering: Steering,
    command: Vec<OsString>,
    credentials: Option<crate::credentials::Credentials>,
    protocol: SocketProtocol,
    notify_env: String,
    fd_names: String,
    events: mpsc::UnboundedSender<Event>,
    manager: ServiceManager,
    /// Our children that are workers, by pid: the reaper turns their exits into events.
    children: HashMap<u32, Generation>,
    /// Pidfds of the workers adopted at start, until the supervisor watches them.
    adopted: HashMap<u32, OwnedFd>,
    /// A second pidfd of each watched adopted worker: it is not our child, so its pid is free
    /// for reuse the moment it exits; a signal goes out only while this says it runs.
    adopted_alive: HashMap<u32, OwnedFd>,
    /// Start times of the workers, for the record (a pid alone could be reused).
    start_times: HashMap<u32, u64>,
    /// Where the group's record goes, and the last one written.
    record_dir: PathBuf,
    record: Option<GroupRecord>,
    me: Option<ProcessId>,
}

impl RealHost {
    /// A host for `group` steered by `steering`, starting `workers`; events go to `events`,
    /// `manager` hears how we are, and the group's record is kept in `record_dir`.
    pub fn new(
        group: SocketGroup,
        steering: Steering,
        workers: Workers,
        events: mpsc::UnboundedSender<Event>,
        manager: ServiceManager,
        record_dir: PathBuf,
    ) -> Self {
        let Workers {
            command,
            notify_env,
            adopted,
            credentials,
            protocol,
        } = workers;
        Self {
            manager,
            children: HashMap::new(),
            start_times: adopted
                .iter()
                .filter_map(|(pid, _)| Some((*pid, group_state::start_time(*pid)?)))
                .collect(),
            adopted: adopted.into_iter().collect(),
            adopted_alive: HashMap::new(),
            record_dir,
            record: None,
            me: ProcessId::of(std::process::id()),
            fd_names: activation::fd_names(group.addresses.len()),
            group,
            steering,
            command,
            credentials,
            protocol,
            notify_env,
            events,
        }
    }
}

/// Kills what is left of a dead worker's process group (an nginx master killed with -9 leaves
/// its worker processes running): they would hold the slot's sockets outside supervision,
/// never signalled again, even after the controller stops. Called right after the leader is
/// reaped: while any member lives its pid cannot be reused, and with none left this is ESRCH.
fn kill_orphans(leader: u32) {
    match killpg(Pid::from_raw(leader as i32), Signal::SIGKILL) {
        Ok(()) => warn!(
            "worker pid {leader} left processes of its group running after it exited: SIGKILL to them"
        ),
        Err(Errno::ESRCH) => {}
        Err(e) => warn!("SIGKILL to what is left of worker pid {leader}'s process group: {e}"),
    }
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable then).
fn exited(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

/// The kernel's CPU set for `cpus`, warning about offline CPUs; `None` (run unpinned) when
/// the set cannot be built.
fn cpu_set(slot: u32, cpus: &[u32]) -> Option<nix::sched::CpuSet> {
    if let Ok(now) = CpuLayout::detect() {
        let offline: Vec<u32> = cpus
            .iter()
            .copied()
            .filter(|c| !now.online().contains(c))
            .collect();
        if !offline.is_empty() {
            warn!("slot {slot}: its CPU(s) {offline:?} are offline; the worker runs unpinned where pinning fails");
        }
    }
    match affinity::cpu_set(cpus) {
        Ok(set) => Some(set),
        Err(e) => {
            warn!("slot {slot}: cannot pin to CPU(s) {cpus:?}: {e}; the worker runs unpinned");
            None
        }
    }
}

impl RealHost {
    /// Collects every child that exited: a worker's exit becomes an event; anything else
    /// (a worker's orphaned child, reparented to us as their subreaper) is just reaped.
    pub fn reap(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let (pid, how) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, WorkerExit::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    (pid, WorkerExit::Signal(signal as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return events,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("reaping children: {e}");
                    return events;
                }
            };
            let pid = pid.as_raw() as u32;
            if let Some(generation) = self.children.remove(&pid) {
                self.start_times.remove(&pid);
                kill_orphans(pid);
                events.push(Event::Exited {
                    generation,
                    pid,
                    how,
                });
            }
        }
    }

    /// Where the group's record is kept.
    pub fn record_dir(&self) -> &std::path::Path {
        &self.record_dir
    }

    /// Whether we are still taking over from an old controller (READY=1 not yet sent).
    pub fn handing_over(&self) -> bool {
        self.manager.handing_over()
    }

    /// Forgets which record was written, so that the next save writes it whatever it holds
    /// (a successor may have written its own meanwhile).
    pub fn rewrite_record(&mut self) {
        self.record = None;
    }

    /// Where this controller's copies of the group's sockets are (for a successor to take).
    pub fn socket_fds(&self) -> Vec<SocketFd> {
        use std::os::fd::AsRawFd;
        self.group
            .addresses
            .iter()
            .enumerate()
            .flat_map(|(address, a)| {
                (0u32..).zip(&a.sockets).map(move |(slot, s)| SocketFd {
                    slot,
                    address,
                    fd: s.as_raw_fd(),
                })
            })
            .collect()
    }

    /// Takes every socket out of the socket arrays (an upgrade's successor puts them in its
    /// own).
    pub fn withdraw_sockets(&mut self) {
        self.steering.withdraw_sockets();
    }

    /// Attaches this controller's program again and publishes every socket (a handover that
    /// failed).
    pub fn reclaim_steering(&mut self) -> Result<(), HostError> {
        self.steering
            .reclaim(&self.group)
            .map_err(HostError::Steering)
    }

    /// A slot's sockets changed (one was recreated): the descriptor store gets the new ones.
    fn restore_sockets(&mut self, slot: u32) {
        self.unstore_sockets(slot..slot + 1);
        self.store_sockets(slot..slot + 1);
    }

    /// Removes the group's record: a deliberate shutdown leaves nothing to adopt.
    pub fn forget_record(&mut self) {
        GroupRecord::remove(&self.record_dir);
        self.record = None;
    }
}

impl Host for RealHost {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn cpu_time(&self) -> Duration {
        // SAFETY: getrusage fills the struct it is given; zeroed is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer; it cannot fail with these arguments.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return Duration::ZERO;
        }
        let time = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        time(usage.ru_utime) + time(usage.ru_stime)
    }

    fn spawn(
        &mut self,
        slot: u32,
        generation: Generation,
        cpus: Option<&[u32]>,
    ) -> Result<u32, HostError> {
        let launch = WorkerLaunch {
            command: &self.command,
            slot,
            sockets: self.group.slot_sockets(slot),
            protocol: self.protocol,
            fd_names: &self.fd_names,
            notify_socket: &self.notify_env,
            cpus: cpus.and_then(|c| cpu_set(slot, c)),
            credentials: self.credentials.as_ref(),
        };
        let pid = activation::spawn(launch).map_err(|e| match &self.credentials {
            Some(c) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                HostError::Spawn(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e} as --user uid {} gid {}: the controller needs CAP_SETUID, CAP_SETGID and CAP_SETPCAP to drop to it, and that user must be able to execute the worker command (and this binary, the trampoline)",
                        c.uid, c.gid
                    ),
                ))
            }
            _ => HostError::Spawn(e),
        })?;
        // Not reaped before the reaper runs on this same thread: the pid stays ours until then.
        self.children.insert(pid, generation);
        if let Some(t) = group_state::start_time(pid) {
            self.start_times.insert(pid, t);
        }
        Ok(pid)
    }

    fn watch_adopted(&mut self, slot: u32, generation: Generation, pid: u32) {
        let Some(pidfd) = self.adopted.remove(&pid) else {
            warn!("slot {slot}: adopted worker pid {pid} has no pidfd: its exit will not be seen");
            return;
        };
        match pidfd.try_clone() {
            Ok(second) => {
                self.adopted_alive.insert(pid, second);
            }
            Err(e) => warn!("slot {slot}: adopted worker pid {pid}: {e}"),
        }
        // SAFETY: the AsyncFd owns the pidfd, which stays open and unchanged until it is dropped.
        let watch = match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!("slot {slot}: watching adopted worker pid {pid}: {e}");
                return;
            }
        };
        let tx = self.events.clone();
        tokio::spawn(async move {
            // A pidfd turns readable when its process exits.
            let _ = watch.readable().await;
            // What it leaves of its group holds the slot's sockets, as a child's would.
            kill_orphans(pid);
            let _ = tx.send(Event::Exited {
                generation,
                pid,
                how: WorkerExit::Unknown(
                    "exited (adopted from an earlier controller: its status is not known)".into(),
                ),
            });
        });
    }

    fn store_sockets(&mut self, slots: std::ops::Range<u32>) {
        use std::os::fd::AsFd;
        for (j, a) in self.group.addresses.iter().enumerate() {
            for slot in slots.clone() {
                if let Some(s) = a.sockets.get(slot as usize) {
                    self.manager.store_fd(&fd_store::name(slot, j), s.as_fd());
                }
            }
        }
    }

    fn unstore_sockets(&mut self, slots: std::ops::Range<u32>) {
        for j in 0..self.group.addresses.len() {
            for slot in slots.clone() {
                self.manager.remove_fd(&fd_store::name(slot, j));
            }
        }
    }

    fn save_record(&mut self, slots: &[SlotSnapshot], steer: &Steer) {
        let Some(me) = self.me else { return };
        let record = GroupRecord {
            version: RECORD_VERSION,
            controller: me,
            listen: self.addresses(),
            slots: slots
                .iter()
                .map(|s| SlotRecord {
                    worker: s.pid.and_then(|pid| {
                        Some(WorkerRecord {
                            process: ProcessId {
                                pid,
                                start_time: *self.start_times.get(&pid)?,
                            },
                            ready: s.ready,
                        })
                    }),
                    drained: s.drained,
                    restarts: s.restarts,
                    others: s
                        .others
                        .iter()
                        .filter_map(|pid| {
                            Some(ProcessId {
                                pid: *pid,
                                start_time: *self.start_times.get(pid)?,
                            })
                        })
                        .collect(),
                })
                .collect(),
            policy: steer.policy.into(),
            spill_depth: steer.spill_depth,
            weights: steer.weights.clone(),
        };
        if self.record.as_ref() == Some(&record) {
            return;
        }
        match record.save(&self.record_dir) {
            Ok(()) => self.record = Some(record),
            Err(e) => warn!("keeping the group's record for a successor: {e}"),
        }
    }

    fn signal(&mut self, pid: u32, signal: Signal) {
        if let Some(pidfd) = self.adopted_alive.get(&pid) {
            if exited(pidfd) {
                // Its exit event is on its way; its pid may name another process already.
                self.adopted_alive.remove(&pid);
                return;
            }
        }
        // A worker leads its own process group: this reaches its children too.
        if let Err(e) = killpg(Pid::from_raw(pid as i32), signal) {
            warn!("{signal} to worker pid {pid}: {e}");
        }
    }

    fn schedule(&mut self, delay: Duration, timer: Timer) {
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Timer(timer));
        });
    }

    async fn publish(&mut self, p: Publish<'_>) -> Result<(), HostError> {
        self.steering
            .publish(p.policy, p.spill_depth, p.tables)
            .await
            .map_err(HostError::Steering)
    }

    fn grow(&mut self, from: u32, to: u32) -> Result<(), HostError> {
        if let Err(e) = self.group.grow(to) {
            self.group.truncate(from);
            return Err(HostError::Sockets(e));
        }
        if let Err(e) = self.steering.add_slots(&self.group, to) {
            self.steering.remove_slots(from);
            self.group.truncate(from);
            return Err(HostError::Steering(e));
        }
        Ok(())
    }

    fn shrink(&mut self, to: u32) {
        self.group.truncate(to);
        self.steering.remove_slots(to);
    }

    fn evacuate(&mut self, slot: u32) -> Result<Evacuation, HostError> {
        let evacuation = group_repair::evacuate(&mut self.group, &mut self.steering, slot);
        if evacuation.recreated {
            self.restore_sockets(slot);
        }
        Ok(evacuation)
    }

    fn check_sockets(&mut self) -> Vec<SocketRepair> {
        if self.handing_over() {
            // The old controller's arrays still hold the sockets, and its program may still
            // be attached: nothing here is ours to repair yet.
            return Vec::new();
        }
        let repairs = group_repair::check(&mut self.group, &mut self.steering);
        let recreated: std::collections::BTreeSet<u32> = repairs
            .iter()
            .filter(|r| r.replaced)
            .map(|r| r.slot)
            .collect();
        for slot in recreated {
            self.restore_sockets(slot);
        }
        repairs
    }

    fn half_open(&mut self) -> usize {
        crate::proc_net::half_open(&self.addresses())
    }

    fn sample_queues(&mut self) -> Vec<Vec<u32>> {
        let depths = self.group.depths();
        self.steering.write_depths(&depths);
        depths
    }

    async fn repin(&mut self, plan: Vec<Repin>) -> Option<String> {
        let mut sets = Vec::new();
        let mut who = Vec::new();
        for r in plan {
            match affinity::cpu_set(&r.cpus) {
                Ok(set) => {
                    sets.push((r.pid, set));
                    who.push(r);
                }
                Err(e) => warn!("slot {}: cannot pin to CPU(s) {:?}: {e}", r.slot, r.cpus),
            }
        }
        if sets.is_empty() {
            return None;
        }
        // Reading /proc for every process on the host is blocking work.
        let moved = match tokio::task::spawn_blocking(move || affinity::repin_groups(&sets)).await {
            Ok(Ok(moved)) => moved,
            Ok(Err(e)) => {
                let note = format!("the workers keep their old CPUs: reading /proc: {e}");
                warn!("{note}");
                return Some(note);
            }
            Err(e) => {
                let note = format!("the workers keep their old CPUs: the re-pin task failed: {e}");
                warn!("{note}");
                return Some(note);
            }
        };
        let mut failed = Vec::new();
        for (Repin { slot, pid, cpus }, done) in who.iter().zip(moved) {
            if let Some((tid, e)) = done.refused.first() {
                warn!(
                    "slot {slot}: worker pid {pid}: {} thread(s) (first: {tid}, {e}) stay off CPU(s) {cpus:?}; EINVAL: those CPUs are offline or outside the worker's cpuset; EPERM: the worker changed its uid",
                    done.refused.len()
                );
                failed.push(*pid);
            } else if done.threads == 0 {
                warn!("slot {slot}: worker pid {pid}: no process of its process group found; not re-pinned to CPU(s) {cpus:?}");
                failed.push(*pid);
            } else {
                info!(
                    "slot {slot}: worker pid {pid} ({} thread(s)) re-pinned to CPU(s) {cpus:?}",
                    done.threads
                );
            }
        }
        (!failed.is_empty()).then(|| {
            format!(
                "worker(s) {failed:?} could not be fully re-pinned to their new CPUs (see the log)"
            )
        })
    }

    fn counters(&self) -> Result<Vec<AddressCounters>, HostError> {
        self.steering.counters().map_err(HostError::Steering)
    }

    fn program_stats(&self) -> Option<(u64, u64)> {
        self.steering.program_stats()
    }

    fn addresses(&self) -> Vec<SocketAddr> {
        self.group.addresses.iter().map(|a| a.addr).collect()
    }

    fn announce(&mut self, line: &str) {
        report::line(line);
    }

    fn tell_manager(&mut self, text: &str) {
        self.manager.send(text);
    }

    fn print_counters(&mut self, slots: &[SlotView]) {
        match self.steering.counters() {
            Ok(counters) => report::counters(&counters, slots),
            Err(e) => error!("reading the steering counters: {e}"),
        }
    }

    fn refuse_new(&mut self, for_at_most: Duration) -> Result<(), HostError> {
        self.steering
            .refuse_new(for_at_most)
            .map_err(HostError::Steering)
    }

    fn detach(&mut self) {
        self.steering.detach(&self.group);
    }
}
