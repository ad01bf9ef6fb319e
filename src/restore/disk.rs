//! The disk abstraction the volume and filesystem readers sit on.
//!
//! Owns: the [`Disk`] trait (positional reads of a backed-up disk image),
//! [`Slice`] (a partition window whose reads never leave it), [`Layout`]
//! and [`Mapped`] (a volume in several runs, maybe of several disks: an LVM
//! logical volume), the adapters
//! the filesystem crates need (a `Read + Seek` cursor with a `Write` that
//! refuses everything, and an `ext4_view::Ext4Read`), and [`FileDisk`], a
//! plain image file, used by tests and tools.
//! Must never write to a disk, and never know where the bytes come from.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// A read-only disk image.
pub trait Disk: Send + Sync {
    fn size(&self) -> u64;
    /// positional read; short only at end of disk
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// Announces that `ranges` will be read soon, roughly in this order, so
    /// a disk that can load data ahead (in parallel) does. Only a hint; by
    /// default nothing happens.
    fn will_read(&self, _ranges: &[Range<u64>]) {}
}

/// Reads exactly `buf.len()` bytes at `offset`, or fails with `what` named.
pub fn read_exact_at(disk: &dyn Disk, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let pos = offset
            .checked_add(done as u64)
            .ok_or_else(|| Error::corrupt(format!("{what}: offset {offset} overflows")))?;
        let n = disk.read_at(pos, &mut buf[done..])?;
        if n == 0 {
            return Err(Error::corrupt(format!(
                "{what}: read of {} bytes at offset {offset} goes past the end of the disk ({} bytes)",
                buf.len(),
                disk.size()
            )));
        }
        done += n;
    }
    Ok(())
}

/// A window `[start, start + len)` of another disk; reads never leave it.
pub struct Slice {
    disk: Arc<dyn Disk>,
    start: u64,
    len: u64,
}

impl Slice {
    /// A window on `disk`; clipped to the disk's end so a partition table
    /// that claims more than the disk holds cannot read past it.
    pub fn new(disk: Arc<dyn Disk>, start: u64, len: u64) -> Slice {
        let size = disk.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Slice { disk, start, len }
    }
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl Disk for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let room = self.len - offset;
        let n = (buf.len() as u64).min(room) as usize;
        self.disk.read_at(self.start + offset, &mut buf[..n])
    }
    fn will_read(&self, ranges: &[Range<u64>]) {
        let inside: Vec<Range<u64>> = ranges
            .iter()
            .filter(|r| r.start < self.len)
            .map(|r| self.start + r.start..self.start + r.end.min(self.len))
            .collect();
        self.disk.will_read(&inside);
    }
}

/// Where a volume's bytes lie: runs of disk bytes in volume order (one for
/// a partition, one or more for an LVM logical volume). The runs of a
/// logical volume whose group spans several disks of a backup lie on
/// several disks: disk 0 is the one the volume was asked of, the others
/// are numbered as whoever built the layout numbered them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// (volume offset, disk, disk offset, length), the volume offsets
    /// adjoining
    runs: Vec<(u64, usize, u64, u64)>,
}

impl Layout {
    /// The window `[start, start + len)` of disk 0.
    pub fn window(start: u64, len: u64) -> Layout {
        Layout {
            runs: vec![(0, 0, start, len)],
        }
    }

    /// The runs `(disk, disk offset, length)` one after another; `None`
    /// when their lengths overflow.
    pub fn from_runs(runs: impl IntoIterator<Item = (usize, u64, u64)>) -> Option<Layout> {
        let mut size = 0u64;
        let mut out = Vec::new();
        for (disk, at, len) in runs {
            at.checked_add(len)?;
            out.push((size, disk, at, len));
            size = size.checked_add(len)?;
        }
        Some(Layout { runs: out })
    }

