//! Harness for the privileged integration tests: starts the real `balancer` binary (built with
//! its eBPF object by `cargo xtask test`), talks to its workers over loopback, reads its
//! counters table, and kills every process a test caused, even when the test fails.
//!
//! - [`setup`]: the binary under test, root, CPUs, scratch paths;
//! - [`balancer`]: a running controller ([`Balancer`]);
//! - [`restart`]: a crashed controller and its restart ([`Crashed`]);
//! - [`process`]: liveness, and the cleanup by `BALANCER_TEST_TAG` ([`kill_tagged`]);
//! - [`cli`]: one-shot runs of the binary ([`run_to_end`]);
//! - [`control`]: raw frames to a control socket ([`raw_exchange`]);
//! - [`report`]: the counters table ([`parse_report`]);
//! - [`bpffs`]: a private BPF filesystem ([`BpfFs`]);
//! - [`half_open`]: connections held half-open by nftables ([`AckDrop`]);
//! - [`load`], [`slots`]: what the control tests share;
//! - [`http`]: a plain HTTP client and load for real servers ([`HttpLoad`]);
//! - [`servers`]: real servers' configurations ([`Server`]).
pub mod balancer;
pub mod bpffs;
pub mod cli;
pub mod control;
pub mod half_open;
pub mod http;
pub mod load;
pub mod process;
pub mod report;
pub mod restart;
pub mod servers;
pub mod setup;
pub mod slots;

pub use balancer::Balancer;
pub use balancer_bench::client::{
    get, online_cpus, open_loop, parse_answer, parse_cpu_list, pin_thread, read_answer,
    send_request, Answer, Fate, IO_TIMEOUT,
};
pub use balancer_common::SlotCounters;
pub use bpffs::{pinned_dir, BpfFs};
pub use cli::{ok, parse_cli_error, run_to_end, Finished};
pub use control::{frame, raw_exchange};
pub use half_open::{syn_recv, wait_syn_recv, AckDrop};
pub use http::{http_get, HttpAnswer, HttpLoad};
pub use load::{Load, Phased, PHASE_ANSWERS};
pub use process::{
    alive, environ_has_tag, kill_tagged, new_tag, process_group, tagged_pids, wait_gone,
    wait_timeout, KILL_TIMEOUT, TAG_VAR,
};
pub use report::{parse_report, Report, Row, Unattributed, COLUMNS};
pub use restart::{with_bound_listens, Crashed};
pub use servers::{free_loopback_addr, group_members, Server, ServerRun};
pub use setup::{
    balancer_bin, require_root, scratch_dir, two_or_more_cpus, unique_path, START_TIMEOUT,
};
pub use slots::{
    all_ready, pids, refusable_group, refusing_group, refusing_worker, sum, worker_pids,
};

pub use ::balancer::control::protocol::{
    ErrorKind, ErrorReply, PolicyName, PolicyReport, SamplingPace, SlotState, SlotStatus,
    StatusReport,
};
