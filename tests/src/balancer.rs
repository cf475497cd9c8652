//! A running controller: started as `balancer run`, read through its stdout, stderr and control
//! socket, and cleaned up with everything it started.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use balancer::control::protocol::{ErrorReply, PolicyReport, StatusReport};

use crate::{
    balancer_bin, kill_tagged, new_tag, parse_cli_error, parse_report, require_root, run_to_end,
    unique_path, wait_timeout, Crashed, Finished, Report, IO_TIMEOUT, START_TIMEOUT, TAG_VAR,
};

/// How to start a controller, kept to start it again: `BINARY run --control PATH ARGS`, with
/// `BALANCER_TEST_TAG=TAG` and `ENV` added to the test's environment.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub(crate) binary: PathBuf,
    pub(crate) control: PathBuf,
    /// The `run` arguments after `--control PATH`, `--listen` included.
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    /// Empty once the tag's processes are someone else's to clean up.
    pub(crate) tag: String,
}

impl Launch {
    /// A new controller: a fresh control path and tag; without a `--listen` before `--`, a
    /// free port of 127.0.0.1 (never the default 8080: tests run in parallel).
    fn new(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all: Vec<String> = Vec::new();
        if listen_count(args) == 0 {
            all.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Self {
            binary: binary.to_path_buf(),
            control: unique_path("control.sock"),
            args: all,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            tag: new_tag(),
        }
    }
}

/// The `--listen` options among the controller's own arguments (those before `--`).
pub(crate) fn listen_count<S: AsRef<str>>(args: &[S]) -> usize {
    args.iter()
        .map(AsRef::as_ref)
        .take_while(|a| *a != "--")
        .filter(|a| *a == "--listen" || a.starts_with("--listen="))
        .count()
}

/// A running controller. Dropping it SIGKILLs the controller (if it still runs) and then every
/// process of its tag ([`kill_tagged`]), whether the test passed or not.
pub struct Balancer {
    child: Child,
    /// Its control socket.
    pub control: PathBuf,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Receiver<()>,
    /// Bound listen addresses, in `--listen` order.
    pub addrs: Vec<SocketAddr>,
    launch: Launch,
}

impl Balancer {
    /// Starts `balancer run ARGS` and waits until every worker is ready.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Like [`Balancer::start`], with `ENV` added to the controller's environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut b = Self::start_unready_with_env(args, env);
        b.wait_ready();
        b
    }

    /// Starts `balancer run ARGS` and waits only for its listening lines. Without a `--listen`,
    /// it listens on a free port of 127.0.0.1 (never the default 8080: tests run in parallel).
    pub fn start_unready(args: &[&str]) -> Self {
        Self::start_unready_with_env(args, &[])
    }

