//! Sets the extended attributes the agent sends (SELinux labels, file
//! capabilities, POSIX ACLs, user attributes) on what `extract -o` makes.
//!
//! An attribute that cannot be set (`trusted.*` and `security.*` need root,
//! the local filesystem may not take them) is counted and the first failure
//! kept for the report: the file itself is restored, as GNU tar warns and
//! goes on. Never follows a symlink: a symlink's or FIFO's attributes are
//! set through an `O_PATH` descriptor of the node itself.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use restore_agent::client::ClientError;

/// Extended attributes of one member: (name, value).
pub(crate) type Attrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What became of the attributes of an extraction.
#[derive(Default)]
pub(crate) struct XattrStats {
    /// attributes set
    pub(crate) set: u64,
    /// attributes that could not be set
    pub(crate) failed: u64,
    /// the first failure: path, name and why
    pub(crate) first_failure: Option<String>,
}

impl XattrStats {
    fn note(&mut self, local: &Path, name: &[u8], result: io::Result<()>) {
        match result {
            Ok(()) => self.set += 1,
            Err(e) => {
                self.failed += 1;
                if self.first_failure.is_none() {
                    self.first_failure = Some(format!(
                        "{}: {}: {e}",
                        local.display(),
                        crate::fmt::printable_bytes(name)
                    ));
                }
            }
        }
    }

    /// Adds what `other` counted.
    pub(crate) fn merge(&mut self, other: XattrStats) {
        self.set += other.set;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }

    /// The report line for stderr, when some could not be set.
    pub(crate) fn warning(&self) -> Option<String> {
        let first = self.first_failure.as_deref()?;
        Some(format!(
            "restore-client: {} extended attributes could not be set ({} were), the first: {first}",
            self.failed, self.set
        ))
    }
}

/// Sets `attrs` on the open file or directory `fd` (at `local`, for the
/// report).
pub(crate) fn set_fd(fd: &impl AsRawFd, attrs: &Attrs, local: &Path, stats: &mut XattrStats) {
    for (name, value) in attrs {
        let result = c_name(name).and_then(|n| {
            // SAFETY: `n` is NUL-terminated, `value` is valid for its length,
            // and `fd` is an open descriptor.
            let rc = unsafe {
                libc::fsetxattr(
                    fd.as_raw_fd(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            check(rc)
        });
        stats.note(local, name, result);
    }
}

/// Sets `attrs` on the node `name` in directory `dir` (a symlink or a
/// FIFO), never following it.
pub(crate) fn set_at(
    dir: &impl AsRawFd,
    name: &CStr,
    attrs: &Attrs,
    local: &Path,
    stats: &mut XattrStats,
) {
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
                stats.note(local, n, Err(e));
            }
            return;
        }
    };
    // An O_PATH descriptor takes no fsetxattr; its /proc link leads to the
    // node itself (the link is not followed again).
    let proc = CString::new(format!("/proc/self/fd/{}", node.as_raw_fd()))
        .unwrap_or_else(|_| CString::from(c"/proc/self/fd/-1"));
    for (n, value) in attrs {
        let result = c_name(n).and_then(|c| {
            // SAFETY: both strings are NUL-terminated, `value` is valid for its
            // length.
            let rc = unsafe {
                libc::setxattr(
                    proc.as_ptr(),
                    c.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            check(rc)
        });
        stats.note(local, n, result);
    }
}

/// The extended attributes of an `fs.stat` answer asked with `"xattrs":
/// true` (none when it has no such member).
pub(crate) fn of_stat(v: &serde_json::Value) -> Result<Attrs, ClientError> {
    let Some(list) = v.get("xattrs").and_then(serde_json::Value::as_array) else {
        return Ok(Vec::new());
    };
    let bad = || ClientError::local("fs.stat: a malformed extended attribute from the agent");
    let b64 = |m: &serde_json::Value| {
        m.as_str()
            .and_then(|t| base64_simd::STANDARD.decode_to_vec(t).ok())
    };
    list.iter()
        .map(|x| {
            let name = match x.get("name_b64") {
                Some(n) => b64(n),
                None => x
                    .get("name")
                    .and_then(serde_json::Value::as_str)
                    .map(|n| n.as_bytes().to_vec()),
            };
            let value = x.get("value").and_then(b64);
            name.zip(value).ok_or_else(bad)
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