    pub fn size(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.0 + r.3)
    }

    /// Where the volume's first byte lies on its disk.
    pub fn start(&self) -> u64 {
        self.runs.first().map_or(0, |r| r.2)
    }

    /// Whether a run lies on `disk`.
    pub fn uses(&self, disk: usize) -> bool {
        self.runs.iter().any(|r| r.1 == disk)
    }

    /// The layout with disk `d` renumbered `number[d]` (kept when `number`
    /// has no entry for it).
    pub fn renumbered(&self, number: &[usize]) -> Layout {
        let runs = self.runs.iter();
        Layout {
            runs: runs
                .map(|&(at, d, start, len)| (at, number.get(d).copied().unwrap_or(d), start, len))
                .collect(),
        }
    }

    /// The single run of a contiguous volume on disk 0.
    pub fn as_window(&self) -> Option<(u64, u64)> {
        match self.runs.as_slice() {
            [(_, 0, start, len)] => Some((*start, *len)),
            [] => Some((0, 0)),
            _ => None,
        }
    }

    /// The disk ranges `(disk, offset, length)` of volume bytes
    /// `[offset, offset + len)`, in order; clipped to the volume's end.
    pub fn locate(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let end = offset.saturating_add(len).min(self.size());
        let first = self.runs.partition_point(|r| r.0 + r.3 <= offset);
        let mut out = Vec::new();
        for &(at, disk, start, run) in self.runs.get(first..).unwrap_or_default() {
            if at >= end {
                break;
            }
            let from = offset.max(at);
            let to = end.min(at + run);
            if to > from {
                out.push((disk, start + (from - at), to - from));
            }
        }
        out
    }

    /// The volume as a disk of its own, on `disks` (numbered as the
    /// layout's runs number them; a run on a disk not given reads as an
    /// error).
    pub fn open(&self, disks: &[Arc<dyn Disk>]) -> Arc<dyn Disk> {
        match (self.as_window(), disks.first()) {
            (Some((start, len)), Some(disk)) => Arc::new(Slice::new(disk.clone(), start, len)),
            _ => Arc::new(Mapped {
                disks: disks.to_vec(),
                layout: self.clone(),
            }),
        }
    }
}

/// A volume in several runs of other disks (see [`Layout`]); reads never
/// leave the runs. Every run lies on its disk (checked by whoever built
/// the layout).
pub struct Mapped {
    disks: Vec<Arc<dyn Disk>>,
    layout: Layout,
}

impl Disk for Mapped {
    fn size(&self) -> u64 {
        self.layout.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0usize;
        for (disk, at, len) in self.layout.locate(offset, buf.len() as u64) {
            let disk = self.disks.get(disk).ok_or_else(|| {
                Error::not_found(format!(
                    "logical volume: disk {disk} of its group is missing"
                ))
            })?;
            let part = &mut buf[done..done + len as usize];
            read_exact_at(&**disk, at, part, "logical volume")?;
            done += len as usize;
        }
        Ok(done)
    }
    fn will_read(&self, ranges: &[Range<u64>]) {
        let located: Vec<(usize, u64, u64)> = ranges
            .iter()
            .flat_map(|r| self.layout.locate(r.start, r.end.saturating_sub(r.start)))
            .collect();
        for (i, disk) in self.disks.iter().enumerate() {
            let on_disk: Vec<Range<u64>> = located
                .iter()
                .filter(|&&(d, _, _)| d == i)
                .map(|&(_, at, len)| at..at + len)
                .collect();
            if !on_disk.is_empty() {
                disk.will_read(&on_disk);
            }
        }
    }
}

/// A plain image file read with `pread`.
pub struct FileDisk {
    file: std::fs::File,
    size: u64,
    name: String,
}

impl FileDisk {
    pub fn open(path: &Path) -> Result<FileDisk> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(&name, &e))?;
        let size = file.metadata().map_err(|e| Error::io(&name, &e))?.len();
        Ok(FileDisk { file, size, name })
    }
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let mut done = 0;
        while done < n {
            match self.file.read_at(&mut buf[done..n], offset + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.name, &e)),
            }
        }
        Ok(done)
    }
}

