//! nginx as the worker program: its configuration in a scratch directory (the shape of
//! docs/workers.md and tests/src/servers.rs), a master started by the bench itself, and the
//! cleanup of whatever runs from that directory.
//!
//! nginx rewrites its environment area for its process titles, so a tag in its environment
//! cannot be read back: its processes are found by the scratch directory on their command line
//! (the master's title keeps it), and killed with their process group (the workers are in it).
use std::{
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use balancer_bench::process::{alive, process_group, wait_timeout};

/// The program, as Debian's nginx-light installs it (`cargo xtask setup`).
pub const PROGRAM: &str = "/usr/sbin/nginx";

/// How an nginx arm listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// One `listen` socket shared by every worker process.
    Shared,
    /// `listen … reuseport`: nginx makes one socket per worker process.
    Reuseport,
    /// The sockets come from balancer (`NGINX=`), one master per slot.
    Inherited,
}

/// Fails with the fix when nginx is not installed.
pub fn check_installed() -> Result<()> {
    if !Path::new(PROGRAM).exists() {
        bail!("{PROGRAM} is not installed: run `cargo xtask setup` (it installs the Debian package nginx-light)");
    }
    Ok(())
}

/// A loopback address whose port is free now: nginx's configuration must name it before
/// anything binds it.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port for nginx")?;
    Ok(l.local_addr()?)
}

/// Writes `dir/nginx.conf` for `worker_processes` workers serving `addr`; returns the
/// command that runs it. The answer names the nginx worker's pid (`pid=…`), so the bench's
/// client can tell how the connections spread over workers.
pub fn configure(
    dir: &Path,
    addr: SocketAddr,
    worker_processes: u32,
    listen: Listen,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = dir.display();
    let reuseport = if listen == Listen::Reuseport {
        " reuseport"
    } else {
        ""
    };
    // The access log is off in every nginx arm: the bench measures connection handling, not
    // the disk.
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes {worker_processes};\npid {d}/nginx.pid;\n\
error_log {d}/error.log notice;\nevents {{ worker_connections 1024; }}\nhttp {{\n  \
access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
server {{\n    listen {addr}{reuseport};\n    location / {{ return 200 \"pid=$pid\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    Ok(vec![
        PROGRAM.to_owned(),
        "-p".to_owned(),
        d.to_string(),
        "-c".to_owned(),
        path.display().to_string(),
    ])
}

/// Starts an nginx master from `command` ([`configure`]) in its own process group, so that
/// [`stop_master`] reaches its workers too; it dies with the bench (PDEATHSIG).
pub fn start_master(command: &[String]) -> Result<Child> {
    let (program, args) = command.split_first().context("empty nginx command")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {program}"))
}

/// Stops a master from [`start_master`]: `QUIT` (nginx's graceful stop; nothing is in flight
/// between runs), then `SIGKILL` to its whole group if it is not gone within 5 s.
pub fn stop_master(master: &mut Child) {
    let pid = master.id() as i32;
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let _ = wait_timeout(master, Duration::from_secs(5));
    // SAFETY: killpg on the group the master leads (its workers are in it).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = master.kill();
    let _ = master.wait();
}

/// SIGKILLs every process whose command line names a path under `dir`, and its process group (never the
/// bench's own group); returns how many it found. Also finds balancer controllers whose
/// control socket is under `dir`.
pub fn sweep(dir: &Path) -> usize {
    // With the separator: /tmp/x-12 must not match the processes of /tmp/x-123. Everything
    // under `dir` is named by a path inside it (the configuration, a control socket).
    let needle = format!("{}/", dir.to_string_lossy().trim_end_matches('/'));
    // SAFETY: no preconditions.
    let own_group = unsafe { libc::getpgrp() } as u32;
    let me = std::process::id();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        eprintln!("reading /proc to find what runs from {needle}: nothing swept");
        return 0;
    };
    let pids: Vec<u32> = proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect();
    for &pid in &pids {
        if let Some(group) = process_group(pid).filter(|g| *g > 1 && *g != own_group) {
            // SAFETY: kill(2) on the group of a process running from the bench's scratch dir.
            unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
        }
        // SAFETY: kill(2) on a process running from the bench's scratch dir.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    pids.len()
}

/// The scratch directory of one nginx arm.
pub fn arm_dir(scratch: &Path, name: &str) -> PathBuf {
    scratch.join(format!(
        "nginx-{}",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_listens_as_asked_and_names_the_worker_pid() {
        let dir = std::env::temp_dir().join(format!("bench-nginx-conf-{}", std::process::id()));
        let addr: SocketAddr = "127.0.0.1:8123".parse().unwrap();
        for (listen, line) in [
            (Listen::Shared, "listen 127.0.0.1:8123;"),
            (Listen::Reuseport, "listen 127.0.0.1:8123 reuseport;"),
            (Listen::Inherited, "listen 127.0.0.1:8123;"),
        ] {
            let cmd = configure(&dir, addr, 3, listen).unwrap();
            let conf = std::fs::read_to_string(dir.join("nginx.conf")).unwrap();
            assert!(conf.contains(line), "{conf}");
            assert!(conf.contains("worker_processes 3;"), "{conf}");
            assert!(conf.contains("daemon off;") && conf.contains("master_process on;"));
            assert!(conf.contains("return 200 \"pid=$pid\\n\";"), "{conf}");
            assert_eq!(cmd[0], PROGRAM);
            assert!(cmd.iter().any(|a| a.ends_with("nginx.conf")));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_sweep_kills_what_runs_from_the_dir_with_its_group_and_nothing_else() {
        use std::{
            io::{BufRead, BufReader},
            process::Stdio,
        };
        let dir = std::env::temp_dir().join(format!("bench-sweep-{}", std::process::id()));
        let decoy_dir = PathBuf::from(format!("{}0", dir.display()));
        // A master-like `sh` naming a path under `dir`, leading its group, with a child that
        // does not name it (as nginx's worker processes do not).
        let mut master = Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; wait", "sh"])
            .arg(dir.join("nginx.conf"))
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(master.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let worker: u32 = line.trim().parse().unwrap();
        // A path that only starts like `dir`: not swept.
        let mut decoy = Command::new("sh")
            .args(["-c", "sleep 60", "sh"])
            .arg(decoy_dir.join("nginx.conf"))
            .process_group(0)
            .spawn()
            .unwrap();
        assert_eq!(sweep(&dir), 1);
        assert!(!master.wait().unwrap().success());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(worker) {
            assert!(
                std::time::Instant::now() < deadline,
                "the group's {worker} runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(decoy.try_wait().unwrap().is_none(), "the decoy was killed");
        assert_eq!(sweep(&decoy_dir), 1);
        assert!(!decoy.wait().unwrap().success());
    }

    #[test]
    fn arm_dirs_are_plain_names_under_the_scratch_dir() {
        let d = arm_dir(Path::new("/tmp/x"), "N3 nginx + balancer cpu");
        assert_eq!(d, Path::new("/tmp/x/nginx-N3-nginx---balancer-cpu"));
    }
}
