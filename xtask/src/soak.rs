//! `cargo xtask soak` and the soak's pass in `cargo xtask test`.
use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{build_release_tools, cargo_with_object, is_root, root_dir, sh, target_dir};

/// The length of the pass in `cargo xtask test`: every kind of event at least once.
const TEST_SECONDS: &str = "20";

/// A command that runs `binary` as root: directly when we are root, else through `sudo -E`.
pub(crate) fn as_root(binary: &Path, what: &str) -> Result<Command> {
    if is_root() {
        Ok(Command::new(binary))
    } else if Path::new("/usr/bin/sudo").exists() {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(binary);
        Ok(c)
    } else {
        bail!("{what} loads eBPF and needs root; sudo is not installed: run it as root")
    }
}

/// `cargo xtask soak`: release builds, then the soak, its table written to
/// bench/results/<date>/soak.md.
pub(crate) fn run(seconds: u64, seed: Option<u64>, json: bool) -> Result<()> {
    build_release_tools("the soak")?;
    let release = target_dir().join("release");
    let mut cmd = as_root(&release.join("balancer-soak"), "the soak")?;
    cmd.arg("--balancer")
        .arg(release.join("balancer"))
        .arg("--seconds")
        .arg(seconds.to_string())
        .arg("--out")
        .arg(root_dir().join("bench/results"));
    if let Some(seed) = seed {
        cmd.arg("--seed").arg(seed.to_string());
    }
    if json {
        cmd.arg("--json");
    }
    sh(&mut cmd)
}

/// The soak's pass in `cargo xtask test`: 20 s against the debug controller the integration
/// tests used, a random seed (printed, to replay a failure), no file written.
pub(crate) fn test_pass(object: &Path) -> Result<()> {
    sh(cargo_with_object(object).args(["build", "-p", "balancer-bench"]))?;
    let debug = target_dir().join("debug");
    let mut cmd = as_root(&debug.join("balancer-soak"), "the soak")?;
    cmd.arg("--balancer")
        .arg(debug.join("balancer"))
        .args(["--seconds", TEST_SECONDS]);
    sh(&mut cmd)
}
