//! Reading every listener's accept-queue depth, by the cheaper of two ways: one
//! `getsockopt(TCP_INFO)` per socket, or one `sock_diag` dump per listen port whose entries
//! are matched to the sockets by inode. Measured (`cargo xtask bench`, controller cost; release
//! build, loopback): one sample of 2, 16 and 128 sockets took 1.0, 7.7 and 63 µs by
//! `getsockopt` and 21, 19 and 52 µs by dump. A dump has a fixed cost of about 20 µs (the
//! kernel walks every bucket of the host's listening hash, whatever the port), then about
//! half a `getsockopt` per socket: it is the cheaper way from about 80 sockets on.
use std::{collections::HashMap, io, net::SocketAddr};

use log::warn;

use crate::{
    sock_diag::ListenerDiag,
    socket_group::{accept_queue_len, inode, AddressGroup},
};

/// From how many sockets in the group a dump is cheaper than `getsockopt` on each.
pub const DIAG_FROM: usize = 96;

/// Which way the depths are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// One `getsockopt(TCP_INFO)` per socket.
    GetSockOpt,
    /// One `sock_diag` dump per listen port and family.
    SockDiag,
}

/// Reads the depths; keeps the netlink socket and the sockets' inodes between samples.
pub struct QueueSampler {
    diag: Option<ListenerDiag>,
    /// `[address][slot]` inodes, as of the last time they were read.
    inodes: Vec<Vec<u64>>,
    /// The last dumps: inode → depth.
    seen: HashMap<u64, u32>,
}

impl std::fmt::Debug for QueueSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSampler")
            .field("diag", &self.diag.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for QueueSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueSampler {
    /// A sampler; without `sock_diag` (a kernel without `inet_diag`) every sample takes the
    /// `getsockopt` way, which is said once here.
    pub fn new() -> Self {
        let diag = ListenerDiag::open()
            .inspect_err(|e| {
                warn!("sock_diag is not available ({e}): accept queues are read one getsockopt per socket")
            })
            .ok();
        Self {
            diag,
            inodes: Vec::new(),
            seen: HashMap::new(),
        }
    }

    /// The way a group of `sockets` sockets is sampled.
    pub fn method(&self, sockets: usize) -> Method {
        if self.diag.is_some() && sockets >= DIAG_FROM {
            Method::SockDiag
        } else {
            Method::GetSockOpt
        }
    }

    /// Every socket's accept-queue depth, `[address][slot]`, the cheaper way.
    pub fn depths(&mut self, addresses: &[AddressGroup]) -> Vec<Vec<u32>> {
        let sockets = addresses.iter().map(|a| a.sockets.len()).sum();
        self.depths_with(self.method(sockets), addresses)
    }

    /// Every socket's accept-queue depth, `[address][slot]`, by `method`.
    pub fn depths_with(&mut self, method: Method, addresses: &[AddressGroup]) -> Vec<Vec<u32>> {
        if method == Method::SockDiag {
            match self.dump(addresses) {
                Ok(()) => return self.match_inodes(addresses),
                Err(e) => {
                    warn!("sock_diag dump failed ({e}): accept queues are read one getsockopt per socket from now on");
                    self.diag = None;
                }
            }
        }
        by_getsockopt(addresses)
    }

    fn dump(&mut self, addresses: &[AddressGroup]) -> io::Result<()> {
        let Some(diag) = self.diag.as_mut() else {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        };
        self.seen.clear();
        let mut done: Vec<(u8, u16)> = Vec::new();
        for a in addresses {
            let family = match a.addr {
                SocketAddr::V4(_) => libc::AF_INET as u8,
                SocketAddr::V6(_) => libc::AF_INET6 as u8,
            };
            // Two addresses on one port and family: one dump has both.
            if done.contains(&(family, a.addr.port())) {
                continue;
            }
            done.push((family, a.addr.port()));
            diag.listeners(family, a.addr.port(), &mut self.seen)?;
        }
        Ok(())
    }

    /// The dumped depths by socket. A socket not in the dump is read on its own: a replaced
    /// socket (its inode changed: the inodes are read again) or one that does not listen.
    fn match_inodes(&mut self, addresses: &[AddressGroup]) -> Vec<Vec<u32>> {
        let stale = self.inodes.len() != addresses.len()
            || self
                .inodes
                .iter()
                .zip(addresses)
                .any(|(i, a)| i.len() != a.sockets.len())
            || self
                .inodes
                .iter()
                .flatten()
                .any(|i| !self.seen.contains_key(i));
        if stale {
            self.inodes = addresses
                .iter()
                .map(|a| a.sockets.iter().map(|s| inode(s).unwrap_or(0)).collect())
                .collect();
        }
        addresses
            .iter()
            .zip(&self.inodes)
            .map(|(a, inodes)| {
                a.sockets
                    .iter()
                    .zip(inodes)
                    .map(|(s, i)| match self.seen.get(i) {
                        Some(depth) => *depth,
                        None => accept_queue_len(s).unwrap_or(0),
                    })
                    .collect()
            })
            .collect()
    }
}

/// One `getsockopt(TCP_INFO)` per socket.
pub fn by_getsockopt(addresses: &[AddressGroup]) -> Vec<Vec<u32>> {
    addresses
        .iter()
        .map(|a| {
            a.sockets
                .iter()
                .map(|s| accept_queue_len(s).unwrap_or(0))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{net::TcpStream, time::Duration};

    use super::*;
    use crate::socket_group::SocketGroup;

    /// A group of `slots` loopback listeners with `queued` connections waiting on them
    /// (spread by the kernel's hash: no program is attached).
    fn queued_group(slots: u32, queued: u32) -> (SocketGroup, Vec<TcpStream>) {
        let mut g = SocketGroup::bind(&["127.0.0.1:0".parse().unwrap()], slots, 64, &[]).unwrap();
        let addr = g.addresses[0].addr;
        let clients = (0..queued)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Handshakes complete asynchronously: wait until every connection is queued.
        for _ in 0..400 {
            let total: u32 = g.depths_with(Method::GetSockOpt).iter().flatten().sum();
            if total == queued {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (g, clients)
    }

    #[test]
    fn a_dump_reads_the_same_depths_as_getsockopt_socket_by_socket() {
        let (mut g, _clients) = queued_group(4, 7);
        let one_by_one = g.depths_with(Method::GetSockOpt);
        assert_eq!(one_by_one.iter().flatten().sum::<u32>(), 7);
        assert_eq!(g.depths_with(Method::SockDiag), one_by_one);
    }

    #[test]
    fn a_replaced_socket_is_found_again_by_its_new_inode() {
        let (mut g, _clients) = queued_group(2, 0);
        assert_eq!(g.depths_with(Method::SockDiag), [[0, 0]]);
        g.replace(0, 1).unwrap();
        let addr = g.addresses[0].addr;
        let _more: Vec<_> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut depths = Vec::new();
        for _ in 0..400 {
            depths = g.depths_with(Method::SockDiag);
            if depths == g.depths_with(Method::GetSockOpt) && depths[0].iter().sum::<u32>() == 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(depths, g.depths_with(Method::GetSockOpt));
        assert_eq!(depths[0].iter().sum::<u32>(), 4);
    }

    #[test]
    fn small_groups_take_getsockopt_and_large_ones_the_dump() {
        let s = QueueSampler::new();
        assert_eq!(s.method(2), Method::GetSockOpt);
        assert_eq!(s.method(128), Method::SockDiag);
    }
}
