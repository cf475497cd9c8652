//! The setups compared, each serving the same demo worker on loopback: what users would run
//! instead of balancer, and balancer itself.
use std::{
    net::SocketAddr,
    os::{
        fd::{AsRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{programs::SkReuseport, Ebpf};
use balancer::control::protocol::StatusReport;
use balancer_common::PROGRAM_PASS;
use socket2::{Domain, Socket, Type};

use balancer_bench::client::{get, online_cpus};

/// One setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// One listening socket shared by every worker (the pre-reuseport model).
    Shared,
    /// SO_REUSEPORT, one socket per worker, the kernel's hash.
    Reuseport,
    /// SO_REUSEPORT with SO_INCOMING_CPU set per listener (kernel 6.2+), workers pinned.
    IncomingCpu,
    /// SO_REUSEPORT with an SK_REUSEPORT program that only returns SK_PASS: the BPF floor.
    PassOnly,
    /// balancer with a policy.
    Balancer(&'static str),
}

impl Arm {
    /// Every arm, in report order.
    pub const ALL: [Arm; 8] = [
        Arm::Shared,
        Arm::Reuseport,
        Arm::IncomingCpu,
        Arm::Balancer("cpu"),
        Arm::Balancer("hash"),
        Arm::Balancer("round-robin"),
        Arm::Balancer("least-loaded"),
        Arm::PassOnly,
    ];

    /// Its name in tables and charts.
    pub fn name(self) -> String {
        match self {
            Arm::Shared => "1 shared socket".into(),
            Arm::Reuseport => "2 reuseport (kernel hash)".into(),
            Arm::IncomingCpu => "3 reuseport + SO_INCOMING_CPU".into(),
            Arm::PassOnly => "7 reuseport + SK_PASS program".into(),
            Arm::Balancer(p) => format!(
                "{} balancer {p}",
                match p {
                    "cpu" => "4",
                    "hash" => "5",
                    "round-robin" => "6a",
                    _ => "6b",
                }
            ),
        }
    }
}

/// What every arm needs to start.
pub struct Context {
    /// The balancer binary (also the demo worker).
    pub balancer: PathBuf,
    /// The eBPF object (for the SK_PASS arm).
    pub object: PathBuf,
    /// Workers per arm.
    pub workers: u32,
    /// Scratch directory (control sockets).
    pub scratch: PathBuf,
}

/// A running arm.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    arm: Arm,
    workers: Vec<Child>,
    /// Sockets the bench keeps: the shared one (arm 1), or none (reuseport arms hand theirs
    /// to the workers, so a dead worker's socket dies with it, as in a plain server).
    kept: Vec<Socket>,
    balancer: Option<(Child, PathBuf)>,
    /// The balancer arm's `run` arguments, to start its controller again.
    balancer_args: Vec<String>,
    /// After an upgrade, the controller in charge (not our child any more).
    upgraded_to: Option<u32>,
    _program: Option<Ebpf>,
    ctx_balancer: PathBuf,
}

impl Server {
    /// Starts an arm and waits until it answers.
    pub fn start(arm: Arm, ctx: &Context, bpf_stats: bool) -> Result<Self> {
        let mut server = Server {
            addr: "127.0.0.1:0".parse().expect("valid"),
            arm,
            workers: Vec::new(),
            kept: Vec::new(),
            balancer: None,
            balancer_args: Vec::new(),
            upgraded_to: None,
            _program: None,
            ctx_balancer: ctx.balancer.clone(),
        };
        match arm {
            Arm::Balancer(policy) => {
                let control = ctx.scratch.join(format!("bench-{policy}.sock"));
                let mut args: Vec<String> =
                    ["--policy", policy, "--workers"].map(String::from).to_vec();
                args.push(ctx.workers.to_string());
                if policy == "cpu" {
                    args.push("--pin-workers".into());
                }
                if bpf_stats {
                    args.push("--bpf-stats".into());
                }
                let (child, addr) = start_balancer(&ctx.balancer, "127.0.0.1:0", &args, &control)?;
                server.addr = addr;
                server.balancer = Some((child, control));
                server.balancer_args = args;
            }
            _ => {
                let cpus = online_cpus();
                let first = listener(server.addr, arm, cpus[0])?;
                server.addr = first.local_addr()?.as_socket().context("bound address")?;
                let mut sockets = vec![first];
                if arm != Arm::Shared {
                    for i in 1..ctx.workers {
                        sockets.push(listener(server.addr, arm, cpus[i as usize % cpus.len()])?);
                    }
                }
                if arm == Arm::PassOnly {
                    let mut ebpf = Ebpf::load_file(&ctx.object)
                        .with_context(|| format!("loading {}", ctx.object.display()))?;
                    let prog: &mut SkReuseport = ebpf
                        .program_mut(PROGRAM_PASS)
                        .context("the object has no SK_PASS program")?
                        .try_into()?;
                    prog.load()?;
                    prog.attach(&sockets[0])?;
                    server._program = Some(ebpf);
                }
                for i in 0..ctx.workers {
                    let socket = &sockets[(i as usize).min(sockets.len() - 1)];
                    let cpu = (arm == Arm::IncomingCpu).then(|| cpus[i as usize % cpus.len()]);
                    server
                        .workers
                        .push(spawn_worker(&ctx.balancer, socket.as_raw_fd(), i, cpu)?);
                }
                if arm == Arm::Shared {
                    server.kept = sockets;
                }
                // Otherwise the bench's copies close here: each socket lives in its worker.
            }
        }
        wait_answering(server.addr)?;
        Ok(server)
    }

    /// A balancer arm's controller pid (the one it started).
    pub fn controller_pid(&self) -> Option<u32> {
        self.balancer.as_ref().map(|(child, _)| child.id())
    }

    /// The worker pid of `slot`, if one runs (a balancer slot may be respawning).
    pub fn worker_pid(&self, slot: u32) -> Result<Option<u32>> {
        match &self.balancer {
            Some((_, control)) => {
                let status = self.status(control)?;
                Ok(status.slots.get(slot as usize).and_then(|s| s.pid))
            }
            None => Ok(self.workers.get(slot as usize).map(Child::id)),
        }
    }

    /// `balancer status --json` of a balancer arm.
    pub fn status(&self, control: &Path) -> Result<StatusReport> {
        let out = Command::new(&self.ctx_balancer)
            .args(["status", "--json", "--control"])
            .arg(control)
            .output()?;
        if !out.status.success() {
            bail!("balancer status: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "balancer status --json is not a status report: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs the balancer CLI against this arm (`policy set …`).
    pub fn cli(&self, args: &[&str]) -> Result<()> {
        let Some((_, control)) = &self.balancer else {
            bail!("not a balancer arm");
        };
        let out = Command::new(&self.ctx_balancer)
            .args(args)
            .arg("--control")
            .arg(control)
            .output()?;
        if !out.status.success() {
            bail!(
                "balancer {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Program ns per run and runs, when stats are on (balancer arms with `--bpf-stats`, or
    /// the SK_PASS arm while the bench holds the stats fd).
    pub fn program_cost(&self) -> Result<Option<(f64, u64)>> {
        if let Some((_, control)) = &self.balancer {
            let s = self.status(control)?;
            return Ok(s.bpf_ns_per_selection.zip(s.bpf_runs));
        }
        let Some(ebpf) = &self._program else {
            return Ok(None);
        };
        let prog: &SkReuseport = ebpf
            .program(PROGRAM_PASS)
            .context("SK_PASS program")?
            .try_into()?;
        let info = prog.info()?;
        let runs = info.run_count();
        Ok((runs > 0).then(|| (info.run_time().as_nanos() as f64 / runs as f64, runs)))
    }

    /// SIGKILLs worker `slot`. Plain arms replace it at once, as a pre-fork master would: the
    /// shared arm on the shared socket, the reuseport arms on a new socket (the old one died
    /// with the worker, and what was queued on it was reset). balancer respawns its own.
    pub fn kill_worker(&mut self, slot: u32, ctx: &Context) -> Result<()> {
        let Some(pid) = self.worker_pid(slot)? else {
            // Still being respawned by balancer: nothing to kill this time.
            return Ok(());
        };
        // SAFETY: kill(2) on a worker of this arm.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        if self.balancer.is_some() {
            return Ok(());
        }
        let old = &mut self.workers[slot as usize];
        let _ = old.wait();
        let cpus = online_cpus();
        let cpu = cpus[slot as usize % cpus.len()];
        let fresh;
        let fd = match self.arm {
            Arm::Shared => self.kept[0].as_raw_fd(),
            _ => {
                fresh = listener(self.addr, self.arm, cpu)?;
                fresh.as_raw_fd()
            }
        };
        let pin = (self.arm == Arm::IncomingCpu).then_some(cpu);
        self.workers[slot as usize] = spawn_worker(&ctx.balancer, fd, slot, pin)?;
        Ok(())
    }

    /// Kills a balancer arm's controller with SIGKILL (its workers keep serving), then starts
    /// it again with the same arguments on the same address: it adopts the workers.
    pub fn restart_controller(&mut self) -> Result<()> {
        if self.upgraded_to.is_some() {
            bail!("the controller was upgraded: it is not this bench's child any more");
        }
        let Some((mut child, control)) = self.balancer.take() else {
            bail!("not a balancer arm");
        };
        // SAFETY: SIGKILL to our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        let (child, addr) = start_balancer(
            &self.ctx_balancer,
            &self.addr.to_string(),
            &self.balancer_args,
            &control,
        )?;
        if addr != self.addr {
            bail!(
                "the restarted controller listens on {addr}, not {}",
                self.addr
            );
        }
        // Adopted once it answers on its control socket.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status(&control).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the restarted controller does not answer on {}",
                    control.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.balancer = Some((child, control));
        Ok(())
    }

    /// `balancer upgrade` to the same binary: a new controller process takes the group over;
    /// the old one exits (the first time, it is our child and is reaped here).
    pub fn upgrade_controller(&mut self) -> Result<()> {
        let Some((child, control)) = &mut self.balancer else {
            bail!("not a balancer arm");
        };
        let out = Command::new(&self.ctx_balancer)
            .arg("upgrade")
            .arg("--binary")
            .arg(&self.ctx_balancer)
            .arg("--control")
            .arg(control.as_path())
            .output()?;
        let reply = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("balancer upgrade: {}", String::from_utf8_lossy(&out.stderr));
        }
        let pid = reply
            .split("-> pid ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no new controller pid in {reply:?}"))?;
        if self.upgraded_to.is_none() {
            let _ = child.wait();
        }
        self.upgraded_to = Some(pid);
        Ok(())
    }

    /// SIGSTOP or SIGCONT to worker `slot`.
    pub fn signal_worker(&self, slot: u32, sig: libc::c_int) -> Result<()> {
        let pid = self
            .worker_pid(slot)?
            .with_context(|| format!("slot {slot} has no worker to signal"))?;
        // SAFETY: kill(2) on a worker of this arm.
        unsafe { libc::kill(pid as i32, sig) };
        Ok(())
    }

    /// Stops everything.
    pub fn stop(mut self) {
        if let Some(pid) = self.upgraded_to.take() {
            stop_upgraded(pid);
            self.balancer = None;
        }
        if let Some((mut child, _)) = self.balancer.take() {
            // SAFETY: SIGTERM to our child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Stops a controller that an upgrade put in charge (not our child): SIGTERM, which stops
/// its workers in order, then SIGKILL if it is still there after 15 s.
fn stop_upgraded(pid: u32) {
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

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(pid) = self.upgraded_to.take() {
            stop_upgraded(pid);
        }
        if let Some((child, _)) = &mut self.balancer {
            // Workers outlive a killed controller: SIGTERM, which stops them in order, and
            // SIGKILL only if it does not end in time.
            // SAFETY: SIGTERM to our child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Starts `balancer run --listen LISTEN ARGS --control CONTROL` and waits for its listening
/// line; returns it with the bound address.
fn start_balancer(
    balancer: &Path,
    listen: &str,
    args: &[String],
    control: &Path,
) -> Result<(Child, SocketAddr)> {
    let mut child = Command::new(balancer)
        .args(["run", "--listen", listen])
        .args(args)
        .arg("--control")
        .arg(control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting balancer")?;
    let out = child.stdout.take().context("balancer stdout")?;
    let addr = read_listen_line(out)?;
    Ok((child, addr))
}

fn listener(addr: SocketAddr, arm: Arm, cpu: u32) -> Result<Socket> {
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
fn spawn_worker(balancer: &Path, fd: RawFd, slot: u32, cpu: Option<u32>) -> Result<Child> {
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

fn wait_answering(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if get(addr).is_ok() {
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
