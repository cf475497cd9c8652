//! Stopping the controller: on SIGTERM new connections are refused while the workers drain
//! what is queued, so that a stop costs no connection the kernel had already accepted; and
//! a controller that fails to start after pinning leaves no pin behind.
use std::{
    io::ErrorKind as IoKind,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    balancer_bin, pinned_dir, read_answer, run_to_end, send_request, sum, wait_syn_recv, AckDrop,
    Balancer, BpfFs,
};

/// Slow workers (50 accepts/s each) with connections queued on both sockets, then SIGTERM
/// while a client keeps connecting: every connection the kernel accepted, before the stop or
/// during it, is answered, and the stop is visible to clients as a refusal, never a reset.
#[test]
fn a_stop_refuses_new_connections_and_answers_every_queued_one() {
    const QUEUED: usize = 60;
    let bin = balancer_bin();
    let mut b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--stall-timeout",
        "0",
        "--spill-depth",
        "0",
        "--",
        bin.to_str().unwrap(),
        "demo-worker",
        "--accept-delay",
        "20ms",
    ]);
    let addr = b.addrs[0];
    let mut conns: Vec<TcpStream> = (0..QUEUED)
        .map(|i| send_request(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let status = b.status();
    assert!(
        sum(&status, |s| u64::from(s.queue)) > 0,
        "the test needs connections queued when the stop begins: {status:?}"
    );

    b.signal(libc::SIGTERM);
    // Until the first refusal, the stop has not begun for new connections: each one the
    // kernel accepts meanwhile must be answered too.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut during = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "no new connection was refused within 10 s of SIGTERM ({during} accepted)"
        );
        match send_request(addr) {
            Ok(s) => {
                conns.push(s);
                during += 1;
            }
            Err(e) if e.kind() == IoKind::ConnectionRefused => break,
            Err(e) => panic!("connecting while the controller stops: {e}"),
        }
        thread::sleep(Duration::from_millis(1));
    }
    let total = conns.len();
    for (i, c) in conns.into_iter().enumerate() {
        if let Err(e) = read_answer(c) {
            panic!(
                "connection {i} of {total} was accepted by the kernel but not answered: {e}; \
                 stderr:\n{}",
                b.stderr()
            );
        }
    }
    let (exit, report, _) = b.wait_exit();
    assert!(exit.success(), "{exit:?}");
    let refused: u64 = report.unattributed.iter().map(|u| u.counters.refused).sum();
    assert!(
        refused >= 1,
        "the program counts the connections it refused: {report:?}"
    );
}

/// Connections whose client's `connect` returned but whose final ACK has not arrived (held
/// back by nftables) when the stop begins: the drain waits for them, and once the ACKs get
/// through each is answered.
#[test]
fn a_stop_waits_for_connections_still_in_their_handshake() {
    const HALF_OPEN: usize = 20;
    let mut b = Balancer::start(&["--workers", "2", "--policy", "hash", "--grace", "20s"]);
    let addr = b.addrs[0];
    let acks = AckDrop::install(addr);
    let mut conns: Vec<TcpStream> = (0..HALF_OPEN)
        .map(|i| send_request(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert_eq!(
        wait_syn_recv(addr, HALF_OPEN, Duration::from_secs(10)),
        HALF_OPEN,
        "the test needs its connections half-open"
    );
    b.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "no new connection was refused within 10 s of SIGTERM"
        );
        match send_request(addr) {
            // Before the refusal: half-open too, and answered like the others.
            Ok(s) => conns.push(s),
            Err(e) if e.kind() == IoKind::ConnectionRefused => break,
            Err(e) => panic!("connecting while the controller stops: {e}"),
        }
        thread::sleep(Duration::from_millis(1));
    }
    acks.remove();
    let total = conns.len();
    for (i, c) in conns.into_iter().enumerate() {
        if let Err(e) = read_answer(c) {
            panic!(
                "connection {i} of {total}, in its handshake when the stop began, was not \
                 answered: {e}; stderr:\n{}",
                b.stderr()
            );
        }
    }
    let (exit, _, _) = b.wait_exit();
    assert!(exit.success(), "{exit:?}");
}

/// The metrics address is taken: the controller fails after it attached and pinned its
/// program, and the failure removes the pins as a clean exit would.
#[test]
fn a_start_that_fails_after_pinning_removes_the_pins() {
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("group");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken.local_addr().unwrap().to_string();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listen.local_addr().unwrap();
    drop(listen);
    let f = run_to_end(
        &[
            "run",
            "--listen",
            &addr.to_string(),
            "--workers",
            "1",
            "--metrics",
            &metrics,
            "--bpffs-dir",
            dir.to_str().unwrap(),
        ],
        |_| {},
    );
    assert!(!f.status.success(), "{}", f.stderr);
    assert!(
        f.stderr.contains(&format!("serving metrics on {metrics}")),
        "{}",
        f.stderr
    );
    assert!(
        !pinned_dir(&dir, addr).exists(),
        "pins left under {}:\n{}",
        dir.display(),
        f.stderr
    );
    assert!(!dir.exists(), "the directory it created is removed too");
}
