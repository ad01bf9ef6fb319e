//! A datastore directory, read-only: snapshot naming and validation
//! (`[ns/<n>/...]<vm|ct|host>/<id>/<YYYY-MM-DDTHH:MM:SSZ>`), snapshot listing
//! from manifests, and opening archives with their indexes checked against
//! the manifest. It never creates, writes or locks anything.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::calendar::{civil_from_days, days_from_civil};
use crate::error::{Error, ErrorKind, Result};
use crate::store::chunk_store::ChunkStore;
use crate::store::didx::DynamicIndex;
use crate::store::digest_hex;
use crate::store::fidx::FixedIndex;
use crate::store::index::ChunkIndex;
use crate::store::manifest::{Manifest, MANIFEST_BLOB_NAME};

/// Namespaces nest at most this deep (Proxmox Backup's limit).
pub const MAX_NAMESPACE_DEPTH: usize = 7;
/// Longest accepted name component (id, namespace, archive).
const MAX_NAME_LEN: usize = 128;

/// Backup types a snapshot may have.
pub const BACKUP_TYPES: [&str; 3] = ["vm", "ct", "host"];

/// A parsed, validated snapshot name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPath {
    /// Namespace components, outermost first (empty at the root).
    pub namespace: Vec<String>,
    pub backup_type: String,
    pub backup_id: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`
    pub time: String,
}

impl SnapshotPath {
    /// Parses `[ns/<n>/...]<type>/<id>/<time>`; anything else (absolute
    /// paths, `..`, unknown types, bad times) is `InvalidPath`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid_path(format!("invalid snapshot name {s:?}: {why}"));
        let parts: Vec<&str> = s.split('/').collect();
        let mut namespace = Vec::new();
        let mut rest = &parts[..];
        while let [first, name, tail @ ..] = rest {
            if *first != "ns" {
                break;
            }
            if !is_safe_id(name) {
                return Err(bad("bad namespace component"));
            }
            namespace.push(name.to_string());
            rest = tail;
        }
        if namespace.len() > MAX_NAMESPACE_DEPTH {
            return Err(bad("namespace nested too deep"));
        }
        let [backup_type, backup_id, time] = rest else {
            return Err(bad(
                "expected [ns/<name>/...]<vm|ct|host>/<id>/<YYYY-MM-DDTHH:MM:SSZ>",
            ));
        };
        if !BACKUP_TYPES.contains(backup_type) {
            return Err(bad("backup type must be vm, ct or host"));
        }
        if !is_safe_id(backup_id) {
            return Err(bad("bad backup id"));
        }
        if parse_backup_time(time).is_none() {
            return Err(bad("bad time (want YYYY-MM-DDTHH:MM:SSZ)"));
        }
        Ok(SnapshotPath {
            namespace,
            backup_type: backup_type.to_string(),
            backup_id: backup_id.to_string(),
            time: time.to_string(),
        })
    }

    /// The path relative to the datastore.
    pub fn rel_path(&self) -> PathBuf {
        let mut p = namespace_rel_path(&self.namespace);
        p.push(&self.backup_type);
        p.push(&self.backup_id);
        p.push(&self.time);
        p
    }

    /// `""` at the root, else `a/b`.
    pub fn namespace_str(&self) -> String {
        self.namespace.join("/")
    }

    /// Seconds since the epoch of the snapshot time.
    pub fn backup_time(&self) -> i64 {
        parse_backup_time(&self.time).unwrap_or(0)
    }
}

impl std::fmt::Display for SnapshotPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for n in &self.namespace {
            write!(f, "ns/{n}/")?;
        }
        write!(f, "{}/{}/{}", self.backup_type, self.backup_id, self.time)
    }
}

fn namespace_rel_path(ns: &[String]) -> PathBuf {
    let mut p = PathBuf::new();
    for n in ns {
        p.push("ns");
        p.push(n);
    }
    p
}

/// Proxmox Backup's SAFE_ID: `[A-Za-z0-9_][A-Za-z0-9._-]*`.
pub fn is_safe_id(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_alphanumeric() || *c == b'_' => {}
        _ => return false,
    }
    b.len() <= MAX_NAME_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Parses a namespace path `a/b` (`""` = root) into components.
pub fn parse_namespace(ns: &str) -> Result<Vec<String>> {
    if ns.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<String> = ns.split('/').map(str::to_string).collect();
    if parts.len() > MAX_NAMESPACE_DEPTH || !parts.iter().all(|p| is_safe_id(p)) {
        return Err(Error::invalid_path(format!("invalid namespace {ns:?}")));
    }
    Ok(parts)
}

/// Archive file names: SAFE_ID ending in `.fidx`, `.didx` or `.blob`.
pub fn validate_archive_name(name: &str) -> Result<()> {
    if is_safe_id(name) && archive_kind(name).is_some() {
        Ok(())
    } else {
        Err(Error::invalid_path(format!(
            "invalid archive name {name:?} (want a file name ending in .fidx, .didx or .blob)"
        )))
    }
}

/// "image", "dynamic" or "blob" from the file name's suffix.
pub fn archive_kind(name: &str) -> Option<&'static str> {
    if name.ends_with(".fidx") {
        Some("image")
    } else if name.ends_with(".didx") {
        Some("dynamic")
    } else if name.ends_with(".blob") {
        Some("blob")
    } else {
        None
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC) into epoch seconds; None if malformed.
pub fn parse_backup_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20 {
        return None;
    }
    let shape_ok = b.iter().enumerate().all(|(i, c)| match i {
        4 | 7 => *c == b'-',
        10 => *c == b'T',
        13 | 16 => *c == b':',
        19 => *c == b'Z',
        _ => c.is_ascii_digit(),
    });
    if !shape_ok {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> i64 {
        b[r].iter()
            .fold(0i64, |acc, c| acc * 10 + i64::from(c - b'0'))
    };
    let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
    let (h, mi, sec) = (num(11..13), num(14..16), num(17..19));
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59
    {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec)
}

/// Formats epoch seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_backup_time(epoch: i64) -> String {
    let days = epoch.div_euclid(86400);
    let secs = epoch.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// One snapshot as listed by `snapshot.list`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// e.g. "ns/prod/vm/100/2026-01-01T00:00:00Z"
    pub snapshot: String,
    #[serde(rename = "type")]
    pub backup_type: String,
    pub id: String,
    pub time: String,
    /// "" at the root, else "prod/sub".
    pub namespace: String,
    pub archives: Vec<ArchiveInfo>,
}

/// One archive of a snapshot, from its manifest.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ArchiveInfo {
    pub name: String,
    /// "image" (.fidx), "dynamic" (.didx) or "blob".
    pub kind: String,
    pub size: u64,
    pub crypt_mode: String,
}

/// An opened, validated archive.
#[derive(Clone, Debug)]
pub enum Archive {
    Fixed(Arc<FixedIndex>),
    Dynamic(Arc<DynamicIndex>),
    /// A `.blob` archive: the path of its DataBlob file, and the SHA-256
    /// (hex) the manifest gives for the file (empty when it gives none).
    Blob {
        path: PathBuf,
        csum: String,
    },
}

impl Archive {
    /// The chunk index of an index archive; None for a blob.
    pub fn index(&self) -> Option<Arc<dyn ChunkIndex>> {
        match self {
            Archive::Fixed(i) => Some(i.clone()),
            Archive::Dynamic(i) => Some(i.clone()),
            Archive::Blob { .. } => None,
        }
    }
}

/// A datastore opened read-only.
#[derive(Debug, Clone)]
pub struct Datastore {
    dir: PathBuf,
    chunks: ChunkStore,
}

impl Datastore {
    /// Opens the datastore at `dir` (it must hold `.chunks`). Read-only.
    pub fn open(dir: &Path) -> Result<Self> {
        let chunks = ChunkStore::open(dir)?;
        Ok(Datastore {
            dir: dir.to_path_buf(),
            chunks,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_store(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Snapshots with a readable manifest, sorted by name. `None` lists every
    /// namespace recursively; `Some("a/b")` only that namespace's own
    /// snapshots (`Some("")` = the root's own).
    pub fn list_snapshots(&self, namespace: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        let mut add = |snap: SnapshotPath| {
            if let Some(info) = self.snapshot_info(&snap) {
                out.push(info);
            }
        };
        match namespace {
            None => self.walk_namespace(&[], true, &mut add)?,
            Some(ns) => {
                let ns = parse_namespace(ns)?;
                let dir = self.dir.join(namespace_rel_path(&ns));
                if !dir.is_dir() {
                    return Err(Error::not_found(format!(
                        "namespace {:?} not found in {}",
                        ns.join("/"),
                        self.dir.display()
                    )));
                }
                self.walk_namespace(&ns, false, &mut add)?;
            }
        }
        out.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
        Ok(out)
    }

    /// Every snapshot directory in every namespace, sorted, whether its
    /// manifest reads or not (for `store verify`, which reports those that
    /// do not; [`list_snapshots`](Self::list_snapshots) skips them).
    pub fn snapshot_dirs(&self) -> Result<Vec<SnapshotPath>> {
        let mut out = Vec::new();
        self.walk_namespace(&[], true, &mut |snap| out.push(snap))?;
        out.sort_by_cached_key(|s| s.to_string());
        Ok(out)
    }

    /// Calls `each` for every snapshot directory of namespace `ns` (and its
    /// children, if `recursive`) with a valid name.
    fn walk_namespace(
        &self,
        ns: &[String],
        recursive: bool,
        each: &mut dyn FnMut(SnapshotPath),
    ) -> Result<()> {
        let ns_dir = self.dir.join(namespace_rel_path(ns));
        for backup_type in BACKUP_TYPES {
            let type_dir = ns_dir.join(backup_type);
            for id in dir_names(&type_dir)?.into_iter().filter(|n| is_safe_id(n)) {
                let group_dir = type_dir.join(&id);
                for time in dir_names(&group_dir)? {
                    if parse_backup_time(&time).is_none() {
                        continue;
                    }
                    each(SnapshotPath {
                        namespace: ns.to_vec(),
                        backup_type: backup_type.to_string(),
                        backup_id: id.clone(),
                        time,
                    });
                }
            }
        }
        if recursive && ns.len() < MAX_NAMESPACE_DEPTH {
            for child in dir_names(&ns_dir.join("ns"))?
                .into_iter()
                .filter(|n| is_safe_id(n))
            {
                let mut sub = ns.to_vec();
                sub.push(child);
                self.walk_namespace(&sub, true, each)?;
            }
        }
        Ok(())
    }

    /// None for a snapshot without a readable manifest (a backup still
    /// being written has none); corrupt manifests are logged.
    fn snapshot_info(&self, snap: &SnapshotPath) -> Option<SnapshotInfo> {
        let path = self.dir.join(snap.rel_path()).join(MANIFEST_BLOB_NAME);
        let manifest = match load_manifest(&path, snap) {
            Ok(m) => m,
            Err(e) => {
                if e.kind != ErrorKind::NotFound {
                    log::warn!("skipping snapshot {snap}: {}", e.message);
                }
                return None;
            }
        };
        // A name listed twice is the first entry's, as `open_archive` reads it.
        let mut seen = std::collections::HashSet::new();
        let archives = manifest
            .files
            .iter()
            .filter(|f| seen.insert(f.filename.as_str()))
            .filter_map(|f| {
                let kind = archive_kind(&f.filename)?;
                Some(ArchiveInfo {
                    name: f.filename.clone(),
                    kind: kind.to_string(),
                    size: f.size,
                    crypt_mode: f.crypt_mode.clone(),
                })
            })
            .collect();
        Some(SnapshotInfo {
            snapshot: snap.to_string(),
            backup_type: snap.backup_type.clone(),
            id: snap.backup_id.clone(),
            time: snap.time.clone(),
            namespace: snap.namespace_str(),
            archives,
        })
    }

    /// The manifest of `snapshot` (validated name).
    pub fn manifest(&self, snapshot: &str) -> Result<Manifest> {
        let snap = SnapshotPath::parse(snapshot)?;
        let dir = self.dir.join(snap.rel_path());
        if !dir.is_dir() {
            return Err(Error::not_found(format!("snapshot {snap} not found")));
        }
        load_manifest(&dir.join(MANIFEST_BLOB_NAME), &snap)
    }

    /// The decoded contents of blob archive `archive` of `snapshot` (a
    /// VM's `qemu-server.conf.blob`, a backup's `client.log.blob`): see
    /// [`read_blob_file`]; at most `max` bytes of file or of data.
    pub fn read_blob(&self, snapshot: &str, archive: &str, max: usize) -> Result<Vec<u8>> {
        let Archive::Blob { path, csum } = self.open_archive(snapshot, archive)? else {
            return Err(Error::unsupported(format!(
                "{archive} is not a blob archive (read images with image.read)"
            )));
        };
        read_blob_file(&path, &csum, max)
    }

    /// Opens `archive` (a file name listed in the manifest, e.g.
    /// `drive-scsi0.img.fidx`) of `snapshot`, checking the index against the
    /// manifest's size and checksum.
    pub fn open_archive(&self, snapshot: &str, archive: &str) -> Result<Archive> {
        let snap = SnapshotPath::parse(snapshot)?;
        validate_archive_name(archive)?;
        let manifest = self.manifest(snapshot)?;
        let Some(entry) = manifest.file(archive) else {
            return Err(Error::not_found(format!(
                "archive {archive} not found in snapshot {snap}"
            )));
        };
        if entry.crypt_mode == "encrypt" {
            return Err(Error::unsupported(format!(
                "archive {archive} of snapshot {snap} is encrypted"
            )));
        }
        let path = self.dir.join(snap.rel_path()).join(archive);
        let lies = |what: &str, manifest: String, actual: String| {
            Error::corrupt(format!(
                "{}: manifest says {what} {manifest}, the archive has {actual}",
                path.display()
            ))
        };
        let check = |size: u64, csum: &crate::store::Digest| -> Result<()> {
            if size != entry.size {
                return Err(lies("size", entry.size.to_string(), size.to_string()));
            }
            let csum = digest_hex(csum);
            if !entry.csum.eq_ignore_ascii_case(&csum) {
                return Err(lies("checksum", entry.csum.clone(), csum));
            }
            Ok(())
        };
        match archive_kind(archive) {
            Some("image") => {
                let idx = FixedIndex::open(&path)?;
                check(idx.size(), idx.index_csum())?;
                Ok(Archive::Fixed(Arc::new(idx)))
            }
            Some("dynamic") => {
                let idx = DynamicIndex::open(&path)?;
                check(idx.size(), idx.index_csum())?;
                Ok(Archive::Dynamic(Arc::new(idx)))
            }
            _ => {
                let meta = std::fs::metadata(&path).map_err(|e| Error::io(path.display(), &e))?;
                if meta.len() != entry.size {
                    return Err(lies("size", entry.size.to_string(), meta.len().to_string()));
                }
                // Proxmox Backup always writes one; without it nothing
                // would tell a rewritten blob from the one backed up
                if entry.csum.len() != 64 {
                    return Err(Error::corrupt(format!(
                        "{}: the manifest has no SHA-256 for it (checksum {:?})",
                        path.display(),
                        entry.csum
                    )));
                }
                Ok(Archive::Blob {
                    path,
                    csum: entry.csum.clone(),
                })
            }
        }
    }
}

/// Loads the manifest at `path`, which must name `snap` (its type, ID and
/// time): one copied or moved from another snapshot's directory, with its
/// indexes, would serve that snapshot's data as this one's.
pub(crate) fn load_manifest(path: &Path, snap: &SnapshotPath) -> Result<Manifest> {
    let m = Manifest::load(path)?;
    if m.backup_type != snap.backup_type
        || m.backup_id != snap.backup_id
        || m.backup_time != snap.backup_time()
    {
        return Err(Error::corrupt(format!(
            "{}: manifest is for {}/{} at {}, not {snap}",
            path.display(),
            m.backup_type,
            m.backup_id,
            m.backup_time
        )));
    }
    Ok(m)
}

/// Names of the subdirectories of `dir`, sorted; a missing `dir` has none.
fn dir_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir.display(), &e)),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir.display(), &e))?;
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if let (true, Ok(name)) = (is_dir, entry.file_name().into_string()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads a blob archive's file whole (at most `max` bytes), checks its
/// SHA-256 against `csum` (the manifest's), and decodes it (magic, CRC,
/// decompression to at most `max` bytes).
pub fn read_blob_file(path: &Path, csum: &str, max: usize) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    crate::store::file::open_regular(path)
        .and_then(|f| f.take(max as u64 + 64).read_to_end(&mut raw))
        .map_err(|e| Error::io(path.display(), &e))?;
    if raw.len() > max + 12 {
        return Err(Error::unsupported(format!(
            "{}: a blob of more than {max} bytes is not read here",
            path.display()
        )));
    }
    let actual = digest_hex(&crate::store::sha256(&raw));
    if !actual.eq_ignore_ascii_case(csum) {
        return Err(Error::corrupt(format!(
            "{}: checksum mismatch (manifest {csum}, file {actual})",
            path.display()
        )));
    }
    crate::store::blob::decode(&raw, None, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::blob;
    use crate::store::manifest::FileEntry;
    use crate::store::sha256;

    #[test]
    fn snapshot_names() {
        let s = SnapshotPath::parse("ns/prod/ns/sub/vm/100/2026-01-01T00:00:00Z").unwrap();
        assert_eq!(s.namespace, ["prod", "sub"]);
        assert_eq!(s.namespace_str(), "prod/sub");
        assert_eq!(s.to_string(), "ns/prod/ns/sub/vm/100/2026-01-01T00:00:00Z");
        assert_eq!(
            s.rel_path(),
            Path::new("ns/prod/ns/sub/vm/100/2026-01-01T00:00:00Z")
        );
        assert_eq!(s.backup_time(), 1_767_225_600);
        let s = SnapshotPath::parse("host/my.host-1/2024-02-29T23:59:59Z").unwrap();
        assert!(s.namespace.is_empty());
        for bad in [
            "",
            "/vm/100/2026-01-01T00:00:00Z",
            "vm/../2026-01-01T00:00:00Z",
            "vm/100/2026-01-01T00:00:00Z/",
            "vm/100/..",
            "xx/100/2026-01-01T00:00:00Z",
            "vm/.hidden/2026-01-01T00:00:00Z",
            "vm/100/2026-13-01T00:00:00Z",
            "vm/100/2023-02-29T00:00:00Z",
            "vm/100/2026-01-01 00:00:00Z",
            "ns/../vm/100/2026-01-01T00:00:00Z",
            "ns/a/ns/b/ns/c/ns/d/ns/e/ns/f/ns/g/ns/h/vm/1/2026-01-01T00:00:00Z",
            "vm/100",
        ] {
            let err = SnapshotPath::parse(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidPath, "{bad}");
        }
    }

    #[test]
    fn time_conversion_round_trips() {
        for t in [0i64, 951_782_400, 1_700_000_000, 4_102_444_799] {
            let s = format_backup_time(t);
            assert_eq!(parse_backup_time(&s), Some(t), "{s}");
        }
        assert_eq!(format_backup_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    /// A datastore with one fidx snapshot per given name.
    fn store_with(snaps: &[&str]) -> (tempfile::TempDir, Vec<FixedIndex>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".chunks")).unwrap();
        let mut idxs = Vec::new();
        for (n, s) in snaps.iter().enumerate() {
            let snap = SnapshotPath::parse(s).unwrap();
            let sdir = dir.path().join(snap.rel_path());
            std::fs::create_dir_all(&sdir).unwrap();
            let idx = FixedIndex::new(
                "x",
                (n as u64 + 1) * 65536,
                65536,
                (0..=n).map(|i| sha256(&[i as u8])).collect(),
                [0; 16],
                0,
            )
            .unwrap();
            idx.write(&sdir.join("drive-scsi0.img.fidx")).unwrap();
            let conf = blob::encode(b"cfg", false);
            std::fs::write(sdir.join("qemu-server.conf.blob"), &conf).unwrap();
            let mut m = Manifest::new(&snap.backup_type, &snap.backup_id, snap.backup_time());
            m.set_file(FileEntry {
                filename: "drive-scsi0.img.fidx".into(),
                crypt_mode: "none".into(),
                size: idx.size(),
                csum: digest_hex(idx.index_csum()),
            });
            m.set_file(FileEntry {
                filename: "qemu-server.conf.blob".into(),
                crypt_mode: "none".into(),
                size: conf.len() as u64,
                csum: digest_hex(&sha256(&conf)),
            });
            m.store(&sdir.join(MANIFEST_BLOB_NAME)).unwrap();
            idxs.push(idx);
        }
        (dir, idxs)
    }

    #[test]
    fn lists_snapshots_by_namespace() {
        let (dir, _) = store_with(&[
            "vm/100/2026-01-01T00:00:00Z",
            "ct/200/2026-01-02T00:00:00Z",
            "ns/prod/vm/100/2026-01-03T00:00:00Z",
            "ns/prod/ns/sub/host/h1/2026-01-04T00:00:00Z",
        ]);
        // A snapshot still being written (no manifest) is not listed.
        std::fs::create_dir_all(dir.path().join("vm/100/2026-01-05T00:00:00Z")).unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let all = ds.list_snapshots(None).unwrap();
        let names: Vec<&str> = all.iter().map(|s| s.snapshot.as_str()).collect();
        assert_eq!(
            names,
            [
                "ct/200/2026-01-02T00:00:00Z",
                "ns/prod/ns/sub/host/h1/2026-01-04T00:00:00Z",
                "ns/prod/vm/100/2026-01-03T00:00:00Z",
                "vm/100/2026-01-01T00:00:00Z",
            ]
        );
        let sub = &all[1];
        assert_eq!(sub.namespace, "prod/sub");
        // a name listed twice in a manifest is listed once
        let mpath = dir
            .path()
            .join("ns/prod/ns/sub/host/h1/2026-01-04T00:00:00Z")
            .join(MANIFEST_BLOB_NAME);
        let mut m = Manifest::load(&mpath).unwrap();
        m.files.push(m.files[0].clone());
        m.store(&mpath).unwrap();
        let all = ds.list_snapshots(None).unwrap();
        let sub = &all[1];
        assert_eq!((sub.backup_type.as_str(), sub.id.as_str()), ("host", "h1"));
        assert_eq!(sub.archives.len(), 2);
        assert_eq!(sub.archives[0].kind, "image");
        assert_eq!(sub.archives[0].size, 4 * 65536);
        assert_eq!(sub.archives[1].kind, "blob");
        let json = serde_json::to_value(sub).unwrap();
        assert_eq!(json["type"], "host");
        assert_eq!(json["archives"][0]["crypt_mode"], "none");

        let root = ds.list_snapshots(Some("")).unwrap();
        assert_eq!(root.len(), 2);
        assert!(root.iter().all(|s| s.namespace.is_empty()));
        let prod = ds.list_snapshots(Some("prod")).unwrap();
        assert_eq!(prod.len(), 1);
        assert_eq!(prod[0].namespace, "prod");
        assert_eq!(ds.list_snapshots(Some("prod/sub")).unwrap().len(), 1);
        assert_eq!(
            ds.list_snapshots(Some("nope")).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            ds.list_snapshots(Some("../x")).unwrap_err().kind,
            ErrorKind::InvalidPath
        );
    }

    #[test]
    fn opens_archives_and_checks_them_against_the_manifest() {
        let (dir, idxs) = store_with(&["vm/100/2026-01-01T00:00:00Z"]);
        let ds = Datastore::open(dir.path()).unwrap();
        let snap = "vm/100/2026-01-01T00:00:00Z";
        match ds.open_archive(snap, "drive-scsi0.img.fidx").unwrap() {
            Archive::Fixed(idx) => assert_eq!(idx.digests(), idxs[0].digests()),
            other => panic!("{other:?}"),
        }
        let a = ds.open_archive(snap, "qemu-server.conf.blob").unwrap();
        assert!(matches!(a, Archive::Blob { .. }));
        assert!(a.index().is_none());

        let kind = |s: &str, a: &str| ds.open_archive(s, a).unwrap_err().kind;
        // `archive` of `snap` is refused as corrupt, saying each of `words`
        let corrupt = |archive: &str, words: &[&str]| {
            let err = ds.open_archive(snap, archive).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Corrupt);
            for w in words {
                assert!(err.message.contains(w), "{}", err.message);
            }
        };
        assert_eq!(kind(snap, "missing.img.fidx"), ErrorKind::NotFound);
        assert_eq!(
            kind("vm/101/2026-01-01T00:00:00Z", "drive-scsi0.img.fidx"),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(snap, "../drive-scsi0.img.fidx"),
            ErrorKind::InvalidPath
        );
        assert_eq!(kind(snap, "index.json"), ErrorKind::InvalidPath);
        assert_eq!(
            kind("../vm/100/2026-01-01T00:00:00Z", "a.fidx"),
            ErrorKind::InvalidPath
        );

        // A manifest lying about the size.
        let sdir = dir.path().join(snap);
        let mpath = sdir.join(MANIFEST_BLOB_NAME);
        let mut m = Manifest::load(&mpath).unwrap();
        let good = m.clone();
        m.files[0].size += 1;
        m.store(&mpath).unwrap();
        corrupt(
            "drive-scsi0.img.fidx",
            &["manifest says size", "drive-scsi0.img.fidx"],
        );
        m.files[0].size -= 1;
        m.files[1].size = 99;
        m.store(&mpath).unwrap();
        assert_eq!(kind(snap, "qemu-server.conf.blob"), ErrorKind::Corrupt);
        // ... or about the checksum.
        let mut m = good.clone();
        m.files[0].csum = "00".repeat(32);
        m.store(&mpath).unwrap();
        assert_eq!(kind(snap, "drive-scsi0.img.fidx"), ErrorKind::Corrupt);
        // Encrypted archives are refused.
        let mut m = good.clone();
        m.files[0].crypt_mode = "encrypt".into();
        m.store(&mpath).unwrap();
        assert_eq!(kind(snap, "drive-scsi0.img.fidx"), ErrorKind::Unsupported);
        // A blob the manifest gives no checksum for.
        let mut m = good.clone();
        m.files[1].csum = String::new();
        m.store(&mpath).unwrap();
        corrupt("qemu-server.conf.blob", &["no SHA-256"]);
        // The manifest of another snapshot (copied here with its indexes):
        // nothing of this one is served, and it is not listed.
        let mut m = good.clone();
        m.backup_id = "101".into();
        m.store(&mpath).unwrap();
        corrupt("drive-scsi0.img.fidx", &["manifest is for vm/101"]);
        assert!(ds.list_snapshots(None).unwrap().is_empty());
        // A truncated index file.
        good.store(&mpath).unwrap();
        let ipath = sdir.join("drive-scsi0.img.fidx");
        let bytes = std::fs::read(&ipath).unwrap();
        std::fs::write(&ipath, &bytes[..bytes.len() - 3]).unwrap();
        corrupt("drive-scsi0.img.fidx", &["drive-scsi0.img.fidx"]);
    }

    #[test]
    fn open_needs_a_chunk_dir_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Datastore::open(dir.path()).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
