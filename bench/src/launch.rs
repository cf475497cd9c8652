//! Starting the processes of an arm: listening sockets, demo workers, a balancer controller,
//! and waiting until what was started answers.
use std::{
    net::SocketAddr,
    os::{fd::RawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use socket2::{Domain, Socket, Type};

use balancer_bench::client::get_served;

use crate::arms::Arm;

/// Stops a controller that an upgrade put in charge (not our child): SIGTERM, which stops
/// its workers in order, then SIGKILL if it is still there after 15 s.
pub fn stop_upgraded(pid: u32) {
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    // SAFETY: kill(2) on the controller this bench's upgrade started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !gone() {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Starts `balancer run --listen LISTEN --control CONTROL ARGS` (ARGS may end with `-- COMMAND`)
/// and waits for its listening line; returns it with the bound address.
pub fn start_balancer(
    balancer: &Path,
    listen: &str,
    args: &[String],
    control: &Path,
) -> Result<(Child, SocketAddr)> {
    let mut child = Command::new(balancer)
        .args(["run", "--listen", listen])
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting balancer")?;
    let out = child.stdout.take().context("balancer stdout")?;
    let addr = read_listen_line(out)?;
    Ok((child, addr))
}

pub fn listener(addr: SocketAddr, arm: Arm, cpu: u32) -> Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if arm != Arm::Shared {
        s.set_reuse_port(true)?;
    }
    if arm == Arm::IncomingCpu {
        s.set_cpu_affinity(cpu as usize)
            .context("SO_INCOMING_CPU")?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s)
}

/// Starts `balancer demo-worker` on listening socket `fd` (as fd 3, by socket activation).
pub fn spawn_worker(balancer: &Path, fd: RawFd, slot: u32, cpu: Option<u32>) -> Result<Child> {
    let mut cmd = Command::new(balancer);
    cmd.args(["__exec-worker", "--"])
        .arg(balancer)
        .arg("demo-worker")
        .env("LISTEN_FDS", "1")
        .env("BALANCER_SLOT", slot.to_string())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu as usize, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

fn read_listen_line(out: std::process::ChildStdout) -> Result<SocketAddr> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if !sent {
                if let Some(addr) = line
                    .strip_prefix("listening on ")
                    .and_then(|l| l.split(' ').next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("balancer did not print its listen address")
}

pub fn wait_answering(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if get_served(addr).is_ok() {
            // Let every worker finish starting.
            thread::sleep(Duration::from_millis(300));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} does not answer");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
