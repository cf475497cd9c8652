//! Command-line interface: what each command takes, with the help text operators read.
use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use balancer_common::MAX_SLOTS;

use crate::{activation::SocketProtocol, control::protocol::PolicyName, stop_signal::StopSignal};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// eBPF-steered SO_REUSEPORT listener balancer with zero-loss worker supervision.
#[derive(Debug, Parser)]
#[command(
    name = "balancer",
    version,
    about,
    long_about = "balancer owns a SO_REUSEPORT group: one listening socket per worker slot on every \
listen address, kept open for the life of the group. An SK_REUSEPORT eBPF program picks the \
socket for each new connection (by RX CPU, flow hash, round-robin or accept-queue load), and \
a supervisor hands slot i's \
socket to worker i by systemd socket activation (LISTEN_FDS, fd 3 on) and respawns it on the \
same socket when it dies, so no queued connection is lost. `status`, `policy`, `workers`, \
`drain` and `undrain` steer a running controller through its control socket.\n\nNeeds root \
(CAP_BPF).",
    after_help = "Examples:\n  sudo balancer run\n  sudo balancer run --listen 0.0.0.0:80 --workers 8 --policy hash -- /usr/sbin/my-server --socket-activated\n  balancer run --help"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the controller's control socket is, unless `--control` says otherwise.
pub const DEFAULT_CONTROL: &str = "/run/balancer/balancer.sock";

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the socket group, load the steering program and supervise the workers.
    Run(Box<RunArgs>),
    /// Show every slot: worker, state, CPUs, restarts, accept queue, connections steered.
    #[command(
        after_help = "Examples:\n  balancer status\n  balancer status --json | jq '.slots[].pid'"
    )]
    Status(ControlArgs),
    /// Show the active policy and its tables, or change it (`policy set`).
    #[command(
        after_help = "Examples:\n  balancer policy\n  balancer policy set hash\n  balancer policy set hash --weights 1,3\n  balancer policy set cpu"
    )]
    Policy(PolicyArgs),
    /// Rolling restart or scaling of the workers.
    #[command(subcommand)]
    Workers(WorkersCommand),
    /// Take a slot out of the tables without stopping its worker (maintenance).
    #[command(
        after_help = "Example:\n  balancer drain --slot 1   # no new connections; queued ones are still served"
    )]
    Drain(SlotArgs),
    /// Put a drained slot back into the tables.
    #[command(after_help = "Example:\n  balancer undrain --slot 1")]
    Undrain(SlotArgs),
    /// Replace the controller with a new process of a new binary, with zero loss: it adopts
    /// the workers, sockets and tables, and the old one exits without touching any worker.
    /// If the new one is not ready within 30 s (or fails), the old one stays in charge and
    /// the command fails with the reason. SIGUSR2 to the controller does the same.
    #[command(
        after_help = "Examples:\n  cp target/release/balancer /usr/bin/balancer && balancer upgrade\n  balancer upgrade --binary /opt/balancer-2/balancer"
    )]
    Upgrade(UpgradeArgs),
    /// The built-in worker: a small HTTP/1.1 server on the sockets it inherits.
    #[command(
        long_about = "The built-in worker: a small HTTP/1.1 server on the socket(s) it inherits by \
socket activation (LISTEN_FDS). It answers every request with `slot=<i> pid=<pid> cpu=<cpu> on=<cpu>`, \
where cpu is SO_INCOMING_CPU of the connection and on the CPU the worker ran on while \
answering, closes the connection, and tells the controller \
READY=1 over NOTIFY_SOCKET. `balancer run` uses it when no worker command is given."
    )]
    DemoWorker(DemoWorkerArgs),
    /// Print a shell completion script on stdout.
    #[command(
        after_help = "Examples:\n  balancer completions bash > /etc/bash_completion.d/balancer\n  balancer completions zsh > /usr/local/share/zsh/site-functions/_balancer\n  balancer completions fish > ~/.config/fish/completions/balancer.fish\n\nThe .deb from `cargo xtask dist` installs all three."
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Internal: writes the man pages (balancer.1 and one per subcommand) into DIR; `cargo
    /// xtask dist` packages them. Generated from these definitions, so they cannot drift.
    #[command(hide = true, name = "__man")]
    Man {
        /// Where to write the pages (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Internal: sets LISTEN_PID to its own pid and execs the worker command.
    #[command(hide = true, name = "__exec-worker")]
    ExecWorker {
        /// The worker command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<OsString>,
    },
}

