//! Nothing the bench started outlives it: when it returns, fails, panics, or is stopped by
//! SIGINT, SIGTERM or SIGHUP, every process it caused is killed.
//!
//! Two ways to find them, because nginx hides one: the controllers and demo workers carry the
//! bench's tag ([`TAG_VAR`]) in their environment (found by [`kill_tagged`], which also kills
//! their process groups); nginx rewrites its environment for its process titles, so its masters
//! are found by the scratch directory on their command line ([`nginx::sweep`]), with their group
//! (their worker processes).
use std::{
    fs::File,
    io::Read,
    os::fd::FromRawFd,
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
};

use anyhow::{Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use balancer_bench::process::{alive, kill_tagged, new_tag, tagged_pids, TAG_VAR};

use crate::nginx;

/// Set once a stop signal came: the bench is ending, and what fails from then on (the
/// processes it waits for are being killed) is no error to report.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether a stop signal came ([`STOPPING`]).
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// The write end of the pipe the stop signals' handler writes to (-1 until installed).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// The stop signals' handler: hands the signal to the cleanup thread (write(2) is
/// async-signal-safe). A handler, not a blocked mask and a waiting thread, because children
/// inherit a blocked mask (the controllers would never see their SIGTERM), while handlers are
/// reset to the default by exec.
extern "C" fn on_stop_signal(sig: libc::c_int) {
    let byte = sig as u8;
    // SAFETY: write(2) of one byte from a local to the pipe (or to -1, which fails).
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::SeqCst),
            (&byte as *const u8).cast(),
            1,
        )
    };
}

/// Kills what the bench caused when dropped, and on a stop signal.
pub struct Cleanup {
    tag: String,
    scratch: PathBuf,
}

impl Cleanup {
    /// Tags the bench's own environment, so that every process it starts inherits the tag,
    /// and starts the thread that cleans up on a stop signal. Call it before any other thread
    /// starts: the environment must not change while another thread may read it.
    pub fn install(scratch: PathBuf) -> Result<Self> {
        let tag = new_tag();
        // Before any other thread runs (see above); kill_tagged never kills the bench itself.
        std::env::set_var(TAG_VAR, &tag);
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("making the stop-signal pipe");
        }
        // SAFETY: the read end is ours alone from here on.
        let mut read_end = unsafe { File::from_raw_fd(fds[0]) };
        SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
        let (t, s) = (tag.clone(), scratch.clone());
        std::thread::Builder::new()
            .name("cleanup".into())
            .spawn(move || {
                let mut sig = [0u8; 1];
                if read_end.read_exact(&mut sig).is_ok() {
                    STOPPING.store(true, Ordering::SeqCst);
                    eprintln!(
                        "\nbalancer-bench: signal {}: stopping everything it started",
                        sig[0]
                    );
                    clean(&t, &s);
                    std::process::exit(128 + i32::from(sig[0]));
                }
            })
            .context("starting the cleanup thread")?;
        let action = SigAction::new(
            SigHandler::Handler(on_stop_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only calls write(2).
            unsafe { sigaction(sig, &action) }
                .with_context(|| format!("handling {sig} to clean up"))?;
        }
        Ok(Self { tag, scratch })
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        clean(&self.tag, &self.scratch);
    }
}

fn clean(tag: &str, scratch: &std::path::Path) {
    // SIGTERM first: a controller that stops in order removes its group's record and pins,
    // which a SIGKILLed one leaves behind for adoption. Then SIGKILL whatever is left.
    let running = tagged_pids(tag);
    for &pid in &running {
        // SAFETY: kill(2) on a process carrying the bench's tag.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while running.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tagged = kill_tagged(tag);
    let swept = nginx::sweep(scratch);
    if tagged + swept > 0 {
        eprintln!(
            "balancer-bench: killed {} process(es) left running",
            tagged + swept
        );
    }
    let _ = std::fs::remove_dir_all(scratch);
}
