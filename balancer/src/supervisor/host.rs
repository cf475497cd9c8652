//! The seam between the supervisor's decisions and the world: every effect on processes,
//! sockets, eBPF maps, timers and the clock goes through [`Host`]. The real implementation is
//! [`super::real_host::RealHost`]; the unit tests drive the same decisions against a fake
//! that records every call and lets them fire timers and move time by hand.
use std::{fmt, io, net::SocketAddr, process::ExitStatus, time::Duration, time::Instant};

use balancer_common::{PolicyKind, Tables};
use nix::sys::signal::Signal;

use super::{
    settings::Steer,
    slot::{Generation, TimerToken},
};
pub use crate::group_repair::{Evacuation, RepairOutcome, SocketFault, SocketRepair};
use crate::{
    report::SlotView, socket_group::SocketGroupError, steering::AddressCounters,
    steering::SteeringError,
};

/// A timer the supervisor asked for; the host hands it back as [`Event::Timer`] when due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A started worker has had `--ready-timeout` to say READY=1.
    ReadyTimeout(Generation),
    /// A slot's crash-loop backoff is over (only the newest token of a slot counts).
    Respawn {
        /// The slot.
        slot: u32,
        /// Which backoff this is.
        token: TimerToken,
    },
    /// A worker told to stop has had `--grace` to do so.
    GraceOver(Generation),
}

/// How a worker ended, as far as its watcher can tell. A worker that is not our child (adopted
/// through a pidfd) has no exit status to read: [`WorkerExit::Unknown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// It called exit with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// Its end was seen, not its status (the reason).
    Unknown(String),
}

impl WorkerExit {
    /// From what waiting for a child returned.
    pub fn from_wait(status: &io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Self::Code(code),
                (None, Some(sig)) => Self::Signal(sig),
                _ => Self::Unknown(format!("ended ({s})")),
            },
            Err(e) => Self::Unknown(format!("could not be waited for ({e})")),
        }
    }
}

impl fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exited with status {code}"),
            Self::Signal(sig) => {
                let name =
                    Signal::try_from(*sig).map_or_else(|_| "?".to_owned(), |s| s.to_string());
                write!(f, "was killed by signal {sig} ({name})")
            }
            Self::Unknown(why) => f.write_str(why),
        }
    }
}

/// What reaches the supervisor from the world, apart from requests and samples.
#[derive(Debug)]
pub enum Event {
    /// A worker the host started (or adopted) ended.
    Exited {
        /// Which start it was.
        generation: Generation,
        /// Its pid.
        pid: u32,
        /// How it ended.
        how: WorkerExit,
    },
    /// A timer is due.
    Timer(Timer),
}

/// A slot as the group's record keeps it (see `group_state`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSnapshot {
    /// Its serving worker's pid.
    pub pid: Option<u32>,
    /// Whether that worker is ready.
    pub ready: bool,
    /// Drained by the operator.
    pub drained: bool,
    /// Times its worker was replaced.
    pub restarts: u32,
    /// Its other workers' pids (a restart's successor, retiring workers).
    pub others: Vec<u32>,
}

/// A worker to re-pin after a scale: its process group moves to `cpus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repin {
    /// The slot it serves.
    pub slot: u32,
    /// The worker (leader of its process group).
    pub pid: u32,
    /// Its new CPUs.
    pub cpus: Vec<u32>,
}

/// What the steering program is told: the policy, its spill depth and the slot tables.
#[derive(Clone, Copy, Debug)]
pub struct Publish<'a> {
    /// The policy.
    pub policy: PolicyKind,
    /// Spill depth (0: off).
    pub spill_depth: u32,
    /// The tables, built for the slots that are live now.
    pub tables: &'a Tables,
}

