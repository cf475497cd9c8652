//! What a controller leaves behind for its successor: the group's record under
//! `/run/balancer/<name>/state.json`, rewritten atomically on every change, so that a
//! controller restarted after a crash (or an upgrade) finds the live workers, which slot each
//! serves, and the steering state. Every process in it is named by pid *and* start time, so
//! that a reused pid is never mistaken for a worker.
use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::control::protocol::PolicyName;

/// Where group records live.
pub const STATE_ROOT: &str = "/run/balancer";
/// The record's version: a successor refuses a record of another version instead of
/// misreading it.
pub const RECORD_VERSION: u32 = 1;

/// A process named so that pid reuse cannot fool us: its start time (clock ticks after boot,
/// `/proc/PID/stat` field 22) changes with every new process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// Its pid.
    pub pid: u32,
    /// Its start time.
    pub start_time: u64,
}

impl ProcessId {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        Some(Self {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Whether this very process still runs (not a zombie, not a newer process on its pid).
    pub fn alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now == *self)
    }
}

/// The start time of `pid` from `/proc/PID/stat`; `None` for a process that is gone or a
/// zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 (`starttime`) of a stat line, counted after the command name's last `)`; `None`
/// for a zombie (state `Z`), which serves nothing.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    // Fields 3.. follow the name: state is field 3, starttime field 22.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// A slot's worker, as the record keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker.
    pub process: ProcessId,
    /// Whether it was ready.
    pub ready: bool,
}

/// A slot, as the record keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Its worker, if one ran.
    pub worker: Option<WorkerRecord>,
    /// Drained by the operator.
    pub drained: bool,
    /// Times its worker was replaced.
    pub restarts: u32,
    /// Its other workers: a rolling restart's successor, replaced workers still finishing.
    /// A successor stops them (they would otherwise run on unsupervised).
    #[serde(default)]
    pub others: Vec<ProcessId>,
}

/// Everything a successor needs to adopt the group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The controller that wrote it.
    pub controller: ProcessId,
    /// The bound listen addresses, in `--listen` order (fd 3, 4, … of every worker).
    pub listen: Vec<SocketAddr>,
    /// Every slot, index = slot.
    pub slots: Vec<SlotRecord>,
    /// The policy.
    pub policy: PolicyName,
    /// Spill depth.
    pub spill_depth: u32,
    /// Hash weights.
    pub weights: Option<Vec<u32>>,
}

/// Reading or writing a record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a record this build understands.
    #[error("{path} is not a group record this balancer understands ({why}): if no worker of that group runs any more, remove it")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Whether `name` can name a group: a directory under /run/balancer and on a BPF filesystem
/// (which refuses '.').
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} cannot name a group: use 1 to 64 letters, digits, '_' or '-'"
        ))
    }
}

/// The default name of the group listening on `addrs`: `127_0_0_1_8080`, several joined by
/// `-`.
pub fn derive_name(addrs: &[SocketAddr]) -> String {
    let name = addrs
        .iter()
        .map(|a| {
            format!("{}_{}", a.ip(), a.port())
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("-");
    // Long IPv6 lists stay within the limit, still distinct enough to find by eye.
    name.chars().take(64).collect()
}

/// The directory of group `name`'s record.
pub fn record_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

impl GroupRecord {
    /// The record in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, RecordError> {
        let path = dir.join("state.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        let record: Self = serde_json::from_str(&text).map_err(|e| RecordError::Unreadable {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if record.version != RECORD_VERSION {
            return Err(RecordError::Unreadable {
                path,
                why: format!(
                    "version {}, this build writes {RECORD_VERSION}",
                    record.version
                ),
            });
        }
        if let Err(why) = record.check() {
            return Err(RecordError::Unreadable { path, why });
        }
        Ok(Some(record))
    }

    /// Whether the record can describe a group (it may have been edited by hand).
    fn check(&self) -> Result<(), String> {
        let slots = self.slots.len();
        if !(1..=balancer_common::MAX_SLOTS as usize).contains(&slots) {
            return Err(format!(
                "{slots} slots, not 1 to {}",
                balancer_common::MAX_SLOTS
            ));
        }
        if self.listen.is_empty() {
            return Err("no listen address".into());
        }
        if let Some(w) = &self.weights {
            if w.len() != slots {
                return Err(format!("{} weights for {slots} slots", w.len()));
            }
        }
        Ok(())
    }

    /// Writes the record into `dir` atomically (a new file renamed over the old one), so that
    /// a crash at any moment leaves the old record or the new one, never half of one.
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join("state.json.tmp");
        let path = dir.join("state.json");
        let text = serde_json::to_vec_pretty(self).map_err(|e| RecordError::Unreadable {
            path: path.clone(),
            why: e.to_string(),
        })?;
        fs::write(&tmp, text).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Removes the record and the group's directory (a deliberate shutdown leaves nothing
    /// to adopt; its workers, which the notify socket there served, are gone).
    pub fn remove(dir: &Path) {
        let _ = fs::remove_file(dir.join("state.json"));
        let _ = fs::remove_file(dir.join("state.json.tmp"));
        let _ = fs::remove_file(dir.join("notify"));
        let _ = fs::remove_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_spaces_and_parens_in_the_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_start_time(stat), Some(987654));
        let zombie = "42 (x) Z 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_start_time(zombie), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn names_are_derived_from_addresses_and_checked() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        ];
        let name = derive_name(&addrs);
        assert_eq!(name, "127_0_0_1_8080-__1_8080");
        assert_eq!(check_name(&name), Ok(()));
        assert!(check_name("a.b").is_err());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        let many: Vec<SocketAddr> = (0..8)
            .map(|i| format!("[2001:db8::{i}]:8080").parse().unwrap())
            .collect();
        assert_eq!(check_name(&derive_name(&many)), Ok(()));
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.alive());
        let reused = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive());
    }

    #[test]
    fn records_round_trip_atomically_and_refuse_other_versions() {
        let dir = std::env::temp_dir().join(format!("balancer-record-{}", std::process::id()));
        let record = GroupRecord {
            version: RECORD_VERSION,
            controller: ProcessId::of(std::process::id()).unwrap(),
            listen: vec!["127.0.0.1:8080".parse().unwrap()],
            slots: vec![SlotRecord::default()],
            policy: PolicyName::Cpu,
            spill_depth: 16,
            weights: None,
        };
        assert_eq!(GroupRecord::load(&dir).unwrap(), None);
        record.save(&dir).unwrap();
        assert_eq!(GroupRecord::load(&dir).unwrap(), Some(record.clone()));
        let mut many = record.clone();
        many.slots = vec![SlotRecord::default(); 129];
        many.save(&dir).unwrap();
        assert!(matches!(
            GroupRecord::load(&dir),
            Err(RecordError::Unreadable { .. })
        ));
        let mut weighted = record.clone();
        weighted.weights = Some(vec![1, 2]);
        weighted.save(&dir).unwrap();
        assert!(matches!(
            GroupRecord::load(&dir),
            Err(RecordError::Unreadable { .. })
        ));
        let mut other = record;
        other.version = 99;
        other.save(&dir).unwrap();
        assert!(matches!(
            GroupRecord::load(&dir),
            Err(RecordError::Unreadable { .. })
        ));
        GroupRecord::remove(&dir);
        assert!(!dir.exists());
    }
}
