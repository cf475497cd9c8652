//! The `NOTIFY_SOCKET` the workers report readiness to (sd_notify's `READY=1`).
//!
//! One abstract datagram socket per controller; the kernel attaches each sender's pid
//! (`SO_PASSCRED`), which is how a message is tied to a slot.
use std::{
    io,
    os::{
        fd::AsRawFd,
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
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
}

impl NotifySocket {
    /// Binds `@balancer/<pid>/notify` in the abstract namespace (nothing to clean up).
    pub fn bind() -> io::Result<Self> {
        let name = format!("balancer/{}/notify", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&addr)?;
        setsockopt(&socket, PassCred, &true).map_err(io::Error::from)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            name: format!("@{name}"),
        })
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
        let n = NotifySocket::bind().unwrap();
        let addr = SocketAddr::from_abstract_name(&n.env_value().as_bytes()[1..]).unwrap();
        let tx = UnixDatagram::unbound().unwrap();
        tx.send_to_addr(b"STATUS=starting\nREADY=1\n", &addr)
            .unwrap();
        let msg = n.recv().await.unwrap();
        assert_eq!(msg.pid, Some(std::process::id() as i32));
        assert!(msg.is_ready());
    }
}