fn to_io(err: Error) -> io::Error {
    let kind = match err.kind {
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        ErrorKind::Corrupt => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, err)
}

/// A `Read + Seek` cursor over a disk, with a `Write` that refuses every
/// write (fatfs wants a read-write device even to read).
///
/// Small reads (fatfs reads FAT entries and clusters a few hundred bytes
/// at a time, alternating between the FAT and the data area) are served
/// from a few buffered aligned blocks; large reads go straight to the disk.
pub struct DiskCursor {
    disk: Arc<dyn Disk>,
    pos: u64,
    /// (start offset, bytes), most recently used first
    blocks: Vec<(u64, Vec<u8>)>,
    /// The last read error: a parser that takes a failed read for an
    /// absent structure (mbrman does, for the first extended boot record)
    /// would otherwise hide it.
    error: Option<Error>,
}

/// Size of one buffered block.
const CURSOR_BLOCK: u64 = 64 * 1024;
/// Buffered blocks kept.
const CURSOR_BLOCKS: usize = 4;

impl DiskCursor {
    pub fn new(disk: Arc<dyn Disk>) -> DiskCursor {
        DiskCursor {
            disk,
            pos: 0,
            blocks: Vec::new(),
            error: None,
        }
    }

    /// The last read error since the previous call, if any.
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    fn noted(&mut self, err: Error) -> io::Error {
        self.error = Some(err.clone());
        to_io(err)
    }
}

impl Read for DiskCursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() as u64 >= CURSOR_BLOCK {
            let n = match self.disk.read_at(self.pos, buf) {
                Ok(n) => n,
                Err(e) => return Err(self.noted(e)),
            };
            self.pos += n as u64;
            return Ok(n);
        }
        let start = self.pos - self.pos % CURSOR_BLOCK;
        let hit = self.blocks.iter().position(|(s, _)| *s == start);
        let block = match hit {
            Some(i) => self.blocks.remove(i),
            None => {
                let mut b = vec![0u8; CURSOR_BLOCK as usize];
                let n = match self.disk.read_at(start, &mut b) {
                    Ok(n) => n,
                    Err(e) => return Err(self.noted(e)),
                };
                b.truncate(n);
                (start, b)
            }
        };
        let off = (self.pos - start) as usize;
        let n = buf.len().min(block.1.len().saturating_sub(off));
        if n > 0 {
            buf[..n].copy_from_slice(&block.1[off..off + n]);
        }
        self.pos += n as u64;
        self.blocks.insert(0, block);
        self.blocks.truncate(CURSOR_BLOCKS);
        Ok(n)
    }
}

impl Seek for DiskCursor {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.disk.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )),
        }
    }
}

impl Write for DiskCursor {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "backup images are read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `ext4_view::Ext4Read` over a disk: exact positional reads.
pub struct Ext4Reader(pub Arc<dyn Disk>);

impl ext4_view::Ext4Read for Ext4Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        read_exact_at(&*self.0, start_byte, dst, "ext filesystem").map_err(|e| e.into())
    }
}

/// A disk in memory, for unit tests.
#[cfg(test)]
pub(crate) struct MemDisk(pub Vec<u8>);

