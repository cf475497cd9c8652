//! Process file descriptors: a handle on a process that a reused pid cannot redirect
//! (`pidfd_open`), readable once the process has exited, and the way to copy a descriptor
//! out of another process (`pidfd_getfd`, root or ptrace rights over it).
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Opens a pidfd for `pid`.
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Copies descriptor `target` of the process behind `pidfd` into this process.
pub fn get_fd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags, and returns a new
    // descriptor (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_our_own_descriptor_is_the_same_file() {
        let me = open(std::process::id()).unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let copy = get_fd(&me, file.as_raw_fd()).unwrap();
        let a = nix::sys::stat::fstat(&file).unwrap();
        let b = nix::sys::stat::fstat(&copy).unwrap();
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        assert!(get_fd(&me, 100_000).is_err());
    }
}
