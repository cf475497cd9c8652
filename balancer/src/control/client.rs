//! The CLI's end of the control socket: sends one request, prints the reply as a table for
//! people or as JSON for scripts.
use std::{io, path::Path};

use anyhow::{anyhow, Context};
use tokio::net::UnixStream;

use super::protocol::{
    decode_reply, encode_request, read_frame, write_frame, FrameError, Outcome, PolicyName,
    PolicyReport, Reply, Request, SamplingPace, StatusReport,
};
use crate::{
    cli::{Command, ControlArgs, PolicyAction, PolicyArgs, WorkersCommand},
    report::table,
};

/// Sends `request` to the controller at `path` and returns its outcome.
pub async fn call(path: &Path, request: &Request) -> anyhow::Result<Outcome> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow!(
            "no balancer is listening on {} ({e}): is `balancer run` running? Pass its --control PATH",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: the control socket is for root and the controller's user; run as root",
            path.display()
        ),
        _ => anyhow!("connecting to {}: {e}", path.display()),
    })?;
    write_frame(&mut stream, &encode_request(request)?)
        .await
        .context("sending the request")?;
    let frame = read_frame(&mut stream).await.map_err(|e| match e {
        FrameError::Closed => anyhow!("the controller closed the connection without a reply"),
        FrameError::TooLarge(n) => {
            anyhow!("the controller's reply ({n} bytes) is over the frame limit")
        }
        FrameError::Io(e) => anyhow!("reading the reply: {e}"),
    })?;
    Ok(decode_reply(&frame)?)
}

