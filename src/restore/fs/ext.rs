//! ext2/3/4 backend: [`super::ext_raw`] decides which incompatible features
//! are read and does the reading; ext4-view validates the superblock and
//! group descriptors when the filesystem is opened, where it knows the
//! features (it refuses meta_bg, mmp, ea_inode, large_dir, inline_data and
//! casefold, which `ext_raw` reads, and is then left out).
//!
//! A volume whose journal needs recovery is read through
//! [`super::ext_journal::Recovered`], which shows it as recovery would
//! leave it, so both readers see a clean filesystem: the current state.
//! Listings come whole from `ext_raw` (one pass over the directory, one
//! read per inode, checksums verified, chunks loaded ahead in parallel;
//! ext4-view 1.0 exposes neither inode numbers nor link counts). File data
//! is mapped to volume extents by `ext_raw` (one disk read per extent
//! instead of ext4-view's call per 4 KiB block; ext4-view 1.0 also fails on
//! a sparse block-mapped file whose indirect pointer is a hole), and read
//! from the pool, or here when the extents touch blocks the journal
//! replaces. Encrypted files are left to ext4-view, which refuses them.
//! Must never write, and never be moved to another thread (ext4-view is
//! `!Send`); [`super::FsHandle`] pins it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error};

use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::{Disk, Ext4Reader};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::ext_journal::{self, Recovered};
use crate::restore::fs::ext_raw::{ExtRaw, Inode, VIEW_MAX_GROUPS};
use crate::restore::fs::tree::{child_bytes, link_bytes, Backend, Child};
use crate::restore::fs::{Device, EntryType, Extent, Meta, Xattr};

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
    // ext4-view's text already says "corrupt filesystem: ..." or
    // "incompatible filesystem: ..."
    let text = format!("{what}: {e}");
    Error::new(kind, text)
}

/// Bytes at the start of a volume announced before ext4-view loads it:
/// its many small reads of the superblock and group descriptors would
/// otherwise look sequential and start read-ahead of chunks past them.
const HEAD_ANNOUNCED: u64 = 1 << 20;

/// The filesystem on `disk`, recovered if its journal needs it, for
/// ext4-view and for `ext_raw`. ext4-view is left out where it refuses a
/// feature that only changes what `ext_raw` reads anyway (where group
/// descriptors lie, directories past 2 GiB, extended attributes in inodes
/// of their own, a multiple-mount protection block), for filesystems of
/// more than [`VIEW_MAX_GROUPS`] groups (its memory), and where it would
/// take the filesystem for another size than the kernel does; it is then
/// only missed for the error an encrypted file gives.
struct Loaded {
    fs: Option<Ext4>,
    raw: ExtRaw,
    recovered: Option<Arc<Recovered>>,
}

fn load(disk: Arc<dyn Disk>) -> Result<Loaded> {
    let head = 0..HEAD_ANNOUNCED.min(disk.size());
    disk.will_read(std::slice::from_ref(&head));
    let mut raw = ExtRaw::open(disk.clone())?;
    let (disk, raw, recovered) = match ext_journal::recover(&mut raw, &disk)? {
        None => (disk, raw, None),
        Some(r) => {
            log::debug!(
                "ext filesystem: journal recovered, {} blocks",
                r.replayed_blocks()
            );
            let r = Arc::new(r);
            let disk: Arc<dyn Disk> = r.clone();
            (disk.clone(), ExtRaw::open(disk)?, Some(r))
        }
    };
    let read_anyway = raw.reads_what_ext4_view_refuses();
    // past 8 TiB ext4-view would hold more than this VM can spare
    let fs = if raw.groups() > VIEW_MAX_GROUPS || raw.ext4_view_misreads() {
        None
    } else {
        match catch_unwind(AssertUnwindSafe(|| Ext4::load(Box::new(Ext4Reader(disk))))) {
            Ok(Ok(fs)) => Some(fs),
            Ok(Err(Ext4Error::Incompatible(_))) if read_anyway => None,
            Ok(Err(e)) => return Err(map_err("ext filesystem", e)),
            Err(_) => {
                return Err(Error::corrupt(
                    "ext filesystem: the reader failed on the superblock: corrupt filesystem",
                ))
            }
        }
    };
    Ok(Loaded { fs, raw, recovered })
}

/// Ok when this agent can read the ext filesystem on `disk`, else why not.
pub fn check_supported(disk: Arc<dyn Disk>) -> Result<()> {
    load(disk).map(drop)
}

/// What a listing says of an ext node, from ext4-view or from the raw inode.
struct Attrs {
    kind: EntryType,
    size: u64,
    /// `st_mode`, type bits included
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_ns: u32,
    born: u64,
    nlink: u64,
    rdev: Option<Device>,
}

/// The listing record of node `number` called `name`; `link` is a
/// symlink's target.
fn ext_child(name: Vec<u8>, number: u32, a: Attrs, link: Option<Vec<u8>>) -> Child<u32> {
    let has_size = matches!(
        a.kind,
        EntryType::File | EntryType::Dir | EntryType::Symlink
    );
    let meta = Meta {
        kind: a.kind,
        size: if has_size { a.size } else { 0 },
        mode: a.mode & 0o7777,
        uid: a.uid,
        gid: a.gid,
        mtime: a.mtime,
        mtime_ns: a.mtime_ns,
        born: a.born,
        inode: u64::from(number),
        nlink: a.nlink,
        rdev: a.rdev,
    };
    Child {
        name,
        node: number,
        meta,
        link,
        damaged: None,
    }
}

