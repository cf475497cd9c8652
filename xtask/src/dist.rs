//! `cargo xtask dist` and the package's pass in `cargo xtask test`: the Debian package (binary,
//! man pages, shell completions, systemd unit), built with `dpkg-deb --build` from a staged
//! tree, so that nothing beyond dpkg's own tools is needed.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{is_root, root_dir, sh, step, target_dir};

const PACKAGE: &str = "balancer";
/// There is no mailing list; `.invalid` says so instead of inventing an address.
const MAINTAINER: &str = "balancer maintainers <maintainers@balancer.invalid>";
const LONG_DESCRIPTION: &str = "balancer owns a SO_REUSEPORT group: one listening socket per \
worker slot on every listen address. An SK_REUSEPORT eBPF program picks the socket for each new \
connection (by RX CPU, flow hash, round-robin or accept-queue load), and a supervisor hands each \
slot's socket to its worker by systemd socket activation and respawns it on the same socket, so \
no queued connection is lost. The systemd unit is installed but not enabled: set its worker \
command with `systemctl edit balancer` first.";
/// Where the package puts each file, and its mode. The unit's ExecStart names BINARY.
const BINARY: &str = "usr/bin/balancer";
const MAN_DIR: &str = "usr/share/man/man1";
const UNIT: &str = "lib/systemd/system/balancer.service";
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/balancer"),
    ("zsh", "usr/share/zsh/vendor-completions/_balancer"),
    ("fish", "usr/share/fish/vendor_completions.d/balancer.fish"),
];
const COPYRIGHT: &str = "usr/share/doc/balancer/copyright";
/// How long an install or removal waits for another dpkg or apt run to let go of the lock.
const DPKG_LOCK_WAIT: Duration = Duration::from_secs(120);

/// `cargo xtask dist`: the release build (with the eBPF object), packaged into
/// target/dist/balancer_<version>_<arch>.deb, then checked by unpacking it.
pub(crate) fn run() -> Result<()> {
    let binary = crate::build(true)?;
    let dist = target_dir().join("dist");
    let deb = build_deb(&binary, &dist.join("stage"), &dist)?;
    check_unpacked(&deb)?;
    println!("{}", deb.display());
    Ok(())
}

/// The package's pass in `cargo xtask test`: packages `binary` (the debug build the integration
/// tests used: a release build would add minutes, and the packaging is the same), checks the
/// unpacked package, then installs it for real and removes it when that cannot clobber
/// anything.
pub(crate) fn test_pass(binary: &Path) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("balancer-dist-{}", std::process::id()));
    let result = build_deb(binary, &scratch.join("stage"), &scratch).and_then(|deb| {
        check_unpacked(&deb)?;
        check_installed(&deb)
    });
    let _ = fs::remove_dir_all(&scratch);
    result
}

/// The crate's version, as Debian orders it: a pre-release (`1.0.0-rc.1`) sorts before its
/// release with `~`.
fn version() -> Result<String> {
    Ok(manifest_field("balancer/Cargo.toml", "[package]", "version")?.replace('-', "~"))
}

/// A plain string field (`name = "value"`) of `table` in the manifest at `rel`.
fn manifest_field(rel: &str, table: &str, name: &str) -> Result<String> {
    let path = root_dir().join(rel);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .skip_while(|l| l.trim() != table)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
        })
        .with_context(|| {
            format!(
                "{} has no `{name} = \"...\"` in {table}: the package takes it from there",
                path.display()
            )
        })
}

fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `contents` to `root/rel` with `mode`, creating the directories (0755).
fn put(root: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<PathBuf> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(path)
}

