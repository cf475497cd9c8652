//! `balancer-bench`: balancer against the listener setups users would pick instead, with the
//! same client and the same worker program, arms interleaved, several runs each; then the same
//! with nginx as the server, measured by wrk as well. One worker and one client thread per
//! CPU, whatever the CPU count.
//!
//! Run it with `cargo xtask bench` (`--quick` for a one-minute run). It needs root (eBPF).
mod arms;
mod cleanup;
mod cost;
mod launch;
mod load;
mod nginx;
mod report;
mod wrk;

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    arms::{Arm, Context, Server},
    load::{closed_loop, RunResult},
    report::{ArmReport, Report, Scenario},
};
use balancer_bench::client::{online_cpus, open_loop, slow, Fate};

/// Benchmark balancer against a shared socket, plain SO_REUSEPORT, SO_REUSEPORT with
/// SO_INCOMING_CPU and an SK_PASS program.
#[derive(Parser)]
#[command(
    after_help = "Run through `cargo xtask bench [--quick]`, which builds everything and runs this as root."
)]
struct Args {
    /// The balancer binary (release build for real numbers).
    #[arg(long)]
    balancer: PathBuf,
    /// The eBPF object (for the SK_PASS arm).
    #[arg(long)]
    object: PathBuf,
    /// Where results go: a dated directory is made under it.
    #[arg(long)]
    out: PathBuf,
    /// Also write this performance page (docs/performance.md).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// About one minute: one run per arm, short scenarios.
    #[arg(long)]
    quick: bool,
    /// Seconds only, for `cargo xtask test`: checks correctness (every arm serves, nothing
    /// fails without faults, the cpu policy keeps locality), never timing.
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Runs per arm for the throughput figures.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Only the controller-cost section (sampling each way, idle controllers), printed.
    #[arg(long, conflicts_with = "smoke")]
    cost_only: bool,
}

