//! The group under test: its controller (started, killed, restarted with the same arguments,
//! upgraded), the CLI against it, its workers' pids, and the cleanup of everything it
//! caused, even when the soak fails: every process carries a tag in its environment, and the
//! group's record and pins are removed at the end.
use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use balancer::control::protocol::{SlotState, StatusReport};
// The tests' tag (`BALANCER_TEST_TAG`) marks every process the soak causes too, so that the
// same cleanup finds the soak's leftovers.
use balancer_bench::process::{kill_tagged, wait_gone, TAG_VAR};

/// How long a controller may take to be ready after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The controller in charge.
enum Controller {
    /// Started by the soak: its child.
    Child(Child),
    /// Put in charge by an upgrade: not the soak's child.
    Other(u32),
    /// None (between a kill and the restart, or after the stop).
    Gone,
}

/// A group under test.
pub struct Group {
    balancer: PathBuf,
    args: Vec<OsString>,
    control: PathBuf,
    name: String,
    tag: String,
    log: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    controller: Controller,
}

impl Group {
    /// Starts `balancer run` with `workers` demo workers under `policy` on a free loopback
    /// port (a real port, so a restarted controller can adopt the group), its control socket
    /// and log in `scratch`; waits until it is ready.
    pub fn start(balancer: &Path, scratch: &Path, workers: u32, policy: &str) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let name = format!("soak-{}", std::process::id());
        let control = scratch.join("control.sock");
        let args: Vec<OsString> = [
            "run",
            "--listen",
            &addr.to_string(),
            "--workers",
            &workers.to_string(),
            "--policy",
            policy,
            "--name",
            &name,
        ]
        .iter()
        .map(OsString::from)
        .chain([OsString::from("--control"), control.clone().into()])
        .collect();
        let mut group = Self {
            balancer: balancer.to_owned(),
            args,
            control,
            tag: name.clone(),
            name,
            log: scratch.join("controller.log"),
            addr,
            controller: Controller::Gone,
        };
        group.launch()?;
        Ok(group)
    }

    /// The controller's log (its workers' too).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts the controller with the group's arguments and waits for its `ready:` line.
    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut child = Command::new(&self.balancer)
            .args(&self.args)
            .env(TAG_VAR, &self.tag)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: Ctrl-C reaches the soak alone, which stops it in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.balancer.display()))?;
        let out = child.stdout.take().context("the controller's stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            // Drained to the end, whoever is listening: a controller an upgrade starts
            // inherits this pipe, and must never write into a closed one.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("ready:") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "the controller was not ready within {READY_TIMEOUT:?}; see {}",
                        self.log.display()
                    );
                }
            }
        }
        self.controller = Controller::Child(child);
        Ok(())
    }

    /// The controller's pid.
    fn controller_pid(&self) -> Option<u32> {
        match &self.controller {
            Controller::Child(c) => Some(c.id()),
            Controller::Other(pid) => Some(*pid),
            Controller::Gone => None,
        }
    }

    /// SIGKILL to the controller (its workers keep serving), then `balancer run` with the
    /// same arguments, which adopts them; returns once it is ready.
    pub fn kill_and_restart_controller(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.controller, Controller::Gone) {
            Controller::Child(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Controller::Other(pid) => {
                // SAFETY: kill(2) on the controller an upgrade of this group put in charge.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                if !wait_gone(pid, Duration::from_secs(10)) {
                    bail!("controller pid {pid} still runs 10 s after SIGKILL");
                }
            }
            Controller::Gone => bail!("no controller to kill"),
        }
        self.launch()
    }

    /// `balancer upgrade` to the same binary; returns once the new controller is in charge.
    pub fn upgrade(&mut self) -> Result<()> {
        let reply = self.cli(&[
            "upgrade".as_ref(),
            "--binary".as_ref(),
            self.balancer.clone().as_os_str(),
        ])?;
        let pid: u32 = reply
            .split("-> pid ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no new controller pid in {reply:?}"))?;
        if let Controller::Child(child) = &mut self.controller {
            let _ = child.wait();
        }
        self.controller = Controller::Other(pid);
        Ok(())
    }

    /// Runs `balancer ARGS --control …`; its stdout, or an error with its output.
    pub fn cli(&self, args: &[&std::ffi::OsStr]) -> Result<String> {
        let out = Command::new(&self.balancer)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .env(TAG_VAR, &self.tag)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running balancer {args:?}"))?;
        if !out.status.success() {
            bail!(
                "balancer {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `balancer status --json`.
    pub fn status(&self) -> Result<StatusReport> {
        let text = self.cli(&["status".as_ref(), "--json".as_ref()])?;
        serde_json::from_str(&text)
            .with_context(|| format!("balancer status --json is not a status report: {text}"))
    }

    /// The pid of slot `slot`'s worker.
    pub fn worker_pid(&self, slot: u32) -> Result<u32> {
        let status = self.status()?;
        status
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .and_then(|s| s.pid)
            .with_context(|| format!("slot {slot} has no worker: {:?}", status.slots))
    }

    /// Waits until the group has `workers` slots, each with a ready worker; the last status
    /// seen in the error otherwise.
    pub fn settle(&self, workers: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status() {
                Ok(s)
                    if s.slots.len() == workers as usize
                        && s.slots
                            .iter()
                            .all(|x| x.state == SlotState::Ready && x.pid.is_some()) =>
                {
                    return Ok(())
                }
                Ok(s) => s
                    .slots
                    .iter()
                    .map(|x| format!("slot {} {:?} pid {:?}", x.slot, x.state, x.pid))
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the group was not back to {workers} ready workers within {timeout:?}: {last}"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the controller in order (SIGTERM: it stops its workers and removes the group's
    /// record and pins), then kills whatever of the tag is left and removes what a controller
    /// that did not stop cleanly left behind. Idempotent; also run on drop.
    pub fn stop(&mut self) {
        if let Some(pid) = self.controller_pid() {
            // SAFETY: kill(2) on this group's controller.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let _ = wait_gone(pid, Duration::from_secs(15));
        }
        if let Controller::Child(mut child) =
            std::mem::replace(&mut self.controller, Controller::Gone)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_tagged(&self.tag);
        balancer::group_state::GroupRecord::remove(&balancer::group_state::record_dir(
            Path::new(balancer::group_state::STATE_ROOT),
            &self.name,
        ));
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf/balancer").join(&self.name));
        let _ = std::fs::remove_file(&self.control);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}
