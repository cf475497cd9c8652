//! Handing the group over to a new controller process (`balancer upgrade`, `SIGUSR2`).
//!
//! The old controller starts the new binary with the same arguments and one end of a socket
//! pair (its fd number in `BALANCER_HANDOVER`). Over it, one line per message:
//!
//! 1. new → old `HELLO <version>`: it runs. The old one writes its record, withdraws its
//!    sockets from its socket arrays (a socket can be in one at a time) and stops changing
//!    anything; the kernel's hash steers meanwhile, so nothing is lost.
//! 2. old → new `GO <group>`: the new one adopts the group from the record, exactly as after a crash
//!    (workers, sockets, counters), attaches its program, takes the control socket's path
//!    (a rename: a client reaches one of the two, never nothing).
//! 3. new → old `READY <pid> <version>` once every worker is ready: the old one answers the
//!    command and exits without signalling any worker.
//!
//! If the new one exits or is not ready in time, the old one kills it, attaches its own
//! program again, publishes its sockets, takes the control socket's path back, and stays in
//! charge; the command fails with the reason.
use std::{
    ffi::OsString,
    io::{self, BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{info, warn};

/// The variable naming the new controller's end of the socket pair.
pub const ENV: &str = "BALANCER_HANDOVER";
/// How long the new controller may take to say it runs.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// How long it may take to be ready, all told.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
/// This build's version, as the reply names it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The new binary could not be started.
    #[error("starting {binary}: {source}")]
    Start {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It ended, or said something else, before it was ready.
    #[error("the new controller (pid {pid}) {what}")]
    Failed {
        /// Its pid.
        pid: u32,
        /// What happened.
        what: String,
    },
    /// The channel itself failed.
    #[error("the handover channel: {0}")]
    Channel(#[source] io::Error),
    /// The predecessor did not let us go on.
    #[error("the controller handing over (pid {pid}) {what}")]
    Predecessor {
        /// Its pid.
        pid: u32,
        /// What happened.
        what: String,
    },
}

/// The old controller's side: the new process, and the channel to it. Async, so that the
/// old controller's control socket keeps accepting (and queueing) requests meanwhile.
pub struct Successor {
    child: std::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
    deadline: tokio::time::Instant,
}

impl Successor {
    /// Starts `binary` with `args` (this controller's own arguments) and the channel.
    pub fn start(binary: &Path, args: &[OsString]) -> Result<Self, HandoverError> {
        use tokio::io::AsyncBufReadExt;
        let start_err = |source| HandoverError::Start {
            binary: binary.to_path_buf(),
            source,
        };
        let (ours, theirs) = UnixStream::pair().map_err(start_err)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(binary);
        cmd.args(args)
            .env(ENV, fd.to_string())
            .stdin(std::process::Stdio::null());
        // SAFETY: fcntl between fork and exec is async-signal-safe; it keeps `theirs` open
        // across exec in the child only.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(start_err)?;
        drop(theirs);
        ours.set_nonblocking(true).map_err(HandoverError::Channel)?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(HandoverError::Channel)?;
        let (read, writer) = ours.into_split();
        Ok(Self {
            child,
            lines: tokio::io::BufReader::new(read).lines(),
            writer,
            deadline: tokio::time::Instant::now() + READY_WITHIN,
        })
    }

    /// The new controller's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `HELLO`; returns the new controller's version.
    pub async fn hello(&mut self) -> Result<String, HandoverError> {
        let until = (tokio::time::Instant::now() + HELLO_WITHIN).min(self.deadline);
        let line = self.read(until).await?;
        match line.strip_prefix("HELLO ") {
            Some(version) => Ok(version.trim().to_owned()),
            None => Err(self.said(&line, "HELLO")),
        }
    }

    /// Lets it adopt the group `name` (whatever its own arguments say: `--listen` with port
    /// 0 names no group), telling it where our copies of the group's sockets are, so that it
    /// takes them (`pidfd_getfd`) for slots that have no worker to take them from.
    pub async fn go(&mut self, name: &str, sockets: &[SocketFd]) -> Result<(), HandoverError> {
        use tokio::io::AsyncWriteExt;
        let fds: Vec<String> = sockets
            .iter()
            .map(|s| format!("{}.{}={}", s.slot, s.address, s.fd))
            .collect();
        self.writer
            .write_all(format!("GO {name} {}\n", fds.join(" ")).as_bytes())
            .await
            .map_err(HandoverError::Channel)
    }

    /// Waits for `READY`; returns the new controller's pid and version.
    pub async fn ready(&mut self) -> Result<(u32, String), HandoverError> {
        let line = self.read(self.deadline).await?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("READY"), Some(pid), Some(version)) => Ok((
                pid.parse().unwrap_or_else(|_| self.pid()),
                version.to_owned(),
            )),
            _ => Err(self.said(&line, "READY")),
        }
    }

    /// Kills the would-be successor and reaps it (the handover failed).
    pub fn abandon(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn read(&mut self, until: tokio::time::Instant) -> Result<String, HandoverError> {
        let waited = until.saturating_duration_since(self.deadline - READY_WITHIN);
        match tokio::time::timeout_at(until, self.lines.next_line()).await {
            Err(_) => Err(self.failed(format!(
                "did not answer within {}",
                humantime::format_duration(Duration::from_secs(waited.as_secs()))
            ))),
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => {
                let how = self.exit_status().await;
                Err(self.failed(format!("{how} before it was ready")))
            }
            Ok(Err(e)) => Err(HandoverError::Channel(e)),
        }
    }

    /// How the child ended, waiting a moment for it (its channel closed first).
    async fn exit_status(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return crate::supervisor::host::WorkerExit::from_wait(&Ok(status)).to_string()
                }
                Ok(None) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => return "closed the handover channel".to_owned(),
            }
        }
    }

    /// An unexpected line: the successor's own error (`ERROR …`), or a protocol fault.
    fn said(&self, line: &str, expected: &str) -> HandoverError {
        match line.strip_prefix("ERROR ") {
            Some(why) => self.failed(format!("failed: {why}")),
            None => self.failed(format!("said {line:?} instead of {expected}")),
        }
    }

    fn failed(&self, what: String) -> HandoverError {
        HandoverError::Failed {
            pid: self.pid(),
            what,
        }
    }
}

