//! Raw frames to a controller's control socket: what a client other than the `balancer` CLI
//! can send (the CLI's own checks, such as clap's ranges, do not stand in the way).
use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use balancer::control::protocol::{decode_reply, ErrorReply, Reply};

use crate::IO_TIMEOUT;

/// `payload` as one frame: its 4-byte big-endian length, then its bytes.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// Sends raw bytes on a new connection to the control socket at `path`; returns the one reply
/// frame, decoded by the library.
pub fn raw_exchange(path: &Path, bytes: &[u8]) -> Result<Reply, ErrorReply> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    decode_reply(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
}
