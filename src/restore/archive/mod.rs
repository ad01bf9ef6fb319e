//! Streaming archive writers (tar, zip, optionally zstd-wrapped) and the
//! bounded byte stream that carries their output to an async consumer.
//!
//! The writers take archive members one at a time from a caller that walks a
//! filesystem, and write them straight through to a plain `std::io::Write`:
//! they never seek, never buffer a file's data beyond one block, and keep no
//! per-member state except zip's small central-directory records. They know
//! nothing about filesystems, snapshots or the RPC layer; names given to them
//! are already relative member paths, checked by [`check_member_path`].

mod stream;
mod tar;
mod zip;

use std::io::{self, Read, Write};

pub use stream::{byte_stream, StreamCloser, StreamReader, StreamWriter};

/// Size of the blocks in which file data is copied from the caller's reader
/// to the output: memory per writer stays at about this much.
pub(crate) const DATA_BLOCK: usize = 256 * 1024;

/// Buffer between the archive formatting and the output, so that many small
/// headers reach the output as few writes.
const OUTPUT_BUFFER: usize = 64 * 1024;

/// zstd level for `zstd: true`: level 1 keeps compression (≈350 MB/s on one
/// core here) from becoming the slowest stage of an extract.
const ZSTD_LEVEL: i32 = 1;

/// The metadata of one archive member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// Relative, '/'-separated path bytes; never empty, never absolute, no
    /// "." or ".." components (see [`check_member_path`]).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (including setuid/setgid/sticky); the file type comes
    /// from `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch (may be negative).
    pub mtime: i64,
    /// Nanoseconds past `mtime` (tar only, as a pax `mtime` with a
    /// fraction; below 10^9).
    pub mtime_ns: u32,
    /// For a `File` with holes (tar only): its data regions, `(offset,
    /// length)` in order, the rest being holes; `data` then yields the
    /// regions' bytes one after another.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Extended attributes `(name, value)` as Linux names them (tar only,
    /// as pax `SCHILY.xattr.NAME` records, the form GNU tar and bsdtar
    /// read); zip has no place for them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File {
        size: u64,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    /// A second name for an earlier member; `target` is that member's path.
    Hardlink {
        target: Vec<u8>,
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// A streaming archive writer.
pub trait ArchiveWriter: Send {
    /// Appends one member. `data` must be `Some` for a `File` entry of
    /// non-zero size and yield at least `size` bytes (exactly `size` are
    /// taken); a shorter reader is an error, since the header is already out.
    fn append(&mut self, entry: &ArchiveEntry, data: Option<&mut dyn Read>) -> io::Result<()>;
    /// Writes the archive trailer and flushes everything to the output.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Tar,
    Zip,
}

impl Format {
    /// Whether the format can record [`EntryKind::Hardlink`] members. Zip
    /// cannot: its writer refuses them, so a caller writing zip must send a
    /// second name of a file as a `File` with its data again.
    pub fn supports_hardlinks(self) -> bool {
        matches!(self, Format::Tar)
    }
}

/// A writer for `format` onto `out`; with `zstd` the whole archive is
/// compressed as one zstd stream.
pub fn new_writer(
    format: Format,
    zstd: bool,
    out: Box<dyn Write + Send>,
) -> io::Result<Box<dyn ArchiveWriter>> {
    let out = io::BufWriter::with_capacity(OUTPUT_BUFFER, out);
    let sink: Box<dyn FinishWrite> = if zstd {
        Box::new(zstd_sink(out)?)
    } else {
        Box::new(PlainSink(out))
    };
    Ok(format_writer(format, sink))
}

/// [`new_writer`] onto a byte stream. The stream gathers bytes into blocks
/// itself (no buffer in between), and a plain archive's file data is read
/// straight into those blocks: file data is copied once on its way from the
/// filesystem to the consumer.
pub fn new_stream_writer(
    format: Format,
    zstd: bool,
    out: StreamWriter,
) -> io::Result<Box<dyn ArchiveWriter>> {
    let sink: Box<dyn FinishWrite> = if zstd {
        Box::new(zstd_sink(out)?)
    } else {
        Box::new(StreamSink(out))
    };
    Ok(format_writer(format, sink))
}

fn format_writer(format: Format, sink: Box<dyn FinishWrite>) -> Box<dyn ArchiveWriter> {
    match format {
        Format::Tar => Box::new(tar::TarWriter::new(sink)),
        Format::Zip => Box::new(zip::ZipWriter::new(sink)),
    }
}

fn zstd_sink<W: Write + Send + 'static>(out: W) -> io::Result<ZstdSink<W>> {
    let mut encoder = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
    // A content checksum lets `zstd -d` detect a damaged download.
    encoder.include_checksum(true)?;
    Ok(ZstdSink(encoder))
}

