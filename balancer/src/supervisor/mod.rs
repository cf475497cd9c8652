//! Worker supervision and runtime control.
//!
//! One worker per slot, respawned on the same socket when it dies; rolling restarts, scaling,
//! drains and policy changes asked for over the control socket. Every change of which slots
//! take new connections is published to the steering tables at once.
//!
//! The decisions ([`Supervisor`], one file per input) are separate from their effects: every
//! effect on processes, sockets, maps, timers and the clock goes through the [`host::Host`]
//! seam, so that the unit tests run the same decisions against a fake host in milliseconds.
//! See `docs/architecture.md`.
mod cpu_meter;
mod event_loop;
pub mod host;
mod lifecycle;
mod machine;
pub mod operation;
mod pacing;
mod real_host;
mod requests;
mod sampling;
pub mod settings;
mod shutdown;
mod signals;
pub mod slot;
mod socket_check;
pub mod upgrade;
mod views;

#[cfg(test)]
mod tests;

pub use event_loop::{run, Exit};
pub use machine::Supervisor;
pub use settings::SupervisorConfig;
pub use signals::Signals;
pub use upgrade::UpgradeContext;
