//! Pinning for bpftool and for a successor controller: the program and maps of each address
//! under `DIR/<address>/`, and the counters a dead controller's pins hold, carried over.
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use balancer_common::{maps, SlotCounters};
use log::warn;

use super::{Instance, Steering, SteeringError};

impl Instance {
    /// Writes carried counters in (on CPU 0's copy; readers sum over CPUs).
    pub(super) fn seed_counters(&mut self, counters: &[SlotCounters]) {
        let cpus = match aya::util::nr_cpus() {
            Ok(n) => n,
            Err((_, e)) => {
                warn!("cannot count CPUs to carry the counters over: {e}");
                return;
            }
        };
        for (index, c) in (0u32..).zip(counters) {
            let mut values = vec![SlotCounters::default(); cpus];
            if let Some(first) = values.first_mut() {
                *first = *c;
            }
            let written = PerCpuValues::try_from(values)
                .map_err(|e| e.to_string())
                .and_then(|v| self.counters.set(index, v, 0).map_err(|e| e.to_string()));
            if let Err(e) = written {
                warn!("carrying counter {index} over ({}): {e}", self.addr);
            }
        }
    }
}

impl Steering {
    /// Removes what [`Steering::attach`] pinned: the address directories it created under
    /// `dir`, and `dir` itself only when this controller owns it (`owns_dir`: the default
    /// `/sys/fs/bpf/balancer/<name>`, never a `--bpffs-dir` the operator gave, which may hold
    /// anything else).
    pub fn unpin(dir: &Path, addrs: &[SocketAddr], owns_dir: bool) {
        unpin_addresses(dir, addrs);
        if owns_dir {
            // Only if empty: anything else in it is not ours to remove.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The counters pinned under `dir` for each address (index = counter entry, summed over
/// CPUs), as a dead controller's program left them; `None` where nothing readable is pinned.
pub fn pinned_counters(dir: &Path, addrs: &[SocketAddr]) -> Vec<Option<Vec<SlotCounters>>> {
    addrs
        .iter()
        .map(|addr| {
            let path = address_dir(dir, *addr).join(maps::COUNTERS);
            let data = MapData::from_pin(&path).ok()?;
            let map = aya::maps::Map::from_map_data(data).ok()?;
            let counters: PerCpuArray<MapData, SlotCounters> = map.try_into().ok()?;
            (0..balancer_common::COUNTER_ENTRIES)
                .map(|i| {
                    let per_cpu = counters.get(&i, 0).ok()?;
                    let mut sum = SlotCounters::default();
                    per_cpu.iter().for_each(|c| sum.add(c));
                    Some(sum)
                })
                .collect()
        })
        .collect()
}

/// Removes what a dead controller pinned for `addrs` under `dir` (its address directories
/// only), so that the new program and maps can be pinned there.
pub fn unpin_addresses(dir: &Path, addrs: &[SocketAddr]) {
    for addr in addrs {
        let at = address_dir(dir, *addr);
        if let Err(e) = std::fs::remove_dir_all(&at) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("removing stale pins under {}: {e}", at.display());
            }
        }
    }
}

/// `dir/127_0_0_1_8080`, `dir/__1_8080`: one directory per address. bpffs refuses names
/// with a '.', and ':' would read badly in paths.
pub(super) fn address_dir(dir: &Path, addr: SocketAddr) -> PathBuf {
    let name: String = format!("{}_{}", addr.ip(), addr.port())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(name)
}

pub(super) fn pin_error(
    what: &str,
    dir: &Path,
    e: &(dyn std::error::Error + 'static),
) -> SteeringError {
    if super::errors::io_errno(e) == Some(libc::EEXIST) {
        return SteeringError::PinExists(format!("{what} under {}", dir.display()));
    }
    SteeringError::Pin(format!("{what} under {}: {e}", dir.display()))
}

pub(super) fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<(), SteeringError> {
    std::fs::create_dir_all(dir).map_err(|e| pin_error("creating the directory", dir, &e))?;
    // Internal data sections (.rodata, .bss) are not for bpftool, and bpffs refuses their names.
    for (name, map) in ebpf.maps().filter(|(name, _)| !name.starts_with('.')) {
        map.pin(dir.join(name))
            .map_err(|e| pin_error(&format!("pinning map {name}"), dir, &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_that_exists_already_gets_its_own_message() {
        let dir = Path::new("/sys/fs/bpf/x");
        let exists = io::Error::from_raw_os_error(libc::EEXIST);
        let e = pin_error("pinning map SOCKETS", dir, &exists);
        assert!(matches!(e, SteeringError::PinExists(_)), "{e:?}");
        assert!(e.to_string().contains("already exists"), "{e}");
        let other = io::Error::from_raw_os_error(libc::EPERM);
        let e = pin_error("pinning map SOCKETS", dir, &other);
        assert!(matches!(e, SteeringError::Pin(_)), "{e:?}");
        assert!(e.to_string().contains("must be on a BPF filesystem"), "{e}");
    }
}
