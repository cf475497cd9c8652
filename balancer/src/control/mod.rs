//! Runtime control: the protocol, the controller's socket, and the CLI's client.
pub mod client;
pub mod protocol;
#[cfg(test)]
mod random_frames;
pub mod server;
pub mod socket;
