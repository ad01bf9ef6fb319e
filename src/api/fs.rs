//! Volume and file methods: `volume.list`, `fs.list`, `fs.stat`, `fs.read`,
//! `fs.extract`, `stream.read` and `stream.close`.

use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{ConnectionId, RpcModule};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::sync::Arc;

use super::bulk::{self, Encoding, Piece, PieceList, MAX_READ};
use super::{must, Agent};
use crate::error::{Error, ErrorKind};
use crate::pool::ArchiveReader;
use crate::restore::archive::{
    byte_stream, new_stream_writer, ArchiveEntry, EntryKind, Format, StreamWriter,
};
use crate::restore::disk::Layout;
use crate::restore::fs::{
    text_and_b64, Device, Entry, EntryType, Extent, FileData, Filesystem, FsHandle, WalkEntry,
    Xattr,
};
use crate::restore::volume::list_backup_volumes;
use crate::rpc::codes::{app_error, internal, invalid_params};
use crate::rpc::{Call, RawResult, Router};

/// Default and largest page of `fs.list`.
const LIST_DEFAULT: usize = 1000;
const LIST_MAX: usize = 10_000;
/// Default `stream.read` length.
const STREAM_READ_DEFAULT: u64 = 4 << 20;
/// Archive bytes buffered per stream between its producer and the client.
const STREAM_BUFFER: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeParams {
    snapshot: String,
    archive: String,
}

/// The file a method works on; exactly one of `path` and `path_b64`.
#[derive(Deserialize)]
struct Target {
    snapshot: String,
    archive: String,
    volume: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    path_b64: Option<String>,
}

impl Target {
    fn path(&self) -> Result<Vec<u8>, ErrorObjectOwned> {
        match (&self.path, &self.path_b64) {
            (Some(p), None) => Ok(p.as_bytes().to_vec()),
            (None, Some(b)) => base64_simd::STANDARD
                .decode_to_vec(b)
                .map_err(|_| invalid_params("path_b64 is not valid base64")),
            _ => Err(invalid_params(
                "exactly one of path and path_b64 is required",
            )),
        }
    }

    /// The cached filesystem of this target's volume (opened on first use).
    async fn filesystem(&self, agent: &Arc<Agent>) -> Result<FsHandle, ErrorObjectOwned> {
        let (agent, s, a, v) = (
            agent.clone(),
            self.snapshot.clone(),
            self.archive.clone(),
            self.volume.clone(),
        );
        blocking(move || agent.backups.filesystem(&s, &a, &v)).await
    }
}

/// Params with a [`Target`] and method-specific members; unknown members are refused.
fn parse<T: for<'de> Deserialize<'de>>(
    params: &Params<'_>,
    known: &[&str],
) -> Result<(Target, T), ErrorObjectOwned> {
    let value: serde_json::Map<String, serde_json::Value> = params.parse()?;
    const TARGET: [&str; 5] = ["snapshot", "archive", "volume", "path", "path_b64"];
    if let Some(k) = value
        .keys()
        .find(|k| !TARGET.contains(&k.as_str()) && !known.contains(&k.as_str()))
    {
        return Err(invalid_params(format!("unknown field `{k}`")));
    }
    let v = serde_json::Value::Object(value);
    let target = Target::deserialize(&v).map_err(|e| invalid_params(e.to_string()))?;
    let extra = T::deserialize(&v).map_err(|e| invalid_params(e.to_string()))?;
    Ok((target, extra))
}

async fn blocking<R: Send + 'static>(
    job: impl FnOnce() -> crate::error::Result<R> + Send + 'static,
) -> Result<R, ErrorObjectOwned> {
    match tokio::task::spawn_blocking(job).await {
        Ok(r) => r.map_err(app_error),
        Err(_) => Err(internal("worker task failed")),
    }
}

async fn on_fs<R: Send + 'static>(
    handle: &FsHandle,
    job: impl FnOnce(&mut dyn Filesystem) -> crate::error::Result<R> + Send + 'static,
) -> Result<R, ErrorObjectOwned> {
    handle.run(job).await.and_then(|r| r).map_err(app_error)
}

#[derive(Deserialize)]
struct ListExtra {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize)]
struct StatExtra {
    #[serde(default)]
    follow: bool,
    /// whether the answer lists the node's extended attributes
    #[serde(default)]
    xattrs: bool,
}

fn yes() -> bool {
    true
}