/// How to reach a running controller.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The controller's control socket (`balancer run --control`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL, global = true)]
    pub control: PathBuf,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Arguments of `balancer policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(subcommand)]
    pub action: Option<PolicyAction>,
}

/// `balancer policy set`.
#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Change the policy; published atomically, in effect from the next SYN.
    Set {
        /// The new policy.
        #[arg(value_enum)]
        policy: PolicyName,
        /// Hash shares per slot, one weight per slot (hash policy only), e.g. 1,3.
        #[arg(long, value_name = "W0,W1,...", value_delimiter = ',')]
        weights: Option<Vec<u32>>,
        /// New spill depth for cpu and hash (0 turns spilling off) [default: unchanged].
        #[arg(long, value_name = "N")]
        spill_depth: Option<u32>,
    },
}

/// `balancer workers …`.
#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Replace workers one slot at a time: the new worker starts on the same socket, and the
    /// old one gets the stop signal (--stop-signal) once the new one is ready. If it never
    /// becomes ready, the old one stays and the command fails. SIGHUP to the controller
    /// restarts every slot too.
    #[command(
        after_help = "Examples:\n  balancer workers restart\n  balancer workers restart --slot 2"
    )]
    Restart {
        #[command(flatten)]
        control: ControlArgs,
        /// Only this slot.
        #[arg(long, value_name = "N")]
        slot: Option<u32>,
    },
    /// Grow or shrink the group. New slots join once their worker is ready; removed slots
    /// leave the tables first, then their sockets close and what is queued on them moves to
    /// live slots.
    #[command(after_help = "Examples:\n  balancer workers scale 8\n  balancer workers scale 2")]
    Scale {
        #[command(flatten)]
        control: ControlArgs,
        /// The new number of workers.
        #[arg(value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_SLOTS as i64))]
        workers: u32,
    },
}

/// `balancer upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The new binary [default: the path the controller was started from].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// A slot of a running controller.
#[derive(Debug, Args)]
pub struct SlotArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The slot.
    #[arg(long, value_name = "N")]
    pub slot: u32,
}

/// Arguments of `balancer demo-worker`.
#[derive(Debug, Args)]
pub struct DemoWorkerArgs {
    /// Wait this long after each accept: a slow worker, to see connections queue.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub accept_delay: Option<Duration>,
}

/// The shells `balancer completions` writes scripts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// Bash (bash-completion).
    Bash,
    /// Zsh.
    Zsh,
    /// Fish.
    Fish,
}

/// Log verbosity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Worker starts, exits and control actions.
    Info,
    /// Also protocol details and eBPF debug lines.
    Debug,
    /// Everything.
    Trace,
}

/// Arguments of `balancer run`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  # the built-in demo worker on 127.0.0.1:8080, one worker per CPU, policy cpu
  sudo balancer run
  # any socket-activated server as the worker, on two addresses
  sudo balancer run --listen 0.0.0.0:8080 --listen [::]:8080 --workers 4 --policy hash -- ./server
  # a free port, printed on start
  sudo balancer run --listen 127.0.0.1:0
  # nginx as the worker (its `listen` lines name the same address; see docs/workers.md)
  sudo balancer run --listen 127.0.0.1:8080 --socket-protocol nginx --stop-signal QUIT \\
    -- nginx -c /etc/nginx/balancer.conf

