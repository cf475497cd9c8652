//! The control socket and what it reports, against the real kernel: its defences against bad
//! requests and other users, status, metrics, pinning for bpftool, one controller per socket.
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
fn metrics_are_served_in_prometheus_text_format() {
    let b = Balancer::start(&["--workers", "2", "--metrics", "127.0.0.1:0", "--bpf-stats"]);
    let url = b
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .expect("metrics line")
        .trim_end_matches("/metrics")
        .to_owned();
    for _ in 0..10 {
        get(b.addrs[0]).unwrap();
    }
    let mut s = std::net::TcpStream::connect(&url).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with("balancer_selections_total{") && l.contains("path=\"cpu\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 10, "{text}");
    for family in [
        "balancer_select_errors_total",
        "balancer_worker_restarts_total",
        "balancer_accept_queue_depth",
        "balancer_worker_state{slot=\"0\",state=\"ready\"} 1",
        "balancer_policy_info{policy=\"cpu\"} 1",
        "balancer_program_runs_total",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let status = b.status();
    assert!(
        status.bpf_ns_per_selection.is_some_and(|ns| ns > 0.0),
        "{status:?}"
    );
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
