//! Snapshot manifest `index.json.blob`: a DataBlob (usually zstd) of JSON
//! naming the snapshot and listing its files with size, crypt mode and
//! checksum. Reading is lenient (unknown fields ignored, Proxmox Backup's
//! defaults applied); writing (`to_blob`, `store`) is for the importer.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::store::{atomic_file, blob};

/// Manifest file name inside a snapshot directory.
pub const MANIFEST_BLOB_NAME: &str = "index.json.blob";

/// Largest manifest we read, as a file and as decoded JSON (real ones are
/// a few KiB). It is parsed whole: a list of files this long takes a few
/// MiB of memory, and a 16 MiB one took over 100 MiB.
pub const MAX_MANIFEST_SIZE: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub backup_type: String,
    pub backup_id: String,
    pub backup_time: i64,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// Kept as found so an update does not drop notes or verify state.
    #[serde(default)]
    pub unprotected: Unprotected,
    #[serde(default)]
    pub signature: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileEntry {
    pub filename: String,
    /// "none", "encrypt" or "sign-only".
    #[serde(default = "crypt_mode_none")]
    pub crypt_mode: String,
    pub size: u64,
    /// 64 hex: the index checksum for indexes, SHA-256 of the file for blobs.
    #[serde(default)]
    pub csum: String,
}

/// The manifest's `unprotected` section (notes, verify state) as its JSON
/// text: nothing here looks inside it, and parsed into a tree a hostile
/// one (an array of millions of zeros) took 16 times its size in memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Unprotected(Box<RawValue>);

impl Unprotected {
    /// The section's JSON text, as found.
    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl Default for Unprotected {
    /// An empty object.
    fn default() -> Self {
        Unprotected(serde_json::value::to_raw_value(&serde_json::Map::new()).unwrap_or_default())
    }
}

impl PartialEq for Unprotected {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

fn crypt_mode_none() -> String {
    "none".to_string()
}

impl Manifest {
    pub fn new(backup_type: &str, backup_id: &str, backup_time: i64) -> Self {
        Manifest {
            backup_type: backup_type.to_string(),
            backup_id: backup_id.to_string(),
            backup_time,
            files: Vec::new(),
            unprotected: Unprotected::default(),
            signature: None,
        }
    }

    /// Loads and parses `index.json.blob` at `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        use std::io::Read;
        let file = super::file::open_regular(path).map_err(|e| Error::io(path.display(), &e))?;
        let mut raw = Vec::new();
        file.take(MAX_MANIFEST_SIZE as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| Error::io(path.display(), &e))?;
        if raw.len() > MAX_MANIFEST_SIZE {
            return Err(Error::corrupt(format!(
                "{}: manifest over {MAX_MANIFEST_SIZE} bytes",
                path.display()
            )));
        }
        Self::from_blob(&raw, &path.display().to_string())
    }

    /// Parses a manifest blob held in memory; `name` names it in errors.
    pub fn from_blob(raw: &[u8], name: &str) -> Result<Manifest> {
        let json = blob::decode(raw, None, MAX_MANIFEST_SIZE)
            .map_err(|e| Error::new(e.kind, format!("{name}: {}", e.message)))?;
        serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(format!("{name}: invalid manifest JSON: {e}")))
    }

    /// The entry for `filename`, if listed.
    pub fn file(&self, filename: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.filename == filename)
    }

    /// Adds `entry`, replacing any entry with the same file name.
    pub fn set_file(&mut self, entry: FileEntry) {
        match self.files.iter_mut().find(|f| f.filename == entry.filename) {
            Some(slot) => *slot = entry,
            None => self.files.push(entry),
        }
    }

    /// The manifest as a zstd DataBlob of JSON.
    pub fn to_blob(&self) -> Vec<u8> {
        // Serialising plain structs, strings and an already-parsed Value cannot fail.
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        blob::encode(&json, true)
    }

    /// Writes the manifest blob to `path` atomically.
    pub fn store(&self, path: &Path) -> Result<()> {
        atomic_file::write(path, &self.to_blob(), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn reads_a_proxmox_style_manifest_leniently() {
        let json = br#"{"backup-type":"vm","backup-id":"100","backup-time":1700000000,
            "files":[{"filename":"drive-scsi0.img.fidx","crypt-mode":"none","size":34359738368,
                      "csum":"aa"},{"filename":"qemu-server.conf.blob","size":10,"csum":"bb"}],
            "unprotected":{"notes":"hi","chunk_upload_stats":{"count":1}},
            "signature":null,"some-future-field":[1,2]}"#;
        let m = Manifest::from_blob(&blob::encode(json, true), "index.json.blob").unwrap();
        assert_eq!(m.backup_type, "vm");
        assert_eq!(m.backup_time, 1_700_000_000);
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.file("drive-scsi0.img.fidx").unwrap().size, 34_359_738_368);
        assert_eq!(m.file("qemu-server.conf.blob").unwrap().crypt_mode, "none");
        let unprotected: serde_json::Value = serde_json::from_str(m.unprotected.json()).unwrap();
        assert_eq!(unprotected["notes"], "hi");
        // Round trip through our writer keeps everything we know about.
        let back = Manifest::from_blob(&m.to_blob(), "x").unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn store_load_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MANIFEST_BLOB_NAME);
        let mut m = Manifest::new("ct", "a.b", 5);
        let entry = |size| FileEntry {
            filename: "x.img.fidx".into(),
            crypt_mode: "none".into(),
            size,
            csum: "00".repeat(32),
        };
        m.set_file(entry(1));
        m.set_file(entry(2));
        assert_eq!(m.files.len(), 1);
        m.store(&p).unwrap();
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(raw[..8], blob::COMPRESSED_BLOB_MAGIC);
        let back = Manifest::load(&p).unwrap();
        assert_eq!(back.file("x.img.fidx").unwrap().size, 2);
        let json: serde_json::Value =
            serde_json::from_slice(&blob::decode(&raw, None, 1 << 20).unwrap()).unwrap();
        assert_eq!(json["backup-type"], "ct");
        assert_eq!(json["files"][0]["crypt-mode"], "none");
        assert!(json["signature"].is_null());
    }

    #[test]
    fn bad_manifests_are_corrupt_and_named() {
        let err = Manifest::from_blob(&blob::encode(b"{not json", true), "m.blob").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert!(err.message.contains("m.blob"));
        let err = Manifest::from_blob(b"garbage!garbage!", "m.blob").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert!(err.message.contains("m.blob"));
        let err = Manifest::from_blob(&blob::encode(br#"{"backup-type":"vm"}"#, true), "m.blob")
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        // over 1 MiB of JSON, however small its blob
        let mut big =
            br#"{"backup-type":"vm","backup-id":"1","backup-time":0,"unprotected":["#.to_vec();
        big.extend(b"0,".repeat(MAX_MANIFEST_SIZE / 2));
        big.extend(b"0]}");
        let err = Manifest::from_blob(&blob::encode(&big, true), "m.blob").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert!(err.message.contains("m.blob"));
        let err = Manifest::load(Path::new("/nonexistent/index.json.blob")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
    }
}
