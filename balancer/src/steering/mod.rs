//! The steering program: loading it once per listen address, filling its maps, publishing
//! tables atomically, and reading its counters.
//!
//! The kernel only lets a program select sockets of the group it is attached to, so every
//! listen address gets its own program instance with its own socket array; the tables are
//! the same for all of them.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{ProgramError, SkReuseport},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use balancer_common::{
    maps, Config, PolicyKind, SlotCounters, Tables, FLAG_REFUSE_NEW, NO_SLOT, PROGRAM_SELECT,
};
use log::warn;
use tokio::io::unix::AsyncFd;

use crate::socket_group::SocketGroup;

mod errors;
mod pins;
mod sock_array;
mod sockets;

pub use errors::SteeringError;
use errors::{classify_ebpf, classify_program};
use pins::{address_dir, pin_error, pin_maps};
pub use pins::{pinned_counters, unpin_addresses};
pub use sock_array::{socket_cookie, SockArray};

/// The object `cargo xtask build` compiled; empty in a plain `cargo build`.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/balancer.bpf.o"));

/// A buffer that just became inactive may still be read by a program run that started
/// before the switch. Runs take well under a microsecond; waiting this long before writing
/// into that buffer again makes a torn read impossible in practice.
const QUIESCE: Duration = Duration::from_millis(2);

/// How long an adopting controller waits for the kernel to free the dead controller's socket
/// arrays (deferred work after the old program is replaced).
const HELD_WAIT: Duration = Duration::from_secs(5);

/// One program instance, attached to one address's group.
struct Instance {
    addr: SocketAddr,
    // Held so the program lives as long as the group.
    ebpf: Ebpf,
    sockets: SockArray,
    config: Array<MapData, Config>,
    depths: Array<MapData, u32>,
    /// What `depths` holds, so that unchanged values are not written again.
    depths_written: Vec<u32>,
    tables: Array<MapData, Tables>,
    counters: PerCpuArray<MapData, SlotCounters>,
}

/// Decision counters of one listen address.
#[derive(Clone, Debug)]
pub struct AddressCounters {
    /// The listen address.
    pub addr: SocketAddr,
    /// Index = slot.
    pub slots: Vec<SlotCounters>,
    /// Decisions no slot could be charged with (the program found no config or tables).
    pub unattributed: SlotCounters,
}

/// Fails unless this binary carries a real eBPF object (checked before anything is bound).
pub fn check_object() -> Result<(), SteeringError> {
    check_object_bytes(OBJECT)
}

/// The maps the controller takes from the object (the program's others are its own).
const REQUIRED_MAPS: [&str; 5] = [
    maps::SOCKETS,
    maps::CONFIG,
    maps::TABLES,
    maps::COUNTERS,
    maps::DEPTHS,
];

/// Whether `object` is an eBPF object with the program and every map the controller uses:
/// parsed, not loaded, so that a wrong object is refused before anything is bound.
fn check_object_bytes(object: &[u8]) -> Result<(), SteeringError> {
    if !object.starts_with(b"\x7fELF") {
        return Err(SteeringError::NoObject);
    }
    let parsed =
        aya_obj::Object::parse(object).map_err(|e| SteeringError::Unreadable(e.to_string()))?;
    if let Some(name) = REQUIRED_MAPS
        .into_iter()
        .find(|name| !parsed.maps.contains_key(*name))
    {
        return Err(SteeringError::Missing(name));
    }
    if !parsed.programs.contains_key(PROGRAM_SELECT) {
        return Err(SteeringError::Missing("select program"));
    }
    Ok(())
}

/// The loaded, attached steering programs of a socket group.
pub struct Steering {
    instances: Vec<Instance>,
    slots: u32,
    active: u32,
    switched_at: Option<Instant>,
    /// [`Config::flags`] and [`Config::refuse_until_ns`] for every config written from now on.
    flags: u32,
    refuse_until_ns: u64,
}

