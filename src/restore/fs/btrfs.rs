//! btrfs, read in userspace: each subvolume's tree of inodes, directory
//! entries and file extents (inline, regular, preallocated, holes; zstd,
//! zlib and LZO compressed), on the trees and address space that
//! [`super::btrfs_tree`] reads.
//!
//! A directory's entries are its `DIR_INDEX` items; an entry that names a
//! subvolume leads to inode 256 of that subvolume's tree, found through the
//! root tree. The volume shows the top-level subvolume (id 5), so every
//! subvolume and snapshot is reached through the directories it is linked
//! in, as `mount -o subvolid=5` shows them; a subvolume nested in a
//! snapshot reads as the empty directory the kernel shows there.
//!
//! File data is checked against the checksum tree as it is read, as the
//! kernel does: a sector whose checksum fails is read from its next copy
//! (DUP or RAID1 data), and where none passes the read is an error (the
//! kernel's EIO), never data; files without checksums (`chattr +C`) are
//! read as they are. So such data is never mapped for the API to read
//! straight from the volume ([`Backend::map_at`] says `None`), and only
//! its holes are told ([`Backend::layout_at`]).
//!
//! Owns: mapping btrfs items to the [`Backend`] interface. Must never
//! write, and never hold more than a bounded number of extents or a
//! compressed extent's data (directories are charged to the listing budget
//! as they are listed). Not read (refused with 1005): RAID5/6 chunks,
//! extents on another device of a multi-device filesystem, encrypted
//! extents, the extent tree v2 and the raid stripe tree. A log tree
//! (writes `fsync`ed after the last commit) is not replayed: the volume's
//! warning says so.

use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{le16, le32, le64};
use crate::restore::disk::Disk;
use crate::restore::fs::btrfs_tree::{superblock, Key, Super, Trees, ROOT_ITEM};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::lzo;
use crate::restore::fs::tree::{child_bytes, link_bytes, Backend, Child};
use crate::restore::fs::xattr::XattrList;
use crate::restore::fs::{epoch_nanos, Device, EntryType, Extent, Meta, Xattr};
use crate::restore::probe::{FsKind, Probe};
use crate::store::blob;

// item types
const INODE_ITEM: u8 = 1;
const DIR_INDEX: u8 = 96;
/// An inode's extended attributes, keyed by the hash of their names; names
/// whose hashes collide share one item.
const XATTR_ITEM: u8 = 24;
/// Bytes of a directory or attribute item before its name: location key,
/// transid, data and name lengths, type.
const DIR_ITEM_HEAD: usize = 30;
const EXTENT_DATA: u8 = 108;
const ROOT_REF: u8 = 156;
const EXTENT_CSUM: u8 = 128;

/// Object ids: the top-level subvolume, the chunk items' owner, every
/// subvolume's root directory, and the empty directory the kernel shows
/// for a subvolume that is not linked where an entry names it.
const FS_TREE: u64 = 5;
const ROOT_DIR: u64 = 256;
const EMPTY_SUBVOL_DIR: u64 = 2;
/// The tree of data checksums, and the object id of its items (-10).
const CSUM_TREE: u64 = 7;
const EXTENT_CSUM_OBJECTID: u64 = 0u64.wrapping_sub(10);
/// An inode flag: its data has no checksums (`chattr +C`, `nodatasum`).
const INODE_NODATASUM: u64 = 1;
/// Most extents one range of a file may have: a range is at most 256 MiB
/// (the tree's map window), 65,536 extents of 4 KiB sectors; more is a
/// corrupt tree (and would hold megabytes of memory).
const MAX_RANGE_EXTENTS: usize = 1 << 17;
/// Bytes of file data read and checked at a time.
const VERIFY_WINDOW: usize = 1 << 20;

