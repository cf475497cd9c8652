//! The built-in worker: answers every HTTP request on its inherited sockets with
//! `slot=<i> pid=<pid> cpu=<SO_INCOMING_CPU> on=<CPU it ran on>` and closes the connection.
use std::{
    env, io,
    os::{
        fd::{FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::BytesMut;
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
    task::JoinSet,
};

use crate::activation::LISTEN_FDS_START;

/// Largest request head read before answering anyway.
const MAX_HEAD: usize = 16 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On SIGTERM, in-flight connections get this long to finish.
const DRAIN: Duration = Duration::from_secs(2);

/// Takes the sockets passed by socket activation, checking `LISTEN_PID` as the protocol asks.
fn inherited_sockets() -> anyhow::Result<Vec<OwnedFd>> {
    let fds: RawFd = env::var("LISTEN_FDS")
        .context("LISTEN_FDS is not set: demo-worker is started by `balancer run`, which passes its sockets")?
        .parse()
        .context("LISTEN_FDS is not a number")?;
    let pid: u32 = env::var("LISTEN_PID")
        .context("LISTEN_PID is not set")?
        .parse()
        .context("LISTEN_PID is not a number")?;
    if pid != std::process::id() {
        bail!("LISTEN_PID={pid} names another process; these sockets are not for this one");
    }
    if fds < 1 {
        bail!("LISTEN_FDS={fds}: no socket to serve");
    }
    // SAFETY: by the protocol, fds 3..3+LISTEN_FDS are open and were passed to this process.
    Ok((0..fds)
        .map(|i| unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START + i) })
        .collect())
}

/// Runs the demo worker until SIGTERM.
pub async fn run(accept_delay: Option<Duration>) -> anyhow::Result<()> {
    let slot = env::var("BALANCER_SLOT").unwrap_or_else(|_| "?".into());
    let mut listeners = Vec::new();
    for fd in inherited_sockets()? {
        let std_listener = std::net::TcpListener::from(fd);
        std_listener.set_nonblocking(true)?;
        listeners.push(TcpListener::from_std(std_listener)?);
    }
    notify_ready();

    let mut term = signal(SignalKind::terminate())?;
    // Every connection task holds a clone; the count tells how many are still in flight.
    let in_flight = Arc::new(());
    let mut accepts = JoinSet::new();
    let pid = std::process::id();
    for l in listeners {
        let (slot, in_flight) = (slot.clone(), in_flight.clone());
        accepts.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((stream, _)) => {
                        let (slot, guard) = (slot.clone(), in_flight.clone());
                        tokio::spawn(async move {
                            if let Err(e) = serve(stream, &slot, pid).await {
                                warn!("connection: {e}");
                            }
                            drop(guard);
                        });
                    }
                    Err(e) => {
                        warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                if let Some(d) = accept_delay {
                    tokio::time::sleep(d).await;
                }
            }
        });
    }
    term.recv().await;
    // Stop accepting (between accepts, so no accepted stream is dropped); what is still
    // queued stays on the socket for the next worker.
    accepts.abort_all();
    while accepts.join_next().await.is_some() {}
    info!(
        "slot {slot}: SIGTERM, finishing {} connection(s)",
        Arc::strong_count(&in_flight) - 1
    );
    let _ = tokio::time::timeout(DRAIN, async {
        while Arc::strong_count(&in_flight) > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    Ok(())
}

async fn serve(mut stream: TcpStream, slot: &str, pid: u32) -> io::Result<()> {
    let cpu = incoming_cpu(&stream).map_or_else(|_| "?".to_owned(), |c| c.to_string());
    let mut head = BytesMut::with_capacity(1024);
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_HEAD {
            break;
        }
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut head))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head timed out"))??;
        if n == 0 {
            break;
        }
    }
    // SAFETY: sched_getcpu has no preconditions.
    let on = unsafe { libc::sched_getcpu() };
    let body = format!("slot={slot} pid={pid} cpu={cpu} on={on}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The CPU that processed the connection's packets (`SO_INCOMING_CPU`).
fn incoming_cpu(stream: &TcpStream) -> io::Result<usize> {
    socket2::SockRef::from(stream).cpu_affinity()
}

/// Sends `READY=1` to `NOTIFY_SOCKET` if there is one (sd_notify).
fn notify_ready() {
    let Ok(target) = env::var("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> io::Result<()> {
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&target)?,
        };
        UnixDatagram::unbound()?.send_to_addr(b"READY=1\n", &addr)?;
        Ok(())
    })();
    if let Err(e) = result {
        warn!("telling {target} READY=1: {e}");
    }
}
