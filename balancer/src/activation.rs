//! Starting a worker on its slot's sockets (fd 3.., in `--listen` order), told of them by one of
//! two protocols ([`SocketProtocol`]), plus `BALANCER_SLOT` and `NOTIFY_SOCKET`:
//! - systemd socket activation: `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`;
//! - nginx's own inheritance: `NGINX="3;4;…"` (what nginx passes itself across a binary upgrade).
//!
//! `LISTEN_PID` must be the worker's own pid, which only exists after the fork, and setting the
//! environment between fork and exec is unsafe in a threaded process. So the child first
//! execs this binary's hidden `__exec-worker` command, which is single-threaded, sets
//! `LISTEN_PID` to its pid, and execs the real worker in the same process.
use std::{
    env,
    ffi::{OsStr, OsString},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Stdio,
};

use nix::sched::CpuSet;

/// The first inherited descriptor, by the protocol.
pub const LISTEN_FDS_START: RawFd = 3;

/// How a worker learns which inherited descriptors are its listening sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketProtocol {
    /// systemd socket activation: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` (lighttpd,
    /// gunicorn, uvicorn, most libraries).
    #[default]
    Systemd,
    /// nginx's inheritance variable: `NGINX="3;4;…"`, one number per `--listen` address, in
    /// order (nginx must run in master mode with `daemon off;`).
    Nginx,
}

impl SocketProtocol {
    /// The environment that names the first `sockets` descriptors from fd 3 as listening
    /// sockets (`LISTEN_PID` is set later, by the trampoline, for the systemd protocol).
    pub fn env(self, sockets: usize, fd_names: &str) -> Vec<(&'static str, String)> {
        match self {
            Self::Systemd => vec![
                ("LISTEN_FDS", sockets.to_string()),
                ("LISTEN_FDNAMES", fd_names.to_owned()),
            ],
            // nginx takes every number terminated by ';' or ':' and ignores a tail without one.
            Self::Nginx => vec![(
                NGINX_VAR,
                (0..sockets)
                    .map(|i| format!("{};", LISTEN_FDS_START + i as RawFd))
                    .collect(),
            )],
        }
    }
}

/// nginx's socket-inheritance variable.
const NGINX_VAR: &str = "NGINX";

/// The variables of both protocols: a worker gets only its own protocol's, never ones the
/// controller inherited (a stray `NGINX` or `LISTEN_FDS` would name descriptors wrongly).
const PROTOCOL_VARS: [&str; 4] = ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", NGINX_VAR];

/// The worker command cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Not found.
    #[error("worker command {0:?} was not found{1}: give a path or install it")]
    NotFound(OsString, &'static str),
    /// Found, but not an executable file.
    #[error("worker command {path:?} is not executable ({why}): fix its mode (chmod +x) or give another command")]
    NotExecutable {
        /// Resolved path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// Resolves the worker program as `execvp` would and checks that it can be executed.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf, CommandError> {
    let as_path = Path::new(program);
    if as_path.components().count() > 1 || program.as_encoded_bytes().contains(&b'/') {
        check_executable(as_path)?;
        return Ok(as_path.to_path_buf());
    }
    let path = env::var_os("PATH").unwrap_or_default();
    for dir in env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            check_executable(&candidate)?;
            return Ok(candidate);
        }
    }
    Err(CommandError::NotFound(program.to_owned(), " in PATH"))
}