/// Why an effect failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The worker process could not be started.
    #[error("{0}")]
    Spawn(#[source] io::Error),
    /// Sockets could not be added to the group.
    #[error("adding sockets: {0}")]
    Sockets(#[source] SocketGroupError),
    /// The eBPF maps refused an update.
    #[error("{0}")]
    Steering(#[source] SteeringError),
    /// Moving a slot's queue out (`shutdown` + `listen`) failed.
    #[error("{0}")]
    Evacuate(#[source] io::Error),
}

/// Every effect the supervisor has on the world.
///
/// Worker exits are not a call: the host watches each worker it started (or adopted) and
/// delivers [`Event::Exited`] with the generation it was started under, whatever the watcher
/// (`waitpid` on a child, a pidfd on an adopted process).
#[allow(async_fn_in_trait)] // one implementation per build and a test double; no Send bound needed
pub trait Host {
    /// The current time (a fake host moves it by hand).
    fn now(&self) -> Instant;

    /// The controller process's CPU time so far (user and system, every thread).
    fn cpu_time(&self) -> Duration;

    /// Starts the worker of `slot` on its sockets, pinned to `cpus` when given; returns its
    /// pid. Must run on the runtime's thread (see `activation::spawn`).
    fn spawn(
        &mut self,
        slot: u32,
        generation: Generation,
        cpus: Option<&[u32]>,
    ) -> Result<u32, HostError>;

    /// Watches a worker a dead controller started (adopted at start): its exit arrives as
    /// [`Event::Exited`] with `generation`, like a child's.
    fn watch_adopted(&mut self, slot: u32, generation: Generation, pid: u32);

    /// Keeps the sockets of `slots` in the service manager's descriptor store (if it has one),
    /// so that they survive a controller restart with what is queued on them.
    fn store_sockets(&mut self, slots: std::ops::Range<u32>);

    /// Takes the sockets of `slots` out of that store (they are about to close).
    fn unstore_sockets(&mut self, slots: std::ops::Range<u32>);

    /// Records the group for a successor controller (written only when it changed).
    fn save_record(&mut self, slots: &[SlotSnapshot], steer: &Steer);

    /// Signals a worker's process group.
    fn signal(&mut self, pid: u32, signal: Signal);

    /// Hands `timer` back as an event after `delay`.
    fn schedule(&mut self, delay: Duration, timer: Timer);

    /// Publishes new steering tables (whole, then one switch).
    async fn publish(&mut self, publish: Publish<'_>) -> Result<(), HostError>;

    /// Grows the group from `from` to `to` slots: new sockets on every address and their
    /// entries in the socket arrays, or, on failure, neither.
    fn grow(&mut self, from: u32, to: u32) -> Result<(), HostError>;

    /// Shrinks the group to `to` slots: closes the sockets of the others (the kernel migrates
    /// their queues through the program) and forgets their counters.
    fn shrink(&mut self, to: u32);

    /// Moves what is queued on `slot` to the live slots, then puts its socket back into the
    /// group and the socket arrays (a new socket where the old one cannot listen again).
    fn evacuate(&mut self, slot: u32) -> Result<Evacuation, HostError>;

    /// Checks that every socket of the group still listens and is still in the program's
    /// socket array, repairs what is not, and attaches the program again (the kernel cannot
    /// tell which program a group runs, and any socket's owner may attach another).
    fn check_sockets(&mut self) -> Vec<SocketRepair>;

    /// Samples every accept queue (`[address][slot]`) and hands the depths to the program.
    fn sample_queues(&mut self) -> Vec<Vec<u32>>;

    /// Connections on the listen addresses still in their handshake (request sockets).
    fn half_open(&mut self) -> usize;

    /// Moves running workers to new CPUs; a note for the operator when some could not be.
    async fn repin(&mut self, plan: Vec<Repin>) -> Option<String>;

    /// The program's decision counters, per address.
    fn counters(&self) -> Result<Vec<AddressCounters>, HostError>;

    /// The program's run time and run count (kernel `bpf_stats`), when available.
    fn program_stats(&self) -> Option<(u64, u64)>;

    /// The bound listen addresses.
    fn addresses(&self) -> Vec<SocketAddr>;

    /// Prints one line on stdout for scripts (`ready: …`).
    fn announce(&mut self, line: &str);

    /// Tells the controller's own service manager (sd_notify `KEY=VALUE` lines), if any.
    fn tell_manager(&mut self, text: &str);

    /// Prints the counters table.
    fn print_counters(&mut self, slots: &[SlotView]);

    /// Makes the program refuse every new connection for at most `for_at_most` (shutdown:
    /// what is queued drains, nothing new queues on sockets about to close).
    fn refuse_new(&mut self, for_at_most: Duration) -> Result<(), HostError>;

    /// Detaches the program before the sockets close (shutdown).
    fn detach(&mut self);
}
