//! Views of a status report that the control tests share, and a group whose workers can be
//! made to refuse to start.
use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use balancer::control::protocol::{SlotState, SlotStatus, StatusReport};

use crate::{balancer_bin, unique_path, Balancer};

/// Every slot's worker pid, in slot order; panics when a slot has none.
pub fn pids(status: &StatusReport) -> Vec<u32> {
    worker_pids(&status.slots)
}

/// The worker pids of `slots`, in order; panics when a slot has none.
pub fn worker_pids(slots: &[SlotStatus]) -> Vec<u32> {
    slots
        .iter()
        .map(|s| {
            s.pid
                .unwrap_or_else(|| panic!("slot {} has no worker: {slots:?}", s.slot))
        })
        .collect()
}

/// A counter summed over every slot.
pub fn sum(status: &StatusReport, field: impl Fn(&SlotStatus) -> u64) -> u64 {
    status.slots.iter().map(field).sum()
}

/// Whether the status has exactly `n` slots, all ready.
pub fn all_ready(status: &StatusReport, n: usize) -> bool {
    status.slots.len() == n && status.slots.iter().all(|s| s.state == SlotState::Ready)
}

/// A worker script that runs the demo worker, or exits with status 3 before it is ready while
/// the shell condition `refuse_if` holds (it may test `$BALANCER_SLOT`).
pub fn refusing_worker(refuse_if: &str) -> PathBuf {
    let script = unique_path("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif {refuse_if}; then echo 'refusing to start' >&2; exit 3; fi\nexec '{}' demo-worker\n",
            balancer_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// Two slots under `hash` whose workers run the demo worker, or exit with status 3 before they
/// are ready once the returned flag file exists. Returns (controller, flag, worker script).
pub fn refusable_group() -> (Balancer, PathBuf, PathBuf) {
    let flag = unique_path("refuse.flag");
    let (b, script) = refusing_group(&format!("[ -e '{}' ]", flag.display()));
    (b, flag, script)
}

/// Two slots under `hash` whose workers run [`refusing_worker`]`(refuse_if)`. Returns
/// (controller, worker script).
pub fn refusing_group(refuse_if: &str) -> (Balancer, PathBuf) {
    let script = refusing_worker(refuse_if);
    let b = Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--",
        script.to_str().unwrap(),
    ]);
    (b, script)
}
