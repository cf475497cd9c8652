//! Read models: what `status`, `policy` and the counters table show. They read the
//! supervisor's state and the host's counters; they change nothing.
use balancer_common::SlotCounters;
use log::error;

use super::{host::Host, machine::Supervisor, pacing::Pace};
use crate::{
    control::protocol::{PolicyReport, SamplingPace, SlotStatus, StatusReport},
    policy::describe,
    report::SlotView,
};

impl<H: Host> Supervisor<H> {
    /// The `status` reply.
    pub fn status(&self) -> StatusReport {
        let now = self.host.now();
        let counters = self.host.counters().unwrap_or_else(|e| {
            error!("reading the steering counters: {e}");
            Vec::new()
        });
        let layout_slots = self.layout_slots();
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut sum = SlotCounters::default();
                for a in &counters {
                    if let Some(c) = a.slots.get(i) {
                        sum.add(c);
                    }
                }
                SlotStatus {
                    slot: i as u32,
                    pid: s.current().map(|w| w.pid),
                    state: s.state(self.phase),
                    cpus: self.settings.layout.pinned_cpus(i as u32, layout_slots),
                    restarts: s.crashes.restarts,
                    queue: self.depths.get(i).copied().unwrap_or(0),
                    steered: sum.selected(),
                    by_cpu: sum.by_cpu,
                    by_hash: sum.by_hash,
                    by_round_robin: sum.by_round_robin,
                    by_least_loaded: sum.by_least_loaded,
                    spilled: sum.spilled,
                    fallback: sum.fallback,
                    migrated: sum.migrated,
                    select_errors: sum.select_error,
                    note: s.stall.describe(now),
                }
            })
            .collect();
        let stats = self
            .settings
            .bpf_stats
            .then(|| self.host.program_stats())
            .flatten();
        let uptime = now.saturating_duration_since(self.started).as_secs_f64();
        let cpu = self.host.cpu_time();
        let cpu_rate = self.cpu.rate(now, cpu);
        StatusReport {
            pid: std::process::id(),
            uptime_secs: uptime,
            policy: self.steer.policy.into(),
            weights: self.steer.weights.clone(),
            spill_depth: self.steer.spill_depth,
            sample_interval_us: self.settings.sample_interval.as_micros() as u64,
            sampling_cost_us_per_sec: cpu_rate.per_sec * 1e6,
            sampling: Some(match self.pace() {
                Pace::Off => SamplingPace::Off,
                Pace::Fast(d) => SamplingPace::Fast {
                    every_us: d.as_micros() as u64,
                },
                Pace::Idle(d) => SamplingPace::Idle {
                    every_us: d.as_micros() as u64,
                },
            }),
            controller_cpu_secs: cpu.as_secs_f64(),
            controller_cpu_window_secs: cpu_rate.window.as_secs_f64(),
            listen: self
                .host
                .addresses()
                .iter()
                .map(ToString::to_string)
                .collect(),
            slots,
            bpf_ns_per_selection: stats
                .filter(|(_, runs)| *runs > 0)
                .map(|(ns, runs)| ns as f64 / runs as f64),
            bpf_runs: stats.map(|(_, runs)| runs),
        }
    }

    /// The `policy` reply.
    pub fn policy_report(&self) -> PolicyReport {
        let (live, tables) = self.tables();
        let (cpu_table, hash_buckets) = describe(&self.settings.layout, self.slot_count(), &tables);
        PolicyReport {
            policy: self.steer.policy.into(),
            weights: self.steer.weights.clone(),
            spill_depth: self.steer.spill_depth,
            live: (0u32..)
                .zip(&live)
                .filter(|(_, l)| **l)
                .map(|(s, _)| s)
                .collect(),
            cpu_table,
            hash_buckets,
        }
    }

    /// Every slot as the counters table shows it.
    pub fn slot_views(&self) -> Vec<SlotView> {
        self.slots
            .iter()
            .map(|s| SlotView {
                pid: s.current().map(|w| w.pid),
                state: s.state(self.phase),
                restarts: s.crashes.restarts,
            })
            .collect()
    }

    /// Prints the counters table (SIGUSR1, and at exit).
    pub fn print_report(&mut self) {
        let views = self.slot_views();
        self.host.print_counters(&views);
    }
}
