//! The load client of the benchmark, shared with the integration tests: requests to the
//! demo worker, answers parsed, and an open-loop generator.
pub mod client;
pub mod host_info;
