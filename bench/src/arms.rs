//! The setups compared on loopback: what users would run instead of balancer, and balancer
//! itself, each serving the same demo worker; and the same comparison with nginx as the
//! server (its own shared socket, its own `reuseport`, and one nginx master per balancer slot).
use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{programs::SkReuseport, Ebpf};
use balancer::control::protocol::StatusReport;
use balancer_common::PROGRAM_PASS;
use socket2::Socket;

use balancer::control::protocol::SlotState;
use balancer_bench::client::online_cpus;

use crate::{
    launch::{listener, spawn_worker, start_balancer, stop_upgraded, wait_answering},
    nginx::{self, Listen},
};

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
    /// nginx alone, one master and a worker process per CPU, on a shared socket or with
    /// `reuseport`.
    Nginx(Listen),
    /// balancer with a policy, one nginx master with one worker process per slot.
    NginxBalancer(&'static str),
}

impl Arm {
    /// Every arm, in report order.
    pub const ALL: [Arm; 12] = [
        Arm::Shared,
        Arm::Reuseport,
        Arm::IncomingCpu,
        Arm::Balancer("cpu"),
        Arm::Balancer("hash"),
        Arm::Balancer("round-robin"),
        Arm::Balancer("least-loaded"),
        Arm::PassOnly,
        Arm::Nginx(Listen::Shared),
        Arm::Nginx(Listen::Reuseport),
        Arm::NginxBalancer("cpu"),
        Arm::NginxBalancer("hash"),
    ];

    /// Whether nginx is its server (measured with wrk too; no fault scenarios).
    pub fn is_nginx(self) -> bool {
        matches!(self, Arm::Nginx(_) | Arm::NginxBalancer(_))
    }

    /// Its name in tables and charts.
    pub fn name(self) -> String {
        match self {
            Arm::Shared => "1 shared socket".into(),
            Arm::Reuseport => "2 reuseport (kernel hash)".into(),
            Arm::IncomingCpu => "3 reuseport + SO_INCOMING_CPU".into(),
            Arm::PassOnly => "7 reuseport + SK_PASS program".into(),
            Arm::Nginx(Listen::Shared) => "N1 nginx, shared socket".into(),
            Arm::Nginx(Listen::Reuseport) => "N2 nginx, listen reuseport".into(),
            Arm::Nginx(Listen::Inherited) => "nginx, inherited sockets".into(),
            Arm::NginxBalancer(p) => format!(
                "{} nginx, balancer {p}",
                if p == "cpu" { "N3" } else { "N4" }
            ),
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
    /// The nginx arms' master (nginx alone), in its own process group.
    nginx_master: Option<Child>,
    /// The nginx arms' scratch directory: whatever still runs from it is swept at the end.
    nginx_dir: Option<PathBuf>,
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
            nginx_master: None,
            nginx_dir: None,
        };
        match arm {
            Arm::Nginx(listen) => {
                let dir = nginx::arm_dir(&ctx.scratch, &arm.name());
                server.nginx_dir = Some(dir.clone());
                server.addr = nginx::free_loopback_addr()?;
                let command = nginx::configure(&dir, server.addr, ctx.workers, listen)?;
                server.nginx_master = Some(nginx::start_master(&command)?);
            }
            Arm::NginxBalancer(policy) => {
                let dir = nginx::arm_dir(&ctx.scratch, &arm.name());
                server.nginx_dir = Some(dir.clone());
                let addr = nginx::free_loopback_addr()?;
                // One worker process per master, a master per slot: N nginx workers in all,
                // as in the nginx arms.
                let command = nginx::configure(&dir, addr, 1, Listen::Inherited)?;
                let control = ctx.scratch.join(format!("bench-nginx-{policy}.sock"));
                let mut args: Vec<String> =
                    ["--policy", policy, "--workers"].map(String::from).to_vec();
                args.push(ctx.workers.to_string());
                if policy == "cpu" {
                    // The nginx worker inherits its master's pinning.
                    args.push("--pin-workers".into());
                }
                // nginx does not notify: a slot is ready once this runs out.
                args.extend(
                    [
                        "--socket-protocol",
                        "nginx",
                        "--stop-signal",
                        "QUIT",
                        "--ready-timeout",
                        "500ms",
                        "--",
                    ]
                    .map(String::from),
                );
                args.extend(command);
                let (child, bound) =
                    start_balancer(&ctx.balancer, &addr.to_string(), &args, &control)?;
                server.addr = bound;
                server.balancer = Some((child, control));
                server.balancer_args = args;
                server.wait_slots_ready(ctx.workers)?;
            }
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

    /// Waits until every one of a balancer arm's `workers` slots is ready.
    fn wait_slots_ready(&self, workers: u32) -> Result<()> {
        let Some((_, control)) = &self.balancer else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.status(control).ok().map_or(0, |s| {
                s.slots
                    .iter()
                    .filter(|s| s.state == SlotState::Ready && s.pid.is_some())
                    .count()
            });
            if ready == workers as usize {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{ready} of {workers} slots ready after 30 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
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
        self.stop_nginx();
    }

    /// Stops an nginx arm's master, then sweeps whatever still runs from its directory
    /// (balancer's nginx masters once the controller has stopped them, or after a failure).
    fn stop_nginx(&mut self) {
        if let Some(mut master) = self.nginx_master.take() {
            nginx::stop_master(&mut master);
        }
        if let Some(dir) = self.nginx_dir.take() {
            let left = nginx::sweep(&dir);
            if left > 0 {
                eprintln!(
                    "{}: killed {left} nginx process(es) left running",
                    dir.display()
                );
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
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
        self.stop_nginx();
    }
}