/// Stages the package tree under `work` and builds `out/balancer_<version>_<arch>.deb`.
fn build_deb(binary: &Path, work: &Path, out: &Path) -> Result<PathBuf> {
    let version = version()?;
    let arch = output_of(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    step(&format!(
        "packaging {} as {PACKAGE} {version} ({arch})",
        binary.display()
    ));
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    // dpkg-shlibdeps wants a source package around the tree: work/debian/{control,balancer/}.
    let root = work.join("debian").join(PACKAGE);
    put(
        &work.join("debian"),
        "control",
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n").as_bytes(),
        0o644,
    )?;
    let staged = put(&root, BINARY, &[], 0o755)?;
    // Stripped like dh_strip does: the symbols are most of a debug build's size.
    sh(Command::new("strip")
        .args(["--strip-unneeded", "--remove-section=.comment", "-o"])
        .arg(&staged)
        .arg(binary))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
    // Generated by the packaged binary itself, from its own CLI definition.
    let man_dir = root.join(MAN_DIR);
    sh(Command::new(&staged)
        .arg("__man")
        .arg(&man_dir)
        .stdout(std::process::Stdio::null()))?;
    let pages: Vec<PathBuf> = fs::read_dir(&man_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    ensure!(
        !pages.is_empty(),
        "`balancer __man` wrote no page into {}",
        man_dir.display()
    );
    // -n: no name or time stamp inside, so the same pages give the same bytes.
    sh(Command::new("gzip").args(["-9", "-n", "--"]).args(&pages))?;
    for (shell, rel) in COMPLETIONS {
        let script = output_of(Command::new(&staged).args(["completions", shell]))?;
        put(&root, rel, script.as_bytes(), 0o644)?;
    }
    let unit = root_dir().join("docs/systemd/balancer.service");
    put(
        &root,
        UNIT,
        &fs::read(&unit).with_context(|| format!("reading {}", unit.display()))?,
        0o644,
    )?;
    let license = manifest_field("Cargo.toml", "[workspace.package]", "license")?;
    // Free-form, as Debian policy allows: the name and the licence terms' names.
    let copyright = format!("{PACKAGE}\n\nLicense: {license}\n");
    put(&root, COPYRIGHT, copyright.as_bytes(), 0o644)?;
    // The libraries the binary links and the oldest versions with every symbol it uses, as
    // dpkg-shlibdeps reads them from the system's packages (libc6 and libgcc-s1 here).
    let shlibs = output_of(
        Command::new("dpkg-shlibdeps")
            .current_dir(work)
            .args(["-O", "-e"])
            .arg(Path::new("debian").join(PACKAGE).join(BINARY)),
    )?;
    let depends = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .filter(|d| d.contains("libc6"))
        .with_context(|| format!("dpkg-shlibdeps found no libc6 dependency: {shlibs}"))?
        .to_owned();
    let description = manifest_field("balancer/Cargo.toml", "[package]", "description")?;
    let control = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
Installed-Size: {}\nDepends: {depends}\nSection: net\nPriority: optional\nDescription: {description}\n{}\n",
        installed_kib(&root)?,
        wrap(LONG_DESCRIPTION),
    );
    put(&root, "DEBIAN/control", control.as_bytes(), 0o644)?;
    fs::create_dir_all(out)?;
    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    sh(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb))?;
    Ok(deb)
}

/// The control file's extended description: lines of at most 76 characters, each starting
/// with the one space that marks a continuation line.
fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut len = 0;
    for word in text.split_whitespace() {
        if len > 0 && len + 1 + word.len() > 76 {
            out.push('\n');
            len = 0;
        }
        out.push(' ');
        out.push_str(word);
        len += 1 + word.len();
    }
    out
}

/// Installed-Size as dpkg-gencontrol counts it: KiB per file rounded up, one per directory.
fn installed_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if entry.file_name() == "DEBIAN" {
            continue;
        }
        total += if meta.is_dir() {
            1 + installed_kib(&entry.path())?
        } else {
            meta.len().div_ceil(1024)
        };
    }
    Ok(total)
}

/// What the package must hold: path (as `dpkg-deb -c` lists it) and mode.
fn expected_files() -> Vec<(String, &'static str)> {
    let mut files = vec![
        (format!("./{BINARY}"), "-rwxr-xr-x"),
        (format!("./{MAN_DIR}/balancer.1.gz"), "-rw-r--r--"),
        (format!("./{MAN_DIR}/balancer-run.1.gz"), "-rw-r--r--"),
        (format!("./{UNIT}"), "-rw-r--r--"),
        (format!("./{COPYRIGHT}"), "-rw-r--r--"),
    ];
    files.extend(COMPLETIONS.map(|(_, rel)| (format!("./{rel}"), "-rw-r--r--")));
    files
}

/// Checks the package without installing it: its control fields, its file list (paths, modes,
/// root ownership), and, unpacked, that the binary runs and says the crate's version, the man
/// page and completions are there and the unit starts the packaged binary.
fn check_unpacked(deb: &Path) -> Result<()> {
    step(&format!("checking {}", deb.display()));
    let version = version()?;
    let fields = output_of(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(deb)
            .args(["Package", "Version", "Depends"]),
    )?;
    for want in [
        format!("Package: {PACKAGE}"),
        format!("Version: {version}"),
        "Depends: libc6 (>= ".to_owned(),
    ] {
        ensure!(
            fields.contains(&want),
            "{}: control lacks {want:?}:\n{fields}",
            deb.display()
        );
    }
    let listing = output_of(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    for (path, mode) in expected_files() {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().last() == Some(path.as_str()))
            .with_context(|| format!("{} lacks {path}:\n{listing}", deb.display()))?;
        ensure!(
            line.starts_with(mode) && line.contains("root/root"),
            "{path}: want {mode} root/root, got {line}"
        );
    }
    let dir = deb.with_extension("unpacked");
    let _ = fs::remove_dir_all(&dir);
    sh(Command::new("dpkg").arg("--extract").arg(deb).arg(&dir))?;
    let result = check_tree(&dir, &version);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Checks an unpacked (or installed, `root` = /) package tree.
fn check_tree(root: &Path, version: &str) -> Result<()> {
    let said = output_of(Command::new(root.join(BINARY)).arg("--version"))?;
    ensure!(
        said.trim() == format!("{PACKAGE} {version}"),
        "{BINARY} --version said {said:?}, want \"{PACKAGE} {version}\""
    );
    let page = output_of(
        Command::new("gzip")
            .arg("-dc")
            .arg(root.join(MAN_DIR).join("balancer.1.gz")),
    )?;
    ensure!(
        page.contains(".TH balancer 1"),
        "balancer.1.gz is not the balancer(1) page:\n{page}"
    );
    for (shell, rel) in COMPLETIONS {
        let script = fs::read_to_string(root.join(rel))?;
        ensure!(
            script.contains("status") && script.contains("workers"),
            "the {shell} completions lack the subcommands:\n{script}"
        );
    }
    // The unit must start (and reload) the binary where the package puts it.
    let unit = fs::read_to_string(root.join(UNIT))?;
    for key in ["ExecStart=", "ExecReload="] {
        let program = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|cmd| cmd.split_whitespace().next())
            .with_context(|| format!("{UNIT} has no {key}"))?;
        ensure!(
            program == format!("/{BINARY}"),
            "{UNIT}: {key}{program}, but the package installs /{BINARY}"
        );
    }
    Ok(())
}

