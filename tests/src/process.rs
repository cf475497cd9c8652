//! Processes: whether one runs, waiting for one to go, and the cleanup by tag (shared with
//! the soak, in the bench crate).
pub use balancer_bench::process::*;
