//! `balancer`: the controller, its CLI and the built-in demo worker.

use std::process::ExitCode;

use anyhow::Context;
use balancer_common::PolicyKind;
use clap::Parser;
use log::{info, warn};

use balancer::{
    activation,
    cli::{Cli, Command, ControlArgs, LogLevel, RunArgs},
    cli_docs, control,
    control::{protocol::Request, server::ControlSocket},
    demo_worker, handover, log_sink, metrics, policy,
    policy::{build_tables, CpuLayout},
    privileges, report,
    service_manager::ServiceManager,
    startup, steering,
    steering::Steering,
    supervisor::{self, SupervisorConfig},
};

/// How long the exit waits for queued log lines to be written.
const LOG_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The trampoline must exec before anything else runs (no logger, no runtime, no threads).
    if let Command::ExecWorker { command } = &cli.command {
        let err = activation::exec_worker(command);
        eprintln!(
            "balancer: cannot execute worker command {:?}: {err}",
            command
                .first()
                .map(|c| c.to_string_lossy())
                .unwrap_or_default()
        );
        return ExitCode::from(127);
    }
    // Generated from the CLI definition: no logger or runtime needed.
    match &cli.command {
        Command::Completions { shell } => {
            return finish(write_stdout(&cli_docs::completion_script(*shell)))
        }
        Command::Man { dir } => {
            return finish(
                cli_docs::write_man_pages(dir)
                    .with_context(|| format!("writing the man pages into {}", dir.display()))
                    .map(|pages| {
                        for page in pages {
                            println!("{}", page.display());
                        }
                    }),
            )
        }
        _ => {}
    }
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    let mut flusher = None;
    if let Command::Run(args) = &cli.command {
        // The controller must never wait for its log's reader (see `log_sink`).
        match log_sink::non_blocking(std::io::stderr(), log_sink::CAPACITY) {
            Ok((writer, f)) => {
                logger.target(env_logger::Target::Pipe(Box::new(writer)));
                // A panic's message goes straight to stderr: what was logged before it first.
                let (on_panic, default_hook) = (f.clone(), std::panic::take_hook());
                std::panic::set_hook(Box::new(move |info| {
                    on_panic.flush(LOG_FLUSH_WAIT);
                    default_hook(info);
                }));
                flusher = Some(f);
            }
            Err(e) => eprintln!("balancer: logging straight to stderr (no log thread: {e})"),
        }
        if let Some(level) = args.log_level {
            logger.filter_level(match level {
                LogLevel::Error => log::LevelFilter::Error,
                LogLevel::Warn => log::LevelFilter::Warn,
                LogLevel::Info => log::LevelFilter::Info,
                LogLevel::Debug => log::LevelFilter::Debug,
                LogLevel::Trace => log::LevelFilter::Trace,
            });
        }
    }
    logger.format_target(false).init();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::DemoWorker(args) => {
            runtime().and_then(|rt| rt.block_on(demo_worker::run(args.accept_delay)))
        }
        command => match command.control_request() {
            Some((control, request)) => control_call(&control, request),
            None => unreachable!(
                "run, demo-worker, completions, __man and __exec-worker are handled above"
            ),
        },
    };
    if let Some(f) = flusher {
        // The last lines (the shutdown's) are written before the exit, unless the output is
        // stuck: then the exit does not wait for it.
        f.flush(LOG_FLUSH_WAIT);
    }
    finish(result)
}

/// The exit status of a command, its error printed.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Plain text, not a log line: this is the answer to the operator's command.
            eprintln!("balancer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a reader that has gone is an error, not a panic.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// A single-threaded runtime: the controller's work is light, and every decision, spawn and
/// reap then happens on one thread, one event at a time.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Started by an upgrade: the old controller waits for us on this channel. Read (and the
    // variable removed) while this process is still single-threaded.
    let predecessor = handover::Predecessor::from_env();
    // Sockets the service manager kept for us (its descriptor store), likewise.
    let stored = balancer::fd_store::Stored::from_env();
    let failure = predecessor.as_ref().and_then(|p| p.failure_channel());
    let result = run_group(args, predecessor, stored);
    // The old controller quotes why we could not take over in the failed command's reply.
    if let (Err(e), Some(failure)) = (&result, failure) {
        failure.report(&format!("{e:#}"));
    }
    result
}

