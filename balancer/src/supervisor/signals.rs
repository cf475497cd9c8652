//! The controller's signals, caught from before anything is bound: a SIGTERM or SIGINT during
//! start-up waits for the event loop, which stops in order (pins removed, workers stopped),
//! instead of killing the process half-started.
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Streams of every signal the event loop acts on.
pub struct Signals {
    pub(super) term: Signal,
    pub(super) int: Signal,
    pub(super) hup: Signal,
    pub(super) usr1: Signal,
    pub(super) usr2: Signal,
}

impl Signals {
    /// Installs the handlers; from now on these signals no longer have their default action.
    /// Must be called within the tokio runtime (`Runtime::enter`).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}
