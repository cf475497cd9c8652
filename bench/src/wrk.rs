//! `wrk`, the real client of the nginx arms: a new connection per request
//! (`-H "Connection: close"`), its summary parsed.
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};

/// The program, as Debian installs it (`cargo xtask setup`).
pub const PROGRAM: &str = "/usr/bin/wrk";

/// Open connections per wrk thread: enough that a thread always has one connecting while
/// another waits for its answer.
pub const CONNECTIONS_PER_THREAD: u32 = 4;

/// What one wrk run measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct WrkRun {
    /// Completed requests (each on its own connection).
    pub requests: u64,
    /// Requests (so new connections) per second, as wrk reports it.
    pub rate: f64,
    /// Socket errors: connect, read, write and timeout.
    pub errors: u64,
    /// Answers that were not 2xx or 3xx.
    pub non_2xx: u64,
}

/// Fails with the fix when wrk is not installed.
pub fn check_installed() -> Result<()> {
    if !Path::new(PROGRAM).exists() {
        bail!("{PROGRAM} is not installed: run `cargo xtask setup` (it installs the Debian package wrk)");
    }
    Ok(())
}

/// The arguments: `threads` threads, [`CONNECTIONS_PER_THREAD`] connections each, whole
/// seconds (at least one: wrk takes no less).
pub fn args(addr: SocketAddr, threads: u32, duration: Duration) -> Vec<String> {
    let threads = threads.max(1);
    vec![
        "-t".into(),
        threads.to_string(),
        "-c".into(),
        (threads * CONNECTIONS_PER_THREAD).to_string(),
        "-d".into(),
        format!("{}s", duration.as_secs().max(1)),
        // The space matters: without it wrk sends the header unparsed and keeps connections alive.
        "-H".into(),
        "Connection: close".into(),
        format!("http://{addr}/"),
    ]
}

/// Runs wrk against `addr`; it ends by itself after `duration`.
pub fn run(addr: SocketAddr, threads: u32, duration: Duration) -> Result<WrkRun> {
    let out = Command::new(PROGRAM)
        .args(args(addr, threads, duration))
        .output()
        .with_context(|| format!("running {PROGRAM}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
}

/// Parses wrk's summary: `N requests in 1.00s, …`, `Requests/sec: …`, and, when there were
/// any, `Socket errors: connect A, read B, write C, timeout D` and `Non-2xx or 3xx responses: N`.
pub fn parse(text: &str) -> Result<WrkRun> {
    let mut run = WrkRun::default();
    let mut seen = (false, false);
    for line in text.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            run.requests = n
                .trim()
                .parse()
                .with_context(|| format!("wrk request count in {line:?}"))?;
            seen.0 = true;
        } else if let Some(r) = line.strip_prefix("Requests/sec:") {
            run.rate = r
                .trim()
                .parse()
                .with_context(|| format!("wrk rate in {line:?}"))?;
            seen.1 = true;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            for part in errors.split(',') {
                let n = part
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .with_context(|| format!("wrk socket errors in {line:?}"))?;
                run.errors += n;
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = n
                .trim()
                .parse()
                .with_context(|| format!("wrk non-2xx count in {line:?}"))?;
        }
    }
    if seen != (true, true) {
        bail!("wrk printed no summary (requests and Requests/sec): {text:?}");
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "Running 1s test @ http://127.0.0.1:8080/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   416.44us  201.10us   3.09ms   80.00%
    Req/Sec     8.53k   612.08    9.31k    70.00%
  16980 requests in 1.00s, 2.62MB read
Requests/sec:  16975.12
Transfer/sec:      2.62MB
";

    #[test]
    fn a_clean_summary_has_no_errors() {
        let r = parse(CLEAN).unwrap();
        assert_eq!(
            r,
            WrkRun {
                requests: 16980,
                rate: 16975.12,
                errors: 0,
                non_2xx: 0
            }
        );
    }

    #[test]
    fn socket_errors_and_bad_statuses_are_counted() {
        let text = CLEAN.replace(
            "Requests/sec",
            "  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\nRequests/sec",
        );
        let r = parse(&text).unwrap();
        assert_eq!((r.errors, r.non_2xx), (10, 5));
    }

    #[test]
    fn no_summary_is_an_error() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused\n").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn the_header_closes_every_connection_and_threads_scale() {
        let a = args(
            "127.0.0.1:9".parse().unwrap(),
            16,
            Duration::from_millis(300),
        );
        assert_eq!(
            a,
            [
                "-t",
                "16",
                "-c",
                "64",
                "-d",
                "1s",
                "-H",
                "Connection: close",
                "http://127.0.0.1:9/"
            ]
        );
    }
}