/// `fs.stat`'s answer: the entry, and its extended attributes when asked.
#[derive(Clone, Serialize)]
struct StatAnswer {
    #[serde(flatten)]
    entry: Entry,
    #[serde(skip_serializing_if = "Option::is_none")]
    xattrs: Option<Vec<XattrJson>>,
}

/// One extended attribute in JSON: its name as text (and as base64 when it
/// is not UTF-8), its value as base64.
#[derive(Clone, Serialize)]
struct XattrJson {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name_b64: Option<String>,
    value: String,
}

impl XattrJson {
    fn new(x: &Xattr) -> XattrJson {
        let (name, name_b64) = text_and_b64(&x.name);
        XattrJson {
            name,
            name_b64,
            value: base64_simd::STANDARD.encode_to_string(&x.value),
        }
    }
}

#[derive(Deserialize)]
struct ReadExtra {
    offset: u64,
    length: u64,
    #[serde(default)]
    encoding: Encoding,
}

#[derive(Deserialize)]
struct ExtractExtra {
    format: String,
    #[serde(default)]
    zstd: bool,
    /// whether tar members carry their extended attributes
    #[serde(default = "yes")]
    xattrs: bool,
    /// the `resume` token of a failed stream's error: only the members
    /// after the one that failed
    #[serde(default)]
    resume: Option<String>,
}

/// Longest member path a `resume` token may hold (a walk's paths stay below
/// 1,024 levels of 255-byte names).
const MAX_RESUME: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamReadParams {
    stream: u64,
    #[serde(default)]
    length: Option<u64>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    encoding: Encoding,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamCloseParams {
    stream: u64,
}

pub(super) fn register(module: &mut RpcModule<Arc<Agent>>) {
    must(
        module.register_blocking_method("volume.list", |params, agent, _| {
            let p: VolumeParams = params.parse()?;
            let disk = agent
                .backups
                .disk(&p.snapshot, &p.archive)
                .map_err(app_error)?;
            let siblings = || agent.backups.siblings(&p.snapshot, &p.archive);
            let volumes = list_backup_volumes(disk, &siblings).map_err(app_error)?;
            Ok::<_, ErrorObjectOwned>(serde_json::json!({ "volumes": volumes }))
        }),
    );
    must(
        module.register_async_method("fs.stat", |params, agent, _| async move {
            let (t, x): (Target, StatExtra) = parse(&params, &["follow", "xattrs"])?;
            let path = t.path()?;
            let fs = t.filesystem(&agent).await?;
            on_fs(&fs, move |fs| {
                let entry = fs.stat(&path, x.follow)?;
                let xattrs = match x.xattrs {
                    true => Some(
                        fs.xattrs(&path, x.follow)?
                            .iter()
                            .map(XattrJson::new)
                            .collect(),
                    ),
                    false => None,
                };
                Ok(StatAnswer { entry, xattrs })
            })
            .await
        }),
    );
    must(
        module.register_async_method("stream.close", |params, agent, conn| async move {
            let p: StreamCloseParams = params.parse()?;
            let conn = conn
                .get::<ConnectionId>()
                .copied()
                .unwrap_or(ConnectionId(0));
            agent.streams.close(conn, p.stream)?;
            Ok::<_, ErrorObjectOwned>(serde_json::json!({ "closed": true }))
        }),
    );
}

pub(super) fn register_raw(router: &mut Router, agent: Arc<Agent>) {
    let a = agent.clone();
    router.register_raw("fs.list", move |params, _| fs_list(a.clone(), params));
    let a = agent.clone();
    router.register_raw("fs.read", move |params, call| {
        fs_read(a.clone(), params, call)
    });
    let a = agent.clone();
    router.register_raw("fs.extract", move |params, call| {
        fs_extract(a.clone(), params, call.conn)
    });
    router.register_raw("stream.read", move |params, call| {
        stream_read(agent.clone(), params, call)
    });
}

/// The result of `fs.list`.
#[derive(Serialize)]
struct ListPage<'a> {
    entries: &'a [Entry],
    next_cursor: Option<String>,
    /// entries whose inode could not be read: named, with why, never
    /// with made-up fields
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    unreadable: &'a [Unreadable],
}

/// An entry of a listing that could not be read.
#[derive(Serialize)]
struct Unreadable {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name_b64: Option<String>,
    inode: u64,
    error: String,
}

