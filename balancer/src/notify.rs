//! The `NOTIFY_SOCKET` the workers report readiness to (sd_notify's `READY=1`).
//!
//! One datagram socket per group, at a path in the group's directory that every controller of
//! the group binds in turn; the kernel attaches each sender's pid (`SO_PASSCRED`), which is
//! how a message is tied to a slot (and why a message from any other process is ignored).
use std::{
    io,
    os::{fd::AsRawFd, unix::net::UnixDatagram},
};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixAddr,
};
use tokio::io::Interest;

/// A message from a worker.
#[derive(Debug)]
pub struct Notification {
    /// The sender's pid, as the kernel tells it.
    pub pid: Option<i32>,
    /// The `KEY=VALUE` lines.
    pub text: String,
}

impl Notification {
    /// Whether the sender says it is ready.
    pub fn is_ready(&self) -> bool {
        self.text.lines().any(|l| l.trim() == "READY=1")
    }
}

/// The controller's notify socket.
pub struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    name: String,
    dir: std::path::PathBuf,
    /// Who may send besides root (`--user` workers).
    owner: Option<(u32, u32)>,
}

impl NotifySocket {
    /// Binds `DIR/notify` — in the group's directory, so that the path outlives this
    /// controller: a worker it leaves running reaches whichever controller adopts it. The new
    /// socket is put at the path by a rename, over a dead controller's (or, in an upgrade,
    /// the old controller's) socket.
    ///
    /// `owner`: the uid and gid of `--user` workers, who must be able to write to it (it
    /// is theirs before it is at the path, so that no READY=1 of theirs ever fails).
    pub fn bind_in(dir: &std::path::Path, owner: Option<(u32, u32)>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("notify");
        let tmp = dir.join(format!("notify.{}.new", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let socket = UnixDatagram::bind(&tmp)?;
        let placed = match owner {
            Some((uid, gid)) => std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)),
            None => Ok(()),
        }
        .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        setsockopt(&socket, PassCred, &true).map_err(io::Error::from)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            name: path.to_string_lossy().into_owned(),
            dir: dir.to_path_buf(),
            owner,
        })
    }

    /// Puts a new socket of ours at the path again (an upgrade that failed after the would-be
    /// successor had taken it).
    pub fn rebind(&mut self) -> io::Result<()> {
        *self = Self::bind_in(&self.dir, self.owner)?;
        Ok(())
    }

    /// The value of `NOTIFY_SOCKET` for workers.
    pub fn env_value(&self) -> &str {
        &self.name
    }

    /// Receives the next message.
    pub async fn recv(&self) -> io::Result<Notification> {
        self.socket
            .async_io(Interest::READABLE, || {
                let mut buf = [0u8; 4096];
                let mut cmsg = nix::cmsg_space!(libc::ucred);
                let mut iov = [io::IoSliceMut::new(&mut buf)];
                let (pid, len) = {
                    let msg = recvmsg::<UnixAddr>(
                        self.socket.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let pid = msg.cmsgs().map_err(io::Error::from)?.find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                        _ => None,
                    });
                    (pid, msg.bytes)
                };
                Ok(Notification {
                    pid,
                    text: String::from_utf8_lossy(&buf[..len]).into_owned(),
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_message_arrives_with_the_sender_pid() {
        let dir = std::env::temp_dir().join(format!("balancer-notify-{}", std::process::id()));
        let n = NotifySocket::bind_in(&dir, None).unwrap();
        // A successor binds the same path: it takes the path over.
        let successor = NotifySocket::bind_in(&dir, None).unwrap();
        assert_eq!(successor.env_value(), n.env_value());
        let tx = UnixDatagram::unbound().unwrap();
        tx.send_to(b"STATUS=starting\nREADY=1\n", successor.env_value())
            .unwrap();
        let msg = successor.recv().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(msg.pid, Some(std::process::id() as i32));
        assert!(msg.is_ready());
    }
}
