//! Starting a controller: naming its group, adopting what a dead controller left (or binding
//! a new group), and where the program and maps are pinned.
use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::Context;
use balancer_common::PolicyKind;
use log::{info, warn};

use crate::{
    adoption::{self, Found},
    fd_store::Stored,
    group_state::{self, STATE_ROOT},
    handover::Handed,
    pidfd,
    socket_group::SocketGroup,
    supervisor::settings::InheritedSlot,
};

/// A group ready for the supervisor: new, or adopted.
pub struct Prepared {
    /// The group's name.
    pub name: String,
    /// Where its record is kept.
    pub record_dir: PathBuf,
    /// Its sockets.
    pub group: SocketGroup,
    /// Its slot count.
    pub slots: u32,
    /// Its policy, spill depth and hash weights (an adopted group keeps its own).
    pub steer: (PolicyKind, u32, Option<Vec<u32>>),
    /// Per slot, what a dead controller left; `None` for a new group.
    pub inherited: Option<Vec<InheritedSlot>>,
    /// The adopted workers' pidfds.
    pub adopted_pidfds: Vec<(u32, OwnedFd)>,
    /// The dead controller's pid, when adopting.
    pub adopted_from: Option<u32>,
}

impl Prepared {
    /// Which slots may take connections at once: an adopted ready worker's, unless drained.
    /// A new group has none (every slot queues until its worker is ready).
    pub fn live(&self) -> Vec<bool> {
        match &self.inherited {
            Some(slots) => slots
                .iter()
                .map(|s| s.worker.is_some_and(|(_, ready)| ready) && !s.drained)
                .collect(),
            None => vec![false; self.slots as usize],
        }
    }
}

/// What the command line asks of the group.
pub struct Asked<'a> {
    /// `--listen`.
    pub listen: &'a [SocketAddr],
    /// `--name`, if given.
    pub name: Option<String>,
    /// Slots of a new group.
    pub slots: u32,
    /// Policy and spill depth of a new group.
    pub steer: (PolicyKind, u32),
    /// `--backlog`.
    pub backlog: u32,
    /// How a recorded worker that cannot be adopted is stopped.
    pub stop: adoption::Stop,
}

