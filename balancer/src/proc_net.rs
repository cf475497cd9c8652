//! Who holds a TCP port: listening sockets from `/proc/net/tcp{,6}` and their owning processes.
//!
//! Used only to turn "address in use" into an error that names the holder.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::procfs;

const TCP_LISTEN: u8 = 0x0A;
const TCP_SYN_RECV: u8 = 0x03;

/// A listening TCP socket found in `/proc/net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Local address.
    pub addr: SocketAddr,
    /// Socket inode, the key to `/proc/<pid>/fd`.
    pub inode: u64,
}

/// A process that holds a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)
    }
}

/// Listening sockets in this network namespace whose address conflicts with `addr`: the same
/// port, and the same IP or a wildcard on either side.
pub fn conflicting_listeners(addr: SocketAddr) -> Vec<Listener> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(file) {
            out.extend(parse_listeners(&text).into_iter().filter(|l| {
                l.addr.port() == addr.port()
                    && (l.addr.ip() == addr.ip()
                        || l.addr.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }));
        }
    }
    out
}

/// The processes that have socket `inode` open.
pub fn holders(inode: u64) -> Vec<Holder> {
    let target = format!("socket:[{inode}]");
    let mut out = Vec::new();
    let Ok(pids) = procfs::numbered(std::path::Path::new("/proc")) else {
        return out;
    };
    for pid in pids {
        let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()));
        if holds {
            let comm = fs::read_to_string(dir.join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            out.push(Holder { pid, comm });
        }
    }
    out
}

/// Describes who holds `addr`, for an error message: "pid 1234 (nginx)", or a hint when
/// `/proc` does not tell (another network namespace, or hidden by permissions).
pub fn describe_holders(addr: SocketAddr) -> String {
    let mut names: Vec<String> = conflicting_listeners(addr)
        .iter()
        .flat_map(|l| holders(l.inode))
        .map(|h| h.to_string())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "holder not visible in /proc; `ss -tlnp` may tell".to_owned()
    } else {
        names.join(", ")
    }
}

/// Connections still in their handshake (request sockets, `SYN_RECV`) on any of `addrs`: the
/// client's `connect` may have returned, and its final ACK will put the connection in the
/// listener's accept queue.
pub fn half_open(addrs: &[SocketAddr]) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|file| fs::read_to_string(file).ok())
        .map(|text| count_half_open(&text, addrs))
        .sum()
}

fn count_half_open(text: &str, addrs: &[SocketAddr]) -> usize {
    // A request socket's local address is the one the client dialled: under a wildcard
    // listener, any address of the same family.
    let ours = |local: &SocketAddr| {
        addrs.iter().any(|a| {
            a.port() == local.port()
                && (a.ip() == local.ip()
                    || (a.ip().is_unspecified() && a.is_ipv4() == local.is_ipv4()))
        })
    };
    entries(text)
        .filter(|(local, state, _)| *state == TCP_SYN_RECV && ours(local))
        .count()
}

/// Every entry of a `/proc/net/tcp{,6}` table: local address, state, inode.
fn entries(text: &str) -> impl Iterator<Item = (SocketAddr, u8, u64)> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
        Some((
            parse_addr(local)?,
            u8::from_str_radix(state, 16).ok()?,
            inode.parse().ok()?,
        ))
    })
}

fn parse_listeners(text: &str) -> Vec<Listener> {
    entries(text)
        .filter(|(_, state, _)| *state == TCP_LISTEN)
        .map(|(addr, _, inode)| Listener { addr, inode })
        .collect()
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): the kernel prints each
/// 32-bit word of the address as a host-order integer.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_listeners() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
";
        let l = parse_listeners(text);
        assert_eq!(
            l,
            vec![Listener {
                addr: "127.0.0.1:8080".parse().unwrap(),
                inode: 12345
            }]
        );
    }

    #[test]
    fn counts_the_handshakes_in_progress_on_the_addresses() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C351 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F91 0100007F:C352 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   4: 0100007F:1F90 0100007F:C353 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
";
        let ours: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(count_half_open(text, &[ours]), 2);
        assert_eq!(count_half_open(text, &["0.0.0.0:8080".parse().unwrap()]), 2);
        assert_eq!(count_half_open(text, &["[::]:8080".parse().unwrap()]), 0);
        assert_eq!(count_half_open(text, &[]), 0);
    }

    #[test]
    fn parses_ipv6_addresses() {
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn finds_the_holder_of_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let text = describe_holders(addr);
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
    }
}
