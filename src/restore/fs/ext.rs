//! ext2/3/4 backend on ext4-view: it validates the superblock and
//! features, verifies metadata checksums, replays the journal in memory,
//! and provides listings, metadata, symlink targets and file data.
//!
//! ext4-view 1.0 exposes neither inode numbers nor link counts. While the
//! journal is clean the on-disk state is the current one, and directory
//! listings come whole from [`super::ext_raw`] (one pass over the
//! directory, one read per inode, checksums verified, chunks loaded ahead
//! in parallel). On a volume that needs recovery, ext4-view's replayed view
//! lists, and `ext_raw` only adds inode numbers and link counts from the
//! on-disk directories and inodes (they can be stale: then only hardlink
//! detection suffers; names absent from the on-disk directory get inode 0
//! and nlink 1).
//! Block-mapped (ext2/3) files with holes are read by `ext_raw` because
//! ext4-view 1.0 fails ("invalid read ... from block 0") on a sparse
//! block-mapped file whose indirect pointer is a hole. All other file data
//! is mapped (and read) by `ext_raw` too while the journal is clean (one
//! disk read per extent instead of one call per 4 KiB block); on a volume
//! that needs recovery it goes through ext4-view's replayed view.
//! Must never write, and never be moved to another thread (ext4-view is
//! `!Send`); [`super::FsHandle`] pins it.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Metadata};

use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::{Disk, Ext4Reader};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::ext_journal;
use crate::restore::fs::ext_raw::{ExtRaw, Inode};
use crate::restore::fs::tree::{child_bytes, link_bytes, Backend, Child};
use crate::restore::fs::{EntryType, Extent, Meta};

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

/// Loads the filesystem with ext4-view, which replays a journal that needs
/// it; `raw` is the same filesystem, to check that journal first.
fn load(disk: Arc<dyn Disk>, raw: &mut ExtRaw) -> Result<Ext4> {
    let head = 0..HEAD_ANNOUNCED.min(disk.size());
    disk.will_read(std::slice::from_ref(&head));
    ext_journal::check_replay(raw)?;
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
    let mut raw = ExtRaw::open(disk.clone())?;
    load(disk, &mut raw)?;
    Ok(())
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
    nlink: u64,
}

/// The listing record of node `number` called `name`; `link` is a
/// symlink's target, `broken` why it could not be read.
fn ext_child(
    name: Vec<u8>,
    number: u32,
    a: Attrs,
    link: Option<Vec<u8>>,
    broken: Option<Box<Error>>,
) -> Child<u32> {
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
        inode: u64::from(number),
        nlink: a.nlink,
    };
    Child {
        name,
        node: number,
        meta,
        link,
        broken,
    }
}

pub struct ExtBackend {
    fs: Ext4,
    raw: ExtRaw,
    /// the ext4-view file last read, to continue sequential reads cheaply
    open_file: Option<(u32, ext4_view::File)>,
}

