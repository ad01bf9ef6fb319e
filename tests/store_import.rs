//! End-to-end test of `restore-client store ...` with the real binary:
//! init, import a mixed image, dedup on re-import, verify, read the image
//! back through the store API, and detect a corrupted chunk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use restore_agent::store::datastore::{Archive, Datastore};
use restore_agent::store::{blob, digest_hex};

const MIB: u64 = 1 << 20;

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_restore-client"))
        .args(args)
        .output()
        .expect("run restore-client")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// A datastore has 65536 directories: use tmpfs when present (fast create/remove).
fn test_dir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(d) = tempfile::tempdir_in("/dev/shm") {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// 5 MiB random, 3 MiB text, 8 MiB written zeros, then a sparse tail up to
/// 23 MiB + 12345 bytes (not a multiple of the 4 MiB chunk size).
fn make_image(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while (data.len() as u64) < 5 * MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let text = b"The quick brown fox jumps over the lazy dog. 0123456789\n";
    data.extend(text.iter().cycle().take(3 * MIB as usize));
    data.extend(std::iter::repeat_n(0u8, 8 * MIB as usize));
    let mut f = File::create(path).unwrap();
    f.write_all(&data).unwrap();
    let total = 23 * MIB + 12345;
    f.set_len(total).unwrap();
    data.resize(total as usize, 0);
    data
}

fn count_chunk_files(store: &Path) -> usize {
    let mut n = 0;
    for sub in std::fs::read_dir(store.join(".chunks")).unwrap() {
        n += std::fs::read_dir(sub.unwrap().path()).unwrap().count();
    }
    n
}

fn read_back(store: &Path, snapshot: &str, archive: &str) -> Vec<u8> {
    let ds = Datastore::open(store).unwrap();
    let archive = ds.open_archive(snapshot, archive).unwrap();
    assert!(matches!(archive, Archive::Fixed(_)));
    let index = archive.index().unwrap();
    let mut out = Vec::with_capacity(index.size() as usize);
    for i in 0..index.chunk_count() {
        let digest = index.chunk_digest(i);
        let raw = std::fs::read(ds.chunk_store().chunk_path(digest)).unwrap();
        let range = index.chunk_range(i);
        let data = blob::decode(&raw, Some(digest), 4 * MIB as usize).unwrap();
        assert_eq!(data.len() as u64, range.end - range.start);
        out.extend_from_slice(&data);
    }
    out
}

#[test]
fn init_import_dedup_verify_and_detect_corruption() {
    let dir = test_dir();
    let store: PathBuf = dir.path().join("store");
    let store_s = store.to_str().unwrap();
    let image = dir.path().join("disk.raw");
    let data = make_image(&image);
    let image_s = image.to_str().unwrap();
    let snap = "ns/prod/vm/100/2026-01-01T00:00:00Z";

    let o = client(&["store", "init", store_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(count_chunk_files(&store), 0);
    // Initialising twice is an operation failure, not a crash, and it is
    // the store's, not an agent's.
    let o = client(&["store", "init", store_s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("store error 1007: ") && stderr(&o).contains("already a datastore"),
        "{}",
        stderr(&o)
    );

    let o = client(&[
        "--output",
        "json",
        "store",
        "import-image",
        "--store",
        store_s,
        "--snapshot",
        snap,
        "--archive",
        "drive-scsi0.img",
        image_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = json(&o);
    assert_eq!(r["archive"], "drive-scsi0.img.fidx");
    assert_eq!(r["size"], 23 * MIB + 12345);
    assert_eq!(r["chunks"], 6);
    // random, random+text, one 4 MiB zero chunk (x3), the short zero tail.
    assert_eq!(r["new_chunks"], 4);
    assert_eq!(count_chunk_files(&store), 4);

    // Re-import under another snapshot: everything is deduplicated.
    let snap2 = "vm/100/2026-01-02T00:00:00Z";
    let o = client(&[
        "--output",
        "json",
        "store",
        "import-image",
        "--store",
        store_s,
        "--snapshot",
        snap2,
        "--archive",
        "drive-scsi0.img",
        image_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["new_chunks"], 0);
    assert_eq!(count_chunk_files(&store), 4);

    let o = client(&["store", "verify", "--store", store_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 snapshots"));

    // The archive reads back byte for byte through the store API.
    assert!(read_back(&store, snap, "drive-scsi0.img.fidx") == data);
    assert!(read_back(&store, snap2, "drive-scsi0.img.fidx") == data);

    // Flip one byte in the chunk holding the text: verify fails naming it.
    let ds = Datastore::open(&store).unwrap();
    let index = ds
        .open_archive(snap, "drive-scsi0.img.fidx")
        .unwrap()
        .index()
        .unwrap();
    let digest = *index.chunk_digest(1);
    let path = ds.chunk_store().chunk_path(&digest);
    let mut raw = std::fs::read(&path).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x20;
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(&raw)
        .unwrap();

    let o = client(&["store", "verify", "--store", store_s, snap]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&digest_hex(&digest)), "{}", stderr(&o));
    let o = client(&["--output", "json", "store", "verify", "--store", store_s]);
    assert_eq!(o.status.code(), Some(1));
    let r = json(&o);
    assert_eq!(r["ok"], false);
    assert_eq!(r["errors"].as_array().unwrap().len(), 1);
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    assert_eq!(client(&["store", "import-image"]).status.code(), Some(2));
    assert_eq!(client(&["store", "frobnicate"]).status.code(), Some(2));
    assert_eq!(
        client(&["--output", "yaml", "store", "verify", "--store", "x"])
            .status
            .code(),
        Some(2)
    );
    let dir = tempfile::tempdir().unwrap();
    let o = client(&["store", "verify", "--store", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a datastore"), "{}", stderr(&o));
    let o = client(&[
        "store",
        "import-image",
        "--store",
        dir.path().to_str().unwrap(),
        "--snapshot",
        "vm/../x",
        "--archive",
        "a.img",
        "/dev/null",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid snapshot name"),
        "{}",
        stderr(&o)
    );
}
