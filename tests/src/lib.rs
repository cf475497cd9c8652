//! Harness for the privileged integration tests: starts the real `balancer` binary (built with
//! its eBPF object by `cargo xtask test`), talks to its workers over loopback, and reads its
//! counters table.
use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

pub use balancer::control::protocol::{
    ErrorKind, ErrorReply, PolicyName, PolicyReport, SlotState, SlotStatus, StatusReport,
};
pub use balancer_common::SlotCounters;

/// How long a balancer may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub use balancer_bench::client::{
    get, online_cpus, open_loop, parse_answer, parse_cpu_list, pin_thread, read_answer,
    send_request, Answer, Fate, IO_TIMEOUT,
};

/// The binary under test: `BALANCER_BIN`, else the workspace's debug build.
pub fn balancer_bin() -> PathBuf {
    let path = std::env::var_os("BALANCER_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/balancer"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: run the integration tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// The online CPUs, for a test that needs at least two (the machine kind has 2).
pub fn two_or_more_cpus() -> Vec<u32> {
    let cpus = online_cpus();
    assert!(
        cpus.len() >= 2,
        "this test needs 2 online CPUs (the machine kind has 2): {cpus:?}"
    );
    cpus
}

/// These tests load eBPF: they need root. Fails (never skips) without it.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests load real eBPF programs and need root: run `cargo xtask test` (it uses sudo)"
    );
}

/// The counters table's columns, as its header names them (`balancer/src/report.rs`).
pub const COLUMNS: [&str; 13] = [
    "ADDRESS",
    "SLOT",
    "PID",
    "STATE",
    "RESTARTS",
    "BY-CPU",
    "BY-HASH",
    "FALLBACK",
    "MIGRATED",
    "SELECT-ERRORS",
    "BY-RR",
    "BY-LL",
    "SPILLED",
];

/// One slot's row of the controller's counters table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Listen address.
    pub addr: SocketAddr,
    /// Slot.
    pub slot: u32,
    /// Worker pid, if one runs.
    pub pid: Option<u32>,
    /// Slot state.
    pub state: SlotState,
    /// Worker replacements.
    pub restarts: u32,
    /// The program's decision counters for this slot and address.
    pub counters: SlotCounters,
}

impl Row {
    /// New connections steered to this slot by any path: exactly what
    /// [`SlotCounters::selected`] counts (migrations and failed selections not included).
    pub fn selected(&self) -> u64 {
        self.counters.selected()
    }
}

/// The `none` row of one address: decisions the program could not charge to any slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unattributed {
    /// Listen address.
    pub addr: SocketAddr,
    /// The unattributed decision counters.
    pub counters: SlotCounters,
}

/// A parsed counters table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One row per address and slot, in table order.
    pub rows: Vec<Row>,
    /// The `none` rows, one per address that has any.
    pub unattributed: Vec<Unattributed>,
}

