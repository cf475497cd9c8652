//! Taking over a group whose controller died: from its record, find the workers that still
//! run (pid *and* start time), take copies of their listening sockets (`pidfd_getfd`), and
//! hand them to the new controller, which then supervises them as its own.
use std::{
    net::SocketAddr,
    os::fd::{OwnedFd, RawFd},
    path::Path,
    time::{Duration, Instant},
};

use log::{info, warn};
use socket2::Socket;

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use crate::{
    activation::LISTEN_FDS_START,
    group_state::{GroupRecord, ProcessId, RecordError},
    pidfd,
};

/// A worker found alive, with its pidfd and copies of its slot's sockets (in address order).
#[derive(Debug)]
pub struct AdoptedWorker {
    /// Its pid.
    pub pid: u32,
    /// Whether it was ready.
    pub ready: bool,
    /// A handle on it that a reused pid cannot redirect (readable when it exits).
    pub pidfd: OwnedFd,
    /// Its slot's listening sockets, one per address.
    pub sockets: Vec<Socket>,
}

/// What a starting controller finds.
#[derive(Debug)]
pub enum Found {
    /// Nothing to adopt: start the group anew.
    Nothing,
    /// A group to adopt: its record and, per slot, the worker found alive.
    Group {
        /// The dead controller's record.
        record: GroupRecord,
        /// Index = slot.
        workers: Vec<Option<AdoptedWorker>>,
        /// Index = slot: its other workers still alive (a restart's successor, replaced
        /// workers), with their pidfds, to be stopped.
        others: Vec<Vec<(u32, OwnedFd)>>,
    },
}

/// The group cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptionError {
    /// Its controller is alive.
    #[error("group {name} is held by a live controller (pid {pid}): stop it first, or give this one another --name")]
    LiveController {
        /// The group.
        name: String,
        /// Its controller.
        pid: u32,
    },
    /// The record names other addresses.
    #[error("group {name} runs on {recorded}, not on {asked}: run with the same --listen addresses to adopt its workers (pids {pids}), or stop them first")]
    OtherAddresses {
        /// The group.
        name: String,
        /// What its record says.
        recorded: String,
        /// What this controller was asked.
        asked: String,
        /// The workers still running.
        pids: String,
    },
    /// The record cannot be read.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Looks for group `name`'s record in `dir` and adopts what still runs of it. `listen` are
/// the addresses asked for (with real ports; `None`: whatever the record says, for a
/// handover). A record whose workers are all gone is removed:
/// the group starts anew.
///
/// `handing_over` is the pid of a live controller that is handing the group to us (an
/// upgrade): its record is adopted although it still runs.
pub fn find(
    dir: &Path,
    name: &str,
    listen: Option<&[SocketAddr]>,
    handing_over: Option<u32>,
    how: Stop,
) -> Result<Found, AdoptionError> {
    let Some(record) = GroupRecord::load(dir)? else {
        return Ok(Found::Nothing);
    };
    if record.controller.alive() && handing_over != Some(record.controller.pid) {
        return Err(AdoptionError::LiveController {
            name: name.to_owned(),
            pid: record.controller.pid,
        });
    }
    let running: Vec<u32> = record
        .slots
        .iter()
        .flat_map(|s| {
            s.worker
                .iter()
                .map(|w| w.process)
                .chain(s.others.iter().copied())
        })
        .filter(ProcessId::alive)
        .map(|p| p.pid)
        .collect();
    if running.is_empty() {
        info!(
            "group {name}: its controller (pid {}) and every worker are gone; starting anew",
            record.controller.pid
        );
        GroupRecord::remove(dir);
        return Ok(Found::Nothing);
    }
    let listen = listen.unwrap_or(&record.listen);
    if record.listen != listen {
        let show = |a: &[SocketAddr]| {
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(AdoptionError::OtherAddresses {
            name: name.to_owned(),
            recorded: show(&record.listen),
            asked: show(listen),
            pids: format!("{running:?}"),
        });
    }
    let workers = record
        .slots
        .iter()
        .enumerate()
        .map(|(slot, s)| {
            let w = s.worker.as_ref()?;
            if !w.process.alive() {
                info!(
                    "slot {slot}: its worker pid {} is gone; the slot gets a new worker",
                    w.process.pid
                );
                return None;
            }
            match adopt(w.process.pid, &w.process, &record.listen) {
                Ok((pidfd, sockets)) => Some(AdoptedWorker {
                    pid: w.process.pid,
                    ready: w.ready,
                    pidfd,
                    sockets,
                }),
                Err(why) => {
                    // Left running, it would hold a socket of the group that nobody steers
                    // to or supervises, and keep every later start from adopting the group.
                    warn!(
                        "slot {slot}: worker pid {} cannot be adopted ({why}): stopping it; the slot gets a new worker",
                        w.process.pid
                    );
                    stop(&w.process, how);
                    None
                }
            }
        })
        .collect();
    let others = record
        .slots
        .iter()
        .map(|s| {
            s.others
                .iter()
                .filter_map(|p| {
                    let pidfd = pidfd::open(p.pid).ok()?;
                    // Checked with the pidfd held: the pid cannot be reused under us now.
                    p.alive().then_some((p.pid, pidfd))
                })
                .collect()
        })
        .collect();
    Ok(Found::Group {
        record,
        workers,
        others,
    })
}

/// How a worker that cannot be adopted is stopped: the controller's `--stop-signal`, then
/// SIGKILL after its `--grace`, as any worker it stops.
#[derive(Clone, Copy, Debug)]
pub struct Stop {
    /// The signal that asks it to finish and exit.
    pub signal: Signal,
    /// How long it gets before SIGKILL.
    pub grace: Duration,
}

/// Stops a recorded worker that still runs (the stop signal to its process group, SIGKILL
/// after the grace), checking its identity before every signal.
fn stop(process: &ProcessId, how: Stop) {
    let group = Pid::from_raw(process.pid as i32);
    if !process.alive() {
        return;
    }
    let _ = killpg(group, how.signal);
    let deadline = Instant::now() + how.grace;
    while process.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process.alive() {
        let _ = killpg(group, Signal::SIGKILL);
    }
}

/// Opens a pidfd on the recorded worker, checks it is still that process, and copies its
/// sockets (fd 3, 4, … by socket activation), each checked to listen on its address.
fn adopt(
    pid: u32,
    recorded: &ProcessId,
    listen: &[SocketAddr],
) -> Result<(OwnedFd, Vec<Socket>), String> {
    if !recorded.alive() {
        return Err("it exited (or its pid now names another process)".into());
    }
    let pidfd = pidfd::open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
    // Checked again with the pidfd held: now the pid cannot be reused under us.
    if !recorded.alive() {
        return Err("it exited while being adopted".into());
    }
    let sockets = listen
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let fd = LISTEN_FDS_START + i as RawFd;
            let socket = Socket::from(
                pidfd::get_fd(&pidfd, fd).map_err(|e| format!("copying its fd {fd}: {e}"))?,
            );
            let local = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| format!("its fd {fd} is not an IP socket"))?;
            if local != *addr || !socket.is_listener().unwrap_or(false) {
                return Err(format!(
                    "its fd {fd} is not a socket listening on {addr} (it is bound to {local})"
                ));
            }
            Ok(socket)
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((pidfd, sockets))
}
