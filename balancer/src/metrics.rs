//! `--metrics ADDR:PORT`: the status in Prometheus text format, over plain HTTP.
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

use crate::control::{
    protocol::{Reply, Request, SlotState, StatusReport},
    server::Command,
};

/// Most metrics clients served at once.
const MAX_CLIENTS: usize = 32;
/// Longest time one metrics client may take, request to last byte.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the metrics endpoint; answers every request with the current metrics.
pub async fn serve(
    addr: SocketAddr,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<SocketAddr> {
    // SO_REUSEPORT: during an upgrade the new controller binds the same address while the
    // old one still serves it; each scrape is answered by one of the two.
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
    let bound = listener.local_addr()?;
    // A scraper needs one connection; a flood must not eat the controller's fds.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        debug!("metrics: {MAX_CLIENTS} clients already connected; dropping one");
                        continue;
                    };
                    let commands = commands.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, commands)).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, commands: mpsc::Sender<Command>) {
    // The request itself does not matter (every path serves the metrics); read its head so
    // that closing does not reset the connection under the client.
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await;
    let (tx, rx) = oneshot::channel();
    if commands.send((Request::Status, tx)).await.is_err() {
        return;
    }
    let (code, body) = match rx.await {
        Ok(Ok(Reply::Status(s))) => ("200 OK", render(&s)),
        _ => (
            "503 Service Unavailable",
            "the balancer is shutting down\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!("metrics client: {e}");
    }
    let _ = stream.shutdown().await;
}

/// Renders a status report as Prometheus text exposition.
pub fn render(s: &StatusReport) -> String {
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{PolicyName, SlotState, SlotStatus};

    #[test]
    fn renders_every_family_with_slot_labels() {
        let s = StatusReport {
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
                steered: 5,
                by_cpu: 5,
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
            bpf_ns_per_selection: None,
            bpf_runs: None,
        };
        let text = render(&s);
        assert!(
            text.contains("balancer_selections_total{slot=\"0\",path=\"cpu\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("balancer_accept_queue_depth{slot=\"0\"} 3\n"));
        assert!(text.contains("balancer_worker_state{slot=\"0\",state=\"ready\"} 1\n"));
        assert!(text.contains("balancer_policy_info{policy=\"cpu\"} 1\n"));
        assert!(!text.contains("balancer_program_runs_total"));
    }
}
