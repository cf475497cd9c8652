//! Accept-queue depths of many listeners in one call: a `NETLINK_SOCK_DIAG` dump of the TCP
//! listeners on one port (`inet_diag`), instead of one `getsockopt(TCP_INFO)` per socket. For
//! a listener, `idiag_rqueue` is the accept queue's length (`sk_ack_backlog`), the same
//! figure as `tcpi_unacked`; sockets are told apart by inode.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN: u32 = 10;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// `inet_diag_msg` up to and including `idiag_inode`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// A netlink socket for inet_diag dumps.
pub struct ListenerDiag {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

impl ListenerDiag {
    /// Opens the netlink socket.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a new fd, owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            // A dump part is at most a page or so; 32 KiB takes several in one read.
            buf: vec![0; 32 * 1024],
            seq: 0,
        })
    }

    /// Adds `inode → accept-queue length` for every TCP listener of `family` (`AF_INET` or
    /// `AF_INET6`) on `port` to `out`.
    pub fn listeners(
        &mut self,
        family: u8,
        port: u16,
        out: &mut HashMap<u64, u32>,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let req = encode_request(family, port, self.seq);
        // SAFETY: sends `req` (valid for its length) to the kernel (the default address of
        // an unbound netlink socket).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            // SAFETY: receives into `buf`, valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            let part = self.buf.get(..n).unwrap_or_default();
            if parse(part, self.seq, out)? == Parsed::Done {
                return Ok(());
            }
        }
    }
}

/// The dump request for the TCP listeners of `family` on `port`.
fn encode_request(family: u8, port: u16, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut m = [0u8; NLMSG_HDRLEN + REQ_LEN];
    m[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0: the kernel.
    let r = NLMSG_HDRLEN;
    m[r] = family;
    m[r + 1] = libc::IPPROTO_TCP as u8;
    m[r + 4..r + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // The kernel skips listeners on other ports (network byte order).
    m[r + 8..r + 10].copy_from_slice(&port.to_be_bytes());
    m
}

/// Whether a dump is over.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    More,
    Done,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sock_diag reply: {what}"),
    )
}

/// Reads one datagram of a dump reply into `out`; messages of another request are skipped.
fn parse(mut part: &[u8], seq: u32, out: &mut HashMap<u64, u32>) -> io::Result<Parsed> {
    while part.len() >= NLMSG_HDRLEN {
        let len = u32_at(part, 0).ok_or_else(|| malformed("short header"))? as usize;
        let kind = u16_at(part, 4).ok_or_else(|| malformed("short header"))?;
        let their_seq = u32_at(part, 8).ok_or_else(|| malformed("short header"))?;
        if len < NLMSG_HDRLEN || len > part.len() {
            return Err(malformed("bad message length"));
        }
        let body = part.get(NLMSG_HDRLEN..len).unwrap_or_default();
        if their_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(Parsed::Done),
                NLMSG_ERROR => {
                    let code = u32_at(body, 0).ok_or_else(|| malformed("short error"))? as i32;
                    return Err(io::Error::from_raw_os_error(code.saturating_neg()));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if body.len() < MSG_LEN {
                        return Err(malformed("short inet_diag_msg"));
                    }
                    let rqueue = u32_at(body, 4 + SOCKID_LEN + 4).unwrap_or(0);
                    let inode = u32_at(body, 4 + SOCKID_LEN + 16).unwrap_or(0);
                    out.insert(u64::from(inode), rqueue);
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        part = part.get(next..).unwrap_or_default();
    }
    Ok(Parsed::More)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn listener(inode: u32, rqueue: u32) -> Vec<u8> {
        let mut b = vec![0u8; MSG_LEN];
        b[1] = TCP_LISTEN as u8;
        b[4 + SOCKID_LEN + 4..4 + SOCKID_LEN + 8].copy_from_slice(&rqueue.to_ne_bytes());
        b[4 + SOCKID_LEN + 16..4 + SOCKID_LEN + 20].copy_from_slice(&inode.to_ne_bytes());
        b
    }

    #[test]
    fn a_dump_part_gives_each_listeners_queue_by_inode_and_done_ends_it() {
        let mut part = message(SOCK_DIAG_BY_FAMILY, 7, &listener(11, 3));
        part.extend(message(SOCK_DIAG_BY_FAMILY, 7, &listener(12, 0)));
        // Another request's message is not ours.
        part.extend(message(SOCK_DIAG_BY_FAMILY, 6, &listener(13, 9)));
        let mut out = HashMap::new();
        assert_eq!(parse(&part, 7, &mut out).unwrap(), Parsed::More);
        assert_eq!(out, HashMap::from([(11, 3), (12, 0)]));
        let done = message(NLMSG_DONE, 7, &0u32.to_ne_bytes());
        assert_eq!(parse(&done, 7, &mut out).unwrap(), Parsed::Done);
    }

    #[test]
    fn errors_and_malformed_replies_are_errors_not_panics() {
        let err = message(NLMSG_ERROR, 1, &(-libc::EPERM).to_ne_bytes());
        let e = parse(&err, 1, &mut HashMap::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut bad = message(SOCK_DIAG_BY_FAMILY, 1, &listener(1, 1));
        bad[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse(&bad, 1, &mut HashMap::new()).is_err());
        let short = message(SOCK_DIAG_BY_FAMILY, 1, &[0u8; 8]);
        assert!(parse(&short, 1, &mut HashMap::new()).is_err());
        // A truncated header at the end is ignored (nothing to read).
        assert_eq!(
            parse(&[0u8; 3], 1, &mut HashMap::new()).unwrap(),
            Parsed::More
        );
    }

    #[test]
    fn the_request_asks_for_tcp_listeners_on_the_port() {
        let req = encode_request(libc::AF_INET as u8, 8080, 5);
        assert_eq!(u32_at(&req, 0), Some(72));
        assert_eq!(u16_at(&req, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(req[16], libc::AF_INET as u8);
        assert_eq!(req[17], libc::IPPROTO_TCP as u8);
        assert_eq!(u32_at(&req, 20), Some(1 << 10));
        assert_eq!(&req[24..26], &8080u16.to_be_bytes());
    }

    #[test]
    fn a_real_dump_finds_our_listener_and_its_queue() {
        // Needs no privilege: sock_diag is open to every user.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let inode = nix::sys::stat::fstat(&l).unwrap().st_ino;
        let mut diag = ListenerDiag::open().unwrap();
        let mut out = HashMap::new();
        // The handshake completes asynchronously: wait for the queued connection.
        for _ in 0..200 {
            out.clear();
            diag.listeners(libc::AF_INET as u8, port, &mut out).unwrap();
            if out.get(&inode) == Some(&1) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(out.get(&inode), Some(&1), "{out:?}");
    }
}
