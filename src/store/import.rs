//! The writer side, used only by `restore-client` (never by the agent):
//! create a datastore, import a raw image (file or block device) as a
//! fixed-index archive, and verify every chunk of a datastore.
//!
//! Import pipeline: one reader thread cuts the image into 4 MiB chunks,
//! N worker threads hash, deduplicate, compress and store them, and the
//! calling thread collects digests in index order. Every file is written
//! atomically (temp file + rename), the index before the manifest, so a
//! crash never leaves a manifest naming a missing or partial file.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::store::chunk_store::ChunkStore;
use crate::store::datastore::{
    load_manifest, read_blob_file, validate_archive_name, Archive, Datastore, SnapshotPath,
};
use crate::store::fidx::FixedIndex;
use crate::store::index::{
    new_uuid, now_epoch, ChunkIndex, INDEX_HEADER_SIZE, MAX_INDEX_FILE_SIZE,
};
use crate::store::manifest::{FileEntry, Manifest, MANIFEST_BLOB_NAME};
use crate::store::{atomic_file, blob, digest_hex, sha256, Digest, MAX_CHUNK_SIZE};

/// Chunk size of imported images (Proxmox Backup's default).
pub const IMPORT_CHUNK_SIZE: u64 = 4 << 20;

/// Largest `.blob` archive verify reads (Proxmox Backup's MAX_BLOB_SIZE).
const MAX_BLOB_ARCHIVE_SIZE: usize = 128 << 20;

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Creates a datastore at `dir`: the directory (if needed) and
/// `.chunks/0000` .. `.chunks/ffff`. Refuses an existing datastore.
pub fn init(dir: &Path) -> Result<()> {
    let chunk_dir = dir.join(".chunks");
    if chunk_dir.exists() {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{}: already a datastore", dir.display()),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), &e))?;
    // Build the tree under a temp name and rename it into place, so a
    // half-initialised store is never mistaken for a datastore.
    let tmp = dir.join(format!(".chunks.{}.tmp", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(tmp.display(), &e))?;
    let mut name = String::with_capacity(4);
    for i in 0..=0xffffu32 {
        use std::fmt::Write;
        name.clear();
        let _ = write!(name, "{i:04x}");
        let sub = tmp.join(&name);
        std::fs::create_dir(&sub).map_err(|e| Error::io(sub.display(), &e))?;
    }
    std::fs::rename(&tmp, &chunk_dir).map_err(|e| Error::io(chunk_dir.display(), &e))
}

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    pub snapshot: String,
    /// The index file written, e.g. `drive-scsi0.img.fidx`.
    pub archive: String,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks: usize,
    /// Chunk files written by this import.
    pub new_chunks: usize,
    /// Chunks already in the store (or repeated within the image).
    pub reused_chunks: usize,
    /// Bytes of chunk files written.
    pub stored_bytes: u64,
    /// The index checksum recorded in the manifest (hex).
    pub index_csum: String,
    pub seconds: f64,
}

/// The archive file name for `--archive`: `x.img` -> `x.img.fidx`.
fn fidx_name(archive: &str) -> Result<String> {
    let name = if archive.ends_with(".fidx") {
        archive.to_string()
    } else {
        format!("{archive}.fidx")
    };
    validate_archive_name(&name)?;
    Ok(name)
}

/// Imports `image` (a file or block device) into `store` as
/// `<snapshot>/<archive>.fidx`, then adds it to the snapshot's manifest.
pub fn import_image(
    store: &Path,
    snapshot: &str,
    archive: &str,
    image: &Path,
    progress: Progress<'_>,
) -> Result<ImportReport> {
    let started = Instant::now();
    let snap = SnapshotPath::parse(snapshot)?;
    let archive = fidx_name(archive)?;
    let chunks = ChunkStore::open(store)?;
    let mut file = File::open(image).map_err(|e| Error::io(image.display(), &e))?;
    let ftype = file
        .metadata()
        .map_err(|e| Error::io(image.display(), &e))?
        .file_type();
    if !(ftype.is_file() || ftype.is_block_device()) {
        return Err(Error::unsupported(format!(
            "{}: not a regular file or block device",
            image.display()
        )));
    }
    // Seeking to the end gives the size of block devices too.
    let size = file
        .seek(SeekFrom::End(0))
        .and_then(|s| file.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(|e| Error::io(image.display(), &e))?;

    let snap_dir = store.join(snap.rel_path());
    let created = !snap_dir.exists();
    std::fs::create_dir_all(&snap_dir).map_err(|e| Error::io(snap_dir.display(), &e))?;
    let result = lock_dir(&snap_dir).and_then(|_lock| {
        import_locked(
            &chunks, &snap, &snap_dir, &archive, &mut file, image, size, progress,
        )
    });
    if result.is_err() && created {
        // Leave no empty snapshot directory behind (fails harmlessly if not empty).
        let _ = std::fs::remove_dir(&snap_dir);
    }
    let (index, new_chunks, stored_bytes) = result?;
    let index_csum = digest_hex(index.index_csum());
    Ok(ImportReport {
        snapshot: snap.to_string(),
        archive,
        size,
        chunk_size: IMPORT_CHUNK_SIZE,
        chunks: index.chunk_count(),
        new_chunks,
        reused_chunks: index.chunk_count() - new_chunks,
        stored_bytes,
        index_csum,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The part of an import done while holding the snapshot lock: check the
/// manifest, store the chunks, write the index, then update the manifest.
#[allow(clippy::too_many_arguments)]
fn import_locked(
    chunks: &ChunkStore,
    snap: &SnapshotPath,
    snap_dir: &Path,
    archive: &str,
    file: &mut File,
    image: &Path,
    size: u64,
    progress: Progress<'_>,
) -> Result<(FixedIndex, usize, u64)> {
    let manifest_path = snap_dir.join(MANIFEST_BLOB_NAME);
    // Check an existing manifest before doing any work.
    let mut manifest = load_or_new_manifest(&manifest_path, snap)?;
    let stored = store_chunks(chunks, file, image, size, progress)?;
    let index = FixedIndex::new(
        archive,
        size,
        IMPORT_CHUNK_SIZE,
        stored.digests,
        new_uuid(),
        now_epoch(),
    )?;
    index.write(&snap_dir.join(archive))?;
    manifest.set_file(FileEntry {
        filename: archive.to_string(),
        crypt_mode: "none".to_string(),
        size,
        csum: digest_hex(index.index_csum()),
    });
    manifest.store(&manifest_path)?;
    Ok((index, stored.new_chunks, stored.stored_bytes))
}

/// Takes an exclusive flock on the snapshot directory for the life of the
/// returned handle, so two imports cannot interleave manifest updates.
fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).map_err(|e| Error::io(dir.display(), &e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "{}: snapshot is busy (another import holds it): {e}",
                dir.display()
            ),
        ));
    }
    Ok(f)
}

fn load_or_new_manifest(path: &Path, snap: &SnapshotPath) -> Result<Manifest> {
    match load_manifest(path, snap) {
        Ok(m) => Ok(m),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(Manifest::new(
            &snap.backup_type,
            &snap.backup_id,
            snap.backup_time(),
        )),
        Err(e) => Err(e),
    }
}

struct StoredChunks {
    digests: Vec<Digest>,
    new_chunks: usize,
    stored_bytes: u64,
}

/// The reader -> workers -> collector pipeline; returns digests in order.
fn store_chunks(
    chunks: &ChunkStore,
    file: &mut File,
    image: &Path,
    size: u64,
    progress: Progress<'_>,
) -> Result<StoredChunks> {
    // The index of a larger image would be over what readers accept.
    let max_size = (MAX_INDEX_FILE_SIZE - INDEX_HEADER_SIZE as u64) / 32 * IMPORT_CHUNK_SIZE;
    if size > max_size {
        return Err(Error::unsupported(format!(
            "{}: image of {size} bytes is over the limit of {max_size}",
            image.display()
        )));
    }
    let count = size.div_ceil(IMPORT_CHUNK_SIZE) as usize;
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    // At most `workers` chunks wait in the queue: memory stays a few chunks per core.
    let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(workers);
    let job_rx = Mutex::new(job_rx);
    let (res_tx, res_rx) = mpsc::channel::<Result<(usize, Digest, u64, bool)>>();
    let seen = Mutex::new(HashSet::<Digest>::new());
    let abort = AtomicBool::new(false);
    let stored_bytes = AtomicU64::new(0);

    let mut digests: Vec<Option<Digest>> = vec![None; count];
    let mut new_chunks = 0usize;
    let mut first_error: Option<Error> = None;

    std::thread::scope(|s| {
        let reader_res = res_tx.clone();
        let abort_r = &abort;
        s.spawn(move || {
            for i in 0..count {
                if abort_r.load(Ordering::Relaxed) {
                    break;
                }
                let start = i as u64 * IMPORT_CHUNK_SIZE;
                let len = (size - start).min(IMPORT_CHUNK_SIZE) as usize;
                let mut buf = vec![0u8; len];
                if let Err(e) = file.read_exact(&mut buf) {
                    let _ = reader_res.send(Err(Error::io(
                        format!("{} at offset {start}", image.display()),
                        &e,
                    )));
                    break;
                }
                if job_tx.send((i, buf)).is_err() {
                    break;
                }
            }
        });
        for _ in 0..workers {
            let res_tx = res_tx.clone();
            let (job_rx, seen, abort, stored_bytes) = (&job_rx, &seen, &abort, &stored_bytes);
            s.spawn(move || loop {
                let job = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => break,
                };
                let Ok((i, buf)) = job else { break };
                if abort.load(Ordering::Relaxed) {
                    continue;
                }
                let len = buf.len() as u64;
                let digest = sha256(&buf);
                let first_use = seen.lock().map(|mut s| s.insert(digest)).unwrap_or(true);
                let result = if first_use {
                    store_chunk(chunks, &digest, &buf).map(|written| {
                        stored_bytes.fetch_add(written, Ordering::Relaxed);
                        (i, digest, len, written > 0)
                    })
                } else {
                    Ok((i, digest, len, false))
                };
                if res_tx.send(result).is_err() {
                    break;
                }
            });
        }
        drop(res_tx);
        let mut done = 0u64;
        progress(0, size);
        for result in res_rx {
            match result {
                Ok((i, digest, len, is_new)) => {
                    if let Some(slot) = digests.get_mut(i) {
                        *slot = Some(digest);
                    }
                    new_chunks += usize::from(is_new);
                    done += len;
                    progress(done, size);
                }
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let digests = digests
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("{}: image shrank while reading", image.display()),
            )
        })?;
    Ok(StoredChunks {
        digests,
        new_chunks,
        stored_bytes: stored_bytes.into_inner(),
    })
}

/// Writes the chunk file for `digest` unless it exists; returns the bytes written.
fn store_chunk(chunks: &ChunkStore, digest: &Digest, data: &[u8]) -> Result<u64> {
    let path = chunks.chunk_path(digest);
    if path.symlink_metadata().is_ok() {
        return Ok(0);
    }
    let blob = blob::encode(data, true);
    if let Err(e) = atomic_file::write(&path, &blob, false) {
        // A store created by other tools may lack the prefix directory.
        let parent = path.parent().filter(|p| !p.exists());
        match parent {
            Some(dir) if e.kind == ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), &e))?;
                atomic_file::write(&path, &blob, false)?;
            }
            _ => return Err(e),
        }
    }
    Ok(blob.len() as u64)
}

