//! The controller's end of the control socket: one instance per path, mode 0600, every
//! change checked against the peer's credentials (`SO_PEERCRED`).
use std::{
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::protocol::{
    decode_request, encode_reply, read_frame, write_frame, ErrorKind, ErrorReply, FrameError,
    Outcome, Request, MAX_FRAME,
};

/// A request handed to the supervisor, with where its outcome goes.
pub type Command = (Request, oneshot::Sender<Outcome>);

/// A client that sends nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(60);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another controller answers on the path.
    #[error(
        "another balancer{pid} is already running with control socket {path}: stop it, or give \
this one its own --control PATH"
    )]
    InUse {
        /// The path.
        path: PathBuf,
        /// " (pid N)" when known.
        pid: String,
    },
    /// The path holds something else.
    #[error("{0} exists and is not a socket: remove it or choose another --control PATH")]
    NotASocket(PathBuf),
    /// Creating the socket failed.
    #[error("creating control socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The bound control socket; removes its path when dropped, if the path still names it.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    /// The socket file's (device, inode): a successor may have put its own at the path.
    file: Option<(u64, u64)>,
    commands: Option<mpsc::Sender<Command>>,
    accepting: Option<tokio::task::JoinHandle<()>>,
}

/// The (device, inode) of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl ControlSocket {
    /// Binds `path` (mode 0600), refusing when another controller answers there and clearing a
    /// stale socket left by one that died.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket(path.to_path_buf()));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => {
                    let pid = nix::sys::socket::getsockopt(
                        &s,
                        nix::sys::socket::sockopt::PeerCredentials,
                    )
                    .map(|c| format!(" (pid {})", c.pid()))
                    .unwrap_or_default();
                    return Err(ControlError::InUse {
                        path: path.to_path_buf(),
                        pid,
                    });
                }
                Err(_) => std::fs::remove_file(path).map_err(io_err)?,
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener: Some(listener),
            file: file_id(path),
            commands: None,
            accepting: None,
        })
    }

    /// Binds a new socket and puts it at `path` in one step (a rename over whatever is
    /// there): a client connects to the old socket or to this one, never to nothing. An
    /// upgrade's new controller takes the path from the old one this way.
    pub fn bind_over(path: &Path) -> Result<Self, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.new", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(io_err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        let file = file_id(&tmp);
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        Ok(Self {
            path: path.to_path_buf(),
            listener: Some(listener),
            file,
            commands: None,
            accepting: None,
        })
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
        self.accepting = Some(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_client(stream, commands.clone()));
                    }
                    Err(e) => {
                        warn!("control socket accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
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

/// Serves one accepted client, checking its requests against its `SO_PEERCRED` uid.
async fn serve_client(stream: UnixStream, commands: mpsc::Sender<Command>) {
    let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    serve_stream(stream, peer_uid, own_uid, commands).await;
}

/// Answers the frames of one client until it hangs up, goes idle, or sends something that
/// cannot be framed: each request is decoded, [`authorize`]d, and only then forwarded to
/// `commands`. Public for the control-frame fuzz target, which feeds it arbitrary bytes.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer_uid: Option<u32>,
    own_uid: u32,
    commands: mpsc::Sender<Command>,
) {
    loop {
        let frame = match tokio::time::timeout(IDLE, read_frame(&mut stream)).await {
            Err(_) | Ok(Err(FrameError::Closed)) => return,
            Ok(Err(FrameError::Io(e))) => {
                debug!("control client: {e}");
                return;
            }
            Ok(Err(FrameError::TooLarge(n))) => {
                // The rest of the stream cannot be framed any more: answer, then hang up.
                let reply = Err(ErrorReply::new(
                    ErrorKind::TooLarge,
                    format!("a frame of {n} bytes is over the {MAX_FRAME}-byte limit (or the bytes are not a frame)"),
                ));
                let _ = write_frame(&mut stream, &encode_reply(&reply)).await;
                return;
            }
            Ok(Ok(frame)) => frame,
        };
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
        if write_frame(&mut stream, &encode_reply(&outcome))
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt, task::JoinHandle};

    use super::*;
    use crate::control::protocol::{
        decode_reply, encode_request, Outcome, PolicyName, Reply, StatusReport,
    };

    /// The controller's uid in these tests (any non-root uid: the tests need no privilege).
    const OWN: u32 = 1000;
    const FOREIGN: u32 = 65534;

    fn status_report() -> StatusReport {
        StatusReport {
            pid: 42,
            uptime_secs: 1.5,
            policy: PolicyName::Hash,
            weights: None,
            spill_depth: 16,
            sample_interval_us: 1000,
            sampling_cost_us_per_sec: 0.5,
            listen: vec!["127.0.0.1:8080".into()],
            slots: Vec::new(),
            bpf_ns_per_selection: None,
            bpf_runs: None,
        }
    }

    /// A client end, the server task serving the other end of the pair as a peer of
    /// `peer_uid`, and the supervisor's end of the command channel.
    fn serve(peer_uid: Option<u32>) -> (UnixStream, JoinHandle<()>, mpsc::Receiver<Command>) {
        let (client, server) = UnixStream::pair().unwrap();
        let (commands, requests) = mpsc::channel(4);
        let task = tokio::spawn(serve_stream(server, peer_uid, OWN, commands));
        (client, task, requests)
    }

    /// Sends one frame and returns the decoded reply; fails rather than hangs when none comes
    /// (as it would if a request were forwarded to a supervisor that never answers).
    async fn exchange(client: &mut UnixStream, payload: &[u8]) -> Outcome {
        write_frame(client, payload).await.unwrap();
        reply(client).await
    }

    /// The next reply frame, decoded; fails after 5 s without one.
    async fn reply(client: &mut UnixStream) -> Outcome {
        let frame = next_frame(client).await.expect("a reply frame");
        decode_reply(&frame).unwrap()
    }

    /// The next frame or why there is none; fails after 5 s without either.
    async fn next_frame(client: &mut UnixStream) -> Result<bytes::BytesMut, FrameError> {
        tokio::time::timeout(Duration::from_secs(5), read_frame(client))
            .await
            .expect("a frame or the end of the stream within 5 s")
    }

    /// Answers the next command with `outcome`, checking it is `expected`.
    fn supervisor(
        mut requests: mpsc::Receiver<Command>,
        expected: Request,
        outcome: Outcome,
    ) -> JoinHandle<mpsc::Receiver<Command>> {
        tokio::spawn(async move {
            let (request, reply) = requests.recv().await.expect("a forwarded command");
            assert_eq!(request, expected);
            reply.send(outcome).unwrap();
            requests
        })
    }

    /// Closes the client, waits for the server task to end, and asserts that nothing more
    /// reached the command channel.
    async fn nothing_more_forwarded(
        client: UnixStream,
        task: JoinHandle<()>,
        mut requests: mpsc::Receiver<Command>,
    ) {
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server task ends once the client is gone")
            .unwrap();
        match requests.try_recv() {
            Err(mpsc::error::TryRecvError::Disconnected) => {}
            Ok((request, _)) => panic!("{request:?} reached the command channel"),
            Err(e) => panic!("the server still holds the channel: {e}"),
        }
    }

    #[tokio::test]
    async fn a_status_request_is_forwarded_and_its_outcome_returned() {
        // A foreign uid may read.
        let (mut client, task, requests) = serve(Some(FOREIGN));
        let answer: Outcome = Ok(Reply::Status(status_report()));
        let supervisor = supervisor(requests, Request::Status, answer.clone());
        let got = exchange(&mut client, &encode_request(&Request::Status).unwrap()).await;
        assert_eq!(got, answer);
        nothing_more_forwarded(client, task, supervisor.await.unwrap()).await;
    }

    #[tokio::test]
    async fn a_change_from_a_foreign_uid_is_refused_and_never_forwarded() {
        let (mut client, task, requests) = serve(Some(FOREIGN));
        let got = exchange(
            &mut client,
            &encode_request(&Request::Scale { workers: 1 }).unwrap(),
        )
        .await;
        let e = got.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
        assert!(e.message.contains(&format!("uid {FOREIGN} ")), "{e:?}");
        nothing_more_forwarded(client, task, requests).await;
    }

    #[tokio::test]
    async fn a_too_large_frame_is_answered_then_the_connection_closed() {
        let (mut client, task, requests) = serve(Some(OWN));
        client
            .write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let e = reply(&mut client).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge, "{e:?}");
        // The server hung up: end of stream, and its task is over.
        assert!(matches!(
            next_frame(&mut client).await,
            Err(FrameError::Closed)
        ));
        nothing_more_forwarded(client, task, requests).await;
    }

    #[tokio::test]
    async fn malformed_json_is_answered_and_the_connection_stays_usable() {
        let (mut client, task, requests) = serve(Some(OWN));
        let got = exchange(&mut client, b"{{{ not json").await;
        assert_eq!(got.unwrap_err().kind, ErrorKind::Malformed);
        // The next frame on the same connection is served: a change, from the own uid.
        let request = Request::Drain { slot: 1 };
        let answer: Outcome = Ok(Reply::Done {
            message: "slot 1 drained".into(),
        });
        let supervisor = supervisor(requests, request.clone(), answer.clone());
        assert_eq!(
            exchange(&mut client, &encode_request(&request).unwrap()).await,
            answer
        );
        nothing_more_forwarded(client, task, supervisor.await.unwrap()).await;
    }

    #[test]
    fn reading_is_for_anyone() {
        for peer in [Some(0), Some(OWN), Some(FOREIGN), None] {
            for request in [Request::Status, Request::Policy] {
                assert_eq!(
                    authorize(peer, OWN, &request),
                    Ok(()),
                    "{peer:?} {request:?}"
                );
            }
        }
    }

    #[test]
    fn changing_is_for_root_and_the_own_uid() {
        let change = Request::SetPolicy {
            policy: PolicyName::Hash,
            weights: None,
            spill_depth: None,
        };
        assert_eq!(authorize(Some(0), OWN, &change), Ok(()), "root changes");
        assert_eq!(
            authorize(Some(OWN), OWN, &change),
            Ok(()),
            "own uid changes"
        );
        for (peer, shown) in [(Some(FOREIGN), "uid 65534 "), (None, "uid ? ")] {
            let e = authorize(peer, OWN, &change).unwrap_err();
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{peer:?}");
            assert!(e.message.starts_with(shown), "{peer:?}: {e:?}");
            assert!(e.message.contains("run the command as root"), "{e:?}");
        }
        // A controller running as root lets only root change it.
        assert_eq!(authorize(Some(0), 0, &change), Ok(()));
        assert_eq!(
            authorize(Some(OWN), 0, &change).unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
    }

    /// Random and damaged frames: each gets a reply, exactly the decodable ones reach the
    /// supervisor, and the connection stays usable throughout.
    #[tokio::test]
    async fn random_frames_are_answered_and_only_valid_ones_forwarded() {
        let (mut client, task, mut requests) = serve(Some(OWN));
        // A supervisor that answers whatever reaches it, and counts.
        let counter = tokio::spawn(async move {
            let mut n = 0u32;
            while let Some((_, reply)) = requests.recv().await {
                n += 1;
                let _ = reply.send(Ok(Reply::Done {
                    message: "ok".into(),
                }));
            }
            n
        });
        let mut expected = 0u32;
        for seed in 1..=2_000u64 {
            let payload = crate::control::random_frames::payload(seed);
            let valid = crate::control::protocol::decode_request(&payload).is_ok();
            expected += u32::from(valid);
            let outcome = exchange(&mut client, &payload).await;
            assert_eq!(outcome.is_ok(), valid, "seed {seed}: {outcome:?}");
        }
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server task ends once the client is gone")
            .unwrap();
        assert_eq!(counter.await.unwrap(), expected);
    }
}
