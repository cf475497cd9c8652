//! Steering policy: turns the set of live slots into the tables the eBPF program reads.
//!
//! Pure computation, no kernel access, so every rule here is unit-tested.
use std::{fs, io};

use balancer_common::{PolicyKind, Tables, CPU_FANOUT, HASH_BUCKETS, MAX_CPUS, MAX_SLOTS};

use crate::control::protocol::PolicyName;

impl From<PolicyName> for PolicyKind {
    fn from(p: PolicyName) -> Self {
        match p {
            PolicyName::Cpu => PolicyKind::Cpu,
            PolicyName::Hash => PolicyKind::Hash,
            PolicyName::RoundRobin => PolicyKind::RoundRobin,
            PolicyName::LeastLoaded => PolicyKind::LeastLoaded,
        }
    }
}

impl From<PolicyKind> for PolicyName {
    fn from(p: PolicyKind) -> Self {
        match p {
            PolicyKind::Cpu => PolicyName::Cpu,
            PolicyKind::Hash => PolicyName::Hash,
            PolicyKind::RoundRobin => PolicyName::RoundRobin,
            PolicyKind::LeastLoaded => PolicyName::LeastLoaded,
        }
    }
}

/// The machine's online CPUs, in id order: position `p` in this list is "CPU number p"
/// for the slot layout, so holes in the id space (offline CPUs) do not leave slots idle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuLayout {
    online: Vec<u32>,
}

impl CpuLayout {
    /// Reads `/sys/devices/system/cpu/online`.
    pub fn detect() -> io::Result<Self> {
        let text = fs::read_to_string("/sys/devices/system/cpu/online")?;
        Self::parse(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot parse /sys/devices/system/cpu/online: {text:?}"),
            )
        })
    }

    /// Parses the kernel's CPU list format (`0-3,8,10-11`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut online = Vec::new();
        for part in text.trim().split(',').filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                    if a > b {
                        return None;
                    }
                    online.extend(a..=b);
                }
                None => online.push(part.parse().ok()?),
            }
        }
        online.sort_unstable();
        online.dedup();
        (!online.is_empty()).then_some(Self { online })
    }

    /// A layout with CPUs `0..n` online (for tests and for machines without sysfs).
    pub fn contiguous(n: u32) -> Self {
        Self {
            online: (0..n.max(1)).collect(),
        }
    }

    /// Online CPU ids.
    pub fn online(&self) -> &[u32] {
        &self.online
    }

    /// Position of CPU `id` among the online CPUs; an offline id wraps onto an online position
    /// so that a CPU brought online later still has a row.
    fn position(&self, id: u32) -> usize {
        self.online
            .binary_search(&id)
            .unwrap_or(id as usize % self.online.len())
    }

    /// The slots that own the CPU at position `pos` under the cpu policy: with fewer workers than
    /// CPUs, slot `pos % slots`; with more, every slot `s` with `s % cpus == pos`.
    fn home_slots(&self, pos: usize, slots: u32) -> Vec<u32> {
        let cpus = self.online.len();
        if (slots as usize) <= cpus {
            vec![(pos % slots as usize) as u32]
        } else {
            (0..slots).filter(|s| *s as usize % cpus == pos).collect()
        }
    }

    /// The CPUs a worker in `slot` should be pinned to: those whose connections the cpu policy
    /// sends to it while every slot is live.
    pub fn pinned_cpus(&self, slot: u32, slots: u32) -> Vec<u32> {
        self.online
            .iter()
            .enumerate()
            .filter(|(pos, _)| self.home_slots(*pos, slots).contains(&slot))
            .map(|(_, id)| *id)
            .collect()
    }
}

/// Why the cpu policy cannot use every one of `slots` slots on this machine, if it cannot:
/// each CPU's row spreads over at most [`CPU_FANOUT`] slots.
pub fn cpu_overflow(layout: &CpuLayout, slots: u32) -> Option<String> {
    let cpus = layout.online().len() as u32;
    (slots > cpus * CPU_FANOUT).then(|| {
        format!(
            "{slots} workers on {cpus} CPUs: the cpu policy spreads each CPU over at most {CPU_FANOUT} slots, so {} slot(s) get no connections; use another policy or fewer workers",
            slots - cpus * CPU_FANOUT
        )
    })
}