fn run_group(
    args: RunArgs,
    mut predecessor: Option<handover::Predecessor>,
    mut stored: balancer::fd_store::Stored,
) -> anyhow::Result<()> {
    let started_from = std::env::current_exe().context("finding this binary's path")?;
    let own_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    steering::check_object()?;
    args.check()?;
    if args.grace.is_zero() {
        warn!("--grace 0: a replaced or stopped worker is killed at once, cutting the requests it is serving; give it time to finish (the default is 5s)");
    }
    privileges::check()?;
    // A bad NOTIFY_SOCKET or WATCHDOG_USEC is the manager's configuration error: say so
    // before anything is bound.
    let manager = ServiceManager::from_env(predecessor.is_some())?;
    let handing_over = match &mut predecessor {
        Some(p) => Some(p.hello()?),
        None => None,
    };
    let mut manager = match predecessor {
        Some(p) => manager.with_predecessor(p),
        None => manager,
    };
    let command = match args.worker.split_first() {
        Some((program, rest)) => {
            let mut command = vec![activation::resolve_program(program)?.into_os_string()];
            command.extend(rest.iter().cloned());
            command
        }
        None => vec![activation::SELF_EXE.into(), "demo-worker".into()],
    };
    let layout = CpuLayout::detect().unwrap_or_else(|e| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        warn!("{e}; assuming CPUs 0..{n}");
        CpuLayout::contiguous(n)
    });
    let slots = args
        .workers
        .unwrap_or_else(|| (layout.online().len() as u32).clamp(1, balancer_common::MAX_SLOTS));
    let policy = PolicyKind::from(args.policy);
    if let Some(warning) = (policy == PolicyKind::Cpu)
        .then(|| policy::cpu_overflow(&layout, slots))
        .flatten()
    {
        warn!("{warning}");
    }

    startup::check_fd_limit(slots, args.listen.len())?;
    // Caught from here on, before anything is bound or pinned: a stop request during start-up
    // is handled by the event loop like any other, and cleans up.
    let rt = runtime()?;
    let signals = {
        let _in_runtime = rt.enter();
        supervisor::Signals::install().context("installing the signal handlers")?
    };
    let credentials = args
        .user
        .as_deref()
        .map(balancer::credentials::resolve)
        .transpose()?;
    let prepared = startup::prepare(
        startup::Asked {
            listen: &args.listen,
            name: args.name.clone(),
            slots,
            steer: (policy, args.spill_depth),
            backlog: args.backlog,
            stop: balancer::adoption::Stop {
                signal: args.stop_signal.0,
                grace: args.grace,
            },
        },
        handing_over.clone(),
        &mut stored,
    )?;
    // What the service manager kept but the group does not use (other addresses, slots
    // beyond the group) leaves its store and closes.
    for name in stored.names() {
        manager.remove_fd(&name);
    }
    drop(stored);
    let slots = prepared.slots;
    let (policy, spill_depth, weights) = prepared.steer.clone();
    let pin_dir = startup::pin_dir(args.bpffs_dir.clone(), &prepared.name)?;
    // The directory is removed at exit only if it is ours: the default one, or one that did
    // not exist before (never an operator's directory that may hold other pins).
    let owns_pin_dir = args.bpffs_dir.is_none() || pin_dir.as_ref().is_some_and(|d| !d.exists());
    let bound: Vec<std::net::SocketAddr> =
        prepared.group.addresses.iter().map(|a| a.addr).collect();
    rt.block_on(async move {
        // An upgrade takes the old controller's path in one step.
        let mut control = match &handing_over {
            Some(_) => ControlSocket::bind_over(&args.control)?,
            None => ControlSocket::bind(&args.control)?,
        };
        // What a dead controller pinned: its counters continue in the new maps; the rest goes
        // (only now that nothing else can fail before the new program is attached and pinned).
        let carried = match (&pin_dir, prepared.adopted_from) {
            (Some(dir), Some(_)) => steering::pinned_counters(dir, &bound),
            _ => Vec::new(),
        };
        if let Some(dir) = &pin_dir {
            steering::unpin_addresses(dir, &bound);
        }
        // From here, whatever ends this controller (an error, a panic, a stop) removes what it
        // pins, unless it hands the group over.
        let pins = PinGuard {
            dir: pin_dir.clone(),
            addrs: bound.clone(),
            owns_dir: owns_pin_dir,
        };
        let _stats = if args.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("turning on BPF run-time statistics (--bpf-stats)")?,
            )
        } else {
            None
        };
        // Until a worker is ready its slot takes connections only if no slot is ready: they
        // queue on its socket. An adopted ready worker's slot is live at once.
        let tables = build_tables(&layout, slots, &prepared.live(), weights.as_deref());
        let steering = Steering::attach(
            &prepared.group,
            slots,
            (policy, spill_depth),
            &tables,
            pin_dir.as_deref(),
            &carried,
        );
        let steering = steering?;
        let (commands, requests) = tokio::sync::mpsc::channel(16);
        control.serve(commands.clone());
        if let Some(addr) = args.metrics {
            let bound = metrics::serve(addr, commands.clone())
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
            report::line(&format!("metrics on http://{bound}/metrics"));
        }
        for a in &prepared.group.addresses {
            report::line(&format!(
                "listening on {} ({slots} slots, policy {})",
                a.addr,
                balancer::control::protocol::PolicyName::from(policy)
            ));
        }
        if let Some(pid) = prepared.adopted_from {
            report::line(&format!(
                "adopted {} worker(s) of group {} from controller pid {pid}",
                prepared.adopted_pidfds.len(),
                prepared.name
            ));
        }
        info!(
            "controller pid {}; control socket {}{}",
            std::process::id(),
            args.control.display(),
            pin_dir
                .as_ref()
                .map_or(String::new(), |d| format!("; pinned under {}", d.display()))
        );
        let result = supervisor::run(
            SupervisorConfig {
                command,
                slots,
                policy,
                weights,
                record_dir: prepared.record_dir,
                inherited: prepared.inherited,
                adopted_pidfds: prepared.adopted_pidfds,
                credentials,
                layout,
                pin_workers: args.pin_workers,
                ready_timeout: args.ready_timeout,
                grace: args.grace,
                stop_signal: args.stop_signal.0,
                socket_protocol: args.socket_protocol,
                bpf_stats: args.bpf_stats,
                spill_depth,
                sample_interval: args.sample_interval,
                stall_timeout: args.stall_timeout,
                evacuate: args.evacuate,
                kill_stalled: args.kill_stalled,
                socket_check: args.socket_check,
            },
            prepared.group,
            steering,
            requests,
            manager,
            supervisor::UpgradeContext {
                control,
                control_path: args.control.clone(),
                started_from,
                args: own_args,
                group: prepared.name.clone(),
                pin_dir: pin_dir.clone(),
            },
            signals,
        )
        .await?;
        // After a handover the pins are the new controller's.
        if result == supervisor::Exit::HandedOver {
            pins.keep();
        }
        Ok(())
    })
}

/// Removes a controller's pins when dropped (see [`Steering::unpin`]), unless told to keep
/// them.
struct PinGuard {
    dir: Option<std::path::PathBuf>,
    addrs: Vec<std::net::SocketAddr>,
    owns_dir: bool,
}

impl PinGuard {
    /// The pins stay (a successor controller owns them now).
    fn keep(mut self) {
        self.dir = None;
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        // A panic leaves the workers running and the group's record for a successor to adopt:
        // the pins stay too, so that its counters continue.
        if std::thread::panicking() {
            return;
        }
        if let Some(dir) = &self.dir {
            Steering::unpin(dir, &self.addrs, self.owns_dir);
        }
    }
}

/// Sends one request to a running controller and prints the reply.
fn control_call(args: &ControlArgs, request: Request) -> anyhow::Result<()> {
    let outcome = runtime()?.block_on(control::client::call(&args.control, &request))?;
    match outcome {
        Ok(reply) => control::client::print(&reply, args.json),
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "error": e.kind, "message": e.message })
                );
            }
            Err(anyhow::anyhow!("{}", e.message))
        }
    }
}
