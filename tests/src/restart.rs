//! A controller killed with SIGKILL, and starting it again as an operator would: the same
//! arguments, control socket and environment, on the ports it had bound.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use crate::{balancer::Launch, kill_tagged, Balancer};

/// A controller that was SIGKILLed and reaped ([`Balancer::crash`]); what it started may still
/// run. Dropping it kills every process of its tag, unless it was restarted.
pub struct Crashed {
    launch: Launch,
    addrs: Vec<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl Crashed {
    pub(crate) fn new(launch: Launch, addrs: Vec<SocketAddr>, stderr: Arc<Mutex<String>>) -> Self {
        Self {
            launch,
            addrs,
            stderr,
        }
    }

    /// The crashed controller's `BALANCER_TEST_TAG`, which a restart keeps.
    pub fn tag(&self) -> &str {
        &self.launch.tag
    }

    /// The addresses the crashed controller had bound, in `--listen` order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Its control socket path, which a restart keeps.
    pub fn control(&self) -> &Path {
        &self.launch.control
    }

    /// Everything the crashed controller logged, and what its workers log since (they still
    /// write to its stderr).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Starts the same binary again with the same arguments, control socket, environment and
    /// tag, every `--listen` naming the address the crashed controller had bound; waits until
    /// every worker is ready.
    pub fn restart(self) -> Balancer {
        let mut b = self.restart_unready();
        b.wait_ready();
        b
    }

    /// Like [`Crashed::restart`], waiting only for the listening lines.
    pub fn restart_unready(mut self) -> Balancer {
        let mut launch = self.launch.clone();
        launch.args = with_bound_listens(&launch.args, &self.addrs);
        // Should the start fail, this value still cleans the tag up when the panic drops it.
        let b = Balancer::launch(launch);
        // The new controller's `Balancer` owns the tag now.
        self.launch.tag.clear();
        b
    }
}

impl Drop for Crashed {
    fn drop(&mut self) {
        if !self.launch.tag.is_empty() {
            kill_tagged(&self.launch.tag);
            crate::balancer::forget_group(&self.addrs);
        }
    }
}

/// `run` arguments with the value of every `--listen ADDR` (or `--listen=ADDR`) before `--`
/// replaced, in order, by the address actually bound for it: a restart must name the port the
/// first start picked with port 0. Without a `--listen`, the controller listened on its
/// default: the bound addresses are named in front. What follows `--` (the worker command) is
/// kept as it is. Panics when `--listen` options and bound addresses do not pair up.
pub fn with_bound_listens<S: AsRef<str>>(args: &[S], bound: &[SocketAddr]) -> Vec<String> {
    let own = args
        .iter()
        .position(|a| a.as_ref() == "--")
        .unwrap_or(args.len());
    let mut out = Vec::with_capacity(args.len() + 2 * bound.len());
    let mut next = bound.iter();
    let mut take = || -> String {
        next.next()
            .unwrap_or_else(|| {
                panic!(
                    "more --listen options than the bound address(es) {bound:?}: {:?}",
                    args.iter().map(AsRef::as_ref).collect::<Vec<_>>()
                )
            })
            .to_string()
    };
    let mut listens = 0;
    let mut i = 0;
    while i < own {
        let arg = args[i].as_ref();
        if arg == "--listen" {
            listens += 1;
            out.extend([arg.to_owned(), take()]);
            // Skip the old value (unless `--listen` was the last of the controller's own).
            i += if i + 1 < own { 2 } else { 1 };
            continue;
        }
        if arg.starts_with("--listen=") {
            listens += 1;
            out.push(format!("--listen={}", take()));
        } else {
            out.push(arg.to_owned());
        }
        i += 1;
    }
    if listens == 0 {
        let named = bound
            .iter()
            .flat_map(|a| ["--listen".to_owned(), a.to_string()]);
        out.splice(0..0, named);
    } else {
        assert_eq!(
            listens,
            bound.len(),
            "{listens} --listen option(s) for the bound address(es) {bound:?}"
        );
    }
    out.extend(args[own..].iter().map(|a| a.as_ref().to_owned()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_bound_port_replaces_port_0() {
        assert_eq!(
            with_bound_listens(
                &["--listen", "127.0.0.1:0", "--workers", "2"],
                &addrs(&["127.0.0.1:41234"])
            ),
            ["--listen", "127.0.0.1:41234", "--workers", "2"]
        );
    }

    #[test]
    fn several_listens_are_replaced_in_order_and_the_equals_form_too() {
        assert_eq!(
            with_bound_listens(
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--policy",
                    "hash",
                    "--listen=[::1]:0",
                    "--listen",
                    "127.0.0.1:9000",
                ],
                &addrs(&["127.0.0.1:40001", "[::1]:40002", "127.0.0.1:9000"])
            ),
            [
                "--listen",
                "127.0.0.1:40001",
                "--policy",
                "hash",
                "--listen=[::1]:40002",
                "--listen",
                "127.0.0.1:9000",
            ]
        );
    }

    #[test]
    fn without_a_listen_the_bound_addresses_are_named_in_front() {
        assert_eq!(
            with_bound_listens(
                &["--workers", "1", "--", "worker", "--listen", "x"],
                &addrs(&["127.0.0.1:8080", "[::1]:8080"])
            ),
            [
                "--listen",
                "127.0.0.1:8080",
                "--listen",
                "[::1]:8080",
                "--workers",
                "1",
                "--",
                "worker",
                "--listen",
                "x",
            ]
        );
        assert_eq!(
            with_bound_listens::<&str>(&[], &addrs(&["127.0.0.1:1"])),
            ["--listen", "127.0.0.1:1"]
        );
    }

    #[test]
    fn the_worker_command_after_the_separator_is_untouched() {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            "exec server --listen 127.0.0.1:0",
            "--listen",
            "0.0.0.0:0",
            "--",
            "--listen=1.2.3.4:0",
        ];
        let out = with_bound_listens(&args, &addrs(&["127.0.0.1:5555"]));
        assert_eq!(out[..2], ["--listen", "127.0.0.1:5555"]);
        assert_eq!(out[2..], args[2..]);
    }

    #[test]
    fn owned_strings_work_like_str() {
        let args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
        assert_eq!(
            with_bound_listens(&args, &addrs(&["127.0.0.1:7"])),
            ["--listen", "127.0.0.1:7"]
        );
    }

    #[test]
    #[should_panic(expected = "more --listen options than the bound address(es)")]
    fn more_listens_than_bound_addresses_panics() {
        with_bound_listens(
            &["--listen", "127.0.0.1:0", "--listen", "[::1]:0"],
            &addrs(&["127.0.0.1:1"]),
        );
    }

    #[test]
    #[should_panic(expected = "1 --listen option(s) for the bound address(es)")]
    fn fewer_listens_than_bound_addresses_panics() {
        with_bound_listens(
            &["--listen", "127.0.0.1:0"],
            &addrs(&["127.0.0.1:1", "127.0.0.1:2"]),
        );
    }
}
