//! The controller's end of the control socket: one instance per path, mode 0600 (see
//! [`super::socket`]), every change checked against the peer's credentials (`SO_PEERCRED`).
//!
//! A client cannot hold the controller up: at most [`MAX_CLIENTS`] connections at once
//! ([`MAX_PER_UID`] of one uid), a connection that waits for its client gives way to a new
//! one at a limit ([`crate::limits`]), a request must arrive whole within
//! [`REQUEST_DEADLINE`] of its first byte, and a reply must be taken within
//! [`WRITE_DEADLINE`]. The supervisor only ever sees whole requests and never waits for a
//! client: replies go back through a channel, written by the connection's own task.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

pub use super::socket::ControlError;
use super::{
    protocol::{
        decode_request, encode_reply, read_frame, write_frame, ErrorKind, ErrorReply, FrameError,
        Outcome, Request, MAX_FRAME,
    },
    socket::{clear_stale, ensure_dir, file_id, own_uid, place},
};
use crate::{
    admission::{Place, Table},
    limits::{Refusal, Throttle},
};

/// A request handed to the supervisor, with where its outcome goes.
pub type Command = (Request, oneshot::Sender<Outcome>);

/// A client that sends nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(60);
/// Once a request's first byte is in, the rest must follow within this.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A reply the client does not take within this closes the connection.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Most clients connected at once.
pub const MAX_CLIENTS: usize = 64;
/// Most clients of one uid connected at once.
pub const MAX_PER_UID: usize = 32;

/// The bound control socket; removes its path when dropped, if the path still names it.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    /// The socket file's (device, inode): a successor may have put its own at the path.
    file: Option<(u64, u64)>,
    commands: Option<mpsc::Sender<Command>>,
    accepting: Option<tokio::task::JoinHandle<()>>,
}

impl ControlSocket {
    /// Binds `path` (mode 0600, see [`super::socket`]), refusing when another controller
    /// answers there and clearing a stale socket left by one that died.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let dir = ensure_dir(path)?;
        clear_stale(path)?;
        let (listener, file) = place(&dir, path, false)?;
        Ok(Self::bound(path, listener, file))
    }

    /// Binds a new socket and puts it at `path` in one step (a rename over whatever is
    /// there): a client connects to the old socket or to this one, never to nothing. An
    /// upgrade's new controller takes the path from the old one this way.
    pub fn bind_over(path: &Path) -> Result<Self, ControlError> {
        let dir = ensure_dir(path)?;
        let (listener, file) = place(&dir, path, true)?;
        Ok(Self::bound(path, listener, file))
    }

    fn bound(path: &Path, listener: std::os::unix::net::UnixListener, file: (u64, u64)) -> Self {
        Self {
            path: path.to_path_buf(),
            listener: Some(listener),
            file: Some(file),
            commands: None,
            accepting: None,
        }
    }

    /// Puts this controller's socket back at the path if another one took it (an upgrade
    /// that failed after the new controller had taken the path).
    pub fn reclaim(&mut self) -> Result<(), ControlError> {
        if self.file.is_some() && file_id(&self.path) == self.file {
            return Ok(());
        }
        let mut fresh = Self::bind_over(&self.path)?;
        if let Some(task) = self.accepting.take() {
            task.abort();
        }
        self.file = fresh.file.take();
        self.listener = fresh.listener.take();
        if let Some(commands) = self.commands.clone() {
            self.serve(commands);
        }
        Ok(())
    }

    /// Serves clients, forwarding their requests to `commands`.
    pub fn serve(&mut self, commands: mpsc::Sender<Command>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        self.commands = Some(commands.clone());
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                warn!("control socket {}: {e}", self.path.display());
                return;
            }
        };
        self.accepting = Some(tokio::spawn(accept(listener, commands)));
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // A successor's socket at the path is not ours to remove.
        if self.file.is_some() && file_id(&self.path) == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Accepts clients within the limits: each admitted one is served by its own task; one
/// that would exceed them makes a waiting one give way, or is refused with a typed reply.
async fn accept(listener: UnixListener, commands: mpsc::Sender<Command>) {
    let admitted = Table::new(MAX_PER_UID, MAX_CLIENTS);
    let mut throttle = Throttle::new(Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
        match admitted.admit(peer_uid) {
            Ok((place, evicted)) => {
                if evicted {
                    if let Some(n) = throttle.note(Instant::now()) {
                        warn!("control socket: {n} idle client(s) closed to make room (at most {MAX_CLIENTS}, {MAX_PER_UID} per uid)");
                    }
                }
                tokio::spawn(serve_stream(
                    stream,
                    peer_uid,
                    own_uid(),
                    commands.clone(),
                    Some(place),
                ));
            }
            Err(why) => {
                if let Some(n) = throttle.note(Instant::now()) {
                    warn!("control socket: {n} client(s) refused: {why}");
                }
                refuse(&stream, why);
            }
        }
    }
}

