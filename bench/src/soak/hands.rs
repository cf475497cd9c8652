//! What a worker holds when it is killed: the connections it accepted and has not closed.
//!
//! The worker's own record of what it accepted is its file table: an accepted connection is
//! an open socket there from the moment accept(2) returns until the worker closes it. A log
//! the worker wrote itself would miss the connection it accepted an instant before the kill,
//! and the soak must tell that one apart from a connection the group lost. So the soak
//! stops the worker (SIGSTOP, every thread), reads its file table, and only then kills it.
use std::{
    collections::HashSet,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use socket2::SockRef;

/// Whether every thread of `pid` is stopped (state `T`), from /proc.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        any = true;
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if !state_of(&stat).is_some_and(|s| s == 'T' || s == 't') {
            return false;
        }
    }
    any
}

/// The state letter of a `/proc/PID/stat` line (after the command name, which may hold
/// spaces and parentheses).
fn state_of(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits until every thread of `pid` is stopped; whether it was within `timeout`.
pub fn wait_stopped(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !all_threads_stopped(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
    true
}

/// The peer addresses of the connected TCP sockets that `pid` holds to `service` (its
/// listening address): copies of its descriptors (pidfd_getfd), asked for their addresses
/// and closed again at once, so the kill that follows resets the same connections as without
/// this look.
pub fn held_connections(pid: u32, service: SocketAddr) -> Result<HashSet<SocketAddr>> {
    let pidfd = balancer::pidfd::open(pid).with_context(|| format!("pidfd_open({pid})"))?;
    let dir = format!("/proc/{pid}/fd");
    let mut held = HashSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // Closed by the worker since the listing (it is stopped, so only before): skipped.
        let Ok(copy) = balancer::pidfd::get_fd(&pidfd, fd) else {
            continue;
        };
        let sock = SockRef::from(&copy);
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        if let (Some(local), Some(peer)) = (local, peer) {
            if local == service {
                held.insert(peer);
            }
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_command_name_whatever_it_holds() {
        assert_eq!(state_of("42 (balancer) T 1 42"), Some('T'));
        assert_eq!(state_of("42 (a) b) (c) S 1 42"), Some('S'));
        assert_eq!(state_of("garbage"), None);
    }

    #[test]
    fn a_connection_held_by_a_stopped_process_is_listed() {
        use std::{io::Read, net::TcpListener, net::TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let service = listener.local_addr().unwrap();
        let client = TcpStream::connect(service).unwrap();
        // A child that inherits the accepted connection and sits stopped with it.
        let (accepted, _) = listener.accept().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                accepted.try_clone().unwrap(),
            )))
            .spawn()
            .unwrap();
        drop(accepted);
        let pid = child.id();
        // SAFETY: signals to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        assert!(wait_stopped(pid, Duration::from_secs(5)));
        let held = held_connections(pid, service).unwrap();
        assert_eq!(held, HashSet::from([client.local_addr().unwrap()]));
        // Our look closed its copies: the kill ends the connection.
        let _ = child.kill();
        let _ = child.wait();
        let mut buf = [0u8; 1];
        let mut client = client;
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
    }
}