/// Installs the package for real, checks it from /, and removes it (also when a check fails).
/// Only where that cannot clobber anything: as root, with no `balancer` package installed and no
/// /usr/bin/balancer of the operator's (dpkg would overwrite it, and its removal delete it).
fn check_installed(deb: &Path) -> Result<()> {
    // Empty (never known) or not-installed: dpkg has no files of ours to lose.
    let status = output_of(Command::new("dpkg-query").args([
        "--show",
        "--showformat=${db:Status-Status}",
        PACKAGE,
    ]))
    .unwrap_or_default();
    let why_not = if !is_root() {
        Some("not root".to_owned())
    } else if !status.is_empty() && status != "not-installed" {
        Some(format!("dpkg has a {PACKAGE} package ({status}) already"))
    } else if let Some((path, _)) = expected_files()
        .into_iter()
        .find(|(rel, _)| Path::new("/").join(rel).exists())
    {
        // Not ours (no balancer package is installed): dpkg -i would overwrite it and the
        // purge delete it.
        Some(format!(
            "{} exists and is no package's",
            Path::new("/").join(&path).display()
        ))
    } else {
        None
    };
    if let Some(why) = why_not {
        step(&format!(
            "not installing the package for real: {why} (checked unpacked only)"
        ));
        return Ok(());
    }
    step("installing the package (dpkg -i), then removing it");
    let installed = Installed;
    dpkg(&["--install"], deb)?;
    check_tree(Path::new("/"), &version()?)?;
    // The installed binary itself (PATH may find another copy first).
    let installed_binary = Path::new("/").join(BINARY);
    let said = output_of(Command::new(&installed_binary).arg("--version"))?;
    ensure!(
        said.trim() == format!("{PACKAGE} {}", version()?),
        "`{} --version` said {said:?}",
        installed_binary.display()
    );
    drop(installed);
    ensure!(
        !Path::new("/").join(BINARY).exists(),
        "dpkg -r {PACKAGE} left /{BINARY}"
    );
    Ok(())
}

/// Removes the installed package when dropped.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = dpkg(&["--purge"], Path::new(PACKAGE)) {
            eprintln!(
                "xtask: removing the test install failed: {e:#}; run `dpkg --purge {PACKAGE}`"
            );
        }
    }
}

/// `dpkg ARGS target`, waiting (bounded) while another dpkg or apt run holds dpkg's lock.
fn dpkg(args: &[&str], target: &Path) -> Result<()> {
    let deadline = Instant::now() + DPKG_LOCK_WAIT;
    loop {
        let out: Output = Command::new("dpkg").args(args).arg(target).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Ok(());
        }
        if !stderr.contains("lock") || Instant::now() >= deadline {
            bail!(
                "dpkg {} {} failed ({}): {}",
                args.join(" "),
                target.display(),
                out.status,
                stderr.trim()
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_description_is_continuation_lines_of_at_most_76_characters() {
        let text = wrap(LONG_DESCRIPTION);
        assert!(text.lines().count() > 1);
        for line in text.lines() {
            assert!(line.starts_with(' ') && !line.starts_with("  "), "{line:?}");
            assert!(line.len() <= 76, "{line:?}");
        }
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            LONG_DESCRIPTION.split_whitespace().collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_version_and_fields_come_from_the_manifests() {
        let version = version().unwrap();
        assert!(!version.is_empty() && !version.contains('-'), "{version}");
        let license = manifest_field("Cargo.toml", "[workspace.package]", "license").unwrap();
        assert!(license.contains("MIT"), "{license}");
        let err = manifest_field("balancer/Cargo.toml", "[package]", "homepage").unwrap_err();
        assert!(err.to_string().contains("homepage"), "{err}");
    }
}