    /// Like [`Balancer::start_unready`], with `ENV` added to the controller's environment.
    pub fn start_unready_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(Launch::new(&balancer_bin(), args, env))
    }

    /// Like [`Balancer::start_unready`], with another copy of the binary.
    pub fn start_binary(binary: &Path, args: &[&str]) -> Self {
        Self::launch(Launch::new(binary, args, &[]))
    }

    /// Like [`Balancer::start`], with its control socket at `control` (a path the test chose,
    /// e.g. in a directory the controller has to create).
    pub fn start_at(control: &Path, args: &[&str]) -> Self {
        let mut launch = Launch::new(&balancer_bin(), args, &[]);
        launch.control = control.to_path_buf();
        let mut b = Self::launch(launch);
        b.wait_ready();
        b
    }

    /// Starts the controller `launch` describes and waits for its listening lines.
    pub(crate) fn launch(launch: Launch) -> Self {
        require_root();
        let mut child = Command::new(&launch.binary)
            .arg("run")
            .arg("--control")
            .arg(&launch.control)
            .args(&launch.args)
            .env(TAG_VAR, &launch.tag)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start balancer");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        // Dropped when the reader ends: at end of file, once the controller and every worker
        // (they log to the controller's stderr) are gone.
        let (stderr_open, stderr_done) = mpsc::channel::<()>();
        thread::spawn(move || {
            let _open = stderr_open;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let listens = listen_count(&launch.args).max(1);
        let mut b = Self {
            child,
            control: launch.control.clone(),
            lines,
            stdout: Vec::new(),
            stderr,
            stderr_done,
            addrs: Vec::new(),
            launch,
        };
        for _ in 0..listens {
            b.wait_line(|l| l.starts_with("listening on "), START_TIMEOUT)
                .unwrap_or_else(|| panic!("balancer did not start; stderr:\n{}", b.stderr()));
        }
        b.addrs = b
            .stdout
            .iter()
            .filter_map(|l| {
                l.strip_prefix("listening on ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        assert!(
            !b.addrs.is_empty(),
            "no `listening on` line: {:?}",
            b.stdout
        );
        b
    }

    /// Waits for the `ready:` line (every worker ready); panics with the log without it.
    pub fn wait_ready(&mut self) {
        self.wait_line(|l| l.starts_with("ready:"), START_TIMEOUT)
            .unwrap_or_else(|| panic!("balancer did not become ready; stderr:\n{}", self.stderr()));
    }

    /// This controller's `BALANCER_TEST_TAG` (its workers inherit it).
    pub fn tag(&self) -> &str {
        &self.launch.tag
    }

    /// Runs `balancer ARGS --control <this controller's socket>` (the CLI), to completion.
    pub fn cli(&self, args: &[&str]) -> Finished {
        let control = self.control.to_str().unwrap().to_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--control", &control]);
        run_to_end(&all, |_| {})
    }

    /// `balancer status --json`, as the library's typed report. Panics with the text when it
    /// does not parse.
    pub fn status(&self) -> StatusReport {
        self.json(&["status", "--json"])
    }

    /// `balancer policy --json`, as the library's typed report. Panics with the text when it
    /// does not parse.
    pub fn policy(&self) -> PolicyReport {
        self.json(&["policy", "--json"])
    }

    /// Runs a CLI command that must succeed and print JSON of type `T`.
    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let f = self.cli(args);
        assert!(f.status.success(), "{args:?} failed: {}", f.stderr);
        serde_json::from_str(&f.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?} does not print a {}: {e}:\n{}",
                std::any::type_name::<T>(),
                f.stdout
            )
        })
    }

    /// Runs a control command with `--json` that the controller must refuse; returns its
    /// typed error (the CLI prints `{"error": KIND, "message": …}` and exits non-zero).
    pub fn cli_error(&self, args: &[&str]) -> ErrorReply {
        let mut all = args.to_vec();
        all.push("--json");
        let f = self.cli(&all);
        assert!(
            !f.status.success(),
            "{args:?} must fail, but succeeded: {}",
            f.stdout
        );
        parse_cli_error(&f.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}\nstdout:\n{}\nstderr:\n{}",
                f.stdout, f.stderr
            )
        })
    }

    /// The stdout lines read so far.
    pub fn stdout_lines(&self) -> &[String] {
        &self.stdout
    }

    /// The controller's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the controller (and its workers) logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for the controller's log (read by another thread) to satisfy
    /// `pred`; returns the log either way.
    pub fn wait_stderr(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if pred(&log) || Instant::now() >= deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a stdout line matching `pred`; returns it.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Asks for the counters table (SIGUSR1) and returns it.
    pub fn report(&mut self) -> Report {
        self.signal(libc::SIGUSR1);
        let n = self.stdout.len();
        self.wait_line(|l| l.starts_with("ADDRESS"), IO_TIMEOUT)
            .expect("counters header");
        // The rows end with a blank line.
        self.wait_line(|l| l.trim().is_empty(), IO_TIMEOUT)
            .expect("end of counters table");
        parse_report(&self.stdout[n..]).expect("the counters table that was waited for")
    }

    /// Sends a signal to the controller.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGTERM, then waits for the exit; returns the exit status and the final counters.
    /// Whatever the controller left running is killed only when the `Balancer` is dropped, so
    /// that the test can look at it first.
    pub fn stop(&mut self) -> (ExitStatus, Report) {
        let (status, report, _) = self.stop_with_log();
        (status, report)
    }

    /// Like [`Balancer::stop`], also returning everything the controller logged.
    pub fn stop_with_log(&mut self) -> (ExitStatus, Report, String) {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits (20 s at most) for a controller that was told to stop to exit; returns the exit
    /// status, the final counters table (which it must have printed) and everything it logged.
    pub fn wait_exit(&mut self) -> (ExitStatus, Report, String) {
        let status = self
            .wait_status(Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "balancer did not exit on SIGTERM; stderr:\n{}",
                    self.stderr()
                )
            });
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout.push(line);
        }
        // The stderr reader ends when the last holder of the pipe (the controller) is gone.
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(5));
        let log = self.stderr();
        let report = parse_report(&self.stdout).unwrap_or_else(|| {
            panic!(
                "the controller ({status}) printed no counters table on exit; stdout:\n{}\nstderr:\n{log}",
                self.stdout.join("\n")
            )
        });
        (status, report, log)
    }

    /// Waits up to `timeout` for the controller to exit (reaping it); its exit status, or
    /// `None` while it still runs.
    pub fn wait_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, timeout)
    }

    /// SIGKILLs the controller (once it runs its event loop) and reaps it, leaving whatever else of its tag runs (its
    /// workers, when they outlive it) to the returned [`Crashed`], which can start it again.
    pub fn crash(mut self) -> Crashed {
        // The controller answers only from its event loop, after it wrote the record of the
        // workers it started: killed before that (just after its `listening on` lines), its
        // workers would be nobody's, which is not the crash these tests are about.
        let _ = self.status();
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        let launch = self.launch.clone();
        // From here on the tag is the `Crashed`'s to clean up, not this value's.
        self.launch.tag.clear();
        Crashed::new(launch, self.addrs.clone(), self.stderr.clone())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A crashed controller's group is the `Crashed`'s (its tag was handed over).
        if !self.launch.tag.is_empty() {
            kill_tagged(&self.launch.tag);
            forget_group(&self.addrs);
        }
    }
}

