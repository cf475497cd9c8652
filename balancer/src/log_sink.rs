//! Log output that never blocks the controller.
//!
//! The controller logs on the thread that supervises the workers and forwards the program's
//! log. Writing to a stderr nobody reads fast enough (a full pipe, a stuck journal) would stop
//! supervision with it. So lines go into a bounded queue and a thread of their own writes
//! them out; when the queue is full a line is dropped, counted, and the count is reported in
//! the output once it moves again.
use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Lines the queue holds before new ones are dropped.
pub const CAPACITY: usize = 4096;

enum Message {
    Line(Vec<u8>),
    /// Everything sent before has been written: acknowledge.
    Flush(SyncSender<()>),
}

/// The writing end for the logger: every write is one log record, queued without waiting.
pub struct NonBlocking {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

/// Waits, at exit, for the queued lines to be written.
#[derive(Clone)]
pub struct Flusher {
    tx: SyncSender<Message>,
}

/// A non-blocking writer in front of `out`, which a thread of its own writes to.
pub fn non_blocking<W: Write + Send + 'static>(
    out: W,
    capacity: usize,
) -> io::Result<(NonBlocking, Flusher)> {
    let (tx, rx) = mpsc::sync_channel(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    let gap = dropped.clone();
    thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_out(&rx, out, &gap))?;
    Ok((
        NonBlocking {
            tx: tx.clone(),
            dropped,
        },
        Flusher { tx },
    ))
}

impl Write for NonBlocking {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A full queue drops the line and counts it for the writer to report; a writer that
        // is gone leaves nothing to do.
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Message::Line(buf.to_vec())) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Flusher {
    /// Waits at most `timeout` for every line logged so far to be written.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (ack, done) = mpsc::sync_channel(1);
        let mut message = Message::Flush(ack);
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => return,
            }
        }
        let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The writer thread: lines in order, each gap reported before the line after it.
fn write_out<W: Write>(rx: &Receiver<Message>, mut out: W, dropped: &AtomicU64) {
    let report_gap = |out: &mut W| {
        let gap = dropped.swap(0, Ordering::Relaxed);
        if gap > 0 {
            let _ = writeln!(
                out,
                "[balancer] {gap} log line(s) dropped: the log output was not read fast enough"
            );
        }
    };
    while let Ok(message) = rx.recv() {
        match message {
            Message::Line(line) => {
                report_gap(&mut out);
                let _ = out.write_all(&line);
            }
            Message::Flush(ack) => {
                // A gap at the very end (the exit's flush) is reported too.
                report_gap(&mut out);
                let _ = out.flush();
                let _ = ack.try_send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    /// An output that blocks every write until opened, like a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Gate {
        fn open(&self) {
            let (lock, cv) = &*self.open;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_never_blocks_the_logger_and_the_gap_is_reported() {
        let gate = Gate::default();
        let (mut w, flusher) = non_blocking(gate.clone(), 4).unwrap();
        // The writer thread takes the first line and blocks on it; 4 more fill the queue; the
        // rest are dropped. None of the 100 writes waits.
        for i in 0..100 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        gate.open();
        flusher.flush(Duration::from_secs(10));
        // The gap is reported by the flush itself, with no line after it.
        assert!(
            gate.text().contains("log line(s) dropped"),
            "{}",
            gate.text()
        );
        w.write_all(b"after\n").unwrap();
        flusher.flush(Duration::from_secs(10));
        let text = gate.text();
        let lines: Vec<&str> = text.lines().collect();
        // What was kept is the oldest lines, in order: the queue's capacity and the one the
        // writer was blocked on.
        let kept: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("line "))
            .collect();
        let expected: Vec<String> = (0..kept.len()).map(|i| format!("line {i}")).collect();
        assert_eq!(kept, expected, "{text}");
        assert!((4..=5).contains(&kept.len()), "{text}");
        let kept = kept.len();
        let note = format!("[balancer] {} log line(s) dropped", 100 - kept);
        assert!(
            lines.iter().any(|l| l.starts_with(&note)),
            "expected {note:?} in:\n{text}"
        );
        assert_eq!(lines.last(), Some(&"after"), "{text}");
    }

    #[test]
    fn flush_waits_for_every_queued_line() {
        let gate = Gate::default();
        gate.open();
        let (mut w, flusher) = non_blocking(gate.clone(), 64).unwrap();
        for i in 0..50 {
            w.write_all(format!("{i}\n").as_bytes()).unwrap();
        }
        flusher.flush(Duration::from_secs(10));
        assert_eq!(gate.text().lines().count(), 50);
    }
}
