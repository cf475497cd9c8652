//! The load client of the benchmark, shared with the integration tests: requests to the
//! demo worker, answers parsed, and an open-loop generator; and what the benchmark's and the
//! soak's result files say about the machine and the date.
pub mod client;
pub mod host_info;
pub mod process;
