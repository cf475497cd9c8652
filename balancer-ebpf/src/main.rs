//! The `SK_REUSEPORT` program: picks the worker socket for every new connection.
//!
//! It reads the active buffer of the controller's tables, selects the slot the policy
//! names, and, should that selection fail, another live slot. It never leaves the choice
//! to the kernel's blind hash on purpose; every decision is counted per slot and path.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::bpf_get_smp_processor_id,
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use aya_log_ebpf::warn;
use balancer_common::{
    Config, PolicyKind, SlotCounters, Tables, COUNTER_ENTRIES, CPU_FANOUT, CPU_TABLE_LEN,
    FALLBACK_TRIES, HASH_BUCKETS, MAX_CPUS, MAX_SLOTS, NO_SLOT,
};

// The statics' identifiers are the map names; `balancer_common::maps` holds the same
// names for the controller, which refuses an object that lacks any of them.
#[map]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SLOTS, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static TABLES: Array<Tables> = Array::with_max_entries(2, 0);

#[map]
static COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

#[derive(Clone, Copy)]
enum Path {
    Cpu,
    Hash,
    Fallback,
    Migrate,
    SelectError,
}

// The migrate flavour (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) is also run when a listening
// socket of the group closes, once per connection queued on it: the same tables, which no
// longer name the closing slot, pick where each connection moves.
#[sk_reuseport(migrate)]
pub fn select_socket(ctx: SkReuseportContext) -> u32 {
    select(&ctx);
    // With a socket selected, SK_PASS hands the connection to it. Without one (every
    // selection failed, counted as select errors) the kernel picks by hash: a socket of
    // the group still gets it, which beats dropping the SYN.
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
    let hash = ctx.hash();
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let migrating = ctx.migrating_sk().is_some();
    let (slot, path) = if config.policy == PolicyKind::Cpu as u32 && cpu < MAX_CPUS {
        let i = cpu * CPU_FANOUT + (hash & (CPU_FANOUT - 1));
        (tables.cpu[(i & (CPU_TABLE_LEN - 1)) as usize], Path::Cpu)
    } else {
        (
            tables.buckets[(hash & (HASH_BUCKETS - 1)) as usize],
            Path::Hash,
        )
    };
    if SOCKETS.select_reuseport(ctx, slot).is_ok() {
        count(slot, if migrating { Path::Migrate } else { path });
        return;
    }
    count(slot, Path::SelectError);
    warn!(
        ctx,
        "balancer: slot {} could not be selected; trying live slots", slot
    );

    let n_live = tables.n_live;
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
        Path::Fallback => c.fallback += 1,
        Path::Migrate => c.migrated += 1,
        Path::SelectError => c.select_error += 1,
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