Worker i gets its slot's socket(s) as fd 3.. with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES
(or NGINX=\"3;...\" with --socket-protocol nginx), BALANCER_SLOT=i and NOTIFY_SOCKET.
A worker told to stop gets --stop-signal (TERM), then SIGKILL after --grace.
`kill -USR1 <controller pid>` prints the steering counters.

Workers outlive the controller: if it crashes (or is killed), they keep serving with the last
published tables, and `balancer run` with the same arguments adopts them (same pids, same
sockets, counters kept). SIGTERM/SIGINT stop everything.")]
pub struct RunArgs {
    /// Address to listen on, IP:PORT or [IPv6]:PORT; repeatable. Port 0 picks a free port.
    #[arg(
        long = "listen",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: Vec<SocketAddr>,

    /// Worker slots (one listening socket per slot and address) [default: online CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_SLOTS as i64))]
    pub workers: Option<u32>,

    /// How the eBPF program picks a slot for a new connection.
    #[arg(long, value_enum, default_value_t = PolicyName::Cpu)]
    pub policy: PolicyName,

    /// With cpu and hash: a first choice whose accept queue is at least N deep spills to the
    /// least loaded live slot (0 turns spilling off).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub spill_depth: u32,

    /// How often the controller samples every slot's accept-queue depth (the load signal of
    /// least-loaded, spill and stall detection).
    #[arg(long, value_name = "DUR", default_value = "1ms", value_parser = parse_positive_duration)]
    pub sample_interval: Duration,

    /// A slot whose accept queue is non-empty and has not shrunk for this long is stalled: it
    /// leaves the tables until its queue drains. 0 turns stall detection off.
    #[arg(long, value_name = "DUR", default_value = "300ms", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// Move the connections queued on a stalled slot to live slots (shutdown + listen on its
    /// socket, through the sk_reuseport/migrate program).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub evacuate: bool,

    /// How often every slot's socket is checked: still listening (a worker may `shutdown` it)
    /// and still in the program's socket array; what is not is repaired and logged, and the
    /// program is attached again (a worker may attach its own). 0 turns the check off.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    pub socket_check: Duration,

    /// Kill (and respawn) a worker whose slot stays stalled this long [default: never].
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub kill_stalled: Option<Duration>,

    /// Accept-queue length of each listening socket (capped by net.core.somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub backlog: u32,

    /// Run the workers as this user (and group): every capability dropped, no way back to
    /// root (PR_SET_NO_NEW_PRIVS). Names or numeric ids, e.g. www-data or 65534:65534
    /// [default: the controller's user, root].
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// Pin worker i to the CPU(s) whose connections the cpu policy sends to slot i. A scale
    /// moves the running workers (every thread of every process in their process group) to
    /// the new layout.
    #[arg(long)]
    pub pin_workers: bool,

    /// How long a new worker may take to send READY=1 before it is taken as ready anyway.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// How long a worker told to stop (rolling restart, scale-down, SIGTERM/SIGINT to the
    /// controller) gets to exit after the stop signal before SIGKILL. On the controller's own
    /// SIGTERM/SIGINT it is also how long the workers first get to accept what is queued while
    /// new connections are refused: a stop takes at most twice this.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub grace: Duration,

    /// The signal that asks a worker to finish what it accepted and exit: the worker's own
    /// graceful stop (nginx QUIT, lighttpd INT, gunicorn and uvicorn TERM). A name (TERM,
    /// SIGQUIT, int; any case) or a number. SIGKILL follows after --grace.
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = crate::stop_signal::parse)]
    pub stop_signal: StopSignal,

    /// How the workers are told which inherited descriptors are their sockets: systemd's
    /// LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, or nginx's NGINX="3;4;..." (run nginx in master
    /// mode with `daemon off;`, its `listen` lines naming the same addresses as --listen).
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value_t = SocketProtocol::Systemd)]
    pub socket_protocol: SocketProtocol,

    /// Control socket for `balancer status`, `policy`, `workers`, `drain` (mode 0600). Its
    /// directory is created 0700 if missing; a symbolic link, another user's directory or one
    /// others may write to is refused.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,

    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9090). No
    /// authentication or TLS: bind it to loopback or put it behind a proxy.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// The group's name: where its record (/run/balancer/<NAME>/) and pins live, so that a
    /// controller restarted with the same arguments finds and adopts the running workers
    /// [default: from the listen addresses, e.g. 127_0_0_1_8080].
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Pin the program and maps under DIR/<address>/ for bpftool [default: /sys/fs/bpf/balancer/<NAME>, mounting a BPF filesystem on /sys/fs/bpf when none is].
    #[arg(long, value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,

    /// Turn on the kernel's BPF run-time statistics, for the program cost in `balancer status`
    /// (costs a little throughput).
    #[arg(long)]
    pub bpf_stats: bool,

    /// Log level [default: RUST_LOG, else info].
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    /// Worker command and arguments [default: this binary's `demo-worker`].
    #[arg(last = true, value_name = "WORKER_CMD")]
    pub worker: Vec<OsString>,
}

/// A `balancer run` whose flags parse one by one but do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum RunArgsError {
    /// Killing stalled workers with stall detection off.
    #[error("--kill-stalled acts on stalled slots, but --stall-timeout 0 turns stall detection off: give --stall-timeout a duration")]
    KillStalledWithoutStalls,
    /// A stall timeout that two samples do not fit in.
    #[error(
        "--stall-timeout {} is shorter than two samples (--sample-interval {}): a stall needs a queue seen not shrinking between samples; raise --stall-timeout or lower --sample-interval",
        humantime::format_duration(*stall_timeout),
        humantime::format_duration(*sample_interval)
    )]
    StallShorterThanTwoSamples {
        /// `--stall-timeout`.
        stall_timeout: Duration,
        /// `--sample-interval`.
        sample_interval: Duration,
    },
}

