//! The soak's load: an open-loop client at a fixed rate (new connections whether or not
//! earlier ones were answered) and closed-loop clients (the next connection once the last is
//! answered). Both record every failed connection with its times and client address, for
//! [`crate::attribution`].
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use balancer_bench::client::{parse_answer, poll_readable, raise_fd_limit, REQUEST};

use crate::attribution::{Failure, Why};

/// Deadline of one connection, from connect to the end of the answer: longer than the
/// longest SIGSTOP the schedule makes, so a stopped worker delays but never fails one.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Upper bound on connections per closed-loop client, whatever the speed.
const MAX_PER_CLIENT: u64 = 5_000_000;

/// What the clients share: the time origin, the stop flag, counters and failures.
pub struct Tally {
    origin: Instant,
    stop: AtomicBool,
    /// Connections started.
    pub opened: AtomicU64,
    /// Connections answered in full.
    pub answered: AtomicU64,
    failures: Mutex<Vec<Failure>>,
}

impl Tally {
    fn since(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.origin)
    }

    fn fail(&self, t0: Instant, client: Option<SocketAddr>, why: Why) {
        let f = Failure {
            start: self.since(t0),
            end: self.since(Instant::now()),
            client,
            why,
        };
        if let Ok(mut v) = self.failures.lock() {
            v.push(f);
        }
    }
}

/// Running clients.
pub struct Load {
    tally: Arc<Tally>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Starts the open-loop client at `rate` per second for at most `duration`, and
    /// `closed` closed-loop clients, against `addr`; times count from `origin`.
    pub fn start(
        addr: SocketAddr,
        rate: u32,
        closed: u32,
        duration: Duration,
        origin: Instant,
    ) -> Self {
        raise_fd_limit();
        let tally = Arc::new(Tally {
            origin,
            stop: AtomicBool::new(false),
            opened: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let t = tally.clone();
        threads.push(thread::spawn(move || open_loop(addr, rate, duration, &t)));
        for k in 0..closed {
            let t = tally.clone();
            // Each closed-loop client from its own source address, as in the benchmark.
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (k % 200) as u8));
            threads.push(thread::spawn(move || closed_loop(addr, source, &t)));
        }
        Self { tally, threads }
    }

    /// The counters and failures so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Stops opening connections, waits for the ones in flight (at most [`DEADLINE`]), and
    /// returns (opened, answered, failures).
    pub fn finish(self) -> (u64, u64, Vec<Failure>) {
        self.tally.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let failures = self
            .tally
            .failures
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        (
            self.tally.opened.load(Ordering::SeqCst),
            self.tally.answered.load(Ordering::SeqCst),
            failures,
        )
    }
}

/// Connects from `source` (or any loopback address) with the deadline.
fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(source) = source {
        s.bind(&SocketAddr::new(source, 0).into())?;
    }
    s.connect_timeout(&addr.into(), DEADLINE)?;
    Ok(s.into())
}

fn closed_loop(addr: SocketAddr, source: IpAddr, tally: &Tally) {
    let mut text = String::with_capacity(256);
    for _ in 0..MAX_PER_CLIENT {
        if tally.stop.load(Ordering::Relaxed) {
            return;
        }
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut stream = match connect(addr, Some(source)) {
            Ok(s) => s,
            Err(_) => {
                tally.fail(t0, None, Why::Connect);
                continue;
            }
        };
        let client = stream.local_addr().ok();
        if stream.set_read_timeout(Some(DEADLINE)).is_err() || stream.write_all(REQUEST).is_err() {
            tally.fail(t0, client, Why::Write);
            continue;
        }
        text.clear();
        match stream.read_to_string(&mut text) {
            Ok(_) if parse_answer(&text).is_some() => {
                tally.answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => tally.fail(t0, client, Why::NoAnswer),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                tally.fail(t0, client, Why::TimedOut)
            }
            Err(_) => tally.fail(t0, client, Why::Read),
        }
    }
}

/// One open-loop connection in flight.
struct Pending {
    stream: TcpStream,
    client: Option<SocketAddr>,
    t0: Instant,
    text: Vec<u8>,
}

/// Opens a connection every 1/rate s from one thread (poll(2) for the answers). Bounded: at
/// most `rate × duration` connections, and it returns by `duration + DEADLINE`.
fn open_loop(addr: SocketAddr, rate: u32, duration: Duration, tally: &Tally) {
    let total = (f64::from(rate) * duration.as_secs_f64()) as u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut pending: Vec<Pending> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let stopping = tally.stop.load(Ordering::Relaxed) || sent >= total;
        if stopping && pending.is_empty() {
            return;
        }
        let now = Instant::now();
        while !stopping
            && sent < total
            && start + duration.mul_f64(sent as f64 / total as f64) <= now
        {
            sent += 1;
            tally.opened.fetch_add(1, Ordering::Relaxed);
            let t0 = Instant::now();
            let mut stream = match connect(addr, None) {
                Ok(s) => s,
                Err(_) => {
                    tally.fail(t0, None, Why::Connect);
                    continue;
                }
            };
            let client = stream.local_addr().ok();
            if stream.write_all(REQUEST).is_err() || stream.set_nonblocking(true).is_err() {
                tally.fail(t0, client, Why::Write);
                continue;
            }
            pending.push(Pending {
                stream,
                client,
                t0,
                text: Vec::new(),
            });
        }
        let ready = poll_readable(pending.iter().map(|p| &p.stream));
        let mut keep = Vec::with_capacity(pending.len());
        for (mut p, readable) in pending.into_iter().zip(ready) {
            let mut done = false;
            if readable {
                match p.stream.read(&mut buf) {
                    Ok(0) => {
                        done = true;
                        let text = String::from_utf8_lossy(&p.text);
                        if parse_answer(&text).is_some() {
                            tally.answered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.fail(p.t0, p.client, Why::NoAnswer);
                        }
                    }
                    Ok(n) => p.text.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        done = true;
                        tally.fail(p.t0, p.client, Why::Read);
                    }
                }
            }
            if !done && p.t0.elapsed() > DEADLINE {
                done = true;
                tally.fail(p.t0, p.client, Why::TimedOut);
            }
            if !done {
                keep.push(p);
            }
        }
        pending = keep;
    }
}
