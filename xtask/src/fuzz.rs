//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/`, each for a bounded time on its
//! checked-in corpus `fuzz/corpus/<target>`, with a table of executions and crashes.
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{output, sh, step};

/// The cargo-fuzz release the targets are run with (installed when missing).
const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// The fuzz targets (`fuzz/fuzz_targets/<name>.rs`).
const TARGETS: [&str; 2] = ["control_frame", "cli_args"];

/// Where new inputs go: the checked-in corpus (a fuzzing session grows it, then minimises it
/// for a commit), or a scratch directory (the test suite's pass leaves the tree unchanged).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Corpus {
    Grow,
    ReadOnly,
}

/// What one target's run found.
struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    /// The input that crashed the target, if one did.
    artifact: Option<PathBuf>,
    /// The corpus after the run: files, bytes.
    corpus: (usize, u64),
}

/// Installs the pinned cargo-fuzz when `cargo fuzz` is missing or another version.
fn install_cargo_fuzz() -> Result<()> {
    let version = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if version.contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 30 s)"
    ));
    sh(Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["install", "cargo-fuzz", "--locked", "--version"])
        .arg(CARGO_FUZZ_VERSION))
    .context("installing cargo-fuzz")
}

/// `cargo +nightly fuzz SUBCOMMAND` for `fuzz/`, without the panic-catching sanitizers (the
/// targets look for panics and wrong answers in safe Rust), building into the shared target
/// directory.
fn cargo_fuzz(root: &Path, target_dir: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", "fuzz", subcommand, "--fuzz-dir", "fuzz"])
        .args(["--sanitizer", "none", "--target-dir"])
        .arg(target_dir.join("fuzz"));
    // The outer (stable) cargo's settings must not leak into the nightly build; nor must the
    // eBPF object, which the targets do not load.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "BALANCER_EBPF_OBJ",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Installs cargo-fuzz if needed, builds the targets, runs each for `seconds`, and fails
/// with the crashing input's path if any target crashed.
pub fn fuzz(root: &Path, target_dir: &Path, seconds: u32, corpus: Corpus) -> Result<()> {
    install_cargo_fuzz()?;
    step("building the fuzz targets (nightly, libFuzzer)");
    sh(&mut cargo_fuzz(root, target_dir, "build"))?;
    let mut outcomes = Vec::new();
    for target in TARGETS {
        step(&format!("fuzzing {target} for {seconds} s"));
        outcomes.push(run_target(root, target_dir, target, seconds, corpus)?);
    }
    println!(
        "{:<14} {:>8} {:>12} {:>8} {:>18}",
        "target", "seconds", "executions", "crashes", "corpus"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>8} {:>12} {:>8} {:>18}",
            o.target,
            seconds,
            o.executions.map_or("?".into(), |n| n.to_string()),
            u8::from(o.artifact.is_some()),
            format!("{} files, {} KiB", o.corpus.0, o.corpus.1.div_ceil(1024)),
        );
    }
    let crashes: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.artifact
                .as_ref()
                .map(|a| format!("{}: {}", o.target, a.display()))
        })
        .collect();
    if !crashes.is_empty() {
        bail!(
            "fuzzing found a crash; reproduce it with `cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none TARGET ARTIFACT`, fix it, and add the input as a unit test:\n  {}",
            crashes.join("\n  ")
        );
    }
    Ok(())
}

fn run_target(
    root: &Path,
    target_dir: &Path,
    target: &'static str,
    seconds: u32,
    corpus: Corpus,
) -> Result<Outcome> {
    let checked_in = root.join("fuzz/corpus").join(target);
    // libFuzzer writes new inputs to the first corpus directory only.
    let scratch =
        std::env::temp_dir().join(format!("balancer-fuzz-{target}-{}", std::process::id()));
    let mut cmd = cargo_fuzz(root, target_dir, "run");
    cmd.arg(target);
    if corpus == Corpus::ReadOnly {
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        cmd.arg(&scratch);
    }
    cmd.arg(&checked_in).args([
        "--",
        &format!("-max_total_time={seconds}"),
        // A hang is a finding too.
        "-timeout=10",
        "-print_final_stats=1",
    ]);
    let started = Instant::now();
    let (executions, artifact, status) = watch(root, &mut cmd)?;
    if corpus == Corpus::ReadOnly {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    if artifact.is_none() && !status.success() {
        bail!("fuzzing {target} failed ({status}) without writing a crashing input: see above");
    }
    if corpus == Corpus::Grow && artifact.is_none() {
        step(&format!("minimising the {target} corpus"));
        minimise(target_dir, target, &checked_in, &scratch)?;
    }
    eprintln!(
        "xtask: {target}: {} executions in {:.0?}",
        executions.map_or("?".into(), |n| n.to_string()),
        started.elapsed()
    );
    Ok(Outcome {
        target,
        executions,
        artifact,
        corpus: corpus_size(&checked_in)?,
    })
}

/// Keeps only the inputs of `corpus` that add coverage (libFuzzer's `-merge=1`, what `cargo
/// fuzz cmin` does, but with the binary just built: `cmin` builds with other settings, which
/// would rebuild everything).
fn minimise(target_dir: &Path, target: &str, corpus: &Path, scratch: &Path) -> Result<()> {
    let binary = target_dir
        .join("fuzz/x86_64-unknown-linux-gnu/release")
        .join(target);
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let merged = sh(Command::new(&binary)
        .arg("-merge=1")
        .arg(scratch)
        .arg(corpus)
        .stdout(Stdio::null())
        .stderr(Stdio::null()));
    let replaced = merged.and_then(|()| {
        std::fs::remove_dir_all(corpus)?;
        // A rename does not cross filesystems (the scratch directory is in /tmp).
        std::fs::create_dir_all(corpus)?;
        for entry in std::fs::read_dir(scratch)? {
            let entry = entry?;
            std::fs::copy(entry.path(), corpus.join(entry.file_name()))?;
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(scratch);
    replaced.with_context(|| format!("minimising {}", corpus.display()))
}

/// Runs libFuzzer, showing its progress lines (pulses, the final stats, anything that is not
/// a new-coverage line), and reads the executions and the crashing input from its output.
fn watch(
    root: &Path,
    cmd: &mut Command,
) -> Result<(Option<u64>, Option<PathBuf>, std::process::ExitStatus)> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let err = child.stderr.take().context("libFuzzer's output")?;
    let mut executions = None;
    let mut artifact = None;
    let mut stderr = std::io::stderr().lock();
    for line in BufReader::new(err).lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            executions = n.trim().parse().ok();
        }
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            artifact = Some(root.join(path.trim()));
        }
        // Each new-coverage line is one of hundreds: keep the log readable.
        let noisy = (line.starts_with('#')
            && (line.contains("\tNEW ") || line.contains("\tREDUCE ")))
            || line.starts_with("\tNEW_FUNC");
        if !noisy {
            writeln!(stderr, "{line}")?;
        }
    }
    let status = child.wait()?;
    Ok((executions, artifact, status))
}

/// Files and bytes in a corpus directory.
fn corpus_size(dir: &Path) -> Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}
