//! Talking to demo workers over loopback: one request per connection, the answer parsed, and
//! open-loop load with per-connection deadlines.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// Per-connection deadline of [`send_request`] and [`read_answer`].
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The request every client sends.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: balancer\r\n\r\n";

/// The benchmark's request: one per connection, and it says so, as `wrk -H "Connection: close"`
/// does (a real server such as nginx would otherwise keep the connection open).
pub const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n";

/// Pins the calling thread to one CPU. On loopback the SYN is processed on the connecting
/// thread's CPU, so this decides the RX CPU the steering program sees.
pub fn pin_thread(cpu: u32) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize).expect("CPU id within the CpuSet");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Online CPU ids, from sysfs.
pub fn online_cpus() -> Vec<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut cpus = parse_cpu_list(&text);
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}

/// A kernel CPU list (`0-2,5`, as in `/sys/devices/system/cpu/online` or `Cpus_allowed_list`)
/// → [0, 1, 2, 5]. Parts that do not parse are skipped.
pub fn parse_cpu_list(text: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
            cpus.extend(a..=b);
        }
    }
    cpus
}

/// What a demo worker answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// `BALANCER_SLOT` of the worker.
    pub slot: u32,
    /// The worker's pid.
    pub pid: u32,
    /// `SO_INCOMING_CPU` of the connection, as the worker saw it.
    pub cpu: u32,
    /// The CPU the worker ran on while answering.
    pub on: u32,
}

impl Answer {
    /// Whether the connection was handled on the CPU that received it.
    pub fn local(&self) -> bool {
        self.cpu == self.on
    }
}

/// Opens a connection and sends a request, without reading the answer yet.
pub fn send_request(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(REQUEST)?;
    Ok(s)
}

/// Reads a demo worker's whole answer from a connection made by [`send_request`].
pub fn read_answer(mut s: TcpStream) -> std::io::Result<Answer> {
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    parse_answer(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer: {text:?}"),
        )
    })
}

/// One request, one answer.
pub fn get(addr: SocketAddr) -> std::io::Result<Answer> {
    read_answer(send_request(addr)?)
}

/// Parses `HTTP/1.1 200 OK … slot=1 pid=42 cpu=0 on=0`.
pub fn parse_answer(text: &str) -> Option<Answer> {
    if !text.starts_with("HTTP/1.1 200 OK") {
        return None;
    }
    let body = text.split("\r\n\r\n").nth(1)?;
    let field = |k: &str| -> Option<u32> {
        body.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
    };
    Some(Answer {
        slot: field("slot")?,
        pid: field("pid")?,
        cpu: field("cpu")?,
        on: field("on")?,
    })
}

/// What any server answered with status 200: the worker's pid when the body names it
/// (`pid=…`: the demo worker, and the benchmark's nginx configuration), and whether the
/// connection was handled on the CPU that received it when the body says (the demo worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The worker's pid, when named.
    pub pid: Option<u32>,
    /// Handled on its RX CPU, when known.
    pub local: Option<bool>,
}

/// Parses any `HTTP/1.x 200` answer (see [`Served`]); `None` for anything else.
pub fn parse_served(text: &str) -> Option<Served> {
    let status = text.lines().next()?;
    let mut parts = status.split_whitespace();
    let (version, code) = (parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") || code != "200" {
        return None;
    }
    if let Some(a) = parse_answer(text) {
        return Some(Served {
            pid: Some(a.pid),
            local: Some(a.local()),
        });
    }
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some(Served {
        pid: body
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("pid=")?.parse().ok()),
        local: None,
    })
}

/// One [`CLOSE_REQUEST`] to any HTTP server; its answer as [`parse_served`] reads it.
pub fn get_served(addr: SocketAddr) -> std::io::Result<Served> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(CLOSE_REQUEST)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    parse_served(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a 200 answer: {text:?}"),
        )
    })
}

/// The closed-loop client thread `k`'s source address: 127.0.0.2, 127.0.0.3, … carrying
/// over into the next octets, so that any CPU count gets distinct addresses in 127/8.
pub fn client_source(k: usize) -> std::net::Ipv4Addr {
    let base = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2));
    // 127/8 holds 2^24 addresses: wrap within it rather than leave it.
    std::net::Ipv4Addr::from(base + (k as u32 % 0x00FF_FFF0))
}

/// What happened to one connection of an open-loop run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The first byte of the answer came after this long.
    Answered(Duration),
    /// No answer within the deadline.
    TimedOut,
    /// Connect, write or read failed (refused, reset).
    Failed,
}

