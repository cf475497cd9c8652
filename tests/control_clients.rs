//! Clients of the control socket cannot hold the controller up: idle connections give way
//! and do not pile up, and a client that never reads its replies is disconnected, while
//! `balancer status` keeps answering.
use std::{
    io::Write,
    os::{fd::AsFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use balancer::control::{
    protocol::{encode_request, Request},
    server::{MAX_PER_UID, WRITE_DEADLINE},
};
use balancer_tests::Balancer;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Whether the controller has closed its end of `s` (without reading from it).
fn hung_up(s: &UnixStream) -> bool {
    // POLLHUP is reported whatever is asked for: no POLLIN, as unread replies may be there.
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// Waits up to `timeout` for `done`.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The controller's open file descriptors.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_clients_give_way_to_the_cli_and_never_pile_up() {
    const IDLE: usize = 200;
    let b = Balancer::start(&["--workers", "1"]);
    let before = fds(b.pid());
    let idle: Vec<UnixStream> = (0..IDLE)
        .map(|_| UnixStream::connect(&b.control).unwrap())
        .collect();
    // The CLI connects after all of them (as the same uid) and is answered.
    let status = b.status();
    assert_eq!(status.slots.len(), 1, "{status:?}");
    // Every idle connection beyond the limit was closed by the controller...
    let closed = || idle.iter().filter(|s| hung_up(s)).count();
    assert!(
        wait_until(Duration::from_secs(10), || closed() >= IDLE - MAX_PER_UID),
        "{} of {IDLE} idle connections closed; at most {MAX_PER_UID} may stay",
        closed()
    );
    // ...so its descriptors did not grow with them.
    let held = fds(b.pid());
    assert!(
        held <= before + MAX_PER_UID + 2,
        "{held} descriptors open, {before} before {IDLE} idle clients"
    );
}

#[test]
fn a_client_that_never_reads_its_replies_is_disconnected_and_others_are_answered() {
    let b = Balancer::start(&["--workers", "1"]);
    let mut s = UnixStream::connect(&b.control).unwrap();
    s.set_nonblocking(true).unwrap();
    let payload = encode_request(&Request::Status).unwrap();
    let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    // Status requests until the socket takes no more for a while: the replies fill our
    // receive side, the controller's reply cannot be written, it stops reading, and our
    // sends stay blocked.
    let mut sent = 0u32;
    let mut at = 0;
    let sending = Instant::now();
    while sending.elapsed() < Duration::from_secs(20) {
        match s.write(&frame[at..]) {
            Ok(n) => {
                at += n;
                if at == frame.len() {
                    at = 0;
                    sent += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
                if poll(&mut fds, PollTimeout::from(500u16)) == Ok(0) {
                    break;
                }
            }
            Err(e) => panic!("after {sent} requests: {e}"),
        }
    }
    assert!(sent > 0);
    // Meanwhile another client is answered.
    assert_eq!(b.status().slots.len(), 1);
    // The reply not taken within the write deadline ends the connection.
    assert!(
        wait_until(WRITE_DEADLINE * 4, || hung_up(&s)),
        "the controller still holds the connection of a client that reads nothing ({sent} requests sent)"
    );
    assert_eq!(b.status().slots.len(), 1);
}
