//! The controller's own cost: what one sample of the accept queues costs each way
//! (`getsockopt` per socket, one `sock_diag` dump), and the CPU time of an idle controller
//! (no traffic) at several slot counts, beside what its `status` reports.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use balancer::{
    control::protocol::{SamplingPace, SlotState, StatusReport},
    queue_sampler::Method,
    socket_group::SocketGroup,
};

/// The slot counts measured.
pub const SLOTS: [u32; 3] = [2, 16, 128];

/// One sample's cost each way, for one group size.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SamplingCost {
    /// Sockets in the group (one address).
    pub slots: u32,
    /// ns per sample, one `getsockopt(TCP_INFO)` per socket.
    pub getsockopt_ns: f64,
    /// ns per sample, one `sock_diag` dump.
    pub sock_diag_ns: f64,
    /// The way the controller takes for this size.
    pub chosen: &'static str,
}

/// An idle controller's cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IdleCost {
    /// Slots.
    pub slots: u32,
    /// Its CPU time over the window, % of one CPU (every thread's run time, schedstat).
    pub cpu_percent: f64,
    /// What its `status` said over about the same window, % of one CPU.
    pub reported_percent: f64,
    /// The sampling pace `status` reported.
    pub pace: String,
}

/// Times `rounds` samples of groups of each size, both ways, on loopback.
pub fn sampling_costs(rounds: u32) -> Result<Vec<SamplingCost>> {
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
    SLOTS
        .iter()
        .map(|&slots| {
            let mut group = SocketGroup::bind(&[addr], slots, 128, &[])
                .with_context(|| format!("binding {slots} sockets on loopback"))?;
            let chosen = match group.sampling_method() {
                Method::GetSockOpt => "getsockopt",
                Method::SockDiag => "sock_diag",
            };
            let mut time = |method| {
                // Warm up (and read the inodes once), then time.
                group.depths_with(method);
                let start = Instant::now();
                for _ in 0..rounds {
                    std::hint::black_box(group.depths_with(method));
                }
                start.elapsed().as_nanos() as f64 / f64::from(rounds.max(1))
            };
            let getsockopt_ns = time(Method::GetSockOpt);
            let sock_diag_ns = time(Method::SockDiag);
            Ok(SamplingCost {
                slots,
                getsockopt_ns,
                sock_diag_ns,
                chosen,
            })
        })
        .collect()
}

/// Starts a controller of `slots` demo workers with no traffic, waits until every worker is
/// ready and the pace has settled, and measures its CPU time over `window`.
pub fn idle_cost(
    balancer: &Path,
    scratch: &Path,
    slots: u32,
    window: Duration,
) -> Result<IdleCost> {
    let name = format!("bench-idle-{}-{slots}", std::process::id());
    let control = scratch.join(format!("{name}.sock"));
    // Workers outlive their controller: whatever way this ends, the tag finds them.
    let tag = format!("bench-idle-{}-{slots}", std::process::id());
    let _cleanup = KillTagged(tag.clone());
    let mut child = Command::new(balancer)
        .env(balancer_bench::process::TAG_VAR, &tag)
        .args(["run", "--listen", "127.0.0.1:0", "--workers"])
        .arg(slots.to_string())
        .args(["--name", &name, "--control"])
        .arg(&control)
        .arg("--")
        .arg(balancer)
        .arg("demo-worker")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting an idle balancer")?;
    let measured = measure_idle(balancer, &control, &child, slots, window);
    stop(&mut child);
    measured
}

fn measure_idle(
    balancer: &Path,
    control: &Path,
    child: &Child,
    slots: u32,
    window: Duration,
) -> Result<IdleCost> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = status(balancer, control) {
            if s.slots.len() == slots as usize
                && s.slots.iter().all(|s| s.state == SlotState::Ready)
            {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the idle balancer with {slots} slots was not ready within 60 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Past the quiet while before the pace slows, and past the start's own work.
    thread::sleep(Duration::from_secs(2));
    let pid = child.id();
    let before = run_time(pid)?;
    let start = Instant::now();
    thread::sleep(window);
    let spent = run_time(pid)?.saturating_sub(before);
    let wall = start.elapsed();
    let s = status(balancer, control)?;
    Ok(IdleCost {
        slots,
        cpu_percent: spent.as_secs_f64() / wall.as_secs_f64() * 100.0,
        reported_percent: s.sampling_cost_us_per_sec / 1e4,
        pace: match s.sampling {
            Some(SamplingPace::Off) => "off".into(),
            Some(SamplingPace::Fast { every_us }) => format!("fast, {} µs", every_us),
            Some(SamplingPace::Idle { every_us }) => format!("idle, {} µs", every_us),
            None => "?".into(),
        },
    })
}

/// A process's CPU time: the run time of every thread (`/proc/PID/task/*/schedstat`, in ns;
/// `utime + stime` of `/proc/PID/stat` counts 10 ms ticks, too coarse for an idle process).
pub fn run_time(pid: u32) -> Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // a thread that ended meanwhile
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("{} is not a schedstat line", path.display()))?;
    }
    Ok(Duration::from_nanos(total))
}

fn status(balancer: &Path, control: &Path) -> Result<StatusReport> {
    let out = Command::new(balancer)
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()?;
    if !out.status.success() {
        bail!("balancer status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Kills every process tagged with it when dropped (a failed or interrupted measurement).
struct KillTagged(String);

impl Drop for KillTagged {
    fn drop(&mut self) {
        balancer_bench::process::kill_tagged(&self.0);
    }
}

/// SIGTERM, then SIGKILL after 15 s.
fn stop(child: &mut Child) {
    // SAFETY: kill with a pid we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The section of the report.
pub fn markdown(sampling: &[SamplingCost], idle: &[IdleCost]) -> String {
    let mut out = String::from(
        "\n| slots | one sample, getsockopt per socket | one sample, sock_diag dump | the controller uses |\n|---|---|---|---|\n",
    );
    for s in sampling {
        let _ = writeln!(
            out,
            "| {} | {:.1} µs | {:.1} µs | {} |",
            s.slots,
            s.getsockopt_ns / 1e3,
            s.sock_diag_ns / 1e3,
            s.chosen
        );
    }
    out.push_str("\n| slots | idle controller CPU (no traffic) | its `status` says | sampling pace |\n|---|---|---|---|\n");
    for i in idle {
        let _ = writeln!(
            out,
            "| {} | {:.3} % of one CPU | {:.3} % | {} |",
            i.slots, i.cpu_percent, i.reported_percent, i.pace
        );
    }
    out
}
