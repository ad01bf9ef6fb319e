//! The backups the agent serves: the snapshots of one read-only datastore and
//! the attached raw images (listed as the snapshot `attached`), each archive
//! read through the chunk pool.
//!
//! Opened indexes are kept (a few, most recent first) so that a client reading
//! an archive piece by piece does not reload the index for every request.
//! Nothing here ever opens a file for writing.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{Error, Result};
use crate::pool::{ArchiveReader, ChunkPool};
use crate::restore::disk::Disk;
use crate::restore::fs::FsHandle;
use crate::store::chunk_store::ChunkStore;
use crate::store::datastore::{archive_kind, Archive, ArchiveInfo, Datastore, SnapshotInfo};
use crate::store::index::ChunkIndex;

/// The snapshot name under which `--image` files are listed.
pub const ATTACHED: &str = "attached";

/// How many opened indexes are kept.
const OPEN_INDEXES: usize = 16;
/// Bytes of digests the kept indexes may hold in memory beyond the most
/// recent one (a 1 TiB disk in 4 MiB chunks has 8 MiB of them; sixteen such
/// would not fit a 128 MiB VM). Mapped indexes hold none.
const OPEN_INDEX_BYTES: usize = 16 << 20;

/// Most other disks of a snapshot searched for the rest of a volume group
/// (a VM has a few; each opened is an index in memory).
const MAX_SIBLINGS: usize = 16;

/// How many open filesystems (one thread each) are kept for reuse.
const OPEN_FILESYSTEMS: usize = 8;

type FsKey = (String, String, String);
type IndexEntry = (String, String, Arc<dyn ChunkIndex>);

/// The indexes opened: the few kept for later requests, and every one that
/// readers still hold, so that an index is never in memory twice.
#[derive(Default)]
struct Indexes {
    /// most recent first, at most [`OPEN_INDEXES`] and [`OPEN_INDEX_BYTES`]
    kept: VecDeque<IndexEntry>,
    alive: Vec<(String, String, Weak<dyn ChunkIndex>)>,
}

impl Indexes {
    fn find(&mut self, snapshot: &str, archive: &str) -> Option<Arc<dyn ChunkIndex>> {
        let named = |s: &String, a: &String| s == snapshot && a == archive;
        if let Some(at) = self.kept.iter().position(|(s, a, _)| named(s, a)) {
            let hit = self.kept.remove(at)?;
            let idx = hit.2.clone();
            self.kept.push_front(hit);
            return Some(idx);
        }
        let idx = self
            .alive
            .iter()
            .find(|(s, a, _)| named(s, a))
            .and_then(|(_, _, w)| w.upgrade())?;
        self.keep(snapshot, archive, idx.clone());
        Some(idx)
    }

    fn add(&mut self, snapshot: &str, archive: &str, idx: Arc<dyn ChunkIndex>) {
        self.alive.retain(|(_, _, w)| w.strong_count() > 0);
        self.alive.push((
            snapshot.to_string(),
            archive.to_string(),
            Arc::downgrade(&idx),
        ));
        self.keep(snapshot, archive, idx);
    }

    fn keep(&mut self, snapshot: &str, archive: &str, idx: Arc<dyn ChunkIndex>) {
        self.kept
            .push_front((snapshot.to_string(), archive.to_string(), idx));
        self.kept.truncate(OPEN_INDEXES);
        // the newest stays however large: it is being read
        let mut kept = 0;
        let fits = self.kept.iter().skip(1).take_while(|(_, _, idx)| {
            kept += idx.memory_bytes();
            kept <= OPEN_INDEX_BYTES
        });
        let keep = 1 + fits.count();
        self.kept.truncate(keep);
    }
}

/// An archive as a disk: positional reads through the chunk pool. Reads
/// block the calling thread, so it is only used from filesystem threads and
/// blocking tasks.
pub struct ArchiveDisk(ArchiveReader);

