//! The `SK_REUSEPORT` program: picks the worker socket for every new connection.
//!
//! It reads the active buffer of the controller's tables, selects the slot the policy
//! names, and, should that selection fail, another live slot. It never leaves the choice
//! to the kernel's blind hash on purpose; every decision is counted per slot and path.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;

use aya_ebpf::{
    bindings::{
        bpf_map_def,
        bpf_map_type::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_sk_select_reuseport,
    },
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray},
    programs::SkReuseportContext,
    EbpfContext,
};
use aya_log_ebpf::warn;
use balancer_common::{
    Config, PolicyKind, SlotCounters, Tables, COUNTER_ENTRIES, CPU_FANOUT, CPU_TABLE_LEN,
    FALLBACK_TRIES, FLAG_REFUSE_NEW, HASH_BUCKETS, LOG_EVERY_NS, MAX_CPUS, MAX_SLOTS, NO_SLOT,
    SOCKET_VALUE_SIZE,
};

// The statics' identifiers are the map names; `balancer_common::maps` holds the same
// names for the controller, which refuses an object that lacks any of them.
/// A `REUSEPORT_SOCKARRAY` with 8-byte values ([`SOCKET_VALUE_SIZE`]): aya-ebpf's type has
/// 4, and only with 8 does the kernel tell user space which socket (its cookie) an entry holds.
#[repr(transparent)]
struct SockArray(UnsafeCell<bpf_map_def>);

// SAFETY: the kernel owns the map; the program only passes its address to a helper.
unsafe impl Sync for SockArray {}

impl SockArray {
    #[inline(always)]
    fn select_reuseport(&self, ctx: &SkReuseportContext, slot: u32) -> Result<(), i64> {
        let mut key = slot;
        // SAFETY: a map definition the loader relocates, a live key, the program's context.
        let r = unsafe {
            bpf_sk_select_reuseport(
                ctx.as_ptr().cast(),
                self.0.get().cast(),
                core::ptr::addr_of_mut!(key).cast(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(r)
        }
    }
}

#[link_section = "maps"]
#[export_name = "SOCKETS"]
static SOCKETS: SockArray = SockArray(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
    key_size: 4,
    value_size: SOCKET_VALUE_SIZE,
    max_entries: MAX_SLOTS,
    map_flags: 0,
    id: 0,
    pinning: 0,
}));

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static TABLES: Array<Tables> = Array::with_max_entries(2, 0);

#[map]
static COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

#[map]
static DEPTHS: Array<u32> = Array::with_max_entries(MAX_SLOTS, 0);

#[map]
static ROTATION: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static LOGGED_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy)]
enum Path {
    Cpu,
    Hash,
    RoundRobin,
    LeastLoaded,
    Spill,
    Fallback,
    Migrate,
    SelectError,
    Refused,
}

// The migrate flavour (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) is also run when a listening
// socket of the group closes, once per connection queued on it: the same tables, which no
// longer name the closing slot, pick where each connection moves.
#[sk_reuseport(migrate)]
pub fn select_socket(ctx: SkReuseportContext) -> u32 {
    if refusing(&ctx) {
        // The kernel answers the SYN with a reset: the client learns at once that this
        // server is going away (and retries elsewhere) instead of being queued on a socket
        // that is about to close, where its connection would be reset after it sent data.
        count(NO_SLOT, Path::Refused);
        return SK_DROP;
    }
    select(&ctx);
    // With a socket selected, SK_PASS hands the connection to it. Without one (every
    // selection failed, counted as select errors) the kernel picks by hash: a socket of
    // the group still gets it, which beats dropping the SYN.
    SK_PASS
}

/// Whether this is a new connection while the controller stops. A connection migrating
/// from a closing socket was already accepted by the kernel: it is always placed.
#[inline(always)]
fn refusing(ctx: &SkReuseportContext) -> bool {
    CONFIG.get(0).is_some_and(|c| {
        c.flags & FLAG_REFUSE_NEW != 0 && unsafe { bpf_ktime_get_ns() } < c.refuse_until_ns
    }) && ctx.migrating_sk().is_none()
}

/// The benchmark's overhead floor: a program that selects nothing, so the kernel's hash
/// decides. Never attached by the balancer itself.
#[sk_reuseport]
pub fn pass_only(_ctx: SkReuseportContext) -> u32 {
    SK_PASS
}

