//! FAT12/16/32 backend (long names included) on the fatfs crate, fed by a
//! cursor whose `Write` refuses every write.
//!
//! FAT has no owners, modes, inodes or links: entries get uid/gid 0, mode
//! 0755 (dirs) / 0644 (files) minus write bits for read-only ones, inode 0
//! and nlink 1; timestamps are taken as UTC. Short names (and labels) are
//! decoded from code page 437 (see [`cp437`]). Names match exactly first,
//! then case-insensitively, as on Windows. Must never write.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fatfs::{FileSystem, FsOptions};

use crate::calendar::days_from_civil;
use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::{Disk, DiskCursor};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::cp437::{self, CP437};
use crate::restore::fs::tree::{child_bytes, Backend, Child};
use crate::restore::fs::{EntryType, Meta};
use crate::restore::probe::{FsKind, Probe};

type Fat = FileSystem<FatCursor>;
type FatDir<'a> = fatfs::Dir<'a, FatCursor>;

/// Most entries in one directory: FAT allows 65,536 32-byte slots, and a
/// cluster chain that loops back would otherwise yield entries forever.
const MAX_DIR_ENTRIES: usize = 65_536;
/// Most bytes one directory scan may read: its 65,536 slots (2 MiB) and
/// the FAT entries of their clusters, with room to spare. fatfs skips
/// deleted and long-name slots inside one step of its iterator, so a
/// looping cluster chain holding only those never yields an entry for
/// [`MAX_DIR_ENTRIES`] to count: only the bytes read show the loop.
const DIR_SCAN_BYTES: u64 = 4 << 20;
/// No read noted yet; no scan under way.
const NONE: u64 = u64::MAX;

/// What the cursor notes of fatfs's reads, shared with the backend.
struct Watch {
    /// Where the last read started. fatfs does not tell a directory's
    /// first cluster, but the first read of a directory's entries starts
    /// there, so that offset names the directory (see
    /// [`FatBackend::dir_identity`]).
    last_read: AtomicU64,
    /// Bytes the directory scan under way may still read ([`NONE`]: no
    /// scan, no limit).
    scan_left: AtomicU64,
}

/// The volume as fatfs reads it, watched (see [`Watch`]).
pub struct FatCursor {
    disk: DiskCursor,
    watch: Arc<Watch>,
}

impl Read for FatCursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.watch.scan_left.load(Ordering::Relaxed);
        if left != NONE {
            let want = buf.len() as u64;
            if want > left {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a directory reads more than {} MiB, more than 65,536 entries take \
                         (its cluster chain loops)",
                        DIR_SCAN_BYTES >> 20
                    ),
                ));
            }
            self.watch.scan_left.store(left - want, Ordering::Relaxed);
        }
        let at = self.disk.stream_position()?;
        self.watch.last_read.store(at, Ordering::Relaxed);
        self.disk.read(buf)
    }
}

/// A directory scan under way: reads are counted against
/// [`DIR_SCAN_BYTES`] until it is dropped.
struct DirScan<'a>(&'a Watch);

impl<'a> DirScan<'a> {
    fn start(watch: &'a Watch) -> DirScan<'a> {
        watch.scan_left.store(DIR_SCAN_BYTES, Ordering::Relaxed);
        DirScan(watch)
    }
}

impl Drop for DirScan<'_> {
    fn drop(&mut self) {
        self.0.scan_left.store(NONE, Ordering::Relaxed);
    }
}

impl Seek for FatCursor {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.disk.seek(pos)
    }
}

impl Write for FatCursor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.disk.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    if let Some(ours) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        return Error::new(ours.kind, format!("{what}: {}", ours.message));
    }
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::InvalidData
        | std::io::ErrorKind::InvalidInput
        | std::io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    };
    let text = if kind == ErrorKind::Corrupt {
        format!("{what}: corrupt FAT filesystem: {e}")
    } else {
        format!("{what}: {e}")
    };
    Error::new(kind, text)
}