/// Whether `p` is acceptable as a member path: non-empty, relative, no empty,
/// "." or ".." components, no NUL byte.
pub fn check_member_path(p: &[u8]) -> bool {
    !p.is_empty()
        && !p.contains(&0)
        && p.split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// The output of a writer: a `Write` that must be told when the archive is
/// complete (zstd needs to write its frame end).
pub(crate) trait FinishWrite: DirectWrite + Send {
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// A `Write` that may take file data straight from a reader.
pub(crate) trait DirectWrite: Write {
    /// Reads up to `max` bytes of `src` straight into the output's own
    /// buffer and passes them to `seen`; `None` when the output has no
    /// such buffer (the caller copies through a block of its own).
    fn write_from(
        &mut self,
        _src: &mut dyn Read,
        _max: usize,
        _seen: &mut dyn FnMut(&[u8]),
    ) -> Option<io::Result<usize>> {
        None
    }
}

struct PlainSink(io::BufWriter<Box<dyn Write + Send>>);

impl Write for PlainSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl DirectWrite for PlainSink {}

impl FinishWrite for PlainSink {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.0.flush()
    }
}

/// A byte stream as the output: it buffers by itself.
struct StreamSink(StreamWriter);

impl Write for StreamSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl FinishWrite for StreamSink {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.0.flush()
    }
}

impl DirectWrite for StreamSink {
    fn write_from(
        &mut self,
        src: &mut dyn Read,
        max: usize,
        seen: &mut dyn FnMut(&[u8]),
    ) -> Option<io::Result<usize>> {
        Some(self.0.write_from(src, max, seen))
    }
}

struct ZstdSink<W: Write>(zstd::stream::write::Encoder<'static, W>);

impl<W: Write + Send> Write for ZstdSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write + Send> DirectWrite for ZstdSink<W> {}

impl<W: Write + Send> FinishWrite for ZstdSink<W> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        let mut out = self.0.finish()?;
        out.flush()
    }
}

/// An `InvalidInput` error naming the member.
pub(crate) fn invalid(path: &[u8], what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("archive member {}: {what}", String::from_utf8_lossy(path)),
    )
}

/// Checks an entry before anything of it is written.
pub(crate) fn check_entry(entry: &ArchiveEntry) -> io::Result<()> {
    if !check_member_path(&entry.path) {
        return Err(invalid(&entry.path, "not a relative member path"));
    }
    match &entry.kind {
        EntryKind::Hardlink { target } if !check_member_path(target) => Err(invalid(
            &entry.path,
            "hard link target is not a member path",
        )),
        EntryKind::Symlink { target } if target.contains(&0) => {
            Err(invalid(&entry.path, "symlink target contains a NUL byte"))
        }
        _ => Ok(()),
    }
}

/// Copies exactly `size` bytes from `data` to `out`, straight into the
/// output's buffer where it has one, else through a bounded block, passing
/// the bytes to `seen` (for checksums). A reader that ends early is an
/// `UnexpectedEof` error naming the member.
pub(crate) fn copy_data(
    path: &[u8],
    size: u64,
    data: Option<&mut dyn Read>,
    out: &mut dyn DirectWrite,
    mut seen: impl FnMut(&[u8]),
) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let Some(data) = data else {
        return Err(invalid(path, "file data missing"));
    };
    let block = DATA_BLOCK.min(usize::try_from(size).unwrap_or(DATA_BLOCK));
    let mut buf = Vec::new();
    let mut left = size;
    while left > 0 {
        let want = block.min(usize::try_from(left).unwrap_or(block));
        let read = match out.write_from(data, want, &mut seen) {
            Some(read) => read,
            None => {
                buf.resize(block, 0);
                let chunk = buf.get_mut(..want).unwrap_or_default();
                data.read(chunk).and_then(|n| {
                    let got = chunk.get(..n).unwrap_or_default();
                    seen(got);
                    out.write_all(got).map(|()| n)
                })
            }
        };
        let n = match read {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "archive member {}: data ended {left} bytes short of its size {size}",
                        String::from_utf8_lossy(path)
                    ),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        left -= n as u64;
    }
    Ok(())
}
