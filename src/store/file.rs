//! Opening the files of a datastore: read-only, without blocking, and only
//! if they are regular files.
//!
//! A FIFO where an index, manifest or chunk file belongs made a plain open
//! wait for a writer that never comes: it froze the agent (the open ran on
//! a runtime thread, and shutdown waited for it too) or a pool worker for
//! good. A device (a symlink to /dev/zero) reads forever, and merely
//! opening some devices acts (a watchdog starts, a tape rewinds on close, a
//! tty becomes the controlling terminal). Such a file is corrupt data, and
//! is refused as such without opening it.

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading if it is a regular file. Anything else is an
/// error of kind `InvalidData` (corrupt) saying what it is.
pub fn open_regular(path: &Path) -> io::Result<File> {
    // Looked at before it is opened (devices act on open), and again after:
    // it may have been replaced in between. O_NONBLOCK: the open of a FIFO
    // put there meanwhile returns at once instead of waiting for a writer;
    // on a regular file it changes nothing. O_NOCTTY: never a terminal.
    let kind = std::fs::metadata(path)?.file_type();
    if !kind.is_file() {
        return Err(not_regular(kind));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(not_regular(kind));
    }
    Ok(file)
}

fn not_regular(kind: FileType) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a regular file but {}", describe(kind)),
    )
}

fn describe(kind: FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_and_nothing_waits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(open_regular(&file).is_ok());
        let fifo = dir.path().join("p");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, says) in [
            (fifo.as_path(), "a FIFO"),
            (dir.path(), "a directory"),
            (Path::new("/dev/zero"), "a character device"),
        ] {
            let e = open_regular(path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains(says), "{e}");
        }
        let missing = open_regular(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