/// Largest extent btrfs compresses (128 KiB of data), with room for a
/// compressed form that came out larger than its data.
const MAX_COMPRESSED: u64 = 256 << 10;
const MAX_RAM_BYTES: u64 = 128 << 10;
/// Longest symlink target Linux allows.
const MAX_LINK: u64 = 4095;
/// What the volume's listing must say of this filesystem besides what it
/// holds.
/// `whole` says whether every chunk has a copy of all its bytes on this
/// volume's device.
fn warning(sb: &Super, whole: bool) -> Option<String> {
    let mut w = Vec::new();
    if !whole {
        w.push(format!(
            "this btrfs spans {} devices and this volume is one of them: files whose data \
             lies only on the others cannot be read",
            sb.num_devices
        ));
    }
    if sb.log_root != 0 {
        w.push(
            "this btrfs has a log tree (writes fsync'ed after its last commit, as a backup of \
             a running machine taken without a freeze has), which is not replayed: those \
             writes are missing, as after `mount -o nologreplay`"
                .to_string(),
        );
    }
    (!w.is_empty()).then(|| w.join("; "))
}

/// What the probe says of a btrfs volume.
pub fn probe(disk: Arc<dyn Disk>) -> Probe {
    match superblock(&*disk) {
        Ok(sb) => Probe {
            fs: Some(FsKind::Btrfs),
            // (RAID1 keeps a whole copy on each device: then nothing is
            // missing)
            warning: warning(
                &sb,
                sb.num_devices <= 1 || Trees::open(disk).is_ok_and(|t| t.whole_here()),
            ),
            label: sb.label,
            uuid: sb.uuid,
            unsupported: None,
        },
        Err(e) => Probe {
            fs: Some(FsKind::Btrfs),
            unsupported: Some(e),
            ..Probe::default()
        },
    }
}

/// The volume's directories and files are nodes of a subvolume's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    tree: u64,
    ino: u64,
}

/// An inode item as this reader needs it.
#[derive(Clone, Copy, Debug)]
struct Inode {
    size: u64,
    nlink: u32,
    uid: u32,
    gid: u32,
    mode: u32,
    rdev: u64,
    flags: u64,
    mtime: i64,
    mtime_ns: u32,
    /// otime, in nanoseconds since the epoch
    born: u64,
}

impl Inode {
    fn parse(b: &[u8]) -> Option<Inode> {
        (b.len() >= 160).then(|| Inode {
            size: le64(b, 16),
            nlink: le32(b, 40),
            uid: le32(b, 44),
            gid: le32(b, 48),
            mode: le32(b, 52),
            rdev: le64(b, 56),
            flags: le64(b, 64),
            mtime: le64(b, 136) as i64,
            mtime_ns: Some(le32(b, 144))
                .filter(|&ns| ns < 1_000_000_000)
                .unwrap_or(0),
            born: epoch_nanos(le64(b, 148) as i64, le32(b, 156).min(999_999_999)),
        })
    }

    fn kind(&self) -> EntryType {
        EntryType::from_unix_mode(self.mode).unwrap_or(EntryType::File)
    }

    fn meta(&self, ino: u64) -> Meta {
        let kind = self.kind();
        Meta {
            kind,
            size: if matches!(kind, EntryType::File | EntryType::Symlink) {
                self.size
            } else {
                0
            },
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_ns: self.mtime_ns,
            born: self.born,
            inode: ino,
            nlink: u64::from(self.nlink),
            // the kernel's own dev_t: 12-bit major above a 20-bit minor
            rdev: matches!(kind, EntryType::Char | EntryType::Block).then(|| Device {
                major: ((self.rdev >> 20) & 0xFFF) as u32,
                minor: (self.rdev & 0xF_FFFF) as u32,
            }),
        }
    }
}

/// One file extent item, as far as a read needs it.
#[derive(Clone, Debug)]
enum FileExtent {
    /// data kept in the item itself, maybe compressed
    Inline { compression: u8, data: Vec<u8> },
    /// `num` bytes from byte `offset` of the (decoded) extent at logical
    /// `disk`, which takes `disk_len` bytes on disk; `disk == 0` is a hole
    Regular {
        compression: u8,
        disk: u64,
        disk_len: u64,
        ram: u64,
        offset: u64,
        num: u64,
    },
    /// allocated, never written: reads as zeros
    Prealloc { num: u64 },
}

