//! The socket array (`REUSEPORT_SOCKARRAY`) with 8-byte values, driven through the bpf
//! syscall.
//!
//! With 8-byte values the kernel answers a lookup with the socket's cookie (with 4 it answers
//! nothing readable), so the controller can check that each slot still holds its own socket,
//! and `bpftool map dump` shows the cookies. aya's own type insists on 4-byte values.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{Map, MapData, MapError},
    sys::SyscallError,
};
use balancer_common::SOCKET_VALUE_SIZE;

/// A socket array of the program, index = slot.
pub struct SockArray {
    data: MapData,
}

// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

impl SockArray {
    /// The socket array `map`; refuses any other map, and one with other than 8-byte values.
    pub fn new(map: Map) -> Result<Self, MapError> {
        let Map::ReusePortSockArray(data) = map else {
            return Err(MapError::InvalidName {
                name: "a REUSEPORT_SOCKARRAY".into(),
            });
        };
        let size = data.info()?.value_size();
        if size != SOCKET_VALUE_SIZE {
            return Err(MapError::InvalidValueSize {
                size: size as usize,
                expected: SOCKET_VALUE_SIZE as usize,
            });
        }
        Ok(Self { data })
    }

    /// Puts `socket` at `index`.
    pub fn set(&mut self, index: u32, socket: &impl AsFd) -> Result<(), MapError> {
        let value = socket.as_fd().as_raw_fd() as u64;
        self.elem(
            BPF_MAP_UPDATE_ELEM,
            "bpf_map_update_elem",
            index,
            std::ptr::addr_of!(value),
        )
    }

    /// Empties `index`.
    pub fn clear_index(&mut self, index: &u32) -> Result<(), MapError> {
        self.elem(
            BPF_MAP_DELETE_ELEM,
            "bpf_map_delete_elem",
            *index,
            std::ptr::null::<u64>(),
        )
    }

    /// The cookie of the socket at `index`; `None` when the entry is empty.
    pub fn cookie(&self, index: u32) -> Result<Option<u64>, MapError> {
        let mut cookie = 0u64;
        match self.elem(
            BPF_MAP_LOOKUP_ELEM,
            "bpf_map_lookup_elem",
            index,
            std::ptr::addr_of_mut!(cookie).cast_const(),
        ) {
            Ok(()) => Ok(Some(cookie)),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// One element command on `index`, with `value` (8 bytes, or null for a delete) as the
    /// value to write or the buffer to read into.
    fn elem(
        &self,
        cmd: libc::c_long,
        call: &'static str,
        index: u32,
        value: *const u64,
    ) -> Result<(), MapError> {
        let key = index;
        let mut attr = ElemAttr {
            map_fd: self.data.fd().as_fd().as_raw_fd() as u32,
            key: std::ptr::addr_of!(key) as u64,
            value: value as u64,
            ..ElemAttr::default()
        };
        self.call(cmd, call, &mut attr)
    }

    fn call(
        &self,
        cmd: libc::c_long,
        call: &'static str,
        attr: &mut ElemAttr,
    ) -> Result<(), MapError> {
        // SAFETY: `attr` is a valid bpf_attr prefix for the element commands; its key and value
        // pointers point at live locals of the caller (4-byte key, 8-byte value).
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if r < 0 {
            return Err(MapError::SyscallError(SyscallError {
                call,
                io_error: io::Error::last_os_error(),
            }));
        }
        Ok(())
    }
}

/// The kernel's cookie of `socket` (`SO_COOKIE`): what the socket array's lookups return.
pub fn socket_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd; optval/optlen describe `cookie`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