/// What a verify run checked and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub archives: usize,
    /// Distinct chunks read and checked.
    pub chunks: usize,
    /// Decoded bytes checked.
    pub bytes: u64,
    pub ok: bool,
    /// One message per problem, each naming the snapshot, file or digest.
    pub errors: Vec<String>,
}

/// Reads and checks every chunk of every index of `snapshot` (or of all
/// snapshots): CRC, decompression, digest and decoded length; also every
/// `.blob` archive. Problems are collected in the report; only an
/// unreadable store or an unknown snapshot is an `Err`.
pub fn verify(
    store: &Path,
    snapshot: Option<&str>,
    progress: Progress<'_>,
) -> Result<VerifyReport> {
    let ds = Datastore::open(store)?;
    let snapshots: Vec<String> = match snapshot {
        Some(s) => {
            ds.manifest(s)?;
            vec![SnapshotPath::parse(s)?.to_string()]
        }
        // every snapshot directory: one whose manifest does not read is
        // reported, not skipped as listings skip it
        None => ds
            .snapshot_dirs()?
            .into_iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let mut report = VerifyReport {
        snapshots: snapshots.len(),
        ..Default::default()
    };
    // digest -> (decoded length the indexes expect, size limit); archives
    // that share a chunk but expect other lengths of it are reported here
    let mut jobs: HashMap<Digest, (u64, usize)> = HashMap::new();
    for snap in &snapshots {
        let manifest = match ds.manifest(snap) {
            Ok(m) => m,
            Err(e) => {
                report.errors.push(format!("{snap}: {}", e.message));
                continue;
            }
        };
        for file in &manifest.files {
            report.archives += 1;
            match ds.open_archive(snap, &file.filename) {
                Ok(Archive::Blob { path, csum }) => {
                    if let Err(e) = verify_blob_archive(&path, &csum) {
                        report
                            .errors
                            .push(format!("{snap}/{}: {}", file.filename, e.message));
                    }
                }
                Ok(archive) => {
                    let Some(index) = archive.index() else {
                        continue;
                    };
                    let max = index
                        .fixed_chunk_size()
                        .map(|c| c as usize)
                        .unwrap_or(MAX_CHUNK_SIZE);
                    let mut disagree = None;
                    for i in 0..index.chunk_count() {
                        let r = index.chunk_range(i);
                        let digest = index.chunk_digest(i);
                        let (len, _) = *jobs.entry(*digest).or_insert((r.end - r.start, max));
                        if len != r.end - r.start && disagree.is_none() {
                            disagree = Some(format!(
                                "{snap}/{}: chunk {} is {} bytes at offset {}, where another \
                                 index has it as {len}",
                                file.filename,
                                digest_hex(digest),
                                r.end - r.start,
                                r.start
                            ));
                        }
                    }
                    report.errors.extend(disagree);
                }
                Err(e) => report
                    .errors
                    .push(format!("{snap}/{}: {}", file.filename, e.message)),
            }
        }
    }
    let jobs: Vec<(Digest, u64, usize)> = jobs.into_iter().map(|(d, (l, m))| (d, l, m)).collect();
    let total: u64 = jobs.iter().map(|j| j.1).sum();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let ds_chunks = ds.chunk_store();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    progress(0, total);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some((digest, len, max)) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    let problem = match ds_chunks.read_chunk(digest, *max) {
                        Ok(data) if data.len() as u64 != *len => Some(format!(
                            "chunk {}: decoded {} bytes, the index expects {len}",
                            digest_hex(digest),
                            data.len()
                        )),
                        Ok(_) => None,
                        Err(e) => Some(e.message),
                    };
                    if let (Some(p), Ok(mut errs)) = (problem, errors.lock()) {
                        errs.push(p);
                    }
                    progress(done.fetch_add(*len, Ordering::Relaxed) + len, total);
                }
            });
        }
    });
    report.chunks = jobs.len();
    report.bytes = total;
    report
        .errors
        .extend(errors.into_inner().unwrap_or_default());
    report.errors.sort();
    report.ok = report.errors.is_empty();
    Ok(report)
}

