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
        assert!(env.contains("NOTIFY_SOCKET=@balancer/"), "{env}");
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
