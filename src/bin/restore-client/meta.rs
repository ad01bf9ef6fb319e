//! Gives what `extract -o` makes the owners and the extended attributes
//! (SELinux labels, file capabilities, POSIX ACLs, user attributes) the
//! agent sends; modes and mtimes come after these (a change of owner drops
//! setuid bits and capabilities, an ACL sets the group bits).
//!
//! An owner or attribute that cannot be set (`trusted.*` and `security.*`
//! need root, the local filesystem may not take it) is counted and the
//! first failure kept for the report: the file itself is restored, as GNU
//! tar warns and goes on. Never follows a symlink: a symlink's or FIFO's
//! owner is set with `AT_SYMLINK_NOFOLLOW`, its attributes through an
//! `O_PATH` descriptor of the node itself.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use restore_agent::client::ClientError;

use crate::remote::decode_b64_or;

/// Extended attributes of one member: (name, value).
pub(crate) type Attrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What became of the owners and attributes of an extraction.
#[derive(Default)]
pub(crate) struct MetaStats {
    /// attributes set
    pub(crate) xattrs_set: u64,
    /// attributes that could not be set
    pub(crate) xattrs_failed: u64,
    /// nodes whose owner could not be set
    pub(crate) owners_failed: u64,
    /// the first failure: path, what and why
    pub(crate) first_failure: Option<String>,
}

impl MetaStats {
    fn note(&mut self, local: &Path, what: &[u8], result: io::Result<()>, xattr: bool) {
        match (result, xattr) {
            (Ok(()), true) => self.xattrs_set += 1,
            (Ok(()), false) => {}
            (Err(e), _) => {
                match xattr {
                    true => self.xattrs_failed += 1,
                    false => self.owners_failed += 1,
                }
                if self.first_failure.is_none() {
                    self.first_failure = Some(format!(
                        "{}: {}: {e}",
                        local.display(),
                        crate::fmt::printable_bytes(what)
                    ));
                }
            }
        }
    }

    /// Notes how setting owner `uid:gid` went (its name is made only for a
    /// failure: this runs for every node).
    fn note_owner(&mut self, local: &Path, (uid, gid): (u32, u32), result: io::Result<()>) {
        if result.is_err() {
            let what = format!("owner {uid}:{gid}");
            self.note(local, what.as_bytes(), result, false);
        }
    }

    /// Adds what `other` counted.
    pub(crate) fn merge(&mut self, other: MetaStats) {
        self.xattrs_set += other.xattrs_set;
        self.xattrs_failed += other.xattrs_failed;
        self.owners_failed += other.owners_failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }

    /// The report line for stderr, when some could not be set.
    pub(crate) fn warning(&self) -> Option<String> {
        let first = self.first_failure.as_deref()?;
        let mut what = Vec::new();
        if self.owners_failed > 0 {
            what.push(format!("{} owners", self.owners_failed));
        }
        if self.xattrs_failed > 0 {
            what.push(format!(
                "{} extended attributes ({} were)",
                self.xattrs_failed, self.xattrs_set
            ));
        }
        Some(format!(
            "restore-client: {} could not be set, the first: {first}",
            what.join(" and ")
        ))
    }
}

/// An owner to give: (uid, gid).
pub(crate) type Owner = Option<(u32, u32)>;

/// Gives the open file or directory `fd` (at `local`) its owner, if any,
/// then its attributes.
pub(crate) fn apply_fd(
    fd: &impl AsRawFd,
    owner: Owner,
    attrs: &Attrs,
    local: &Path,
    stats: &mut MetaStats,
) {
    if let Some((uid, gid)) = owner {
        // SAFETY: `fd` is an open descriptor.
        let rc = unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) };
        stats.note_owner(local, (uid, gid), check(rc));
    }
    set_fd(fd, attrs, local, stats);
}

/// Gives the node `name` in directory `dir` (a symlink or a FIFO) its
/// owner, if any, then its attributes, never following it.
pub(crate) fn apply_at(
    dir: &impl AsRawFd,
    name: &CStr,
    owner: Owner,
    attrs: &Attrs,
    local: &Path,
    stats: &mut MetaStats,
) {
    if let Some((uid, gid)) = owner {
        // SAFETY: `name` is NUL-terminated and `dir` is an open directory.
        let rc = unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        stats.note_owner(local, (uid, gid), check(rc));
    }
    set_at(dir, name, attrs, local, stats);
}

/// Sets `attrs` on the open file or directory `fd` (at `local`, for the
/// report).
fn set_fd(fd: &impl AsRawFd, attrs: &Attrs, local: &Path, stats: &mut MetaStats) {
    set_each(attrs, local, stats, |name, value| {
        // SAFETY: `name` is NUL-terminated, `value` is valid for its length,
        // and `fd` is an open descriptor.
        unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }
    });
}

/// Sets each of `attrs` with `set` (a setxattr call), noting how it went.
fn set_each(
    attrs: &Attrs,
    local: &Path,
    stats: &mut MetaStats,
    set: impl Fn(&CStr, &[u8]) -> libc::c_int,
) {
    for (name, value) in attrs {
        let result = c_name(name).and_then(|n| check(set(&n, value)));
        stats.note(local, name, result, true);
    }
}

/// Sets `attrs` on the node `name` in directory `dir` (a symlink or a
/// FIFO), never following it.
fn set_at(dir: &impl AsRawFd, name: &CStr, attrs: &Attrs, local: &Path, stats: &mut MetaStats) {
    if attrs.is_empty() {
        return;
    }
    // SAFETY: `name` is NUL-terminated and `dir` is an open directory.
    let raw = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    let node = match raw {
        // SAFETY: openat returned a new descriptor that nothing else owns.
        fd if fd >= 0 => unsafe { OwnedFd::from_raw_fd(fd) },
        _ => {
            let errno = io::Error::last_os_error().raw_os_error();
            for (n, _) in attrs {
                let e = io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO));
                stats.note(local, n, Err(e), true);
            }
            return;
        }
    };
    // An O_PATH descriptor takes no fsetxattr; its /proc link leads to the
    // node itself (the link is not followed again).
    let proc = CString::new(format!("/proc/self/fd/{}", node.as_raw_fd()))
        .unwrap_or_else(|_| CString::from(c"/proc/self/fd/-1"));
    set_each(attrs, local, stats, |name, value| {
        // SAFETY: both strings are NUL-terminated, `value` is valid for its
        // length.
        unsafe {
            libc::setxattr(
                proc.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }
    });
}

/// One extended attribute as `fs.stat` gives it.
#[derive(serde::Deserialize)]
struct XattrJson {
    name: String,
    #[serde(default)]
    name_b64: Option<String>,
    value: String,
}

/// The extended attributes of an `fs.stat` answer asked with `"xattrs":
/// true` (none when it has no such member).
pub(crate) fn of_stat(v: &serde_json::Value) -> Result<Attrs, ClientError> {
    let Some(list) = v.get("xattrs").filter(|l| l.is_array()) else {
        return Ok(Vec::new());
    };
    let bad = || ClientError::local("fs.stat: a malformed extended attribute from the agent");
    let list: Vec<XattrJson> = serde_json::from_value(list.clone()).map_err(|_| bad())?;
    list.into_iter()
        .map(|x| {
            let name = decode_b64_or(&x.name_b64, &x.name)?;
            let value = decode_b64_or(&Some(x.value), "").map_err(|_| bad())?;
            Ok((name, value))
        })
        .collect()
}

fn c_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the name"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
