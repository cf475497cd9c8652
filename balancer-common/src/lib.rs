//! Types and constants shared by the balancer controller and its `SK_REUSEPORT` program.
//!
//! Everything here is `#[repr(C)]` plain data: the controller writes it into BPF maps and
//! the program reads it back, so both sides must agree on layout byte for byte.
#![no_std]

/// Names of the maps in the eBPF object, used by both sides so that no name is spelled twice.
pub mod maps {
    /// `REUSEPORT_SOCKARRAY`: index = slot, value = that slot's listening socket.
    pub const SOCKETS: &str = "SOCKETS";
    /// `ARRAY` of one [`crate::Config`]: which policy and which table buffer are active.
    pub const CONFIG: &str = "CONFIG";
    /// `ARRAY` of two [`crate::Tables`]: the double buffer the controller publishes into.
    pub const TABLES: &str = "TABLES";
    /// `PERCPU_ARRAY` of [`crate::SlotCounters`]: index = slot, plus one for [`crate::NO_SLOT`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `ARRAY` of `u32`: index = slot, value = its accept-queue depth as last sampled.
    pub const DEPTHS: &str = "DEPTHS";
    /// `PERCPU_ARRAY` of one `u32`: each CPU's round-robin position.
    pub const ROTATION: &str = "ROTATION";
    /// `PERCPU_ARRAY` of one `u64`: when (`bpf_ktime_get_ns`) each CPU last logged.
    pub const LOGGED_AT: &str = "LOGGED_AT";
}

/// Name of the select program in the eBPF object.
pub const PROGRAM_SELECT: &str = "select_socket";
/// Name of the do-nothing program (the benchmark's overhead floor) in the eBPF object.
pub const PROGRAM_PASS: &str = "pass_only";

/// Value size of the [`maps::SOCKETS`] array: with 8 bytes (not the 4 of a socket fd) the
/// kernel returns each socket's cookie to user-space lookups, so the controller can verify
/// that a slot still holds its socket.
pub const SOCKET_VALUE_SIZE: u32 = 8;
/// Most worker slots a group can have: the size of the socket array.
pub const MAX_SLOTS: u32 = 128;
/// CPU ids the CPU table covers; a SYN processed on a higher CPU is steered by flow hash.
pub const MAX_CPUS: u32 = 512;
/// Slots one CPU's row can spread over (by flow hash) when there are more workers than CPUs.
pub const CPU_FANOUT: u32 = 16;
/// Buckets of the flow-hash indirection table.
pub const HASH_BUCKETS: u32 = 1024;
/// Entries of the CPU table: one row of [`CPU_FANOUT`] slots per CPU.
pub const CPU_TABLE_LEN: u32 = MAX_CPUS * CPU_FANOUT;
/// How many other live slots the program tries when its first choice cannot be selected.
pub const FALLBACK_TRIES: u32 = 8;
/// The program logs at most one line per CPU per this many nanoseconds: a slot that cannot be
/// selected fails every SYN steered to it, and the counters already count each one.
pub const LOG_EVERY_NS: u64 = 1_000_000_000;
/// Counter index for decisions that could not be attributed to any slot.
pub const NO_SLOT: u32 = MAX_SLOTS;
/// Entries of the counters map.
pub const COUNTER_ENTRIES: u32 = MAX_SLOTS + 1;

// The program masks indices instead of taking remainders (the verifier follows masks
// easily); that only equals `% len` for powers of two.
const _: () = assert!(MAX_CPUS.is_power_of_two());
const _: () = assert!(CPU_FANOUT.is_power_of_two());
const _: () = assert!(HASH_BUCKETS.is_power_of_two());
const _: () = assert!(MAX_SLOTS.is_power_of_two());

/// Steering policy, as stored in [`Config::policy`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Slot from the CPU that processed the SYN.
    Cpu = 0,
    /// Slot from the flow hash through the indirection table.
    Hash = 1,
    /// Each CPU rotates over the live slots.
    RoundRobin = 2,
    /// The less loaded (accept-queue depth) of two random live slots.
    LeastLoaded = 3,
}

