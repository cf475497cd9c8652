//! One-shot runs of the binary (the CLI, or a `run` expected to end by itself) and their
//! output.
use std::{
    io::Read,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::Duration,
};

use balancer::control::protocol::{ErrorKind, ErrorReply};

use crate::{balancer_bin, kill_tagged, new_tag, wait_timeout, TAG_VAR};

/// Output of a balancer run that is expected to end by itself.
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

/// Runs `balancer ARGS` to completion (20 s at most), optionally adjusting the command first.
/// It runs with a tag of its own: whatever it started is killed once it has ended.
pub fn run_to_end(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Finished {
    let tag = new_tag();
    let mut cmd = Command::new(balancer_bin());
    cmd.args(args)
        .env(TAG_VAR, &tag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().expect("start balancer");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let Some(status) = wait_timeout(&mut child, Duration::from_secs(20)) else {
        let _ = child.kill();
        let _ = child.wait();
        kill_tagged(&tag);
        panic!("balancer {args:?} did not exit within 20 s")
    };
    kill_tagged(&tag);
    Finished {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// The stdout of a command that must have succeeded; panics with its output otherwise.
pub fn ok(f: &Finished) -> &str {
    assert!(
        f.status.success(),
        "command failed ({}):\n{}{}",
        f.status,
        f.stdout,
        f.stderr
    );
    &f.stdout
}

/// The CLI's `--json` error output: `{"error": KIND, "message": TEXT}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CliError {
    error: ErrorKind,
    message: String,
}

/// Parses what the CLI prints on stdout when the controller refused a `--json` command.
pub fn parse_cli_error(stdout: &str) -> Result<ErrorReply, String> {
    let e: CliError = serde_json::from_str(stdout)
        .map_err(|e| format!("not a `--json` error reply ({e}): {stdout:?}"))?;
    Ok(ErrorReply::new(e.error, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_errors_parse_into_typed_replies() {
        let e =
            parse_cli_error(r#"{"error":"permission-denied","message":"uid 7 may not"}"#).unwrap();
        assert_eq!(
            e,
            ErrorReply::new(ErrorKind::PermissionDenied, "uid 7 may not")
        );
        assert!(parse_cli_error(r#"{"error":"nonsense","message":""}"#).is_err());
        assert!(parse_cli_error("").is_err());
    }
}
