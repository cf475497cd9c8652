//! Telling the controller's own service manager how it is (sd_notify): `READY=1` once every
//! worker is ready, `STATUS=` lines, `STOPPING=1`, and `WATCHDOG=1` keep-alives. Active only
//! when the manager set `NOTIFY_SOCKET` for us (systemd `Type=notify`); otherwise every call
//! is a no-op.
use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

use log::warn;

use crate::handover::Predecessor;

/// The manager's notify socket, when there is one; and, during an upgrade, the controller
/// handing over to us, which waits for our READY=1 too.
pub struct ServiceManager {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// The same address for sendmsg (the fd store passes descriptors with SCM_RIGHTS).
    raw: Option<nix::sys::socket::UnixAddr>,
    watchdog: Option<Duration>,
    predecessor: Option<Predecessor>,
}

/// Why the manager's notify socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceManagerError {
    /// The address is not one a datagram can be sent to.
    #[error("NOTIFY_SOCKET={value:?} is not a usable socket address ({source}): the service manager must give an absolute path or an @abstract name; unset it when no manager runs the balancer")]
    Address {
        /// The variable's value.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `WATCHDOG_USEC` is not a positive number of microseconds.
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds: fix WatchdogSec= in the unit, or unset WATCHDOG_USEC")]
    Watchdog(String),
}

impl ServiceManager {
    /// None: the controller runs without a manager.
    pub fn none() -> Self {
        Self {
            target: None,
            raw: None,
            watchdog: None,
            predecessor: None,
        }
    }

    /// From the environment the manager gave us (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`). A watchdog meant for another pid is not ours.
    ///
    /// `handing_over`: we take over from a controller whose watchdog this is (systemd set
    /// `WATCHDOG_PID` to the old main process; after the handover we are the main process).
    pub fn from_env(handing_over: bool) -> Result<Self, ServiceManagerError> {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Self::none());
        };
        let value = value.to_string_lossy().into_owned();
        let address = |source| ServiceManagerError::Address {
            value: value.clone(),
            source,
        };
        let addr = match value.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None if value.starts_with('/') => SocketAddr::from_pathname(&value),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor @name",
            )),
        }
        .map_err(address)?;
        let socket = UnixDatagram::unbound().map_err(address)?;
        let ours = handing_over
            || std::env::var("WATCHDOG_PID")
                .ok()
                .is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = match std::env::var("WATCHDOG_USEC") {
            Ok(usec) if ours => match usec.trim().parse::<u64>() {
                Ok(n) if n > 0 => Some(Duration::from_micros(n)),
                _ => return Err(ServiceManagerError::Watchdog(usec)),
            },
            _ => None,
        };
        let raw = match value.strip_prefix('@') {
            Some(name) => nix::sys::socket::UnixAddr::new_abstract(name.as_bytes()),
            None => nix::sys::socket::UnixAddr::new(value.as_str()),
        }
        .ok();
        Ok(Self {
            target: Some((socket, addr)),
            raw,
            watchdog,
            predecessor: None,
        })
    }

    /// Also tells `predecessor` (the controller handing over to us) when we are ready.
    pub fn with_predecessor(mut self, predecessor: Predecessor) -> Self {
        self.predecessor = Some(predecessor);
        self
    }

    /// Keeps `fd` in the manager's file descriptor store under `name` (`FDSTORE=1`), replacing
    /// whatever it kept under that name: systemd hands the store back to the next controller
    /// as `LISTEN_FDS`, so a slot's socket and its queue outlive a worker that dies while no
    /// controller runs.
    pub fn store_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsRawFd;
        if self.target.is_none() || self.raw.is_none() {
            return;
        }
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        let (Some((socket, _)), Some(addr)) = (&self.target, &self.raw) else {
            return;
        };
        let text = format!("FDSTORE=1\nFDNAME={name}");
        let iov = [io::IoSlice::new(text.as_bytes())];
        let fds = [fd.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        if let Err(e) = nix::sys::socket::sendmsg(
            socket.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            Some(addr),
        ) {
            warn!("storing {name} with the service manager: {e}");
        }
    }

    /// Takes `name` out of the manager's file descriptor store (`FDSTOREREMOVE=1`).
    pub fn remove_fd(&mut self, name: &str) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }

    /// Whether we are taking over from an old controller that still waits for our READY=1.
    pub fn handing_over(&self) -> bool {
        self.predecessor.is_some()
    }

    /// Whether a manager listens.
    pub fn active(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout, as sd_watchdog_enabled
    /// advises; `None` without a watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends `KEY=VALUE` lines. A manager that went away is logged, never fatal: the
    /// controller keeps its workers serving whatever happens to the manager.
    pub fn send(&mut self, text: &str) {
        let ready = text.lines().any(|l| l == "READY=1");
        let text = match self.predecessor.take() {
            Some(mut predecessor) if ready => {
                predecessor.ready();
                // systemd learns the service's new main process with its readiness (the unit
                // needs NotifyAccess=all for a message from a process that is not yet main).
                format!("MAINPID={}\n{text}", std::process::id())
            }
            other => {
                self.predecessor = other;
                text.to_owned()
            }
        };
        let text = text.as_str();
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(text.as_bytes(), addr) {
                warn!("telling the service manager {text:?}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_manager_socket() {
        let dir = std::env::temp_dir().join(format!("balancer-sm-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        let mut sm = ServiceManager {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
            raw: None,
            watchdog: Some(Duration::from_secs(2)),
            predecessor: None,
        };
        assert!(sm.active());
        assert_eq!(sm.watchdog_interval(), Some(Duration::from_secs(1)));
        sm.send("READY=1\nSTATUS=ok");
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_manager_nothing_is_sent() {
        let mut sm = ServiceManager::none();
        assert!(!sm.active());
        assert_eq!(sm.watchdog_interval(), None);
        sm.send("READY=1");
    }
}
