//! The controller under a service manager (systemd `Type=notify`), with the test playing the
//! manager: it owns the `NOTIFY_SOCKET` datagram socket and reads what the controller says.
use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use balancer_tests::{
    alive, get, require_root, run_to_end, unique_path, wait_gone, Balancer, START_TIMEOUT,
};

/// Receives datagrams until one satisfies `pred` (or the deadline passes); returns them all.
fn until(manager: &UnixDatagram, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let Ok(n) = manager.recv(&mut buf) else {
            continue;
        };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = pred(&msg);
        got.push(msg);
        if done {
            break;
        }
    }
    got
}

/// The pids of the controller's children (its workers).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn the_manager_hears_ready_status_watchdog_and_stopping() {
    require_root();
    let path = unique_path("manager.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Only the listening lines are waited for: READY=1 must come from the controller.
    let mut b = Balancer::start_unready_with_env(
        &["--listen", "127.0.0.1:0", "--workers", "2"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let said = until(&manager, START_TIMEOUT, |m| m.contains("READY=1"));
    assert!(said.iter().any(|m| m == "READY=1"), "{said:?}");
    assert!(
        said.iter()
            .any(|m| m == "STATUS=2 of 2 slots live, policy cpu"),
        "STATUS before READY: {said:?}"
    );
    // READY=1 means the workers serve.
    assert_eq!(b.addrs.len(), 1, "{:?}", b.stdout_lines());
    assert!(get(b.addrs[0]).is_ok());
    // Keep-alives at half the watchdog timeout: three within a few timeouts.
    let pings = until(&manager, Duration::from_secs(10), {
        let seen = std::cell::Cell::new(0);
        move |m| {
            seen.set(seen.get() + usize::from(m == "WATCHDOG=1"));
            seen.get() >= 3
        }
    });
    assert!(
        pings.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3,
        "{pings:?}"
    );
    // The watchdog is the controller's: the workers do not inherit it.
    let pid = b.pid();
    let workers = children(pid);
    assert_eq!(workers.len(), 2, "{workers:?}");
    for w in &workers {
        let env = std::fs::read(format!("/proc/{w}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        assert!(env.contains("NOTIFY_SOCKET=/run/balancer/"), "{env}");
        assert!(!env.contains("WATCHDOG_USEC"), "{env}");
    }
    // SIGTERM: STOPPING=1, then an orderly exit.
    b.signal(libc::SIGTERM);
    let said = until(&manager, Duration::from_secs(10), |m| m == "STOPPING=1");
    assert!(said.iter().any(|m| m == "STOPPING=1"), "{said:?}");
    let status = b.wait_status(Duration::from_secs(20)).expect("exit");
    assert!(status.success(), "{status}");
    for w in workers {
        assert!(
            wait_gone(w, Duration::from_secs(5)),
            "worker {w} still runs"
        );
        assert!(!alive(w));
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_bad_notify_socket_or_watchdog_is_refused_before_anything_starts() {
    for (var, value, needle) in [
        (
            "NOTIFY_SOCKET",
            "relative/notify",
            "NOTIFY_SOCKET=\"relative/notify\"",
        ),
        ("WATCHDOG_USEC", "soon", "WATCHDOG_USEC=\"soon\""),
    ] {
        let f = run_to_end(&["run", "--listen", "127.0.0.1:0"], |cmd| {
            cmd.env("NOTIFY_SOCKET", unique_path("unused.sock"));
            cmd.env(var, value);
        });
        assert!(!f.status.success(), "{var}={value} was accepted");
        assert!(f.stderr.contains(needle), "{}", f.stderr);
        assert!(!f.stdout.contains("listening on"), "{}", f.stdout);
    }
}

/// Receives the manager's messages with the descriptors they carry (the fd store), until
/// `names` are all stored; returns each stored name with its descriptor.
fn stored_fds(
    manager: &UnixDatagram,
    names: &[&str],
    timeout: Duration,
) -> std::collections::HashMap<String, std::os::fd::OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::{AsRawFd, FromRawFd};
    let deadline = Instant::now() + timeout;
    let mut store = std::collections::HashMap::new();
    while Instant::now() < deadline && !names.iter().all(|n| store.contains_key(*n)) {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<UnixAddr>(
            manager.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            continue;
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().expect("control messages") {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel just gave us these descriptors.
                fds.extend(
                    r.into_iter()
                        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .map(str::to_owned);
        if text.lines().any(|l| l == "FDSTORE=1") {
            if let (Some(name), Some(fd)) = (name, fds.pop()) {
                store.insert(name, fd);
            }
        }
    }
    store
}

/// With systemd's descriptor store, a worker that dies while no controller runs loses
/// nothing: its socket stays open in the store, what reaches it queues there, and the next
/// controller (given the store back as LISTEN_FDS) puts a new worker on that very socket.
#[test]
fn the_fd_store_keeps_a_dead_workers_queue_until_the_next_controller() {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    require_root();
    let path = unique_path("fdstore.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let b = Balancer::start_with_env(
        &[
            "--workers",
            "2",
            "--policy",
            "hash",
            "--ready-timeout",
            "300ms",
        ],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let addr = b.addrs[0];
    let names = ["slot0-listen0", "slot1-listen0"];
    let store = stored_fds(&manager, &names, START_TIMEOUT);
    assert!(
        names.iter().all(|n| store.contains_key(*n)),
        "{:?}",
        store.keys()
    );
    let before: Vec<u32> = b.status().slots.iter().filter_map(|s| s.pid).collect();
    assert_eq!(before.len(), 2);
    let crashed = b.crash();
    // SAFETY: kill(2) on a worker of this test.
    assert_eq!(unsafe { libc::kill(before[1] as i32, libc::SIGKILL) }, 0);
    assert!(wait_gone(before[1], Duration::from_secs(5)));
    // Requests sent now: the ones steered to slot 1 wait in its queue (its socket lives on in
    // the store); none may fail.
    let waiting: Vec<_> = (0..60)
        .map(|_| balancer_tests::send_request(addr).expect("connected"))
        .collect();
    // The next controller, as systemd would start it: the store as LISTEN_FDS (fd 3, 4),
    // LISTEN_PID its own pid (set by the shell it execs from), the same arguments.
    let fds: [i32; 2] = [store[names[0]].as_raw_fd(), store[names[1]].as_raw_fd()];
    let control = crashed.control().to_path_buf();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(balancer_tests::balancer_bin())
        .args(["run", "--listen", &addr.to_string(), "--workers", "2"])
        .args(["--policy", "hash", "--ready-timeout", "300ms", "--control"])
        .arg(&control)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(balancer_tests::TAG_VAR, crashed.tag())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    // SAFETY: only fcntl and dup2 between fork and exec (async-signal-safe, no allocation):
    // every source is parked above 100 first, so that placing fd 3 cannot overwrite a source
    // still to be placed.
    unsafe {
        cmd.pre_exec(move || {
            let mut parked = [-1; 2];
            for (p, fd) in parked.iter_mut().zip(&fds) {
                *p = libc::fcntl(*fd, libc::F_DUPFD, 100);
                if *p < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, p) in parked.iter().enumerate() {
                if libc::dup2(*p, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut next = cmd.spawn().expect("start the next controller");
    let answers: Vec<_> = waiting
        .into_iter()
        .map(|s| balancer_tests::read_answer(s).expect("a queued request was lost"))
        .collect();
    assert_eq!(answers.len(), 60);
    assert!(
        answers.iter().any(|a| !before.contains(&a.pid)),
        "slot 1's queue was served by its new worker"
    );
    // SAFETY: SIGTERM to the controller this test started.
    unsafe { libc::kill(next.id() as i32, libc::SIGTERM) };
    let status = balancer_tests::wait_timeout(&mut next, Duration::from_secs(20)).expect("exit");
    assert!(status.success(), "{status}");
    drop(crashed);
    let _ = std::fs::remove_file(&path);
}