impl Disk for ArchiveDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.0.read_at_blocking(offset, buf)
    }
    fn will_read(&self, ranges: &[std::ops::Range<u64>]) {
        self.0.plan_reads(ranges);
    }
}

pub struct Backups {
    datastore: Option<Datastore>,
    chunks: Option<Arc<ChunkStore>>,
    images: Vec<(String, PathBuf, u64)>,
    pool: ChunkPool,
    indexes: Mutex<Indexes>,
    filesystems: Mutex<VecDeque<(FsKey, FsHandle)>>,
}

impl Backups {
    /// Opens the datastore (if any) and checks every attached image is
    /// readable; errors name the offending path.
    pub fn open(
        datastore: Option<&Path>,
        images: Vec<(String, PathBuf)>,
        pool: ChunkPool,
    ) -> Result<Backups> {
        let (datastore, chunks) = match datastore {
            Some(dir) => {
                let ds = Datastore::open(dir)?;
                let chunks = Arc::new(ChunkStore::open(dir)?);
                (Some(ds), Some(chunks))
            }
            None => (None, None),
        };
        let mut sized = Vec::with_capacity(images.len());
        for (name, path) in images {
            if name.is_empty() || name.contains('/') || sized.iter().any(|(n, _, _)| *n == name) {
                return Err(Error::invalid_path(format!(
                    "bad or duplicate image name `{name}`"
                )));
            }
            let size = pool.open_raw_image(&path, name.clone())?.size();
            sized.push((name, path, size));
        }
        Ok(Backups {
            datastore,
            chunks,
            images: sized,
            pool,
            indexes: Mutex::new(Indexes::default()),
            filesystems: Mutex::new(VecDeque::new()),
        })
    }

    pub fn pool(&self) -> &ChunkPool {
        &self.pool
    }

    /// Snapshots of `namespace` (every namespace when `None`), attached
    /// images last as the root-namespace snapshot `attached`.
    pub fn list_snapshots(&self, namespace: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut list = match &self.datastore {
            Some(ds) => ds.list_snapshots(namespace)?,
            None => Vec::new(),
        };
        if !self.images.is_empty() && matches!(namespace, None | Some("")) {
            list.push(SnapshotInfo {
                snapshot: ATTACHED.into(),
                backup_type: "host".into(),
                id: ATTACHED.into(),
                time: String::new(),
                namespace: String::new(),
                archives: self
                    .images
                    .iter()
                    .map(|(name, _, size)| ArchiveInfo {
                        name: name.clone(),
                        kind: "image".into(),
                        size: *size,
                        crypt_mode: "none".into(),
                    })
                    .collect(),
            });
        }
        Ok(list)
    }

    /// A new reader (with its own sequential-access state) of one archive.
    pub fn open_archive(&self, snapshot: &str, archive: &str) -> Result<ArchiveReader> {
        if snapshot == ATTACHED {
            let (_, path, _) = self
                .images
                .iter()
                .find(|(n, _, _)| n == archive)
                .ok_or_else(|| Error::not_found(format!("no attached image `{archive}`")))?;
            return self.pool.open_raw_image(path, archive.to_string());
        }
        let (Some(ds), Some(chunks)) = (&self.datastore, &self.chunks) else {
            return Err(Error::not_found(format!(
                "snapshot `{snapshot}` not found (no datastore)"
            )));
        };
        let index = self.index(ds, snapshot, archive)?;
        Ok(self
            .pool
            .open_index(chunks.clone(), index, format!("{snapshot}/{archive}")))
    }

    /// The decoded contents of a blob archive of a datastore snapshot (at
    /// most `max` bytes); attached images have none.
    pub fn read_blob(&self, snapshot: &str, archive: &str, max: usize) -> Result<Vec<u8>> {
        match &self.datastore {
            Some(ds) if snapshot != ATTACHED => ds.read_blob(snapshot, archive, max),
            _ => Err(Error::not_found(format!(
                "snapshot `{snapshot}` has no blob `{archive}`"
            ))),
        }
    }

