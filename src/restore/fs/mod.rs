//! One open filesystem of a volume, browsed and read by path.
//!
//! Owns: the [`Entry`] metadata record, the [`Filesystem`] trait the API
//! layer uses, and [`FsHandle`], which pins a filesystem reader (some are
//! `!Send`) to its own thread. The per-filesystem backends live in the
//! submodules; path resolution and the walk for extraction are shared in
//! [`tree`]. Must never write to a disk.

use serde::Serialize;

use crate::error::Result;

pub mod btrfs;
mod btrfs_csum;
mod btrfs_tree;
mod budget;
mod cp437;
pub mod ext;
mod ext_journal;
mod ext_raw;
mod ext_xattr;
pub mod fat;
mod handle;
mod lznt1;
mod lzo;
mod lzx;
pub mod ntfs;
mod ntfs_link;
mod tree;
mod wof;
mod xattr;
pub mod xfs;
mod xfs_attr;
mod xfs_log;
mod xfs_replay;
mod xpress;

pub(crate) use budget::Charge;
pub use budget::{listing_limit, set_listing_limit};
pub use handle::FsHandle;
pub use xattr::Xattr;

/// The type of a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Block,
    Char,
    Fifo,
    Socket,
}

impl EntryType {
    /// The type encoded in the top bits of a Unix `st_mode`.
    pub fn from_unix_mode(mode: u32) -> Option<EntryType> {
        Some(match mode & 0o170000 {
            0o100000 => EntryType::File,
            0o040000 => EntryType::Dir,
            0o120000 => EntryType::Symlink,
            0o060000 => EntryType::Block,
            0o020000 => EntryType::Char,
            0o010000 => EntryType::Fifo,
            0o140000 => EntryType::Socket,
            _ => return None,
        })
    }
}

/// Metadata of one file, directory or other node, as `fs.list` and
/// `fs.stat` return it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// the name, lossy UTF-8
    pub name: String,
    /// standard base64 of the raw name, only when it is not valid UTF-8
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub size: u64,
    /// permission bits including suid/sgid/sticky, without the type bits
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// seconds since the Unix epoch
    pub mtime: i64,
    /// nanoseconds past `mtime` (0 where the filesystem keeps none)
    pub mtime_ns: u32,
    /// symlink target, lossy UTF-8
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// standard base64 of the raw symlink target, only when it is not valid
    /// UTF-8
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_b64: Option<String>,
    /// inode or file record number; 0 where the filesystem has none (FAT)
    pub inode: u64,
    pub nlink: u64,
    /// a character or block device's number
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<Device>,
    /// Why this entry could not be read (its inode is damaged or lost):
    /// such an entry is listed apart, never as one with these fields.
    #[serde(skip)]
    pub error: Option<String>,
}

/// What a listing keeps of a node besides its name and symlink target:
/// the [`Entry`] fields that need no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: EntryType,
    pub size: u64,
    /// permission bits including suid/sgid/sticky, without the type bits
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// seconds since the Unix epoch
    pub mtime: i64,
    /// nanoseconds past `mtime`, below 10^9 (0 where the filesystem keeps
    /// none)
    pub mtime_ns: u32,
    /// when the node was made, in nanoseconds since the epoch (0 where the
    /// filesystem does not say): walks visit siblings in this order, which
    /// is mostly the order in which their data was written, and lies
    pub born: u64,
    /// inode or file record number; 0 where the filesystem has none (FAT)
    pub inode: u64,
    pub nlink: u64,
    /// a character or block device's number (`None` for other types)
    pub rdev: Option<Device>,
}

/// A time as nanoseconds since the epoch, for ordering: 0 before it.
pub fn epoch_nanos(secs: i64, nanos: u32) -> u64 {
    u64::try_from(secs)
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .and_then(|n| n.checked_add(u64::from(nanos)))
        .unwrap_or(if secs < 0 { 0 } else { u64::MAX })
}

/// A device number, as `makedev(major, minor)` takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Device {
    pub major: u32,
    pub minor: u32,
}

impl Device {
    /// A device number as Linux encodes it in 32 bits (`new_encode_dev`):
    /// the minor's low byte, the major's 12 bits, the minor's upper 12.
    pub fn from_linux(dev: u32) -> Device {
        Device {
            major: (dev & 0xF_FF00) >> 8,
            minor: (dev & 0xFF) | ((dev >> 12) & 0xF_FF00),
        }
    }
}

impl Entry {
    /// The entry of a node called `name` (raw bytes), with its symlink
    /// target when it is one.
    pub fn new(name: &[u8], meta: &Meta, target: Option<&[u8]>) -> Entry {
        let mut e = Entry {
            name: String::new(),
            name_b64: None,
            kind: meta.kind,
            size: meta.size,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            mtime_ns: meta.mtime_ns,
            target: None,
            target_b64: None,
            inode: meta.inode,
            nlink: meta.nlink,
            rdev: meta.rdev,
            error: None,
        };
        e.set_name(name);
        if let Some(t) = target {
            e.set_target(t);
        }
        e
    }

    /// Sets `name` (and `name_b64` when `raw` is not UTF-8).
    pub fn set_name(&mut self, raw: &[u8]) {
        (self.name, self.name_b64) = text_and_b64(raw);
    }

