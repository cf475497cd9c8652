//! `balancer-soak`: a chaos soak. Open-loop and closed-loop load against `balancer run`
//! while, one at a time and in an order a seed decides, workers are SIGKILLed, stopped and
//! continued, the policy flips, the group scales up and down, slots are drained and
//! undrained, workers are restarted in rolling fashion, the controller is killed with SIGKILL
//! and started again (it adopts the group) and upgraded. Every failed connection is put on
//! the event it overlapped; only connections a killed worker held may fail.
//!
//! Run it with `cargo xtask soak [--seconds N] [--seed S]`. It needs root (eBPF).
mod attribution;
mod chaos;
mod group;
mod hands;
mod load;
mod plan;
mod report;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

use crate::{
    attribution::{attribute, Window},
    chaos::sleep_unless,
    group::Group,
    load::Load,
    plan::Schedule,
    report::Summary,
};

/// Chaos soak of balancer: load, random faults and operations, failed connections per event.
#[derive(Parser)]
#[command(
    after_help = "Run through `cargo xtask soak [--seconds N] [--seed S]`, which builds everything and runs this as root."
)]
struct Args {
    /// The balancer binary.
    #[arg(long)]
    balancer: PathBuf,
    /// How long to make events for (the load runs as long).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    seconds: u64,
    /// Replays the events of an earlier run [default: a random seed, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Open-loop connections per second.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rate: u32,
    /// Closed-loop clients.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    closed_clients: u32,
    /// Write the table to OUT/<UTC date>/soak.md [default: write no file].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// Set by SIGINT, SIGTERM or SIGHUP: stop making events, clean up, report.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A failed connection whose life ended this long after an event settled is still the
/// event's: the client notices a reset or a closed connection a moment later.
const MARGIN: Duration = Duration::from_millis(500);
/// The group's size at the start.
const START_WORKERS: u32 = 3;
/// The policy at the start.
const START_POLICY: &str = "cpu";

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("balancer-soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    plan::Rng::new(nanos ^ u64::from(std::process::id()) << 32).next_u64()
}

/// Runs the soak; whether it passed.
fn run(args: &Args) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak starts balancer, which loads eBPF: run it as root (cargo xtask soak does)");
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let seed = args.seed.unwrap_or_else(random_seed);
    eprintln!(
        "soak: seed {seed} (replay: cargo xtask soak --seconds {} --seed {seed}); {} s, open loop at {}/s, {} closed-loop client(s)",
        args.seconds, args.seconds, args.rate, args.closed_clients
    );
    let scratch = std::env::temp_dir().join(format!("balancer-soak-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = soak(args, seed, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let summary = result?;
    if args.json {
        println!("{}", summary.json()?);
    } else {
        print!("{}", summary.markdown());
    }
    if let Some(out) = &args.out {
        let path = summary.write(out)?;
        eprintln!("soak: table written to {}", path.display());
    }
    Ok(summary.passed())
}

fn soak(args: &Args, seed: u64, scratch: &std::path::Path) -> Result<Summary> {
    let mut group = Group::start(&args.balancer, scratch, START_WORKERS, START_POLICY)?;
    // In the scratch directory, which goes at the end: its end is printed on a failure.
    let log = group.log().to_owned();
    let length = Duration::from_secs(args.seconds);
    let origin = Instant::now();
    let load = Load::start(group.addr, args.rate, args.closed_clients, length, origin);
    let mut schedule = Schedule::new(seed, START_WORKERS, START_POLICY);
    let mut windows = Vec::new();
    let mut aborted = None;
    for n in 1.. {
        let (pause, event) = schedule.next_event();
        if origin.elapsed() + pause >= length || !sleep_unless(pause, &STOP) {
            break;
        }
        let start = origin.elapsed();
        eprint!(
            "[{:6.1}s] #{n} {}: {} ...",
            start.as_secs_f64(),
            event.kind().label(),
            event.describe()
        );
        let outcome = chaos::apply(&mut group, &event, schedule.workers(), &STOP);
        let end = origin.elapsed();
        // A failed event keeps its window: what failed during it is still its.
        let (held, error) = match outcome {
            Ok(held) => (held, None),
            Err(e) => (Default::default(), Some(e)),
        };
        let held_note = match held.len() {
            0 => String::new(),
            n => format!(", it held {n} connection(s)"),
        };
        windows.push(Window {
            kind: event.kind(),
            start,
            end,
            held,
        });
        if let Some(e) = error {
            eprintln!(" FAILED");
            aborted = Some(format!(
                "event #{n} ({}) failed: {e:#} (the controller log's end is printed above)",
                event.describe()
            ));
            break;
        }
        eprintln!(
            " settled in {} ms{held_note}; {} answered so far",
            (end - start).as_millis(),
            load.tally().answered.load(Ordering::Relaxed)
        );
    }
    if aborted.is_none() && STOP.load(Ordering::SeqCst) {
        aborted = Some("interrupted".into());
    }
    // Late failures of the last event still land in its window.
    sleep_unless(MARGIN, &STOP);
    eprintln!("soak: events over; waiting for the connections in flight");
    let (opened, answered, failures) = load.finish();
    if aborted.is_some() {
        // Kept for the report: the controller log goes with the scratch directory.
        if let Ok(text) = std::fs::read_to_string(&log) {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("soak: the controller log ends with:");
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
    group.stop();
    Ok(Summary {
        seed,
        seconds: args.seconds,
        rate: args.rate,
        closed: args.closed_clients,
        machine: balancer_bench::host_info::machine(),
        date: balancer_bench::host_info::now_utc(),
        opened,
        answered,
        attribution: attribute(&windows, &failures, MARGIN),
        aborted,
    })
}