/// Prints a reply: JSON when asked, else a table or the message.
pub fn print(reply: &Reply, json: bool) -> anyhow::Result<()> {
    if json {
        let value = match reply {
            Reply::Status(s) => serde_json::to_value(s)?,
            Reply::Policy(p) => serde_json::to_value(p)?,
            Reply::Done { message } => serde_json::json!({ "message": message }),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match reply {
        Reply::Status(s) => print!("{}", format_status(s)),
        Reply::Policy(p) => print!("{}", format_policy(p)),
        Reply::Done { message } => println!("{message}"),
    }
    Ok(())
}

fn join<T: ToString>(items: &[T], sep: &str) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

/// The sampling pace in force, for people.
fn describe_sampling(s: &StatusReport) -> String {
    let us = |us: u64| humantime::format_duration(std::time::Duration::from_micros(us));
    match s.sampling {
        Some(SamplingPace::Off) => "queues not sampled (nothing uses the load signal)".to_owned(),
        Some(SamplingPace::Fast { every_us }) => format!("queues sampled every {}", us(every_us)),
        Some(SamplingPace::Idle { every_us }) => format!(
            "queues sampled every {} (all empty; every {} once one is not)",
            us(every_us),
            us(s.sample_interval_us)
        ),
        // A controller that predates the adaptive pace sampled at a fixed interval.
        None => format!("queues sampled every {}", us(s.sample_interval_us)),
    }
}

/// The controller's own CPU time, for people.
fn describe_cpu(s: &StatusReport) -> String {
    if s.controller_cpu_window_secs > 0.0 {
        format!(
            "controller CPU: {:.2} % of one CPU over the last {:.0} s ({:.3} s since start)\n",
            s.sampling_cost_us_per_sec / 1e4,
            s.controller_cpu_window_secs,
            s.controller_cpu_secs
        )
    } else {
        // An older controller timed the sampling function only.
        format!(
            "sampling cost: {:.0} µs per second (sampling alone, not the controller's CPU time)\n",
            s.sampling_cost_us_per_sec
        )
    }
}

fn format_status(s: &StatusReport) -> String {
    let mut out = format!(
        "balancer pid {}, up {}, policy {}{}, listening on {}\n",
        s.pid,
        humantime::format_duration(std::time::Duration::from_secs(s.uptime_secs as u64)),
        s.policy,
        s.weights
            .as_ref()
            .map_or(String::new(), |w| format!(" (weights {})", join(w, ","))),
        s.listen.join(", ")
    );
    out.push_str(&format!(
        "spill at queue depth {}; {}\n",
        if s.spill_depth == 0 {
            "off".to_owned()
        } else {
            s.spill_depth.to_string()
        },
        describe_sampling(s)
    ));
    out.push_str(&describe_cpu(s));
    if let (Some(ns), Some(runs)) = (s.bpf_ns_per_selection, s.bpf_runs) {
        out.push_str(&format!(
            "program cost: {ns:.0} ns per selection over {runs} runs\n"
        ));
    }
    let mut rows = vec![[
        "SLOT",
        "PID",
        "STATE",
        "CPUS",
        "RESTARTS",
        "QUEUE",
        "STEERED",
        "BY-CPU",
        "BY-HASH",
        "BY-RR",
        "BY-LL",
        "SPILLED",
        "FALLBACK",
        "MIGRATED",
        "SELECT-ERRORS",
    ]
    .map(str::to_owned)
    .to_vec()];
    for slot in &s.slots {
        rows.push(vec![
            slot.slot.to_string(),
            slot.pid.map_or("-".into(), |p| p.to_string()),
            slot.state.to_string(),
            if slot.cpus.is_empty() {
                "-".into()
            } else {
                join(&slot.cpus, ",")
            },
            slot.restarts.to_string(),
            slot.queue.to_string(),
            slot.steered.to_string(),
            slot.by_cpu.to_string(),
            slot.by_hash.to_string(),
            slot.by_round_robin.to_string(),
            slot.by_least_loaded.to_string(),
            slot.spilled.to_string(),
            slot.fallback.to_string(),
            slot.migrated.to_string(),
            slot.select_errors.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    for slot in &s.slots {
        if let Some(note) = &slot.note {
            out.push_str(&format!("slot {}: {note}\n", slot.slot));
        }
    }
    out
}

fn format_policy(p: &PolicyReport) -> String {
    let spill = match (p.policy, p.spill_depth) {
        (PolicyName::Cpu | PolicyName::Hash, 0) => ", no spill".to_owned(),
        (PolicyName::Cpu | PolicyName::Hash, d) => format!(", spill at queue depth {d}"),
        _ => String::new(),
    };
    let mut out = format!(
        "policy {}{}{spill}\nlive slots: {}\n",
        p.policy,
        p.weights
            .as_ref()
            .map_or(String::new(), |w| format!(", weights {}", join(w, ","))),
        if p.live.is_empty() {
            "none (connections queue on every slot until a worker is ready)".to_owned()
        } else {
            join(&p.live, " ")
        }
    );
    let mut cpu_rows = vec![vec!["CPU".to_owned(), "SLOTS (cpu policy)".to_owned()]];
    for (cpu, slots) in &p.cpu_table {
        cpu_rows.push(vec![cpu.to_string(), join(slots, ",")]);
    }
    out.push_str(&table(&cpu_rows));
    let total: u32 = p.hash_buckets.iter().map(|(_, n)| n).sum();
    let mut hash_rows = vec![vec![
        "SLOT".to_owned(),
        "HASH-BUCKETS".to_owned(),
        "SHARE".to_owned(),
    ]];
    for (slot, n) in &p.hash_buckets {
        hash_rows.push(vec![
            slot.to_string(),
            n.to_string(),
            format!("{:.1}%", 100.0 * f64::from(*n) / f64::from(total.max(1))),
        ]);
    }
    out.push_str(&table(&hash_rows));
    out
}

impl Command {
    /// The control request a client command sends and where to send it; `None` for the
    /// commands that run locally (`run`, `demo-worker`, `completions`, `__man`,
    /// `__exec-worker`).
    pub fn control_request(self) -> Option<(ControlArgs, Request)> {
        Some(match self {
            Command::Run(_)
            | Command::DemoWorker(_)
            | Command::ExecWorker { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => return None,
            Command::Status(c) => (c, Request::Status),
            Command::Policy(PolicyArgs { control, action }) => match action {
                None => (control, Request::Policy),
                Some(PolicyAction::Set {
                    policy,
                    weights,
                    spill_depth,
                }) => (
                    control,
                    Request::SetPolicy {
                        policy,
                        weights,
                        spill_depth,
                    },
                ),
            },
            Command::Workers(WorkersCommand::Restart { control, slot }) => {
                (control, Request::Restart { slot })
            }
            Command::Workers(WorkersCommand::Scale { control, workers }) => {
                (control, Request::Scale { workers })
            }
            Command::Drain(a) => (a.control, Request::Drain { slot: a.slot }),
            Command::Undrain(a) => (a.control, Request::Undrain { slot: a.slot }),
            // The controller may run in another directory: send an absolute path.
            Command::Upgrade(a) => (
                a.control,
                Request::Upgrade {
                    binary: a.binary.map(|b| std::path::absolute(&b).unwrap_or(b)),
                },
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_from_an_older_controller_decodes_and_says_what_its_figure_is() {
        let mut json = serde_json::to_value(crate::metrics::render::sample(1)).unwrap();
        for field in [
            "sampling",
            "controller_cpu_secs",
            "controller_cpu_window_secs",
        ] {
            json.as_object_mut().unwrap().remove(field);
        }
        let old: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(old.sampling, None);
        let text = format_status(&old);
        assert!(text.contains("queues sampled every 1ms\n"), "{text}");
        assert!(
            text.contains("sampling alone, not the controller's CPU time"),
            "{text}"
        );
    }

    #[test]
    fn a_status_shows_the_pace_and_the_controllers_cpu_time() {
        let mut s = crate::metrics::render::sample(1);
        s.sampling_cost_us_per_sec = 1500.0;
        s.controller_cpu_window_secs = 10.0;
        let text = format_status(&s);
        assert!(
            text.contains("queues sampled every 50ms (all empty; every 1ms once one is not)"),
            "{text}"
        );
        assert!(
            text.contains(
                "controller CPU: 0.15 % of one CPU over the last 10 s (0.250 s since start)"
            ),
            "{text}"
        );
        s.sampling = Some(SamplingPace::Off);
        assert!(format_status(&s).contains("queues not sampled"));
    }

    #[test]
    fn policy_table_shows_shares() {
        let p = PolicyReport {
            policy: PolicyName::Hash,
            weights: Some(vec![1, 3]),
            spill_depth: 0,
            live: vec![0, 1],
            cpu_table: vec![(0, vec![0]), (1, vec![1])],
            hash_buckets: vec![(0, 256), (1, 768)],
        };
        let text = format_policy(&p);
        assert!(
            text.starts_with("policy hash, weights 1,3, no spill\nlive slots: 0 1\n"),
            "{text}"
        );
        assert!(text.contains("75.0%"), "{text}");
    }
}