/// Builds the steering tables for `slots` worker slots of which those with `live[s]` may take
/// new connections. Every entry names a live slot; if none is live, every slot counts as
/// live, so connections queue on the sockets for the workers' successors instead of failing.
/// `weights` (index = slot) shape the hash table's shares among the live slots.
pub fn build_tables(
    layout: &CpuLayout,
    slots: u32,
    live: &[bool],
    weights: Option<&[u32]>,
) -> Box<Tables> {
    debug_assert!((1..=MAX_SLOTS).contains(&slots));
    let mut live_slots: Vec<u32> = (0..slots)
        .filter(|s| live.get(*s as usize).copied().unwrap_or(false))
        .collect();
    if live_slots.is_empty() {
        live_slots = (0..slots).collect();
    }

    let mut tables = Box::new(Tables {
        cpu: [0; (MAX_CPUS * CPU_FANOUT) as usize],
        buckets: [0; HASH_BUCKETS as usize],
        live: [0; MAX_SLOTS as usize],
        n_live: live_slots.len() as u32,
        _pad: 0,
    });

    for cpu in 0..MAX_CPUS {
        let pos = layout.position(cpu);
        let homes: Vec<u32> = layout
            .home_slots(pos, slots)
            .into_iter()
            .filter(|s| live_slots.contains(s))
            .collect();
        // A CPU whose own slots are all down spreads its connections over every live slot,
        // starting at a different one per CPU, rather than piling them onto one neighbour.
        let row: Vec<u32> = if homes.is_empty() {
            (0..live_slots.len())
                .map(|i| live_slots[(pos + i) % live_slots.len()])
                .collect()
        } else {
            homes
        };
        let base = (cpu * CPU_FANOUT) as usize;
        for j in 0..CPU_FANOUT as usize {
            tables.cpu[base + j] = row[j % row.len()];
        }
    }
    let shares = bucket_shares(&live_slots, weights);
    let mut b = 0;
    for (slot, share) in live_slots.iter().zip(shares) {
        for _ in 0..share {
            tables.buckets[b] = *slot;
            b += 1;
        }
    }
    for (i, s) in live_slots.iter().enumerate() {
        tables.live[i] = *s;
    }
    tables
}

/// How many hash buckets each live slot gets: proportional to its weight (largest remainder),
/// or equal when there are no weights or every live slot weighs 0.
fn bucket_shares(live_slots: &[u32], weights: Option<&[u32]>) -> Vec<u32> {
    let w: Vec<u64> = live_slots
        .iter()
        .map(|s| weights.map_or(1, |w| u64::from(w.get(*s as usize).copied().unwrap_or(1))))
        .collect();
    let w = if w.iter().all(|x| *x == 0) {
        vec![1; w.len()]
    } else {
        w
    };
    let total: u64 = w.iter().sum();
    let buckets = u64::from(HASH_BUCKETS);
    let mut shares: Vec<u32> = w.iter().map(|x| (buckets * x / total) as u32).collect();
    let mut left = HASH_BUCKETS - shares.iter().sum::<u32>();
    let mut order: Vec<usize> = (0..w.len()).collect();
    // Largest remainder first; ties to the lower slot, so the result is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse((buckets * w[i]) % total));
    for i in order {
        if left == 0 {
            break;
        }
        if w[i] > 0 {
            shares[i] += 1;
            left -= 1;
        }
    }
    shares
}

/// Whether every live slot weighs 0, so that the weights cannot apply.
pub fn weights_void(live: &[bool], weights: Option<&[u32]>) -> bool {
    let Some(w) = weights else { return false };
    live.iter()
        .enumerate()
        .filter(|(_, l)| **l)
        .all(|(s, _)| w.get(s).copied().unwrap_or(1) == 0)
        && live.iter().any(|l| *l)
}

/// For each online CPU, the slots of its row.
pub type CpuRows = Vec<(u32, Vec<u32>)>;
/// For each slot, its number of hash buckets.
pub type BucketCounts = Vec<(u32, u32)>;

