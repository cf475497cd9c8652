//! The reuseport group: one listening socket per worker slot on every listen address, owned by
//! the controller for the life of the group so that a worker's death never closes one.
use std::{io, net::SocketAddr, os::fd::AsFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    proc_net,
    queue_sampler::{Method, QueueSampler},
};

/// Why the group could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketGroupError {
    /// Another socket holds the address and does not share it.
    #[error(
        "{addr} is held by a socket without SO_REUSEPORT ({holder}): stop that process or choose \
another --listen address"
    )]
    HeldWithoutReuseport {
        /// The address asked for.
        addr: SocketAddr,
        /// Who holds it, as far as /proc tells.
        holder: String,
    },
    /// Another process's SO_REUSEPORT sockets are in the same group.
    #[error(
        "{addr} already has listening sockets of another process in its SO_REUSEPORT group \
({holder}): balancer must own the whole group; stop them or choose another --listen address"
    )]
    ForeignMembers {
        /// The bound address.
        addr: SocketAddr,
        /// Who else listens there.
        holder: String,
    },
    /// A privileged port without the capability.
    #[error("binding {addr} was refused: ports below 1024 need CAP_NET_BIND_SERVICE; run as root")]
    PermissionDenied {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The IP is not one of this machine's.
    #[error("{addr} is not an address of this machine: choose a local IP (or 0.0.0.0 / [::])")]
    NotLocal {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The same address given twice.
    #[error("--listen {addr} is given twice")]
    Duplicate {
        /// The repeated address.
        addr: SocketAddr,
    },
    /// Any other socket call failed.
    #[error("{op} for {addr}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// The listening sockets of one address, index = slot.
#[derive(Debug)]
pub struct AddressGroup {
    /// The bound address (with the real port when 0 was asked for).
    pub addr: SocketAddr,
    /// One listening socket per slot.
    pub sockets: Vec<Socket>,
}

/// Every listen address's sockets.
#[derive(Debug)]
pub struct SocketGroup {
    /// In `--listen` order.
    pub addresses: Vec<AddressGroup>,
    backlog: u32,
    sampler: QueueSampler,
}

impl SocketGroup {
    /// Creates `slots` SO_REUSEPORT listening sockets on each address. `known` are inodes of
    /// sockets that are the group's although another process holds them too (the service
    /// manager's descriptor store).
    pub fn bind(
        listen: &[SocketAddr],
        slots: u32,
        backlog: u32,
        known: &[u64],
    ) -> Result<Self, SocketGroupError> {
        for (i, a) in listen.iter().enumerate() {
            if listen[..i].contains(a) {
                return Err(SocketGroupError::Duplicate { addr: *a });
            }
        }
        let addresses = listen
            .iter()
            .map(|addr| {
                let mut sockets = Vec::new();
                let addr = bind_sockets(*addr, &mut sockets, slots, backlog)?;
                check_no_foreign_members(addr, &sockets, known)?;
                Ok(AddressGroup { addr, sockets })
            })
            .collect::<Result<Vec<_>, SocketGroupError>>()?;
        Ok(Self {
            addresses,
            backlog,
            sampler: QueueSampler::new(),
        })
    }

    /// The group of a controller that died, taken over: `adopted[slot]` holds copies of the
    /// sockets of the slots whose worker still runs (one per address, in address order); the
    /// other slots get new sockets on the same addresses, which join the same reuseport
    /// groups (they live as long as any of their sockets).
    pub fn adopt(
        listen: &[SocketAddr],
        mut adopted: Vec<Option<Vec<Socket>>>,
        backlog: u32,
        known: &[u64],
    ) -> Result<Self, SocketGroupError> {
        let mut addresses: Vec<AddressGroup> = listen
            .iter()
            .map(|addr| AddressGroup {
                addr: *addr,
                sockets: Vec::with_capacity(adopted.len()),
            })
            .collect();
        for slot in adopted.iter_mut() {
            match slot.take() {
                Some(sockets) if sockets.len() == addresses.len() => {
                    for (a, s) in addresses.iter_mut().zip(sockets) {
                        a.sockets.push(s);
                    }
                }
                _ => {
                    for a in &mut addresses {
                        bind_sockets(a.addr, &mut a.sockets, 1, backlog)?;
                    }
                }
            }
        }
        for a in &addresses {
            check_no_foreign_members(a.addr, &a.sockets, known)?;
        }
        Ok(Self {
            addresses,
            backlog,
            sampler: QueueSampler::new(),
        })
    }

    /// Adds sockets to every address until there are `slots` per address; they join the
    /// same reuseport groups.
    pub fn grow(&mut self, slots: u32) -> Result<(), SocketGroupError> {
        for a in &mut self.addresses {
            let more = slots.saturating_sub(a.sockets.len() as u32);
            bind_sockets(a.addr, &mut a.sockets, more, self.backlog)?;
        }
        Ok(())
    }

    /// Closes the sockets of slots `slots..`. The kernel moves what is queued on them to the
    /// slots the steering program picks (`sk_reuseport/migrate`).
    pub fn truncate(&mut self, slots: u32) {
        for a in &mut self.addresses {
            a.sockets.truncate(slots as usize);
        }
    }

    /// Every socket's accept-queue depth: `[address][slot]` (see `queue_sampler` for how).
    pub fn depths(&mut self) -> Vec<Vec<u32>> {
        self.sampler.depths(&self.addresses)
    }

    /// The depths read by `method`, whatever the group's size (the benchmark compares them).
    pub fn depths_with(&mut self, method: Method) -> Vec<Vec<u32>> {
        self.sampler.depths_with(method, &self.addresses)
    }

    /// The way [`SocketGroup::depths`] reads the depths.
    pub fn sampling_method(&self) -> Method {
        let sockets = self.addresses.iter().map(|a| a.sockets.len()).sum();
        self.sampler.method(sockets)
    }

    /// Empties `slot`'s accept queues into the rest of the group: `shutdown(SHUT_RD)` stops
    /// the listener, and the kernel hands every queued connection to the `sk_reuseport/migrate`
    /// program, which picks a live slot; then [`SocketGroup::relisten`] puts the socket back
    /// into the group. The caller must publish it in the socket arrays again. Every address
    /// is tried, whatever happened to the others: the outcome is per address.
    pub fn evacuate(&mut self, slot: u32) -> Vec<(SocketAddr, io::Result<Relisten>)> {
        (0..self.addresses.len())
            .filter_map(|n| {
                let a = &self.addresses[n];
                let s = a.sockets.get(slot as usize)?;
                let addr = a.addr;
                let outcome = s
                    .shutdown(std::net::Shutdown::Read)
                    .and_then(|()| self.relisten(n, slot));
                Some((addr, outcome))
            })
            .collect()
    }

    /// Makes slot `slot`'s socket of address `n` listen again (after an evacuation, or after
    /// a worker shut it down): the same socket, still open in the worker, when `listen`
    /// works; otherwise a new socket takes its place in the group, and the worker's copy of
    /// the old one is dead until it is restarted.
    pub fn relisten(&mut self, n: usize, slot: u32) -> io::Result<Relisten> {
        let backlog = self.backlog;
        let Some(a) = self.addresses.get_mut(n) else {
            return Err(io::Error::other(format!("no listen address #{n}")));
        };
        let Some(s) = a.sockets.get_mut(slot as usize) else {
            return Err(io::Error::other(format!("{}: no slot {slot}", a.addr)));
        };
        let Err(listen) = s.listen(backlog.min(i32::MAX as u32) as i32) else {
            return Ok(Relisten::Same);
        };
        self.replace(n, slot).map_err(|e| {
            io::Error::other(format!(
                "listen failed ({listen}), and so did a new socket in its place: {e}"
            ))
        })?;
        Ok(Relisten::Recreated)
    }

    /// Puts a new listening socket in the place of slot `slot`'s socket of address `n`; the
    /// old one closes once its worker lets it go.
    pub fn replace(&mut self, n: usize, slot: u32) -> io::Result<()> {
        let backlog = self.backlog;
        let Some(a) = self.addresses.get_mut(n) else {
            return Err(io::Error::other(format!("no listen address #{n}")));
        };
        let mut fresh = Vec::with_capacity(1);
        bind_sockets(a.addr, &mut fresh, 1, backlog).map_err(io::Error::other)?;
        match (a.sockets.get_mut(slot as usize), fresh.pop()) {
            (Some(s), Some(new)) => {
                *s = new;
                Ok(())
            }
            _ => Err(io::Error::other(format!("{}: no slot {slot}", a.addr))),
        }
    }

    /// The sockets that are no longer listening (a worker shut one down, say), as
    /// (address index, slot).
    pub fn not_listening(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (n, a) in self.addresses.iter().enumerate() {
            for (slot, s) in (0u32..).zip(&a.sockets) {
                if tcp_info(s).is_ok() && !is_listening(s) {
                    out.push((n, slot));
                }
            }
        }
        out
    }

    /// The sockets of `slot`, one per address, in address order.
    pub fn slot_sockets(&self, slot: u32) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.addresses
            .iter()
            .map(|a| a.sockets[slot as usize].as_fd())
            .collect()
    }
}

/// Binds `count` more listening sockets at `asked` into `sockets`; returns the bound address.
///
/// Port 0 is resolved by a probe socket first, so that every listener binds an explicit port:
/// only then does the kernel keep the port across `shutdown` + `listen` (an evacuation), where
/// a socket bound to port 0 would come back on a new random port, alone.
fn bind_sockets(
    asked: SocketAddr,
    sockets: &mut Vec<Socket>,
    count: u32,
    backlog: u32,
) -> Result<SocketAddr, SocketGroupError> {
    let io_err = |op, source| SocketGroupError::Io {
        op,
        addr: asked,
        source,
    };
    let mut addr = asked;
    // Held until the listeners are bound, so that nobody else takes the port meanwhile.
    let mut _probe = None;
    if addr.port() == 0 && count > 0 {
        let probe = bound_socket(asked, addr)?;
        let local = probe.local_addr().map_err(|e| io_err("getsockname", e))?;
        addr = local.as_socket().unwrap_or(addr);
        _probe = Some(probe);
    }
    for _ in 0..count {
        let socket = bound_socket(asked, addr)?;
        socket
            .listen(backlog.min(i32::MAX as u32) as i32)
            .map_err(|e| io_err("listen", e))?;
        sockets.push(socket);
    }
    Ok(addr)
}

/// A TCP socket with SO_REUSEPORT bound to `addr` (`asked` is what errors name).
fn bound_socket(asked: SocketAddr, addr: SocketAddr) -> Result<Socket, SocketGroupError> {
    let io_err = |op, source| SocketGroupError::Io {
        op,
        addr: asked,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| io_err("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| io_err("SO_REUSEADDR", e))?;
    // Must be set before bind: the kernel forms the group at bind time.
    socket
        .set_reuse_port(true)
        .map_err(|e| io_err("SO_REUSEPORT", e))?;
    if addr.is_ipv6() {
        // A [::] group must not also swallow IPv4: list 0.0.0.0 separately for that.
        socket
            .set_only_v6(true)
            .map_err(|e| io_err("IPV6_V6ONLY", e))?;
    }
    socket
        .bind(&addr.into())
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRINUSE) => SocketGroupError::HeldWithoutReuseport {
                addr: asked,
                holder: proc_net::describe_holders(addr),
            },
            Some(libc::EACCES) => SocketGroupError::PermissionDenied { addr: asked },
            Some(libc::EADDRNOTAVAIL) => SocketGroupError::NotLocal { addr: asked },
            _ => io_err("bind", e),
        })?;
    Ok(socket)
}

