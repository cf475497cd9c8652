//! Stopping the controller (SIGTERM): new connections are refused while the workers drain
//! what is queued, so that a stop costs no connection the kernel had already accepted.
use std::{
    io::ErrorKind as IoKind,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{balancer_bin, read_answer, send_request, sum, Balancer};

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
