//! Bad input gets a clear message naming cause and fix, and a non-zero exit; never a panic.
use std::{
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
};

use balancer_tests::{require_root, run_to_end, Finished};

fn assert_refused(f: &Finished, needles: &[&str]) {
    assert!(!f.status.success(), "must fail: {}", f.stderr);
    assert!(!f.stderr.contains("panicked"), "panicked:\n{}", f.stderr);
    for n in needles {
        assert!(f.stderr.contains(n), "stderr lacks {n:?}:\n{}", f.stderr);
    }
    assert!(
        !f.stdout.contains("listening on"),
        "started anyway: {}",
        f.stdout
    );
}

#[test]
fn without_cap_bpf_it_says_to_run_as_root() {
    require_root();
    let f = run_to_end(&["run", "--listen", "127.0.0.1:0"], |cmd| {
        // SAFETY: prctl between fork and exec; drops the capabilities from the bounding set so
        // the exec'd balancer runs as root without CAP_BPF and CAP_SYS_ADMIN.
        unsafe {
            cmd.pre_exec(|| {
                for cap in [39, 21] {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    });
    assert_refused(&f, &["CAP_BPF", "run as root"]);
}

#[test]
fn an_address_held_without_reuseport_names_the_holder() {
    require_root();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let f = run_to_end(&["run", "--listen", &addr], |_| {});
    let holder = format!("pid {}", std::process::id());
    assert_refused(&f, &[&addr, "without SO_REUSEPORT", &holder]);
}

#[test]
fn an_address_with_another_process_in_its_group_is_refused() {
    require_root();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.listen(16).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap().to_string();
    let f = run_to_end(&["run", "--listen", &addr], |_| {});
    let holder = format!("pid {}", std::process::id());
    assert_refused(&f, &[&addr, "must own the whole group", &holder]);
}

#[test]
fn bad_flags_are_rejected_with_the_accepted_values() {
    for (args, needles) in [
        (vec!["--policy", "random"], vec!["random", "cpu", "hash"]),
        (vec!["--workers", "0"], vec!["0", "1..=128"]),
        (vec!["--workers", "5000"], vec!["5000", "1..=128"]),
        (vec!["--listen", "localhost:80"], vec!["localhost:80"]),
        (
            vec!["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
            vec!["given twice"],
        ),
        // An absurd duration would overflow the clock when added to it.
        (vec!["--grace", "1000000000y"], vec!["longer than a day"]),
        (
            vec!["--user", "no-such-user-balancer"],
            vec!["no-such-user-balancer", "no such user"],
        ),
        (
            vec!["--stall-timeout", "1ms", "--sample-interval", "1ms"],
            vec!["--stall-timeout 1ms", "--sample-interval 1ms"],
        ),
    ] {
        let mut all = vec!["run"];
        all.extend(&args);
        let f = run_to_end(&all, |_| {});
        assert_refused(&f, &needles);
    }
}

#[test]
fn a_missing_or_unexecutable_worker_command_is_refused() {
    require_root();
    let f = run_to_end(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            "/nonexistent/server",
        ],
        |_| {},
    );
    assert_refused(&f, &["/nonexistent/server", "not found"]);
    let f = run_to_end(
        &["run", "--listen", "127.0.0.1:0", "--", "no-such-server-xyz"],
        |_| {},
    );
    assert_refused(&f, &["no-such-server-xyz", "not found in PATH"]);

    let dir = std::env::temp_dir().join(format!("balancer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("server.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = run_to_end(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            script.to_str().unwrap(),
        ],
        |_| {},
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_refused(&f, &["not executable", "chmod +x"]);
}

#[test]
fn too_few_file_descriptors_for_the_sockets_are_refused() {
    let f = run_to_end(
        &[
            "run",
            "--workers",
            "128",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.2:0",
        ],
        |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit between fork and exec is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 100,
                        rlim_max: 100,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    assert_refused(
        &f,
        &[
            "320 file descriptors",
            "RLIMIT_NOFILE allows 100",
            "ulimit -n",
        ],
    );
}