pub struct ExtBackend {
    fs: Option<Ext4>,
    raw: ExtRaw,
    /// the journal's recovery, when the volume needed one
    recovered: Option<Arc<Recovered>>,
    /// the ext4-view file last read, to continue sequential reads cheaply
    open_file: Option<(u32, ext4_view::File)>,
}

impl ExtBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<ExtBackend> {
        let Loaded { fs, raw, recovered } = load(disk)?;
        Ok(ExtBackend {
            fs,
            raw,
            recovered,
            open_file: None,
        })
    }

    /// What a listing says of `ino`.
    fn attrs_of(ino: &Inode) -> Result<Attrs> {
        let kind = EntryType::from_unix_mode(u32::from(ino.mode)).ok_or_else(|| {
            Error::corrupt(format!(
                "ext filesystem: inode {} has an invalid file type (mode {:o})",
                ino.number, ino.mode
            ))
        })?;
        Ok(Attrs {
            kind,
            size: ino.size,
            mode: u32::from(ino.mode),
            uid: ino.uid,
            gid: ino.gid,
            mtime: ino.mtime,
            mtime_ns: ino.mtime_ns,
            born: ino.born,
            nlink: u64::from(ino.links),
            rdev: matches!(kind, EntryType::Char | EntryType::Block).then(|| ino.device()),
        })
    }

    /// A directory's children from [`ExtRaw::list_dir`]: one pass over the
    /// directory and one read of each inode.
    fn read_dir_raw(&mut self, dir: u32, charge: &mut Charge) -> Result<Vec<Child<u32>>> {
        let mut out = Vec::new();
        // `list_dir` needs the reader and so does a symlink's target: the
        // targets are read once the listing is done
        let mut links = Vec::new();
        self.raw
            .list_dir(dir, charge, &mut |name, number, ino, charge| {
                charge.add(child_bytes::<u32>(name.len(), 0))?;
                let read = ino.and_then(|ino| Self::attrs_of(ino).map(|attrs| (ino, attrs)));
                let (ino, attrs) = match read {
                    Ok(read) => read,
                    Err(e) => {
                        // listed apart, failing whoever uses it
                        out.push(Child::damaged(name, number, u64::from(number), e));
                        return Ok(());
                    }
                };
                if attrs.kind == EntryType::Symlink {
                    // a symlink's inode holds its target (or where it is)
                    charge.add(std::mem::size_of::<(usize, Inode)>())?;
                    links.push((out.len(), ino.clone()));
                }
                out.push(ext_child(name, ino.number, attrs, None));
                Ok(())
            })?;
        for (i, ino) in links {
            // an unreadable symlink target must not hide its siblings: the
            // symlink is listed apart as unreadable
            let Some(child) = out.get_mut(i) else {
                continue;
            };
            match self.raw.link_target(&ino) {
                Ok(t) => {
                    charge.add(link_bytes(t.len()))?;
                    child.link = Some(t);
                }
                Err(e) => {
                    let name = std::mem::take(&mut child.name);
                    *child = Child::damaged(name, child.node, child.meta.inode, e);
                }
            }
        }
        Ok(out)
    }

    fn read_view(
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
            let Some(fs) = &self.fs else {
                return Err(Error::unsupported(format!(
                    "{what}: encrypted files are not supported"
                )));
            };
            let mut f = fs.open(p).map_err(|e| map_err(&what, e))?;
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
        let ino = self.raw.checked_inode(ROOT_INODE)?;
        let attrs = Self::attrs_of(&ino)?;
        if attrs.kind != EntryType::Dir {
            return Err(Error::corrupt(
                "ext filesystem: the root is not a directory",
            ));
        }
        Ok(ext_child(Vec::new(), ROOT_INODE, attrs, None))
    }

    fn read_dir(
        &mut self,
        dir: &u32,
        _path: &[u8],
        charge: &mut Charge,
    ) -> Result<Vec<Child<u32>>> {
        self.read_dir_raw(*dir, charge)
    }

    fn read_at(&mut self, node: &u32, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ino: Inode = self.raw.inode(*node)?;
        if ino.is_encrypted() {
            // ext4-view says why it cannot
            return self.read_view(*node, path, offset, buf);
        }
        self.raw.read(&ino, offset, buf)
    }

    fn map_at(&mut self, node: &u32, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        let ino: Inode = self.raw.inode(*node)?;
        if ino.is_encrypted() {
            return Ok(None);
        }
        let extents = self.raw.map(&ino, offset, len)?;
        // Blocks the journal replaces are read here, through the recovery.
        if self.recovered.as_ref().is_some_and(|r| r.touches(&extents)) {
            return Ok(None);
        }
        Ok(Some(extents))
    }

    fn xattrs(&mut self, node: &u32, _path: &[u8]) -> Result<Vec<Xattr>> {
        self.raw.xattrs(*node)
    }

    fn what(&self) -> &str {
        "ext filesystem"
    }

    fn case_insensitive(&mut self, dir: &u32) -> bool {
        self.raw.inode(*dir).is_ok_and(|ino| ino.is_casefolded())
    }
}