fn open_fs(disk: Arc<dyn Disk>) -> Result<(Fat, Arc<Watch>)> {
    let opts = FsOptions::new()
        .update_accessed_date(false)
        .oem_cp_converter(&CP437);
    let watch = Arc::new(Watch {
        last_read: AtomicU64::new(NONE),
        scan_left: AtomicU64::new(NONE),
    });
    let cursor = FatCursor {
        disk: DiskCursor::new(disk),
        watch: watch.clone(),
    };
    match catch_unwind(AssertUnwindSafe(|| FileSystem::new(cursor, opts))) {
        Ok(Ok(fs)) => Ok((fs, watch)),
        Ok(Err(e)) => Err(io_err("FAT filesystem", e)),
        Err(_) => Err(Error::corrupt(
            "FAT filesystem: the reader failed on the boot sector: corrupt filesystem",
        )),
    }
}

/// Describes the FAT filesystem on `disk` (`head` = its first bytes).
pub fn probe(disk: Arc<dyn Disk>, head: &[u8]) -> Probe {
    let fat32 = head.get(0x52..0x5A) == Some(b"FAT32   ");
    let (label_at, id_at) = if fat32 { (0x47, 0x43) } else { (0x2B, 0x27) };
    let id = head
        .get(id_at..id_at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    let mut probe = Probe {
        fs: Some(FsKind::Vfat),
        label: head.get(label_at..label_at + 11).and_then(cp437::label),
        uuid: Some(format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF)),
        ..Probe::default()
    };
    match open_fs(disk) {
        Ok((fs, watch)) => {
            let _scan = DirScan::start(&watch);
            let root_label =
                catch_unwind(AssertUnwindSafe(|| fs.read_volume_label_from_root_dir()));
            if let Ok(Ok(Some(l))) = root_label {
                let l = l.trim_end().to_string();
                probe.label = (!l.is_empty()).then_some(l);
            }
        }
        Err(e) => probe.unsupported = Some(e),
    }
    if probe.label.as_deref() == Some("NO NAME") {
        probe.label = None;
    }
    probe
}

fn unix_time(t: fatfs::DateTime) -> i64 {
    let d = t.date;
    let days = days_from_civil(
        i64::from(d.year),
        i64::from(d.month.clamp(1, 12)),
        i64::from(d.day.max(1)),
    );
    days * 86400
        + i64::from(t.time.hour) * 3600
        + i64::from(t.time.min) * 60
        + i64::from(t.time.sec)
}

/// An open FAT filesystem; [`FatBackend`] borrows it.
pub struct FatVolume {
    fs: Fat,
    watch: Arc<Watch>,
}

/// Opens the FAT filesystem on `disk`.
pub fn open(disk: Arc<dyn Disk>) -> Result<FatVolume> {
    let (fs, watch) = open_fs(disk)?;
    Ok(FatVolume { fs, watch })
}

