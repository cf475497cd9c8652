//! What the supervisor is told at start: the settings that never change, and the steering
//! state the operator changes at run time (policy, spill depth, hash weights).
use std::{ffi::OsString, os::fd::OwnedFd, path::PathBuf, time::Duration};

use balancer_common::PolicyKind;

use nix::sys::signal::Signal;

use crate::{activation::SocketProtocol, policy::CpuLayout, stall::StallConfig};

/// What `balancer run` asks the supervisor to run.
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
    /// Stop signal → SIGKILL grace, on shutdown and for replaced workers.
    pub grace: Duration,
    /// Whether kernel BPF run-time statistics are on.
    pub bpf_stats: bool,
    /// Spill depth for the cpu and hash policies (0: off).
    pub spill_depth: u32,
    /// Hash weights at start (an adopted group keeps its own).
    pub weights: Option<Vec<u32>>,
    /// How often accept-queue depths are sampled.
    pub sample_interval: Duration,
    /// Stall detection timeout.
    pub stall_timeout: Duration,
    /// Evacuate stalled slots' queues.
    pub evacuate: bool,
    /// Kill workers stalled this long.
    pub kill_stalled: Option<Duration>,
    /// How often the sockets are checked and repaired (zero: never).
    pub socket_check: Duration,
    /// Where the group's record is kept for a successor controller.
    pub record_dir: PathBuf,
    /// What a dead controller left: per slot, its worker (if adopted), drain and restarts;
    /// `None` for a group started anew.
    pub inherited: Option<Vec<InheritedSlot>>,
    /// The pidfds of the adopted workers.
    pub adopted_pidfds: Vec<(u32, OwnedFd)>,
    /// Who the workers run as (`--user`).
    pub credentials: Option<crate::credentials::Credentials>,
    /// How the workers are told of their sockets (`--socket-protocol`).
    pub socket_protocol: SocketProtocol,
    /// What asks a worker to finish and exit (`--stop-signal`).
    pub stop_signal: Signal,
}

/// A slot as a dead controller left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InheritedSlot {
    /// Its worker, adopted: pid and whether it was ready.
    pub worker: Option<(u32, bool)>,
    /// Drained by the operator.
    pub drained: bool,
    /// Times its worker was replaced.
    pub restarts: u32,
    /// Its other workers still running (adopted to be stopped: the stop signal, then SIGKILL
    /// after the grace).
    pub retiring: Vec<u32>,
}

/// What the event loop and the host get from the configuration besides the settings.
pub struct Start {
    /// Worker program and arguments.
    pub command: Vec<OsString>,
    /// Slots at start.
    pub slots: u32,
    /// See [`SupervisorConfig::record_dir`].
    pub record_dir: PathBuf,
    /// See [`SupervisorConfig::inherited`].
    pub inherited: Option<Vec<InheritedSlot>>,
    /// See [`SupervisorConfig::adopted_pidfds`].
    pub adopted_pidfds: Vec<(u32, OwnedFd)>,
    /// See [`SupervisorConfig::credentials`].
    pub credentials: Option<crate::credentials::Credentials>,
    /// See [`SupervisorConfig::socket_protocol`].
    pub socket_protocol: SocketProtocol,
}

/// Settings fixed for the life of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// CPU layout the tables are built for.
    pub layout: CpuLayout,
    /// Pin workers to their slot's CPUs.
    pub pin_workers: bool,
    /// How long a worker has to say READY=1 before it is taken as ready.
    pub ready_timeout: Duration,
    /// Stop signal → SIGKILL grace.
    pub grace: Duration,
    /// The signal that asks a worker to finish what it accepted and exit (rolling restart,
    /// scale-down, shutdown); a stalled worker gets SIGKILL, not this.
    pub stop_signal: Signal,
    /// Whether kernel BPF run-time statistics are on.
    pub bpf_stats: bool,
    /// How often accept-queue depths are sampled.
    pub sample_interval: Duration,
    /// Stall detection timeout (zero: off).
    pub stall_timeout: Duration,
    /// Evacuate stalled slots' queues.
    pub evacuate: bool,
    /// Kill workers stalled this long.
    pub kill_stalled: Option<Duration>,
    /// How often the sockets are checked and repaired (zero: never).
    pub socket_check: Duration,
}

impl Settings {
    /// Stall detection's settings.
    pub fn stall(&self) -> StallConfig {
        StallConfig {
            timeout: self.stall_timeout,
            kill_after: self.kill_stalled,
        }
    }
}

/// How connections are steered: changed by `policy set` (and scaling resets the weights).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steer {
    /// The policy.
    pub policy: PolicyKind,
    /// Spill depth of the cpu and hash policies (0: off).
    pub spill_depth: u32,
    /// Per-slot hash weights; `None` for equal shares.
    pub weights: Option<Vec<u32>>,
}

impl SupervisorConfig {
    /// Splits the configuration: what starting needs, the settings, the steering state.
    pub fn split(self) -> (Start, Settings, Steer) {
        (
            Start {
                command: self.command,
                slots: self.slots,
                record_dir: self.record_dir,
                inherited: self.inherited,
                adopted_pidfds: self.adopted_pidfds,
                credentials: self.credentials,
                socket_protocol: self.socket_protocol,
            },
            Settings {
                layout: self.layout,
                pin_workers: self.pin_workers,
                ready_timeout: self.ready_timeout,
                grace: self.grace,
                stop_signal: self.stop_signal,
                bpf_stats: self.bpf_stats,
                sample_interval: self.sample_interval,
                stall_timeout: self.stall_timeout,
                evacuate: self.evacuate,
                kill_stalled: self.kill_stalled,
                socket_check: self.socket_check,
            },
            Steer {
                policy: self.policy,
                spill_depth: self.spill_depth,
                weights: self.weights,
            },
        )
    }
}
