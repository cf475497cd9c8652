//! Processes as `/proc` shows them: which exist, their process groups and their threads.
use std::{collections::HashMap, fs, io, path::Path};

/// The ids named by the numeric entries of a `/proc` directory (`/proc`: processes,
/// `/proc/PID/task`: threads). Entries that vanish while listed are skipped.
pub fn numbered(dir: &Path) -> io::Result<Vec<u32>> {
    Ok(fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect())
}

/// The threads of process `pid` (none once it is gone).
pub fn threads(pid: u32) -> Vec<u32> {
    numbered(Path::new(&format!("/proc/{pid}/task"))).unwrap_or_default()
}

/// Every process by process group, read in one pass (a worker's group is the worker and
/// whatever it forked since).
pub fn process_groups() -> io::Result<HashMap<u32, Vec<u32>>> {
    let mut groups: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in numbered(Path::new("/proc"))? {
        if let Some(pgrp) = process_group(pid) {
            groups.entry(pgrp).or_default().push(pid);
        }
    }
    Ok(groups)
}

/// The process group of `pid`, from `/proc/PID/stat` (None once it is gone).
fn process_group(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_pgrp(&stat)
}

/// The `pgrp` field of a `/proc/PID/stat` line. The command name before it is in parentheses
/// and may itself contain spaces and parentheses, so fields are counted from the last `)`.
fn parse_pgrp(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgrp_is_read_past_a_command_name_with_spaces_and_parentheses() {
        assert_eq!(
            parse_pgrp("4242 (my (odd) worker) S 1 4240 4240 0 -1 4194560 0"),
            Some(4240)
        );
        assert_eq!(parse_pgrp("1 (init) S 0 1 1"), Some(1));
        assert_eq!(parse_pgrp("garbage"), None);
    }

    #[test]
    fn this_process_is_found_in_its_group() {
        // SAFETY: no preconditions.
        let pgrp = unsafe { libc::getpgrp() } as u32;
        assert_eq!(process_group(std::process::id()), Some(pgrp));
        let groups = process_groups().unwrap();
        assert!(groups[&pgrp].contains(&std::process::id()), "{groups:?}");
    }

    #[test]
    fn this_process_has_its_threads_listed() {
        assert!(threads(std::process::id()).contains(&std::process::id()));
    }
}