/// `fs.list`: a raw method, so a 10,000-entry page is serialized once,
/// straight from the entries (on the filesystem thread), instead of being
/// built as a `serde_json::Value`, serialized, parsed and re-enveloped.
async fn fs_list(
    agent: Arc<Agent>,
    params: Params<'static>,
) -> Result<RawResult, ErrorObjectOwned> {
    let (t, x): (Target, ListExtra) = parse(&params, &["cursor", "limit"])?;
    let limit = x.limit.unwrap_or(LIST_DEFAULT);
    if limit == 0 || limit > LIST_MAX {
        return Err(invalid_params(format!("limit must be 1..={LIST_MAX}")));
    }
    let path = t.path()?;
    let fs = t.filesystem(&agent).await?;
    let json = on_fs(&fs, move |fs| {
        let (mut entries, next_cursor) = fs.list(&path, x.cursor.as_deref(), limit)?;
        let mut unreadable = Vec::new();
        entries.retain_mut(|e| match e.error.take() {
            None => true,
            Some(error) => {
                unreadable.push(Unreadable {
                    name: std::mem::take(&mut e.name),
                    name_b64: e.name_b64.take(),
                    inode: e.inode,
                    error,
                });
                false
            }
        });
        serde_json::to_vec(&ListPage {
            entries: &entries,
            next_cursor,
            unreadable: &unreadable,
        })
        .map_err(|e| Error::new(ErrorKind::Io, format!("fs.list result: {e}")))
    })
    .await?;
    Ok(RawResult::new(json))
}

async fn fs_read(
    agent: Arc<Agent>,
    params: Params<'static>,
    call: Call,
) -> Result<RawResult, ErrorObjectOwned> {
    let conn = call.conn;
    let (t, x): (Target, ReadExtra) = parse(&params, &["offset", "length", "encoding"])?;
    bulk::refuse_raw_in_batch(call, x.encoding)?;
    if x.length > MAX_READ {
        return Err(invalid_params(format!(
            "length {} is over the limit of {MAX_READ}",
            x.length
        )));
    }
    let path = t.path()?;
    let fs = t.filesystem(&agent).await?;
    let len = usize::try_from(x.length).unwrap_or(usize::MAX);
    let hold = agent.budget.reserve(conn, len).await;
    let (offset, encoding) = (x.offset, x.encoding);
    // The filesystem thread only says where the bytes are; they come
    // straight from the pool's chunk buffers, so reads of one volume run in
    // parallel and the data is copied once, into the response.
    let p = path.clone();
    if let Some(map) = on_fs(&fs, move |fs| fs.map(&p, offset, len)).await? {
        // the volume's own disk, then the siblings a logical volume uses
        let mut readers = vec![agent.reader(conn, &t.snapshot, &t.archive)?];
        for sibling in fs.siblings() {
            readers.push(agent.reader(conn, &t.snapshot, sibling)?);
        }
        let pieces = volume_pieces(&readers, fs.layout(), &map.extents)
            .await
            .map_err(app_error)?;
        return Ok(bulk::read_result(offset, map.eof, pieces, hold, encoding));
    }
    let (data, eof) = on_fs(&fs, move |fs| fs.read(&path, offset, len)).await?;
    Ok(bulk::read_result(
        offset,
        eof,
        vec![Piece::Owned(data)],
        hold,
        encoding,
    ))
}

/// The data of `extents` (volume offsets; the volume lies on the archives
/// of `readers` as `layout` says, disk 0 the first) as pieces in order.
/// Data placed beyond the volume, or cut off by the end of an archive, is
/// an error, never short or made-up data.
async fn volume_pieces(
    readers: &[ArchiveReader],
    layout: &Layout,
    extents: &[Extent],
) -> crate::error::Result<Vec<Piece>> {
    let size = layout.size();
    let mut pieces = PieceList::default();
    for e in extents {
        match *e {
            Extent::Zero { len } => pieces.push_zeros(len),
            Extent::Disk { offset, len } => {
                let end = offset.checked_add(len).filter(|&end| end <= size);
                if end.is_none() {
                    return Err(Error::corrupt(format!(
                        "file data at volume offset {offset} (+{len}) lies beyond the \
                         end of the volume ({size} bytes)"
                    )));
                }
                for (disk, at, len) in layout.locate(offset, len) {
                    let reader = readers.get(disk).ok_or_else(|| {
                        Error::not_found(format!("volume data on disk {disk}, which is missing"))
                    })?;
                    let mut done = 0u64;
                    while done < len {
                        let want = usize::try_from(len - done).unwrap_or(usize::MAX);
                        let slices = reader.read_slices(at + done, want).await?;
                        let got: u64 = slices.iter().map(|s| s.range.len() as u64).sum();
                        if got == 0 {
                            return Err(Error::corrupt(format!(
                                "file data at disk offset {} goes past the end of the disk \
                                 ({} bytes)",
                                at + done,
                                reader.size()
                            )));
                        }
                        done += got;
                        for slice in slices {
                            pieces.push_slice(slice);
                        }
                    }
                }
            }
        }
    }
    Ok(pieces.into_pieces())
}

