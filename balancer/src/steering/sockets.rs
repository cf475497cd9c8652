//! The socket arrays: publishing the group's sockets, and handing them over to (or taking
//! them back from) another controller's arrays — a socket can be in one array at a time.
use std::time::{Duration, Instant};

use log::warn;

use super::{errors::io_errno, sock_array::socket_cookie, Steering, SteeringError, HELD_WAIT};
use crate::socket_group::SocketGroup;

impl Steering {
    /// Puts the sockets of `slots` into the socket arrays, index = slot: at start, after the
    /// group grew, and after an evacuation's shutdown and listen took one out.
    pub fn publish_sockets(
        &mut self,
        group: &SocketGroup,
        slots: std::ops::Range<u32>,
    ) -> Result<(), SteeringError> {
        for n in 0..self.instances.len() {
            for slot in slots.clone() {
                self.set_socket(group, n, slot)?;
            }
        }
        Ok(())
    }

    /// Puts slot `slot`'s socket of address `n` into that address's socket array.
    pub fn set_socket(
        &mut self,
        group: &SocketGroup,
        n: usize,
        slot: u32,
    ) -> Result<(), SteeringError> {
        let (Some(i), Some(address)) = (self.instances.get_mut(n), group.addresses.get(n)) else {
            return Ok(());
        };
        let Some(socket) = address.sockets.get(slot as usize) else {
            return Ok(());
        };
        i.sockets
            .set(slot, socket)
            .map_err(|source| SteeringError::Map {
                what: format!("publishing slot {slot}'s socket ({})", i.addr),
                source,
            })
    }

    /// The sockets the socket arrays do not hold, as (address index, slot): the entry is
    /// empty or names another socket (compared by cookie). A socket whose cookie cannot be
    /// read is not reported.
    pub fn unpublished(&self, group: &SocketGroup) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (n, (i, address)) in self.instances.iter().zip(&group.addresses).enumerate() {
            for (slot, socket) in (0..self.slots).zip(&address.sockets) {
                let Ok(ours) = socket_cookie(socket) else {
                    continue;
                };
                match i.sockets.cookie(slot) {
                    Ok(held) if held == Some(ours) => {}
                    Ok(_) => out.push((n, slot)),
                    Err(e) => warn!("reading slot {slot}'s socket array entry ({}): {e}", i.addr),
                }
            }
        }
        out
    }

    /// Attaches this program again to every address's group: a socket's owner may have
    /// attached another, and the kernel offers no way to read which one a group runs.
    pub fn reattach(&mut self, group: &SocketGroup) -> Result<(), SteeringError> {
        self.attach_all(group)
    }

    /// Publishes the sockets of slots `self.slots..slots` (after the group grew).
    pub fn add_slots(&mut self, group: &SocketGroup, slots: u32) -> Result<(), SteeringError> {
        self.publish_sockets(group, self.slots..slots)?;
        self.slots = slots;
        Ok(())
    }

    /// Takes every socket out of the socket arrays, so that a successor controller can put
    /// them into its own (a socket can be in one array at a time). Until it does, the
    /// program's selections fail and the kernel's hash picks a socket of the group.
    pub fn withdraw_sockets(&mut self) {
        for i in &mut self.instances {
            for slot in 0..self.slots {
                if let Err(e) = i.sockets.clear_index(&slot) {
                    if io_errno(&e) != Some(libc::ENOENT) {
                        warn!("withdrawing slot {slot}'s socket ({}): {e}", i.addr);
                    }
                }
            }
        }
    }

    /// After a handover failed: attaches this program again (replacing whatever the would-be
    /// successor attached) and publishes every socket, waiting for the kernel to free the
    /// successor's arrays where they still hold one.
    pub fn reclaim(&mut self, group: &SocketGroup) -> Result<(), SteeringError> {
        self.attach_all(group)?;
        let held = self.publish_sockets_but_held(group, 0..self.slots)?;
        self.publish_held(group, held)
    }

    /// Like [`Steering::publish_sockets`], but a socket still held by another socket array
    /// (`EBUSY`) is returned as (instance, slot) instead of failing.
    pub(super) fn publish_sockets_but_held(
        &mut self,
        group: &SocketGroup,
        slots: std::ops::Range<u32>,
    ) -> Result<Vec<(usize, u32)>, SteeringError> {
        let mut held = Vec::new();
        for n in 0..self.instances.len() {
            for slot in slots.clone() {
                match self.set_socket(group, n, slot) {
                    Ok(()) => {}
                    Err(e) if held_elsewhere(&e) => held.push((n, slot)),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(held)
    }

    /// Publishes the sockets another controller's array held, once the kernel has freed that
    /// array (it goes with the old program, which ours just replaced).
    pub(super) fn publish_held(
        &mut self,
        group: &SocketGroup,
        mut held: Vec<(usize, u32)>,
    ) -> Result<(), SteeringError> {
        let deadline = Instant::now() + HELD_WAIT;
        while !held.is_empty() {
            let mut still = Vec::new();
            for (n, slot) in held {
                match self.set_socket(group, n, slot) {
                    Ok(()) => {}
                    Err(e) if held_elsewhere(&e) && Instant::now() < deadline => {
                        still.push((n, slot));
                    }
                    Err(SteeringError::Map { what, source }) => {
                        return Err(SteeringError::Map {
                            what: format!("{what}; is another process holding the old program or its maps (bpftool prog show)?"),
                            source,
                        })
                    }
                    Err(e) => return Err(e),
                }
            }
            held = still;
            if !held.is_empty() {
                // Start-up (or a failed handover) only: nothing else waits on this thread.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

/// Whether a map update failed because the socket is still in another socket array.
fn held_elsewhere(e: &SteeringError) -> bool {
    matches!(e, SteeringError::Map { source, .. } if io_errno(source) == Some(libc::EBUSY))
}
