//! Turning runs into figures: a markdown table, JSON, SVG charts, and docs/performance.md.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

use crate::{load::RunResult, wrk::WrkRun};
use balancer_bench::host_info::{machine, now_utc};

/// A fault scenario's outcome for one arm.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scenario {
    /// Connections tried.
    pub connections: u64,
    /// First byte after more than 1 s, or never.
    pub slow: u64,
    /// No answer within the deadline.
    pub timed_out: u64,
    /// Refused or reset.
    pub failed: u64,
}

/// Everything measured for one arm.
pub struct ArmReport {
    /// Arm name.
    pub name: String,
    /// Whether nginx serves it (its own table; measured by wrk too).
    pub nginx: bool,
    /// wrk runs (nginx arms).
    pub wrk: Vec<WrkRun>,
    /// Throughput runs.
    pub runs: Vec<RunResult>,
    /// Program ns per selection (stats pass).
    pub program_ns: Option<f64>,
    /// Stopped-worker scenario.
    pub stall: Option<Scenario>,
    /// Killed-workers scenario.
    pub kill: Option<Scenario>,
    /// Policy switches under load (balancer cpu arm).
    pub switch: Option<Scenario>,
    /// Controller `kill -9` and restart (adoption) under load (balancer arms).
    pub restart: Option<Scenario>,
    /// Controller upgrades under load (balancer arms).
    pub upgrade: Option<Scenario>,
    /// The controller's CPU time during each throughput run, % of one CPU (balancer arms).
    pub controller_cpu: Vec<f64>,
}

impl ArmReport {
    /// An arm with nothing measured yet.
    pub fn new(name: String, nginx: bool) -> Self {
        Self {
            name,
            nginx,
            wrk: Vec::new(),
            runs: Vec::new(),
            program_ns: None,
            stall: None,
            kill: None,
            switch: None,
            restart: None,
            upgrade: None,
            controller_cpu: Vec::new(),
        }
    }

    fn median_by(&self, f: impl Fn(&RunResult) -> f64) -> (f64, f64, f64) {
        spread(self.runs.iter().map(f).collect())
    }

    /// The median locality, when the answers said (the demo worker's do, nginx's do not).
    fn locality(&self) -> Option<f64> {
        let v: Vec<f64> = self.runs.iter().filter_map(RunResult::locality).collect();
        (!v.is_empty()).then(|| spread(v).0)
    }

    fn wrk_rate(&self) -> (f64, f64, f64) {
        spread(self.wrk.iter().map(|w| w.rate).collect())
    }
}

/// Median, min and max (zeros when empty).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    match (v.get(v.len() / 2), v.first(), v.last()) {
        (Some(m), Some(lo), Some(hi)) => (*m, *lo, *hi),
        _ => (0.0, 0.0, 0.0),
    }
}

/// The whole benchmark.
pub struct Report {
    arms: Vec<ArmReport>,
    plan: String,
    smoke: bool,
    /// CPUs the bench ran with: workers per arm and client threads.
    cpus: usize,
    machine: String,
    date: String,
    /// The controller-cost section (markdown), when measured.
    pub cost: String,
}

#[derive(serde::Serialize)]
struct ArmJson<'a> {
    name: &'a str,
    rates: Vec<f64>,
    cpu_us_per_connection: Vec<f64>,
    locality: Vec<Option<f64>>,
    failed: Vec<u64>,
    wrk: &'a [WrkRun],
    program_ns_per_selection: Option<f64>,
    stopped_worker: Option<Scenario>,
    killed_workers: Option<Scenario>,
    policy_switches: Option<Scenario>,
    controller_restarts: Option<Scenario>,
    controller_upgrades: Option<Scenario>,
    /// % of one CPU, per throughput run (balancer arms).
    controller_cpu_percent: &'a [f64],
}

