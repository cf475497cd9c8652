//! Debian packages: what the tests need besides the balancer, installed with apt-get when
//! missing, and a `policy-rc.d` that keeps the servers' system services from starting (the
//! tests start their own, on ports of their choosing).
use std::{
    env,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{is_root, sh, step};

/// What the privileged tests run besides the balancer: (command, Debian package). `nft` holds
/// connections half-open for the migration tests; nginx, lighttpd and gunicorn are the real
/// servers run as workers; `wrk` is the benchmark's real client; `dpkg-shlibdeps` and `strip`
/// build the .deb (`cargo xtask dist`, and its pass in the tests).
const TEST_TOOLS: [(&str, &str); 7] = [
    ("nft", "nftables"),
    ("nginx", "nginx-light"),
    ("lighttpd", "lighttpd"),
    ("gunicorn", "gunicorn"),
    ("wrk", "wrk"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
];

/// Where invoke-rc.d asks whether a package's service may start (Debian policy).
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// The line that marks a policy-rc.d as one of ours.
const MARKER: &str =
    "# cargo xtask setup: the test servers' services do not start during its apt-get install";

/// Whether the installed packages' services may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Services {
    /// As the packages do by default (LLVM has none).
    MayStart,
    /// Never: a policy-rc.d answers 101 ("action forbidden") for the install's duration.
    Forbidden,
}

/// Installs the Debian packages of the [`TEST_TOOLS`] whose command is missing.
pub fn install_test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(command, _)| !installed(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if let Some(who) = cannot_apt() {
        bail!(
            "the integration tests need {} (half-open connections, real servers as workers, a real \
client), which is not installed, and this {who} cannot install it. Run:\n  sudo apt-get update\n  \
sudo apt-get install -y --no-install-recommends {}\nthen `cargo xtask setup` again",
            missing.join(" "),
            missing.join(" ")
        );
    }
    apt_install(&missing, &["--no-install-recommends"], Services::Forbidden)
}

/// Why apt-get cannot install packages here ("non-root user", "system (no apt-get)"), if so.
pub fn cannot_apt() -> Option<&'static str> {
    if !Path::new("/usr/bin/apt-get").exists() {
        Some("system (no apt-get)")
    } else if !is_root() {
        Some("non-root user")
    } else {
        None
    }
}

/// `apt-get install OPTIONS PACKAGES`, after refreshing the package lists.
pub fn apt_install(packages: &[&str], options: &[&str], services: Services) -> Result<()> {
    step(&format!("installing {} with apt-get", packages.join(" ")));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    // Only for the install itself: nothing else is refused meanwhile for longer than needed.
    let _policy = match services {
        Services::Forbidden => Some(NoServices::install(Path::new(POLICY_RC_D))?),
        Services::MayStart => None,
    };
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(options)
        .args(packages))
}

/// A policy-rc.d that forbids every service start, removed on drop if this created it (an
/// existing one, e.g. a container image's, is the system's and stays as it is).
struct NoServices {
    created: Option<PathBuf>,
}

impl NoServices {
    /// At `path` (the system's [`POLICY_RC_D`]; a scratch path in the tests).
    fn install(path: &Path) -> Result<Self> {
        // One an earlier run left behind (killed before its drop) is ours to replace.
        if std::fs::read_to_string(path).is_ok_and(|text| text.contains(MARKER)) {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the leftover {}", path.display()))?;
        }
        // create_new: one that exists (or appears meanwhile) is never overwritten.
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok(Self { created: None })
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        step("policy-rc.d: no service starts during the install (the tests start their own)");
        let created = Self {
            created: Some(path.to_path_buf()),
        };
        file.write_all(
            format!(
                "#!/bin/sh\n{MARKER}\n# Only the test servers' services are refused; any other may start.\n\
                 for a in \"$@\"; do case \"$a\" in nginx|lighttpd|gunicorn) exit 101;; esac; done\nexit 0\n"
            )
            .as_bytes(),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(created)
    }
}

impl Drop for NoServices {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            if let Err(e) = std::fs::remove_file(path) {
                eprintln!(
                    "xtask: cannot remove {}: {e}; remove it by hand, or services will never start on install",
                    path.display()
                );
            }
        }
    }
}

/// Whether `command` is in PATH or in the system directories root's PATH has (sudo's too).
fn installed(command: &str) -> bool {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .any(|dir| dir.join(command).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rc_d_forbids_starts_and_goes_only_if_it_was_ours() {
        let dir = env::temp_dir().join(format!("xtask-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy-rc.d");
        let run = |args: &[&str]| Command::new(&path).args(args).status().unwrap().code();
        {
            let _guard = NoServices::install(&path).unwrap();
            // As invoke-rc.d asks: `policy-rc.d [options] <service> <actions>`.
            assert_eq!(
                run(&["nginx", "start"]),
                Some(101),
                "nginx's start forbidden"
            );
            assert_eq!(run(&["--quiet", "lighttpd", "start"]), Some(101));
            assert_eq!(
                run(&["ssh", "restart"]),
                Some(0),
                "any other service may start"
            );
        }
        assert!(!path.exists(), "the one it created is removed");
        // One a killed run left (its marker line) is replaced, and removed again.
        std::fs::write(&path, format!("#!/bin/sh\n{MARKER}\nexit 101\n")).unwrap();
        drop(NoServices::install(&path).unwrap());
        assert!(!path.exists(), "a leftover of ours is not kept");
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        drop(NoServices::install(&path).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "#!/bin/sh\nexit 0\n",
            "an existing one is left as it was"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
