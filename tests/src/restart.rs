//! A controller killed with SIGKILL, whose workers may still run.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use crate::{balancer::Launch, kill_tagged};

/// A controller that was SIGKILLed and reaped ([`Balancer::crash`]); what it started may still
/// run. Dropping it kills every process of its tag.
///
/// [`Balancer::crash`]: crate::Balancer::crash
pub struct Crashed {
    launch: Launch,
    addrs: Vec<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl Crashed {
    pub(crate) fn new(launch: Launch, addrs: Vec<SocketAddr>, stderr: Arc<Mutex<String>>) -> Self {
        Self {
            launch,
            addrs,
            stderr,
        }
    }

    /// The crashed controller's `BALANCER_TEST_TAG`.
    pub fn tag(&self) -> &str {
        &self.launch.tag
    }

    /// The addresses the crashed controller had bound, in `--listen` order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Its control socket path.
    pub fn control(&self) -> &Path {
        &self.launch.control
    }

    /// Everything the crashed controller logged, and what its workers log since (they still
    /// write to its stderr).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Crashed {
    fn drop(&mut self) {
        kill_tagged(&self.launch.tag);
    }
}
