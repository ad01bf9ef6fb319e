//! A regular file being restored into a directory. Without `--force` it is
//! created under its own name, which must not exist. With `--force` it is
//! written under a temporary name beside it and renamed over the old file
//! only once complete, so that a failure or Ctrl-C in the middle of a long
//! transfer leaves the old file as it was (and the temporary one removed,
//! like every partial file).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use restore_agent::client::ClientError;

use crate::extract::{create_at, exists_or, local_io, unlinkat, Partial};

/// Temporary names made so far by this process.
static TEMPS: AtomicU64 = AtomicU64::new(0);

pub(crate) struct NewFile {
    /// The name it is written under, registered with the partial files.
    written: PathBuf,
    /// With `--force`: its temporary name in its directory.
    temp: Option<CString>,
}

impl NewFile {
    /// Creates `dir/name` (`local` names it in messages and to `partial`):
    /// the file to write, and what to do with it once written.
    pub(crate) fn create(
        partial: &Partial,
        dir: &OwnedFd,
        name: &CStr,
        local: &Path,
        force: bool,
    ) -> Result<(File, NewFile), ClientError> {
        if !force {
            let file = partial
                .create_new(local, || create_at(dir, name))
                .map_err(|e| exists_or(local, e))?;
            let new = NewFile {
                written: local.to_path_buf(),
                temp: None,
            };
            return Ok((file, new));
        }
        if is_dir_at(dir, name) {
            return Err(ClientError::local(format!(
                "{} is a directory: --force replaces files, not directories",
                local.display()
            )));
        }
        let temp = CString::new(temp_name()).map_err(|e| ClientError::local(e.to_string()))?;
        let written = local
            .parent()
            .unwrap_or(Path::new("."))
            .join(std::ffi::OsStr::from_bytes(temp.to_bytes()));
        let file = partial
            .create_new(&written, || create_at(dir, &temp))
            .map_err(|e| local_io(&written, e))?;
        let new = NewFile {
            written,
            temp: Some(temp),
        };
        Ok((file, new))
    }

    /// The file `dir/name` is complete (its data, mode and time set): with
    /// `--force` it now replaces the old one. `local` names it in messages.
    pub(crate) fn commit(
        self,
        partial: &Partial,
        dir: &OwnedFd,
        name: &CStr,
        local: &Path,
    ) -> Result<(), ClientError> {
        let result = match &self.temp {
            Some(temp) => renameat(dir, temp, name).map_err(|e| local_io(local, e)),
            None => Ok(()),
        };
        if result.is_err() {
            let _ = unlinkat(dir, self.temp.as_deref().unwrap_or(name));
        }
        partial.done(&self.written);
        result
    }

    /// The file `dir/name` failed: removes what was written (never the old
    /// file).
    pub(crate) fn abandon(self, partial: &Partial, dir: &OwnedFd, name: &CStr) {
        let _ = unlinkat(dir, self.temp.as_deref().unwrap_or(name));
        partial.done(&self.written);
    }
}

/// Makes a symlink, hard link or FIFO at `dir/name` with `make(name)`
/// (`local` names it in messages). With `--force` it is made under a
/// temporary name and renamed over what is there, so that a node that
/// cannot be made (a hard link to a missing file) leaves the old file as it
/// was; it used to be deleted first.
pub(crate) fn place_node(
    dir: &OwnedFd,
    name: &CStr,
    local: &Path,
    force: bool,
    make: impl Fn(&CStr) -> io::Result<()>,
) -> Result<(), ClientError> {
    if !force {
        return make(name).map_err(|e| exists_or(local, e));
    }
    if is_dir_at(dir, name) {
        return Err(ClientError::local(format!(
            "{} is a directory: --force replaces files, not directories",
            local.display()
        )));
    }
    let temp = CString::new(temp_name()).map_err(|e| ClientError::local(e.to_string()))?;
    make(&temp).map_err(|e| local_io(local, e))?;
    let renamed = renameat(dir, &temp, name);
    // Gone once renamed, except when it was a hard link to the file the old
    // name already linked (rename then does nothing), or the rename failed.
    let _ = unlinkat(dir, &temp);
    renamed.map_err(|e| local_io(local, e))
}

/// A name for a file being written, unused by anything else: hidden, and
/// unique to this process.
pub(crate) fn temp_name() -> String {
    let n = TEMPS.fetch_add(1, Ordering::Relaxed);
    format!(".restore-client.{}.{n}", std::process::id())
}

/// Whether `dir/name` is a directory (not following a symlink).
fn is_dir_at(dir: &OwnedFd, name: &CStr) -> bool {
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid dir fd, NUL-terminated name and a `stat` to fill.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Renames `dir/from` over `dir/to` (a file or symlink there is replaced,
/// not followed).
fn renameat(dir: &OwnedFd, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated names.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
