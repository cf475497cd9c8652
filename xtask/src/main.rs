//! `cargo xtask`: installs the eBPF toolchain, builds the program and the controller, runs the
//! balancer and runs the whole test suite.
use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod apt;
mod dist;
mod fuzz;
mod soak;

use apt::{apt_install, cannot_apt, install_test_tools};

/// Build, setup and test tasks for balancer.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    after_help = "Examples:\n  cargo xtask setup\n  cargo xtask run\n  cargo xtask run -- --listen 127.0.0.1:9000 --policy hash\n  cargo xtask test\n  cargo xtask dist\n  cargo xtask soak --seconds 60\n  cargo xtask soak --seed 1234   # replay a run's events\n  cargo xtask fuzz --seconds 300"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF program and running the tests need (idempotent): nightly
    /// rust-src, LLVM 22, bpf-linker 0.13, nftables, and the real servers the tests run as
    /// workers (nginx-light, lighttpd, gunicorn) and wrk, their system services not started.
    Setup,
    /// Build the eBPF object and the `balancer` binary that embeds it.
    Build {
        /// Optimised controller build.
        #[arg(long)]
        release: bool,
    },
    /// Set up and build if needed, then `balancer run ARGS` as root (via sudo when not root).
    Run {
        /// Optimised controller build.
        #[arg(long)]
        release: bool,
        /// Arguments for `balancer run` [default: the demo worker on 127.0.0.1:8080, one worker per CPU, policy cpu].
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// fmt check, clippy -D warnings, unit tests, then the privileged integration tests, the
    /// .deb (built, unpacked, installed and removed), the benchmark's smoke pass, a 20 s chaos
    /// soak (as root) and a short fuzzing pass.
    Test,
    /// Run the cargo-fuzz targets (control frames, CLI arguments) for a bounded time each on
    /// fuzz/corpus/<target>, growing and then minimising the corpus; fails on a crash with
    /// the crashing input's path. Installs cargo-fuzz when missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "N", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=86_400))]
        seconds: u32,
    },
    /// Build the Debian package: the release binary with the eBPF object, man pages, shell
    /// completions and the systemd unit, as target/dist/balancer_<version>_<arch>.deb.
    Dist,
    /// Benchmark balancer against the setups users would pick instead, with the demo worker
    /// and with nginx (measured by wrk too); writes bench/results/<date>/ and
    /// docs/performance.md.
    Bench {
        /// About one minute: one run per arm, short scenarios.
        #[arg(long)]
        quick: bool,
    },
    /// Chaos soak: load while workers are killed, stopped and continued, the policy flips,
    /// the group scales, drains, restarts and its controller is killed and upgraded; fails if
    /// a connection fails that no killed worker held. Writes bench/results/<date>/soak.md.
    Soak {
        /// How long to make events for.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Replay the events of an earlier run (its output prints the seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Print the summary as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: [&str; 2] = ["llvm-22-dev", "libpolly-22-dev"];
/// Seconds per fuzz target in `cargo xtask test`: enough to replay the corpus and explore a
/// little, within the CI budget.
const FUZZ_TEST_SECONDS: u32 = 15;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup().and_then(|()| install_test_tools()),
        Task::Build { release } => setup().and_then(|()| build(release).map(drop)),
        Task::Run { release, args } => setup().and_then(|()| run(release, args)),
        Task::Test => setup()
            .and_then(|()| install_test_tools())
            .and_then(|()| test()),
        Task::Dist => setup()
            .and_then(|()| install_test_tools())
            .and_then(|()| dist::run()),
        Task::Bench { quick } => setup().and_then(|()| bench(quick)),
        Task::Soak {
            seconds,
            seed,
            json,
        } => setup().and_then(|()| soak::run(seconds, seed, json)),
        Task::Fuzz { seconds } => {
            fuzz::fuzz(&root_dir(), &target_dir(), seconds, fuzz::Corpus::Grow)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// Runs a command, failing with its command line when it fails.
pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Test totals, summed over every `test result:` line cargo printed.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

/// Runs a `cargo test` command, passing its output through, and adds up its results.
fn sh_tests(cmd: &mut Command, totals: &mut Totals) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let out = child.stdout.take().context("test output")?;
    let mut stdout = std::io::stdout().lock();
    for line in BufReader::new(out).lines() {
        let line = line?;
        writeln!(stdout, "{line}")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .strip_suffix(what)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            totals.passed += count("passed");
            totals.failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs only what is missing, saying what it does.
fn setup() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        step("installing the nightly toolchain (the eBPF program needs -Z build-std)");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context(
            "the eBPF build needs a nightly toolchain: run `rustup toolchain install nightly`",
        )?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step("installing rust-src for nightly (to build core for the BPF target)");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if linker.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists()
        || !Path::new(LLVM_PREFIX).join("lib/libPolly.a").exists()
    {
        install_llvm()?;
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    sh(Command::new("cargo")
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))
    .context("installing bpf-linker")?;
    Ok(())
}

fn install_llvm() -> Result<()> {
    if let Some(who) = cannot_apt() {
        bail!(
            "bpf-linker needs LLVM 22, which is not installed, and this {who} cannot install it. Run:\n  \
sudo apt-get update\n  sudo apt-get install -y {}\n  LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
--version {BPF_LINKER_VERSION} --no-default-features --features llvm-22\nthen `cargo xtask setup` again",
            LLVM_PACKAGES.join(" ")
        );
    }
    apt_install(&LLVM_PACKAGES, &[], apt::Services::MayStart)
}

/// The controller's target directory (honours CARGO_TARGET_DIR like cargo does).
pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"))
}

/// A nightly cargo command for the eBPF crate: `cargo +nightly SUBCOMMAND` for the BPF target.
fn ebpf_cargo(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root_dir().join("balancer-ebpf"))
        .args(["+nightly", subcommand, "--release", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir().join("bpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        );
    // The outer (stable) cargo's settings must not leak into the nightly build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds the eBPF object; returns its path.
pub(crate) fn build_ebpf() -> Result<PathBuf> {
    step("building the eBPF program");
    sh(&mut ebpf_cargo("build"))?;
    Ok(target_dir()
        .join("bpf")
        .join(BPF_TARGET)
        .join("release")
        .join("balancer"))
}

/// Builds the eBPF object and the controller with it embedded; returns the binary's path.
fn build(release: bool) -> Result<PathBuf> {
    let object = build_ebpf()?;
    step("building the controller");
    let mut cmd = cargo_with_object(&object);
    cmd.args(["build", "-p", "balancer"]);
    if release {
        cmd.arg("--release");
    }
    sh(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("balancer"))
}

pub(crate) fn cargo_with_object(object: &Path) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root_dir()).env("BALANCER_EBPF_OBJ", object);
    cmd
}

fn run(release: bool, args: Vec<OsString>) -> Result<()> {
    let binary = build(release)?;
    let mut cmd = if is_root() {
        Command::new(&binary)
    } else if Path::new("/usr/bin/sudo").exists() {
        step("balancer needs root (CAP_BPF): running it with sudo");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&binary);
        c
    } else {
        bail!(
            "balancer needs root (CAP_BPF) and sudo is not installed: run {} run as root",
            binary.display()
        );
    };
    cmd.arg("run").args(args);
    // Become the balancer, so that Ctrl-C and SIGTERM reach it directly.
    Err(cmd.exec()).with_context(|| format!("executing {}", binary.display()))
}

fn test() -> Result<()> {
    let root = root_dir();
    let object = build_ebpf()?;
    step("cargo fmt --check");
    sh(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))?;
    sh(Command::new("cargo").current_dir(&root).args([
        "fmt",
        "--manifest-path",
        "balancer-ebpf/Cargo.toml",
        "--check",
    ]))?;
    sh(Command::new("cargo").current_dir(&root).args([
        "fmt",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--check",
    ]))?;
    step("cargo clippy -D warnings");
    sh(ebpf_cargo("clippy").args(["--", "-D", "warnings"]))?;
    sh(cargo_with_object(&object).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("unit tests");
    let mut totals = Totals::default();
    sh_tests(
        cargo_with_object(&object).args(["test", "--workspace", "--exclude", "balancer-tests"]),
        &mut totals,
    )?;
    step("building the controller for the integration tests");
    let mut b = cargo_with_object(&object);
    sh(b.args(["build", "-p", "balancer"]))?;
    let binary = target_dir().join("debug").join("balancer");
    step("privileged integration tests (real sockets, real eBPF, real workers)");
    let mut cmd = cargo_with_object(&object);
    cmd.env("BALANCER_BIN", &binary)
        .args(["test", "-p", "balancer-tests"]);
    if !is_root() {
        if !Path::new("/usr/bin/sudo").exists() {
            bail!("the integration tests load eBPF and need root; sudo is not installed: run `cargo xtask test` as root");
        }
        // Cargo builds as this user; only the test binaries run as root.
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    sh_tests(&mut cmd, &mut totals)?;
    step("the Debian package, from the debug build (`cargo xtask dist` packages the release one)");
    dist::test_pass(&binary)?;
    step("benchmark smoke pass (correctness only, no timing)");
    let scratch = env::temp_dir().join(format!("balancer-bench-smoke-{}", std::process::id()));
    let result = run_bench(
        &object,
        &binary,
        false,
        &["--smoke", "--out"],
        &scratch,
        None,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    step("chaos soak, 20 s (no file written; fails on any failure no killed worker held)");
    soak::test_pass(&object)?;
    step(&format!(
        "fuzzing pass ({FUZZ_TEST_SECONDS} s per target; `cargo xtask fuzz` runs longer)"
    ));
    fuzz::fuzz(
        &root,
        &target_dir(),
        FUZZ_TEST_SECONDS,
        fuzz::Corpus::ReadOnly,
    )?;
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    Ok(())
}

/// The eBPF object, then release builds of the controller and the bench crate's binaries
/// (the benchmark, the soak); returns the object's path.
fn build_release_tools(what: &str) -> Result<PathBuf> {
    let object = build_ebpf()?;
    step(&format!("building the release controller and {what}"));
    sh(cargo_with_object(&object).args([
        "build",
        "--release",
        "-p",
        "balancer",
        "-p",
        "balancer-bench",
    ]))?;
    Ok(object)
}

fn bench(quick: bool) -> Result<()> {
    let object = build_release_tools("the benchmark")?;
    let binary = target_dir().join("release").join("balancer");
    let mode: &[&str] = if quick {
        &["--quick", "--out"]
    } else {
        &["--out"]
    };
    // Only a full run may replace the published figures.
    let docs = (!quick).then(|| root_dir().join("docs/performance.md"));
    run_bench(
        &object,
        &binary,
        true,
        mode,
        &root_dir().join("bench/results"),
        docs.as_deref(),
    )
}

/// Builds (debug unless `release`) and runs the benchmark binary as root.
fn run_bench(
    object: &Path,
    balancer: &Path,
    release: bool,
    mode: &[&str],
    out: &Path,
    docs: Option<&Path>,
) -> Result<()> {
    let profile = if release { "release" } else { "debug" };
    if !release {
        sh(cargo_with_object(object).args(["build", "-p", "balancer-bench"]))?;
    }
    let bench = target_dir().join(profile).join("balancer-bench");
    let mut cmd = soak::as_root(&bench, "the benchmark")?;
    cmd.arg("--balancer")
        .arg(balancer)
        .arg("--object")
        .arg(object)
        .args(mode)
        .arg(out);
    if let Some(docs) = docs {
        cmd.arg("--docs").arg(docs);
    }
    sh(&mut cmd)
}