async fn fs_extract(
    agent: Arc<Agent>,
    params: Params<'static>,
    conn: ConnectionId,
) -> Result<RawResult, ErrorObjectOwned> {
    let (t, x): (Target, ExtractExtra) = parse(&params, &["format", "zstd", "xattrs", "resume"])?;
    let after = match &x.resume {
        None => None,
        Some(token) => Some(
            base64_simd::STANDARD
                .decode_to_vec(token)
                .ok()
                .filter(|m| !m.is_empty() && m.len() <= MAX_RESUME)
                .ok_or_else(|| {
                    invalid_params("resume is not a token from a failed stream's error")
                })?,
        ),
    };
    let format = match x.format.as_str() {
        "tar" => Format::Tar,
        "zip" => Format::Zip,
        other => {
            return Err(invalid_params(format!(
                "format must be \"tar\" or \"zip\", not {other:?}"
            )))
        }
    };
    let path = t.path()?;
    let producer = agent.streams.check_room(conn)?;
    // A filesystem of its own: a long extraction must not queue every other
    // request on this volume behind it.
    let (a, s, ar, v) = (
        agent.clone(),
        t.snapshot.clone(),
        t.archive.clone(),
        t.volume.clone(),
    );
    let fs = blocking(move || a.backups.open_filesystem(&s, &ar, &v)).await?;
    let p = path.clone();
    on_fs(&fs, move |fs| fs.stat(&p, false)).await?;
    let (writer, reader) = byte_stream(STREAM_BUFFER);
    let id = agent
        .streams
        .insert(conn, reader, agent.shared.hold_watchdog(), producer.clone())?;
    tokio::spawn(async move {
        let _ = fs
            .run(move |fs| {
                let xattrs = x.xattrs && format == Format::Tar;
                produce(fs, &path, after.as_deref(), format, x.zstd, xattrs, writer)
            })
            .await;
        // the filesystem's thread ends once its last handle is gone
        drop(fs);
        drop(producer);
    });
    Ok(RawResult::new(format!("{{\"stream\":{id}}}").into_bytes()))
}

async fn stream_read(
    agent: Arc<Agent>,
    params: Params<'static>,
    call: Call,
) -> Result<RawResult, ErrorObjectOwned> {
    let conn = call.conn;
    let p: StreamReadParams = params.parse()?;
    // A batch's answer that finds no room among the batch answers is
    // replaced by -32003 after its items ran: a stream read would have
    // taken its bytes for good, and the next read's offset would be past
    // them.
    if call.in_batch {
        return Err(invalid_params(
            "stream.read cannot be part of a batch (its bytes could be lost); \
             send it on its own",
        ));
    }
    let length = p.length.unwrap_or(STREAM_READ_DEFAULT);
    if length == 0 || length > MAX_READ {
        return Err(invalid_params(format!("length must be 1..={MAX_READ}")));
    }
    let stream = agent.streams.get(conn, p.stream)?;
    let len = usize::try_from(length).unwrap_or(usize::MAX);
    let (offset, data, eof, hold) = stream
        .read(p.offset, len, agent.budget.reserve(conn, len))
        .await?;
    if eof {
        // Done: the slot and its hold on the idle watchdog go now, not when
        // the client remembers to close it. Reads already under way still
        // get the end; later ones get 1008.
        let _ = agent.streams.close(conn, p.stream);
    }
    Ok(bulk::stream_result(offset, eof, data, hold, p.encoding))
}

