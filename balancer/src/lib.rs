//! `balancer` as a library: the controller's parts, for the `balancer` binary, the
//! integration tests and the benchmark (which read [`control::protocol::StatusReport`] and
//! [`control::protocol::ErrorKind`] as typed values instead of walking JSON by key).
pub mod activation;
pub mod admission;
pub mod adoption;
pub mod affinity;
pub mod alarm;
pub mod cli;
pub mod cli_docs;
pub mod control;
pub mod credentials;
pub mod demo_worker;
pub mod fd_store;
pub mod group_repair;
pub mod group_state;
pub mod handover;
pub mod limits;
pub mod log_sink;
pub mod metrics;
pub mod notify;
pub mod pidfd;
pub mod policy;
pub mod privileges;
pub mod proc_net;
pub mod procfs;
pub mod queue_sampler;
pub mod report;
pub mod service_manager;
pub mod sock_diag;
pub mod socket_group;
pub mod stall;
pub mod startup;
pub mod steering;
pub mod stop_signal;
pub mod supervisor;