/// Removes what a controller that did not stop on its own left of its group (a crash, a
/// failed test): the record under /run/balancer and the default pins. A clean stop removed
/// them already.
pub fn forget_group(addrs: &[SocketAddr]) {
    if addrs.is_empty() {
        return;
    }
    let name = balancer::group_state::derive_name(addrs);
    balancer::group_state::GroupRecord::remove(&balancer::group_state::record_dir(
        std::path::Path::new(balancer::group_state::STATE_ROOT),
        &name,
    ));
    let _ = std::fs::remove_dir_all(std::path::Path::new("/sys/fs/bpf/balancer").join(&name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_are_counted_before_the_worker_command_only() {
        assert_eq!(listen_count::<&str>(&[]), 0);
        assert_eq!(
            listen_count(&["--listen", "a", "--listen=b", "--workers", "2"]),
            2
        );
        assert_eq!(
            listen_count(&["--workers", "2", "--", "w", "--listen", "a"]),
            0
        );
    }

    #[test]
    fn a_start_without_a_listen_gets_a_free_loopback_port() {
        let l = Launch::new(Path::new("/bin/balancer"), &["--workers", "2"], &[]);
        assert_eq!(l.args, ["--listen", "127.0.0.1:0", "--workers", "2"]);
        let l = Launch::new(
            Path::new("/b"),
            &["--", "w", "--listen", "x"],
            &[("K", "v")],
        );
        assert_eq!(
            l.args,
            ["--listen", "127.0.0.1:0", "--", "w", "--listen", "x"]
        );
        assert_eq!(l.env, [("K".to_owned(), "v".to_owned())]);
        let l = Launch::new(Path::new("/b"), &["--listen", "[::1]:0"], &[]);
        assert_eq!(l.args, ["--listen", "[::1]:0"]);
        let other = Launch::new(Path::new("/b"), &[], &[]);
        assert_ne!(l.tag, other.tag, "one tag per controller");
        assert_ne!(
            l.control, other.control,
            "one control socket per controller"
        );
    }
}
