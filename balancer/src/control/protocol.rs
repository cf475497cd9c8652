//! The control protocol, shared by the controller's server and the CLI client.
//!
//! Frames are a 4-byte big-endian length and that many bytes of JSON. A request frame is
//! `{"version":1,"request":{"type":"status"}}`; a reply is `{"version":1,"ok":{…}}` or
//! `{"version":1,"error":{"kind":"…","message":"…"}}`. Anything malformed, oversized,
//! of another version or unknown gets an error reply and changes nothing.
use std::io;

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Steering policy, as the CLI and the wire name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Keep each connection on the CPU that processed its SYN: CPU k's connections go to the
    /// slot(s) of CPU k (slot k mod workers when there are fewer workers than CPUs).
    Cpu,
    /// Spread connections by flow hash through a 1024-bucket indirection table (weights apply).
    Hash,
    /// Each CPU rotates over the live slots: the evenest spread.
    RoundRobin,
    /// Power of two choices on accept-queue depth: the less loaded of two random live slots.
    LeastLoaded,
}

impl std::fmt::Display for PolicyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Hash => "hash",
            Self::RoundRobin => "round-robin",
            Self::LeastLoaded => "least-loaded",
        })
    }
}

/// What a client asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    /// Slots, workers, counters.
    Status,
    /// The active policy and its tables.
    Policy,
    /// Change the policy (and hash weights).
    SetPolicy {
        /// The new policy.
        policy: PolicyName,
        /// Per-slot weights for the hash table; `None` for equal shares.
        weights: Option<Vec<u32>>,
        /// New spill depth (0 turns spilling off); `None` keeps the current one.
        #[serde(default)]
        spill_depth: Option<u32>,
    },
    /// Rolling restart of one slot or all.
    Restart {
        /// One slot, or all when `None`.
        slot: Option<u32>,
    },
    /// Change the number of slots.
    Scale {
        /// The new number of slots.
        workers: u32,
    },
    /// Take a slot out of the tables, keeping its worker.
    Drain {
        /// The slot.
        slot: u32,
    },
    /// Put a drained slot back.
    Undrain {
        /// The slot.
        slot: u32,
    },
    /// Hand the group over to a new controller process (a new binary), keeping every worker.
    Upgrade {
        /// The new binary; `None` for the path this controller was started from (re-resolved,
        /// so a file replaced on disk is the new version).
        #[serde(default)]
        binary: Option<std::path::PathBuf>,
    },
}

impl Request {
    /// Whether the request changes the balancer (and so needs root or the controller's uid).
    pub fn changes_state(&self) -> bool {
        !matches!(self, Request::Status | Request::Policy)
    }
}

/// What a slot is doing: the one vocabulary of `status`, `--json`, Prometheus and the
/// counters table. The supervisor derives it from a slot's occupant, membership and stall
/// state (`supervisor::slot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// A worker was started and has not said it is ready: connections queue on its socket.
    Starting,
    /// The worker is ready and the slot takes new connections.
    Ready,
    /// Drained by the operator: out of the tables, its worker keeps running.
    Draining,
    /// Its queue stopped shrinking: out of the tables until it drains.
    Stalled,
    /// No worker, and no respawn pending.
    Down,
    /// Its worker died; the respawn waits out the crash-loop backoff.
    BackingOff,
    /// Being scaled away: out of the tables, its worker stopping.
    Removing,
    /// The controller stopped its worker (shutdown).
    Stopped,
}

impl SlotState {
    /// Every state, in the order tables and metrics list them.
    pub const ALL: [SlotState; 8] = [
        SlotState::Starting,
        SlotState::Ready,
        SlotState::Draining,
        SlotState::Stalled,
        SlotState::Down,
        SlotState::BackingOff,
        SlotState::Removing,
        SlotState::Stopped,
    ];

    /// The state's name, as `--json` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Draining => "draining",
            SlotState::Stalled => "stalled",
            SlotState::Down => "down",
            SlotState::BackingOff => "backing-off",
            SlotState::Removing => "removing",
            SlotState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SlotState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SlotState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown slot state {s:?}"))
    }
}