impl RunArgs {
    /// The checks across flags that clap cannot make one flag at a time (run before anything
    /// is bound, and by the CLI fuzz target).
    pub fn check(&self) -> Result<(), RunArgsError> {
        if self.kill_stalled.is_some() && self.stall_timeout.is_zero() {
            return Err(RunArgsError::KillStalledWithoutStalls);
        }
        // Both are at most MAX_DURATION, so doubling cannot overflow; saturate all the same.
        let two_samples = self.sample_interval.saturating_mul(2);
        if !self.stall_timeout.is_zero() && self.stall_timeout < two_samples {
            return Err(RunArgsError::StallShorterThanTwoSamples {
                stall_timeout: self.stall_timeout,
                sample_interval: self.sample_interval,
            });
        }
        Ok(())
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    crate::group_state::check_name(s).map(|()| s.to_owned())
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".to_owned()),
        d => Ok(d),
    }
}

/// The longest duration any flag takes: longer ones are typos, and would overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as 500ms, 2s or 1m"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{s} is longer than a day: give a duration such as 500ms, 2s or 1m"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Request;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_are_the_documented_ones() {
        let cli = Cli::try_parse_from(["balancer", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(args.policy, PolicyName::Cpu);
        assert_eq!(args.spill_depth, 16);
        assert!(args.evacuate);
        assert_eq!(args.workers, None);
        assert_eq!(args.ready_timeout, Duration::from_secs(1));
        assert_eq!(args.stop_signal, StopSignal::default());
        assert_eq!(args.socket_protocol, SocketProtocol::Systemd);
        assert!(args.worker.is_empty());
    }

    #[test]
    fn bad_values_are_rejected_with_the_fix() {
        for (args, needle) in [
            (vec!["--workers", "0"], "0"),
            (vec!["--workers", "129"], "129"),
            (vec!["--policy", "random"], "possible values"),
            (vec!["--listen", "localhost"], "invalid socket address"),
            (vec!["--ready-timeout", "soon"], "such as 500ms"),
            (vec!["--grace", "1000000000y"], "longer than a day"),
            (vec!["--kill-stalled", "30d"], "longer than a day"),
            (vec!["--name", "a.b"], "letters, digits"),
            (vec!["--name", ""], "letters, digits"),
            (vec!["--stop-signal", "SIGNOPE"], "not a signal name"),
            (vec!["--stop-signal", "77"], "not a signal number"),
            (vec!["--socket-protocol", "inetd"], "possible values"),
        ] {
            let err = Cli::try_parse_from(["balancer", "run"].into_iter().chain(args.clone()))
                .expect_err("must be rejected");
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["balancer", "run"].iter().chain(args)).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        *args
    }

    #[test]
    fn flags_that_do_not_fit_together_are_refused_with_the_fix() {
        assert!(run_args(&[]).check().is_ok());
        let e = run_args(&["--stall-timeout", "0", "--kill-stalled", "5s"])
            .check()
            .unwrap_err();
        assert!(matches!(e, RunArgsError::KillStalledWithoutStalls), "{e}");
        let e = run_args(&["--sample-interval", "1s", "--stall-timeout", "1500ms"])
            .check()
            .unwrap_err();
        assert!(
            matches!(e, RunArgsError::StallShorterThanTwoSamples { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("raise --stall-timeout"), "{e}");
        // Exactly two samples fit; stall detection off needs none.
        assert!(
            run_args(&["--sample-interval", "1s", "--stall-timeout", "2s"])
                .check()
                .is_ok()
        );
        assert!(
            run_args(&["--sample-interval", "1s", "--stall-timeout", "0"])
                .check()
                .is_ok()
        );
    }

    #[test]
    fn client_commands_map_to_their_requests() {
        let request = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once(&"balancer").chain(args))
                .unwrap()
                .command
                .control_request()
                .map(|(_, r)| r)
        };
        assert_eq!(
            request(&["workers", "scale", "3"]),
            Some(Request::Scale { workers: 3 })
        );
        assert_eq!(
            request(&["policy", "set", "hash", "--weights", "1,3"]),
            Some(Request::SetPolicy {
                policy: PolicyName::Hash,
                weights: Some(vec![1, 3]),
                spill_depth: None,
            })
        );
        let Some(Request::Upgrade { binary: Some(b) }) = request(&["upgrade", "--binary", "b"])
        else {
            panic!("expected an upgrade with a binary")
        };
        assert!(b.is_absolute() && b.ends_with("b"), "{b:?}");
        assert_eq!(request(&["run"]), None);
        assert_eq!(request(&["demo-worker"]), None);
    }

    #[test]
    fn worker_command_follows_double_dash() {
        let cli = Cli::try_parse_from(["balancer", "run", "--", "srv", "--flag"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(
            args.worker,
            vec![OsString::from("srv"), OsString::from("--flag")]
        );
    }
}