/// Tells a client it was not admitted, without waiting for it: the reply is small enough for
/// an empty socket buffer, and a client that cannot take it gets nothing.
fn refuse(stream: &UnixStream, why: Refusal) {
    let reply = Err(ErrorReply::new(
        ErrorKind::Busy,
        format!(
            "the controller is serving as many clients as it allows ({why}): try again in a moment"
        ),
    ));
    let payload = encode_reply(&reply);
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&payload);
    if let Err(e) = stream.try_write(&frame) {
        debug!("control client refused before it could be told: {e}");
    }
}

/// Resolves when the connection at `place` has to give way (never without a place).
async fn evicted(place: &mut Option<Place<Option<u32>>>) {
    match place {
        Some(p) => p.evicted().await,
        None => std::future::pending().await,
    }
}

/// Whether a peer of uid `peer_uid` (`None`: its credentials are unknown) may make `request`
/// of a controller running as `own_uid`: reading ([`Request::changes_state`] false) is for
/// anyone who can connect; changes are for root and the controller's own user.
pub fn authorize(peer_uid: Option<u32>, own_uid: u32, request: &Request) -> Result<(), ErrorReply> {
    if !request.changes_state() {
        return Ok(());
    }
    match peer_uid {
        Some(uid) if uid == 0 || uid == own_uid => Ok(()),
        _ => Err(ErrorReply::new(
            ErrorKind::PermissionDenied,
            format!(
                "uid {} may not change the balancer: run the command as root or as the controller's user",
                peer_uid.map_or("?".into(), |u| u.to_string())
            ),
        )),
    }
}

/// Why no request came.
enum NoRequest {
    /// The client hung up, or sent nothing for [`IDLE`].
    Gone,
    /// The client broke the framing: answer with this, then hang up.
    Unframeable(ErrorReply),
}

/// The next request frame: its first byte within [`IDLE`], the rest within
/// [`REQUEST_DEADLINE`] of it.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<bytes::BytesMut, NoRequest> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(IDLE, stream.read(&mut first)).await {
        Err(_) | Ok(Ok(0)) => return Err(NoRequest::Gone),
        Ok(Err(e)) => {
            debug!("control client: {e}");
            return Err(NoRequest::Gone);
        }
        Ok(Ok(_)) => {}
    }
    let mut rest = (&first[..]).chain(&mut *stream);
    match tokio::time::timeout(REQUEST_DEADLINE, read_frame(&mut rest)).await {
        Err(_) => Err(NoRequest::Unframeable(ErrorReply::new(
            ErrorKind::Malformed,
            format!(
                "the request did not arrive whole within {} s of its first byte: send each frame at once",
                REQUEST_DEADLINE.as_secs()
            ),
        ))),
        Ok(Err(FrameError::Closed)) => Err(NoRequest::Gone),
        Ok(Err(FrameError::Io(e))) => {
            debug!("control client: {e}");
            Err(NoRequest::Gone)
        }
        // The rest of the stream cannot be framed any more.
        Ok(Err(FrameError::TooLarge(n))) => Err(NoRequest::Unframeable(ErrorReply::new(
            ErrorKind::TooLarge,
            format!("a frame of {n} bytes is over the {MAX_FRAME}-byte limit (or the bytes are not a frame)"),
        ))),
        Ok(Ok(frame)) => Ok(frame),
    }
}

/// Writes one reply, giving up after [`WRITE_DEADLINE`]; false: the connection is over.
async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, outcome: &Outcome) -> bool {
    match tokio::time::timeout(WRITE_DEADLINE, write_frame(stream, &encode_reply(outcome))).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            debug!("control client: {e}");
            false
        }
        Err(_) => {
            warn!(
                "control client did not take its reply within {} s: disconnected",
                WRITE_DEADLINE.as_secs()
            );
            false
        }
    }
}

/// Answers the frames of one client until it hangs up, goes idle, gives way to a new client
/// (`place`), or sends something that cannot be framed: each request is decoded,
/// [`authorize`]d, and only then forwarded to `commands`. Public for the control-frame fuzz
/// target, which feeds it arbitrary bytes.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer_uid: Option<u32>,
    own_uid: u32,
    commands: mpsc::Sender<Command>,
    mut place: Option<Place<Option<u32>>>,
) {
    loop {
        // Only a connection waiting for its client gives way; one being answered finishes.
        let frame = tokio::select! {
            biased;
            () = evicted(&mut place) => return,
            frame = read_request(&mut stream) => frame,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(NoRequest::Gone) => return,
            Err(NoRequest::Unframeable(e)) => {
                reply(&mut stream, &Err(e)).await;
                return;
            }
        };
        if let Some(p) = &place {
            p.busy();
        }
        let outcome = match decode_request(&frame)
            .and_then(|req| authorize(peer_uid, own_uid, &req).map(|()| req))
        {
            Err(e) => Err(e),
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if commands.send((req, tx)).await.is_err() {
                    return;
                }
                rx.await.unwrap_or_else(|_| {
                    Err(ErrorReply::new(
                        ErrorKind::Failed,
                        "the controller is shutting down",
                    ))
                })
            }
        };
        if !reply(&mut stream, &outcome).await {
            return;
        }
        if let Some(p) = &place {
            p.waiting();
        }
    }
}

#[cfg(test)]
mod tests;
