//! The metrics endpoint against a real controller: Prometheus text from a snapshot that
//! follows the traffic, and scrapers that idle connections and slow requests cannot lock out.
use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use balancer_tests::{get, Balancer, IO_TIMEOUT};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The metrics address a controller printed.
fn metrics_addr(b: &Balancer) -> String {
    b.stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .expect("metrics line")
        .trim_end_matches("/metrics")
        .to_owned()
}

/// One scrape on a new connection: the whole response, or why there is none.
fn scrape(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The sum of a counter family's samples whose line contains `filter`.
fn total(text: &str, family: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Scrapes until `done` holds for the answer (up to 10 s); returns the last answer.
fn scrape_until(addr: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr).unwrap_or_else(|e| format!("no answer: {e}"));
        if done(&text) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A metrics answer whose snapshot shows slot 0 ready (the first snapshot may be older than
/// the worker's readiness).
fn shows_ready(text: &str) -> bool {
    text.starts_with("HTTP/1.1 200 OK")
        && text.contains("balancer_worker_state{slot=\"0\",state=\"ready\"} 1")
}

#[test]
fn metrics_are_served_in_prometheus_text_format_and_follow_the_traffic() {
    let b = Balancer::start(&["--workers", "2", "--metrics", "127.0.0.1:0", "--bpf-stats"]);
    let addr = metrics_addr(&b);
    let first = scrape_until(&addr, |t| t.starts_with("HTTP/1.1 200 OK"));
    assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
    assert_eq!(
        total(&first, "balancer_selections_total{", "path=\"cpu\""),
        0,
        "{first}"
    );
    for _ in 0..10 {
        get(b.addrs[0]).unwrap();
    }
    // The snapshot is refreshed on the controller's tick: the counters catch up.
    let text = scrape_until(&addr, |t| {
        total(t, "balancer_selections_total{", "path=\"cpu\"") == 10
    });
    assert_eq!(
        total(&text, "balancer_selections_total{", "path=\"cpu\""),
        10,
        "{text}"
    );
    for family in [
        "balancer_select_errors_total",
        "balancer_worker_restarts_total",
        "balancer_accept_queue_depth",
        "balancer_worker_state{slot=\"0\",state=\"ready\"} 1",
        "balancer_policy_info{policy=\"cpu\"} 1",
        "balancer_program_runs_total",
        "balancer_metrics_snapshot_timestamp_seconds",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let status = b.status();
    assert!(
        status.bpf_ns_per_selection.is_some_and(|ns| ns > 0.0),
        "{status:?}"
    );
}

/// 40 connections that send nothing (more than the endpoint serves at once, from the same
/// address as the scraper) do not keep a scrape out: it is answered on its first try.
#[test]
fn forty_idle_connections_do_not_lock_a_scraper_out() {
    let b = Balancer::start(&["--workers", "1", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&b);
    let ready = scrape_until(&addr, shows_ready);
    assert!(shows_ready(&ready), "{ready}");
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // Accepted after every idle connection: the one attempt must be answered.
    let text = scrape(&addr).unwrap_or_else(|e| panic!("no answer: {e}"));
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("balancer_worker_state{slot=\"0\",state=\"ready\"} 1"),
        "{text}"
    );
    drop(idle);
}

/// A request head trickled a byte at a time is cut off at the header deadline with 408,
/// long before the trickle ends.
#[test]
fn a_slow_loris_request_head_is_cut_off() {
    let b = Balancer::start(&["--workers", "1", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&b);
    let ready = scrape_until(&addr, shows_ready);
    assert!(shows_ready(&ready), "{ready}");
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
    // One byte per 100 ms for up to 20 s, stopping as soon as the server answers.
    let started = Instant::now();
    let mut answered = false;
    for _ in 0..200 {
        let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)) == Ok(1) {
            answered = true;
            break;
        }
        if s.write_all(b"a").is_err() {
            break;
        }
    }
    assert!(
        answered,
        "the trickle was never cut off ({:?})",
        started.elapsed()
    );
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 408 Request Timeout"), "{text}");
}
