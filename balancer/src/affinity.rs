//! Pinning workers to CPUs: the kernel's set for a list of CPU ids, and moving running worker
//! process groups onto a new set when a scale changes which CPUs a slot serves.
use std::{collections::HashSet, io};

use nix::{
    errno::Errno,
    sched::{sched_setaffinity, CpuSet},
    unistd::Pid,
};

use crate::procfs;

/// New threads can appear while a group is being moved; its threads are listed again until a
/// pass finds none left to move, at most this many times.
const PASSES: usize = 3;

/// The CPU set holding `cpus`. Fails on an id beyond what the kernel's set type can hold.
pub fn cpu_set(cpus: &[u32]) -> nix::Result<CpuSet> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize)?;
    }
    Ok(set)
}

/// What moving one process group did.
#[derive(Debug, Default)]
pub struct Repinned {
    /// Threads now on the new set.
    pub threads: usize,
    /// Threads the kernel refused to move, with why (EINVAL: no allowed CPU is online or in
    /// the cpuset; EPERM: the process changed its uid).
    pub refused: Vec<(u32, Errno)>,
}

/// Moves every thread of every process in each process group of `plan` (group id, set) onto
/// its set: a worker and whatever it forked or started since. `/proc` is read once for the
/// groups, so a process forked during the move may keep the old set.
pub fn repin_groups(plan: &[(u32, CpuSet)]) -> io::Result<Vec<Repinned>> {
    let groups = procfs::process_groups()?;
    Ok(plan
        .iter()
        .map(|(pgid, set)| {
            let mut done = Repinned::default();
            let mut seen = HashSet::new();
            for pid in groups.get(pgid).into_iter().flatten() {
                for _ in 0..PASSES {
                    let fresh: Vec<u32> = procfs::threads(*pid)
                        .into_iter()
                        .filter(|tid| seen.insert(*tid))
                        .collect();
                    if fresh.is_empty() {
                        break;
                    }
                    for tid in fresh {
                        match sched_setaffinity(Pid::from_raw(tid as i32), set) {
                            Ok(()) => done.threads += 1,
                            // It exited meanwhile.
                            Err(Errno::ESRCH) => {}
                            Err(e) => done.refused.push((tid, e)),
                        }
                    }
                }
            }
            done
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_holds_exactly_its_cpus() {
        let set = cpu_set(&[0, 3]).unwrap();
        assert!(set.is_set(0).unwrap() && set.is_set(3).unwrap());
        assert!(!set.is_set(1).unwrap());
        assert!(cpu_set(&[u32::MAX]).is_err());
    }
}
