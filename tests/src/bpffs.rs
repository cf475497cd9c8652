//! A private BPF filesystem per test, for `--bpffs-dir`.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::unique_path;

/// A private BPF filesystem mounted for one test (for `--bpffs-dir`), unmounted on drop.
pub struct BpfFs {
    mnt: PathBuf,
}

impl BpfFs {
    /// Mounts a new bpffs instance on a fresh directory.
    pub fn mount() -> Self {
        let mnt = unique_path("bpffs");
        std::fs::create_dir_all(&mnt).unwrap();
        let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
        // SAFETY: mount(2) with valid C strings; the test owns this private mount point.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        Self { mnt }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.mnt.to_str().unwrap_or_default()) {
            // Detached: a pinned object still open somewhere must not keep the mount around.
            // SAFETY: unmounting what `mount` mounted.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "unmounting the test bpffs {}: {}",
                    self.mnt.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// Where `--bpffs-dir DIR` pins the program and maps of the IPv4 loopback address `addr`.
pub fn pinned_dir(dir: &Path, addr: SocketAddr) -> PathBuf {
    dir.join(format!("127_0_0_1_{}", addr.port()))
}