/// How [`SocketGroup::relisten`] put a slot's socket back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relisten {
    /// The same socket listens again.
    Same,
    /// A new socket took its place: the slot's worker must be restarted to get it.
    Recreated,
}

/// `TCP_LISTEN` of the kernel's TCP states (`tcpi_state`).
const TCP_LISTEN: u8 = 10;

/// Whether `socket` is listening.
pub fn is_listening(socket: &Socket) -> bool {
    tcp_info(socket).is_ok_and(|i| i.tcpi_state == TCP_LISTEN)
}

/// The accept-queue length of a listening socket: `tcpi_unacked` of `TCP_INFO` is the number
/// of established connections not yet accepted.
pub fn accept_queue_len(socket: &Socket) -> io::Result<u32> {
    Ok(tcp_info(socket)?.tcpi_unacked)
}

fn tcp_info(socket: &Socket) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; optval/optlen describe `info`.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// A same-user process with SO_REUSEPORT could already listen here; binding then joins its
/// group, and attaching our program would steal its traffic. Refuse instead.
fn check_no_foreign_members(
    addr: SocketAddr,
    ours: &[Socket],
    known: &[u64],
) -> Result<(), SocketGroupError> {
    let our_inodes: Vec<u64> = ours
        .iter()
        .filter_map(|s| inode(s).ok())
        .chain(known.iter().copied())
        .collect();
    let foreign: Vec<_> = proc_net::conflicting_listeners(addr)
        .into_iter()
        .filter(|l| l.addr == addr && !our_inodes.contains(&l.inode))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let mut holders: Vec<String> = foreign
        .iter()
        .flat_map(|l| proc_net::holders(l.inode))
        .map(|h| h.to_string())
        .collect();
    holders.sort();
    holders.dedup();
    Err(SocketGroupError::ForeignMembers {
        addr,
        holder: if holders.is_empty() {
            format!("{} socket(s), owner not visible in /proc", foreign.len())
        } else {
            holders.join(", ")
        },
    })
}