/// One slot in a status reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Slot number.
    pub slot: u32,
    /// Worker pid, when one runs.
    pub pid: Option<u32>,
    /// What the slot is doing (one word, see [`SlotState`]).
    pub state: SlotState,
    /// CPUs whose connections the cpu policy sends here (or the worker's pinning).
    pub cpus: Vec<u32>,
    /// Times the slot's worker was replaced.
    pub restarts: u32,
    /// Connections waiting in the slot's accept queue(s), summed over addresses.
    pub queue: u32,
    /// New connections steered here (all paths, all addresses).
    pub steered: u64,
    /// Of those, chosen by the cpu policy.
    pub by_cpu: u64,
    /// Chosen by the hash policy.
    pub by_hash: u64,
    /// Chosen by the round-robin policy.
    pub by_round_robin: u64,
    /// Chosen by the least-loaded policy.
    pub by_least_loaded: u64,
    /// Spilled here because the first choice's queue was too deep.
    pub spilled: u64,
    /// Chosen as fallback.
    pub fallback: u64,
    /// Queued connections moved here from a closing socket.
    pub migrated: u64,
    /// Failed selections of this slot.
    pub select_errors: u64,
    /// Why the slot is out of the tables, when it is stalled.
    pub note: Option<String>,
}

/// How often the controller samples the accept queues now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pace", rename_all = "kebab-case")]
pub enum SamplingPace {
    /// Nothing reads the load signal (no spill, no stall detection, policy not
    /// least-loaded): no sampling.
    Off,
    /// At `--sample-interval`: a queue is non-empty, a stall is watched, or the policy is
    /// least-loaded.
    Fast {
        /// The interval, in microseconds.
        every_us: u64,
    },
    /// Every queue has been empty for a while: a slower pace, back to fast at the first
    /// non-empty sample.
    Idle {
        /// The interval, in microseconds.
        every_us: u64,
    },
}

/// The status reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Controller pid.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Active policy.
    pub policy: PolicyName,
    /// Hash weights, if set.
    pub weights: Option<Vec<u32>>,
    /// Spill depth of the cpu and hash policies (0: off).
    pub spill_depth: u32,
    /// Accept-queue sampling interval while the load signal must be fresh (`--sample-interval`),
    /// in microseconds; see `sampling` for the pace in force.
    pub sample_interval_us: u64,
    /// The controller's whole CPU time (every thread, user and system), in microseconds per
    /// second of wall time over the last `controller_cpu_window_secs`. Kept under this name
    /// for older clients; it no longer times the sampling alone.
    pub sampling_cost_us_per_sec: f64,
    /// The accept-queue sampling pace in force (`None` from a controller that predates it).
    #[serde(default)]
    pub sampling: Option<SamplingPace>,
    /// The controller's CPU time since it started, in seconds (user and system, every
    /// thread).
    #[serde(default)]
    pub controller_cpu_secs: f64,
    /// The window `sampling_cost_us_per_sec` was measured over, in seconds (the last 10 s, or
    /// since the start); 0 from a controller that predates it.
    #[serde(default)]
    pub controller_cpu_window_secs: f64,
    /// Bound listen addresses.
    pub listen: Vec<String>,
    /// Every slot.
    pub slots: Vec<SlotStatus>,
    /// Average program run time per selection, when `--bpf-stats` is on.
    pub bpf_ns_per_selection: Option<f64>,
    /// Program runs counted by the kernel, when `--bpf-stats` is on.
    pub bpf_runs: Option<u64>,
}

/// The policy reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Active policy.
    pub policy: PolicyName,
    /// Hash weights, if set.
    pub weights: Option<Vec<u32>>,
    /// Spill depth of the cpu and hash policies (0: off).
    pub spill_depth: u32,
    /// Slots that take new connections now.
    pub live: Vec<u32>,
    /// For each online CPU, the slots its connections go to under the cpu policy.
    pub cpu_table: Vec<(u32, Vec<u32>)>,
    /// For each slot, how many of the hash table's buckets name it.
    pub hash_buckets: Vec<(u32, u32)>,
}

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// To [`Request::Status`].
    Status(StatusReport),
    /// To [`Request::Policy`].
    Policy(PolicyReport),
    /// A change was made.
    Done {
        /// What was done, for people.
        message: String,
    },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not a JSON request envelope.
    Malformed,
    /// Frame over [`MAX_FRAME`].
    TooLarge,
    /// Another protocol version.
    WrongVersion,
    /// A request type this controller does not know.
    UnknownRequest,
    /// The peer may not change the balancer.
    PermissionDenied,
    /// The request's values are not acceptable.
    Invalid,
    /// Another change is in progress, or the controller serves as many clients as it allows.
    Busy,
    /// The change was tried and failed.
    Failed,
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The cause, for scripts.
    pub kind: ErrorKind,
    /// The cause and the fix, for people.
    pub message: String,
}

