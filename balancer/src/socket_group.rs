//! The reuseport group: one listening socket per worker slot on every listen address, owned by
//! the controller for the life of the group so that a worker's death never closes one.
use std::{io, net::SocketAddr, os::fd::AsFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::proc_net;

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
        Ok(Self { addresses, backlog })
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
        Ok(Self { addresses, backlog })
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

    /// Every socket's accept-queue depth: `[address][slot]`.
    pub fn depths(&self) -> Vec<Vec<u32>> {
        self.addresses
            .iter()
            .map(|a| {
                a.sockets
                    .iter()
                    .map(|s| accept_queue_len(s).unwrap_or(0))
                    .collect()
            })
            .collect()
    }

    /// Empties `slot`'s accept queues into the rest of the group: `shutdown(SHUT_RD)` stops
    /// the listener, and the kernel hands every queued connection to the `sk_reuseport/migrate`
    /// program, which picks a live slot; `listen` then puts the same socket (still open in the
    /// worker) back into the group. The caller must publish it in the socket arrays again.
    pub fn evacuate(&self, slot: u32) -> io::Result<()> {
        for a in &self.addresses {
            let Some(s) = a.sockets.get(slot as usize) else {
                continue;
            };
            s.shutdown(std::net::Shutdown::Read)?;
            s.listen(self.backlog.min(i32::MAX as u32) as i32)?;
        }
        Ok(())
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

/// The accept-queue length of a listening socket: `tcpi_unacked` of `TCP_INFO` is the number
/// of established connections not yet accepted.
pub fn accept_queue_len(socket: &Socket) -> io::Result<u32> {
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
    Ok(info.tcpi_unacked)
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

fn inode(socket: &Socket) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(socket).map_err(io::Error::from)?;
    Ok(st.st_ino)
}