impl Report {
    /// Collects the arms' results.
    pub fn new(arms: Vec<ArmReport>, plan: &str, smoke: bool, cpus: usize) -> Self {
        Self {
            arms,
            plan: plan.to_owned(),
            smoke,
            cpus,
            machine: machine(),
            date: now_utc(),
            cost: String::new(),
        }
    }

    fn baseline(&self) -> Option<&ArmReport> {
        self.arms.iter().find(|a| a.name.starts_with("2 "))
    }

    /// Arm 3, `SO_INCOMING_CPU`: what the cpu policy competes with.
    fn incoming_cpu(&self) -> Option<&ArmReport> {
        self.arms.iter().find(|a| a.name.starts_with("3 "))
    }

    fn floor_ns(&self) -> Option<f64> {
        self.arms
            .iter()
            .find(|a| a.name.starts_with("7 "))
            .and_then(|a| a.program_ns)
    }

    /// The results table and scenario table, in markdown.
    pub fn markdown(&self) -> String {
        let base_rate = self
            .baseline()
            .map_or(1.0, |b| b.median_by(RunResult::rate).0);
        let base_cpu = self
            .baseline()
            .map_or(1.0, |b| b.median_by(RunResult::cpu_per_connection_us).0);
        let workers = self.cpus.max(1);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Machine: {}. Date: {}. {} workers per arm, {} client threads.\n",
            self.machine, self.date, workers, workers
        );
        let _ = writeln!(out, "Plan: {}.\n", self.plan);
        let incoming_cpu = self
            .incoming_cpu()
            .map_or(1.0, |b| b.median_by(RunResult::cpu_per_connection_us).0);
        out.push_str("| arm | new conn/s, median (min–max) | × arm 2 | CPU µs/conn | × arm 2 | × arm 3 | locality | CV | max/min | connect p50 / p99 µs | TTFB p50 / p99 µs | program ns/selection (− floor) | controller CPU, median | failed |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for a in self.arms.iter().filter(|a| !a.nginx) {
            let (rate, lo, hi) = a.median_by(RunResult::rate);
            let (cpu, _, _) = a.median_by(RunResult::cpu_per_connection_us);
            let loc = a
                .locality()
                .map_or("–".into(), |l| format!("{:.1} %", l * 100.0));
            let (cv, _, _) = a.median_by(|r| r.evenness(workers).0);
            let (mm, _, _) = a.median_by(|r| r.evenness(workers).1);
            let last = a.runs.last();
            let q = |h: Option<&hdrhistogram::Histogram<u64>>, p: f64| {
                h.map_or(0, |h| h.value_at_quantile(p))
            };
            let program = match (a.program_ns, self.floor_ns()) {
                (Some(ns), Some(floor)) if !a.name.starts_with("7 ") => {
                    format!("{ns:.0} ({:+.0})", ns - floor)
                }
                (Some(ns), _) => format!("{ns:.0} (floor)"),
                _ => "–".into(),
            };
            let controller = {
                let mut v = a.controller_cpu.clone();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2)
                    .map_or("–".into(), |c| format!("{c:.2} % of one CPU"))
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.1} | {:.2} | {:.2} | {} | {:.3} | {:.2} | {} / {} | {} / {} | {} | {} | {} |",
                a.name,
                rate,
                lo,
                hi,
                rate / base_rate.max(1e-9),
                cpu,
                cpu / base_cpu.max(1e-9),
                cpu / incoming_cpu.max(1e-9),
                loc,
                cv,
                mm,
                q(last.map(|r| &r.connect), 0.5),
                q(last.map(|r| &r.connect), 0.99),
                q(last.map(|r| &r.ttfb), 0.5),
                q(last.map(|r| &r.ttfb), 0.99),
                program,
                controller,
                a.runs.iter().map(|r| r.failed).sum::<u64>(),
            );
        }
        out.push_str("\n| arm | stopped worker: first byte > 1 s | timed out | failed | killed workers: failed connections | policy switches: failed | controller kill -9 + restart: failed | controller upgrades: failed |\n");
        out.push_str("|---|---|---|---|---|---|---|---|\n");
        for a in self.arms.iter().filter(|a| !a.nginx) {
            let s = a.stall;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                a.name,
                s.map_or("–".into(), |s| format!(
                    "{} of {} ({:.2} %)",
                    s.slow,
                    s.connections,
                    100.0 * s.slow as f64 / s.connections.max(1) as f64
                )),
                s.map_or("–".into(), |s| s.timed_out.to_string()),
                s.map_or("–".into(), |s| s.failed.to_string()),
                failed_of(a.kill),
                failed_of(a.switch),
                failed_of(a.restart),
                failed_of(a.upgrade),
            );
        }
        if !self.cost.is_empty() {
            out.push_str("\nController cost (sampling one group of loopback listeners; an idle controller of demo workers, no traffic):\n");
            out.push_str(&self.cost);
        }
        out.push_str(&self.nginx_markdown(workers));
        out
    }

    /// The nginx arms: new connections per second by wrk and by the bench's client, and the
    /// ratios to nginx's own shared socket (N1) and `reuseport` (N2).
    fn nginx_markdown(&self, workers: usize) -> String {
        let nginx: Vec<&ArmReport> = self.arms.iter().filter(|a| a.nginx).collect();
        if nginx.is_empty() {
            return String::new();
        }
        let base = |prefix: &str| nginx.iter().copied().find(|a| a.name.starts_with(prefix));
        let (n1, n2) = (base("N1 "), base("N2 "));
        let ratio = |x: f64, b: Option<&ArmReport>, f: fn(&ArmReport) -> f64| {
            b.map(f)
                .filter(|r| *r > 0.0)
                .map_or("–".into(), |r| format!("{:.2}", x / r))
        };
        let wrk_med = |a: &ArmReport| a.wrk_rate().0;
        let ours_med = |a: &ArmReport| a.median_by(RunResult::rate).0;
        let mut out = String::from(
            "\n| nginx arm | wrk new conn/s, median (min–max) | × N1 | × N2 | our client new conn/s, median (min–max) | × N1 | × N2 | CV over nginx workers (our client) | wrk socket errors / non-2xx | our client failed |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for a in &nginx {
            let (w, wlo, whi) = a.wrk_rate();
            let (o, olo, ohi) = a.median_by(RunResult::rate);
            let (cv, _, _) = a.median_by(|r| r.evenness(workers).0);
            let _ = writeln!(
                out,
                "| {} | {w:.0} ({wlo:.0}–{whi:.0}) | {} | {} | {o:.0} ({olo:.0}–{ohi:.0}) | {} | {} | {cv:.3} | {} / {} | {} |",
                a.name,
                ratio(w, n1, wrk_med),
                ratio(w, n2, wrk_med),
                ratio(o, n1, ours_med),
                ratio(o, n2, ours_med),
                a.wrk.iter().map(|r| r.errors).sum::<u64>(),
                a.wrk.iter().map(|r| r.non_2xx).sum::<u64>(),
                a.runs.iter().map(|r| r.failed).sum::<u64>(),
            );
        }
        out
    }

    /// Writes results.md, results.json and the charts under `root/<date>/`.
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let dir = root.join(if self.smoke {
            format!("smoke-{}", self.date.replace([' ', ':'], "-"))
        } else {
            self.date.replace([' ', ':'], "-")
        });
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        let json: Vec<ArmJson> = self
            .arms
            .iter()
            .map(|a| ArmJson {
                name: &a.name,
                rates: a.runs.iter().map(RunResult::rate).collect(),
                cpu_us_per_connection: a
                    .runs
                    .iter()
                    .map(RunResult::cpu_per_connection_us)
                    .collect(),
                locality: a.runs.iter().map(RunResult::locality).collect(),
                failed: a.runs.iter().map(|r| r.failed).collect(),
                wrk: &a.wrk,
                program_ns_per_selection: a.program_ns,
                stopped_worker: a.stall,
                killed_workers: a.kill,
                policy_switches: a.switch,
                controller_restarts: a.restart,
                controller_upgrades: a.upgrade,
                controller_cpu_percent: &a.controller_cpu,
            })
            .collect();
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        self.chart(
            &dir.join("throughput.svg"),
            "new connections per second (median, min–max)",
            RunResult::rate,
        )?;
        self.chart(
            &dir.join("cpu.svg"),
            "busy CPU µs per connection (median, min–max)",
            RunResult::cpu_per_connection_us,
        )?;
        Ok(dir)
    }

    fn chart(&self, path: &Path, title: &str, f: fn(&RunResult) -> f64) -> Result<()> {
        let values: Vec<(f64, f64, f64)> = self.arms.iter().map(|a| a.median_by(f)).collect();
        let top = values.iter().map(|v| v.2).fold(0.0, f64::max).max(1e-9) * 1.1;
        let n = self.arms.len();
        let root = SVGBackend::new(path, (900, 60 + 40 * n as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(260)
            .build_cartesian_2d(0.0..top, (0..n).into_segmented())?;
        let names: Vec<String> = self.arms.iter().map(|a| a.name.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()?;
        chart.draw_series(values.iter().enumerate().map(|(i, v)| {
            Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (v.0, SegmentValue::Exact(i + 1)),
                ],
                BLUE.mix(0.5).filled(),
            )
        }))?;
        chart.draw_series(values.iter().enumerate().map(|(i, v)| {
            PathElement::new(
                vec![
                    (v.1, SegmentValue::CenterOf(i)),
                    (v.2, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )
        }))?;
        root.present()?;
        Ok(())
    }

    /// Writes docs/performance.md: the latest table, the machine, how to reproduce.
    pub fn write_docs(&self, docs: &Path, results: &Path) -> Result<()> {
        let rel = results
            .strip_prefix(
                docs.parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("")),
            )
            .unwrap_or(results)
            .display()
            .to_string();
        let text = format!(
            "# Performance\n\n\
The latest `cargo xtask bench` run, written by the benchmark itself. Every arm serves the same \
demo worker (`balancer demo-worker`) with one worker per CPU, measured by the same client (one \
closed-loop thread per CPU, pinned, each from its own 127.x.y.z source address, one request per \
connection; the server closes first), arms interleaved run by run. The bench counts the CPUs \
of the machine it runs on: the same command on a many-core host gives that host's table.\n\n\
Arms: 1, one listening socket shared by every worker; 2, `SO_REUSEPORT` with the kernel's hash \
(the reference for the ratios); 3, `SO_REUSEPORT` with `SO_INCOMING_CPU` set per listener and \
workers pinned to their CPU; 4–6, balancer with each policy (`cpu` with `--pin-workers`); 7, \
`SO_REUSEPORT` with an `SK_REUSEPORT` program that only returns `SK_PASS` (the BPF floor for \
the program cost column). Locality: the share of connections answered on the CPU that \
received them. CV and max/min: the spread of connections over workers. Program cost: \
`run_time_ns / run_cnt` from the kernel's BPF statistics, in a separate pass, minus arm 7. \
× arm 3: CPU per connection against `SO_INCOMING_CPU`, what the cpu policy competes with. \
Controller CPU: the balancer controller's own CPU time (every thread's run time) during the \
throughput runs, per second of wall time. Controller cost: one sample of the accept queues \
each way (`getsockopt` per socket, one `sock_diag` dump), and an idle controller's CPU time \
over 10 s without traffic beside what its `status` says.\n\n\
Scenarios: *stopped worker*, an open-loop client, on the stopped worker's CPU, while one worker is `SIGSTOP`ped; *killed \
workers*, one worker `SIGKILL`ed after another under closed-loop load (arms 1–3 and 7 restart \
theirs at once like a pre-fork master; in arms 2, 3 and 7 the killed worker's socket closes \
with it, so what was queued on it is reset); *policy switches*, balancer's policy changed \
every 300 ms under load. A killed worker also loses the connections it had already accepted, \
in every arm. balancer backs off respawning a worker that keeps dying within 10 s of its start \
(100 ms, doubling), so under kills every 300 ms its slots stay down longer than a plain \
master's instant restart: it serves fewer connections in that scenario, and fails fewer.\n\n\
nginx arms (the last table): nginx as the server, one nginx worker process per CPU in every \
arm. N1, plain nginx, `worker_processes N` and one `listen` (a socket shared by every worker); \
N2, the same with `listen … reuseport` (nginx's own `SO_REUSEPORT`, a socket per worker); N3 \
and N4, `balancer run --socket-protocol nginx --stop-signal QUIT --workers N -- nginx -c CONF` \
with policy `cpu` (`--pin-workers`) and `hash`, each slot one nginx master with \
`worker_processes 1`. The configuration is docs/workers.md's (daemon off, master process on, \
`return 200 \"pid=$pid\"`), with the access log off. Each run is measured by the bench's \
client and then, on the same server, by `wrk -t N -c 4N -H \"Connection: close\"` (a new \
connection per request); ratios are to N1 and N2. No fault scenarios run on these arms.\n\n{}\n\
Charts: [throughput]({rel}/throughput.svg), [CPU per connection]({rel}/cpu.svg); raw figures \
in [{rel}/results.json]({rel}/results.json).\n\n\
## Reproduce\n\n```sh\ncargo xtask bench          # five runs per arm, several minutes\n\
cargo xtask bench --quick  # about a minute\n```\n\n\
It builds the release binaries, runs the benchmark as root (through sudo when needed), writes \
`bench/results/<date>/` and this page. Loopback only; every load is bounded in count and time. \
`cargo xtask test` runs a seconds-long smoke pass that checks correctness only.\n",
            self.markdown()
        );
        let text = text.replace(&format!("{}/", results.display()), &format!("{rel}/"));
        std::fs::write(docs, text).with_context(|| format!("writing {}", docs.display()))
    }

    /// The smoke pass's correctness checks (never timing).
    pub fn check_smoke(&self) -> Result<()> {
        for a in &self.arms {
            let served: u64 = a.runs.iter().map(|r| r.connections).sum();
            let failed: u64 = a.runs.iter().map(|r| r.failed).sum();
            if served == 0 || failed > 0 {
                bail!(
                    "{}: {served} connections served, {failed} failed without any fault",
                    a.name
                );
            }
            if a.nginx {
                let requests: u64 = a.wrk.iter().map(|r| r.requests).sum();
                let errors: u64 = a.wrk.iter().map(|r| r.errors + r.non_2xx).sum();
                if requests == 0 || errors > 0 {
                    bail!(
                        "{}: wrk made {requests} requests, {errors} failed (socket errors or not 2xx) without any fault",
                        a.name
                    );
                }
            }
            // The demo worker's cpu arm: every answer says where it was handled.
            if !a.nginx && a.name.ends_with("balancer cpu") {
                let local: u64 = a.runs.iter().map(|r| r.local).sum();
                if local != served {
                    bail!(
                        "{}: {local} of {served} connections handled on their RX CPU",
                        a.name
                    );
                }
            }
            if let Some(s) = a.stall {
                if s.connections == 0 {
                    bail!("{}: the stopped-worker scenario made no connection", a.name);
                }
            }
            for (what, s) in [
                ("controller kill -9 and restart", a.restart),
                ("controller upgrades", a.upgrade),
            ] {
                if let Some(r) = s {
                    if r.connections == 0 || r.failed > 0 {
                        bail!(
                            "{}: {} of {} connections failed across {what}",
                            a.name,
                            r.failed,
                            r.connections
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// A closed-loop scenario's cell: "failed of connections", or "–" where it was not run.
fn failed_of(s: Option<Scenario>) -> String {
    s.map_or("–".into(), |k| {
        format!("{} of {}", k.failed, k.connections)
    })
}