fn check_executable(path: &Path) -> Result<(), CommandError> {
    let meta = std::fs::metadata(path)
        .map_err(|_| CommandError::NotFound(path.as_os_str().to_owned(), ""))?;
    let why = if meta.is_dir() {
        Some("it is a directory".to_owned())
    } else if meta.permissions().mode() & 0o111 == 0 {
        Some(format!("mode {:o}", meta.permissions().mode() & 0o7777))
    } else {
        None
    };
    match why {
        Some(why) => Err(CommandError::NotExecutable {
            path: path.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

/// Everything needed to start a slot's worker.
pub struct WorkerLaunch<'a> {
    /// The worker program (resolved) and its arguments.
    pub command: &'a [OsString],
    /// The slot number.
    pub slot: u32,
    /// The slot's sockets, one per listen address.
    pub sockets: Vec<BorrowedFd<'a>>,
    /// How the worker is told of its sockets.
    pub protocol: SocketProtocol,
    /// `LISTEN_FDNAMES`.
    pub fd_names: &'a str,
    /// `NOTIFY_SOCKET`.
    pub notify_socket: &'a str,
    /// CPUs to pin the worker to.
    pub cpus: Option<CpuSet>,
    /// Who the worker runs as (`--user`); `None`: the controller's user.
    pub credentials: Option<&'a crate::credentials::Credentials>,
}

/// This binary, as the kernel holds it: still valid when the file was replaced or removed by
/// an upgrade while the controller runs (where `current_exe()` would name a deleted path).
pub const SELF_EXE: &str = "/proc/self/exe";

/// Forks and starts the worker (through the `__exec-worker` trampoline); returns its pid.
///
/// The worker is not tied to the controller's life: it keeps serving if the controller dies,
/// and a restarted controller adopts it. Nothing here waits for it: the controller reaps its
/// children itself (it is their subreaper), so that their grandchildren are reaped too.
pub fn spawn(launch: WorkerLaunch<'_>) -> io::Result<u32> {
    let mut cmd = std::process::Command::new(SELF_EXE);
    cmd.arg("__exec-worker").arg("--").args(launch.command);
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(launch.protocol.env(launch.sockets.len(), launch.fd_names))
        .env("BALANCER_SLOT", launch.slot.to_string())
        .env("NOTIFY_SOCKET", launch.notify_socket)
        // The manager's watchdog is the controller's, not the worker's.
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        // The controller's stdout is for its own lines (scripts read them); workers log to stderr.
        .stdout(Stdio::from(io::stderr().as_fd().try_clone_to_owned()?));

    let sources: Vec<RawFd> = launch.sockets.iter().map(|s| s.as_raw_fd()).collect();
    // O_NONBLOCK is left as it is: it belongs to the open file description, which the
    // controller and every worker of the slot share (a restart's old worker still accepts on
    // it), so clearing it for a new worker would turn the running one's accept blocking.
    let credentials = launch.credentials.cloned();
    let n = sources.len() as RawFd;
    let floor = sources
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(LISTEN_FDS_START + n)
        + 1;
    let mut parked = vec![-1 as RawFd; sources.len()];
    let cpus = launch.cpus;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (fcntl, dup2, setpgid, sched_setaffinity, and prctl/setgroups/setresgid/setresuid in
    // `become_user`); it allocates nothing, as `parked` and the credentials are prepared
    // beforehand.
    unsafe {
        cmd.pre_exec(move || {
            // Park every source above the target range first, so that placing fd 3+i can
            // never overwrite a source still to be placed.
            for (i, fd) in sources.iter().enumerate() {
                let p = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor);
                if p < 0 {
                    return Err(io::Error::last_os_error());
                }
                parked[i] = p;
            }
            for (i, p) in parked.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the target: exactly the fds the worker inherits.
                if libc::dup2(*p, LISTEN_FDS_START + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Own process group: a Ctrl-C on the controller's terminal reaches the controller,
            // which then stops the workers in order.
            if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(set) = &cpus {
                // Best effort: a pinned CPU taken offline must not keep the slot from running
                // (the parent warns about offline CPUs when it builds the set).
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set);
            }
            if let Some(creds) = &credentials {
                crate::credentials::become_user(creds)?;
            }
            Ok(())
        });
    }
    // The Child handle is dropped without waiting: the controller's reaper collects the exit.
    Ok(cmd.spawn()?.id())
}

/// The `__exec-worker` trampoline: sets `LISTEN_PID` to this process (for the systemd
/// protocol, the one that sets `LISTEN_FDS`) and execs the worker. Returns only on failure,
/// with the error to report.
pub fn exec_worker(command: &[OsString]) -> io::Error {
    let Some((program, args)) = command.split_first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "no worker command");
    };
    if env::var_os("LISTEN_FDS").is_some() {
        // SAFETY: this process has not started any thread yet (the trampoline runs before any
        // runtime), so nothing can read the environment concurrently.
        unsafe { env::set_var("LISTEN_PID", std::process::id().to_string()) };
    }
    std::process::Command::new(program).args(args).exec()
}

/// The `LISTEN_FDNAMES` of a group: one name per listen address (names may not hold ':').
pub fn fd_names(addresses: usize) -> String {
    (0..addresses)
        .map(|i| format!("listen{i}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_programs_like_execvp() {
        assert!(resolve_program(OsStr::new("sh")).unwrap().is_absolute());
        assert!(matches!(
            resolve_program(OsStr::new("no-such-program-balancer")),
            Err(CommandError::NotFound(..))
        ));
        assert!(matches!(
            resolve_program(OsStr::new("/etc/passwd")),
            Err(CommandError::NotExecutable { .. })
        ));
        assert!(matches!(
            resolve_program(OsStr::new("/")),
            Err(CommandError::NotExecutable { .. })
        ));
        assert!(matches!(
            resolve_program(OsStr::new("./no/such")),
            Err(CommandError::NotFound(..))
        ));
    }

    #[test]
    fn each_protocol_names_the_sockets_its_way() {
        assert_eq!(
            SocketProtocol::Systemd.env(2, "listen0:listen1"),
            vec![
                ("LISTEN_FDS", "2".to_owned()),
                ("LISTEN_FDNAMES", "listen0:listen1".to_owned())
            ]
        );
        assert_eq!(
            SocketProtocol::Nginx.env(3, "unused"),
            vec![("NGINX", "3;4;5;".to_owned())]
        );
        assert_eq!(
            SocketProtocol::Nginx.env(1, ""),
            vec![("NGINX", "3;".to_owned())]
        );
    }

    #[test]
    fn fd_names_have_no_colons_inside() {
        assert_eq!(fd_names(2), "listen0:listen1");
    }
}
