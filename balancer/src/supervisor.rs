//! Worker supervision and runtime control.
//!
//! One worker per slot, respawned on the same socket when it dies; rolling restarts, scaling,
//! drains and policy changes asked for over the control socket. Every change of which slots
//! take new connections is published to the steering tables at once.
use std::{
    collections::VecDeque,
    ffi::OsString,
    io,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::Context;
use balancer_common::{PolicyKind, MAX_SLOTS};
use log::{error, info, warn};
use nix::{
    sched::CpuSet,
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use crate::{
    activation::{self, WorkerLaunch},
    affinity,
    control::{
        protocol::{
            ErrorKind, ErrorReply, Outcome, PolicyName, PolicyReport, Reply, Request, SlotState,
            SlotStatus, StatusReport,
        },
        server::Command,
    },
    notify::{Notification, NotifySocket},
    policy::{build_tables, cpu_overflow, describe, weights_void, CpuLayout},
    report::{self, SlotView},
    socket_group::SocketGroup,
    stall::{StallConfig, StallWatch, Transition},
    steering::Steering,
};

/// First respawn delay of a crash loop; it doubles with every quick exit in a row.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest respawn delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting is respawned at once, its crash streak forgotten.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// After SIGKILL on shutdown, how long to wait for the exits to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// What the supervisor is told to run.
pub struct SupervisorConfig {
    /// Worker program (resolved) and arguments.
    pub command: Vec<OsString>,
    /// Number of slots at start.
    pub slots: u32,
    /// Policy at start.
    pub policy: PolicyKind,
    /// CPU layout the tables are built for.
    pub layout: CpuLayout,
    /// Pin workers to their CPUs.
    pub pin_workers: bool,
    /// How long to wait for READY=1.
    pub ready_timeout: Duration,
    /// SIGTERM → SIGKILL grace, on shutdown and for replaced workers.
    pub grace: Duration,
    /// Whether kernel BPF run-time statistics are on.
    pub bpf_stats: bool,
    /// Spill depth for the cpu and hash policies (0: off).
    pub spill_depth: u32,
    /// How often accept-queue depths are sampled.
    pub sample_interval: Duration,
    /// Stall detection timeout.
    pub stall_timeout: Duration,
    /// Evacuate stalled slots' queues.
    pub evacuate: bool,
    /// Kill workers stalled this long.
    pub kill_stalled: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
struct Worker {
    pid: u32,
    generation: u64,
    since: Instant,
    ready: bool,
}

#[derive(Default)]
struct Slot {
    /// The worker serving the slot (ready or starting).
    current: Option<Worker>,
    /// During a rolling restart: the new worker, not yet ready, on the same socket.
    successor: Option<Worker>,
    /// Replaced workers told to stop, finishing what they accepted.
    retiring: Vec<Worker>,
    /// Dead, waiting for its respawn (token = the pending respawn timer).
    backoff_token: Option<u64>,
    /// Taken out of the tables by the operator.
    drained: bool,
    /// Being scaled away.
    removing: bool,
    restarts: u32,
    quick_exits: u32,
    /// Stall detection on the slot's accept queue.
    stall: StallWatch,
}

impl Slot {
    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.current
            .iter()
            .chain(self.successor.iter())
            .chain(self.retiring.iter())
    }

    fn live(&self) -> bool {
        self.current.is_some_and(|w| w.ready)
            && !self.drained
            && !self.removing
            && !self.stall.is_stalled()
    }

    fn state(&self) -> SlotState {
        match (self.current, self.removing) {
            (_, true) => SlotState::Removing,
            (Some(_), _) if self.stall.is_stalled() => SlotState::Stalled,
            (Some(w), _) if w.ready && self.drained => SlotState::Draining,
            (Some(w), _) if w.ready => SlotState::Ready,
            (Some(_), _) => SlotState::Starting,
            (None, _) if self.backoff_token.is_some() => SlotState::BackingOff,
            (None, _) => SlotState::Down,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Current,
    Successor,
    Retiring,
}

enum Event {
    Exited {
        generation: u64,
        pid: u32,
        status: io::Result<ExitStatus>,
    },
    ReadyTimeout {
        generation: u64,
    },
    Respawn {
        slot: u32,
        token: u64,
    },
    GraceOver {
        generation: u64,
    },
}

/// A change that takes more than one step; at most one runs at a time.
enum Operation {
    Restart {
        queue: VecDeque<u32>,
        slot: Option<u32>,
        done: Vec<String>,
        reply: Option<oneshot::Sender<Outcome>>,
    },
    ScaleUp {
        waiting: Vec<u32>,
        target: u32,
        /// What the reply adds (weights reset, cpu-policy warning).
        note: String,
        reply: oneshot::Sender<Outcome>,
    },
    ScaleDown {
        target: u32,
        note: String,
        reply: oneshot::Sender<Outcome>,
    },
}

/// Supervises the workers of a socket group and serves control requests.
pub struct Supervisor {
    config: SupervisorConfig,
    group: SocketGroup,
    steering: Steering,
    notify_env: String,
    fd_names: String,
    slots: Vec<Slot>,
    weights: Option<Vec<u32>>,
    events: mpsc::UnboundedSender<Event>,
    next_generation: u64,
    op: Option<Operation>,
    stopping: bool,
    announced_ready: bool,
    started: Instant,
    /// Time spent sampling queue depths, for `status`.
    sampling_spent: Duration,
    /// The last sample: accept-queue depth per slot, summed over the addresses.
    depths: Vec<u32>,
}

impl Supervisor {
    /// Runs the group: starts every worker, supervises them, serves `commands`, and stops the
    /// workers in order on SIGTERM/SIGINT. Returns after every worker has exited.
    pub async fn run(
        config: SupervisorConfig,
        group: SocketGroup,
        steering: Steering,
        mut commands: mpsc::Receiver<Command>,
    ) -> anyhow::Result<()> {
        let notify = NotifySocket::bind().context("creating the NOTIFY_SOCKET for workers")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut sup = Self {
            fd_names: activation::fd_names(group.addresses.len()),
            notify_env: notify.env_value().to_owned(),
            slots: (0..config.slots).map(|_| Slot::default()).collect(),
            config,
            group,
            steering,
            weights: None,
            events: tx,
            next_generation: 0,
            op: None,
            stopping: false,
            announced_ready: false,
            started: Instant::now(),
            sampling_spent: Duration::ZERO,
            depths: Vec::new(),
        };
        let mut tick = tokio::time::interval(sup.config.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        for slot in 0..sup.config.slots {
            sup.spawn(slot, Role::Current);
        }
        loop {
            tokio::select! {
                Some(event) = rx.recv() => sup.handle(event).await,
                msg = notify.recv() => match msg {
                    Ok(msg) => sup.on_notify(msg).await,
                    Err(e) => warn!("reading NOTIFY_SOCKET: {e}"),
                },
                Some((request, reply)) = commands.recv() => sup.on_request(request, reply).await,
                _ = tick.tick() => sup.sample().await,
                _ = term.recv() => { info!("SIGTERM: stopping workers"); break; }
                _ = int.recv() => { info!("SIGINT: stopping workers"); break; }
                _ = hup.recv() => {
                    info!("SIGHUP: rolling restart of every slot");
                    if let Err((e, _)) = sup.start_restart(None, None) {
                        warn!("SIGHUP ignored: {e}");
                    }
                }
                _ = usr1.recv() => sup.print_report(),
            }
        }
        sup.shutdown(&mut rx).await;
        Ok(())
    }

    fn spawn(&mut self, slot: u32, role: Role) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let cpus = if self.config.pin_workers {
            self.cpu_set(slot)
        } else {
            None
        };
        let launch = WorkerLaunch {
            command: &self.config.command,
            slot,
            sockets: self.group.slot_sockets(slot),
            fd_names: &self.fd_names,
            notify_socket: &self.notify_env,
            cpus,
        };
        let spawned = activation::spawn(launch).and_then(|child| {
            let pid = child
                .id()
                .ok_or_else(|| io::Error::other("the worker exited before its pid was read"))?;
            Ok((child, pid))
        });
        let (mut child, pid) = match spawned {
            Ok(x) => x,
            Err(e) => {
                error!("slot {slot}: cannot start a worker: {e}");
                match role {
                    Role::Successor => self.restart_failed(slot, &format!("cannot start ({e})")),
                    _ => {
                        self.scale_up_failed(slot, &format!("its worker cannot start ({e})"));
                        self.after_exit(slot, Duration::ZERO);
                    }
                }
                return;
            }
        };
        let worker = Worker {
            pid,
            generation,
            since: Instant::now(),
            ready: false,
        };
        let s = &mut self.slots[slot as usize];
        match role {
            Role::Successor => s.successor = Some(worker),
            _ => s.current = Some(worker),
        }
        info!(
            "slot {slot}: started {}worker pid {pid}",
            if role == Role::Successor { "new " } else { "" }
        );
        let tx = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Event::Exited {
                generation,
                pid,
                status,
            });
        });
        self.after(
            self.config.ready_timeout,
            Event::ReadyTimeout { generation },
        );
    }

    /// With `--pin-workers`, after the layout went from `old` to `new` slots: moves the running
    /// workers of the slots whose CPUs changed (a scale changes which CPUs each slot's
    /// connections come from). Returns a note for the operator when some could not be moved.
    async fn repin_workers(&self, old: u32, new: u32) -> Option<String> {
        if !self.config.pin_workers {
            return None;
        }
        let layout = &self.config.layout;
        let mut plan = Vec::new();
        let mut who = Vec::new();
        for slot in 0..old.min(new) {
            let cpus = layout.pinned_cpus(slot, new);
            if cpus == layout.pinned_cpus(slot, old) {
                continue;
            }
            let set = match affinity::cpu_set(&cpus) {
                Ok(set) => set,
                Err(e) => {
                    warn!("slot {slot}: cannot pin to CPU(s) {cpus:?}: {e}");
                    continue;
                }
            };
            for w in self.slots[slot as usize].workers() {
                plan.push((w.pid, set));
                who.push((slot, w.pid, cpus.clone()));
            }
        }
        if plan.is_empty() {
            return None;
        }
        // Reading /proc for every process on the host is blocking work.
        let moved = match tokio::task::spawn_blocking(move || affinity::repin_groups(&plan)).await {
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
        for ((slot, pid, cpus), done) in who.iter().zip(moved) {
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

    fn cpu_set(&self, slot: u32) -> Option<CpuSet> {
        let pinned = self.config.layout.pinned_cpus(slot, self.layout_slots());
        if let Ok(now) = CpuLayout::detect() {
            let offline: Vec<u32> = pinned
                .iter()
                .copied()
                .filter(|c| !now.online().contains(c))
                .collect();
            if !offline.is_empty() {
                warn!("slot {slot}: its CPU(s) {offline:?} are offline; the worker runs unpinned where pinning fails");
            }
        }
        match affinity::cpu_set(&pinned) {
            Ok(set) => Some(set),
            Err(e) => {
                warn!(
                    "slot {slot}: cannot pin to CPU(s) {pinned:?}: {e}; the worker runs unpinned"
                );
                None
            }
        }
    }

    /// The slot count that pinning follows: every slot but those a scale-down is removing (always
    /// the last ones), so that the survivors take over the removed slots' CPUs at once.
    fn layout_slots(&self) -> u32 {
        self.slots.iter().filter(|s| !s.removing).count() as u32
    }

    fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    fn after(&self, delay: Duration, event: Event) {
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    fn find(&self, generation: u64) -> Option<(u32, Role)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            let role = if s.current.is_some_and(|w| w.generation == generation) {
                Role::Current
            } else if s.successor.is_some_and(|w| w.generation == generation) {
                Role::Successor
            } else if s.retiring.iter().any(|w| w.generation == generation) {
                Role::Retiring
            } else {
                return None;
            };
            Some((i as u32, role))
        })
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Exited {
                generation,
                pid,
                status,
            } => self.on_exit(generation, pid, &status).await,
            Event::ReadyTimeout { generation } => {
                let why = format!(
                    "no READY=1 within {}, taken as ready",
                    humantime::format_duration(self.config.ready_timeout)
                );
                self.mark_ready(generation, &why).await;
            }
            Event::Respawn { slot, token } => {
                let Some(s) = self.slots.get_mut(slot as usize) else {
                    return;
                };
                if !self.stopping && !s.removing && s.backoff_token == Some(token) {
                    s.backoff_token = None;
                    self.spawn(slot, Role::Current);
                }
            }
            Event::GraceOver { generation } => {
                if let Some((slot, Role::Retiring)) = self.find(generation) {
                    let s = &self.slots[slot as usize];
                    if let Some(w) = s.retiring.iter().find(|w| w.generation == generation) {
                        warn!(
                            "slot {slot}: old worker pid {} still running after the {} grace: SIGKILL",
                            w.pid,
                            humantime::format_duration(self.config.grace)
                        );
                        signal_worker(w.pid, Signal::SIGKILL);
                    }
                }
            }
        }
    }

    async fn on_exit(&mut self, generation: u64, pid: u32, status: &io::Result<ExitStatus>) {
        let Some((slot, role)) = self.find(generation) else {
            return;
        };
        let reason = describe_exit(status);
        let s = &mut self.slots[slot as usize];
        let worker = match role {
            Role::Current => s.current.take(),
            Role::Successor => s.successor.take(),
            Role::Retiring => {
                let i = s.retiring.iter().position(|w| w.generation == generation);
                i.map(|i| s.retiring.remove(i))
            }
        };
        let Some(worker) = worker else { return };
        if role == Role::Current {
            s.stall.reset();
        }
        if self.stopping || role == Role::Retiring || s.removing {
            info!("slot {slot}: worker pid {pid} {reason}");
            if s.removing {
                self.finish_scale_down().await;
            }
            return;
        }
        let lived = worker.since.elapsed();
        warn!(
            "slot {slot}: {}worker pid {pid} {reason} after {}",
            if role == Role::Successor { "new " } else { "" },
            humantime::format_duration(round_ms(lived))
        );
        match role {
            Role::Current => {
                if worker.ready {
                    // First take the slot's share away: its socket stays open, and what is
                    // queued on it waits for the successor.
                    self.publish().await;
                }
                self.scale_up_failed(slot, &format!("its worker pid {pid} {reason}"));
                if self.slots[slot as usize].successor.is_some() {
                    info!("slot {slot}: the new worker takes over when ready");
                } else {
                    self.after_exit(slot, lived);
                }
            }
            Role::Successor => {
                self.restart_failed(
                    slot,
                    &format!("the new worker pid {pid} {reason} before it was ready"),
                );
                if self.slots[slot as usize].current.is_none() {
                    self.after_exit(slot, lived);
                }
            }
            Role::Retiring => {}
        }
    }

    /// Schedules the respawn of a slot whose worker died after running `lived`.
    fn after_exit(&mut self, slot: u32, lived: Duration) {
        self.next_generation += 1;
        let token = self.next_generation;
        let s = &mut self.slots[slot as usize];
        s.restarts += 1;
        s.quick_exits = if lived >= STABLE_AFTER {
            0
        } else {
            s.quick_exits + 1
        };
        let delay = backoff(s.quick_exits);
        if s.quick_exits >= 3 {
            warn!(
                "slot {slot}: crash loop ({} quick exits in a row); next start in {}",
                s.quick_exits,
                humantime::format_duration(delay)
            );
        } else {
            info!(
                "slot {slot}: respawning in {}",
                humantime::format_duration(delay)
            );
        }
        if delay.is_zero() {
            self.spawn(slot, Role::Current);
        } else {
            s.backoff_token = Some(token);
            self.after(delay, Event::Respawn { slot, token });
        }
    }

    async fn on_notify(&mut self, msg: Notification) {
        if !msg.is_ready() {
            return;
        }
        let Some(pid) = msg.pid else { return };
        let generation = self.slots.iter().find_map(|s| {
            s.current
                .iter()
                .chain(s.successor.iter())
                .find(|w| w.pid as i32 == pid)
                .map(|w| w.generation)
        });
        if let Some(generation) = generation {
            self.mark_ready(generation, "READY=1").await;
        }
    }

    async fn mark_ready(&mut self, generation: u64, why: &str) {
        let Some((slot, role)) = self.find(generation) else {
            return;
        };
        let s = &mut self.slots[slot as usize];
        match role {
            Role::Current => {
                let Some(w) = s.current.as_mut().filter(|w| !w.ready) else {
                    return;
                };
                w.ready = true;
                info!("slot {slot}: worker pid {} ready ({why})", w.pid);
                self.publish().await;
                self.scale_up_progress(slot);
            }
            Role::Successor => {
                let Some(mut new) = s.successor.take() else {
                    return;
                };
                new.ready = true;
                let old = s.current.replace(new);
                s.restarts += 1;
                info!("slot {slot}: new worker pid {} ready ({why})", new.pid);
                let old_pid = old.map(|w| w.pid);
                if let Some(old) = old {
                    self.retire(slot, old);
                }
                self.publish().await;
                self.restart_progress(slot, old_pid, new.pid);
            }
            Role::Retiring => return,
        }
        if !self.announced_ready
            && self
                .slots
                .iter()
                .all(|s| s.current.is_some_and(|w| w.ready))
        {
            self.announced_ready = true;
            report::line(&format!("ready: {} workers", self.slots.len()));
        }
    }

    /// Tells a replaced worker to stop: it finishes what it accepted while its successor
    /// accepts from the same queue; SIGKILL after the grace.
    fn retire(&mut self, slot: u32, worker: Worker) {
        info!("slot {slot}: SIGTERM to old worker pid {}", worker.pid);
        signal_worker(worker.pid, Signal::SIGTERM);
        self.slots[slot as usize].retiring.push(worker);
        self.after(
            self.config.grace,
            Event::GraceOver {
                generation: worker.generation,
            },
        );
    }

    fn live(&self) -> Vec<bool> {
        self.slots.iter().map(Slot::live).collect()
    }

    /// Samples every accept queue: the load signal for the program, and stall detection.
    async fn sample(&mut self) {
        let started = Instant::now();
        let depths = self.group.depths();
        self.steering.write_depths(&depths);
        self.sampling_spent += started.elapsed();
        let cfg = StallConfig {
            timeout: self.config.stall_timeout,
            kill_after: self.config.kill_stalled,
        };
        let now = Instant::now();
        let mut changed = false;
        let mut evacuate = Vec::new();
        self.depths = (0..self.slots.len())
            .map(|i| depths.iter().filter_map(|a| a.get(i)).sum())
            .collect();
        for (i, s) in self.slots.iter_mut().enumerate() {
            let depth = self.depths[i];
            let eligible = s.current.is_some_and(|w| w.ready)
                && !s.removing
                && !self.config.stall_timeout.is_zero();
            match s.stall.observe(depth, now, eligible, &cfg) {
                Transition::None => {}
                Transition::Stalled { depth } => {
                    warn!(
                        "slot {i}: stalled (queue of {depth} did not shrink for {}); out of the tables",
                        humantime::format_duration(cfg.timeout)
                    );
                    changed = true;
                    evacuate.push(i as u32);
                }
                Transition::Evacuate => evacuate.push(i as u32),
                Transition::Rejoined { after } => {
                    info!(
                        "slot {i}: queue drained; back in the tables after {}",
                        humantime::format_duration(round_ms(after))
                    );
                    changed = true;
                }
                Transition::Kill => {
                    if let Some(w) = s.current {
                        warn!(
                            "slot {i}: stalled for {}: SIGKILL to worker pid {} (--kill-stalled)",
                            humantime::format_duration(cfg.kill_after.unwrap_or_default()),
                            w.pid
                        );
                        signal_worker(w.pid, Signal::SIGKILL);
                    }
                }
            }
        }
        if changed {
            self.publish().await;
        }
        if self.config.evacuate {
            for slot in evacuate {
                self.evacuate(slot);
            }
        }
    }

    /// Moves what is queued on a stalled slot to live slots (never when no other slot is live:
    /// the kernel would have nowhere to put the connections).
    fn evacuate(&mut self, slot: u32) {
        let others_live = self
            .slots
            .iter()
            .enumerate()
            .any(|(i, s)| i as u32 != slot && s.live());
        if !others_live {
            warn!("slot {slot}: not evacuated: no other slot is live");
            return;
        }
        let before = self.migrated_total();
        let result = self
            .group
            .evacuate(slot)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.steering
                    .publish_sockets(&self.group, slot..slot + 1)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            error!("slot {slot}: evacuating its queue failed: {e}");
            return;
        }
        self.slots[slot as usize].stall.evacuated(Instant::now());
        let moved = self.migrated_total().saturating_sub(before);
        info!("slot {slot}: evacuated {moved} queued connection(s) to live slots");
    }

    async fn publish(&mut self) {
        let live = self.live();
        if weights_void(&live, self.weights.as_deref()) {
            warn!("every live slot has weight 0: hash shares are equal until a weighted slot is live again");
        }
        let tables = build_tables(
            &self.config.layout,
            self.slot_count(),
            &live,
            self.weights.as_deref(),
        );
        if let Err(e) = self
            .steering
            .publish(self.config.policy, self.config.spill_depth, &tables)
            .await
        {
            // The previous tables stay active; they are valid, just not current.
            error!("publishing the steering tables failed: {e}");
        }
    }

    // ---- control requests ----

    async fn on_request(&mut self, request: Request, reply: oneshot::Sender<Outcome>) {
        if self.stopping {
            let _ = reply.send(Err(ErrorReply::new(
                ErrorKind::Failed,
                "the balancer is shutting down",
            )));
            return;
        }
        let outcome = match request {
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Policy => Ok(Reply::Policy(self.policy_report())),
            Request::SetPolicy {
                policy,
                weights,
                spill_depth,
            } => self.set_policy(policy, weights, spill_depth).await,
            Request::Drain { slot } => self.set_drained(slot, true).await,
            Request::Undrain { slot } => self.set_drained(slot, false).await,
            Request::Restart { slot } => match self.start_restart(slot, Some(reply)) {
                Ok(()) => return,
                Err((e, reply)) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(e));
                    }
                    return;
                }
            },
            Request::Scale { workers } => {
                if let Err((e, reply)) = self.start_scale(workers, reply).await {
                    let _ = reply.send(Err(e));
                }
                return;
            }
        };
        let _ = reply.send(outcome);
    }

    fn check_slot(&self, slot: u32) -> Result<(), ErrorReply> {
        match self.slots.get(slot as usize) {
            None => Err(ErrorReply::new(
                ErrorKind::Invalid,
                format!("there is no slot {slot}: slots are 0..{}", self.slots.len()),
            )),
            Some(s) if s.removing => Err(ErrorReply::new(
                ErrorKind::Busy,
                format!("slot {slot} is being scaled away"),
            )),
            Some(_) => Ok(()),
        }
    }

    fn busy(&self) -> Option<ErrorReply> {
        let what = match self.op.as_ref()? {
            Operation::Restart { .. } => "a rolling restart",
            Operation::ScaleUp { .. } | Operation::ScaleDown { .. } => "a scale change",
        };
        Some(ErrorReply::new(
            ErrorKind::Busy,
            format!("{what} is in progress: try again when it has finished"),
        ))
    }

    async fn set_policy(
        &mut self,
        policy: PolicyName,
        weights: Option<Vec<u32>>,
        spill_depth: Option<u32>,
    ) -> Outcome {
        if let Some(w) = &weights {
            if policy != PolicyName::Hash {
                return Err(ErrorReply::new(
                    ErrorKind::Invalid,
                    "--weights shape the hash table: use them with `policy set hash`",
                ));
            }
            if w.len() != self.slots.len() {
                return Err(ErrorReply::new(
                    ErrorKind::Invalid,
                    format!(
                        "{} weights for {} slots: give one weight per slot",
                        w.len(),
                        self.slots.len()
                    ),
                ));
            }
            if w.iter().all(|x| *x == 0) {
                return Err(ErrorReply::new(
                    ErrorKind::Invalid,
                    "every weight is 0: at least one slot must have a positive weight",
                ));
            }
        }
        let started = Instant::now();
        self.config.policy = policy.into();
        self.weights = weights;
        if let Some(d) = spill_depth {
            self.config.spill_depth = d;
        }
        self.publish().await;
        let took = started.elapsed();
        let spill = match (policy, self.config.spill_depth) {
            (PolicyName::Cpu | PolicyName::Hash, 0) => ", no spill".to_owned(),
            (PolicyName::Cpu | PolicyName::Hash, d) => format!(", spill at queue depth {d}"),
            _ => String::new(),
        };
        let text = format!(
            "policy {policy}{}{spill} published in {} µs",
            self.weights.as_ref().map_or(String::new(), |w| format!(
                " (weights {})",
                w.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            )),
            took.as_micros()
        );
        let text = match (policy, cpu_overflow(&self.config.layout, self.slot_count())) {
            (PolicyName::Cpu, Some(warning)) => {
                warn!("{warning}");
                format!("{text}; warning: {warning}")
            }
            _ => text,
        };
        info!("{text}");
        Ok(Reply::Done { message: text })
    }

    async fn set_drained(&mut self, slot: u32, drained: bool) -> Outcome {
        self.check_slot(slot)?;
        let s = &self.slots[slot as usize];
        if s.drained == drained {
            return Ok(Reply::Done {
                message: format!(
                    "slot {slot} is already {}",
                    if drained { "drained" } else { "in the tables" }
                ),
            });
        }
        if drained
            && self
                .slots
                .iter()
                .enumerate()
                .all(|(i, s)| i as u32 == slot || !s.live())
        {
            return Err(ErrorReply::new(
                ErrorKind::Invalid,
                format!("draining slot {slot} would leave no slot taking new connections: undrain or start another first"),
            ));
        }
        self.slots[slot as usize].drained = drained;
        self.publish().await;
        let pid = self.slots[slot as usize]
            .current
            .map_or("no worker".to_owned(), |w| format!("worker pid {}", w.pid));
        let message = if drained {
            format!("slot {slot} drained: no new connections; its {pid} keeps running and serves what is queued")
        } else {
            format!("slot {slot} undrained: it takes new connections again ({pid})")
        };
        info!("{message}");
        Ok(Reply::Done { message })
    }

    /// Starts a rolling restart of `slot` (or all). `reply` gets the outcome when it ends;
    /// on refusal it is handed back with the error.
    #[allow(clippy::type_complexity)]
    fn start_restart(
        &mut self,
        slot: Option<u32>,
        reply: Option<oneshot::Sender<Outcome>>,
    ) -> Result<(), (ErrorReply, Option<oneshot::Sender<Outcome>>)> {
        if let Some(e) = self.busy() {
            return Err((e, reply));
        }
        let queue: VecDeque<u32> = match slot {
            Some(s) => {
                if let Err(e) = self.check_slot(s) {
                    return Err((e, reply));
                }
                [s].into()
            }
            None => (0..self.slot_count()).collect(),
        };
        self.op = Some(Operation::Restart {
            queue,
            slot: None,
            done: Vec::new(),
            reply,
        });
        self.advance_restart();
        Ok(())
    }

    fn advance_restart(&mut self) {
        loop {
            let Some(Operation::Restart {
                queue, slot, done, ..
            }) = self.op.as_mut()
            else {
                return;
            };
            let Some(next) = queue.pop_front() else {
                let summary = if done.is_empty() {
                    "nothing to restart".to_owned()
                } else {
                    format!("restarted: {}", done.join(", "))
                };
                if let Some(Operation::Restart {
                    reply: Some(reply), ..
                }) = self.op.take()
                {
                    let _ = reply.send(Ok(Reply::Done {
                        message: summary.clone(),
                    }));
                }
                info!("rolling restart done; {summary}");
                return;
            };
            let s = &mut self.slots[next as usize];
            if s.removing {
                continue;
            }
            if s.current.is_none() {
                // Down or backing off: start it now instead of replacing anything.
                done.push(format!("slot {next} (was down)"));
                s.backoff_token = None;
                s.quick_exits = 0;
                self.spawn(next, Role::Current);
                continue;
            }
            *slot = Some(next);
            self.spawn(next, Role::Successor);
            return;
        }
    }

    fn restart_progress(&mut self, slot: u32, old: Option<u32>, new: u32) {
        if let Some(Operation::Restart {
            slot: Some(s),
            done,
            ..
        }) = self.op.as_mut()
        {
            if *s == slot {
                done.push(format!(
                    "slot {slot} pid {} -> {new}",
                    old.map_or("-".into(), |p| p.to_string())
                ));
                self.advance_restart();
            }
        }
    }

    fn restart_failed(&mut self, slot: u32, why: &str) {
        if !matches!(self.op, Some(Operation::Restart { slot: Some(s), .. }) if s == slot) {
            return;
        }
        let Some(Operation::Restart { done, reply, .. }) = self.op.take() else {
            return;
        };
        let old = self.slots[slot as usize].current.map_or(
            "no worker is running; the slot is respawned as usual".to_owned(),
            |w| format!("the old worker (pid {}) keeps serving", w.pid),
        );
        let mut message = format!("rolling restart stopped at slot {slot}: {why}; {old}");
        if !done.is_empty() {
            message.push_str(&format!(" (already restarted: {})", done.join(", ")));
        }
        error!("{message}");
        if let Some(reply) = reply {
            let _ = reply.send(Err(ErrorReply::new(ErrorKind::Failed, message)));
        }
    }

    async fn start_scale(
        &mut self,
        target: u32,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<(), (ErrorReply, oneshot::Sender<Outcome>)> {
        if let Some(e) = self.busy() {
            return Err((e, reply));
        }
        if !(1..=MAX_SLOTS).contains(&target) {
            return Err((
                ErrorReply::new(
                    ErrorKind::Invalid,
                    format!("{target} workers: give 1 to {MAX_SLOTS}"),
                ),
                reply,
            ));
        }
        let n = self.slot_count();
        if target == n {
            let _ = reply.send(Ok(Reply::Done {
                message: format!("already {n} workers"),
            }));
            return Ok(());
        }
        if target < n && !self.slots[..target as usize].iter().any(Slot::live) {
            return Err((
                ErrorReply::new(
                    ErrorKind::Invalid,
                    format!("scaling to {target} would leave no slot taking new connections (slots 0..{} are drained or down): undrain them or wait for their workers first", target - 1),
                ),
                reply,
            ));
        }
        let mut notes = Vec::new();
        if self.weights.take().is_some() {
            warn!("scaling resets the hash weights to equal shares");
            notes.push("hash weights reset to equal shares".to_owned());
        }
        if self.config.policy == PolicyKind::Cpu {
            if let Some(warning) = cpu_overflow(&self.config.layout, target) {
                warn!("{warning}");
                notes.push(format!("warning: {warning}"));
            }
        }
        let note: String = notes.iter().map(|n| format!("; {n}")).collect();
        if target > n {
            if let Err(e) = self.group.grow(target) {
                self.group.truncate(n);
                return Err((
                    ErrorReply::new(ErrorKind::Failed, format!("adding sockets: {e}")),
                    reply,
                ));
            }
            if let Err(e) = self.steering.add_slots(&self.group, target) {
                self.steering.remove_slots(n);
                self.group.truncate(n);
                return Err((ErrorReply::new(ErrorKind::Failed, e.to_string()), reply));
            }
            self.slots.extend((n..target).map(|_| Slot::default()));
            let note = match self.repin_workers(n, target).await {
                Some(problem) => format!("{note}; warning: {problem}"),
                None => note,
            };
            info!(
                "scaling {n} -> {target}: starting slots {n}..{}",
                target - 1
            );
            self.op = Some(Operation::ScaleUp {
                waiting: (n..target).collect(),
                target,
                note,
                reply,
            });
            for slot in n..target {
                self.spawn(slot, Role::Current);
            }
            self.publish().await;
        } else {
            info!(
                "scaling {n} -> {target}: removing slots {target}..{}",
                n - 1
            );
            for s in &mut self.slots[target as usize..] {
                s.removing = true;
                s.backoff_token = None;
            }
            // First out of the tables, so nothing new lands on the closing sockets.
            self.publish().await;
            let note = match self.repin_workers(n, target).await {
                Some(problem) => format!("{note}; warning: {problem}"),
                None => note,
            };
            for slot in target..n {
                let s = &mut self.slots[slot as usize];
                let workers: Vec<Worker> = s
                    .current
                    .take()
                    .into_iter()
                    .chain(s.successor.take())
                    .collect();
                for w in workers {
                    self.retire(slot, w);
                }
            }
            self.op = Some(Operation::ScaleDown {
                target,
                note,
                reply,
            });
            self.finish_scale_down().await;
        }
        Ok(())
    }

    fn scale_up_progress(&mut self, slot: u32) {
        let Some(Operation::ScaleUp { waiting, .. }) = self.op.as_mut() else {
            return;
        };
        waiting.retain(|s| *s != slot);
        if waiting.is_empty() {
            if let Some(Operation::ScaleUp {
                target,
                note,
                reply,
                ..
            }) = self.op.take()
            {
                let message = format!(
                    "scaled to {target} workers; every new slot is ready and in the tables{note}"
                );
                info!("{message}");
                let _ = reply.send(Ok(Reply::Done { message }));
            }
        }
    }

    fn scale_up_failed(&mut self, slot: u32, why: &str) {
        if !matches!(&self.op, Some(Operation::ScaleUp { waiting, .. }) if waiting.contains(&slot))
        {
            return;
        }
        if let Some(Operation::ScaleUp { target, reply, .. }) = self.op.take() {
            let message = format!(
                "scaled to {target} slots, but slot {slot} is not ready: {why}; it is respawned with backoff (see `balancer status`)"
            );
            error!("{message}");
            let _ = reply.send(Err(ErrorReply::new(ErrorKind::Failed, message)));
        }
    }

    /// Once every removed slot's workers are gone, closes their sockets: the kernel migrates
    /// what was queued on them through the program to live slots.
    async fn finish_scale_down(&mut self) {
        let Some(Operation::ScaleDown { target, .. }) = self.op else {
            return;
        };
        if self.slots[target as usize..]
            .iter()
            .any(|s| s.workers().next().is_some())
        {
            return;
        }
        let before = self.migrated_total();
        let n = self.slot_count();
        self.group.truncate(target);
        self.steering.remove_slots(target);
        self.slots.truncate(target as usize);
        self.publish().await;
        let moved = self.migrated_total().saturating_sub(before);
        if let Some(Operation::ScaleDown { reply, note, .. }) = self.op.take() {
            let message = format!(
                "scaled {n} -> {target} workers; {moved} queued connection(s) moved to live slots{note}"
            );
            info!("{message}");
            let _ = reply.send(Ok(Reply::Done { message }));
        }
    }

    fn migrated_total(&self) -> u64 {
        self.steering.counters().map_or(0, |c| {
            c.iter()
                .flat_map(|a| a.slots.iter())
                .map(|s| s.migrated)
                .sum()
        })
    }

    fn status(&self) -> StatusReport {
        let now = Instant::now();
        let counters = self.steering.counters().unwrap_or_else(|e| {
            error!("reading the steering counters: {e}");
            Vec::new()
        });
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut sum = balancer_common::SlotCounters::default();
                for a in &counters {
                    if let Some(c) = a.slots.get(i) {
                        sum.add(c);
                    }
                }
                SlotStatus {
                    slot: i as u32,
                    pid: s.current.map(|w| w.pid),
                    state: s.state(),
                    cpus: self
                        .config
                        .layout
                        .pinned_cpus(i as u32, self.layout_slots()),
                    restarts: s.restarts,
                    queue: self.depths.get(i).copied().unwrap_or(0),
                    steered: sum.selected(),
                    by_cpu: sum.by_cpu,
                    by_hash: sum.by_hash,
                    by_round_robin: sum.by_round_robin,
                    by_least_loaded: sum.by_least_loaded,
                    spilled: sum.spilled,
                    fallback: sum.fallback,
                    migrated: sum.migrated,
                    select_errors: sum.select_error,
                    note: s.stall.describe(now),
                }
            })
            .collect();
        let stats = self
            .config
            .bpf_stats
            .then(|| self.steering.program_stats())
            .flatten();
        StatusReport {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            policy: self.config.policy.into(),
            weights: self.weights.clone(),
            spill_depth: self.config.spill_depth,
            sample_interval_us: self.config.sample_interval.as_micros() as u64,
            sampling_cost_us_per_sec: self.sampling_spent.as_secs_f64() * 1e6
                / self.started.elapsed().as_secs_f64().max(1e-3),
            listen: self
                .group
                .addresses
                .iter()
                .map(|a| a.addr.to_string())
                .collect(),
            slots,
            bpf_ns_per_selection: stats
                .filter(|(_, runs)| *runs > 0)
                .map(|(ns, runs)| ns as f64 / runs as f64),
            bpf_runs: stats.map(|(_, runs)| runs),
        }
    }

    fn policy_report(&self) -> PolicyReport {
        let live = self.live();
        let tables = build_tables(
            &self.config.layout,
            self.slot_count(),
            &live,
            self.weights.as_deref(),
        );
        let (cpu_table, hash_buckets) = describe(&self.config.layout, self.slot_count(), &tables);
        PolicyReport {
            policy: self.config.policy.into(),
            weights: self.weights.clone(),
            spill_depth: self.config.spill_depth,
            live: (0..self.slot_count())
                .filter(|s| live[*s as usize])
                .collect(),
            cpu_table,
            hash_buckets,
        }
    }

    fn print_report(&self) {
        match self.steering.counters() {
            Ok(counters) => {
                let views: Vec<SlotView> = self.slots.iter().map(slot_view).collect();
                report::counters(&counters, &views);
            }
            Err(e) => error!("reading the steering counters: {e}"),
        }
    }

    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) {
        self.stopping = true;
        let reply = match self.op.take() {
            Some(Operation::Restart { reply, .. }) => reply,
            Some(Operation::ScaleUp { reply, .. } | Operation::ScaleDown { reply, .. }) => {
                Some(reply)
            }
            None => None,
        };
        if let Some(reply) = reply {
            let _ = reply.send(Err(ErrorReply::new(
                ErrorKind::Failed,
                "the balancer is shutting down",
            )));
        }
        self.signal_all(Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + self.config.grace;
        let mut killed = false;
        while self.slots.iter().any(|s| s.workers().next().is_some()) {
            tokio::select! {
                Some(event) = rx.recv() => {
                    if let Event::Exited { generation, pid, status } = event {
                        self.on_exit(generation, pid, &status).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    warn!("workers still running after the {} grace: SIGKILL",
                        humantime::format_duration(self.config.grace));
                    self.signal_all(Signal::SIGKILL);
                    killed = true;
                }
                _ = tokio::time::sleep_until(deadline + REAP_WAIT), if killed => {
                    error!("workers did not exit after SIGKILL; giving up on them");
                    break;
                }
            }
        }
        for s in &mut self.slots {
            s.backoff_token = None;
        }
        self.steering.detach(&self.group);
        self.print_report();
    }

    fn signal_all(&self, signal: Signal) {
        for w in self.slots.iter().flat_map(Slot::workers) {
            signal_worker(w.pid, signal);
        }
    }
}

/// Signals a worker's process group (it leads its own): this reaches its children too.
fn signal_worker(pid: u32, signal: Signal) {
    if let Err(e) = killpg(Pid::from_raw(pid as i32), signal) {
        warn!("{signal} to worker pid {pid}: {e}");
    }
}

fn slot_view(s: &Slot) -> SlotView {
    SlotView {
        pid: s.current.map(|w| w.pid),
        state: if s.current.is_none() && s.backoff_token.is_none() && !s.removing {
            SlotState::Stopped
        } else {
            s.state()
        },
        restarts: s.restarts,
    }
}

/// Respawn delay after `quick_exits` short-lived runs in a row: none after a stable run, then
/// 100 ms, 200 ms, 400 ms … up to 30 s.
fn backoff(quick_exits: u32) -> Duration {
    match quick_exits {
        0 => Duration::ZERO,
        n => BACKOFF_BASE
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(BACKOFF_MAX),
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn describe_exit(status: &io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                let name = Signal::try_from(sig).map_or_else(|_| "?".to_owned(), |s| s.to_string());
                format!("was killed by signal {sig} ({name})")
            }
            _ => format!("ended ({s})"),
        },
        Err(e) => format!("could not be waited for ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(20), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn exit_reasons_name_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit(&Ok(ExitStatus::from_raw(9))),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(&Ok(ExitStatus::from_raw(1 << 8))),
            "exited with status 1"
        );
    }

    #[test]
    fn slot_states_read_as_documented() {
        let w = Worker {
            pid: 1,
            generation: 1,
            since: Instant::now(),
            ready: true,
        };
        let mut s = Slot {
            current: Some(w),
            ..Default::default()
        };
        assert_eq!(s.state(), SlotState::Ready);
        assert!(s.live());
        s.drained = true;
        assert_eq!(s.state(), SlotState::Draining);
        assert!(!s.live());
        s.current = None;
        s.backoff_token = Some(3);
        assert_eq!(s.state(), SlotState::BackingOff);
        s.removing = true;
        assert_eq!(s.state(), SlotState::Removing);
    }
}
