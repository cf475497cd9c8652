//! Why steering failed, classified from what aya and the kernel said, so that each message
//! names the cause and the fix.
use std::{io, net::SocketAddr};

use aya::{maps::MapError, programs::ProgramError, EbpfError};

/// Why steering could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The binary carries no eBPF object.
    #[error(
        "this balancer binary was built without its eBPF program (a plain `cargo build`); \
build it with `cargo xtask build` (or run `cargo xtask run`)"
    )]
    NoObject,
    /// Missing capabilities.
    #[error("loading the steering program was refused ({0}): it needs CAP_BPF and CAP_NET_ADMIN; run as root")]
    NeedsPrivilege(String),
    /// The kernel lacks the program or map type.
    #[error(
        "this kernel does not support SK_REUSEPORT programs with REUSEPORT_SOCKARRAY maps \
of the select-or-migrate kind (Linux 5.14+ with CONFIG_BPF_SYSCALL): {0}"
    )]
    Unsupported(String),
    /// The verifier rejected the program.
    #[error("the kernel's verifier rejected the steering program: {0}")]
    Rejected(String),
    /// The embedded object is not a readable eBPF object.
    #[error("the embedded eBPF object cannot be read ({0}); rebuild with `cargo xtask build`")]
    Unreadable(String),
    /// The object is not the one this controller was built for.
    #[error("the embedded eBPF object has no {0}; rebuild with `cargo xtask build`")]
    Missing(&'static str),
    /// A map update failed.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// The map error.
        source: MapError,
    },
    /// Attaching to a socket group failed.
    #[error("attaching the steering program to {addr}: {source}")]
    Attach {
        /// The group's address.
        addr: SocketAddr,
        /// The program error.
        source: ProgramError,
    },
    /// Pinning to the BPF filesystem failed.
    #[error(
        "pinning for bpftool: {0}; --bpffs-dir must be on a BPF filesystem (mount -t bpf bpf DIR)"
    )]
    Pin(String),
    /// A pin of the same name is already there (and is not this group's to remove).
    #[error(
        "pinning for bpftool: {0}: a pin of that name already exists (another balancer group pinned under the same --bpffs-dir and address, or a leftover): remove it if no controller uses it, or choose another --bpffs-dir"
    )]
    PinExists(String),
    /// Loading failed otherwise.
    #[error("loading the steering program: {0}")]
    Load(String),
}

pub(super) fn io_errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

pub(super) fn classify_ebpf(e: EbpfError) -> SteeringError {
    match io_errno(&e) {
        Some(libc::EPERM | libc::EACCES) => SteeringError::NeedsPrivilege(e.to_string()),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
            SteeringError::Unsupported(format_chain(&e))
        }
        _ => SteeringError::Load(format_chain(&e)),
    }
}

pub(super) fn classify_program(e: ProgramError) -> SteeringError {
    match &e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => match io_error.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => SteeringError::NeedsPrivilege(io_error.to_string()),
            Some(libc::EINVAL) if verifier_log.to_string().trim().is_empty() => {
                SteeringError::Unsupported(io_error.to_string())
            }
            _ => SteeringError::Rejected(e.to_string()),
        },
        _ => SteeringError::Load(format_chain(&e)),
    }
}

pub(super) fn format_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_found_through_the_error_chain() {
        let e = SteeringError::Load("x".into());
        assert_eq!(io_errno(&e), None);
        let e = EbpfError::FileError {
            path: "x".into(),
            error: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(matches!(classify_ebpf(e), SteeringError::NeedsPrivilege(_)));
        let e = EbpfError::FileError {
            path: "x".into(),
            error: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(matches!(classify_ebpf(e), SteeringError::Unsupported(_)));
    }
}