#[inline(always)]
fn select(ctx: &SkReuseportContext) {
    let Some(config) = CONFIG.get(0) else {
        count(NO_SLOT, Path::SelectError);
        return;
    };
    let Some(tables) = TABLES.get(config.active & 1) else {
        count(NO_SLOT, Path::SelectError);
        return;
    };
    let migrating = ctx.migrating_sk().is_some();
    // A migrating socket's hash is its 4-tuple's, the very hash that steered its SYN (for a
    // request socket and an accepted child alike): under the hash policy every connection of
    // a removed slot has bucket bits that the new table gives to the same slot (the last one).
    // A random draw spreads them, and a connection that is moving needs no flow affinity.
    let hash = if migrating {
        unsafe { bpf_get_prandom_u32() }
    } else {
        ctx.hash()
    };
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let n_live = tables.n_live;
    // A migration burst runs on the closing thread's CPU and between two depth samples: the
    // cpu policy would send all of it to one slot. The hash table, indexed by the random draw
    // above, spreads it over the live slots by their weights.
    let policy = if migrating {
        Some(PolicyKind::Hash)
    } else {
        PolicyKind::from_u32(config.policy)
    };
    let (mut slot, mut path) = match policy {
        Some(PolicyKind::Cpu) if cpu < MAX_CPUS => {
            let i = cpu * CPU_FANOUT + (hash & (CPU_FANOUT - 1));
            (tables.cpu[(i & (CPU_TABLE_LEN - 1)) as usize], Path::Cpu)
        }
        Some(PolicyKind::RoundRobin) if n_live > 0 => {
            // Per-CPU position: no cache line is shared between CPUs.
            let turn = match ROTATION.get_ptr_mut(0) {
                Some(p) => unsafe {
                    let t = *p;
                    *p = t.wrapping_add(1);
                    t
                },
                None => hash,
            };
            (live_at(tables, turn % n_live), Path::RoundRobin)
        }
        Some(PolicyKind::LeastLoaded) if n_live > 0 => {
            // Power of two choices: two different random live slots, the shallower queue wins.
            // (Two independent draws would pick the same slot 1/n of the time, and with two
            // slots a stalled one would still get a quarter of the connections.)
            let i = unsafe { bpf_get_prandom_u32() } % n_live;
            let j = if n_live > 1 {
                (i + 1 + unsafe { bpf_get_prandom_u32() } % (n_live - 1)) % n_live
            } else {
                i
            };
            let (a, b) = (live_at(tables, i), live_at(tables, j));
            let slot = if depth(b) < depth(a) { b } else { a };
            (slot, Path::LeastLoaded)
        }
        _ => (
            tables.buckets[(hash & (HASH_BUCKETS - 1)) as usize],
            Path::Hash,
        ),
    };
    let spill = config.spill_depth;
    // Not for a migration: its burst runs within one close, on depths sampled before it, so
    // the shallowest slot would take all of it.
    if spill > 0 && !migrating && matches!(path, Path::Cpu | Path::Hash) && depth(slot) >= spill {
        let (best, best_depth) = least_loaded(tables);
        if best_depth < depth(slot) {
            slot = best;
            path = Path::Spill;
        }
    }
    if SOCKETS.select_reuseport(ctx, slot).is_ok() {
        count(slot, if migrating { Path::Migrate } else { path });
        return;
    }
    count(slot, Path::SelectError);
    if may_log() {
        warn!(
            ctx,
            "balancer: slot {} could not be selected; trying live slots (logged at most once a second per CPU; SELECT-ERRORS counts each)",
            slot
        );
    }

    for i in 0..FALLBACK_TRIES {
        if i >= n_live {
            break;
        }
        let other = tables.live[((hash.wrapping_add(i) % n_live) & (MAX_SLOTS - 1)) as usize];
        if other == slot {
            continue;
        }
        if SOCKETS.select_reuseport(ctx, other).is_ok() {
            count(
                other,
                if migrating {
                    Path::Migrate
                } else {
                    Path::Fallback
                },
            );
            return;
        }
        count(other, Path::SelectError);
    }
}

/// Whether this CPU may log now: at most once per [`LOG_EVERY_NS`], so that a failing slot
/// (every SYN steered to it fails) cannot flood the log the controller reads.
#[inline(always)]
fn may_log() -> bool {
    let Some(at) = LOGGED_AT.get_ptr_mut(0) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Per-CPU entry, and the program runs with migration disabled: no other writer.
    let at = unsafe { &mut *at };
    if *at != 0 && now.wrapping_sub(*at) < LOG_EVERY_NS {
        return false;
    }
    *at = now;
    true
}

#[inline(always)]
fn live_at(tables: &Tables, i: u32) -> u32 {
    tables.live[(i & (MAX_SLOTS - 1)) as usize]
}

/// The slot's accept-queue depth as the controller last sampled it.
#[inline(always)]
fn depth(slot: u32) -> u32 {
    DEPTHS.get(slot).copied().unwrap_or(u32::MAX)
}

/// The live slot with the shallowest accept queue, and its depth.
#[inline(always)]
fn least_loaded(tables: &Tables) -> (u32, u32) {
    let mut best = (live_at(tables, 0), u32::MAX);
    for i in 0..MAX_SLOTS {
        if i >= tables.n_live {
            break;
        }
        let s = live_at(tables, i);
        let d = depth(s);
        if d < best.1 {
            best = (s, d);
        }
    }
    best
}

#[inline(always)]
fn count(slot: u32, path: Path) {
    let Some(c) = COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // Per-CPU entry, and the program runs with migration disabled: plain increments suffice.
    let c = unsafe { &mut *c };
    match path {
        Path::Cpu => c.by_cpu += 1,
        Path::Hash => c.by_hash += 1,
        Path::RoundRobin => c.by_round_robin += 1,
        Path::LeastLoaded => c.by_least_loaded += 1,
        Path::Spill => c.spilled += 1,
        Path::Fallback => c.fallback += 1,
        Path::Migrate => c.migrated += 1,
        Path::SelectError => c.select_error += 1,
        Path::Refused => c.refused += 1,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
