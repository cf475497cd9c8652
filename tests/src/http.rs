//! A plain HTTP client for real servers (their answers are not the demo worker's): one
//! `GET /` per connection, `Connection: close`, a 200 expected; and a bounded load of such
//! requests that a test can pause (nothing in flight) around a `kill -9`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::IO_TIMEOUT;

/// What a real server answered: its status code and headers, and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The header lines, as sent.
    pub headers: Vec<String>,
    /// The body.
    pub body: String,
}

impl HttpAnswer {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `GET /` over a new connection, read to the server's close. An error unless the whole
/// answer came and its status is 200.
pub fn http_get(addr: SocketAddr) -> std::io::Result<HttpAnswer> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    if status != 200 {
        return Err(bad());
    }
    Ok(HttpAnswer {
        status,
        headers: lines.map(str::to_owned).collect(),
        body: body.to_owned(),
    })
}

/// Client threads doing [`http_get`] in a loop, bounded in count and time, counting answers
/// and failures; [`HttpLoad::pause`] holds them between requests.
pub struct HttpLoad {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicUsize>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<Vec<HttpAnswer>>>,
}

/// Requests per client thread at most.
const MAX_REQUESTS: u32 = 50_000;
/// How long the load may run at most.
const MAX_RUN: Duration = Duration::from_secs(90);

impl HttpLoad {
    /// `threads` unpinned client threads on `addr`.
    pub fn start(addr: SocketAddr, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, paused, idle) = (stop.clone(), paused.clone(), idle.clone());
                let (answered, failed) = (answered.clone(), failed.clone());
                thread::spawn(move || {
                    let deadline = Instant::now() + MAX_RUN;
                    let mut out = Vec::new();
                    for _ in 0..MAX_REQUESTS {
                        if paused.load(Ordering::SeqCst) {
                            idle.fetch_add(1, Ordering::SeqCst);
                            while paused.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                                thread::sleep(Duration::from_millis(1));
                            }
                            idle.fetch_sub(1, Ordering::SeqCst);
                        }
                        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                            break;
                        }
                        match http_get(addr) {
                            Ok(a) => {
                                out.push(a);
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                eprintln!("client: {e}");
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        thread::sleep(Duration::from_micros(500));
                    }
                    out
                })
            })
            .collect();
        Self {
            stop,
            paused,
            idle,
            answered,
            failed,
            threads,
        }
    }

    /// Waits for `n` more answers (all threads together). Panics after 30 s.
    pub fn wait_answers(&self, n: u64) {
        let until = self.answered.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered.load(Ordering::SeqCst) < until {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} answers in 30 s ({} failed so far)",
                self.failed()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Holds every client thread between two requests: when this returns, none has a
    /// connection open (so a worker killed now holds nothing of ours).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + IO_TIMEOUT * 2;
        while self.idle.load(Ordering::SeqCst) < self.threads.len() {
            assert!(Instant::now() < deadline, "the clients did not pause");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets the clients go on.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Failures so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stops the clients; returns (every answer, failures).
    pub fn finish(self) -> (Vec<HttpAnswer>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
        let answers = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (answers, self.failed.load(Ordering::SeqCst))
    }
}