/// Names the group, adopts it when a dead controller left live workers (or a live one hands
/// it over: `handed`), else binds a new one with `slots` slots under `steer`.
pub fn prepare(
    asked: Asked<'_>,
    handed: Option<Handed>,
    stored: &mut Stored,
) -> anyhow::Result<Prepared> {
    let Asked {
        listen,
        name,
        slots,
        steer,
        backlog,
        stop,
    } = asked;
    // A handover names the group; the record then says where it listens (our own --listen
    // may say port 0, which names no group).
    let (handing_over, name) = match &handed {
        Some(h) => (Some(h.pid), Some(h.group.clone())),
        None => (None, name),
    };
    // With port 0 the real port exists only once bound: such a group has nothing to adopt.
    let asked = name.or_else(|| {
        listen
            .iter()
            .all(|a| a.port() != 0)
            .then(|| group_state::derive_name(listen))
    });
    let root = Path::new(STATE_ROOT);
    // What the service manager still holds is the group's, even where it is not used.
    let known = stored.inodes();
    let found = match &asked {
        Some(name) => adoption::find(
            &group_state::record_dir(root, name),
            name,
            (handing_over.is_none()).then_some(listen),
            handing_over,
            stop,
        )?,
        None => Found::Nothing,
    };
    let Found::Group {
        record,
        mut workers,
        mut others,
    } = found
    else {
        // No worker left to adopt, but the service manager kept the sockets (and what is
        // queued on them): the group goes on on them, with new workers.
        let kept = stored.slots(listen);
        if kept > 0 && asked.is_some() {
            let sockets = (0..kept).map(|i| stored.take_slot(i, listen)).collect();
            let group = SocketGroup::adopt(listen, sockets, backlog, &known)?;
            let name = asked.unwrap_or_default();
            info!("group {name}: {kept} slot(s) on the sockets the service manager kept");
            return Ok(Prepared {
                record_dir: group_state::record_dir(root, &name),
                name,
                group,
                slots: kept,
                steer: (steer.0, steer.1, None),
                inherited: Some(
                    (0..kept)
                        .map(|_| InheritedSlot {
                            worker: None,
                            drained: false,
                            restarts: 0,
                            retiring: Vec::new(),
                        })
                        .collect(),
                ),
                adopted_pidfds: Vec::new(),
                adopted_from: None,
            });
        }
        let group = SocketGroup::bind(listen, slots, backlog, &known)?;
        let bound: Vec<SocketAddr> = group.addresses.iter().map(|a| a.addr).collect();
        let name = asked.unwrap_or_else(|| group_state::derive_name(&bound));
        return Ok(Prepared {
            record_dir: group_state::record_dir(root, &name),
            name,
            group,
            slots,
            steer: (steer.0, steer.1, None),
            inherited: None,
            adopted_pidfds: Vec::new(),
            adopted_from: None,
        });
    };
    let name = asked.unwrap_or_else(|| group_state::derive_name(&record.listen));
    let mut inherited = Vec::with_capacity(record.slots.len());
    let mut sockets = Vec::with_capacity(record.slots.len());
    let mut pidfds = Vec::new();
    // In a handover the old controller still holds every socket, a worker-less slot's too:
    // those are taken from it rather than bound anew (which would leave its socket a
    // stranger in the group).
    let mut from_predecessor = match &handed {
        Some(h) => predecessor_sockets(h, record.listen.len())?,
        None => Default::default(),
    };
    for (i, s) in record.slots.iter().enumerate() {
        let worker = workers.get_mut(i).and_then(Option::take);
        let retiring = others.get_mut(i).map(std::mem::take).unwrap_or_default();
        inherited.push(InheritedSlot {
            worker: worker.as_ref().map(|w| (w.pid, w.ready)),
            drained: s.drained,
            restarts: s.restarts,
            retiring: retiring.iter().map(|(pid, _)| *pid).collect(),
        });
        pidfds.extend(retiring);
        match worker {
            Some(w) => {
                sockets.push(Some(w.sockets));
                pidfds.push((w.pid, w.pidfd));
            }
            // Else the socket the service manager kept (with its queue), else a new one.
            None => sockets.push(
                from_predecessor
                    .remove(&(i as u32))
                    .or_else(|| stored.take_slot(i as u32, &record.listen)),
            ),
        }
    }
    let group =
        SocketGroup::adopt(&record.listen, sockets, backlog, &known).with_context(|| {
            format!(
                "adopting group {name} (left by controller pid {})",
                record.controller.pid
            )
        })?;
    info!(
        "group {name}: adopting {} worker(s) left by controller pid {}; {} slot(s) get a new worker",
        pidfds.len(),
        record.controller.pid,
        record.slots.len() - pidfds.len()
    );
    Ok(Prepared {
        record_dir: group_state::record_dir(root, &name),
        name,
        group,
        slots: record.slots.len() as u32,
        steer: (
            record.policy.into(),
            record.spill_depth,
            record.weights.clone(),
        ),
        inherited: Some(inherited),
        adopted_pidfds: pidfds,
        adopted_from: Some(record.controller.pid),
    })
}