impl Steering {
    /// Loads one program instance per address, fills its socket array (index = slot), publishes
    /// `tables` under `policy`, and only then attaches it, so that the program never runs on
    /// empty maps. Must run inside the tokio runtime (eBPF log lines are read by a task).
    /// With `pin_dir`, the program and maps of each address are pinned under
    /// `pin_dir/<address>/` for `bpftool`; [`Steering::unpin`] removes them.
    ///
    /// `carried[address]` are the counters a dead controller's program left (read from its
    /// pins by [`pinned_counters`]): they are written in before the program is attached, so
    /// that an adopted group's counters continue.
    pub fn attach(
        group: &SocketGroup,
        slots: u32,
        (policy, spill_depth): (PolicyKind, u32),
        tables: &Tables,
        pin_dir: Option<&Path>,
        carried: &[Option<Vec<SlotCounters>>],
    ) -> Result<Self, SteeringError> {
        check_object()?;
        let mut instances = Vec::with_capacity(group.addresses.len());
        for address in &group.addresses {
            let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(classify_ebpf)?;
            let pin_at = pin_dir.map(|d| address_dir(d, address.addr));
            if let Some(dir) = &pin_at {
                pin_maps(&ebpf, dir)?;
            }
            match EbpfLogger::init(&mut ebpf) {
                // The task owns the logger: dropping it would close the log map.
                Ok(logger) => spawn_log_forwarder(logger),
                Err(e) => warn!("eBPF log lines will not be shown: {e}"),
            }
            let take = |ebpf: &mut Ebpf, name: &'static str| {
                ebpf.take_map(name).ok_or(SteeringError::Missing(name))
            };
            let map_err = |what: &str| {
                let what = format!("{what} ({})", address.addr);
                move |source| SteeringError::Map { what, source }
            };
            let sockets =
                SockArray::new(take(&mut ebpf, maps::SOCKETS)?).map_err(map_err("socket array"))?;
            let config = take(&mut ebpf, maps::CONFIG)?
                .try_into()
                .map_err(map_err("config map"))?;
            let tables_map = take(&mut ebpf, maps::TABLES)?
                .try_into()
                .map_err(map_err("tables map"))?;
            let counters = take(&mut ebpf, maps::COUNTERS)?
                .try_into()
                .map_err(map_err("counters map"))?;
            let depths = take(&mut ebpf, maps::DEPTHS)?
                .try_into()
                .map_err(map_err("depths map"))?;
            let program: &mut SkReuseport = ebpf
                .program_mut(PROGRAM_SELECT)
                .ok_or(SteeringError::Missing("select program"))?
                .try_into()
                .map_err(|e: ProgramError| SteeringError::Load(e.to_string()))?;
            program.load().map_err(classify_program)?;
            if let Some(dir) = &pin_at {
                program
                    .pin(dir.join(PROGRAM_SELECT))
                    .map_err(|e| pin_error("pinning the program", dir, &e))?;
            }
            instances.push(Instance {
                addr: address.addr,
                ebpf,
                sockets,
                config,
                depths,
                depths_written: vec![0; balancer_common::MAX_SLOTS as usize],
                tables: tables_map,
                counters,
            });
        }
        let mut steering = Self {
            instances,
            slots,
            active: 1,
            switched_at: None,
            flags: 0,
            refuse_until_ns: 0,
        };
        // An adopted socket is still in the dead controller's socket array (a socket can be in
        // one at a time), which lives as long as the old program: it goes in after ours is
        // attached. Meanwhile selections of its slot fail and the kernel's hash picks a
        // socket of the group: late steering, nothing lost.
        let held = steering.publish_sockets_but_held(group, 0..slots)?;
        steering.write(policy, spill_depth, tables)?;
        for (instance, carried) in steering.instances.iter_mut().zip(carried) {
            if let Some(counters) = carried {
                instance.seed_counters(counters);
            }
        }
        steering.attach_all(group)?;
        steering.publish_held(group, held)?;
        Ok(steering)
    }

    /// Attaches this program to every address's reuseport group (replacing the one there).
    fn attach_all(&mut self, group: &SocketGroup) -> Result<(), SteeringError> {
        for (instance, address) in self.instances.iter_mut().zip(&group.addresses) {
            let program: &mut SkReuseport = instance
                .ebpf
                .program_mut(PROGRAM_SELECT)
                .ok_or(SteeringError::Missing("select program"))?
                .try_into()
                .map_err(|e: ProgramError| SteeringError::Load(e.to_string()))?;
            // Through a listening socket: one a worker shut down (and not yet replaced) is in
            // no group, and attaching through it would miss the real one.
            let Some(first) = address
                .sockets
                .iter()
                .find(|s| crate::socket_group::is_listening(s))
                .or(address.sockets.first())
            else {
                continue;
            };
            program
                .attach(first)
                .map_err(|source| SteeringError::Attach {
                    addr: address.addr,
                    source,
                })?;
        }
        Ok(())
    }

    /// Publishes new tables: written whole into the inactive buffer, then made active by one
    /// write of the config entry, so no selection ever sees a half-written table.
    pub async fn publish(
        &mut self,
        policy: PolicyKind,
        spill_depth: u32,
        tables: &Tables,
    ) -> Result<(), SteeringError> {
        if let Some(at) = self.switched_at {
            let wait = QUIESCE.saturating_sub(at.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        self.write(policy, spill_depth, tables)
    }

    fn write(
        &mut self,
        policy: PolicyKind,
        spill_depth: u32,
        tables: &Tables,
    ) -> Result<(), SteeringError> {
        let next = 1 - self.active;
        for i in &mut self.instances {
            i.tables
                .set(next, tables, 0)
                .map_err(|source| SteeringError::Map {
                    what: format!("writing tables ({})", i.addr),
                    source,
                })?;
        }
        let config = Config {
            policy: policy as u32,
            active: next,
            spill_depth,
            flags: self.flags,
            refuse_until_ns: self.refuse_until_ns,
        };
        for i in &mut self.instances {
            i.config
                .set(0, config, 0)
                .map_err(|source| SteeringError::Map {
                    what: format!("switching tables ({})", i.addr),
                    source,
                })?;
        }
        self.active = next;
        self.switched_at = Some(Instant::now());
        Ok(())
    }

    /// From now on, and for at most `for_at_most`, the program refuses every new connection
    /// (it still places connections migrating from a closing socket): the controller is
    /// stopping.
    pub fn refuse_new(&mut self, for_at_most: Duration) -> Result<(), SteeringError> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map_err(|e| SteeringError::Load(format!("reading CLOCK_MONOTONIC: {e}")))?;
        let now_ns = Duration::from(now).as_nanos();
        self.refuse_until_ns =
            u64::try_from(now_ns.saturating_add(for_at_most.as_nanos())).unwrap_or(u64::MAX);
        self.flags |= FLAG_REFUSE_NEW;
        for i in &mut self.instances {
            let mut config = i.config.get(&0, 0).map_err(|source| SteeringError::Map {
                what: format!("reading the config ({})", i.addr),
                source,
            })?;
            config.flags = self.flags;
            config.refuse_until_ns = self.refuse_until_ns;
            i.config
                .set(0, config, 0)
                .map_err(|source| SteeringError::Map {
                    what: format!("refusing new connections ({})", i.addr),
                    source,
                })?;
        }
        Ok(())
    }

    /// Reads and sums the per-CPU decision counters of every address.
    pub fn counters(&self) -> Result<Vec<AddressCounters>, SteeringError> {
        self.instances
            .iter()
            .map(|i| {
                let read = |index: u32| -> Result<SlotCounters, SteeringError> {
                    let per_cpu =
                        i.counters
                            .get(&index, 0)
                            .map_err(|source| SteeringError::Map {
                                what: format!("reading counters ({})", i.addr),
                                source,
                            })?;
                    let mut sum = SlotCounters::default();
                    per_cpu.iter().for_each(|c| sum.add(c));
                    Ok(sum)
                };
                Ok(AddressCounters {
                    addr: i.addr,
                    slots: (0..self.slots).map(read).collect::<Result<_, _>>()?,
                    unattributed: read(NO_SLOT)?,
                })
            })
            .collect()
    }

    /// Publishes sampled accept-queue depths: `depths[address][slot]`. Only changed values
    /// are written (one syscall each).
    pub fn write_depths(&mut self, depths: &[Vec<u32>]) {
        for (i, per_slot) in self.instances.iter_mut().zip(depths) {
            for (slot, d) in per_slot.iter().enumerate() {
                if i.depths_written.get(slot) == Some(d) {
                    continue;
                }
                match i.depths.set(slot as u32, d, 0) {
                    Ok(()) => i.depths_written[slot] = *d,
                    Err(e) => warn!("writing slot {slot}'s queue depth ({}): {e}", i.addr),
                }
            }
        }
    }

    /// Forgets slots `slots..` (before the group shrinks): clears their counters, so that a
    /// slot created again later starts from zero.
    pub fn remove_slots(&mut self, slots: u32) {
        let cpus = match aya::util::nr_cpus() {
            Ok(n) => n,
            Err((_, e)) => {
                warn!("cannot count CPUs to clear counters: {e}");
                return;
            }
        };
        for i in &mut self.instances {
            for slot in slots..self.slots {
                let zero = PerCpuValues::try_from(vec![SlotCounters::default(); cpus]);
                if let Ok(zero) = zero {
                    if let Err(e) = i.counters.set(slot, zero, 0) {
                        warn!("clearing slot {slot}'s counters ({}): {e}", i.addr);
                    }
                }
            }
        }
        self.slots = slots;
    }

    /// Program run time and run count summed over the addresses (kernel `bpf_stats`).
    pub fn program_stats(&self) -> Option<(u64, u64)> {
        let mut total = (0u64, 0u64);
        for i in &self.instances {
            let program: &SkReuseport = i.ebpf.program(PROGRAM_SELECT)?.try_into().ok()?;
            let info = program.info().ok()?;
            total.0 += info.run_time().as_nanos() as u64;
            total.1 += info.run_count();
        }
        Some(total)
    }

    /// Detaches the program from every group (before the sockets close on shutdown).
    pub fn detach(&self, group: &SocketGroup) {
        for address in &group.addresses {
            if let Err(e) = SkReuseport::detach(&address.sockets[0]) {
                warn!("detaching the steering program from {}: {e}", address.addr);
            }
        }
    }
}