/// The tables as people read them: for each online CPU the slots of its row, and for each
/// slot its number of hash buckets. A CPU beyond the table (id ≥ `MAX_CPUS`) is steered by
/// the hash table even under the cpu policy: its row lists the slots of the hash buckets.
pub fn describe(layout: &CpuLayout, slots: u32, tables: &Tables) -> (CpuRows, BucketCounts) {
    let by_hash = || {
        let mut all: Vec<u32> = tables.buckets.to_vec();
        all.sort_unstable();
        all.dedup();
        all
    };
    let cpu = layout
        .online()
        .iter()
        .map(|&c| {
            let base = (c as usize).saturating_mul(CPU_FANOUT as usize);
            let mut row: Vec<u32> = match tables.cpu.get(base..base + CPU_FANOUT as usize) {
                Some(row) => row.to_vec(),
                None => by_hash(),
            };
            row.sort_unstable();
            row.dedup();
            (c, row)
        })
        .collect();
    let hash = (0..slots)
        .map(|s| (s, tables.buckets.iter().filter(|b| **b == s).count() as u32))
        .collect();
    (cpu, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: &Tables, cpu: u32) -> &[u32] {
        let base = (cpu * CPU_FANOUT) as usize;
        &t.cpu[base..base + CPU_FANOUT as usize]
    }

    #[test]
    fn parses_kernel_cpu_lists() {
        assert_eq!(CpuLayout::parse("0-3\n").unwrap().online(), &[0, 1, 2, 3]);
        assert_eq!(CpuLayout::parse("0,2-3,8").unwrap().online(), &[0, 2, 3, 8]);
        assert!(CpuLayout::parse("").is_none());
        assert!(CpuLayout::parse("3-1").is_none());
        assert!(CpuLayout::parse("x").is_none());
    }

    #[test]
    fn cpu_rows_map_each_cpu_to_its_own_slot() {
        let layout = CpuLayout::contiguous(4);
        let t = build_tables(&layout, 4, &[true; 4], None);
        for cpu in 0..4 {
            assert!(row(&t, cpu).iter().all(|s| *s == cpu), "cpu {cpu}");
        }
        // Fewer workers than CPUs: CPU k goes to slot k mod workers.
        let t = build_tables(&layout, 2, &[true; 2], None);
        assert!(row(&t, 3).iter().all(|s| *s == 1));
        assert!(row(&t, 2).iter().all(|s| *s == 0));
    }

    #[test]
    fn more_workers_than_cpus_spread_within_the_cpu() {
        let layout = CpuLayout::contiguous(2);
        let t = build_tables(&layout, 6, &[true; 6], None);
        let mut r0: Vec<u32> = row(&t, 0).to_vec();
        r0.sort_unstable();
        r0.dedup();
        assert_eq!(r0, vec![0, 2, 4]);
        assert_eq!(layout.pinned_cpus(4, 6), vec![0]);
        assert_eq!(layout.pinned_cpus(5, 6), vec![1]);
    }

    #[test]
    fn a_dead_slot_never_appears_and_its_cpu_spreads() {
        let layout = CpuLayout::contiguous(4);
        let live = [true, false, true, true];
        let t = build_tables(&layout, 4, &live, None);
        assert!(t.cpu.iter().all(|s| *s != 1));
        assert!(t.buckets.iter().all(|s| *s != 1));
        let mut r1: Vec<u32> = row(&t, 1).to_vec();
        r1.sort_unstable();
        r1.dedup();
        assert_eq!(
            r1,
            vec![0, 2, 3],
            "CPU 1's connections go to every live slot"
        );
        assert_eq!(t.n_live, 3);
        assert_eq!(&t.live[..3], &[0, 2, 3]);
    }

    #[test]
    fn hash_buckets_share_evenly() {
        let layout = CpuLayout::contiguous(2);
        let t = build_tables(&layout, 4, &[true; 4], None);
        for s in 0..4 {
            let n = t.buckets.iter().filter(|b| **b == s).count();
            assert_eq!(n, HASH_BUCKETS as usize / 4);
        }
    }

    #[test]
    fn weights_shape_the_hash_shares() {
        let layout = CpuLayout::contiguous(2);
        let t = build_tables(&layout, 2, &[true; 2], Some(&[1, 3]));
        let (_, hash) = describe(&layout, 2, &t);
        assert_eq!(hash, vec![(0, 256), (1, 768)]);
        // Uneven division still fills every bucket, each with a live slot.
        let t = build_tables(&layout, 3, &[true; 3], Some(&[1, 1, 1]));
        let (_, hash) = describe(&layout, 3, &t);
        assert_eq!(hash.iter().map(|h| h.1).sum::<u32>(), HASH_BUCKETS);
        assert!(hash.iter().all(|h| h.1 == 341 || h.1 == 342), "{hash:?}");
        // A zero weight gets nothing; a dead slot's weight is ignored.
        let t = build_tables(&layout, 3, &[true, true, false], Some(&[0, 1, 5]));
        let (_, hash) = describe(&layout, 3, &t);
        assert_eq!(hash, vec![(0, 0), (1, 1024), (2, 0)]);
        // Only zero weights among the live slots: equal shares, and the caller is told.
        assert!(weights_void(&[true, true, false], Some(&[0, 0, 5])));
        assert!(!weights_void(&[true, true, false], Some(&[0, 1, 5])));
        let t = build_tables(&layout, 3, &[true, true, false], Some(&[0, 0, 5]));
        let (_, hash) = describe(&layout, 3, &t);
        assert_eq!(hash, vec![(0, 512), (1, 512), (2, 0)]);
    }

    #[test]
    fn no_live_slot_keeps_every_slot_queueing() {
        let layout = CpuLayout::contiguous(2);
        let t = build_tables(&layout, 2, &[false, false], None);
        assert_eq!(t.n_live, 2);
        assert!(row(&t, 0).iter().all(|s| *s == 0));
        assert!(row(&t, 1).iter().all(|s| *s == 1));
    }

    #[test]
    fn the_cpu_policy_says_when_slots_would_starve() {
        let layout = CpuLayout::contiguous(1);
        assert!(cpu_overflow(&layout, CPU_FANOUT).is_none());
        let text = cpu_overflow(&layout, CPU_FANOUT + 4).unwrap();
        assert!(text.contains("4 slot(s) get no connections"), "{text}");
    }

    #[test]
    fn offline_and_sparse_cpu_ids_keep_slots_busy() {
        let layout = CpuLayout::parse("0,4").unwrap();
        let t = build_tables(&layout, 2, &[true; 2], None);
        assert!(
            row(&t, 4).iter().all(|s| *s == 1),
            "second online CPU owns slot 1"
        );
        assert_eq!(layout.pinned_cpus(1, 2), vec![4]);
    }

    #[test]
    fn cpus_beyond_the_table_are_described_as_hash_steered() {
        let layout = CpuLayout::parse("0,600").expect("layout");
        let t = build_tables(&layout, 2, &[true; 2], None);
        let (rows, _) = describe(&layout, 2, &t);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], (600, vec![0, 1]));
    }
}
