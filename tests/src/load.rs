//! A client load for the control tests: threads making connections through phases that the
//! test advances, recording which phase every answer started and ended in.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{get, pin_thread, Answer};

/// Answers each client thread gets in a phase before the test moves on.
pub const PHASE_ANSWERS: u64 = 100;

/// An answer with the phase the request started in and the phase it ended in.
pub type Phased = (u32, u32, Answer);

/// A client loop on one CPU (or unpinned), bounded in count and time, recording every answer
/// with the phase it started and ended in.
pub struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    answered: Vec<Arc<AtomicU64>>,
    threads: Vec<thread::JoinHandle<Vec<Phased>>>,
}

impl Load {
    /// One client thread per entry of `cpus` (pinned to it, or not for `None`), reading the
    /// current phase from `phase`.
    pub fn start(addr: SocketAddr, cpus: &[Option<u32>], phase: Arc<AtomicU32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let answered: Vec<Arc<AtomicU64>> =
            cpus.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let threads = cpus
            .iter()
            .zip(&answered)
            .map(|(&cpu, answered)| {
                let (stop, failed, phase) = (stop.clone(), failed.clone(), phase.clone());
                let answered = answered.clone();
                thread::spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_thread(cpu);
                    }
                    let deadline = Instant::now() + Duration::from_secs(40);
                    let mut out = Vec::new();
                    for _ in 0..40_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let before = phase.load(Ordering::SeqCst);
                        match get(addr) {
                            Ok(a) => {
                                out.push((before, phase.load(Ordering::SeqCst), a));
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                eprintln!("client: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
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
            failed,
            answered,
            threads,
        }
    }

    /// Waits until every client thread has had `n` more answers (a phase long enough to judge,
    /// however slow the machine). Panics after 20 s.
    pub fn wait_answers(&self, n: u64) {
        let start: Vec<u64> = self
            .answered
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .answered
            .iter()
            .zip(&start)
            .any(|(a, s)| a.load(Ordering::SeqCst) < s + n)
        {
            assert!(
                Instant::now() < deadline,
                "the clients got fewer than {n} answers each in 20 s"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients; returns (answers per thread, failures).
    pub fn finish(self) -> (Vec<Vec<Phased>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let answers = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        (answers, self.failed.load(Ordering::Relaxed))
    }
}