/// A FAT node: directories and files are kept as fatfs handles, so reads
/// need no lookup by name.
#[derive(Clone)]
pub enum FatNode<'a> {
    Dir(FatDir<'a>),
    File(fatfs::File<'a, FatCursor>),
}

pub struct FatBackend<'a> {
    fs: &'a Fat,
    /// what the cursor notes of the volume's reads
    watch: &'a Watch,
    /// the file last read and its path, to continue sequential reads
    /// without walking the cluster chain from the start
    reading: Option<(Vec<u8>, fatfs::File<'a, FatCursor>)>,
}

impl<'a> FatBackend<'a> {
    pub fn new(volume: &'a FatVolume) -> FatBackend<'a> {
        FatBackend {
            fs: &volume.fs,
            watch: &volume.watch,
            reading: None,
        }
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn meta_of(e: &fatfs::DirEntry<'_, FatCursor>) -> Meta {
    let dir = e.is_dir();
    let mut mode = if dir { 0o755 } else { 0o644 };
    if e.attributes().contains(fatfs::FileAttributes::READ_ONLY) {
        mode &= !0o222;
    }
    Meta {
        kind: if dir { EntryType::Dir } else { EntryType::File },
        size: if dir { 0 } else { e.len() },
        mode,
        uid: 0,
        gid: 0,
        mtime: unix_time(e.modified()),
        // FAT keeps modification times to 2 seconds
        mtime_ns: 0,
        // clusters are taken in order: names order the walk well enough
        born: 0,
        inode: 0,
        nlink: 1,
        rdev: None,
    }
}

impl<'a> Backend for FatBackend<'a> {
    type Node = FatNode<'a>;

    fn root(&mut self) -> Result<Child<FatNode<'a>>> {
        Ok(Child {
            name: Vec::new(),
            node: FatNode::Dir(self.fs.root_dir()),
            meta: Meta {
                kind: EntryType::Dir,
                size: 0,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_ns: 0,
                born: 0,
                inode: 0,
                nlink: 1,
                rdev: None,
            },
            link: None,
            damaged: None,
        })
    }

    fn read_dir(
        &mut self,
        dir: &FatNode<'a>,
        path: &[u8],
        charge: &mut Charge,
    ) -> Result<Vec<Child<FatNode<'a>>>> {
        let FatNode::Dir(d) = dir else {
            return Err(Error::new(
                ErrorKind::NotADirectory,
                format!("{}: not a directory", show(path)),
            ));
        };
        let _scan = DirScan::start(self.watch);
        let mut out = Vec::new();
        for (i, e) in d.iter().enumerate() {
            if i >= MAX_DIR_ENTRIES {
                return Err(Error::corrupt(format!(
                    "{}: corrupt FAT filesystem: more than {MAX_DIR_ENTRIES} directory entries \
                     (its cluster chain loops)",
                    show(path)
                )));
            }
            let e = e.map_err(|e| io_err(&show(path), e))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            charge.add(child_bytes::<FatNode<'a>>(name.len(), 0))?;
            let node = if e.is_dir() {
                FatNode::Dir(e.to_dir())
            } else {
                FatNode::File(e.to_file())
            };
            out.push(Child {
                name: name.into_bytes(),
                node,
                meta: meta_of(&e),
                link: None,
                damaged: None,
            });
        }
        Ok(out)
    }

    fn read_at(
        &mut self,
        node: &FatNode<'a>,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let FatNode::File(file) = node else {
            return Err(Error::new(
                ErrorKind::IsADirectory,
                format!("{}: is a directory", show(path)),
            ));
        };
        let reuse = match self.reading.take() {
            Some((p, mut f)) if p == path => {
                (f.stream_position().ok() == Some(offset)).then_some(f)
            }
            _ => None,
        };
        let mut f = match reuse {
            Some(f) => f,
            None => {
                let mut f = file.clone();
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| io_err(&show(path), e))?;
                f
            }
        };
        let mut done = 0;
        while done < buf.len() {
            let n = f
                .read(&mut buf[done..])
                .map_err(|e| io_err(&show(path), e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        self.reading = Some((path.to_vec(), f));
        Ok(done)
    }

    /// Where the directory's entries start on the volume (its first
    /// cluster), noted from the read of its first entry; `None` for an
    /// empty directory without clusters, which cannot loop.
    fn dir_identity(&mut self, dir: &FatNode<'a>, path: &[u8]) -> Result<Option<u64>> {
        let FatNode::Dir(d) = dir else {
            return Ok(None);
        };
        self.watch.last_read.store(NONE, Ordering::Relaxed);
        let scan = DirScan::start(self.watch);
        if let Some(Err(e)) = d.iter().next() {
            return Err(io_err(&show(path), e));
        }
        drop(scan);
        let at = self.watch.last_read.load(Ordering::Relaxed);
        Ok((at != NONE).then_some(at))
    }

    fn case_insensitive(&mut self, _dir: &Self::Node) -> bool {
        true
    }

    fn what(&self) -> &str {
        "FAT filesystem"
    }
}