/// An open-loop client: opens connections at `rate` per second for `duration`, whether or not
/// earlier ones were answered, each with a hard `deadline`, all from one thread (poll(2)).
/// Bounded: at most `rate × duration` connections, and it returns by `duration + deadline`.
pub fn open_loop(addr: SocketAddr, rate: u32, duration: Duration, deadline: Duration) -> Vec<Fate> {
    struct Pending {
        stream: TcpStream,
        t0: Instant,
        first: Option<Duration>,
        index: usize,
    }
    raise_fd_limit();
    let total = (f64::from(rate) * duration.as_secs_f64()) as usize;
    let mut fates = vec![Fate::TimedOut; total];
    let mut pending: Vec<Pending> = Vec::new();
    let start = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 4096];
    while sent < total || !pending.is_empty() {
        let now = Instant::now();
        // Send every connection that is due.
        while sent < total && start + duration.mul_f64(sent as f64 / total as f64) <= now {
            match send_request(addr).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(stream) => pending.push(Pending {
                    stream,
                    t0: Instant::now(),
                    first: None,
                    index: sent,
                }),
                Err(_) => fates[sent] = Fate::Failed,
            }
            sent += 1;
        }
        let ready = poll_readable(pending.iter().map(|p| &p.stream));
        let now = Instant::now();
        let mut keep = Vec::with_capacity(pending.len());
        for (mut p, readable) in pending.into_iter().zip(ready) {
            let mut done = None;
            if readable {
                match p.stream.read(&mut buf) {
                    Ok(0) => done = Some(p.first.map_or(Fate::Failed, Fate::Answered)),
                    Ok(_) => {
                        p.first.get_or_insert(now.duration_since(p.t0));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => done = Some(Fate::Failed),
                }
            }
            if done.is_none() && now.duration_since(p.t0) > deadline {
                done = Some(p.first.map_or(Fate::TimedOut, Fate::Answered));
            }
            match done {
                Some(f) => fates[p.index] = f,
                None => keep.push(p),
            }
        }
        pending = keep;
    }
    fates
}

/// How many fates are slow: no first byte within `slow` (timed out and failed included).
pub fn slow(fates: &[Fate], slow: Duration) -> usize {
    fates
        .iter()
        .filter(|f| !matches!(f, Fate::Answered(t) if *t <= slow))
        .count()
}

/// Lets the process hold as many sockets as the hard limit allows.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Waits up to 1 ms for any of `streams` to be readable; says which are (in order).
pub fn poll_readable<'a>(streams: impl Iterator<Item = &'a TcpStream>) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = streams
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: fds is a valid array of pollfd for the length given.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
    fds.iter().map(|fd| fd.revents != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_demo_worker_answers() {
        let a =
            parse_answer("HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\nslot=1 pid=42 cpu=0 on=1\n");
        assert_eq!(
            a,
            Some(Answer {
                slot: 1,
                pid: 42,
                cpu: 0,
                on: 1
            })
        );
        assert!(!a.unwrap().local());
        assert_eq!(parse_answer("HTTP/1.1 500 x\r\n\r\n"), None);
    }

    #[test]
    fn any_200_is_served_and_names_its_pid_when_it_can() {
        let demo = "HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\nslot=1 pid=42 cpu=0 on=0\n";
        assert_eq!(
            parse_served(demo),
            Some(Served {
                pid: Some(42),
                local: Some(true)
            })
        );
        let nginx = "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nConnection: close\r\n\r\npid=7\n";
        assert_eq!(
            parse_served(nginx),
            Some(Served {
                pid: Some(7),
                local: None
            })
        );
        let bare = "HTTP/1.0 200 OK\r\n\r\nhello";
        assert_eq!(
            parse_served(bare),
            Some(Served {
                pid: None,
                local: None
            })
        );
        for bad in [
            "",
            "HTTP/1.1 500 x\r\n\r\n",
            "HTTP/1.1 2000 x",
            "SSH-2.0 200",
        ] {
            assert_eq!(parse_served(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn client_sources_are_distinct_for_many_cpus() {
        use std::net::Ipv4Addr;
        assert_eq!(client_source(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(client_source(253), Ipv4Addr::new(127, 0, 0, 255));
        assert_eq!(client_source(254), Ipv4Addr::new(127, 0, 1, 0));
        let all: std::collections::HashSet<_> = (0..4096).map(client_source).collect();
        assert_eq!(all.len(), 4096);
        assert!((0..4096).map(client_source).all(|a| a.octets()[0] == 127));
    }

    #[test]
    fn slow_counts_late_timed_out_and_failed() {
        let f = [
            Fate::Answered(Duration::from_millis(5)),
            Fate::Answered(Duration::from_secs(2)),
            Fate::TimedOut,
            Fate::Failed,
        ];
        assert_eq!(slow(&f, Duration::from_secs(1)), 3);
    }
}
