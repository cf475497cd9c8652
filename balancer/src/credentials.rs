//! Running workers as an unprivileged user (`--user USER[:GROUP]`): the user and groups are
//! resolved once at start; in each worker, between fork and exec, every capability is dropped
//! (the bounding set too), the supplementary groups, gid and uid are set, and
//! `PR_SET_NO_NEW_PRIVS` is on, so that a bug in a worker is not the host's root, and a
//! worker cannot rewrite the controller's maps.
use std::io;

use nix::unistd::{Gid, Group, Uid, User};

/// Who the workers run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database).
    pub groups: Vec<u32>,
}

/// `--user` names nobody.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// No such user.
    #[error("--user {0}: no such user: give a user name or a numeric uid from /etc/passwd")]
    NoUser(String),
    /// No such group.
    #[error("--user ...:{0}: no such group: give a group name or a numeric gid from /etc/group")]
    NoGroup(String),
    /// The user or group database could not be read.
    #[error("--user {spec}: reading the user database: {source}")]
    Lookup {
        /// The flag's value.
        spec: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Resolves `USER[:GROUP]` (names or numeric ids).
pub fn resolve(spec: &str) -> Result<Credentials, CredentialsError> {
    let lookup = |source| CredentialsError::Lookup {
        spec: spec.to_owned(),
        source,
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).map_err(lookup)?,
        Err(_) => User::from_name(user).map_err(lookup)?,
    };
    let (uid, primary, name) = match (&found, user.parse::<u32>()) {
        (Some(u), _) => (u.uid.as_raw(), u.gid.as_raw(), Some(u.name.clone())),
        // A numeric uid without an entry: allowed, with its own number as the group.
        (None, Ok(uid)) => (uid, uid, None),
        (None, Err(_)) => return Err(CredentialsError::NoUser(user.to_owned())),
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .map_err(lookup)?
                .ok_or_else(|| CredentialsError::NoGroup(g.to_owned()))?
                .gid
                .as_raw(),
        },
    };
    let groups = match (name, group) {
        // The user's own groups when it runs as its own primary group.
        (Some(name), None) => {
            let c = std::ffi::CString::new(name)
                .map_err(|_| CredentialsError::NoUser(user.to_owned()))?;
            nix::unistd::getgrouplist(&c, Gid::from_raw(gid))
                .map_err(lookup)?
                .into_iter()
                .map(Gid::as_raw)
                .collect()
        }
        _ => vec![gid],
    };
    Ok(Credentials { uid, gid, groups })
}

/// The highest capability number the kernel might know (the bounding set is dropped up to
/// here; numbers it does not know fail with EINVAL and are skipped).
const LAST_CAP: libc::c_ulong = 63;

/// Becomes `creds` for good: runs in the worker between fork and exec, so it makes only
/// async-signal-safe calls and allocates nothing.
///
/// # Safety
/// Only between fork and exec, in the child.
pub unsafe fn become_user(creds: &Credentials) -> io::Result<()> {
    let fail = || Err(io::Error::last_os_error());
    // The bounding set first: dropping it needs CAP_SETPCAP, which setuid takes away.
    for cap in 0..=LAST_CAP {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
            return fail();
        }
    }
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    ) < 0
    {
        return fail();
    }
    if libc::setgroups(creds.groups.len(), creds.groups.as_ptr()) < 0 {
        return fail();
    }
    if libc::setresgid(creds.gid, creds.gid, creds.gid) < 0 {
        return fail();
    }
    // Leaving uid 0 clears the permitted, effective and ambient capabilities.
    if libc::setresuid(creds.uid, creds.uid, creds.uid) < 0 {
        return fail();
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
        return fail();
    }
    // There is no way back: if there were, something above did not take.
    if creds.uid != 0 && libc::setuid(0) == 0 {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_and_number() {
        let root = resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        let numeric = resolve("65534:65534").unwrap();
        assert_eq!(
            (numeric.uid, numeric.gid, numeric.groups),
            (65534, 65534, vec![65534])
        );
        assert!(matches!(
            resolve("no-such-user-balancer"),
            Err(CredentialsError::NoUser(_))
        ));
        assert!(matches!(
            resolve("root:no-such-group-balancer"),
            Err(CredentialsError::NoGroup(_))
        ));
    }
}