/// Writes the archive of `path` into `out`; runs on the filesystem thread.
/// Whatever stops it reaches the client as the error of its next read.
fn produce(
    fs: &mut dyn Filesystem,
    path: &[u8],
    after: Option<&[u8]>,
    format: Format,
    zstd: bool,
    xattrs: bool,
    out: StreamWriter,
) {
    let closer = out.closer();
    let result = (|| {
        let mut archive = new_stream_writer(format, zstd, out)?;
        fs.walk(path, after, xattrs, &mut |we, data| {
            let Some(mut entry) = archive_entry(we, format) else {
                return Ok(());
            };
            let mut data = data.filter(|_| matches!(entry.kind, EntryKind::File { .. }));
            // A tar stores a file's holes as holes (a sparse /var/log/lastlog
            // of 300 GB holds a few KiB).
            if let (Some(d), EntryKind::File { size }) = (&mut data, &entry.kind) {
                if format == Format::Tar && *size >= SPARSE_MIN_HOLES {
                    entry.sparse = d
                        .data_regions(SPARSE_MIN_HOLES, SPARSE_MAX_REGIONS)
                        .map_err(|e| e.at_member(&we.path))?;
                }
            }
            let mut failed = false;
            let appended = {
                let mut reader = data.map(|data| DataReader {
                    data,
                    failed: &mut failed,
                    regions: entry.sparse.as_deref(),
                    next: 0,
                    left: 0,
                });
                archive
                    .append(&entry, reader.as_mut().map(|r| r as &mut dyn Read))
                    .map_err(from_io)
            };
            // The member's data could not be read: the stream can go on
            // after it. (A failed write is no member's.)
            appended.map_err(|e| if failed { e.at_member(&we.path) } else { e })
        })
        .map_err(std::io::Error::other)?;
        archive.finish()
    })();
    match result {
        Ok(()) => closer.finish(),
        Err(e) => closer.fail(e),
    }
}

/// The archive member for a walked node; `None` for what archives cannot
/// hold (sockets).
fn archive_entry(we: &WalkEntry, format: Format) -> Option<ArchiveEntry> {
    let e = &we.entry;
    let kind = match (&we.hardlink_to, e.kind) {
        (Some(first), _) if format.supports_hardlinks() => EntryKind::Hardlink {
            target: first.clone(),
        },
        (_, EntryType::File) => EntryKind::File { size: e.size },
        (_, EntryType::Dir) => EntryKind::Dir,
        (_, EntryType::Symlink) => EntryKind::Symlink {
            target: we.link_target.clone().unwrap_or_default(),
        },
        (_, EntryType::Char) => {
            let Device { major, minor } = e.rdev.unwrap_or_default();
            EntryKind::Char { major, minor }
        }
        (_, EntryType::Block) => {
            let Device { major, minor } = e.rdev.unwrap_or_default();
            EntryKind::Block { major, minor }
        }
        (_, EntryType::Fifo) => EntryKind::Fifo,
        (_, EntryType::Socket) => return None,
    };
    // a hard link's inode got them with its first name
    let xattrs = match kind {
        EntryKind::Hardlink { .. } => Vec::new(),
        _ => we
            .xattrs
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect(),
    };
    Some(ArchiveEntry {
        path: we.path.clone(),
        kind,
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        mtime_ns: e.mtime_ns,
        sparse: None,
        xattrs,
    })
}

/// Files with at least this many bytes of holes go into a tar as sparse
/// members.
const SPARSE_MIN_HOLES: u64 = 1 << 20;
/// Most data regions of a sparse member (its map is about 20 bytes each);
/// a file in more pieces goes in whole.
const SPARSE_MAX_REGIONS: usize = 1 << 16;

/// File data of a walk as `std::io::Read`, all of it or only its
/// `regions` one after another; filesystem errors travel inside the I/O
/// error and come out again in [`from_io`], and set `failed`.
struct DataReader<'a, 'f, 'r> {
    data: &'a mut dyn FileData,
    failed: &'f mut bool,
    /// the data regions of a sparse member (`None`: the whole file)
    regions: Option<&'r [(u64, u64)]>,
    /// the region to read after the current one
    next: usize,
    /// bytes left in the current region
    left: u64,
}

impl Read for DataReader<'_, '_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut buf = buf;
        if let Some(regions) = self.regions {
            while self.left == 0 {
                let Some(&(offset, len)) = regions.get(self.next) else {
                    return Ok(0);
                };
                self.data.seek(offset);
                (self.next, self.left) = (self.next + 1, len);
            }
            let want = usize::try_from(self.left)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            buf = &mut buf[..want];
        }
        let n = self.data.read(buf).map_err(|e| {
            *self.failed = true;
            std::io::Error::other(e)
        })?;
        self.left = self.left.saturating_sub(n as u64);
        Ok(n)
    }
}

fn from_io(e: std::io::Error) -> Error {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(app) => app.clone(),
        None => Error::new(ErrorKind::Io, format!("writing the archive: {e}")),
    }
}
