//! The sampling pace as the event loop sees it: how often the supervisor asks to be woken,
//! what `status` reports, and that stall detection keeps its promise when the pace is slow.
use std::time::Duration;

use super::{answered, ask, ready, ready_with, run_for, settings, Sup, STALL_TIMEOUT};
use crate::{
    control::protocol::{PolicyName, Reply, Request, SamplingPace, SlotState, StatusReport},
    supervisor::pacing::{QUIET_BEFORE_BACKOFF, SLOWEST},
};

const FAST: SamplingPace = SamplingPace::Fast { every_us: 1000 };
const IDLE: SamplingPace = SamplingPace::Idle {
    every_us: SLOWEST.as_micros() as u64,
};

async fn status(sup: &mut Sup) -> StatusReport {
    let mut rx = ask(sup, Request::Status).await;
    match answered(&mut rx) {
        Ok(Reply::Status(s)) => s,
        other => panic!("expected a status, got {other:?}"),
    }
}

async fn set_policy(sup: &mut Sup, policy: PolicyName, spill_depth: u32) {
    let mut rx = ask(
        sup,
        Request::SetPolicy {
            policy,
            weights: None,
            spill_depth: Some(spill_depth),
        },
    )
    .await;
    assert!(answered(&mut rx).is_ok());
}

/// Samples taken while the clock runs for `by`.
async fn samples_over(sup: &mut Sup, by: Duration) -> u32 {
    let before = sup.host().samples;
    run_for(sup, by).await;
    sup.host().samples - before
}

#[tokio::test]
async fn empty_queues_slow_the_pace_and_status_says_so() {
    let mut sup = ready(2).await;
    assert_eq!(status(&mut sup).await.sampling, Some(FAST));
    run_for(&mut sup, Duration::from_secs(1)).await;
    assert_eq!(status(&mut sup).await.sampling, Some(IDLE));
    // Backed off: 20 samples a second instead of 1000.
    assert_eq!(samples_over(&mut sup, Duration::from_secs(1)).await, 20);
}

#[tokio::test]
async fn the_first_non_empty_sample_brings_the_fast_pace_back() {
    let mut sup = ready(2).await;
    run_for(&mut sup, Duration::from_secs(1)).await;
    sup.host_mut().depths = vec![0, 3];
    // Seen within one slow interval; from then on every millisecond.
    run_for(&mut sup, SLOWEST).await;
    let s = status(&mut sup).await;
    assert_eq!(s.sampling, Some(FAST));
    assert_eq!(s.slots[1].queue, 3);
    assert!(samples_over(&mut sup, Duration::from_millis(100)).await >= 99);
    // Empty again: fast for the quiet while, then slow.
    sup.host_mut().depths = vec![0, 0];
    run_for(&mut sup, QUIET_BEFORE_BACKOFF / 2).await;
    assert_eq!(status(&mut sup).await.sampling, Some(FAST));
    run_for(&mut sup, Duration::from_secs(1)).await;
    assert_eq!(status(&mut sup).await.sampling, Some(IDLE));
}

#[tokio::test]
async fn least_loaded_keeps_the_fast_pace_with_empty_queues() {
    let mut sup = ready(2).await;
    run_for(&mut sup, Duration::from_secs(1)).await;
    set_policy(&mut sup, PolicyName::LeastLoaded, 16).await;
    assert_eq!(status(&mut sup).await.sampling, Some(FAST));
    assert!(samples_over(&mut sup, Duration::from_secs(1)).await >= 999);
}

#[tokio::test]
async fn nothing_reading_the_load_signal_means_no_sampling() {
    let mut sup = ready_with(2, super::settings_without_signal()).await;
    set_policy(&mut sup, PolicyName::Hash, 0).await;
    run_for(&mut sup, Duration::from_millis(10)).await;
    let samples = sup.host().samples;
    run_for(&mut sup, Duration::from_secs(3)).await;
    assert_eq!(sup.host().samples, samples);
    // Status takes one sample of its own, so that its queue column is current.
    sup.host_mut().depths = vec![2, 0];
    let s = status(&mut sup).await;
    assert_eq!(s.sampling, Some(SamplingPace::Off));
    assert_eq!(s.slots[0].queue, 2);
    // Spill back on: sampling again, at once.
    set_policy(&mut sup, PolicyName::Hash, 16).await;
    assert!(samples_over(&mut sup, Duration::from_millis(10)).await >= 10);
}

#[tokio::test]
async fn a_stall_after_a_quiet_while_is_detected_within_the_timeout_and_one_slow_interval() {
    let mut sup = ready(2).await;
    run_for(&mut sup, Duration::from_secs(2)).await;
    assert_eq!(status(&mut sup).await.sampling, Some(IDLE));
    // Slot 0's worker stops accepting: its queue grows and never shrinks.
    let stopped = sup.host().now;
    sup.host_mut().depths = vec![5, 0];
    let step = Duration::from_millis(1);
    while status(&mut sup).await.slots[0].state != SlotState::Stalled {
        assert!(
            sup.host().now - stopped <= STALL_TIMEOUT + SLOWEST,
            "not stalled {:?} after the queue built",
            sup.host().now - stopped
        );
        run_for(&mut sup, step).await;
    }
    assert!(!sup.live()[0]);
}

#[tokio::test]
async fn status_reports_the_controllers_cpu_time_per_second_of_wall_time() {
    let mut sup = ready_with(2, settings()).await;
    for _ in 0..20 {
        // 2 ms of CPU per second of wall time.
        sup.host_mut().cpu += Duration::from_millis(2);
        run_for(&mut sup, Duration::from_secs(1)).await;
    }
    let s = status(&mut sup).await;
    let per_sec = s.sampling_cost_us_per_sec / 1e6;
    assert!((per_sec - 0.002).abs() < 0.0002, "{per_sec}");
    assert!(
        (10.0..=11.0).contains(&s.controller_cpu_window_secs),
        "{s:?}"
    );
    assert!((s.controller_cpu_secs - 0.040).abs() < 1e-9);
}