#[cfg(test)]
impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let from = usize::try_from(offset).map_or(self.0.len(), |o| o.min(self.0.len()));
        let n = buf.len().min(self.0.len() - from);
        buf[..n].copy_from_slice(&self.0[from..from + n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_of(data: &[u8]) -> (tempfile::TempDir, Arc<dyn Disk>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, data).unwrap();
        let d: Arc<dyn Disk> = Arc::new(FileDisk::open(&p).unwrap());
        (dir, d)
    }

    #[test]
    fn slice_reads_never_leave_the_window() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let (_t, d) = disk_of(&data);
        let s = Slice::new(d.clone(), 1000, 500);
        assert_eq!(s.size(), 500);
        let mut buf = vec![0u8; 800];
        assert_eq!(s.read_at(0, &mut buf).unwrap(), 500);
        assert_eq!(&buf[..500], &data[1000..1500]);
        assert_eq!(s.read_at(450, &mut buf).unwrap(), 50);
        assert_eq!(s.read_at(500, &mut buf).unwrap(), 0);
        assert_eq!(s.read_at(u64::MAX, &mut buf).unwrap(), 0);
        // a table claiming more than the disk holds is clipped to it
        let s = Slice::new(d.clone(), 9_900, 1 << 40);
        assert_eq!(s.size(), 100);
        assert_eq!(Slice::new(d, 1 << 50, 10).size(), 0);
    }

    #[test]
    fn a_volume_over_two_disks_reads_its_runs_in_order() {
        let a: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..1000u32).map(|i| (i % 13) as u8 + 100).collect();
        let disks: [Arc<dyn Disk>; 2] =
            [Arc::new(MemDisk(a.clone())), Arc::new(MemDisk(b.clone()))];
        // 100 bytes of a, 300 of b, 50 of a again
        let layout = Layout::from_runs([(0, 900, 100), (1, 0, 300), (0, 10, 50)]).unwrap();
        assert_eq!(layout.size(), 450);
        assert!(layout.uses(0) && layout.uses(1) && !layout.uses(2));
        assert_eq!(
            layout.locate(90, 320),
            [(0, 990, 10), (1, 0, 300), (0, 10, 10)]
        );
        let want: Vec<u8> = [&a[900..1000], &b[..300], &a[10..60]].concat();
        let vol = layout.open(&disks);
        let mut got = vec![0u8; 500];
        assert_eq!(vol.read_at(0, &mut got).unwrap(), 450);
        assert_eq!(&got[..450], &want[..]);
        let mut mid = [0u8; 20];
        vol.read_at(390, &mut mid).unwrap();
        assert_eq!(&mid[..], &want[390..410]);
        // without its second disk, a read that needs it fails (a read of
        // the first run alone does not)
        let vol = layout.open(&disks[..1]);
        assert!(vol.read_at(0, &mut got[..100]).is_ok());
        let e = vol.read_at(0, &mut got).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        // renumbered: the runs on disk 1 now on disk 3
        let moved = layout.renumbered(&[0, 3]);
        assert!(moved.uses(3) && !moved.uses(1));
        assert_eq!(moved.locate(100, 1), [(3, 0, 1)]);
    }

    #[test]
    fn cursor_reads_seeks_and_refuses_writes() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (_t, d) = disk_of(&data);
        let mut c = DiskCursor::new(d);
        let mut small = [0u8; 7];
        c.seek(SeekFrom::Start(65_533)).unwrap();
        c.read_exact(&mut small).unwrap(); // across a buffer boundary
        assert_eq!(&small, &data[65_533..65_540]);
        let mut big = vec![0u8; 100_000];
        c.seek(SeekFrom::Start(10)).unwrap();
        c.read_exact(&mut big).unwrap();
        assert_eq!(&big[..], &data[10..100_010]);
        assert_eq!(c.seek(SeekFrom::End(-1)).unwrap(), 199_999);
        assert!(c.seek(SeekFrom::Current(-300_000)).is_err());
        let mut rest = Vec::new();
        c.seek(SeekFrom::Start(199_990)).unwrap();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(&rest[..], &data[199_990..]);
        c.seek(SeekFrom::Start(300_000)).unwrap();
        assert_eq!(c.read(&mut small).unwrap(), 0); // past the end
        let e = c.write(b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        // a short read past the end of the disk is an error for exact reads
        let mut buf = [0u8; 10];
        let e = read_exact_at(&*c.disk, 199_995, &mut buf, "test").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
    }
}