/// Durations of one mode.
struct Plan {
    runs: u32,
    run: Duration,
    stall_rate: u32,
    stall_load: Duration,
    stall_stop: Duration,
    kill_load: Duration,
    kill_every: Duration,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        if cleanup::stopping() {
            // The cleanup thread exits with the signal's status once everything is killed.
            loop {
                std::thread::park();
            }
        }
        eprintln!("balancer-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark loads eBPF and starts balancer: run it as root (cargo xtask bench does)"
        );
    }
    let plan = if args.smoke {
        Plan {
            runs: 1,
            run: Duration::from_millis(300),
            stall_rate: 300,
            stall_load: Duration::from_millis(1500),
            stall_stop: Duration::from_millis(800),
            kill_load: Duration::from_millis(800),
            kill_every: Duration::from_millis(300),
        }
    } else if args.quick {
        Plan {
            runs: 1,
            run: Duration::from_secs(1),
            stall_rate: 1000,
            stall_load: Duration::from_secs(2),
            stall_stop: Duration::from_secs(1),
            kill_load: Duration::from_secs(1),
            kill_every: Duration::from_millis(300),
        }
    } else {
        Plan {
            runs: args.runs.max(1),
            run: Duration::from_secs(3),
            stall_rate: 1000,
            stall_load: Duration::from_secs(5),
            stall_stop: Duration::from_secs(3),
            kill_load: Duration::from_secs(3),
            kill_every: Duration::from_millis(300),
        }
    };
    nginx::check_installed()?;
    wrk::check_installed()?;
    let cpus = online_cpus();
    println!(
        "{} CPUs: {} workers per arm (nginx: {} worker processes), {} client threads (wrk: {} threads, {} connections)",
        cpus.len(),
        cpus.len(),
        cpus.len(),
        cpus.len(),
        cpus.len(),
        cpus.len() as u32 * wrk::CONNECTIONS_PER_THREAD
    );
    let scratch = std::env::temp_dir().join(format!("balancer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    // Whatever the bench started is killed when it ends, even on an error or Ctrl-C.
    let _cleanup = cleanup::Cleanup::install(scratch.clone())?;
    // An idle controller's figure needs a long window: it wakes up only 20 times a second.
    let idle_window = Duration::from_secs(10);
    if args.cost_only {
        let section = controller_cost(&args.balancer, &scratch, idle_window);
        let _ = std::fs::remove_dir_all(&scratch);
        print!("{}", section?);
        return Ok(());
    }
    let ctx = Context {
        balancer: args.balancer.clone(),
        object: args.object.clone(),
        workers: cpus.len() as u32,
        scratch: scratch.clone(),
    };
    let arms = Arm::ALL;
    let nginx_arms = arms.iter().filter(|a| a.is_nginx()).count() as u64;
    let demo_arms = arms.len() as u64 - nginx_arms;
    let steps = plan.runs as u64 * (arms.len() as u64 + nginx_arms) + 3 * demo_arms + 1;
    let bar = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut reports: Vec<ArmReport> = arms
        .iter()
        .map(|a| ArmReport::new(a.name(), a.is_nginx()))
        .collect();

    // Throughput: rounds over all arms, so drift hits every arm alike.
    for round in 0..plan.runs {
        for (i, arm) in arms.iter().enumerate() {
            bar.set_message(format!("run {}/{} {}", round + 1, plan.runs, arm.name()));
            let server = Server::start(*arm, &ctx, false)?;
            let controller = server.controller_pid();
            let before = controller.map(cost::run_time).transpose()?;
            let started = Instant::now();
            let r = closed_loop(server.addr, &cpus, plan.run);
            if let (Some(pid), Some(before)) = (controller, before) {
                let spent = cost::run_time(pid)?.saturating_sub(before);
                reports[i]
                    .controller_cpu
                    .push(spent.as_secs_f64() / started.elapsed().as_secs_f64() * 100.0);
            }
            reports[i].runs.push(r);
            bar.inc(1);
            if arm.is_nginx() {
                bar.set_message(format!(
                    "run {}/{} {} (wrk)",
                    round + 1,
                    plan.runs,
                    arm.name()
                ));
                let w = wrk::run(server.addr, ctx.workers, plan.run)
                    .with_context(|| format!("wrk against {}", arm.name()))?;
                reports[i].wrk.push(w);
                bar.inc(1);
            }
            server.stop();
        }
    }

    // Program cost: a separate pass with the kernel's BPF statistics on (they cost throughput).
    {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("turning on BPF run-time statistics")?;
        for (i, arm) in arms.iter().enumerate() {
            if !matches!(arm, Arm::Balancer(_) | Arm::PassOnly) {
                continue;
            }
            bar.set_message(format!("program cost {}", arm.name()));
            let server = Server::start(*arm, &ctx, true)?;
            let _ = closed_loop(server.addr, &cpus, plan.run);
            reports[i].program_ns = server.program_cost()?.map(|(ns, _)| ns);
            server.stop();
        }
        bar.inc(1);
    }

    // Scenarios: a stopped worker, and workers killed under load.
    for (i, arm) in arms.iter().enumerate() {
        if arm.is_nginx() {
            continue;
        }
        bar.set_message(format!("stopped worker {}", arm.name()));
        reports[i].stall = Some(stopped_worker(*arm, &ctx, &plan)?);
        bar.inc(1);
        bar.set_message(format!("killed workers {}", arm.name()));
        reports[i].kill = Some(killed_workers(*arm, &ctx, &cpus, &plan)?);
        bar.inc(1);
        if let Arm::Balancer("cpu") = arm {
            bar.set_message("policy switches under load");
            reports[i].switch = Some(policy_switches(*arm, &ctx, &cpus, &plan)?);
        }
        if let Arm::Balancer(_) = arm {
            bar.set_message(format!("controller restarts {}", arm.name()));
            reports[i].restart = Some(controller_restarts(*arm, &ctx, &cpus, &plan)?);
            bar.set_message(format!("controller upgrades {}", arm.name()));
            reports[i].upgrade = Some(controller_upgrades(*arm, &ctx, &cpus, &plan)?);
        }
        bar.inc(1);
    }
    let cost = if args.smoke {
        String::new()
    } else {
        bar.set_message("controller cost (idle controllers)");
        controller_cost(&args.balancer, &scratch, idle_window)?
    };
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&scratch);

    let mut report = Report::new(reports, &plan_text(&plan), args.smoke, cpus.len());
    report.cost = cost;
    let dir = report.write(&args.out)?;
    print!("{}", report.markdown());
    println!("results in {}", dir.display());
    if let Some(docs) = &args.docs {
        report.write_docs(docs, &dir)?;
        println!("updated {}", docs.display());
    }
    if args.smoke {
        report.check_smoke()?;
        println!("bench smoke: every arm served, no failure without faults, cpu policy local");
    }
    Ok(())
}

/// The controller-cost section: one sample each way at every size, then an idle controller
/// at every size.
fn controller_cost(
    balancer: &std::path::Path,
    scratch: &std::path::Path,
    window: Duration,
) -> Result<String> {
    let sampling = cost::sampling_costs(2000)?;
    let idle = cost::SLOTS
        .iter()
        .map(|&slots| cost::idle_cost(balancer, scratch, slots, window))
        .collect::<Result<Vec<_>>>()?;
    Ok(cost::markdown(&sampling, &idle))
}

fn plan_text(p: &Plan) -> String {
    format!(
        "{} run(s) of {:?} closed-loop per arm (nginx arms: then wrk for {}s on the same server); stopped worker: open loop at {}/s for {:?}, one worker stopped for {:?}; killed workers: closed loop for {:?}, one worker SIGKILLed every {:?}; controller restarts (balancer arms): closed loop for {:?}, the controller SIGKILLed and started again every 700 ms; controller upgrades (balancer arms): closed loop for {:?}, `balancer upgrade` every 700 ms",
        p.runs, p.run, p.run.as_secs().max(1), p.stall_rate, p.stall_load, p.stall_stop, p.kill_load, p.kill_every, p.kill_load, p.kill_load
    )
}