impl PolicyKind {
    /// Decodes the map representation; unknown values read as `None`.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Cpu),
            1 => Some(Self::Hash),
            2 => Some(Self::RoundRobin),
            3 => Some(Self::LeastLoaded),
            _ => None,
        }
    }
}

/// The single entry of the [`maps::CONFIG`] map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A [`PolicyKind`] as `u32`.
    pub policy: u32,
    /// Which of the two [`maps::TABLES`] entries is live (0 or 1).
    pub active: u32,
    /// With the cpu and hash policies: a first choice whose queue is at least this deep
    /// spills to the least loaded live slot. 0 turns spilling off.
    pub spill_depth: u32,
    /// [`FLAG_REFUSE_NEW`] and any later bits; unknown bits are ignored.
    pub flags: u32,
    /// With [`FLAG_REFUSE_NEW`]: until when (`CLOCK_MONOTONIC` ns, what `bpf_ktime_get_ns`
    /// reads) new connections are refused. A controller killed while stopping leaves its
    /// workers serving again after that, not refusing everything for good.
    pub refuse_until_ns: u64,
}

/// [`Config::flags`] bit: refuse every new connection until [`Config::refuse_until_ns`] (the
/// controller is stopping and lets its workers drain what is queued). Connections migrating
/// from a closing socket are still placed, so nothing already queued is lost.
pub const FLAG_REFUSE_NEW: u32 = 1;

/// One buffer of the steering tables. Every entry names a slot whose socket is in
/// [`maps::SOCKETS`]; the controller rebuilds the whole buffer on every change and
/// switches [`Config::active`] to it, so the program never sees a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    /// Row `cpu * CPU_FANOUT ..`: the slots for that CPU, picked among by flow hash.
    pub cpu: [u32; CPU_TABLE_LEN as usize],
    /// Flow-hash bucket → slot.
    pub buckets: [u32; HASH_BUCKETS as usize],
    /// Live slots, for the fallback when a first choice cannot be selected.
    pub live: [u32; MAX_SLOTS as usize],
    /// How many entries of `live` are valid (at least 1).
    pub n_live: u32,
    /// Keeps the size a multiple of 8 for the map value.
    pub _pad: u32,
}

/// Per-slot decision counters (per CPU in the map; the controller sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    /// Selected as the CPU policy's first choice.
    pub by_cpu: u64,
    /// Selected as the hash policy's first choice.
    pub by_hash: u64,
    /// Selected by the round-robin policy.
    pub by_round_robin: u64,
    /// Selected by the least-loaded policy.
    pub by_least_loaded: u64,
    /// Selected because the first choice's queue was at or over the spill depth.
    pub spilled: u64,
    /// Selected as a fallback after another slot's selection failed.
    pub fallback: u64,
    /// Received a connection migrated from a closing socket (`sk_reuseport/migrate`).
    pub migrated: u64,
    /// `bpf_sk_select_reuseport` failed for this slot.
    pub select_error: u64,
    /// New connections refused while the controller stopped (only on the unattributed entry).
    pub refused: u64,
}

impl SlotCounters {
    /// New connections this slot received, by any path (migrations not included).
    pub const fn selected(&self) -> u64 {
        self.by_cpu
            + self.by_hash
            + self.by_round_robin
            + self.by_least_loaded
            + self.spilled
            + self.fallback
    }

    /// Adds another CPU's (or another address's) counters to these.
    pub fn add(&mut self, other: &Self) {
        self.by_cpu += other.by_cpu;
        self.by_hash += other.by_hash;
        self.by_round_robin += other.by_round_robin;
        self.by_least_loaded += other.by_least_loaded;
        self.spilled += other.spilled;
        self.fallback += other.fallback;
        self.migrated += other.migrated;
        self.select_error += other.select_error;
        self.refused += other.refused;
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers and arrays of them, no padding the kernel could
    // leak or misread (sizes are multiples of 8, fields are u32/u64).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Tables {}
    unsafe impl aya::Pod for super::SlotCounters {}
}
