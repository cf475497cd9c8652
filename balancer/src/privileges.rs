//! Up-front capability check, so that a missing privilege is reported before any socket is
//! bound, in words that say what to do.
use std::fs;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// A capability the balancer needs is missing.
#[derive(Debug, thiserror::Error)]
#[error(
    "loading the steering program needs CAP_BPF (or CAP_SYS_ADMIN), which this process lacks: \
run as root, e.g. `sudo balancer run ...` or `cargo xtask run`"
)]
pub struct MissingCapability;

/// Checks the effective capability set of this process.
pub fn check() -> Result<(), MissingCapability> {
    // If /proc cannot tell, let the kernel decide: the load error is classified too.
    let Some(eff) = effective_caps() else {
        return Ok(());
    };
    if has(eff, CAP_BPF) || has(eff, CAP_SYS_ADMIN) {
        Ok(())
    } else {
        Err(MissingCapability)
    }
}

fn has(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let eff = parse_cap_eff(status).unwrap();
        assert!(has(eff, CAP_BPF));
        let eff = parse_cap_eff("CapEff:\t0000000000003000\n").unwrap();
        assert!(!has(eff, CAP_BPF) && !has(eff, CAP_SYS_ADMIN));
    }
}