impl ErrorReply {
    /// Builds an error reply.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The outcome of a request.
pub type Outcome = Result<Reply, ErrorReply>;

#[derive(Serialize, Deserialize)]
struct RequestFrame {
    version: u32,
    request: Request,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ReplyBody {
    Ok(Reply),
    Error(ErrorReply),
}

#[derive(Serialize, Deserialize)]
struct ReplyFrame {
    version: u32,
    #[serde(flatten)]
    body: ReplyBody,
}

/// Reading a frame failed.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    Closed,
    /// The announced length is over [`MAX_FRAME`]; the stream cannot be resynchronised.
    TooLarge(usize),
    /// I/O failed.
    Io(io::Error),
}

/// Reads one length-delimited frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<BytesMut, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await.map_err(FrameError::Io)?;
    Ok(buf)
}

/// Writes one length-delimited frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes is over the {MAX_FRAME}-byte limit",
                payload.len()
            ),
        ));
    }
    let mut frame = BytesMut::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(frame.chunk()).await?;
    w.flush().await
}

/// A request that JSON cannot carry.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request cannot be sent: the control protocol carries paths as UTF-8 text and a path \
given is not valid UTF-8; rename it, or give a symlink whose path is UTF-8"
)]
pub struct EncodeError(#[source] serde_json::Error);

/// Encodes a request frame's payload. Fails only for a path that is not UTF-8 (an
/// `upgrade --binary` given as arbitrary bytes): JSON strings are text.
pub fn encode_request(request: &Request) -> Result<Vec<u8>, EncodeError> {
    serde_json::to_vec(&RequestFrame {
        version: VERSION,
        request: request.clone(),
    })
    .map_err(EncodeError)
}

/// Decodes a request payload, telling malformed, wrong-version and unknown requests apart.
pub fn decode_request(payload: &[u8]) -> Result<Request, ErrorReply> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        ErrorReply::new(
            ErrorKind::Malformed,
            format!("the request is not JSON: {e}"),
        )
    })?;
    let version = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            ErrorReply::new(
                ErrorKind::Malformed,
                "the request has no numeric \"version\" field",
            )
        })?;
    if version != u64::from(VERSION) {
        return Err(ErrorReply::new(
            ErrorKind::WrongVersion,
            format!(
                "protocol version {version} is not supported (this controller speaks {VERSION}): use the balancer CLI of the same release"
            ),
        ));
    }
    let request = value.get("request").ok_or_else(|| {
        ErrorReply::new(ErrorKind::Malformed, "the request has no \"request\" field")
    })?;
    serde_json::from_value(request.clone()).map_err(|e| {
        ErrorReply::new(
            ErrorKind::UnknownRequest,
            // serde's message quotes the input too: clip the whole text.
            clip(&format!("unknown or invalid request {request}: {e}"), 400),
        )
    })
}

/// At most `max` characters of `s`, so that an echo of the client's input cannot push a reply
/// over the frame limit.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Encodes a reply frame's payload.
pub fn encode_reply(outcome: &Outcome) -> Vec<u8> {
    let body = match outcome {
        Ok(r) => ReplyBody::Ok(r.clone()),
        Err(e) => ReplyBody::Error(e.clone()),
    };
    serde_json::to_vec(&ReplyFrame {
        version: VERSION,
        body,
    })
    .expect("replies always serialise")
}

/// Decodes a reply payload.
pub fn decode_reply(payload: &[u8]) -> io::Result<Outcome> {
    let frame: ReplyFrame = serde_json::from_slice(payload).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the controller's reply is not understood ({e}); is it of another release?"),
        )
    })?;
    Ok(match frame.body {
        ReplyBody::Ok(r) => Ok(r),
        ReplyBody::Error(e) => Err(e),
    })
}

#[cfg(test)]
mod tests;
