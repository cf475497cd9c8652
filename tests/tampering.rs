//! A worker's tampering with its sockets, deliberate or by accident, is repaired by the
//! controller's socket check (`--socket-check`): a socket it shut down is replaced, a
//! socket array entry emptied is published again, another reuseport program is replaced by
//! ours. Meanwhile every connection is answered.
use std::{
    os::fd::{AsRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData};
use balancer::{
    pidfd,
    steering::{socket_cookie, SockArray},
};
use balancer_common::maps;
use balancer_tests::{get, pinned_dir, sum, Answer, Balancer, BpfFs};

/// How long a repair may take (the check runs every 100 ms here), however slow the machine.
const REPAIR_WAIT: Duration = Duration::from_secs(10);

fn start(extra: &[&str]) -> Balancer {
    let mut args = vec![
        "--workers",
        "2",
        "--policy",
        "hash",
        "--stall-timeout",
        "0",
        "--spill-depth",
        "0",
        "--socket-check",
        "100ms",
    ];
    args.extend_from_slice(extra);
    Balancer::start(&args)
}

/// A copy of the listening socket (fd 3) of slot `slot`'s worker: what the worker holds.
fn workers_socket(b: &Balancer, slot: usize) -> (u32, OwnedFd) {
    let pid = b.status().slots[slot].pid.expect("the slot has a worker");
    let pidfd = pidfd::open(pid).expect("pidfd_open");
    (pid, pidfd::get_fd(&pidfd, 3).expect("pidfd_getfd"))
}

/// Makes connections until `done` says so (every one must be answered), for at most
/// [`REPAIR_WAIT`]; returns how many were made.
fn connect_until(b: &Balancer, what: &str, mut done: impl FnMut(&Answer) -> bool) -> usize {
    let deadline = Instant::now() + REPAIR_WAIT;
    for n in 1.. {
        let answer = get(b.addrs[0])
            .unwrap_or_else(|e| panic!("connection {n}: {e}; stderr:\n{}", b.stderr()));
        if done(&answer) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {REPAIR_WAIT:?} ({n} connections); stderr:\n{}",
            b.stderr()
        );
        thread::sleep(Duration::from_millis(2));
    }
    unreachable!()
}

/// Whether `socket` is listening (`TCP_INFO`'s state).
fn listening(socket: &OwnedFd) -> bool {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; optval/optlen describe `info`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    info.tcpi_state == 10 // TCP_LISTEN
}

/// A worker that shuts its listening socket down (a server's way to stop accepting) takes
/// it out of the group for every worker the slot will ever have. The check puts a new socket
/// in its place and restarts the slot's worker on it; meanwhile the slot's connections fall
/// back to slot 0, and every one is answered.
#[test]
fn a_socket_its_worker_shut_down_is_replaced_and_the_worker_restarted() {
    let mut b = start(&[]);
    let (old, socket) = workers_socket(&b, 1);
    // SAFETY: shutdown(2) on a descriptor we own.
    assert_eq!(
        unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RD) },
        0
    );
    assert!(!listening(&socket));
    let n = connect_until(&b, "slot 1 answering from a new worker", |a| {
        a.slot == 1 && a.pid != old
    });
    let status = b.status();
    assert_eq!(status.slots[1].restarts, 1, "{status:?}");
    assert!(
        !listening(&socket),
        "the old socket is left as its worker made it"
    );
    println!("slot 1 served by a new worker on a new socket after {n} connection(s)");
    let (exit, _) = b.stop();
    assert!(exit.success());
}

#[test]
fn another_reuseport_program_is_replaced_by_ours() {
    let mut b = start(&[]);
    let (_, socket) = workers_socket(&b, 1);
    // A classic BPF reuseport program that always picks the group's first socket: once it is
    // attached, ours no longer runs, and its counters stop.
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: setsockopt with a valid sock_fprog describing `code`, which outlives the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let steered = |b: &Balancer| sum(&b.status(), |s| s.steered);
    let before = steered(&b);
    let n = connect_until(&b, "the program steering again", |_| steered(&b) > before);
    println!("our program steered again after {n} connection(s)");
    let (exit, _) = b.stop();
    assert!(exit.success());
}

#[test]
fn an_emptied_socket_array_entry_is_published_again() {
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("group");
    let mut b = start(&["--bpffs-dir", dir.to_str().unwrap()]);
    let (_, socket) = workers_socket(&b, 1);
    let cookie = socket_cookie(&socket).expect("SO_COOKIE");
    let pinned = pinned_dir(&dir, b.addrs[0]).join(maps::SOCKETS);
    let map = Map::from_map_data(MapData::from_pin(&pinned).unwrap()).unwrap();
    let mut sockets = SockArray::new(map).unwrap();
    assert_eq!(
        sockets.cookie(1).unwrap(),
        Some(cookie),
        "published at start"
    );
    sockets.clear_index(&1).unwrap();
    // Until the repair, slot 1's connections fall back to slot 0; after it, the entry holds
    // the worker's socket again.
    let n = connect_until(&b, "slot 1's entry published again", |_| {
        sockets.cookie(1).unwrap() == Some(cookie)
    });
    connect_until(&b, "slot 1 answering again", |a| a.slot == 1);
    println!("published again after {n} connection(s)");
    let (exit, _) = b.stop();
    assert!(exit.success());
}
