//! Processes: whether one runs, waiting for one to go, and the cleanup by tag, shared by the
//! integration tests and the soak.
//!
//! Every controller the tests or the soak start carries `BALANCER_TEST_TAG=<tag>` in its
//! environment, and its workers inherit it (as do the processes they start). Whatever a run
//! caused, its processes can then be found in `/proc` and killed, even when they outlive
//! their controller.
use std::{
    collections::BTreeSet,
    process::{Child, ExitStatus},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// The environment variable that marks every process a test caused.
pub const TAG_VAR: &str = "BALANCER_TEST_TAG";

/// How long [`kill_tagged`] waits for the processes it killed to be gone.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A tag no other controller of any test process uses: `<test pid>-<counter>`.
pub fn new_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether an environment block as `/proc/PID/environ` holds it (NUL-separated `NAME=VALUE`
/// entries) has exactly the entry `BALANCER_TEST_TAG=<tag>`.
pub fn environ_has_tag(environ: &[u8], tag: &str) -> bool {
    let entry = format!("{TAG_VAR}={tag}");
    environ.split(|b| *b == 0).any(|e| e == entry.as_bytes())
}

/// The processes carrying `tag` in their environment, in pid order; never the test process.
/// Zombies have no environment left, so they are not listed; nor is a process caught in the
/// middle of an exec, whose new environment is not readable yet.
pub fn tagged_pids(tag: &str) -> Vec<u32> {
    let me = std::process::id();
    let proc_dir = match std::fs::read_dir("/proc") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("reading /proc to find the processes tagged {tag}: {e}");
            return Vec::new();
        }
    };
    let mut pids: Vec<u32> = proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| *pid != me)
        // A process that vanished while scanned has no environ to read: skipped.
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| environ_has_tag(&environ, tag))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs every process carrying `tag` (see [`tagged_pids`]) and the process group of each
/// (workers lead their own group, and what they start is in it), then waits up to
/// [`KILL_TIMEOUT`] until they are all gone and two scans in a row find no tagged process;
/// returns how many tagged processes it killed. Never signals the test's own process group
/// (the controller is in it).
pub fn kill_tagged(tag: &str) -> usize {
    assert!(!tag.is_empty(), "kill_tagged needs a tag");
    // SAFETY: no preconditions.
    let own_group = unsafe { libc::getpgrp() } as u32;
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut killed = BTreeSet::new();
    // A process in the middle of an exec shows an empty environment for a moment: only a
    // second scan that finds nothing either ends the search.
    let mut quiet_scans = 0;
    loop {
        let found = tagged_pids(tag);
        for &pid in &found {
            if let Some(group) = process_group(pid).filter(|g| *g > 1 && *g != own_group) {
                // SAFETY: kill(2) on the process group of a tagged process, not the test's.
                unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
            }
            // SAFETY: kill(2) on a tagged process.
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                killed.insert(pid);
            }
        }
        let running: Vec<u32> = killed.iter().copied().filter(|p| alive(*p)).collect();
        quiet_scans = if found.is_empty() { quiet_scans + 1 } else { 0 };
        if quiet_scans >= 2 && running.is_empty() {
            return killed.len();
        }
        if Instant::now() >= deadline {
            eprintln!(
                "kill_tagged({tag}): still running {KILL_TIMEOUT:?} after SIGKILL: {running:?}, tagged: {found:?}"
            );
            return killed.len();
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The process group of `pid`, from `/proc/PID/stat`; `None` when it is gone.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state, ppid, pgrp.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone; returns whether it went within `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Waits for a child at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_entry_must_match_exactly() {
        let environ = b"PATH=/bin\0BALANCER_TEST_TAG=a-1\0HOME=/root\0";
        assert!(environ_has_tag(environ, "a-1"));
        for other in ["a-10", "a-", "a", "-1", "1", ""] {
            assert!(!environ_has_tag(environ, other), "{other:?} matched");
        }
        let environ = b"BALANCER_TEST_TAG=a-10\0";
        assert!(environ_has_tag(environ, "a-10"));
        assert!(!environ_has_tag(environ, "a-1"));
    }

    #[test]
    fn the_tag_is_found_at_either_end_and_only_under_its_name() {
        assert!(environ_has_tag(b"BALANCER_TEST_TAG=t-3", "t-3"));
        assert!(environ_has_tag(b"A=1\0BALANCER_TEST_TAG=t-3", "t-3"));
        assert!(environ_has_tag(b"BALANCER_TEST_TAG=t-3\0A=1", "t-3"));
        for environ in [
            &b""[..],
            b"\0\0",
            b"X_BALANCER_TEST_TAG=t-3\0",
            b"BALANCER_TEST_TAGS=t-3\0",
            b"OTHER=BALANCER_TEST_TAG=t-3\0",
            b"BALANCER_TEST_TAG=t-3 \0",
            b"BALANCER_TEST_TAG=t-3\n\0",
        ] {
            assert!(
                !environ_has_tag(environ, "t-3"),
                "{:?}",
                String::from_utf8_lossy(environ)
            );
        }
    }

    #[test]
    fn tags_are_unique_and_name_the_test_process() {
        let (a, b) = (new_tag(), new_tag());
        assert_ne!(a, b);
        let pid = std::process::id().to_string();
        assert!(a.starts_with(&format!("{pid}-")), "{a}");
    }

    #[test]
    fn the_test_process_is_never_tagged_and_an_unused_tag_kills_nothing() {
        assert_eq!(tagged_pids(&new_tag()), Vec::<u32>::new());
        assert_eq!(kill_tagged(&new_tag()), 0);
    }

    #[test]
    fn a_tagged_process_and_its_group_are_killed() {
        use std::{
            io::{BufRead, BufReader},
            os::unix::process::CommandExt,
            process::{Command, Stdio},
        };
        let tag = new_tag();
        // `sh` leads its own group, like a worker; the `sleep` it starts drops the tag but
        // stays in the group.
        let mut sh = Command::new("sh")
            .args(["-c", "env -u BALANCER_TEST_TAG sleep 60 & echo $!; wait"])
            .env(TAG_VAR, &tag)
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let sleep: u32 = line.trim().parse().unwrap();
        // Until `env` has dropped the tag and run `sleep`, the background job carries it.
        let deadline = Instant::now() + KILL_TIMEOUT;
        while std::fs::read_to_string(format!("/proc/{sleep}/comm")).unwrap() != "sleep\n" {
            assert!(Instant::now() < deadline, "{sleep} never ran sleep");
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(tagged_pids(&tag), [sh.id()]);
        assert_eq!(kill_tagged(&tag), 1);
        assert!(!alive(sh.id()));
        assert!(
            wait_gone(sleep, KILL_TIMEOUT),
            "the group's sleep {sleep} runs"
        );
        assert!(!sh.wait().unwrap().success());
        assert_eq!(tagged_pids(&tag), Vec::<u32>::new());
    }

    #[test]
    fn a_tagged_process_in_the_test_s_own_group_is_killed_alone() {
        let tag = new_tag();
        let mut sleep = std::process::Command::new("sleep")
            .arg("60")
            .env(TAG_VAR, &tag)
            .spawn()
            .unwrap();
        // Its environment is readable once its exec is through.
        let deadline = Instant::now() + KILL_TIMEOUT;
        while tagged_pids(&tag) != [sleep.id()] {
            assert!(Instant::now() < deadline, "{:?}", tagged_pids(&tag));
            thread::sleep(Duration::from_millis(10));
        }
        // Killing its group would have killed this test too.
        assert_eq!(kill_tagged(&tag), 1);
        assert!(!sleep.wait().unwrap().success());
    }

    #[test]
    fn a_process_group_is_read_from_stat() {
        // SAFETY: no preconditions.
        let own = unsafe { libc::getpgrp() } as u32;
        assert_eq!(process_group(std::process::id()), Some(own));
        assert_eq!(process_group(u32::MAX), None);
    }
}
