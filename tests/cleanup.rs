//! The harness's own guarantees, against the real binary: every process a controller caused
//! carries its tag and is gone once the test lets go of it, and a crashed controller starts
//! again on the ports it had bound. Nothing here depends on whether workers outlive their
//! controller.
use balancer_tests::{
    alive, balancer_bin, get, kill_tagged, pids, tagged_pids, Balancer, SlotState,
};

/// Two workers that each start a `sleep` first: a process no controller knows about, which
/// only the tag can find once its worker is gone.
fn with_sleeping_children() -> Balancer {
    let bin = balancer_bin();
    Balancer::start(&[
        "--workers",
        "2",
        "--policy",
        "hash",
        "--",
        "sh",
        "-c",
        "sleep 300 & exec \"$0\" demo-worker",
        bin.to_str().unwrap(),
    ])
}

#[test]
fn every_process_of_a_dropped_controller_is_gone() {
    let b = with_sleeping_children();
    let tag = b.tag().to_owned();
    let workers = pids(&b.status());
    assert_eq!(workers.len(), 2, "{workers:?}");
    let tagged = tagged_pids(&tag);
    assert!(tagged.contains(&b.pid()), "{tagged:?}");
    for w in &workers {
        assert!(tagged.contains(w), "worker {w} carries the tag: {tagged:?}");
    }
    assert!(
        tagged.len() >= 5,
        "the controller, two workers and their sleeps: {tagged:?}"
    );
    drop(b);
    assert_eq!(tagged_pids(&tag), Vec::<u32>::new());
    for pid in tagged {
        assert!(!alive(pid), "{pid} outlived the drop");
    }
}

#[test]
fn what_a_crashed_controller_leaves_is_killed_by_its_tag() {
    let b = with_sleeping_children();
    let tag = b.tag().to_owned();
    let controller = b.pid();
    let crashed = b.crash();
    assert_eq!(crashed.tag(), tag);
    assert!(!alive(controller));
    // The sleeps outlive any controller: nothing but the tag knows them.
    let left = tagged_pids(&tag);
    assert!(!left.contains(&controller), "{left:?}");
    assert!(kill_tagged(&tag) >= 2, "the two sleeps at least: {left:?}");
    assert_eq!(tagged_pids(&tag), Vec::<u32>::new());
    for pid in left {
        assert!(!alive(pid), "{pid} outlived kill_tagged");
    }
}

#[test]
fn a_restarted_controller_listens_on_the_ports_it_had_bound() {
    let b = Balancer::start(&[
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--workers",
        "1",
    ]);
    let (addrs, control, tag, first) = (
        b.addrs.clone(),
        b.control.clone(),
        b.tag().to_owned(),
        b.pid(),
    );
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs.iter().all(|a| a.port() != 0), "{addrs:?}");
    let crashed = b.crash();
    assert_eq!(crashed.addrs(), addrs);
    assert_eq!(crashed.control(), control);
    // Whatever the controller does with its workers, none is left to hold the ports.
    kill_tagged(crashed.tag());
    let mut b = crashed.restart();
    assert_ne!(b.pid(), first);
    assert_eq!(b.addrs, addrs, "the same ports, in the same order");
    assert_eq!(b.control, control);
    assert_eq!(b.tag(), tag);
    assert!(tagged_pids(&tag).contains(&b.pid()));
    let status = b.status();
    assert_eq!(status.pid, b.pid());
    assert_eq!(
        status.listen,
        addrs.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
    assert_eq!(status.slots.len(), 1, "{status:?}");
    assert_eq!(status.slots[0].state, SlotState::Ready, "{status:?}");
    for addr in &addrs {
        get(*addr).unwrap_or_else(|e| panic!("{addr} after the restart: {e}"));
    }
    let (exit, _) = b.stop();
    assert!(exit.success(), "{exit}");
}