fn spawn_log_forwarder(logger: EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged until the
    // logger is dropped, and the AsyncFd owns the logger.
    let mut fd =
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!("eBPF log lines will not be shown: {e}");
                return;
            }
        };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_without_its_object_refuses_to_start() {
        for (object, what) in [(&b""[..], "empty"), (b"#!/bin/sh\n", "a script")] {
            let e = check_object_bytes(object).unwrap_err();
            assert!(matches!(e, SteeringError::NoObject), "{what}: {e:?}");
            assert!(e.to_string().contains("cargo xtask build"), "{what}: {e}");
        }
        let e = check_object_bytes(b"\x7fELF and then nothing").unwrap_err();
        assert!(matches!(e, SteeringError::Unreadable(_)), "{e:?}");
    }

    /// The embedded object with every occurrence of `name` (its symbol and BTF names)
    /// replaced by a name of the same length: an object that lacks that map or program.
    fn renamed(name: &str) -> Vec<u8> {
        let mut object = OBJECT.to_vec();
        let mut other = name.as_bytes().to_vec();
        if let Some(last) = other.last_mut() {
            *last = if *last == b'X' { b'Y' } else { b'X' };
        }
        let mut at = 0;
        let mut found = 0;
        while let Some(i) = object[at..]
            .windows(name.len())
            .position(|w| w == name.as_bytes())
        {
            object[at + i..at + i + name.len()].copy_from_slice(&other);
            at += i + name.len();
            found += 1;
        }
        assert!(found > 0, "{name} is not in the object");
        object
    }

    #[test]
    fn the_embedded_object_is_checked_for_every_map_and_the_program() {
        if option_env!("BALANCER_EBPF_OBJ").is_none() {
            // A plain `cargo test` embeds no object (`cargo xtask test` embeds it): only
            // its refusal can be checked.
            assert!(matches!(check_object(), Err(SteeringError::NoObject)));
            return;
        }
        check_object().expect("the object `cargo xtask build` compiled passes");
        for name in REQUIRED_MAPS {
            match check_object_bytes(&renamed(name)) {
                Err(SteeringError::Missing(missing)) => assert_eq!(missing, name),
                other => panic!("an object without map {name}: {other:?}"),
            }
        }
        match check_object_bytes(&renamed(PROGRAM_SELECT)) {
            Err(SteeringError::Missing(missing)) => assert_eq!(missing, "select program"),
            other => panic!("an object without the select program: {other:?}"),
        }
    }
}