/// One of the old controller's socket descriptors: slot, address index, fd number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketFd {
    /// The slot.
    pub slot: u32,
    /// The listen address's index.
    pub address: usize,
    /// The descriptor's number in the old controller.
    pub fd: RawFd,
}

/// What the old controller hands over with `GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handed {
    /// The old controller's pid.
    pub pid: u32,
    /// The group's name.
    pub group: String,
    /// Where its copies of the group's sockets are.
    pub sockets: Vec<SocketFd>,
}

/// Parses `GO <group> <slot>.<address>=<fd> …`.
fn parse_go(line: &str) -> Option<(String, Vec<SocketFd>)> {
    let mut words = line.split_whitespace();
    if words.next()? != "GO" {
        return None;
    }
    let group = words.next()?;
    crate::group_state::check_name(group).ok()?;
    let sockets = words
        .map(|w| {
            let (at, fd) = w.split_once('=')?;
            let (slot, address) = at.split_once('.')?;
            Some(SocketFd {
                slot: slot.parse().ok()?,
                address: address.parse().ok()?,
                fd: fd.parse().ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((group.to_owned(), sockets))
}

/// The new controller's side.
pub struct Predecessor {
    stream: UnixStream,
    /// The old controller's pid (our parent).
    pub pid: u32,
}

impl Predecessor {
    /// The channel our predecessor gave us, if we were started by a handover; the variable
    /// is removed so that workers do not inherit it.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var(ENV).ok()?;
        // SAFETY: the controller is still single-threaded here (no runtime yet).
        unsafe { std::env::remove_var(ENV) };
        let fd: RawFd = value.trim().parse().ok()?;
        // SAFETY: the predecessor passed this descriptor to us for this purpose alone; a
        // wrong number fails the first write below.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not inherited by anything we start.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Some(Self {
            stream: UnixStream::from(owned),
            pid: std::os::unix::process::parent_id(),
        })
    }

    /// Says we run and waits until the predecessor has let go of the group; returns what it
    /// handed over.
    pub fn hello(&mut self) -> Result<Handed, HandoverError> {
        let fail = |what: String| HandoverError::Predecessor {
            pid: self.pid,
            what,
        };
        self.stream
            .write_all(format!("HELLO {VERSION}\n").as_bytes())
            .map_err(|e| fail(format!("cannot be told we run: {e}")))?;
        self.stream
            .set_read_timeout(Some(HELLO_WITHIN))
            .map_err(HandoverError::Channel)?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .map_err(|e| fail(format!("did not answer: {e}")))?;
        let Some((group, sockets)) = parse_go(line.trim_end()) else {
            return Err(fail(format!(
                "said {:?} instead of GO <group> <sockets>",
                line.trim_end()
            )));
        };
        info!("taking group {group} over from controller pid {}", self.pid);
        Ok(Handed {
            pid: self.pid,
            group,
            sockets,
        })
    }

    /// A second handle on the channel, to report a failure after the predecessor moved on.
    pub fn failure_channel(&self) -> Option<FailureChannel> {
        self.stream.try_clone().ok().map(FailureChannel)
    }

    /// Tells the predecessor we are ready: it exits.
    pub fn ready(&mut self) {
        let line = format!("READY {} {VERSION}\n", std::process::id());
        if let Err(e) = self.stream.write_all(line.as_bytes()) {
            warn!("telling controller pid {} we are ready: {e}", self.pid);
        }
    }
}

/// Where a new controller that fails to start tells its predecessor why (the predecessor
/// quotes it in the failed command's reply).
pub struct FailureChannel(UnixStream);

impl FailureChannel {
    /// Sends `ERROR <why>` (one line).
    pub fn report(mut self, why: &str) {
        let line = why.replace('\n', "; ");
        let _ = self.0.write_all(format!("ERROR {line}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_lines_name_the_group_and_the_socket_fds() {
        assert_eq!(
            parse_go("GO web 0.0=7 1.0=9"),
            Some((
                "web".to_owned(),
                vec![
                    SocketFd {
                        slot: 0,
                        address: 0,
                        fd: 7
                    },
                    SocketFd {
                        slot: 1,
                        address: 0,
                        fd: 9
                    }
                ]
            ))
        );
        assert_eq!(parse_go("GO web"), Some(("web".to_owned(), vec![])));
        assert_eq!(parse_go("GO a.b 0.0=7"), None, "not a group name");
        assert_eq!(parse_go("GO web 0.0=x"), None);
        assert_eq!(parse_go("READY 1 2"), None);
    }
}
