//! What every test needs first: the binary under test, root, CPUs, scratch paths.
use std::{path::PathBuf, time::Duration};

use crate::online_cpus;

/// How long a balancer may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test: `BALANCER_BIN`, else the workspace's debug build.
pub fn balancer_bin() -> PathBuf {
    let path = std::env::var_os("BALANCER_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/balancer"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: run the integration tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// The online CPUs, for a test that needs at least two (the machine kind has 2).
pub fn two_or_more_cpus() -> Vec<u32> {
    let cpus = online_cpus();
    assert!(
        cpus.len() >= 2,
        "this test needs 2 online CPUs (the machine kind has 2): {cpus:?}"
    );
    cpus
}

/// These tests load eBPF: they need root. Fails (never skips) without it.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests load real eBPF programs and need root: run `cargo xtask test` (it uses sudo)"
    );
}

/// A control socket path no other test uses.
pub fn unique_path(what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = scratch_dir();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{}-{n}-{what}", std::process::id()))
}

/// A directory for the tests' sockets and scripts.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("balancer-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
