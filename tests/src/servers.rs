//! Real servers as workers: each one's configuration written into a scratch directory, the
//! `balancer run` arguments that start it (the same recipes as docs/workers.md), and their
//! cleanup.
//!
//! nginx rewrites its environment area for its process titles, so the test tag cannot be read
//! back from its `/proc/PID/environ` ([`crate::kill_tagged`] misses it): [`ServerRun`] finds
//! a server's processes by the scratch directory on their command line instead.
use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
};

use crate::{process_group, unique_path};

/// A server the tests run as the worker program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// nginx in master mode, its sockets through `NGINX=` (`--socket-protocol nginx`).
    Nginx,
    /// lighttpd in the foreground with `server.systemd-socket-activation`.
    Lighttpd,
    /// gunicorn, which takes `LISTEN_FDS` on its own, with a tiny WSGI app.
    Gunicorn,
}

impl Server {
    /// The program, as Debian installs it.
    pub fn program(self) -> &'static str {
        match self {
            Self::Nginx => "/usr/sbin/nginx",
            Self::Lighttpd => "/usr/sbin/lighttpd",
            Self::Gunicorn => "/usr/bin/gunicorn",
        }
    }

    /// The Debian package that holds it (what `cargo xtask setup` installs).
    pub fn package(self) -> &'static str {
        match self {
            Self::Nginx => "nginx-light",
            Self::Lighttpd => "lighttpd",
            Self::Gunicorn => "gunicorn",
        }
    }

    /// The signal that makes it finish what it accepted and exit.
    pub fn stop_signal(self) -> &'static str {
        match self {
            Self::Nginx => "QUIT",
            Self::Lighttpd => "INT",
            Self::Gunicorn => "TERM",
        }
    }

    /// Whether the test can run: true when the program is installed. When it is not, a test
    /// running as root fails (`cargo xtask setup` installs it); otherwise it says it skips.
    pub fn available(self) -> bool {
        if Path::new(self.program()).exists() {
            return true;
        }
        // SAFETY: no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            !root,
            "{} is not installed: run `cargo xtask setup` (it installs the Debian package {})",
            self.program(),
            self.package()
        );
        eprintln!(
            "SKIPPED: {} is not installed and this user cannot install it: run `sudo apt-get install {}` or `cargo xtask setup` as root",
            self.program(),
            self.package()
        );
        false
    }

    /// Writes the configuration for serving on `addr` into a new scratch directory; returns
    /// the `balancer run` arguments (`--listen` to the worker command) in a guard that kills
    /// whatever runs from that directory when dropped. Declare it before the [`crate::Balancer`]
    /// so that it is dropped after it (once no controller respawns anything).
    pub fn setup(self, addr: SocketAddr, workers: u32) -> ServerRun {
        let dir = unique_path(&format!("{self:?}").to_lowercase());
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let mut args: Vec<String> = [
            "--listen",
            &addr.to_string(),
            "--workers",
            &workers.to_string(),
            "--policy",
            "hash",
            // None of them says READY=1 (gunicorn 20.1 only to systemd): ready when this runs out.
            "--ready-timeout",
            "500ms",
            "--stop-signal",
            self.stop_signal(),
        ]
        .map(str::to_owned)
        .to_vec();
        let command: Vec<String> = match self {
            Self::Nginx => {
                write(
                    &dir.join("nginx.conf"),
                    &format!(
                        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
error_log {d}/error.log notice;\nevents {{ worker_connections 1024; }}\nhttp {{\n  \
access_log {d}/access.log;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
server {{\n    listen {addr};\n    location / {{ return 200 \"nginx\\n\"; }}\n  }}\n}}\n"
                    ),
                );
                args.extend(["--socket-protocol".to_owned(), "nginx".to_owned()]);
                vec![
                    self.program().to_owned(),
                    "-p".to_owned(),
                    d.to_string(),
                    "-c".to_owned(),
                    format!("{d}/nginx.conf"),
                ]
            }
            Self::Lighttpd => {
                std::fs::create_dir_all(dir.join("www")).unwrap();
                write(&dir.join("www/index.html"), "lighttpd\n");
                write(
                    &dir.join("lighttpd.conf"),
                    &format!(
                        "server.document-root = \"{d}/www\"\nserver.bind = \"{}\"\nserver.port = {}\n\
server.systemd-socket-activation = \"enable\"\nserver.errorlog = \"{d}/error.log\"\n\
index-file.names = (\"index.html\")\nserver.modules += (\"mod_setenv\")\n\
setenv.add-response-header = (\"X-Balancer-Slot\" => env.BALANCER_SLOT)\n",
                        addr.ip(),
                        addr.port()
                    ),
                );
                vec![
                    self.program().to_owned(),
                    "-D".to_owned(),
                    "-f".to_owned(),
                    format!("{d}/lighttpd.conf"),
                ]
            }
            Self::Gunicorn => {
                write(
                    &dir.join("app.py"),
                    "import os\n\n\ndef app(environ, start_response):\n    \
body = ('slot=%s pid=%d\\n' % (os.environ.get('BALANCER_SLOT'), os.getppid())).encode()\n    \
start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    \
return [body]\n",
                );
                vec![
                    self.program().to_owned(),
                    "--chdir".to_owned(),
                    d.to_string(),
                    "--workers".to_owned(),
                    "1".to_owned(),
                    "app:app".to_owned(),
                ]
            }
        };
        args.push("--".to_owned());
        args.extend(command);
        ServerRun { args, dir }
    }
}

/// A server's `balancer run` arguments and its scratch directory; dropping it SIGKILLs every
/// process whose command line names the directory, and its process group.
pub struct ServerRun {
    /// `balancer run` arguments.
    pub args: Vec<String>,
    dir: PathBuf,
}

impl ServerRun {
    /// The arguments, borrowed as `Balancer::start` takes them.
    pub fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    /// The processes running from this server's directory.
    pub fn processes(&self) -> Vec<u32> {
        // The directory itself or a path under it: a directory whose name only starts the
        // same is another test's.
        let dir = self.dir.to_string_lossy().trim_end_matches('/').to_owned();
        let under = format!("{dir}/");
        pids_where(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .split('\0')
                    .any(|arg| arg == dir || arg.contains(&under))
            })
        })
    }
}

impl Drop for ServerRun {
    fn drop(&mut self) {
        // The controller's command line names the directory too, and it shares the test's
        // process group: that group is never signalled, only the processes themselves.
        // SAFETY: no preconditions.
        let own_group = unsafe { libc::getpgrp() } as u32;
        for pid in self.processes() {
            if let Some(group) = process_group(pid).filter(|g| *g > 1 && *g != own_group) {
                // SAFETY: kill(2) on the group of a process this test's server started.
                unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
            }
            // SAFETY: kill(2) on a process this test's server started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every process in process group `group`.
pub fn group_members(group: u32) -> Vec<u32> {
    pids_where(|pid| process_group(pid) == Some(group))
}

fn pids_where(keep: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("reading /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| keep(*pid))
        .collect();
    pids.sort_unstable();
    pids
}

fn write(path: &PathBuf, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A loopback address with a port free right now: a real server's configuration must name the
/// address before the controller binds it (port 0 would be known too late).
pub fn free_loopback_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
