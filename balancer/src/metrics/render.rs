//! The status in Prometheus text exposition format.
use std::fmt::Write as _;

use crate::control::protocol::{SamplingPace, SlotState, StatusReport};

/// Renders a status report as Prometheus text exposition; `taken_at`: when it was taken, in
/// seconds since the Unix epoch (a scraper sees how old the snapshot it got is).
pub fn render(s: &StatusReport, taken_at: f64) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_slot = |f: &dyn Fn(&crate::control::protocol::SlotStatus) -> String| {
        s.slots
            .iter()
            .map(|slot| (format!("{{slot=\"{}\"}}", slot.slot), f(slot)))
            .collect::<Vec<_>>()
    };
    let mut selections = Vec::new();
    for slot in &s.slots {
        for (path, v) in [
            ("cpu", slot.by_cpu),
            ("hash", slot.by_hash),
            ("round-robin", slot.by_round_robin),
            ("least-loaded", slot.by_least_loaded),
            ("spill", slot.spilled),
            ("fallback", slot.fallback),
            ("migrate", slot.migrated),
        ] {
            selections.push((
                format!("{{slot=\"{}\",path=\"{path}\"}}", slot.slot),
                v.to_string(),
            ));
        }
    }
    family(
        "balancer_selections_total",
        "counter",
        "Connections the steering program sent to a slot, by decision path.",
        selections,
    );
    family(
        "balancer_select_errors_total",
        "counter",
        "Selections of a slot's socket that failed (the program then tried other live slots).",
        per_slot(&|x| x.select_errors.to_string()),
    );
    family(
        "balancer_fallbacks_total",
        "counter",
        "Connections sent to a slot after the first choice could not be selected.",
        per_slot(&|x| x.fallback.to_string()),
    );
    family(
        "balancer_worker_restarts_total",
        "counter",
        "Times a slot's worker was replaced (crash, or rolling restart).",
        per_slot(&|x| x.restarts.to_string()),
    );
    family(
        "balancer_accept_queue_depth",
        "gauge",
        "Connections waiting in a slot's accept queue(s).",
        per_slot(&|x| x.queue.to_string()),
    );
    let mut states = Vec::new();
    for slot in &s.slots {
        for state in SlotState::ALL {
            states.push((
                format!("{{slot=\"{}\",state=\"{state}\"}}", slot.slot),
                u8::from(slot.state == state).to_string(),
            ));
        }
    }
    family(
        "balancer_worker_state",
        "gauge",
        "1 for the state each slot is in.",
        states,
    );
    family(
        "balancer_policy_info",
        "gauge",
        "The active steering policy.",
        vec![(format!("{{policy=\"{}\"}}", s.policy), "1".into())],
    );
    if let (Some(ns), Some(runs)) = (s.bpf_ns_per_selection, s.bpf_runs) {
        family(
            "balancer_program_runs_total",
            "counter",
            "Runs of the steering program (kernel bpf_stats).",
            vec![(String::new(), runs.to_string())],
        );
        family(
            "balancer_program_ns_per_run",
            "gauge",
            "Average run time of the steering program in nanoseconds (kernel bpf_stats).",
            vec![(String::new(), format!("{ns:.1}"))],
        );
    }
    family(
        "balancer_controller_cpu_seconds_total",
        "counter",
        "CPU time the controller process used since it started (user and system, every thread).",
        vec![(String::new(), format!("{:.6}", s.controller_cpu_secs))],
    );
    if let Some(pace) = s.sampling {
        let every_us = match pace {
            SamplingPace::Off => 0,
            SamplingPace::Fast { every_us } | SamplingPace::Idle { every_us } => every_us,
        };
        family(
            "balancer_sampling_interval_seconds",
            "gauge",
            "The accept-queue sampling interval in force (0: not sampling; longer than --sample-interval while every queue is empty).",
            vec![(String::new(), format!("{:.6}", every_us as f64 / 1e6))],
        );
    }
    family(
        "balancer_metrics_snapshot_timestamp_seconds",
        "gauge",
        "When the controller took the status these metrics show (Unix time; refreshed every second).",
        vec![(String::new(), format!("{taken_at:.3}"))],
    );
    out
}

/// A one-slot status whose slot steered `steered` connections by CPU.
#[cfg(test)]
pub fn sample(steered: u64) -> StatusReport {
    use crate::control::protocol::{PolicyName, SlotStatus};
    StatusReport {
        pid: 1,
        uptime_secs: 1.0,
        policy: PolicyName::Cpu,
        weights: None,
        listen: vec!["127.0.0.1:1".into()],
        slots: vec![SlotStatus {
            slot: 0,
            pid: Some(2),
            state: SlotState::Ready,
            cpus: vec![0],
            restarts: 1,
            queue: 3,
            steered,
            by_cpu: steered,
            by_hash: 0,
            by_round_robin: 0,
            by_least_loaded: 0,
            spilled: 0,
            fallback: 0,
            migrated: 0,
            select_errors: 0,
            note: None,
        }],
        spill_depth: 16,
        sample_interval_us: 1000,
        sampling_cost_us_per_sec: 1.0,
        sampling: Some(SamplingPace::Idle { every_us: 50_000 }),
        controller_cpu_secs: 0.25,
        controller_cpu_window_secs: 0.0,
        bpf_ns_per_selection: None,
        bpf_runs: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_slot_labels() {
        let s = sample(5);
        let text = render(&s, 1_700_000_000.25);
        assert!(
            text.contains("balancer_selections_total{slot=\"0\",path=\"cpu\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("balancer_accept_queue_depth{slot=\"0\"} 3\n"));
        assert!(text.contains("balancer_worker_state{slot=\"0\",state=\"ready\"} 1\n"));
        assert!(text.contains("balancer_policy_info{policy=\"cpu\"} 1\n"));
        assert!(!text.contains("balancer_program_runs_total"));
        assert!(text.contains("balancer_metrics_snapshot_timestamp_seconds 1700000000.250\n"));
        assert!(text.contains("# TYPE balancer_controller_cpu_seconds_total counter\n"));
        assert!(
            text.contains("balancer_controller_cpu_seconds_total 0.250000\n"),
            "{text}"
        );
        assert!(
            text.contains("balancer_sampling_interval_seconds 0.050000\n"),
            "{text}"
        );
    }
}
