//! The control socket and what it reports, against the real kernel: its defences against bad
//! requests and other users, its directory, status, pinning for bpftool, one controller per
//! socket.
use std::{
    collections::HashMap,
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
};

use balancer::control::protocol::{decode_reply, Reply};
use balancer_common::{maps, PROGRAM_SELECT};
use balancer_tests::{
    alive, balancer_bin, frame, get, ok, parse_cli_error, pids, pinned_dir, raw_exchange,
    run_to_end, scratch_dir, sum, unique_path, Balancer, BpfFs, ErrorKind, ErrorReply, PolicyName,
    SlotState, StatusReport, IO_TIMEOUT,
};

#[test]
fn the_control_socket_answers_bad_requests_and_stays_up_unchanged() {
    let b = Balancer::start(&["--workers", "2"]);
    let before = b.status();
    assert_eq!(before.slots.len(), 2, "{before:?}");
    let policy_before = b.policy();
    for (bytes, kind) in [
        (
            b"this is not a frame at all\n".to_vec(),
            ErrorKind::TooLarge,
        ),
        ((1u32 << 30).to_be_bytes().to_vec(), ErrorKind::TooLarge),
        (frame(b"{{{ not json"), ErrorKind::Malformed),
        (
            frame(br#"{"version":1,"request":{"type":"explode"}}"#),
            ErrorKind::UnknownRequest,
        ),
        (
            frame(br#"{"version":7,"request":{"type":"status"}}"#),
            ErrorKind::WrongVersion,
        ),
        (
            frame(br#"{"version":1,"request":{"type":"scale","workers":"lots"}}"#),
            ErrorKind::UnknownRequest,
        ),
    ] {
        match raw_exchange(&b.control, &bytes) {
            Err(e) => {
                assert_eq!(e.kind, kind, "{e:?}");
                assert!(!e.message.is_empty(), "{e:?}");
            }
            Ok(reply) => panic!("expected a {kind:?} error, got {reply:?}"),
        }
    }
    // A good request on the same kind of connection still works.
    match raw_exchange(
        &b.control,
        &frame(br#"{"version":1,"request":{"type":"policy"}}"#),
    ) {
        Ok(Reply::Policy(p)) => assert_eq!(p, policy_before),
        other => panic!("expected the policy, got {other:?}"),
    }
    let after = b.status();
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(after.policy, PolicyName::Cpu);
    assert_eq!(after.policy, before.policy);
    assert_eq!(b.policy(), policy_before);
    let mode = std::fs::metadata(&b.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_peer_of_another_uid_may_not_change_anything() {
    const NOBODY: u32 = 65534;
    let b = Balancer::start(&["--workers", "2"]);
    // A copy of the CLI that uid 65534 can execute, wherever the build tree is.
    let dir = unique_path("nobody");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(scratch_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = dir.join("balancer");
    std::fs::copy(balancer_bin(), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new(&cli)
            .args(args)
            .arg("--control")
            .arg(&b.control)
            .arg("--json")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let refused = |args: &[&str]| -> ErrorReply {
        let (success, out, err) = as_nobody(args);
        assert!(!success, "{args:?} as uid {NOBODY} must fail: {out}");
        parse_cli_error(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{err}"))
    };
    let before = b.status();
    assert_eq!(before.slots.len(), 2, "{before:?}");
    let policy_before = b.policy();
    // Mode 0600: the socket itself keeps other users out. The CLI cannot connect, so there is
    // no reply and no kind: its message must name the cause and the fix.
    let (success, out, err) = as_nobody(&["policy", "set", "hash"]);
    assert!(!success && err.contains("permission denied"), "{err}");
    assert!(err.contains("run as root"), "{err}");
    assert!(out.is_empty(), "no reply to print: {out}");
    // Opened up by an operator: the controller still checks SO_PEERCRED on every change.
    std::fs::set_permissions(&b.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = refused(&["policy", "set", "hash"]);
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    // No field carries the peer's uid: the message is the evidence that SO_PEERCRED was read.
    assert!(e.message.contains("uid 65534 "), "{e:?}");
    let e = refused(&["workers", "scale", "1"]);
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    let (success, out, err) = as_nobody(&["status"]);
    assert!(success, "reading is allowed to whoever can connect: {err}");
    let seen: StatusReport = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(pids(&seen), pids(&before));
    let status = b.status();
    assert_eq!(status.policy, PolicyName::Cpu);
    assert_eq!(status.slots.len(), 2, "{status:?}");
    assert_eq!(
        pids(&status),
        pids(&before),
        "nothing was restarted or scaled"
    );
    assert_eq!(b.policy(), policy_before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_json_matches_the_workers() {
    let b = Balancer::start(&["--workers", "3", "--policy", "hash"]);
    let mut served: HashMap<u32, u32> = HashMap::new();
    for _ in 0..300 {
        let a = get(b.addrs[0]).unwrap();
        served.insert(a.slot, a.pid);
    }
    let status = b.status();
    assert_eq!(status.pid, b.pid());
    assert_eq!(status.listen, [b.addrs[0].to_string()]);
    assert_eq!(status.policy, PolicyName::Hash);
    assert_eq!(status.slots.len(), 3, "{status:?}");
    for (i, s) in status.slots.iter().enumerate() {
        assert_eq!(s.slot, i as u32, "{status:?}");
        assert_eq!(s.pid, Some(served[&s.slot]), "slot {}", s.slot);
        assert_eq!(s.state, SlotState::Ready, "{s:?}");
        assert!(alive(served[&s.slot]));
    }
    assert_eq!(sum(&status, |s| s.steered), 300);
    let table = ok(&b.cli(&["status"])).to_owned();
    assert!(table.contains("SLOT") && table.contains("QUEUE"), "{table}");
}

#[test]
fn program_and_maps_are_pinned_for_bpftool_and_unpinned_on_exit() {
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("group");
    let mut b = Balancer::start(&["--workers", "2", "--bpffs-dir", dir.to_str().unwrap()]);
    let addr_dir = pinned_dir(&dir, b.addrs[0]);
    for name in [
        PROGRAM_SELECT,
        maps::SOCKETS,
        maps::CONFIG,
        maps::TABLES,
        maps::COUNTERS,
    ] {
        assert!(
            addr_dir.join(name).exists(),
            "{name} pinned under {}",
            addr_dir.display()
        );
    }
    let (status, _) = b.stop();
    assert!(status.success());
    assert!(!dir.exists(), "unpinned on a clean exit");
}

#[test]
fn a_second_controller_on_the_same_control_socket_is_refused() {
    let b = Balancer::start(&["--workers", "1"]);
    let f = run_to_end(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--control",
            b.control.to_str().unwrap(),
        ],
        |_| {},
    );
    assert!(!f.status.success());
    assert!(
        f.stderr.contains(&format!(
            "another balancer (pid {}) is already running",
            b.pid()
        )),
        "{}",
        f.stderr
    );
}

/// Pins go exactly where they were put and only they are removed: an operator's directory
/// with other pins keeps them, and the root of a BPF filesystem is refused.
#[test]
fn unpinning_removes_only_what_the_controller_pinned() {
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("shared");
    let foreign = dir.join("someone-else");
    std::fs::create_dir_all(&foreign).unwrap();
    let mut b = Balancer::start(&["--workers", "1", "--bpffs-dir", dir.to_str().unwrap()]);
    let addr_dir = pinned_dir(&dir, b.addrs[0]);
    assert!(addr_dir.join(PROGRAM_SELECT).exists());
    let (status, _) = b.stop();
    assert!(status.success());
    assert!(!addr_dir.exists(), "our pins are removed");
    assert!(foreign.exists(), "pins that are not ours were removed");
    let f = run_to_end(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--bpffs-dir",
            bpffs.path().to_str().unwrap(),
        ],
        |_| {},
    );
    assert!(!f.status.success());
    assert!(
        f.stderr.contains("is the root of a BPF filesystem"),
        "{}",
        f.stderr
    );
}

/// 5,000 random and truncated frames at a live controller: every complete one is answered,
/// none changes anything, and the controller stays up.
#[test]
fn five_thousand_random_frames_change_nothing() {
    let b = Balancer::start(&["--workers", "2", "--policy", "hash"]);
    let before = b.status();
    let policy_before = b.policy();
    let status_frame = frame(
        &balancer::control::protocol::encode_request(&balancer::control::protocol::Request::Status)
            .unwrap(),
    );
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut answered = 0;
    let mut conn = UnixStream::connect(&b.control).unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    for i in 0..5_000u32 {
        let bytes: Vec<u8> = match next() % 3 {
            // Noise as the payload of a well-formed frame: answered with an error.
            0 => frame(&(0..next() % 200).map(|_| next() as u8).collect::<Vec<_>>()),
            // A valid status request with its payload damaged.
            1 => {
                let mut f = status_frame.clone();
                let at = 4 + (next() as usize) % (f.len() - 4);
                f[at] = next() as u8;
                f
            }
            // A truncated frame, then the connection is dropped: nothing to answer.
            _ => {
                let mut f = status_frame.clone();
                f.truncate(1 + (next() as usize) % (f.len() - 1));
                f
            }
        };
        let complete = bytes.len() >= 4
            && u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
                == bytes.len() - 4;
        conn.write_all(&bytes).unwrap();
        if complete {
            let mut len = [0u8; 4];
            conn.read_exact(&mut len)
                .unwrap_or_else(|e| panic!("frame {i} got no reply: {e}"));
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            conn.read_exact(&mut body).unwrap();
            match decode_reply(&body).expect("a reply frame") {
                Ok(Reply::Status(_)) | Err(_) => {}
                Ok(other) => panic!("frame {i} changed something: {other:?}"),
            }
            answered += 1;
        } else {
            conn = UnixStream::connect(&b.control).unwrap();
            conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        }
    }
    assert!(answered > 1_000, "{answered} answered");
    let after = b.status();
    assert_eq!(after.pid, before.pid, "the controller stayed up");
    assert_eq!(after.policy, before.policy);
    assert_eq!(
        after
            .slots
            .iter()
            .map(|s| (s.pid, s.state, s.restarts))
            .collect::<Vec<_>>(),
        before
            .slots
            .iter()
            .map(|s| (s.pid, s.state, s.restarts))
            .collect::<Vec<_>>()
    );
    assert_eq!(b.policy(), policy_before);
}

/// The control socket's directory: one the controller creates is 0700 (and the socket in it
/// 0600); a directory that is a symbolic link, writable by other users, or another user's is
/// refused at start, with the cause and the fix, and nothing is put in it.
#[test]
fn the_control_socket_directory_is_private_and_unsafe_ones_are_refused() {
    /// Removes the test's directories whether it passes or not.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let scratch = Scratch(unique_path("control-dirs"));
    let root = &scratch.0;
    let path = root.join("created").join("ctl.sock");
    let b = Balancer::start_at(&path, &["--workers", "1"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root.join("created")), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(b.status().slots.len(), 1);
    drop(b);

    let refused = |dir: &std::path::Path| {
        let control = dir.join("ctl.sock");
        let f = run_to_end(
            &[
                "run",
                "--listen",
                "127.0.0.1:0",
                "--control",
                control.to_str().unwrap(),
            ],
            |_| {},
        );
        assert!(!f.status.success(), "{} was accepted", dir.display());
        f.stderr
    };
    let real = root.join("real");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, root.join("link")).unwrap();
    let err = refused(&root.join("link"));
    assert!(
        err.contains("is a symbolic link") && err.contains("--control"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "nothing in the link's target"
    );

    let open = root.join("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused(&open);
    assert!(
        err.contains("writable by other users") && err.contains("chmod go-w"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);

    let foreign = root.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let err = refused(&foreign);
    assert!(err.contains("belongs to uid 65534"), "{err}");
}
