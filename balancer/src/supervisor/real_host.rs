//! The real [`Host`]: worker processes (socket activation, process groups, `waitpid` through
//! tokio), tokio timers, and the socket group together with its steering maps, so that
//! growing, shrinking and evacuating change both or neither.
use std::{
    ffi::OsString,
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use tokio::sync::mpsc;

use super::{
    host::{Event, Host, HostError, Publish, Repin, Timer, WorkerExit},
    slot::Generation,
};
use crate::{
    activation::{self, WorkerLaunch},
    affinity,
    policy::CpuLayout,
    report::{self, SlotView},
    service_manager::ServiceManager,
    socket_group::SocketGroup,
    steering::{AddressCounters, Steering},
};

/// Processes, sockets, maps and timers of one controller.
pub struct RealHost {
    group: SocketGroup,
    steering: Steering,
    command: Vec<OsString>,
    notify_env: String,
    fd_names: String,
    events: mpsc::UnboundedSender<Event>,
    manager: ServiceManager,
}

impl RealHost {
    /// A host for `group` steered by `steering`, starting `command` as workers that report
    /// readiness to `notify_env`; events go to `events`, and `manager` hears how we are.
    pub fn new(
        group: SocketGroup,
        steering: Steering,
        command: Vec<OsString>,
        notify_env: String,
        events: mpsc::UnboundedSender<Event>,
        manager: ServiceManager,
    ) -> Self {
        Self {
            manager,
            fd_names: activation::fd_names(group.addresses.len()),
            group,
            steering,
            command,
            notify_env,
            events,
        }
    }
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

impl Host for RealHost {
    fn now(&self) -> Instant {
        Instant::now()
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
            fd_names: &self.fd_names,
            notify_socket: &self.notify_env,
            cpus: cpus.and_then(|c| cpu_set(slot, c)),
        };
        let mut child = activation::spawn(launch).map_err(HostError::Spawn)?;
        let pid = child.id().ok_or_else(|| {
            HostError::Spawn(io::Error::other(
                "the worker exited before its pid was read",
            ))
        })?;
        let tx = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Event::Exited {
                generation,
                pid,
                how: WorkerExit::from_wait(&status),
            });
        });
        Ok(pid)
    }

    fn signal(&mut self, pid: u32, signal: Signal) {
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

    fn evacuate(&mut self, slot: u32) -> Result<(), HostError> {
        self.group.evacuate(slot).map_err(HostError::Evacuate)?;
        self.steering
            .publish_sockets(&self.group, slot..slot + 1)
            .map_err(HostError::Steering)
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

    fn detach(&mut self) {
        self.steering.detach(&self.group);
    }
}