    /// An archive as a disk, with its own reader.
    pub fn disk(&self, snapshot: &str, archive: &str) -> Result<Arc<dyn Disk>> {
        Ok(Arc::new(ArchiveDisk(self.open_archive(snapshot, archive)?)))
    }

    /// The other disk images of `snapshot` than `archive`, each opened as
    /// a disk with its own reader (in the manifest's order; at most
    /// [`MAX_SIBLINGS`]): where the rest of a volume group may be. One that
    /// cannot be opened is left out, logged.
    pub fn siblings(&self, snapshot: &str, archive: &str) -> Vec<(String, Arc<dyn Disk>)> {
        let names: Vec<String> = if snapshot == ATTACHED {
            self.images.iter().map(|(n, _, _)| n.clone()).collect()
        } else {
            let files = self.datastore.as_ref().map(|ds| ds.manifest(snapshot));
            match files {
                Some(Ok(m)) => m.files.into_iter().map(|f| f.filename).collect(),
                _ => Vec::new(),
            }
        };
        let mut seen = std::collections::HashSet::new();
        let images = names.into_iter().filter(|n| {
            n != archive
                && (snapshot == ATTACHED || archive_kind(n) == Some("image"))
                && seen.insert(n.clone())
        });
        let mut out = Vec::new();
        for name in images.take(MAX_SIBLINGS) {
            match self.disk(snapshot, &name) {
                Ok(disk) => out.push((name, disk)),
                Err(e) => log::warn!("{snapshot}/{name}: not searched for volume groups: {e}"),
            }
        }
        out
    }

    /// The shared open filesystem of a volume, opened on first use. Blocks
    /// while a filesystem is opened.
    pub fn filesystem(&self, snapshot: &str, archive: &str, volume: &str) -> Result<FsHandle> {
        let key = (
            snapshot.to_string(),
            archive.to_string(),
            volume.to_string(),
        );
        {
            let mut open = self.filesystems.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pos) = open.iter().position(|(k, _)| *k == key) {
                if let Some(entry) = open.remove(pos) {
                    let handle = entry.1.clone();
                    open.push_front(entry);
                    return Ok(handle);
                }
            }
        }
        let handle = self.open_filesystem(snapshot, archive, volume)?;
        let mut open = self.filesystems.lock().unwrap_or_else(|p| p.into_inner());
        open.push_front((key, handle.clone()));
        open.truncate(OPEN_FILESYSTEMS);
        Ok(handle)
    }

    /// A filesystem of a volume on a thread of its own, not shared. Blocks
    /// while it is opened.
    pub fn open_filesystem(&self, snapshot: &str, archive: &str, volume: &str) -> Result<FsHandle> {
        let siblings = || self.siblings(snapshot, archive);
        FsHandle::open_in_backup(self.disk(snapshot, archive)?, volume, &siblings)
    }

    fn index(&self, ds: &Datastore, snapshot: &str, archive: &str) -> Result<Arc<dyn ChunkIndex>> {
        if let Some(idx) = self.lock_indexes().find(snapshot, archive) {
            return Ok(idx);
        }
        let index: Arc<dyn ChunkIndex> = match ds.open_archive(snapshot, archive)? {
            Archive::Fixed(i) => i,
            Archive::Dynamic(i) => i,
            Archive::Blob { .. } => {
                return Err(Error::unsupported(format!(
                    "`{archive}` is a blob, not a chunked archive"
                )))
            }
        };
        let mut indexes = self.lock_indexes();
        // opened meanwhile by another request: use that one
        if let Some(idx) = indexes.find(snapshot, archive) {
            return Ok(idx);
        }
        indexes.add(snapshot, archive, index.clone());
        Ok(index)
    }

    fn lock_indexes(&self) -> std::sync::MutexGuard<'_, Indexes> {
        self.indexes.lock().unwrap_or_else(|p| p.into_inner())
    }
}
