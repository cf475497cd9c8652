//! The control socket's file: a directory only its owner can change, and a socket that is
//! at its path only once it is mode 0600.
//!
//! The socket is bound inside a fresh 0700 directory next to its path, made 0600 there, and
//! only then renamed to the path: nobody can connect in between, whatever the umask (the
//! umask is process-wide and the runtime's threads create files too, so it is not changed).
//! The directory holding the path must not be a symbolic link, must belong to us or root,
//! and must not let other users replace the socket (group or world writable without the
//! sticky bit); one we create is 0700.
use std::{
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::group_state::STATE_ROOT;

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
    /// The directory would let someone else redirect or replace the socket.
    #[error("the control socket's directory {dir} {problem}")]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it, and the fix.
        problem: DirProblem,
    },
    /// Creating the socket failed.
    #[error("creating control socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What makes a directory unfit to hold the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirProblem {
    /// Whoever can change the link could redirect the socket.
    #[error(
        "is a symbolic link: give --control a path in the directory it points to (a link is never followed)"
    )]
    Symlink,
    /// Not a directory at all.
    #[error("is not a directory: choose another --control PATH")]
    NotADirectory,
    /// Its owner could replace the socket.
    #[error(
        "belongs to uid {0}, who could replace the socket: use a directory owned by root or by this controller's user"
    )]
    ForeignOwner(u32),
    /// Other users could replace the socket.
    #[error(
        "is writable by other users (mode {0:o}) without the sticky bit, so any of them could replace the socket: `chmod go-w` it or choose another --control PATH"
    )]
    Writable(u32),
}

/// The facts about a directory that decide whether it may hold the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirFacts {
    /// A symbolic link (not followed).
    pub symlink: bool,
    /// A directory.
    pub directory: bool,
    /// Its owner.
    pub uid: u32,
    /// Its mode bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl DirFacts {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            symlink: meta.file_type().is_symlink(),
            directory: meta.is_dir(),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// Whether a directory with `facts` may hold the control socket of a controller running as
/// `own_uid`. A sticky directory (such as /tmp) is accepted: nobody else can remove or
/// rename the socket in it.
pub fn check_dir(facts: DirFacts, own_uid: u32) -> Result<(), DirProblem> {
    const STICKY: u32 = 0o1000;
    if facts.symlink {
        return Err(DirProblem::Symlink);
    }
    if !facts.directory {
        return Err(DirProblem::NotADirectory);
    }
    if facts.uid != 0 && facts.uid != own_uid {
        return Err(DirProblem::ForeignOwner(facts.uid));
    }
    if facts.mode & 0o022 != 0 && facts.mode & STICKY == 0 {
        return Err(DirProblem::Writable(facts.mode));
    }
    Ok(())
}

/// The mode of a directory created for the control socket: 0700, but the state root stays
/// traversable (0711) because `--user` workers reach their group's notify socket through it.
fn new_dir_mode(dir: &Path) -> u32 {
    if dir == Path::new(STATE_ROOT) {
        0o711
    } else {
        0o700
    }
}

