//! Runtime policy control against the real kernel: switches between policies under load, and
//! hash weights.
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use balancer_tests::{
    get, ok, online_cpus, sum, Answer, Balancer, ErrorKind, Load, PolicyName, PHASE_ANSWERS,
};

#[test]
fn policy_switches_under_load_lose_nothing_and_take_effect() {
    let cpus = online_cpus();
    let n = cpus.len();
    let b = Balancer::start(&["--policy", "cpu", "--workers", &n.to_string()]);
    let phase = Arc::new(AtomicU32::new(0));
    let load = Load::start(
        b.addrs[0],
        &cpus.iter().map(|c| Some(*c)).collect::<Vec<_>>(),
        phase.clone(),
    );
    // Phases 0 (cpu), 2 (hash) and 4 (cpu) are stable; 1 and 3 cover the switches, whose
    // moment of publication the client cannot know.
    let mut latencies = Vec::new();
    for (next, policy) in [(2, "hash"), (4, "cpu")] {
        load.wait_answers(PHASE_ANSWERS);
        phase.store(next - 1, Ordering::SeqCst);
        let f = b.cli(&["policy", "set", policy]);
        let out = ok(&f).to_owned();
        assert!(out.contains(&format!("policy {policy}")), "{out}");
        latencies.push(out.trim().to_owned());
        phase.store(next, Ordering::SeqCst);
    }
    load.wait_answers(PHASE_ANSWERS);
    let (answers, failed) = load.finish();
    assert_eq!(failed, 0, "connections failed across the policy switches");
    assert_eq!(answers.len(), n, "one client per CPU");
    for (pos, per_cpu) in answers.iter().enumerate() {
        let in_phase = |p: u32| -> Vec<&Answer> {
            per_cpu
                .iter()
                .filter(|(a, b, _)| *a == p && *b == p)
                .map(|(_, _, x)| x)
                .collect()
        };
        for p in [0, 4] {
            let v = in_phase(p);
            assert!(v.len() > 20, "phase {p}: {} answers", v.len());
            assert!(
                v.iter().all(|a| a.slot == pos as u32),
                "cpu policy (phase {p}): CPU {} must stay on slot {pos}",
                cpus[pos]
            );
        }
        let hashed: HashSet<u32> = in_phase(2).iter().map(|a| a.slot).collect();
        assert_eq!(
            hashed.len(),
            n,
            "hash policy spreads CPU {}'s connections",
            cpus[pos]
        );
    }
    let status = b.status();
    assert_eq!(status.policy, PolicyName::Cpu);
    assert!(
        sum(&status, |s| s.by_hash) > 0 && sum(&status, |s| s.by_cpu) > 0,
        "{status:?}"
    );
    assert_eq!(sum(&status, |s| s.select_errors), 0, "{status:?}");
    println!("policy switches: {latencies:?}");
}

#[test]
fn weights_1_to_3_give_shares_of_25_and_75_percent() {
    const CONNS: usize = 4000;
    let b = Balancer::start(&["--workers", "2", "--policy", "cpu"]);
    ok(&b.cli(&["policy", "set", "hash", "--weights", "1,3"]));
    let policy = b.policy();
    assert_eq!(policy.policy, PolicyName::Hash);
    assert_eq!(policy.weights, Some(vec![1, 3]));
    assert_eq!(policy.hash_buckets, [(0, 256), (1, 768)], "{policy:?}");
    let mut seen = [0usize; 2];
    for _ in 0..CONNS {
        seen[get(b.addrs[0]).unwrap().slot as usize] += 1;
    }
    let share = seen[0] as f64 / CONNS as f64;
    // sd of the share is 0.7 points at 4000 connections; ±4 points is > 5 sd.
    assert!(
        (share - 0.25).abs() <= 0.04,
        "slot 0 got {:.1} %: {seen:?}",
        share * 100.0
    );
    // Bad weights are refused as invalid (each request has one thing wrong with it) and
    // change nothing.
    for weights in [
        &["hash", "--weights", "1,2,3"][..],
        &["cpu", "--weights", "1,3"],
        &["hash", "--weights", "0,0"],
    ] {
        let mut args = vec!["policy", "set"];
        args.extend_from_slice(weights);
        let e = b.cli_error(&args);
        assert_eq!(e.kind, ErrorKind::Invalid, "{args:?}: {e:?}");
        assert_eq!(b.policy(), policy, "{args:?} changed the policy");
    }
    assert_eq!(b.status().weights, Some(vec![1, 3]));
    println!("weights 1:3 over {CONNS} connections: {seen:?}");
}