fn verify_blob_archive(path: &Path, csum: &str) -> Result<()> {
    read_blob_file(path, csum, MAX_BLOB_ARCHIVE_SIZE).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::datastore::Datastore;

    fn no_progress(_: u64, _: u64) {}

    /// Datastore trees have 65536 directories: keep them on tmpfs when
    /// there is one, where creating and removing them takes a second.
    fn test_dir() -> tempfile::TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            if let Ok(d) = tempfile::tempdir_in(shm) {
                return d;
            }
        }
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn init_import_read_back_and_verify() {
        let dir = test_dir();
        let store = dir.path().join("store");
        init(&store).unwrap();
        assert!(store.join(".chunks/0000").is_dir());
        assert!(store.join(".chunks/ffff").is_dir());
        assert!(init(&store).is_err());

        // Two full chunks (one text, one zero) and a short tail.
        let mut image: Vec<u8> = b"some text "
            .iter()
            .cycle()
            .take(4 << 20)
            .copied()
            .collect();
        image.extend(std::iter::repeat_n(0u8, 4 << 20));
        image.extend((0..12345u32).map(|i| (i * 7) as u8));
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, &image).unwrap();

        let snap = "vm/100/2026-01-01T00:00:00Z";
        let last = Mutex::new((0, 0));
        let progress = |d: u64, t: u64| *last.lock().unwrap() = (d, t);
        let r = import_image(&store, snap, "drive-scsi0.img", &img, &progress).unwrap();
        assert_eq!(
            *last.lock().unwrap(),
            (image.len() as u64, image.len() as u64)
        );
        assert_eq!(r.archive, "drive-scsi0.img.fidx");
        assert_eq!((r.chunks, r.new_chunks, r.reused_chunks), (3, 3, 0));

        let ds = Datastore::open(&store).unwrap();
        let Archive::Fixed(idx) = ds.open_archive(snap, "drive-scsi0.img.fidx").unwrap() else {
            panic!("not a fixed index")
        };
        let mut back = Vec::new();
        for i in 0..idx.chunk_count() {
            back.extend(
                ds.chunk_store()
                    .read_chunk(idx.chunk_digest(i), 4 << 20)
                    .unwrap(),
            );
        }
        assert_eq!(back, image);

        // Re-import into a second archive of the same snapshot: all dedup'd.
        let r = import_image(&store, snap, "drive-scsi1.img.fidx", &img, &no_progress).unwrap();
        assert_eq!((r.new_chunks, r.reused_chunks, r.stored_bytes), (0, 3, 0));
        let m = ds.manifest(snap).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.backup_time, 1_767_225_600);

        let v = verify(&store, None, &no_progress).unwrap();
        assert!(v.ok, "{:?}", v.errors);
        assert_eq!((v.snapshots, v.archives, v.chunks), (1, 2, 3));

        // Corrupt the zero chunk: verify names its digest.
        let zero = sha256(&vec![0u8; 4 << 20]);
        let path = ds.chunk_store().chunk_path(&zero);
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 0xff;
        std::fs::write(&path, raw).unwrap();
        let v = verify(&store, Some(snap), &no_progress).unwrap();
        assert!(!v.ok);
        assert_eq!(v.errors.len(), 1, "{:?}", v.errors);
        assert!(v.errors[0].contains(&digest_hex(&zero)), "{:?}", v.errors);
    }

    #[test]
    fn empty_image_and_bad_arguments() {
        // A store without the prefix directories (made by another tool):
        // the importer creates what it needs.
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        std::fs::create_dir_all(store.join(".chunks")).unwrap();
        let img = dir.path().join("empty");
        std::fs::write(&img, b"").unwrap();
        let snap = "ct/1/2026-01-01T00:00:00Z";
        let r = import_image(&store, snap, "e.img", &img, &no_progress).unwrap();
        assert_eq!((r.size, r.chunks), (0, 0));
        let ds = Datastore::open(&store).unwrap();
        assert_eq!(
            ds.open_archive(snap, "e.img.fidx")
                .unwrap()
                .index()
                .unwrap()
                .size(),
            0
        );
        let hello = dir.path().join("hello");
        std::fs::write(&hello, b"hello").unwrap();
        import_image(&store, snap, "h.img", &hello, &no_progress).unwrap();
        let chunk = store
            .join(".chunks/2cf2/2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(std::fs::read(chunk).unwrap(), blob::encode(b"hello", false));
        assert_eq!(ds.manifest(snap).unwrap().files.len(), 2);

        // A second import into a locked snapshot is refused, not interleaved.
        let lock = lock_dir(&store.join(snap)).unwrap();
        let err = import_image(&store, snap, "x.img", &hello, &no_progress).unwrap_err();
        assert!(err.message.contains("busy"), "{}", err.message);
        drop(lock);
        // A corrupt manifest is not overwritten; a directory is no image.
        let mpath = store.join(snap).join(MANIFEST_BLOB_NAME);
        std::fs::write(&mpath, b"garbage").unwrap();
        let err = import_image(&store, snap, "x.img", &hello, &no_progress).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert_eq!(std::fs::read(&mpath).unwrap(), b"garbage");
        let dir2 = "ct/1/2026-01-02T00:00:00Z";
        let err =
            import_image(&store, dir2, "x.img", &dir.path().join("s"), &no_progress).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported, "{}", err.message);
        assert!(!store.join(dir2).exists());

        let err = import_image(&store, "vm/../x", "e.img", &img, &no_progress).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidPath);
        let err = import_image(&store, snap, "a/b", &img, &no_progress).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidPath);
        let err = import_image(
            &store,
            snap,
            "e.img",
            &dir.path().join("nope"),
            &no_progress,
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let err = import_image(
            &dir.path().join("nostore"),
            snap,
            "e.img",
            &img,
            &no_progress,
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let err = verify(&store, Some("vm/9/2026-01-01T00:00:00Z"), &no_progress).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
    }
}
