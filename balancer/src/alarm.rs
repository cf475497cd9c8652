//! A one-shot alarm at an absolute time, on a timerfd: the event loop's wake-up for samples
//! and socket checks.
//!
//! Why not `tokio::time::sleep_until`: the runtime's timer wheel files a deadline more than
//! 64 ms ahead of its 1 ms level (or crossing that level's boundary) on a coarser level, and
//! wakes the process once more to move it down; at the idle sampling pace that was an extra
//! wake-up for most samples. A timerfd wakes the process once, at the deadline.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

/// A timerfd on `CLOCK_MONOTONIC` (the clock [`Instant`] reads), armed for one deadline.
pub struct Alarm {
    fd: AsyncFd<OwnedFd>,
    /// The deadline the timer is armed for (re-arming for the same one is skipped).
    armed: Option<Instant>,
}

impl Alarm {
    /// A disarmed alarm. Must be called within the runtime.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the AsyncFd owns the fd, which stays open and unchanged until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Self { fd, armed: None })
    }

    /// Waits until `at` (at once if it has passed); for ever when `None`. Cancel-safe: a wait
    /// dropped before the deadline leaves the timer armed for the next one.
    pub async fn wait_until(&mut self, at: Option<Instant>) -> io::Result<()> {
        if self.armed != at {
            self.arm(at)?;
        }
        if at.is_none() {
            return std::future::pending().await;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            let read = guard.try_io(|fd| {
                // SAFETY: reads 8 bytes into a buffer of 8.
                let n = unsafe {
                    libc::read(
                        fd.get_ref().as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(Ok(())) => {
                    // Not readable again before the next deadline: without this the next
                    // wait would start with a read that fails.
                    guard.clear_ready();
                    self.armed = None;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                // Readiness left over from an earlier deadline: wait on.
                Err(_would_block) => continue,
            }
        }
    }

    fn arm(&mut self, at: Option<Instant>) -> io::Result<()> {
        let value = match at {
            // A zero value would disarm: a deadline already passed fires in 1 ns.
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                monotonic_now()?
                    .checked_add(left)
                    .unwrap_or(Duration::MAX)
                    .max(Duration::from_nanos(1))
            }
            None => Duration::ZERO,
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(value.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: value.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid timerfd and itimerspec; the old value is not asked for.
        let r = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = at;
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` now, as a duration since its origin.
fn monotonic_now() -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_the_deadline_not_before() {
        let mut alarm = Alarm::new().unwrap();
        let start = Instant::now();
        let at = start + Duration::from_millis(30);
        alarm.wait_until(Some(at)).await.unwrap();
        assert!(Instant::now() >= at);
        // A past deadline fires at once; re-armed after a fired one.
        alarm.wait_until(Some(start)).await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_the_alarm_usable() {
        let mut alarm = Alarm::new().unwrap();
        let soon = Instant::now() + Duration::from_millis(5);
        let late = Instant::now() + Duration::from_secs(60);
        // Cancelled before its deadline, like a select! branch that lost.
        let lost = tokio::time::timeout(Duration::from_millis(1), alarm.wait_until(Some(late)));
        assert!(lost.await.is_err());
        tokio::time::timeout(Duration::from_secs(5), alarm.wait_until(Some(soon)))
            .await
            .expect("the new deadline fires")
            .unwrap();
        // None never fires.
        let never = tokio::time::timeout(Duration::from_millis(20), alarm.wait_until(None));
        assert!(never.await.is_err());
    }
}