pub(crate) fn inode(socket: &Socket) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(socket).map_err(io::Error::from)?;
    Ok(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> SocketGroup {
        SocketGroup::bind(&["127.0.0.1:0".parse().unwrap()], 2, 16, &[]).unwrap()
    }

    #[test]
    fn a_socket_shut_down_listens_again_as_itself() {
        let mut g = group();
        let before = inode(&g.addresses[0].sockets[1]).unwrap();
        g.addresses[0].sockets[1]
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        assert_eq!(g.not_listening(), [(0, 1)]);
        assert_eq!(g.relisten(0, 1).unwrap(), Relisten::Same);
        assert!(g.not_listening().is_empty());
        assert_eq!(inode(&g.addresses[0].sockets[1]).unwrap(), before);
    }

    #[test]
    fn a_replaced_socket_is_new_and_listens_on_the_same_address() {
        let mut g = group();
        let addr = g.addresses[0].addr;
        let before = inode(&g.addresses[0].sockets[1]).unwrap();
        g.replace(0, 1).unwrap();
        let s = &g.addresses[0].sockets[1];
        assert_ne!(inode(s).unwrap(), before);
        assert_eq!(s.local_addr().unwrap().as_socket(), Some(addr));
        assert!(g.not_listening().is_empty());
        assert!(g.replace(0, 2).is_err(), "no slot 2");
        assert!(g.replace(1, 0).is_err(), "no address #1");
    }
}