/// One worker SIGSTOPped in the middle of an open-loop run. The client runs on the stopped
/// worker's CPU, so that the arms that steer by CPU (3, and balancer cpu) all face the worst
/// case, and the outcome does not depend on where the scheduler put the client.
fn stopped_worker(arm: Arm, ctx: &Context, plan: &Plan) -> Result<Scenario> {
    let server = Server::start(arm, ctx, false)?;
    let addr = server.addr;
    let (rate, load) = (plan.stall_rate, plan.stall_load);
    let cpus = online_cpus();
    let victim_cpu = cpus[1 % cpus.len()];
    let client = thread::spawn(move || {
        balancer_bench::client::pin_thread(victim_cpu);
        open_loop(addr, rate, load, Duration::from_secs(3))
    });
    thread::sleep((plan.stall_load - plan.stall_stop) / 2);
    server.signal_worker(1 % ctx.workers, libc::SIGSTOP)?;
    thread::sleep(plan.stall_stop);
    server.signal_worker(1 % ctx.workers, libc::SIGCONT)?;
    let fates = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    server.stop();
    Ok(Scenario {
        connections: fates.len() as u64,
        slow: slow(&fates, Duration::from_secs(1)) as u64,
        timed_out: fates.iter().filter(|f| **f == Fate::TimedOut).count() as u64,
        failed: fates.iter().filter(|f| **f == Fate::Failed).count() as u64,
    })
}

/// Closed-loop load while one worker after another is SIGKILLed.
fn killed_workers(arm: Arm, ctx: &Context, cpus: &[u32], plan: &Plan) -> Result<Scenario> {
    let mut server = Server::start(arm, ctx, false)?;
    let addr = server.addr;
    let (cpus_owned, load) = (cpus.to_vec(), plan.kill_load);
    let client = thread::spawn(move || closed_loop(addr, &cpus_owned, load));
    let end = Instant::now() + plan.kill_load;
    let mut slot = 0;
    thread::sleep(plan.kill_every);
    while Instant::now() + plan.kill_every / 2 < end {
        server.kill_worker(slot % ctx.workers, ctx)?;
        slot += 1;
        thread::sleep(plan.kill_every);
    }
    finish_closed_loop(client, server)
}

/// Closed-loop load while the policy changes every 300 ms.
fn policy_switches(arm: Arm, ctx: &Context, cpus: &[u32], plan: &Plan) -> Result<Scenario> {
    let server = Server::start(arm, ctx, false)?;
    let addr = server.addr;
    let (cpus_owned, load) = (cpus.to_vec(), plan.kill_load);
    let client = thread::spawn(move || closed_loop(addr, &cpus_owned, load));
    let end = Instant::now() + plan.kill_load;
    let policies = ["hash", "round-robin", "least-loaded", "cpu"];
    let mut i = 0;
    while Instant::now() + Duration::from_millis(150) < end {
        thread::sleep(Duration::from_millis(300));
        server.cli(&["policy", "set", policies[i % policies.len()]])?;
        i += 1;
    }
    finish_closed_loop(client, server)
}

/// Closed-loop load while the controller is killed with SIGKILL and started again (it adopts
/// the running workers) every 700 ms.
fn controller_restarts(arm: Arm, ctx: &Context, cpus: &[u32], plan: &Plan) -> Result<Scenario> {
    controller_events(arm, ctx, cpus, plan, Server::restart_controller)
}

/// Closed-loop load while the controller is upgraded (a new process takes the group over)
/// every 700 ms.
fn controller_upgrades(arm: Arm, ctx: &Context, cpus: &[u32], plan: &Plan) -> Result<Scenario> {
    controller_events(arm, ctx, cpus, plan, Server::upgrade_controller)
}

/// Closed-loop load while `event` happens to the controller every 700 ms.
fn controller_events(
    arm: Arm,
    ctx: &Context,
    cpus: &[u32],
    plan: &Plan,
    event: fn(&mut Server) -> Result<()>,
) -> Result<Scenario> {
    let mut server = Server::start(arm, ctx, false)?;
    let addr = server.addr;
    let (cpus_owned, load) = (cpus.to_vec(), plan.kill_load);
    let client = thread::spawn(move || closed_loop(addr, &cpus_owned, load));
    let end = Instant::now() + plan.kill_load;
    let every = Duration::from_millis(700);
    thread::sleep(every / 2);
    while Instant::now() + every < end {
        event(&mut server)?;
        thread::sleep(every);
    }
    finish_closed_loop(client, server)
}

/// Waits for a scenario's closed-loop client, stops the arm, and counts the failures.
fn finish_closed_loop(client: thread::JoinHandle<RunResult>, server: Server) -> Result<Scenario> {
    let r = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    server.stop();
    Ok(Scenario {
        connections: r.connections + r.failed,
        slow: 0,
        timed_out: 0,
        failed: r.failed,
    })
}
