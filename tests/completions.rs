//! `balancer completions SHELL`: a script that completes the real subcommands, on stdout; an
//! unknown shell is refused with the shells there are; a reader that goes away is an error, not
//! a panic. No root needed.
use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use balancer_tests::{balancer_bin, kill_tagged, new_tag, run_to_end, wait_timeout, TAG_VAR};

#[test]
fn every_shell_gets_a_script_naming_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let f = run_to_end(&["completions", shell], |_| {});
        assert!(f.status.success(), "{shell}: {}", f.stderr);
        assert!(!f.stdout.trim().is_empty(), "{shell}: empty script");
        for word in [
            "run", "status", "workers", "restart", "scale", "drain", "listen",
        ] {
            assert!(f.stdout.contains(word), "{shell} script lacks {word}");
        }
        for internal in ["__exec-worker", "__man"] {
            assert!(
                !f.stdout.contains(internal),
                "{shell} script offers {internal}"
            );
        }
        if shell == "bash" {
            // The script must at least parse, as bash-completion sources it.
            let mut check = Command::new("bash")
                .arg("-n")
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start bash -n");
            check
                .stdin
                .take()
                .unwrap()
                .write_all(f.stdout.as_bytes())
                .unwrap();
            let out = check.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(f.stdout.contains("complete -F _balancer"), "not registered");
        }
    }
}

#[test]
fn an_unknown_shell_is_refused_with_the_shells_there_are() {
    for args in [&["completions", "tcsh"][..], &["completions"][..]] {
        let f = run_to_end(args, |_| {});
        assert_eq!(f.status.code(), Some(2), "{args:?}: {}", f.stderr);
        assert!(
            f.stdout.is_empty(),
            "{args:?} printed a script: {}",
            f.stdout
        );
        assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
        assert!(f.stderr.contains("<SHELL>"), "{args:?}: {}", f.stderr);
    }
    let f = run_to_end(&["completions", "tcsh"], |_| {});
    for needle in ["invalid value 'tcsh'", "bash, zsh, fish"] {
        assert!(f.stderr.contains(needle), "lacks {needle:?}: {}", f.stderr);
    }
}

#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    // The read end is gone before the script is written: every write fails (EPIPE).
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let tag = new_tag();
    let mut child = Command::new(balancer_bin())
        .args(["completions", "bash"])
        .env(TAG_VAR, &tag)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start balancer");
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    kill_tagged(&tag);
    let status = status.expect("balancer completions did not exit within 20 s");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("writing to stdout"), "{stderr}");
}
