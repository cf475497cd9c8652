//! `--metrics ADDR:PORT`: the status in Prometheus text format, over plain HTTP.
//!
//! Scrapes never reach the supervisor: a refresher asks it for the status once per
//! [`REFRESH`] and keeps the rendered text, which every scrape is served from. Clients are
//! admitted per peer address ([`MAX_PER_PEER`]) and in all ([`MAX_CLIENTS`]); one that is
//! still sending its request head gives way to a new one at a limit ([`crate::limits`]),
//! the head must arrive within [`HEADER_DEADLINE`], and the answer must be taken within
//! [`WRITE_DEADLINE`]. There is no authentication or TLS: bind it to loopback, or put it
//! behind a proxy that provides them.
pub mod http;
pub(crate) mod render;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use log::{debug, warn};
pub use render::render;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
};

use self::http::{parse_head, response, Ask, Status, MAX_HEAD};
use crate::{
    admission::{Place, Table},
    control::{
        protocol::{Reply, Request},
        server::Command,
    },
    limits::{Refusal, Throttle},
};

/// How often the snapshot is refreshed.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The request head must arrive within this of the connection.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(2);
/// The answer must be taken within this.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Most connections of one peer address at once (a scraper needs one).
pub const MAX_PER_PEER: usize = 4;
/// Most connections at once: a flood must not eat the controller's file descriptors.
pub const MAX_CLIENTS: usize = 64;

/// The latest rendered metrics; `None` before the first status and after the last.
type Snapshot = watch::Receiver<Option<Arc<str>>>;

/// Binds the metrics endpoint and serves the snapshot the refresher keeps from `commands`.
pub async fn serve(
    addr: SocketAddr,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<SocketAddr> {
    serve_every(addr, commands, REFRESH).await
}

/// [`serve`], refreshing every `every`.
async fn serve_every(
    addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    every: Duration,
) -> std::io::Result<SocketAddr> {
    // SO_REUSEPORT: during an upgrade the new controller binds the same address while the
    // old one still serves it; each scrape is answered by one of the two.
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
    let bound = listener.local_addr()?;
    let (snapshot, serving) = watch::channel(None);
    tokio::spawn(refresh(commands, snapshot, every));
    tokio::spawn(accept(listener, serving));
    Ok(bound)
}

/// Asks the supervisor for the status every `every` and publishes it rendered, until the
/// supervisor is gone.
async fn refresh(
    commands: mpsc::Sender<Command>,
    snapshot: watch::Sender<Option<Arc<str>>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (tx, rx) = oneshot::channel();
        if commands.send((Request::Status, tx)).await.is_err() {
            break;
        }
        match rx.await {
            Ok(Ok(Reply::Status(status))) => {
                let taken_at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                snapshot.send_replace(Some(render(&status, taken_at).into()));
            }
            Ok(other) => debug!("metrics: the status request was answered with {other:?}"),
            Err(_) => break,
        }
    }
    // The controller is stopping: scrapes get 503 rather than figures that no longer move.
    snapshot.send_replace(None);
}

/// Accepts scrapers within the limits; one over them makes a waiting connection give way,
/// or is refused (429 over the peer's limit, 503 over the total).
async fn accept(listener: TcpListener, snapshot: Snapshot) {
    let admitted = Table::new(MAX_PER_PEER, MAX_CLIENTS);
    let mut throttle = Throttle::new(Duration::from_secs(10));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match admitted.admit(peer.ip()) {
            Ok((place, evicted)) => {
                if evicted {
                    if let Some(n) = throttle.note(Instant::now()) {
                        warn!("metrics: {n} connection(s) that sent no request closed to make room (at most {MAX_PER_PEER} per address, {MAX_CLIENTS} in all)");
                    }
                }
                tokio::spawn(answer(stream, snapshot.clone(), place));
            }
            Err(why) => {
                if let Some(n) = throttle.note(Instant::now()) {
                    warn!("metrics: {n} connection(s) refused, the last from {peer}: {why}");
                }
                refuse(&stream, why);
            }
        }
    }
}

/// Tells a client it was not admitted, without waiting for it (the answer fits an empty
/// socket buffer; one that cannot take it gets nothing).
fn refuse(stream: &TcpStream, why: Refusal) {
    let status = match why {
        Refusal::Peer(_) => Status::TooManyRequests,
        Refusal::Total(_) => Status::Unavailable,
    };
    // What it sent so far is read, so that closing does not reset the answer away.
    let mut sink = [0u8; 1024];
    let _ = stream.try_read(&mut sink);
    let body = format!("{why}: try again in a moment\n");
    if let Err(e) = stream.try_write(&response(status, &body, false)) {
        debug!("metrics client refused before it could be told: {e}");
    }
}

/// Serves one scraper: its request head within [`HEADER_DEADLINE`] (or it gives way to a
/// new client first), then the snapshot, taken within [`WRITE_DEADLINE`].
async fn answer(mut stream: TcpStream, snapshot: Snapshot, mut place: Place<IpAddr>) {
    let ask = tokio::select! {
        biased;
        () = place.evicted() => return,
        ask = tokio::time::timeout(HEADER_DEADLINE, read_head(&mut stream)) => ask,
    };
    place.busy();
    let (status, body, head_only): (Status, Arc<str>, bool) = match ask {
        Err(_) => (
            Status::RequestTimeout,
            format!(
                "the request head did not arrive within {} s\n",
                HEADER_DEADLINE.as_secs()
            )
            .into(),
            false,
        ),
        Ok(None) => return,
        Ok(Some(Ask::Refused(status))) => (status, refusal_text(status).into(), false),
        Ok(Some(Ask::Metrics { head_only })) => match snapshot.borrow().clone() {
            Some(text) => (Status::Ok, text, head_only),
            None => (
                Status::Unavailable,
                "no metrics: the balancer is starting or stopping\n".into(),
                false,
            ),
        },
    };
    let bytes = response(status, &body, head_only);
    match tokio::time::timeout(WRITE_DEADLINE, stream.write_all(&bytes)).await {
        Ok(Ok(())) => {
            let _ = tokio::time::timeout(WRITE_DEADLINE, stream.shutdown()).await;
        }
        Ok(Err(e)) => debug!("metrics client: {e}"),
        Err(_) => debug!(
            "metrics client did not take its answer within {} s: disconnected",
            WRITE_DEADLINE.as_secs()
        ),
    }
}

/// Why a request was refused, for the body of the answer.
fn refusal_text(status: Status) -> &'static str {
    match status {
        Status::NotFound => "the metrics are at /metrics\n",
        Status::MethodNotAllowed => "only GET and HEAD are served\n",
        Status::HeadersTooLarge => "the request head is over 8 KiB\n",
        _ => "not an HTTP/1 request\n",
    }
}

/// Reads until the request head is whole (or over [`MAX_HEAD`]); `None`: the client hung up
/// or the connection failed first.
async fn read_head(stream: &mut TcpStream) -> Option<Ask> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) => {
                debug!("metrics client: {e}");
                return None;
            }
        };
        let room = MAX_HEAD.saturating_sub(head.len());
        head.extend_from_slice(chunk.get(..n.min(room)).unwrap_or_default());
        if let Some(ask) = parse_head(&head) {
            return Some(ask);
        }
    }
}

#[cfg(test)]
mod tests;
