//! Closed-loop load: one client thread per CPU, pinned, each from its own 127.x.y.z source
//! address, connecting as fast as answers come back. Any HTTP 200 counts as served; the
//! answer's `pid=` (the demo worker, the bench's nginx) gives the spread over workers, and the
//! demo worker's CPU fields give locality.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use socket2::{Domain, Socket, Type};

use balancer_bench::client::{client_source, parse_served, pin_thread, CLOSE_REQUEST};

/// Hard deadline of one connection.
const DEADLINE: Duration = Duration::from_secs(2);
/// Upper bound on connections per thread and run, whatever the rate.
const MAX_PER_THREAD: u64 = 2_000_000;

/// What one closed-loop run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// Answered connections.
    pub connections: u64,
    /// Failed ones (refused, reset, deadline).
    pub failed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Machine-wide busy CPU time during the run (/proc/stat).
    pub cpu_busy: Duration,
    /// Connect time, µs.
    pub connect: Histogram<u64>,
    /// Time to first byte after connect, µs.
    pub ttfb: Histogram<u64>,
    /// Connections per worker pid.
    pub per_worker: HashMap<u32, u64>,
    /// Connections handled on the CPU that received them.
    pub local: u64,
    /// Connections whose answer said where they were handled (the demo worker's).
    pub located: u64,
}

impl RunResult {
    fn empty() -> Self {
        Self {
            connections: 0,
            failed: 0,
            elapsed: Duration::ZERO,
            cpu_busy: Duration::ZERO,
            connect: histogram(),
            ttfb: histogram(),
            per_worker: HashMap::new(),
            local: 0,
            located: 0,
        }
    }

    /// New connections per second.
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }

    /// Busy CPU time per connection, µs.
    pub fn cpu_per_connection_us(&self) -> f64 {
        self.cpu_busy.as_secs_f64() * 1e6 / self.connections.max(1) as f64
    }

    /// Share of connections handled on their RX CPU, of those whose answer said (`None`
    /// when none did: nginx does not know its connections' RX CPU).
    pub fn locality(&self) -> Option<f64> {
        (self.located > 0).then(|| self.local as f64 / self.located as f64)
    }

    /// Coefficient of variation and max/min of the per-worker counts.
    pub fn evenness(&self, workers: usize) -> (f64, f64) {
        let mut counts: Vec<f64> = self.per_worker.values().map(|c| *c as f64).collect();
        counts.resize(workers.max(counts.len()), 0.0);
        let mean = counts.iter().sum::<f64>() / counts.len().max(1) as f64;
        let var =
            counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len().max(1) as f64;
        let (min, max) = counts
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
        (var.sqrt() / mean.max(1e-9), max / min.max(1.0))
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs one client thread per CPU for `duration`.
pub fn closed_loop(addr: SocketAddr, cpus: &[u32], duration: Duration) -> RunResult {
    let busy0 = cpu_busy();
    let start = Instant::now();
    let threads: Vec<_> = cpus
        .iter()
        .enumerate()
        .map(|(k, &cpu)| {
            thread::spawn(move || {
                pin_thread(cpu);
                let source = IpAddr::V4(client_source(k));
                client_thread(addr, source, start + duration)
            })
        })
        .collect();
    let mut total = RunResult::empty();
    for t in threads {
        let Ok(r) = t.join() else { continue };
        total.connections += r.connections;
        total.failed += r.failed;
        total.local += r.local;
        total.located += r.located;
        let _ = total.connect.add(&r.connect);
        let _ = total.ttfb.add(&r.ttfb);
        for (pid, n) in r.per_worker {
            *total.per_worker.entry(pid).or_default() += n;
        }
    }
    total.elapsed = start.elapsed();
    total.cpu_busy = cpu_busy().saturating_sub(busy0);
    total
}

fn client_thread(addr: SocketAddr, source: IpAddr, end: Instant) -> RunResult {
    let mut r = RunResult::empty();
    let mut text = String::with_capacity(256);
    for _ in 0..MAX_PER_THREAD {
        if Instant::now() >= end {
            break;
        }
        let t0 = Instant::now();
        let result = (|| -> std::io::Result<(Duration, Duration)> {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.bind(&SocketAddr::new(source, 0).into())?;
            s.connect_timeout(&addr.into(), DEADLINE)?;
            let connected = t0.elapsed();
            let mut stream: TcpStream = s.into();
            stream.set_read_timeout(Some(DEADLINE))?;
            stream.write_all(CLOSE_REQUEST)?;
            let mut first = [0u8; 1];
            stream.read_exact(&mut first)?;
            let ttfb = t0.elapsed() - connected;
            text.clear();
            text.push(first[0] as char);
            stream.read_to_string(&mut text)?;
            Ok((connected, ttfb))
        })();
        match (result, parse_served(&text)) {
            (Ok((c, t)), Some(a)) => {
                r.connections += 1;
                let _ = r.connect.record(c.as_micros().max(1) as u64);
                let _ = r.ttfb.record(t.as_micros().max(1) as u64);
                if let Some(pid) = a.pid {
                    *r.per_worker.entry(pid).or_default() += 1;
                }
                if let Some(local) = a.local {
                    r.located += 1;
                    r.local += u64::from(local);
                }
            }
            _ => r.failed += 1,
        }
    }
    r
}

/// Busy time of all CPUs so far (user, nice, system, irq, softirq, steal), from /proc/stat.
fn cpu_busy() -> Duration {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(
                [0, 1, 2, 5, 6, 7]
                    .iter()
                    .filter_map(|i| f.get(*i))
                    .sum::<u64>(),
            )
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}
