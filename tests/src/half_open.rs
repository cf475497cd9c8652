//! Half-open connections: an nftables table that drops the clients' final handshake ACK (and
//! everything else they send) to one listen address, and the kernel's count of the request
//! sockets waiting for it.
//!
//! The table is the test's own (`balancer_test_<pid>_<n>`), matches only packets to the
//! listen address and port, and is deleted when the [`AckDrop`] is dropped, whether the test
//! passed or not. A test process killed before its drop leaves its table behind: the next
//! [`AckDrop::install`] deletes the tables of test processes that are gone.
use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::alive;

/// The prefix of every table the tests create.
const PREFIX: &str = "balancer_test_";

/// An nftables table that drops every packet from a client to `addr` except its SYN: the
/// connections stay half-open (request sockets in the listener's SYN queue) until it is
/// removed. The client's connect still completes (it only needs the SYN-ACK).
pub struct AckDrop {
    table: String,
}

impl AckDrop {
    /// Installs the table; panics with nft's own message (and the fix) when it cannot.
    pub fn install(addr: SocketAddr) -> Self {
        let IpAddr::V4(ip) = addr.ip() else {
            panic!("AckDrop takes an IPv4 listen address, not {addr}");
        };
        sweep_orphans();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let table = format!(
            "{PREFIX}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Output hook: loopback traffic passes it once, on the client's side. A client segment
        // with ACK but no SYN is the handshake's last step or later (data, FIN).
        let script = format!(
            "table ip {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             ip daddr {ip} tcp dport {} tcp flags & (syn | ack) == ack drop\n  }}\n}}\n",
            addr.port()
        );
        nft_stdin(&script).unwrap_or_else(|e| panic!("installing nftables table {table}: {e}"));
        Self { table }
    }

    /// Deletes the table now (the drop does it otherwise), letting the clients' ACKs through.
    pub fn remove(self) {
        drop(self);
    }
}

impl Drop for AckDrop {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "ip", &self.table]) {
            // Never a second panic while unwinding: say it, so that it can be removed by hand.
            eprintln!(
                "could not delete nftables table {}: {e}; run `nft delete table ip {}`",
                self.table, self.table
            );
        }
    }
}

/// Deletes the tables of test processes that no longer run (killed before their drop).
fn sweep_orphans() {
    let Ok(list) = nft(&["list", "tables", "ip"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
    {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !alive(pid) {
            let _ = nft(&["delete", "table", "ip", name]);
        }
    }
}

/// Runs `nft ARGS`; its stdout, or why it failed.
fn nft(args: &[&str]) -> Result<String, String> {
    let out = Command::new("nft").args(args).output().map_err(|e| {
        format!("running nft: {e} (install the nftables package: `cargo xtask setup`)")
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nft {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `nft -f -` on `script`.
fn nft_stdin(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("running nft: {e} (install the nftables package: `cargo xtask setup`)")
        })?;
    let mut stdin = child.stdin.take().ok_or("nft has no stdin")?;
    stdin
        .write_all(script.as_bytes())
        .map_err(|e| format!("writing to nft: {e}"))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f: {}: {}\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Request sockets (TCP `SYN_RECV`) whose local end is `addr` (IPv4), from `/proc/net/tcp`.
pub fn syn_recv(addr: SocketAddr) -> usize {
    let IpAddr::V4(ip) = addr.ip() else {
        panic!("syn_recv takes an IPv4 address, not {addr}");
    };
    // The kernel prints the address as the hex of its in-memory (network order) u32.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        addr.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let mut f = l.split_whitespace();
            // sl, local_address, rem_address, st
            f.nth(1) == Some(local.as_str()) && f.nth(1) == Some("03")
        })
        .count()
}

/// Waits up to `timeout` for `addr` to have exactly `n` request sockets; the last count.
pub fn wait_syn_recv(addr: SocketAddr, n: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let got = syn_recv(addr);
        if got == n || Instant::now() >= deadline {
            return got;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