/// Copies of the old controller's sockets, by slot (every address of a slot, in order), taken
/// with `pidfd_getfd`.
fn predecessor_sockets(
    handed: &Handed,
    addresses: usize,
) -> anyhow::Result<std::collections::HashMap<u32, Vec<socket2::Socket>>> {
    let pidfd = pidfd::open(handed.pid)
        .with_context(|| format!("opening controller pid {} (pidfd_open)", handed.pid))?;
    let mut by_slot: std::collections::HashMap<u32, Vec<Option<socket2::Socket>>> =
        std::collections::HashMap::new();
    for s in &handed.sockets {
        let fd = pidfd::get_fd(&pidfd, s.fd).with_context(|| {
            format!(
                "copying slot {}'s socket (fd {}) from controller pid {}",
                s.slot, s.fd, handed.pid
            )
        })?;
        let slot = by_slot
            .entry(s.slot)
            .or_insert_with(|| (0..addresses).map(|_| None).collect());
        if let Some(at) = slot.get_mut(s.address) {
            *at = Some(socket2::Socket::from(fd));
        }
    }
    Ok(by_slot
        .into_iter()
        .filter_map(|(slot, sockets)| {
            Some((slot, sockets.into_iter().collect::<Option<Vec<_>>>()?))
        })
        .collect())
}

/// Descriptors the controller needs besides its sockets (maps, program, pidfds, clients).
const FD_RESERVE: u64 = 64;

/// Checks that the controller may open a socket per slot and address, and more; raises the
/// soft `RLIMIT_NOFILE` up to the hard one when that is needed.
pub fn check_fd_limit(slots: u32, addresses: usize) -> anyhow::Result<()> {
    let need = u64::from(slots) * addresses as u64 + FD_RESERVE;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(());
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max >= need {
        // Only as far as needed: workers inherit the limit.
        let raised = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(());
        }
    }
    anyhow::bail!(
        "{slots} slots on {addresses} address(es) need {need} file descriptors (one socket per slot and address, plus {FD_RESERVE}), but RLIMIT_NOFILE allows {} (hard limit {}): raise it (ulimit -n, or LimitNOFILE= in the unit) or run fewer --workers",
        lim.rlim_cur,
        lim.rlim_max
    )
}

/// The default BPF filesystem.
const BPFFS: &str = "/sys/fs/bpf";

/// Where to pin for bpftool and for a successor controller: the given directory (which must
/// be on a BPF filesystem), else `/sys/fs/bpf/balancer/<name>`, mounting a BPF filesystem on
/// /sys/fs/bpf when none is there; else nowhere (with a warning).
pub fn pin_dir(asked: Option<PathBuf>, name: &str) -> anyhow::Result<Option<PathBuf>> {
    match asked {
        // Our address directories would sit among everybody's pins.
        Some(dir) if on_bpffs(&dir) && is_mount_root(&dir) => anyhow::bail!(
            "--bpffs-dir {} is the root of a BPF filesystem: choose a directory under it (e.g. {}/balancer)",
            dir.display(),
            dir.display()
        ),
        Some(dir) if on_bpffs(&dir) => Ok(Some(dir)),
        Some(dir) => anyhow::bail!(
            "--bpffs-dir {} is not on a BPF filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or choose a directory under it",
            dir.display()
        ),
        None => {
            if !on_bpffs(Path::new(BPFFS)) {
                if let Err(e) = mount_bpffs() {
                    warn!("/sys/fs/bpf is not a BPF filesystem and mounting one failed ({e}): the program and maps are not pinned, and a restarted controller starts its counters anew");
                    return Ok(None);
                }
                info!("mounted a BPF filesystem on {BPFFS}");
            }
            Ok(Some(Path::new(BPFFS).join("balancer").join(name)))
        }
    }
}

/// Whether `p` is a mount point (its device differs from its parent's).
fn is_mount_root(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::metadata(p),
        p.canonicalize()
            .ok()
            .and_then(|c| c.parent().map(std::fs::metadata)),
    ) else {
        return false;
    };
    me.dev() != parent.dev()
}

fn on_bpffs(p: &Path) -> bool {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let mut probe = p.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            return false;
        }
    }
    nix::sys::statfs::statfs(&probe).is_ok_and(|s| s.filesystem_type().0 as u64 == BPF_FS_MAGIC)
}

fn mount_bpffs() -> nix::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
}