/// The directory of `path`: created (see [`new_dir_mode`]) when missing, refused when it is
/// unsafe (see [`check_dir`]).
pub fn ensure_dir(path: &Path) -> Result<PathBuf, ControlError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mode = new_dir_mode(&dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&dir)
                .map_err(io_err)?;
            // The umask may have taken bits away; the mode is exactly this one.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(io_err)?;
            std::fs::symlink_metadata(&dir).map_err(io_err)?
        }
        Err(e) => return Err(io_err(e)),
    };
    check_dir(DirFacts::of(&meta), own_uid()).map_err(|problem| ControlError::UnsafeDir {
        dir: dir.clone(),
        problem,
    })?;
    Ok(dir)
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The (device, inode) of the file at `path` (never through a link).
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Makes room at `path` for a new controller: refuses when another one answers there or
/// something else is there; removes a dead controller's socket.
pub fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => {
            let pid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                .map(|c| format!(" (pid {})", c.pid()))
                .unwrap_or_default();
            Err(ControlError::InUse {
                path: path.to_path_buf(),
                pid,
            })
        }
        Err(_) => std::fs::remove_file(path).map_err(|source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A listening socket of mode 0600 put at `path` (in `dir`, checked by [`ensure_dir`]) by a
/// rename from a private 0700 directory, with its (device, inode). `replace`: over whatever
/// is at the path (an upgrade takes the old controller's path); otherwise refused when
/// something appeared there since [`clear_stale`].
pub fn place(
    dir: &Path,
    path: &Path,
    replace: bool,
) -> Result<(std::os::unix::net::UnixListener, (u64, u64)), ControlError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map_or_else(|| "control".into(), |n| n.to_string_lossy().into_owned());
    let private = dir.join(format!(
        ".{name}.{}.{}.bind",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // mkdir refuses an existing name (a link included): the directory is new and ours.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_err)?;
    let staged = private.join("socket");
    let placed = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        let id = file_id(&staged).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let flags = if replace {
            nix::fcntl::RenameFlags::empty()
        } else {
            nix::fcntl::RenameFlags::RENAME_NOREPLACE
        };
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &staged,
            nix::fcntl::AT_FDCWD,
            path,
            flags,
        )
        .map_err(io::Error::from)?;
        Ok((listener, id))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    placed.map_err(|e: io::Error| match e.raw_os_error() {
        Some(libc::EEXIST) => ControlError::InUse {
            path: path.to_path_buf(),
            pid: String::new(),
        },
        _ => io_err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: u32 = 1000;

    fn dir(uid: u32, mode: u32) -> DirFacts {
        DirFacts {
            symlink: false,
            directory: true,
            uid,
            mode,
        }
    }

    #[test]
    fn a_private_or_root_owned_directory_is_accepted() {
        for facts in [
            dir(OWN, 0o700),
            dir(0, 0o755),
            dir(0, 0o711),
            dir(0, 0o1777),
        ] {
            assert_eq!(check_dir(facts, OWN), Ok(()), "{facts:?}");
        }
    }

    #[test]
    fn links_other_files_foreign_owners_and_writable_directories_are_refused() {
        let link = DirFacts {
            symlink: true,
            ..dir(OWN, 0o777)
        };
        assert_eq!(check_dir(link, OWN), Err(DirProblem::Symlink));
        let file = DirFacts {
            directory: false,
            ..dir(OWN, 0o600)
        };
        assert_eq!(check_dir(file, OWN), Err(DirProblem::NotADirectory));
        assert_eq!(
            check_dir(dir(2000, 0o700), OWN),
            Err(DirProblem::ForeignOwner(2000))
        );
        for mode in [0o777, 0o775, 0o757, 0o720] {
            assert_eq!(
                check_dir(dir(OWN, mode), OWN),
                Err(DirProblem::Writable(mode))
            );
        }
        // Every refusal says what to do.
        for problem in [
            DirProblem::Symlink,
            DirProblem::NotADirectory,
            DirProblem::ForeignOwner(2000),
            DirProblem::Writable(0o777),
        ] {
            let text = problem.to_string();
            assert!(
                text.contains("--control") || text.contains("chmod") || text.contains("use a"),
                "{text}"
            );
        }
    }

    /// A fresh directory of the test's, removed when dropped (whether the test passed or not).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(what: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("balancer-control-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    /// The socket appears at its path only by a rename, already mode 0600: an inotify watch
    /// on the directory sees no socket created under the path's name (a bind there would be
    /// one, and would be connectable before its chmod).
    #[test]
    fn the_socket_appears_at_its_path_only_by_rename_with_mode_0600() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let scratch = scratch("rename");
        let root = &scratch.0;
        let path = root.join("sub").join("ctl.sock");
        let dir = ensure_dir(&path).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "a directory we create is private");
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        watch
            .add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .unwrap();
        let (_listener, id) = place(&dir, &path, false).unwrap();
        assert_eq!(file_id(&path), Some(id));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let events = watch.read_events().unwrap();
        let at_path: Vec<_> = events
            .iter()
            .filter(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("ctl.sock")))
            .map(|e| e.mask)
            .collect();
        assert_eq!(at_path, [AddWatchFlags::IN_MOVED_TO], "{events:?}");
        // Without `replace`, a second socket does not take the path.
        assert!(matches!(
            place(&dir, &path, false),
            Err(ControlError::InUse { .. })
        ));
        let (_second, id2) = place(&dir, &path, true).unwrap();
        assert_eq!(file_id(&path), Some(id2));
        // Nothing of the staging is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("ctl.sock")]);
    }

    #[test]
    fn a_directory_that_is_a_link_is_refused_before_anything_is_created() {
        let scratch = scratch("link");
        let root = &scratch.0;
        let real = root.join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(&real, root.join("link")).unwrap();
        let e = ensure_dir(&root.join("link").join("ctl.sock")).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::UnsafeDir {
                    problem: DirProblem::Symlink,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    }
}