/// Parses the last counters table in `lines`, reading every column by its header name; `None`
/// when `lines` hold no table. Panics, naming the line, on a header that is not the 13 known
/// columns or on a row it cannot parse: a table the tests cannot read is a failure, never
/// fewer rows.
pub fn parse_report(lines: &[String]) -> Option<Report> {
    let start = lines
        .iter()
        .rposition(|l| l.split_whitespace().any(|c| c == "ADDRESS"))?;
    let header: Vec<&str> = lines[start].split_whitespace().collect();
    let mut sorted_header = header.clone();
    sorted_header.sort_unstable();
    let mut sorted_columns = COLUMNS.to_vec();
    sorted_columns.sort_unstable();
    assert_eq!(
        sorted_header, sorted_columns,
        "counters table header {:?} is not the columns {COLUMNS:?}",
        lines[start]
    );
    let mut report = Report::default();
    for line in lines[start + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
    {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.len() != header.len() {
            bad_row(
                line,
                format!(
                    "{} cells for the {} columns of {:?}",
                    cells.len(),
                    header.len(),
                    lines[start]
                ),
            );
        }
        let cell = |name: &str| -> &str {
            cells[header
                .iter()
                .position(|h| *h == name)
                .expect("the header was checked")]
        };
        let num = |name: &str| -> u64 { parse_cell(line, name, cell(name)) };
        let counters = SlotCounters {
            by_cpu: num("BY-CPU"),
            by_hash: num("BY-HASH"),
            by_round_robin: num("BY-RR"),
            by_least_loaded: num("BY-LL"),
            spilled: num("SPILLED"),
            fallback: num("FALLBACK"),
            migrated: num("MIGRATED"),
            select_error: num("SELECT-ERRORS"),
        };
        let addr = parse_cell(line, "ADDRESS", cell("ADDRESS"));
        if cell("SLOT") == "none" {
            for name in ["PID", "STATE", "RESTARTS"] {
                if cell(name) != "-" {
                    bad_row(
                        line,
                        format!(
                            "the unattributed row has {name} {:?}, not \"-\"",
                            cell(name)
                        ),
                    );
                }
            }
            report.unattributed.push(Unattributed { addr, counters });
            continue;
        }
        report.rows.push(Row {
            addr,
            slot: parse_cell(line, "SLOT", cell("SLOT")),
            pid: match cell("PID") {
                "-" => None,
                pid => Some(parse_cell(line, "PID", pid)),
            },
            state: parse_cell(line, "STATE", cell("STATE")),
            restarts: parse_cell(line, "RESTARTS", cell("RESTARTS")),
            counters,
        });
    }
    Some(report)
}

fn bad_row(line: &str, what: String) -> ! {
    panic!("counters table row {line:?}: {what}")
}

/// Parses the cell of column `name` in `line`, or panics naming both.
fn parse_cell<T: std::str::FromStr>(line: &str, name: &str, cell: &str) -> T
where
    T::Err: std::fmt::Display,
{
    cell.parse()
        .unwrap_or_else(|e| bad_row(line, format!("{name} {cell:?}: {e}")))
}

/// A control socket path no other test uses.
pub fn unique_path(what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = scratch_dir();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{}-{n}-{what}", std::process::id()))
}

/// A directory for the tests' sockets and scripts.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("balancer-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A private BPF filesystem mounted for one test (for `--bpffs-dir`), unmounted on drop.
pub struct BpfFs {
    mnt: PathBuf,
}

impl BpfFs {
    /// Mounts a new bpffs instance on a fresh directory.
    pub fn mount() -> Self {
        let mnt = unique_path("bpffs");
        std::fs::create_dir_all(&mnt).unwrap();
        let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
        // SAFETY: mount(2) with valid C strings; the test owns this private mount point.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        Self { mnt }
    }

    /// The mount point.
    pub fn path(&self) -> &std::path::Path {
        &self.mnt
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.mnt.to_str().unwrap_or_default()) {
            // Detached: a pinned object still open somewhere must not keep the mount around.
            // SAFETY: unmounting what `mount` mounted.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "unmounting the test bpffs {}: {}",
                    self.mnt.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// Where `--bpffs-dir DIR` pins the program and maps of the IPv4 loopback address `addr`.
pub fn pinned_dir(dir: &std::path::Path, addr: SocketAddr) -> PathBuf {
    dir.join(format!("127_0_0_1_{}", addr.port()))
}

/// A running controller.
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
}

impl Balancer {
    /// Starts `balancer run ARGS` and waits until every worker is ready.
    pub fn start(args: &[&str]) -> Self {
        let mut b = Self::start_unready(args);
        b.wait_line(|l| l.starts_with("ready:"), START_TIMEOUT)
            .unwrap_or_else(|| panic!("balancer did not become ready; stderr:\n{}", b.stderr()));
        b
    }

    /// Starts `balancer run ARGS` and waits only for its listening lines. Without a `--listen`,
    /// it listens on a free port of 127.0.0.1 (never the default 8080: tests run in parallel).
    pub fn start_unready(args: &[&str]) -> Self {
        Self::start_binary(&balancer_bin(), args)
    }

    /// Like [`Balancer::start_unready`], with another copy of the binary.
    pub fn start_binary(binary: &std::path::Path, args: &[&str]) -> Self {
        require_root();
        let control = unique_path("control.sock");
        let own = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let listen: &[&str] = if args[..own].contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(binary)
            .arg("run")
            .arg("--control")
            .arg(&control)
            .args(listen)
            .args(args)
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
        // Dropped when the reader ends: at end of file, once the controller is gone.
        let (stderr_open, stderr_done) = mpsc::channel::<()>();
        thread::spawn(move || {
            let _open = stderr_open;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut b = Self {
            child,
            control,
            lines,
            stdout: Vec::new(),
            stderr,
            stderr_done,
            addrs: Vec::new(),
        };
        let listens = args.iter().filter(|a| **a == "--listen").count().max(1);
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

    /// Everything the controller logged so far.
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
    pub fn stop(self) -> (ExitStatus, Report) {
        let (status, report, _) = self.stop_with_log();
        (status, report)
    }

    /// Like [`Balancer::stop`], also returning everything the controller logged.
    pub fn stop_with_log(self) -> (ExitStatus, Report, String) {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits (20 s at most) for a controller that was told to stop to exit; returns the exit
    /// status, the final counters table (which it must have printed) and everything it logged.
    pub fn wait_exit(mut self) -> (ExitStatus, Report, String) {
        let status = wait_timeout(&mut self.child, Duration::from_secs(20)).unwrap_or_else(|| {
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

    /// Kills the controller with SIGKILL and reaps it.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for a child at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Output of a balancer run that is expected to end by itself.
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

/// Runs `balancer ARGS` to completion (20 s at most), optionally adjusting the command first.
pub fn run_to_end(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Finished {
    let mut cmd = Command::new(balancer_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().expect("start balancer");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_timeout(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("balancer {args:?} did not exit within 20 s")
    });
    Finished {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// The CLI's `--json` error output: `{"error": KIND, "message": TEXT}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CliError {
    error: ErrorKind,
    message: String,
}

/// Parses what the CLI prints on stdout when the controller refused a `--json` command.
pub fn parse_cli_error(stdout: &str) -> Result<ErrorReply, String> {
    let e: CliError = serde_json::from_str(stdout)
        .map_err(|e| format!("not a `--json` error reply ({e}): {stdout:?}"))?;
    Ok(ErrorReply::new(e.error, e.message))
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone; returns whether it went within `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| (*l).to_owned()).collect()
    }

    const HEADER: &str = "ADDRESS     SLOT  PID  STATE    RESTARTS  BY-CPU  BY-HASH  FALLBACK  MIGRATED  SELECT-ERRORS  BY-RR  BY-LL  SPILLED";

    #[test]
    fn parses_every_column_of_a_slot_row() {
        let report = parse_report(&lines(&[
            "an older table, ignored",
            HEADER,
            "127.0.0.1:1  0     -    stopped  2         5       6        7         1         8              9      10     11",
            "127.0.0.1:1  1     42   backing-off  0     0       0        0         0         0              0      0      0",
            "",
            "after the table",
        ]))
        .unwrap();
        assert!(report.unattributed.is_empty());
        assert_eq!(report.rows.len(), 2);
        let counters = SlotCounters {
            by_cpu: 5,
            by_hash: 6,
            by_round_robin: 9,
            by_least_loaded: 10,
            spilled: 11,
            fallback: 7,
            migrated: 1,
            select_error: 8,
        };
        assert_eq!(
            report.rows[0],
            Row {
                addr: "127.0.0.1:1".parse().unwrap(),
                slot: 0,
                pid: None,
                state: SlotState::Stopped,
                restarts: 2,
                counters,
            }
        );
        // Every selection path, not migrations or failed selections: 5+6+9+10+11+7.
        assert_eq!(report.rows[0].selected(), 48);
        assert_eq!(report.rows[0].selected(), counters.selected());
        assert_eq!(report.rows[1].pid, Some(42));
        assert_eq!(report.rows[1].state, SlotState::BackingOff);
    }

    #[test]
    fn reads_columns_by_their_header_names() {
        let report = parse_report(&lines(&[
            "SPILLED  BY-LL  BY-RR  SELECT-ERRORS  MIGRATED  FALLBACK  BY-HASH  BY-CPU  RESTARTS  STATE  PID  SLOT  ADDRESS",
            "1        2      3      4              5         6         7        8       9         ready  77   3     [::1]:80",
        ]))
        .unwrap();
        let r = &report.rows[0];
        assert_eq!((r.slot, r.pid, r.restarts), (3, Some(77), 9));
        assert_eq!(r.addr, "[::1]:80".parse().unwrap());
        assert_eq!(r.state, SlotState::Ready);
        assert_eq!(
            r.counters,
            SlotCounters {
                by_cpu: 8,
                by_hash: 7,
                by_round_robin: 3,
                by_least_loaded: 2,
                spilled: 1,
                fallback: 6,
                migrated: 5,
                select_error: 4,
            }
        );
    }

    #[test]
    fn the_unattributed_row_is_kept_apart() {
        let report = parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  0     42   ready    0         3       0        0         0         0              0      0      0",
            "127.0.0.1:1  none  -    -        -         1       2        0         0         4              0      0      0",
            "",
        ]))
        .unwrap();
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.rows[0].slot, 0);
        assert_eq!(
            report.unattributed,
            [Unattributed {
                addr: "127.0.0.1:1".parse().unwrap(),
                counters: SlotCounters {
                    by_cpu: 1,
                    by_hash: 2,
                    select_error: 4,
                    ..Default::default()
                },
            }]
        );
    }

    #[test]
    fn no_table_is_none() {
        assert_eq!(
            parse_report(&lines(&["listening on 127.0.0.1:1", ""])),
            None
        );
    }

    #[test]
    #[should_panic(expected = "counters table row \"127.0.0.1:1  0  42  ready  0  5")]
    fn a_short_row_panics_naming_it() {
        parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  0  42  ready  0  5  6  7  1  8",
        ]));
    }

    #[test]
    #[should_panic(expected = "STATE \"sleeping\"")]
    fn an_unknown_state_panics() {
        parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  0  42  sleeping  0  5  6  7  1  8  0  0  0",
        ]));
    }

    #[test]
    #[should_panic(expected = "unattributed row has PID \"42\"")]
    fn an_unattributed_row_with_a_pid_panics() {
        parse_report(&lines(&[
            HEADER,
            "127.0.0.1:1  none  42  -  -  5  6  7  1  8  0  0  0",
        ]));
    }

    #[test]
    #[should_panic(expected = "is not the columns")]
    fn an_unknown_header_panics() {
        parse_report(&lines(&[
            "ADDRESS  SLOT  PID  STATE  RESTARTS  BY-CPU  BY-HASH  FALLBACK  MIGRATED  SELECT-ERRORS",
            "127.0.0.1:1  0  -  stopped  2  5  6  7  1  8",
        ]));
    }

    #[test]
    fn cli_errors_parse_into_typed_replies() {
        let e =
            parse_cli_error(r#"{"error":"permission-denied","message":"uid 7 may not"}"#).unwrap();
        assert_eq!(
            e,
            ErrorReply::new(ErrorKind::PermissionDenied, "uid 7 may not")
        );
        assert!(parse_cli_error(r#"{"error":"nonsense","message":""}"#).is_err());
        assert!(parse_cli_error("").is_err());
    }
}
