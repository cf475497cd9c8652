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

/// The bound control socket; removes its path when dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
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
        })
    }

    /// Serves clients, forwarding their requests to `commands`.
    pub fn serve(&mut self, commands: mpsc::Sender<Command>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        tokio::spawn(async move {
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
        });
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a peer may change the balancer: root, or the controller's own user.
fn may_change(uid: Option<u32>) -> bool {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    matches!(uid, Some(u) if u == 0 || u == own)
}

async fn serve_client(mut stream: UnixStream, commands: mpsc::Sender<Command>) {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
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
        let outcome = match decode_request(&frame) {
            Err(e) => Err(e),
            Ok(req) if req.changes_state() && !may_change(uid) => Err(ErrorReply::new(
                ErrorKind::PermissionDenied,
                format!(
                    "uid {} may not change the balancer: run the command as root or as the controller's user",
                    uid.map_or("?".into(), |u| u.to_string())
                ),
            )),
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if commands.send((req, tx)).await.is_err() {
                    return;
                }
                rx.await.unwrap_or_else(|_| {
                    Err(ErrorReply::new(ErrorKind::Failed, "the controller is shutting down"))
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