    /// Sets a symlink's `target` (and `target_b64` when `raw` is not UTF-8).
    pub fn set_target(&mut self, raw: &[u8]) {
        let (text, b64) = text_and_b64(raw);
        self.target = Some(text);
        self.target_b64 = b64;
    }
}

/// Bytes as JSON can carry them: lossy UTF-8, plus standard base64 of the
/// exact bytes when they are not UTF-8.
pub fn text_and_b64(raw: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(raw) {
        Ok(s) => (s.to_string(), None),
        Err(_) => {
            use base64::Engine;
            (
                String::from_utf8_lossy(raw).into_owned(),
                Some(base64::engine::general_purpose::STANDARD.encode(raw)),
            )
        }
    }
}

/// One node met by [`Filesystem::walk`].
#[derive(Clone, Debug)]
pub struct WalkEntry {
    /// Path relative to the parent of the walked path, `/`-separated, never
    /// containing `.` or `..` components: walking `/etc` yields `etc`,
    /// `etc/passwd`, ...; walking `/` yields `bin`, `bin/ls`, ...
    pub path: Vec<u8>,
    pub entry: Entry,
    /// For a symlink: its target, raw bytes (`entry.target` is lossy).
    pub link_target: Option<Vec<u8>>,
    /// For a non-directory whose inode was already met in this walk: the
    /// relative path it was first met at (emit a hardlink to it).
    pub hardlink_to: Option<Vec<u8>>,
    /// Its extended attributes, sorted by name, when the walk was asked for
    /// them (empty otherwise).
    pub xattrs: Vec<Xattr>,
}

/// Sequential reader of one file's data during a walk.
pub trait FileData {
    /// Reads the next bytes; `Ok(0)` at the end of the file.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize>;
    /// Where the file's data lies, when it has holes: `(offset, length)`
    /// regions in order, everything else reading as zeros. `None` when the
    /// filesystem cannot tell, the holes are fewer than `min_holes` bytes,
    /// or there are more than `max` regions.
    fn data_regions(&mut self, _min_holes: u64, _max: usize) -> Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
    /// Reads on from byte `pos` of the file.
    fn seek(&mut self, pos: u64);
}

/// The callback of [`Filesystem::walk`]: called for each node in pre-order
/// (a directory before its children, siblings by creation time, inode
/// number, then name: the order in which their data mostly lies). `data` is
/// `Some` for regular files, hardlinks to an earlier entry included.
/// Returning an error stops the walk with that error.
pub type WalkVisitor<'a> = dyn FnMut(&WalkEntry, Option<&mut dyn FileData>) -> Result<()> + 'a;

/// Where a piece of a file's data lies on its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes stored at byte `offset` of the volume
    Disk { offset: u64, len: u64 },
    /// `len` bytes that read as zeros (a hole, an unwritten extent)
    Zero { len: u64 },
}

impl Extent {
    /// Bytes this extent holds.
    pub fn bytes(&self) -> u64 {
        match *self {
            Extent::Disk { len, .. } | Extent::Zero { len } => len,
        }
    }
}

/// The data of a file range as volume extents, see [`Filesystem::map`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMap {
    /// in file order; their lengths add up to the bytes the range holds
    pub extents: Vec<Extent>,
    /// whether the range reaches the end of the file
    pub eof: bool,
}

/// One open filesystem, used from one thread.
pub trait Filesystem {
    /// The entries of directory `path` (symlinks on the way followed),
    /// sorted by name bytes, `.`/`..` left out, from `cursor` on, at most
    /// `limit`; the cursor of the next page or `None` at the end.
    fn list(
        &mut self,
        path: &[u8],
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, Option<String>)>;
    /// The entry at `path`; a final symlink is followed when `follow`.
    fn stat(&mut self, path: &[u8], follow: bool) -> Result<Entry>;
    /// The extended attributes of the node at `path`, sorted by name (see
    /// [`Xattr`]); empty where the filesystem has none.
    fn xattrs(&mut self, path: &[u8], follow: bool) -> Result<Vec<Xattr>>;
    /// Up to `len` bytes of the file at `path` from `offset`, and whether
    /// the end of the file was reached.
    fn read(&mut self, path: &[u8], offset: u64, len: usize) -> Result<(Vec<u8>, bool)>;
    /// Where the bytes [`read`](Self::read) would return lie on the volume,
    /// so that the caller can fetch them itself (straight from the chunk
    /// pool, in parallel with other requests). `None` when this filesystem
    /// cannot say (the data is not stored as plain volume blocks, or a
    /// recovered journal replaces some of them): use `read` then.
    fn map(&mut self, path: &[u8], offset: u64, len: usize) -> Result<Option<FileMap>>;
    /// Walks `path` (a directory, recursively, or a single node) for
    /// extraction; see [`WalkEntry`] and [`WalkVisitor`]. With `after` (a
    /// [`WalkEntry::path`]) only the nodes that come after that one and
    /// its subtree are visited: a walk that failed at a node goes on past
    /// it. With `xattrs`, each node comes with its extended attributes. A
    /// node that fails (its listing, its attributes, a loop) fails the walk
    /// with an error naming it as its [`Error::member`](crate::error::Error).
    fn walk(
        &mut self,
        path: &[u8],
        after: Option<&[u8]>,
        xattrs: bool,
        visit: &mut WalkVisitor<'_>,
    ) -> Result<()>;
}
