//! The service manager's file descriptor store, for the group's sockets: every slot's
//! listening socket is kept there under a name (`slot<i>-listen<j>`), and a controller that
//! systemd starts again receives them back as `LISTEN_FDS`/`LISTEN_FDNAMES`. A slot whose
//! worker died while no controller ran then gets its very socket back, with what is queued on
//! it, instead of a new one.
use std::{
    collections::HashMap,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use log::warn;
use socket2::Socket;

/// The first descriptor passed, by the socket-activation protocol.
const LISTEN_FDS_START: RawFd = 3;

/// The store name of slot `slot`'s socket on listen address `address`.
pub fn name(slot: u32, address: usize) -> String {
    format!("slot{slot}-listen{address}")
}

/// (slot, address) from a store name.
pub fn parse_name(name: &str) -> Option<(u32, usize)> {
    let (slot, address) = name.strip_prefix("slot")?.split_once("-listen")?;
    Some((slot.parse().ok()?, address.parse().ok()?))
}

/// The sockets the service manager handed us, by (slot, address).
#[derive(Debug, Default)]
pub struct Stored(pub HashMap<(u32, usize), Socket>);

impl Stored {
    /// Takes the descriptors passed to this controller (`LISTEN_PID` is ours) and removes the
    /// variables, so that nothing we start inherits them. Descriptors with names that are not
    /// ours are closed.
    pub fn from_env() -> Self {
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .is_some_and(|p| p.trim() == std::process::id().to_string());
        let count: Option<RawFd> = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.trim().parse().ok());
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: the controller is still single-threaded here (no runtime yet).
            unsafe { std::env::remove_var(var) };
        }
        let (true, Some(count)) = (ours, count) else {
            return Self::default();
        };
        let mut names = names.split(':');
        let mut stored = HashMap::new();
        for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count.clamp(0, 4096)) {
            // An overstated LISTEN_FDS must not make us own a descriptor that is not open.
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                warn!("LISTEN_FDS names descriptor {fd}, which is not open: ignored");
                continue;
            }
            // SAFETY: by the protocol the manager passed these descriptors to us, numbered from
            // 3; each is owned here exactly once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // Not inherited by the workers (they get theirs placed explicitly).
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let name = names.next().unwrap_or("");
            match parse_name(name) {
                Some(at) => {
                    stored.insert(at, Socket::from(owned));
                }
                None => warn!("descriptor {fd} from the service manager is named {name:?}, not a slot's socket: closed"),
            }
        }
        Self(stored)
    }

    /// Takes slot `slot`'s sockets (one per address in `listen`, each checked to listen on
    /// its address), if all are stored.
    pub fn take_slot(&mut self, slot: u32, listen: &[std::net::SocketAddr]) -> Option<Vec<Socket>> {
        let all = listen.iter().enumerate().all(|(j, addr)| {
            self.0.get(&(slot, j)).is_some_and(|s| {
                s.local_addr().ok().and_then(|a| a.as_socket()) == Some(*addr)
                    && s.is_listener().unwrap_or(false)
            })
        });
        if !all {
            return None;
        }
        (0..listen.len())
            .map(|j| self.0.remove(&(slot, j)))
            .collect()
    }

    /// The inodes of every stored socket: ours, although the service manager holds them
    /// too (the check for strangers in the group must not count them).
    pub fn inodes(&self) -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        self.0
            .values()
            .filter_map(|s| {
                let fd = std::os::fd::AsFd::as_fd(s).try_clone_to_owned().ok()?;
                Some(std::fs::File::from(fd).metadata().ok()?.ino())
            })
            .collect()
    }

    /// The names of the sockets still stored here (not taken for the group).
    pub fn names(&self) -> Vec<String> {
        self.0.keys().map(|(slot, j)| name(*slot, *j)).collect()
    }

    /// How many slots, 0.., have every socket stored for `listen`.
    pub fn slots(&self, listen: &[std::net::SocketAddr]) -> u32 {
        let mut n = 0;
        while n < balancer_common::MAX_SLOTS
            && (0..listen.len()).all(|j| {
                self.0.get(&(n, j)).is_some_and(|s| {
                    s.local_addr().ok().and_then(|a| a.as_socket()) == listen.get(j).copied()
                        && s.is_listener().unwrap_or(false)
                })
            })
        {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(name(3, 1), "slot3-listen1");
        assert_eq!(parse_name("slot3-listen1"), Some((3, 1)));
        assert_eq!(parse_name("slot3"), None);
        assert_eq!(parse_name("stored"), None);
        assert_eq!(parse_name("slotx-listen0"), None);
    }
}