const COMPRESS_NONE: u8 = 0;
const COMPRESS_ZLIB: u8 = 1;
const COMPRESS_LZO: u8 = 2;
const COMPRESS_ZSTD: u8 = 3;

pub struct BtrfsBackend {
    trees: Trees,
    /// the last compressed extent decoded (its logical address and data):
    /// a file is read in pieces smaller than one
    decoded: Option<(u64, Rc<Vec<u8>>)>,
}

impl BtrfsBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<BtrfsBackend> {
        let mut b = BtrfsBackend {
            trees: Trees::open(disk)?,
            decoded: None,
        };
        let top = b.inode(Node {
            tree: FS_TREE,
            ino: ROOT_DIR,
        })?;
        if top.kind() != EntryType::Dir {
            return Err(b.corrupt("its root is not a directory"));
        }
        if let Some(w) = warning(&b.trees.sb, b.trees.whole_here()) {
            log::warn!("{w}");
        }
        Ok(b)
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        self.trees.corrupt(what)
    }

    fn inode(&mut self, node: Node) -> Result<Inode> {
        if node.ino == EMPTY_SUBVOL_DIR {
            return Ok(Inode {
                size: 0,
                nlink: 1,
                uid: 0,
                gid: 0,
                mode: 0o040755,
                rdev: 0,
                flags: 0,
                mtime: 0,
                mtime_ns: 0,
                born: 0,
            });
        }
        let (_, item) = self
            .trees
            .item(node.tree, node.ino, INODE_ITEM)?
            .ok_or_else(|| {
                self.corrupt(format!("subvolume {}: no inode {}", node.tree, node.ino))
            })?;
        Inode::parse(&item).ok_or_else(|| {
            self.corrupt(format!(
                "subvolume {}: inode {} is short",
                node.tree, node.ino
            ))
        })
    }

    /// Whether subvolume `child` is linked as `name` in directory `dir` of
    /// subvolume `parent` (its root backref says so): a snapshot keeps the
    /// entries of the subvolumes nested in what it copied, which lead
    /// nowhere there.
    fn linked(&mut self, parent: u64, dir: u64, name: &[u8], child: u64) -> Result<bool> {
        let root = self.trees.root_tree();
        let mut linked = false;
        let key = Key::new(parent, ROOT_REF, child);
        self.trees.scan(root, key, key, false, &mut |_, d| {
            let len = usize::from(le16(d, 16));
            linked = le64(d, 0) == dir && d.get(18..18 + len) == Some(name);
            Ok(false)
        })?;
        Ok(linked)
    }

    /// The entries of directory `dir`: (name, node).
    fn entries(&mut self, dir: Node, charge: &mut Charge) -> Result<Vec<(Vec<u8>, Node)>> {
        if dir.ino == EMPTY_SUBVOL_DIR {
            return Ok(Vec::new());
        }
        let root = self.trees.tree(dir.tree)?;
        let mut out = Vec::new();
        let mut failed = None;
        let lo = Key::new(dir.ino, DIR_INDEX, 0);
        let hi = Key::new(dir.ino, DIR_INDEX, u64::MAX);
        self.trees.scan(root, lo, hi, false, &mut |_, d| {
            let loc = Key::parse(d, 0);
            let len = usize::from(le16(d, 27));
            let Some(name) = d.get(30..30 + len).filter(|n| !n.is_empty()) else {
                failed = Some(format!("directory {}: a bad entry", dir.ino));
                return Ok(false);
            };
            charge.add(child_bytes::<Node>(name.len(), 0))?;
            out.push((name.to_vec(), loc));
            Ok(true)
        })?;
        if let Some(why) = failed {
            return Err(self.corrupt(format!("subvolume {}: {why}", dir.tree)));
        }
        let mut nodes = Vec::with_capacity(out.len());
        for (name, loc) in out {
            let node = if loc.kind == ROOT_ITEM {
                if self.linked(dir.tree, dir.ino, &name, loc.objectid)? {
                    Node {
                        tree: loc.objectid,
                        ino: ROOT_DIR,
                    }
                } else {
                    Node {
                        tree: dir.tree,
                        ino: EMPTY_SUBVOL_DIR,
                    }
                }
            } else {
                Node {
                    tree: dir.tree,
                    ino: loc.objectid,
                }
            };
            nodes.push((name, node));
        }
        Ok(nodes)
    }

    /// The extents of `node` that reach into `offset..end`, with the file
    /// offset each starts at, in file order.
    fn extents(&mut self, node: Node, offset: u64, end: u64) -> Result<Vec<(u64, FileExtent)>> {
        let root = self.trees.tree(node.tree)?;
        let mut out = Vec::new();
        let mut bad = None;
        let lo = Key::new(node.ino, EXTENT_DATA, offset);
        let hi = Key::new(node.ino, EXTENT_DATA, end.saturating_sub(1));
        self.trees.scan(root, lo, hi, true, &mut |k, d| {
            if k.objectid != node.ino || k.kind != EXTENT_DATA {
                return Ok(true);
            }
            let (compression, encryption, encoding, kind) =
                (d.get(16), d.get(17), le16(d, 18), d.get(20));
            let (Some(&compression), Some(&0), 0, Some(&kind)) =
                (compression, encryption, encoding, kind)
            else {
                bad = Some(if d.len() < 21 {
                    "a short extent item"
                } else {
                    "an encrypted or encoded extent"
                });
                return Ok(false);
            };
            let e = match kind {
                0 => FileExtent::Inline {
                    compression,
                    data: d[21..].to_vec(),
                },
                1 | 2 if d.len() >= 53 => {
                    let num = le64(d, 45);
                    if kind == 2 {
                        FileExtent::Prealloc { num }
                    } else {
                        FileExtent::Regular {
                            compression,
                            disk: le64(d, 21),
                            disk_len: le64(d, 29),
                            ram: le64(d, 8),
                            offset: le64(d, 37),
                            num,
                        }
                    }
                }
                _ => {
                    bad = Some("an extent item of unknown type");
                    return Ok(false);
                }
            };
            if out.len() == MAX_RANGE_EXTENTS {
                bad = Some("more extents in one range than its sectors");
                return Ok(false);
            }
            out.push((k.offset, e));
            Ok(true)
        })?;
        if let Some(why) = bad {
            let e = self.corrupt(format!("subvolume {} inode {}: {why}", node.tree, node.ino));
            return Err(if why.starts_with("an encrypted") {
                Error::unsupported(e.message)
            } else {
                e
            });
        }
        Ok(out)
    }

    /// The decoded bytes of a compressed extent stored as `data`, at most
    /// `ram` of them.
    fn decompress(&self, compression: u8, data: &[u8], ram: u64) -> Result<Vec<u8>> {
        let ram = ram.min(MAX_RAM_BYTES) as usize;
        let bad = |why: String| self.corrupt(format!("a compressed extent: {why}"));
        match compression {
            COMPRESS_ZSTD => {
                // the frame is followed by the zeros that pad it to a sector
                let len = zstd::zstd_safe::find_frame_compressed_size(data)
                    .map_err(|c| bad(zstd::zstd_safe::get_error_name(c).to_string()))?;
                blob::decompress_zstd(&data[..len], ram).map_err(|e| bad(e.message))
            }
            COMPRESS_ZLIB => miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, ram)
                .map_err(|e| bad(format!("{:?}", e.status))),
            COMPRESS_LZO => lzo::decompress_extent(data, self.trees.sb.sectorsize as usize, ram)
                .map_err(|why| bad(why.to_string())),
            c => Err(bad(format!("unknown compression {c}"))),
        }
    }

    /// Fills `buf` with the file's bytes from `offset` (within its size);
    /// with `checked`, data whose checksums fail is an error, never data.
    fn read_range(&mut self, node: Node, checked: bool, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        buf.fill(0);
        for (start, e) in self.extents(node, offset, end)? {
            match e {
                FileExtent::Prealloc { .. } => {}
                FileExtent::Regular { disk: 0, .. } => {}
                FileExtent::Inline { compression, data } => {
                    let data = if compression == COMPRESS_NONE {
                        data
                    } else {
                        self.decompress(compression, &data, MAX_RAM_BYTES)?
                    };
                    copy_part(buf, offset, start, &data);
                }
                FileExtent::Regular {
                    compression,
                    disk,
                    disk_len,
                    ram,
                    offset: within,
                    num,
                } => {
                    let from = offset.max(start);
                    let to = end.min(start.saturating_add(num));
                    if from >= to {
                        continue;
                    }
                    let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    let at = within.saturating_add(from - start);
                    if compression == COMPRESS_NONE {
                        let logical = disk
                            .checked_add(at)
                            .ok_or_else(|| self.corrupt("an extent past the address space"))?;
                        if checked {
                            self.read_checked(logical, dst)?;
                        } else {
                            self.trees.read_logical(logical, dst)?;
                        }
                        continue;
                    }
                    let data = self.decoded_extent(compression, disk, disk_len, ram, checked)?;
                    let src = data
                        .get(at as usize..at as usize + dst.len())
                        .ok_or_else(|| {
                            self.corrupt(format!(
                                "subvolume {} inode {}: a compressed extent shorter than its \
                                 file extent",
                                node.tree, node.ino
                            ))
                        })?;
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// The decoded data of the compressed extent at logical `disk`.
    fn decoded_extent(
        &mut self,
        compression: u8,
        disk: u64,
        disk_len: u64,
        ram: u64,
        checked: bool,
    ) -> Result<Rc<Vec<u8>>> {
        if let Some((at, data)) = &self.decoded {
            if *at == disk {
                return Ok(data.clone());
            }
        }
        if disk_len == 0 || disk_len > MAX_COMPRESSED || ram > MAX_RAM_BYTES {
            return Err(self.corrupt(format!(
                "a compressed extent of {disk_len} bytes holding {ram}"
            )));
        }
        let mut raw = vec![0u8; disk_len as usize];
        if checked {
            self.read_verified(disk, &mut raw)?;
        } else {
            self.trees.read_logical(disk, &mut raw)?;
        }
        let data = Rc::new(self.decompress(compression, &raw, ram)?);
        self.decoded = Some((disk, data.clone()));
        Ok(data)
    }

    /// Reads `buf.len()` bytes of file data at logical address `logical`,
    /// a window of whole sectors at a time, each checked against its
    /// checksum.
    fn read_checked(&mut self, logical: u64, buf: &mut [u8]) -> Result<()> {
        let sector = self.trees.sb.sectorsize;
        let mut window = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = logical + done as u64;
            let start = at - at % sector;
            let n = (buf.len() - done).min(VERIFY_WINDOW);
            let end = (at + n as u64).div_ceil(sector) * sector;
            window.resize((end - start) as usize, 0);
            self.read_verified(start, &mut window)?;
            let skip = (at - start) as usize;
            buf[done..done + n].copy_from_slice(&window[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    /// Reads the whole sectors at logical address `logical` into `buf`,
    /// checked against their checksums; where they fail, from the next copy
    /// that passes (DUP or RAID1 data), as the kernel's reads do.
    fn read_verified(&mut self, logical: u64, buf: &mut [u8]) -> Result<()> {
        self.trees.read_logical(logical, buf)?;
        let Err(failed) = self.verify(logical, buf) else {
            return Ok(());
        };
        for copy in 1.. {
            if self.trees.read_copy(logical, buf, copy).is_err() {
                break;
            }
            if self.verify(logical, buf).is_ok() {
                return Ok(());
            }
        }
        Err(failed)
    }

    /// Checks the whole sectors `data` read at logical address `logical`
    /// against the checksum tree, as the kernel's reads do. A sector the
    /// tree has no checksum for is taken as it is.
    fn verify(&mut self, logical: u64, data: &[u8]) -> Result<()> {
        let (sector, size) = (self.trees.sb.sectorsize, self.trees.sb.csum.size());
        let end = logical + data.len() as u64;
        let root = self.trees.tree(CSUM_TREE)?;
        let csum = self.trees.sb.csum;
        let mut bad = None;
        let lo = Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM, logical);
        let hi = Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM, end - 1);
        self.trees.scan(root, lo, hi, true, &mut |k, sums| {
            if k.objectid != EXTENT_CSUM_OBJECTID || k.kind != EXTENT_CSUM {
                return Ok(true);
            }
            for (i, want) in sums.chunks_exact(size).enumerate() {
                let Some(at) = (i as u64)
                    .checked_mul(sector)
                    .and_then(|o| o.checked_add(k.offset))
                    .filter(|&at| at >= logical && at < end)
                else {
                    continue;
                };
                let from = (at - logical) as usize;
                let Some(bytes) = data.get(from..from + sector as usize) else {
                    continue;
                };
                if !csum.matches(bytes, want) {
                    bad = Some(at);
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        match bad {
            Some(at) => {
                Err(self.corrupt(format!("the data at logical byte {at} fails its checksum")))
            }
            None => Ok(()),
        }
    }

    fn link_target(&mut self, node: Node, ino: &Inode) -> Result<Vec<u8>> {
        if ino.size == 0 || ino.size > MAX_LINK {
            return Err(self.corrupt(format!(
                "symlink inode {} has a target of {} bytes",
                node.ino, ino.size
            )));
        }
        let mut t = vec![0u8; ino.size as usize];
        self.read_range(node, false, 0, &mut t)?;
        Ok(t)
    }
}

/// Copies the part of `data` (file bytes from `start`) that falls in
/// `buf` (file bytes from `offset`).
fn copy_part(buf: &mut [u8], offset: u64, start: u64, data: &[u8]) {
    let end = offset + buf.len() as u64;
    let from = offset.max(start);
    let to = end.min(start.saturating_add(data.len() as u64));
    if from < to {
        buf[(from - offset) as usize..(to - offset) as usize]
            .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
    }
}

impl Backend for BtrfsBackend {
    type Node = Node;

    fn root(&mut self) -> Result<Child<Node>> {
        let node = Node {
            tree: FS_TREE,
            ino: ROOT_DIR,
        };
        let ino = self.inode(node)?;
        Ok(Child {
            name: Vec::new(),
            node,
            meta: ino.meta(node.ino),
            link: None,
            damaged: None,
        })
    }

    fn read_dir(
        &mut self,
        dir: &Node,
        _path: &[u8],
        charge: &mut Charge,
    ) -> Result<Vec<Child<Node>>> {
        let this = self.inode(*dir)?;
        if this.kind() != EntryType::Dir {
            return Err(self.corrupt(format!("inode {} is not a directory", dir.ino)));
        }
        let mut out = Vec::new();
        for (name, node) in self.entries(*dir, charge)? {
            let ino = match self.inode(node) {
                Ok(ino) if node.ino == EMPTY_SUBVOL_DIR => Inode {
                    mtime: this.mtime,
                    mtime_ns: this.mtime_ns,
                    ..ino
                },
                Ok(ino) => ino,
                Err(e) => {
                    out.push(Child::damaged(name, node, node.ino, e));
                    continue;
                }
            };
            let mut link = None;
            if ino.kind() == EntryType::Symlink {
                match self.link_target(node, &ino) {
                    Ok(t) => {
                        charge.add(link_bytes(t.len()))?;
                        link = Some(t);
                    }
                    Err(e) => {
                        out.push(Child::damaged(name, node, node.ino, e));
                        continue;
                    }
                }
            }
            out.push(Child {
                name,
                node,
                meta: ino.meta(node.ino),
                link,
                damaged: None,
            });
        }
        Ok(out)
    }

    fn read_at(&mut self, node: &Node, _path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ino = self.inode(*node)?;
        let n = ino.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let checked = ino.flags & INODE_NODATASUM == 0;
        self.read_range(*node, checked, offset, &mut buf[..n])?;
        Ok(n)
    }

    fn map_at(&mut self, node: &Node, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        // data with checksums is read through `read_at`, which checks them
        let checked = self.inode(*node)?.flags & INODE_NODATASUM == 0;
        let map = self.layout_at(node, offset, len)?;
        let data = |m: &Vec<Extent>| m.iter().any(|e| matches!(e, Extent::Disk { .. }));
        Ok(map.filter(|m| !(checked && data(m))))
    }

    fn layout_at(&mut self, node: &Node, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = offset;
        for (start, e) in self.extents(*node, offset, end)? {
            let num = match &e {
                FileExtent::Inline { .. } => return Ok(None),
                FileExtent::Regular {
                    compression, disk, ..
                } if *compression != COMPRESS_NONE && *disk != 0 => return Ok(None),
                FileExtent::Regular { num, .. } | FileExtent::Prealloc { num } => *num,
            };
            let from = pos.max(start);
            let to = end.min(start.saturating_add(num));
            if from >= to {
                continue;
            }
            if from > pos {
                out.push(Extent::Zero { len: from - pos });
            }
            match e {
                FileExtent::Regular {
                    disk,
                    offset: within,
                    ..
                } if disk != 0 => {
                    let logical = disk
                        .checked_add(within)
                        .and_then(|l| l.checked_add(from - start))
                        .ok_or_else(|| self.corrupt("an extent past the address space"))?;
                    for (at, n) in self.trees.physical(logical, to - from)? {
                        out.push(Extent::Disk { offset: at, len: n });
                    }
                }
                _ => out.push(Extent::Zero { len: to - from }),
            }
            pos = to;
        }
        if pos < end {
            out.push(Extent::Zero { len: end - pos });
        }
        Ok(Some(out))
    }

    fn inode_scope(&self, node: &Node) -> Option<u64> {
        (node.ino != EMPTY_SUBVOL_DIR).then_some(node.tree)
    }

    /// The `XATTR_ITEM`s of the inode. btrfs stores names as Linux shows
    /// them and ACLs in the kernel's form already.
    fn xattrs(&mut self, node: &Node, _path: &[u8]) -> Result<Vec<Xattr>> {
        if node.ino == EMPTY_SUBVOL_DIR {
            return Ok(Vec::new());
        }
        let root = self.trees.tree(node.tree)?;
        let mut list = XattrList::new(format!(
            "{}: subvolume {} inode {}",
            self.trees.what, node.tree, node.ino
        ));
        let mut bad = false;
        let lo = Key::new(node.ino, XATTR_ITEM, 0);
        let hi = Key::new(node.ino, XATTR_ITEM, u64::MAX);
        self.trees.scan(root, lo, hi, false, &mut |_, d| {
            let mut at = 0;
            while at < d.len() {
                let Some(head) = d.get(at..at + DIR_ITEM_HEAD) else {
                    bad = true;
                    return Ok(false);
                };
                let value_len = usize::from(le16(head, 25));
                let name_len = usize::from(le16(head, 27));
                let name_at = at + DIR_ITEM_HEAD;
                let value_at = name_at + name_len;
                let (Some(name), Some(value)) = (
                    d.get(name_at..value_at).filter(|n| !n.is_empty()),
                    d.get(value_at..value_at + value_len),
                ) else {
                    bad = true;
                    return Ok(false);
                };
                list.push(name.to_vec(), value.to_vec())?;
                at = value_at + value_len;
            }
            Ok(true)
        })?;
        if bad {
            return Err(self.corrupt(format!(
                "subvolume {}: inode {}: a bad attribute item",
                node.tree, node.ino
            )));
        }
        Ok(list.finish())
    }

    fn what(&self) -> &str {
        &self.trees.what
    }
}
