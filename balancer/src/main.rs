//! `balancer`: the controller, its CLI and the built-in demo worker.
mod activation;
mod cli;
mod demo_worker;
mod notify;
mod policy;
mod privileges;
mod proc_net;
mod report;
mod socket_group;
mod steering;
mod supervisor;

use std::process::ExitCode;

use anyhow::Context;
use balancer_common::PolicyKind;
use clap::Parser;
use log::{info, warn};

use crate::{
    cli::{Cli, Command, RunArgs},
    policy::{build_tables, CpuLayout},
    socket_group::SocketGroup,
    steering::Steering,
    supervisor::{Supervisor, SupervisorConfig},
};

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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::DemoWorker => runtime().and_then(|rt| rt.block_on(demo_worker::run())),
        Command::ExecWorker { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Plain text, not a log line: this is the answer to the operator's command.
            eprintln!("balancer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A single-threaded runtime: the controller's work is light, and spawning every worker from
/// the one thread that lives as long as the process is what makes PR_SET_PDEATHSIG reliable.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    steering::check_object()?;
    privileges::check()?;
    let command = match args.worker.split_first() {
        Some((program, rest)) => {
            let mut command = vec![activation::resolve_program(program)?.into_os_string()];
            command.extend(rest.iter().cloned());
            command
        }
        None => vec![
            std::env::current_exe()
                .context("locating this binary for the demo worker")?
                .into_os_string(),
            "demo-worker".into(),
        ],
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
    let cpus = layout.online().len() as u32;
    if policy == PolicyKind::Cpu && slots > cpus * balancer_common::CPU_FANOUT {
        warn!(
            "{slots} workers on {cpus} CPUs: the cpu policy spreads each CPU over at most {} slots, so some slots get no connections; use --policy hash",
            balancer_common::CPU_FANOUT
        );
    }

    let group = SocketGroup::bind(&args.listen, slots, args.backlog)?;
    let rt = runtime()?;
    rt.block_on(async move {
        // Until a worker is ready every slot takes connections: they queue on its socket.
        let tables = build_tables(&layout, slots, &vec![false; slots as usize]);
        let steering = Steering::attach(&group, slots, policy, &tables)?;
        for a in &group.addresses {
            report::line(&format!(
                "listening on {} ({slots} slots, policy {})",
                a.addr,
                policy_name(policy)
            ));
        }
        info!(
            "controller pid {}; `kill -USR1 {}` prints the counters",
            std::process::id(),
            std::process::id()
        );
        Supervisor::run(
            SupervisorConfig {
                command,
                slots,
                policy,
                layout,
                pin_workers: args.pin_workers,
                ready_timeout: args.ready_timeout,
                grace: args.grace,
            },
            group,
            steering,
        )
        .await
    })
}

fn policy_name(p: PolicyKind) -> &'static str {
    match p {
        PolicyKind::Cpu => "cpu",
        PolicyKind::Hash => "hash",
    }
}