impl ExtBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<ExtBackend> {
        let mut raw = ExtRaw::open(disk.clone())?;
        let fs = load(disk, &mut raw)?;
        Ok(ExtBackend {
            fs,
            raw,
            open_file: None,
        })
    }

    /// inode numbers of a directory's entries, from the on-disk blocks
    fn raw_numbers(&mut self, dir: u32, charge: &mut Charge) -> HashMap<Vec<u8>, u32> {
        if dir == 0 {
            return HashMap::new();
        }
        let listed = self
            .raw
            .inode(dir)
            .and_then(|ino| self.raw.read_dir(&ino, charge));
        listed.map(|v| v.into_iter().collect()).unwrap_or_default()
    }

    fn child(
        &mut self,
        name: Vec<u8>,
        number: u32,
        md: &Metadata,
        path: &[u8],
    ) -> Result<Child<u32>> {
        let what = String::from_utf8_lossy(path).into_owned();
        let ft = md.file_type();
        let kind = if ft.is_regular_file() {
            EntryType::File
        } else if ft.is_dir() {
            EntryType::Dir
        } else if ft.is_symlink() {
            EntryType::Symlink
        } else if ft.is_block_dev() {
            EntryType::Block
        } else if ft.is_char_dev() {
            EntryType::Char
        } else if ft.is_fifo() {
            EntryType::Fifo
        } else {
            EntryType::Socket
        };
        // an unreadable symlink target must not hide its siblings: the
        // error is kept for whoever follows the link
        let (link, broken) = if kind == EntryType::Symlink {
            let target = ext4_view::Path::try_from(path)
                .map_err(|_| Error::invalid_path(format!("{what}: malformed path")))
                .and_then(|p| self.fs.read_link(p).map_err(|e| map_err(&what, e)));
            match target {
                Ok(t) => (Some(t.as_ref().to_vec()), None),
                Err(e) => (None, Some(Box::new(e))),
            }
        } else {
            (None, None)
        };
        let nlink = match number {
            0 => 1,
            n => self.raw.inode(n).map(|i| u64::from(i.links)).unwrap_or(1),
        };
        let attrs = Attrs {
            kind,
            size: md.len(),
            mode: u32::from(md.mode()),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.modified().seconds(),
            nlink,
        };
        Ok(ext_child(name, number, attrs, link, broken))
    }

    /// Whether `ext_raw` reads this file's data: with a clean journal the
    /// on-disk block maps are the current ones, read whole (ext4-view reads
    /// one 4 KiB block per call, which halved fs.read against image.read);
    /// sparse block-mapped files are always read here (see the module doc).
    fn raw_is_current(&mut self, ino: &Inode) -> Result<bool> {
        Ok(!self.raw.needs_recovery() || (!ino.uses_extents() && self.raw.is_sparse(ino)?))
    }

    /// A directory's children from [`ExtRaw::list_dir`]: one pass over the
    /// directory and one read of each inode, instead of ext4-view's pass
    /// plus a second one for inode numbers and link counts. Only while the
    /// journal is clean, when the on-disk state is the current one.
    fn read_dir_raw(&mut self, dir: u32, charge: &mut Charge) -> Result<Vec<Child<u32>>> {
        let mut out = Vec::new();
        // `list_dir` needs the reader and so does a symlink's target: the
        // targets are read once the listing is done
        let mut links = Vec::new();
        self.raw.list_dir(dir, charge, &mut |name, ino, charge| {
            let kind = EntryType::from_unix_mode(u32::from(ino.mode)).ok_or_else(|| {
                Error::corrupt(format!(
                    "ext filesystem: inode {} has an invalid file type (mode {:o})",
                    ino.number, ino.mode
                ))
            })?;
            if kind == EntryType::Symlink {
                // a symlink's inode holds its target (or where it is)
                charge.add(std::mem::size_of::<(usize, Inode)>())?;
                links.push((out.len(), ino.clone()));
            }
            let attrs = Attrs {
                kind,
                size: ino.size,
                mode: u32::from(ino.mode),
                uid: ino.uid,
                gid: ino.gid,
                mtime: ino.mtime,
                nlink: u64::from(ino.links),
            };
            charge.add(child_bytes::<u32>(name.len(), 0))?;
            out.push(ext_child(name, ino.number, attrs, None, None));
            Ok(())
        })?;
        for (i, ino) in links {
            // as in `child`: a broken target must not hide the siblings
            let Some(child) = out.get_mut(i) else {
                continue;
            };
            match self.raw.link_target(&ino) {
                Ok(t) => {
                    charge.add(link_bytes(t.len()))?;
                    child.link = Some(t);
                }
                Err(e) => child.broken = Some(Box::new(e)),
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
        let md = self.fs.metadata("/").map_err(|e| map_err("/", e))?;
        self.child(Vec::new(), ROOT_INODE, &md, b"/")
    }

    fn read_dir(&mut self, dir: &u32, path: &[u8], charge: &mut Charge) -> Result<Vec<Child<u32>>> {
        if *dir != 0 && !self.raw.needs_recovery() {
            return self.read_dir_raw(*dir, charge);
        }
        let what = String::from_utf8_lossy(path).into_owned();
        let p = ext4_view::Path::try_from(path)
            .map_err(|_| Error::invalid_path(format!("{what}: malformed path")))?;
        let numbers = self.raw_numbers(*dir, charge);
        let mut found = Vec::new();
        for e in self.fs.read_dir(p).map_err(|e| map_err(&what, e))? {
            let e = e.map_err(|e| map_err(&what, e))?;
            let name = e.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let md = e.metadata().map_err(|e| map_err(&what, e))?;
            charge.add(std::mem::size_of::<(Vec<u8>, Metadata)>() + name.len() + 16)?;
            found.push((name, md));
        }
        let mut out = Vec::with_capacity(found.len());
        for (name, md) in found {
            let mut child_path = path.to_vec();
            if child_path != b"/" {
                child_path.push(b'/');
            }
            child_path.extend_from_slice(&name);
            let number = numbers.get(&name).copied().unwrap_or(0);
            let child = self.child(name, number, &md, &child_path)?;
            charge.add(child_bytes::<u32>(
                child.name.len(),
                child.link.as_ref().map_or(0, Vec::len),
            ))?;
            out.push(child);
        }
        Ok(out)
    }

    fn read_at(&mut self, node: &u32, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize> {
        if *node != 0 {
            let ino: Inode = self.raw.inode(*node)?;
            if !ino.is_encrypted() && self.raw_is_current(&ino)? {
                return self.raw.read(&ino, offset, buf);
            }
        }
        self.read_view(*node, path, offset, buf)
    }

    fn map_at(&mut self, node: &u32, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        if *node == 0 {
            return Ok(None);
        }
        let ino: Inode = self.raw.inode(*node)?;
        if ino.is_encrypted() || !self.raw_is_current(&ino)? {
            return Ok(None);
        }
        self.raw.map(&ino, offset, len).map(Some)
    }

    fn what(&self) -> &str {
        "ext filesystem"
    }
}
