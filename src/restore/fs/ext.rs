//! ext2/3/4 backend: ext4-view for validation (features, checksums, the
//! journal) and for reading extent-mapped file data; [`super::ext_raw`] for
//! directories, inode metadata (inode numbers, link counts), symlinks and
//! block-mapped (ext2/3) file data.
//!
//! Block-mapped files are read by `ext_raw` because ext4-view 1.0 fails
//! ("invalid read ... from block 0") on a sparse block-mapped file whose
//! indirect pointer is a hole; `ext_raw` reads such holes as zeros.
//! Must never write, and never be moved to another thread (ext4-view is
//! `!Send`); [`super::FsHandle`] pins it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error};

use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::{Disk, Ext4Reader};
use crate::restore::fs::ext_raw::{ExtRaw, Inode};
use crate::restore::fs::tree::{Backend, Child};
use crate::restore::fs::{Entry, EntryType};

const ROOT_INODE: u32 = 2;

/// Maps an ext4-view error to the agent's kinds; `what` names the object.
fn map_err(what: &str, e: Ext4Error) -> Error {
    let kind = match &e {
        Ext4Error::NotFound => ErrorKind::NotFound,
        Ext4Error::NotADirectory => ErrorKind::NotADirectory,
        Ext4Error::IsADirectory => ErrorKind::IsADirectory,
        Ext4Error::Incompatible(_) | Ext4Error::Encrypted | Ext4Error::IsASpecialFile => {
            ErrorKind::Unsupported
        }
        Ext4Error::NotAbsolute
        | Ext4Error::MalformedPath
        | Ext4Error::PathTooLong
        | Ext4Error::TooManySymlinks => ErrorKind::InvalidPath,
        Ext4Error::Io(inner) => match inner.downcast_ref::<Error>() {
            Some(ours) => return Error::new(ours.kind, format!("{what}: {}", ours.message)),
            None => ErrorKind::Io,
        },
        _ => ErrorKind::Corrupt,
    };
    let text = match kind {
        ErrorKind::Unsupported => format!("{what}: unsupported ext filesystem: {e}"),
        ErrorKind::Corrupt => format!("{what}: corrupt ext filesystem: {e}"),
        _ => format!("{what}: {e}"),
    };
    Error::new(kind, text)
}

fn load(disk: Arc<dyn Disk>) -> Result<Ext4> {
    match catch_unwind(AssertUnwindSafe(|| Ext4::load(Box::new(Ext4Reader(disk))))) {
        Ok(Ok(fs)) => Ok(fs),
        Ok(Err(e)) => Err(map_err("ext filesystem", e)),
        Err(_) => Err(Error::corrupt(
            "ext filesystem: the reader failed on the superblock: corrupt filesystem",
        )),
    }
}

/// Ok when this agent can read the ext filesystem on `disk`, else why not.
pub fn check_supported(disk: Arc<dyn Disk>) -> Result<()> {
    load(disk.clone())?;
    ExtRaw::open(disk)?;
    Ok(())
}

pub struct ExtBackend {
    fs: Ext4,
    raw: ExtRaw,
    /// the ext4-view file last read, to continue sequential reads cheaply
    open_file: Option<(u32, ext4_view::File)>,
}

impl ExtBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<ExtBackend> {
        let fs = load(disk.clone())?;
        let raw = ExtRaw::open(disk)?;
        Ok(ExtBackend {
            fs,
            raw,
            open_file: None,
        })
    }

    fn child(&mut self, name: Vec<u8>, number: u32) -> Result<Child<u32>> {
        let ino = self.raw.inode(number)?;
        let kind = EntryType::from_unix_mode(u32::from(ino.mode)).ok_or_else(|| {
            Error::corrupt(format!(
                "ext filesystem: inode {number} ({}) has an invalid mode {:o}",
                String::from_utf8_lossy(&name),
                ino.mode
            ))
        })?;
        let link = if kind == EntryType::Symlink {
            Some(self.raw.link_target(&ino)?)
        } else {
            None
        };
        let mut entry = Entry {
            name: String::new(),
            name_b64: None,
            kind,
            size: ino.size,
            mode: u32::from(ino.mode) & 0o7777,
            uid: ino.uid,
            gid: ino.gid,
            mtime: ino.mtime,
            target: link
                .as_ref()
                .map(|l| String::from_utf8_lossy(l).into_owned()),
            inode: u64::from(number),
            nlink: u64::from(ino.links),
        };
        if kind != EntryType::File && kind != EntryType::Symlink && kind != EntryType::Dir {
            entry.size = 0;
        }
        entry.set_name(&name);
        Ok(Child {
            name,
            node: number,
            entry,
            link,
        })
    }

    fn read_extents(
        &mut self,
        number: u32,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let what = String::from_utf8_lossy(path).into_owned();
        let reuse =
            matches!(&self.open_file, Some((n, f)) if *n == number && f.position() == offset);
        if !reuse {
            let p = ext4_view::Path::try_from(path)
                .map_err(|_| Error::invalid_path(format!("{what}: malformed path")))?;
            let mut f = self.fs.open(p).map_err(|e| map_err(&what, e))?;
            f.seek_to(offset).map_err(|e| map_err(&what, e))?;
            self.open_file = Some((number, f));
        }
        let Some((_, f)) = self.open_file.as_mut() else {
            return Ok(0);
        };
        let mut done = 0;
        while done < buf.len() {
            match f.read_bytes(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => {
                    self.open_file = None;
                    return Err(map_err(&what, e));
                }
            }
        }
        Ok(done)
    }
}

impl Backend for ExtBackend {
    type Node = u32;

    fn root(&mut self) -> Result<Child<u32>> {
        self.child(Vec::new(), ROOT_INODE)
    }

    fn read_dir(&mut self, dir: &u32, _path: &[u8]) -> Result<Vec<Child<u32>>> {
        let ino = self.raw.inode(*dir)?;
        let names = self.raw.read_dir(&ino)?;
        let mut out = Vec::with_capacity(names.len());
        for (name, number) in names {
            if name == b"." || name == b".." {
                continue;
            }
            out.push(self.child(name, number)?);
        }
        Ok(out)
    }

    fn read_at(
        &mut self,
        node: &u32,
        _entry: &Entry,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let ino: Inode = self.raw.inode(*node)?;
        if ino.is_encrypted() {
            return Err(Error::unsupported(format!(
                "{}: encrypted files are not supported",
                String::from_utf8_lossy(path)
            )));
        }
        if ino.uses_extents() {
            self.read_extents(*node, path, offset, buf)
        } else {
            self.raw.read(&ino, offset, buf)
        }
    }

    fn what(&self) -> &str {
        "ext filesystem"
    }
}
