//! Datastore acceptance through a running agent (issue 3): images imported
//! with the real `restore-client` are read back with `image.read` at many
//! offsets, lengths and alignments and compared with the source bytes, for
//! `.fidx`, `.didx` and `--image` archives; `snapshot.list` by namespace;
//! corrupt and hostile input answered with the pinned errors while the agent
//! keeps serving; and the agent never changing anything in the store.
//!
//! Datastores live under /dev/shm when present (init makes 65,536 dirs).

mod common;
#[path = "common/trees.rs"]
mod trees;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{error_code, Agent, Conn};
use serde_json::{json, Value};

use restore_agent::store::chunk_store::ChunkStore;
use restore_agent::store::didx::DynamicIndex;
use restore_agent::store::fidx::FixedIndex;
use restore_agent::store::index::ChunkIndex;
use restore_agent::store::manifest::{FileEntry, Manifest, MANIFEST_BLOB_NAME};
use restore_agent::store::{blob, digest_hex, sha256, Digest};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const MAX_READ: u64 = 16 * MIB;
const T1: &str = "2026-01-01T00:00:00Z";
const DISK: &str = "drive-scsi0.img.fidx";

// ---------------------------------------------------------------- fixtures

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_restore-client"))
        .args(args)
        .output()
        .expect("run restore-client")
}

fn client_ok(args: &[&str]) -> Output {
    let o = client(args);
    assert!(
        o.status.success(),
        "restore-client {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A scratch directory on tmpfs when there is one.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ra-dtest-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .expect("scratch dir")
}

/// `restore-client store init DIR/store`.
fn init_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    client_ok(&["store", "init", store.to_str().unwrap()]);
    store
}

/// Imports `image` as `<snapshot>/<archive>.fidx`; returns the JSON report.
fn import(store: &Path, snapshot: &str, archive: &str, image: &Path) -> Value {
    let o = client_ok(&[
        "--output",
        "json",
        "store",
        "import-image",
        "--store",
        store.to_str().unwrap(),
        "--snapshot",
        snapshot,
        "--archive",
        archive,
        image.to_str().unwrap(),
    ]);
    serde_json::from_slice(&o.stdout).expect("import report is JSON")
}

/// xorshift64 pseudo-random bytes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, out: &mut Vec<u8>, len: u64) {
        let end = out.len() + len as usize;
        while out.len() < end {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(end);
    }
}

/// 5 MiB random, 3 MiB text, 8 MiB written zeros, then a sparse (never
/// written) zero tail up to 23 MiB + 12345 bytes: six 4 MiB chunks, the last
/// one short. Returns the bytes the image holds.
fn mixed_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = Vec::new();
    rng.fill(&mut data, 5 * MIB);
    let mut line = 0u64;
    while (data.len() as u64) < 8 * MIB {
        line += 1;
        data.extend_from_slice(
            format!("{line:08} the quick brown fox {seed} jumps over the lazy dog\n").as_bytes(),
        );
    }
    data.truncate(8 * MIB as usize);
    data.resize(16 * MIB as usize, 0);
    let mut f = File::create(path).expect("create image");
    f.write_all(&data).expect("write image");
    let total = 23 * MIB + 12345;
    f.set_len(total).expect("sparse tail");
    data.resize(total as usize, 0);
    data
}

/// `len` random bytes (no zero chunk, nothing shared between seeds).
fn random_image(path: &Path, seed: u64, len: u64) -> Vec<u8> {
    let mut data = Vec::new();
    Rng::new(seed).fill(&mut data, len);
    fs::write(path, &data).expect("write image");
    data
}

fn snapshot_dir(store: &Path, snapshot: &str) -> PathBuf {
    store.join(snapshot)
}

fn fidx_digests(store: &Path, snapshot: &str) -> Vec<Digest> {
    FixedIndex::open(&snapshot_dir(store, snapshot).join(DISK))
        .expect("open fidx")
        .digests()
        .to_vec()
}

fn chunk_path(store: &Path, digest: &Digest) -> PathBuf {
    ChunkStore::open(store)
        .expect("chunk store")
        .chunk_path(digest)
}

/// Adds `<snapshot>/<name>` as a dynamic index over `data`, cut at `cuts`
/// (exclusive end offsets, the last one `data.len()`), writing its chunks
/// (zstd blobs) into the store and listing it in the manifest.
fn add_didx(store: &Path, snapshot: &str, name: &str, data: &[u8], cuts: &[u64]) {
    let mut entries = Vec::new();
    let mut start = 0usize;
    for &end in cuts {
        let piece = &data[start..end as usize];
        let digest = sha256(piece);
        let path = chunk_path(store, &digest);
        if !path.exists() {
            fs::write(&path, blob::encode(piece, true)).expect("write chunk");
        }
        entries.push((end, digest));
        start = end as usize;
    }
    assert_eq!(start, data.len(), "cuts must end at the data's end");
    let idx = DynamicIndex::new(name, &entries, [7; 16], 1_767_225_600).expect("didx");
    let dir = snapshot_dir(store, snapshot);
    idx.write(&dir.join(name)).expect("write didx");
    let mpath = dir.join(MANIFEST_BLOB_NAME);
    let mut m = Manifest::load(&mpath).expect("manifest");
    m.set_file(FileEntry {
        filename: name.into(),
        crypt_mode: "none".into(),
        size: idx.size(),
        csum: digest_hex(idx.index_csum()),
    });
    m.store(&mpath).expect("store manifest");
}

/// Overwrites `path` with `bytes`, in place (keeps the inode).
fn overwrite(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(bytes).expect("overwrite");
}

/// A DataBlob with `magic`, a correct CRC over everything after the 12-byte
/// header, and `body` (for encrypted magics: IV + tag + ciphertext).
fn blob_with_magic(magic: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// First 8 bytes of SHA-256 of `text` (how every format magic is made).
fn magic_of(text: &str) -> [u8; 8] {
    let d = sha256(text.as_bytes());
    let mut m = [0u8; 8];
    m.copy_from_slice(&d[..8]);
    m
}

// ------------------------------------------------------------ agent reads

/// An `image.read` that succeeded: the `eof` flag and the decoded data.
struct ReadOk {
    eof: bool,
    data: Vec<u8>,
}

/// Calls `image.read`; Ok with the checked result, Err with the error object.
fn read(
    conn: &mut Conn,
    snapshot: &str,
    archive: &str,
    offset: u64,
    length: u64,
) -> Result<ReadOk, Value> {
    let r = conn.call(
        "image.read",
        Some(json!({"snapshot": snapshot, "archive": archive, "offset": offset, "length": length})),
    );
    if let Some(e) = r.get("error") {
        return Err(e.clone());
    }
    let res = r["result"]
        .as_object()
        .unwrap_or_else(|| panic!("image.read result is not an object: {r}"));
    let keys: BTreeSet<&str> = res.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["offset", "length", "eof", "data"]),
        "image.read result members"
    );
    assert_eq!(res["offset"], json!(offset), "echoed offset");
    let text = res["data"].as_str().expect("data is a string");
    let data = base64_simd::STANDARD
        .decode_to_vec(text)
        .unwrap_or_else(|e| panic!("data is not padded standard base64: {e}"));
    assert_eq!(res["length"], json!(data.len()), "length = decoded bytes");
    let eof = res["eof"].as_bool().expect("eof is a bool");
    Ok(ReadOk { eof, data })
}

fn read_ok(conn: &mut Conn, snapshot: &str, archive: &str, offset: u64, length: u64) -> ReadOk {
    read(conn, snapshot, archive, offset, length).unwrap_or_else(|e| {
        panic!("image.read {snapshot} {archive} at {offset}+{length} failed: {e}")
    })
}

/// Reads `[offset, offset+length)` and checks it against `src` (clamped at
/// its end), including `eof`.
fn expect_bytes(
    conn: &mut Conn,
    snapshot: &str,
    archive: &str,
    src: &[u8],
    offset: u64,
    length: u64,
) {
    let size = src.len() as u64;
    let r = read_ok(conn, snapshot, archive, offset, length);
    let start = offset.min(size) as usize;
    let end = offset.saturating_add(length).min(size) as usize;
    let want = &src[start..end];
    if r.data != want {
        let first = r
            .data
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(r.data.len().min(want.len()));
        panic!(
            "{snapshot} {archive} at {offset}+{length}: got {} bytes, want {}; first difference at +{first}",
            r.data.len(),
            want.len()
        );
    }
    assert_eq!(
        r.eof,
        end as u64 == size,
        "{snapshot} {archive} at {offset}+{length}: eof (size {size})"
    );
}

/// Offsets and lengths around every boundary in `bounds` (chunk starts),
/// the short last chunk, the end, 16 MiB reads, and seeded random ones.
fn read_cases(size: u64, bounds: &[u64], seed: u64) -> Vec<(u64, u64)> {
    let mut cases = vec![
        (0, 0),
        (0, 1),
        (0, 4096),
        (1, 3),
        (2, 65537),
        (size / 2, 0),
        (0, MAX_READ),
        (CHUNK + 3, MAX_READ),
        (size - 1, 1),
        (size - 10, 100),
        (size, 0),
        (size, 1),
        (size + 1, 10),
        (size + 100 * MIB, MAX_READ),
        (u64::MAX - 4, 4),
    ];
    for &b in bounds.iter().filter(|&&b| b > 0 && b < size) {
        cases.extend([
            (b - 1, 1),
            (b - 1, 2),
            (b - 2, 5),
            (b, 1),
            (b, 3),
            (b + 1, 4096),
            (b - 70_000, 140_001),
        ]);
    }
    let last = bounds
        .iter()
        .copied()
        .filter(|&b| b < size)
        .max()
        .unwrap_or(0);
    cases.extend([
        (last, size - last),
        (last + 1, size - last),
        (last - 1, 2 * CHUNK),
    ]);
    let mut rng = Rng::new(seed);
    for _ in 0..24 {
        let offset = rng.below(size + MIB);
        let length = match rng.below(4) {
            0 => rng.below(16),
            1 => rng.below(70_000),
            2 => rng.below(3 * MIB),
            _ => rng.below(MAX_READ + 1),
        };
        cases.push((offset, length));
    }
    cases
}

fn check_reads(conn: &mut Conn, snapshot: &str, archive: &str, src: &[u8], bounds: &[u64]) {
    let size = src.len() as u64;
    for (offset, length) in read_cases(size, bounds, size ^ archive.len() as u64) {
        if offset > size {
            // Past the end: an empty read with eof, or a params error; never
            // data and never a dead connection.
            match read(conn, snapshot, archive, offset, length) {
                Ok(r) => {
                    assert!(
                        r.data.is_empty(),
                        "{archive}: data past the end at {offset}"
                    );
                    assert!(r.eof, "{archive}: eof past the end at {offset}");
                }
                Err(e) => assert_eq!(e["code"], -32602, "{archive} at {offset}: {e}"),
            }
        } else {
            expect_bytes(conn, snapshot, archive, src, offset, length);
        }
    }
    // One byte over the limit is refused whatever the offset.
    for offset in [0, 1, size] {
        let e = read(conn, snapshot, archive, offset, MAX_READ + 1)
            .err()
            .unwrap_or_else(|| panic!("{archive}: a read of 16 MiB + 1 succeeded"));
        assert_eq!(e["code"], -32602, "{e}");
    }
}

/// Reads the whole archive front to back in `piece`-byte reads, 4 in
/// flight at a time (responses may come back in any order), and returns
/// the bytes.
fn read_all_pipelined(
    conn: &mut Conn,
    snapshot: &str,
    archive: &str,
    size: u64,
    piece: u64,
) -> Vec<u8> {
    let offsets: Vec<u64> = (0..size.div_ceil(piece)).map(|i| i * piece).collect();
    let mut out = Vec::with_capacity(size as usize);
    for group in offsets.chunks(4) {
        for (n, &off) in group.iter().enumerate() {
            conn.send_json(&json!({"jsonrpc": "2.0", "id": n, "method": "image.read",
                "params": {"snapshot": snapshot, "archive": archive, "offset": off, "length": piece}}));
        }
        let mut parts: Vec<Option<Vec<u8>>> = vec![None; group.len()];
        for _ in group {
            let r = conn.recv();
            let n = r["id"].as_u64().expect("numeric id") as usize;
            let off = group[n];
            assert!(
                r.get("error").is_none(),
                "{archive} at {off}: {}",
                r["error"]
            );
            assert_eq!(r["result"]["offset"], json!(off));
            let data = base64_simd::STANDARD
                .decode_to_vec(r["result"]["data"].as_str().expect("data"))
                .expect("base64");
            assert!(parts[n].replace(data).is_none(), "two responses for id {n}");
        }
        for p in parts {
            out.extend_from_slice(&p.expect("a response for every request"));
        }
    }
    out
}

fn status(conn: &mut Conn) -> Value {
    conn.call_ok("status", None)
}

fn counter(st: &Value, section: &str, name: &str) -> u64 {
    st[section][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status.{section}.{name} missing: {st}"))
}

// ------------------------------------------------------------------ tests

#[test]
fn image_read_returns_the_source_bytes_for_fidx_didx_and_attached_images() {
    let dir = scratch();
    let store = init_store(dir.path());
    let image = dir.path().join("disk.raw");
    let src = mixed_image(&image, 1);
    let size = src.len() as u64;
    let snap = format!("vm/100/{T1}");
    let r = import(&store, &snap, "drive-scsi0.img", &image);
    assert_eq!(r["size"], json!(size));
    assert_eq!(r["chunks"], 6);
    // The same bytes as a dynamic index with uneven chunks.
    let cuts = [
        MIB + 17,
        4 * MIB - 5,
        4 * MIB + 60_000,
        9 * MIB,
        9 * MIB + 1,
        16 * MIB,
        21 * MIB + 3,
        size,
    ];
    add_didx(&store, &snap, "root.pxar.didx", &src, &cuts);

    let agent = Agent::builder()
        .datastore(&store)
        .image("disk", &image)
        .arg("--cache-mb")
        .arg("16")
        .arg("--workers")
        .arg("2")
        .start();
    let mut conn = agent.connect_authed();

    // Status sections exist before any read.
    let st0 = status(&mut conn);
    assert_eq!(counter(&st0, "cache", "capacity"), 16 * MIB, "{st0}");
    assert_eq!(counter(&st0, "pool", "workers"), 2, "{st0}");
    for k in ["bytes", "hits", "misses", "readahead_hits"] {
        counter(&st0, "cache", k);
    }
    counter(&st0, "pool", "queued");

    // A front-to-back scan, 1 MiB at a time and 4 in flight, is the image,
    // is served with read-ahead and moves the counters.
    let all = read_all_pipelined(&mut conn, &snap, DISK, size, MIB);
    assert!(
        all == src,
        "pipelined scan of {DISK} differs from the image"
    );
    let st1 = status(&mut conn);
    assert!(
        counter(&st1, "cache", "misses") > counter(&st0, "cache", "misses"),
        "{st1}"
    );
    assert!(
        counter(&st1, "cache", "hits") > counter(&st0, "cache", "hits"),
        "{st1}"
    );
    assert!(
        counter(&st1, "cache", "readahead_hits") > counter(&st0, "cache", "readahead_hits"),
        "a sequential scan used no read-ahead: {st1}"
    );
    assert!(counter(&st1, "pool", "reads") > 0, "{st1}");
    assert!(
        counter(&st1, "cache", "bytes") <= 16 * MIB,
        "cache over its capacity: {st1}"
    );

    let fixed_bounds: Vec<u64> = (1..=size / CHUNK).map(|i| i * CHUNK).collect();
    check_reads(&mut conn, &snap, DISK, &src, &fixed_bounds);
    check_reads(&mut conn, &snap, "root.pxar.didx", &src, &cuts);
    check_reads(&mut conn, "attached", "disk", &src, &fixed_bounds);
    let all = read_all_pipelined(&mut conn, "attached", "disk", size, 3 * MIB + 1);
    assert!(all == src, "pipelined scan of the attached image differs");

    // The zero chunks never hit the disk; the counters kept moving.
    let st2 = status(&mut conn);
    assert!(counter(&st2, "pool", "zero_reads") > 0, "{st2}");
    assert!(
        counter(&st2, "cache", "hits") > counter(&st1, "cache", "hits"),
        "{st2}"
    );
    assert_eq!(counter(&st2, "pool", "queued"), 0, "{st2}");
    assert!(counter(&st2, "cache", "bytes") <= 16 * MIB, "{st2}");
}

#[test]
fn snapshot_list_shows_every_namespace_or_one() {
    let dir = scratch();
    let store = init_store(dir.path());
    let img = |n: u64, len: u64| {
        let p = dir.path().join(format!("img{n}"));
        let data = random_image(&p, n, len);
        (p, data)
    };
    let (p1, d1) = img(1, 5 * MIB + 3);
    let (p2, _) = img(2, 100_000);
    let (p3, d3) = img(3, 4 * MIB);
    let (p4, d4) = img(4, 777);
    let (p5, d5) = img(5, 65536);
    let root = format!("vm/100/{T1}");
    let prod = "ns/prod/vm/200/2026-01-02T00:00:00Z";
    let sub = "ns/prod/ns/sub/ct/300/2026-01-03T12:34:56Z";
    import(&store, &root, "drive-scsi0.img", &p1);
    import(&store, &root, "drive-scsi1.img", &p2);
    import(&store, prod, "drive-scsi0.img", &p3);
    import(&store, sub, "rootfs.img", &p4);
    // A snapshot still being written (no manifest) is not listed.
    fs::create_dir_all(store.join("vm/100/2026-01-05T00:00:00Z")).unwrap();

    let agent = Agent::builder()
        .datastore(&store)
        .image("extra", &p5)
        .start();
    let mut conn = agent.connect_authed();

    let list = |conn: &mut Conn, params: Option<Value>| -> Vec<Value> {
        let r = conn.call_ok("snapshot.list", params);
        let keys: Vec<&String> = r.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["snapshots"], "{r}");
        r["snapshots"].as_array().expect("array").clone()
    };
    let names = |l: &[Value]| -> BTreeSet<String> {
        l.iter()
            .map(|s| s["snapshot"].as_str().expect("snapshot").to_string())
            .collect()
    };

    let all = list(&mut conn, None);
    assert_eq!(
        names(&all),
        BTreeSet::from([root.clone(), prod.into(), sub.into(), "attached".into()]),
    );
    assert_eq!(list(&mut conn, Some(json!({}))), all, "{{}} = no namespace");
    for s in &all {
        let keys: BTreeSet<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["snapshot", "type", "id", "time", "namespace", "archives"]),
            "{s}"
        );
        for a in s["archives"].as_array().unwrap() {
            let keys: BTreeSet<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                BTreeSet::from(["name", "kind", "size", "crypt_mode"]),
                "{a}"
            );
        }
    }
    let entry = |name: &str| all.iter().find(|s| s["snapshot"] == name).unwrap().clone();
    let e = entry(&root);
    assert_eq!(
        (&e["type"], &e["id"], &e["time"], &e["namespace"]),
        (&json!("vm"), &json!("100"), &json!(T1), &json!(""))
    );
    let mut archives = e["archives"].as_array().unwrap().clone();
    archives.sort_by_key(|a| a["name"].as_str().unwrap().to_string());
    assert_eq!(
        archives,
        [
            json!({"name": "drive-scsi0.img.fidx", "kind": "image", "size": 5 * MIB + 3, "crypt_mode": "none"}),
            json!({"name": "drive-scsi1.img.fidx", "kind": "image", "size": 100_000, "crypt_mode": "none"}),
        ]
    );
    let e = entry(prod);
    assert_eq!(
        (&e["type"], &e["id"], &e["time"], &e["namespace"]),
        (
            &json!("vm"),
            &json!("200"),
            &json!("2026-01-02T00:00:00Z"),
            &json!("prod")
        )
    );
    let e = entry(sub);
    assert_eq!(
        (&e["type"], &e["id"], &e["time"], &e["namespace"]),
        (
            &json!("ct"),
            &json!("300"),
            &json!("2026-01-03T12:34:56Z"),
            &json!("prod/sub")
        )
    );
    assert_eq!(
        e["archives"],
        json!([{"name": "rootfs.img.fidx", "kind": "image", "size": 777, "crypt_mode": "none"}])
    );
    let e = entry("attached");
    assert_eq!(e["namespace"], "");
    assert_eq!(
        e["archives"],
        json!([{"name": "extra", "kind": "image", "size": 65536, "crypt_mode": "none"}])
    );

    // One namespace: only its own snapshots.
    let only = |conn: &mut Conn, ns: &str| names(&list(conn, Some(json!({ "namespace": ns }))));
    assert_eq!(only(&mut conn, "prod"), BTreeSet::from([prod.to_string()]));
    assert_eq!(
        only(&mut conn, "prod/sub"),
        BTreeSet::from([sub.to_string()])
    );
    assert_eq!(
        only(&mut conn, ""),
        BTreeSet::from([root.clone(), "attached".into()])
    );
    let l = list(&mut conn, Some(json!({"namespace": "prod"})));
    assert_eq!(l[0], entry(prod), "same entry with and without a namespace");

    // Bad namespaces are errors, and the agent serves on.
    let code = |conn: &mut Conn, p: Value| error_code(&conn.call("snapshot.list", Some(p)));
    assert_eq!(code(&mut conn, json!({"namespace": "nope"})), 1001);
    assert_eq!(code(&mut conn, json!({"namespace": "prod/nope"})), 1001);
    assert_eq!(code(&mut conn, json!({"namespace": "../prod"})), 1006);
    assert_eq!(code(&mut conn, json!({"namespace": "/prod"})), 1006);
    assert_eq!(code(&mut conn, json!({"namespace": 7})), -32602);
    assert_eq!(code(&mut conn, json!({"ns": "prod"})), -32602);

    // Every listed archive reads back.
    for (snap, archive, data) in [
        (root.as_str(), "drive-scsi0.img.fidx", &d1),
        (prod, "drive-scsi0.img.fidx", &d3),
        (sub, "rootfs.img.fidx", &d4),
        ("attached", "extra", &d5),
    ] {
        let size = data.len() as u64;
        expect_bytes(&mut conn, snap, archive, data, 0, size);
        expect_bytes(&mut conn, snap, archive, data, size - 1, 4096);
    }
}

/// An extended boot record that cannot be read (its chunk is corrupt) is
/// an error, not an empty extended partition: `volume.list` answered
/// without the logical partitions, as if they did not exist.
#[test]
fn an_unreadable_extended_boot_record_is_an_error() {
    let dir = scratch();
    let store = init_store(dir.path());
    // 16 MiB: part 1 in the first chunk, the extended partition (its first
    // EBR at 6 MiB) in the second
    let img = dir.path().join("mbr.img");
    File::create(&img).unwrap().set_len(16 * MIB).unwrap();
    trees::sfdisk(&img, "label: dos\n2048,4096,83\n12288,,5\n14336,2048,83\n");
    let snap = format!("vm/1/{T1}");
    import(&store, &snap, "drive-scsi0.img", &img);
    let agent = Agent::builder().datastore(&store).start();
    let mut conn = agent.connect_authed();
    let target = json!({"snapshot": snap, "archive": DISK});
    let listed = conn.call_ok("volume.list", Some(target.clone()));
    let names: Vec<&str> = listed["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["volume"].as_str())
        .collect();
    assert_eq!(names, ["part/1", "part/5"], "{listed}");
    let ebr_chunk = chunk_path(&store, &fidx_digests(&store, &snap)[1]);
    overwrite(&ebr_chunk, b"not a chunk");
    let agent = Agent::builder().datastore(&store).start();
    let mut conn = agent.connect_authed();
    let v = conn.call("volume.list", Some(target));
    assert_eq!(error_code(&v), 1004, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("partition table"), "{message}");
    assert_eq!(conn.call_ok("ping", None), json!("pong"));
}

/// A partition whose first chunk cannot be read is listed with that reason,
/// not as an LVM physical volume: its unreadable sectors say nothing of an
/// LVM label (it was named one, found by fuzzing).
#[test]
fn a_partition_in_a_corrupt_chunk_is_not_an_lvm_volume() {
    let dir = scratch();
    let store = init_store(dir.path());
    // 16 MiB: the table in the first chunk, part 1 (no filesystem, random
    // bytes) in the second and third
    let img = dir.path().join("mbr.img");
    random_image(&img, 7, 16 * MIB);
    trees::sfdisk(&img, "label: dos\n8192,16384,83\n");
    let snap = format!("vm/1/{T1}");
    import(&store, &snap, "drive-scsi0.img", &img);
    let target = json!({"snapshot": snap, "archive": DISK});
    let part1 = |conn: &mut Conn| {
        let listed = conn.call_ok("volume.list", Some(target.clone()));
        let v = listed["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["volume"] == "part/1")
            .cloned();
        v.unwrap_or_else(|| panic!("no part/1 in {listed}"))
    };
    let agent = Agent::builder().datastore(&store).start();
    let v = part1(&mut agent.connect_authed());
    assert_eq!(v["supported"], false, "{v}");
    assert!(v["reason"].is_string(), "{v}");
    assert!(v.get("vg").is_none_or(Value::is_null), "{v}");
    drop(agent);

    let chunk = chunk_path(&store, &fidx_digests(&store, &snap)[1]);
    overwrite(&chunk, b"not a chunk");
    let agent = Agent::builder().datastore(&store).start();
    let v = part1(&mut agent.connect_authed());
    let reason = v["reason"].as_str().unwrap_or_default();
    assert_eq!(v["supported"], false, "{v}");
    assert!(
        reason.contains("cannot read the partition") && !reason.contains("LVM"),
        "{v}"
    );
}

#[test]
fn bad_input_gives_the_pinned_errors_and_the_agent_serves_on() {
    let dir = scratch();
    let store = init_store(dir.path());
    let len = 9 * MIB + 100; // chunks of 4 MiB, 4 MiB, 1 MiB + 100
    let mut sources = BTreeMap::new();
    let snap = |id: u32| format!("vm/{id}/{T1}");
    for id in 1..=12u32 {
        let p = dir.path().join(format!("img{id}"));
        sources.insert(id, random_image(&p, u64::from(id), len));
        import(&store, &snap(id), "drive-scsi0.img", &p);
    }
    let good = snap(1);
    let chunk_of = |id: u32, i: usize| chunk_path(&store, &fidx_digests(&store, &snap(id))[i]);

    // 2: one byte flipped in chunk 1 (the CRC catches it).
    let d2 = fidx_digests(&store, &snap(2));
    let p = chunk_of(2, 1);
    let mut raw = fs::read(&p).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x01;
    overwrite(&p, &raw);
    // 3: a byte flipped in the payload of chunk 1 and the CRC fixed, so only
    // the SHA-256 check can catch it (random data is stored uncompressed).
    let d3 = fidx_digests(&store, &snap(3));
    let p = chunk_of(3, 1);
    let mut raw = fs::read(&p).unwrap();
    assert_eq!(raw[..8], magic_of("Proxmox Backup uncompressed blob v1.0"));
    raw[1000] ^= 0x80;
    let fixed = blob_with_magic(raw[..8].try_into().unwrap(), &raw[12..]);
    overwrite(&p, &fixed);
    // 4: chunk 2 deleted.
    fs::remove_file(chunk_of(4, 2)).unwrap();
    // 5: the index truncated by 7 bytes.
    let idx5 = snapshot_dir(&store, &snap(5)).join(DISK);
    let bytes = fs::read(&idx5).unwrap();
    overwrite(&idx5, &bytes[..bytes.len() - 7]);
    // 6: the index with a wrong magic.
    let idx6 = snapshot_dir(&store, &snap(6)).join(DISK);
    let mut bytes = fs::read(&idx6).unwrap();
    bytes[0] ^= 0xff;
    overwrite(&idx6, &bytes);
    // 7: chunk 1 an encrypted blob, chunk 2 a compressed encrypted one.
    let mut body = vec![0x5a; 32]; // IV + tag
    body.extend_from_slice(b"ciphertext that nobody here can decrypt");
    overwrite(
        &chunk_of(7, 1),
        &blob_with_magic(magic_of("Proxmox Backup encrypted blob v1.0"), &body),
    );
    overwrite(
        &chunk_of(7, 2),
        &blob_with_magic(
            magic_of("Proxmox Backup zstd compressed encrypted blob v1.0"),
            &body,
        ),
    );
    // 8: the manifest says the image is one byte longer.
    let mpath = snapshot_dir(&store, &snap(8)).join(MANIFEST_BLOB_NAME);
    let mut m = Manifest::load(&mpath).unwrap();
    m.files[0].size += 1;
    m.store(&mpath).unwrap();
    // 9: the manifest has a wrong index checksum.
    let mpath = snapshot_dir(&store, &snap(9)).join(MANIFEST_BLOB_NAME);
    let mut m = Manifest::load(&mpath).unwrap();
    m.files[0].csum = "ab".repeat(32);
    m.store(&mpath).unwrap();
    // 10: chunk 1 a zstd blob whose frame is garbage (CRC right).
    let d10 = fidx_digests(&store, &snap(10));
    overwrite(
        &chunk_of(10, 1),
        &blob_with_magic(
            magic_of("Proxmox Backup zstd compressed blob v1.0"),
            &[0x28, 0xb5, 0x2f, 0xfd, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3],
        ),
    );
    // 11: chunk 1 decodes to 6 MiB of zeros: more than the 4 MiB chunk size.
    let d11 = fidx_digests(&store, &snap(11));
    overwrite(&chunk_of(11, 1), &blob::encode(&vec![0u8; 6 << 20], true));
    // 12: the manifest lists the image as encrypted.
    let mpath = snapshot_dir(&store, &snap(12)).join(MANIFEST_BLOB_NAME);
    let mut m = Manifest::load(&mpath).unwrap();
    m.files[0].crypt_mode = "encrypt".into();
    m.store(&mpath).unwrap();
    // Outside the store: a complete copy of a valid snapshot, which no name
    // may reach.
    let outside = dir.path().join("outside");
    let out_snap = outside.join(snap(1));
    fs::create_dir_all(&out_snap).unwrap();
    for f in [DISK, MANIFEST_BLOB_NAME] {
        fs::copy(snapshot_dir(&store, &good).join(f), out_snap.join(f)).unwrap();
    }

    let agent = Agent::builder().datastore(&store).start();
    let mut conn = agent.connect_authed();
    let src1 = sources[&1].clone();
    let mut rng = Rng::new(99);
    // After each failure: the agent still answers, with the right bytes.
    let mut serves_on = |conn: &mut Conn, after: &str| {
        assert_eq!(conn.call_ok("ping", None), json!("pong"), "after {after}");
        let off = rng.below(len);
        let r = read(conn, &good, DISK, off, 300_001)
            .unwrap_or_else(|e| panic!("good read after {after} failed: {e}"));
        let end = (off + 300_001).min(len) as usize;
        assert!(
            r.data == src1[off as usize..end],
            "good read after {after}: wrong bytes"
        );
    };
    let fail = |conn: &mut Conn, snapshot: &str, archive: &str, off: u64, length: u64| -> Value {
        match read(conn, snapshot, archive, off, length) {
            Ok(r) => panic!(
                "image.read {snapshot:?} {archive:?} at {off}+{length} returned {} bytes instead of an error",
                r.data.len()
            ),
            Err(e) => e,
        }
    };
    let message = |e: &Value| e["message"].as_str().unwrap_or_default().to_string();

    // Corrupt chunks: 1004 naming the digest, never data, every time; the
    // intact chunk before it still reads.
    for (id, digest, what) in [
        (2, &d2, "flipped byte"),
        (3, &d3, "digest mismatch"),
        (10, &d10, "bad zstd frame"),
        (11, &d11, "oversized chunk"),
    ] {
        let s = snap(id);
        let src = &sources[&id];
        for (off, length) in [
            (CHUNK + 10, 10),
            (CHUNK - 5, 10),
            (0, MAX_READ),
            (CHUNK + 10, 10),
        ] {
            let e = fail(&mut conn, &s, DISK, off, length);
            assert_eq!(e["code"], 1004, "{what} at {off}: {e}");
            assert!(
                message(&e).contains(&digest_hex(&digest[1])),
                "{what}: message does not name the chunk: {e}"
            );
            serves_on(&mut conn, what);
        }
        expect_bytes(&mut conn, &s, DISK, src, 0, CHUNK);
        expect_bytes(&mut conn, &s, DISK, src, 2 * CHUNK, MIB);
    }

    // Concurrent readers of one corrupt chunk (one shared load) all get
    // 1004, while a good read in the same batch of requests gets its data.
    let s2 = snap(2);
    for n in 0..4 {
        conn.send_json(&json!({"jsonrpc": "2.0", "id": n, "method": "image.read",
            "params": {"snapshot": s2, "archive": DISK, "offset": CHUNK + n * 1000, "length": 100}}));
    }
    conn.send_json(&json!({"jsonrpc": "2.0", "id": 9, "method": "image.read",
        "params": {"snapshot": good, "archive": DISK, "offset": 5, "length": 100}}));
    for _ in 0..5 {
        let r = conn.recv();
        if r["id"] == 9 {
            let data = base64_simd::STANDARD
                .decode_to_vec(r["result"]["data"].as_str().expect("good data"))
                .unwrap();
            assert!(data == src1[5..105], "good read among corrupt ones");
        } else {
            assert_eq!(error_code(&r), 1004, "{r}");
        }
    }

    // A missing chunk is 1001; its neighbours read.
    let d4 = fidx_digests(&store, &snap(4));
    for off in [2 * CHUNK, 2 * CHUNK - 1, 2 * CHUNK + MIB] {
        let e = fail(&mut conn, &snap(4), DISK, off, 100);
        assert_eq!(e["code"], 1001, "{e}");
        assert!(message(&e).contains(&digest_hex(&d4[2])), "{e}");
        serves_on(&mut conn, "missing chunk");
    }
    expect_bytes(&mut conn, &snap(4), DISK, &sources[&4], 0, 2 * CHUNK);

    // Broken indexes: 1004 naming the index file.
    for (id, what) in [(5, "truncated index"), (6, "wrong index magic")] {
        for _ in 0..2 {
            let e = fail(&mut conn, &snap(id), DISK, 0, 10);
            assert_eq!(e["code"], 1004, "{what}: {e}");
            let msg = message(&e);
            assert!(msg.contains(DISK) && msg.contains(&snap(id)), "{what}: {e}");
            serves_on(&mut conn, what);
        }
    }

    // Encrypted chunks are unsupported (1005), not corrupt and not data.
    for off in [CHUNK, 2 * CHUNK + 5] {
        let e = fail(&mut conn, &snap(7), DISK, off, 10);
        assert_eq!(e["code"], 1005, "encrypted chunk at {off}: {e}");
        serves_on(&mut conn, "encrypted chunk");
    }
    expect_bytes(&mut conn, &snap(7), DISK, &sources[&7], 0, 4096);

    // A manifest that lies about size or checksum: 1004 naming the archive.
    for (id, what) in [(8, "size"), (9, "checksum")] {
        let e = fail(&mut conn, &snap(id), DISK, 0, 10);
        assert_eq!(e["code"], 1004, "manifest lying about the {what}: {e}");
        assert!(message(&e).contains(DISK), "{e}");
        serves_on(&mut conn, "lying manifest");
    }
    // A manifest saying "encrypt": 1005.
    let e = fail(&mut conn, &snap(12), DISK, 0, 10);
    assert_eq!(e["code"], 1005, "{e}");
    serves_on(&mut conn, "encrypted archive");

    // Unknown snapshots and archives: 1001.
    for (s, a) in [
        (format!("vm/999/{T1}"), DISK),
        (format!("ct/1/{T1}"), DISK),
        (format!("ns/nope/vm/1/{T1}"), DISK),
        (good.clone(), "drive-scsi9.img.fidx"),
        (good.clone(), "root.pxar.didx"),
        ("attached".to_string(), "disk"),
    ] {
        let e = fail(&mut conn, &s, a, 0, 10);
        assert_eq!(e["code"], 1001, "{s} {a}: {e}");
        serves_on(&mut conn, "unknown snapshot");
    }

    // Path-like names: 1006 (or 1001), never the file outside the store.
    let outside_abs = out_snap.display().to_string();
    let escaping = [
        (format!("../outside/{}", snap(1)), DISK.to_string()),
        (
            format!(
                "../../{}/outside/{}",
                dir.path().file_name().unwrap().to_str().unwrap(),
                snap(1)
            ),
            DISK.to_string(),
        ),
        (outside_abs.clone(), DISK.to_string()),
        (format!("vm/1/{T1}/.."), DISK.to_string()),
        (format!("vm/1/../1/{T1}"), DISK.to_string()),
        (
            format!("vm/1/{T1}/../../../outside/{}", snap(1)),
            DISK.to_string(),
        ),
        (format!("ns/../vm/1/{T1}"), DISK.to_string()),
        (
            good.clone(),
            format!("../../../../outside/{}/{DISK}", snap(1)),
        ),
        (good.clone(), format!("{outside_abs}/{DISK}")),
        (
            good.clone(),
            "../../../../../../../../etc/passwd".to_string(),
        ),
        (good.clone(), MANIFEST_BLOB_NAME.to_string()),
        (good.clone(), "".to_string()),
        (String::new(), DISK.to_string()),
    ];
    for (s, a) in &escaping {
        let e = fail(&mut conn, s, a, 0, 10);
        let code = e["code"].as_i64().unwrap_or(0);
        assert!(
            [1001, 1005, 1006].contains(&code),
            "{s:?} {a:?}: {e} (want 1006 or 1001)"
        );
        serves_on(&mut conn, "path-like name");
    }

    // Bad params: -32602, and still serving.
    for p in [
        json!({"snapshot": good, "archive": DISK, "offset": -1, "length": 1}),
        json!({"snapshot": good, "archive": DISK, "offset": 0}),
        json!({"snapshot": good, "archive": DISK, "offset": 0, "length": 1, "extra": 1}),
        json!({"snapshot": 5, "archive": DISK, "offset": 0, "length": 1}),
        json!([good, DISK, 0, 1, 2]),
    ] {
        let r = conn.call("image.read", Some(p.clone()));
        assert_eq!(error_code(&r), -32602, "{p}: {r}");
        serves_on(&mut conn, "bad params");
    }
    assert!(
        agent.stderr().find("panicked").is_none(),
        "agent panicked:\n{}",
        agent.stderr()
    );
}

/// What is compared of one path: type and mode, size, mtime, ctime (both
/// with nanoseconds), and a hash of a file's bytes. Access times are left
/// out: reading may update them.
type PathState = (u32, u64, (i64, i64), (i64, i64), Option<Digest>);

fn path_state(path: &Path) -> PathState {
    let m = fs::symlink_metadata(path).unwrap();
    let hash = m.is_file().then(|| sha256(&fs::read(path).unwrap()));
    (
        m.mode(),
        m.len(),
        (m.mtime(), m.mtime_nsec()),
        (m.ctime(), m.ctime_nsec()),
        hash,
    )
}

/// The state of every path of a tree.
fn fingerprint(root: &Path) -> BTreeMap<PathBuf, PathState> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    out.insert(root.to_path_buf(), path_state(root));
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let state = path_state(&path);
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.insert(path, state);
        }
    }
    out
}

/// Files under `store` the process `pid` holds open for writing.
fn open_for_writing(pid: i32, store: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = entry.unwrap().file_name();
        let Ok(target) = fs::read_link(format!("/proc/{pid}/fd/{}", fd.to_string_lossy())) else {
            continue; // closed meanwhile
        };
        if !target.starts_with(store) {
            continue;
        }
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
            .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
            found.push(format!("{} (flags {flags:o})", target.display()));
        }
    }
    found
}

/// Lists, reads every archive whole, asks for bad things, and stops.
fn exercise(agent: &mut Agent, store: &Path, sources: &[(String, Vec<u8>)]) {
    let mut conn = agent.connect_authed();
    let l = conn.call_ok("snapshot.list", None);
    assert_eq!(
        l["snapshots"].as_array().unwrap().len(),
        sources.len(),
        "{l}"
    );
    for (snap, src) in sources {
        let size = src.len() as u64;
        let all = read_all_pipelined(&mut conn, snap, DISK, size, 3 * MIB);
        assert!(all == *src, "{snap}: wrong bytes");
        expect_bytes(&mut conn, snap, DISK, src, size - 5, 10);
    }
    let r = conn.call(
        "image.read",
        Some(
            json!({"snapshot": format!("vm/404/{T1}"), "archive": DISK, "offset": 0, "length": 1}),
        ),
    );
    assert_eq!(error_code(&r), 1001);
    let writable = open_for_writing(agent.pid(), store);
    assert!(
        writable.is_empty(),
        "the agent holds store files open for writing: {writable:?}"
    );
    conn.call_ok("status", None);
    conn.call_ok("stop", None);
    agent.expect_exit_code(0, Duration::from_secs(10));
}

#[test]
fn the_agent_changes_nothing_in_the_store_and_runs_on_a_read_only_one() {
    let dir = scratch();
    let store = init_store(dir.path());
    let mut sources = Vec::new();
    for (n, snap) in [format!("vm/100/{T1}"), format!("ns/prod/ct/7/{T1}")]
        .into_iter()
        .enumerate()
    {
        let p = dir.path().join(format!("img{n}"));
        let data = if n == 0 {
            mixed_image(&p, 5)
        } else {
            random_image(&p, 6, 6 * MIB + 1)
        };
        import(&store, &snap, "drive-scsi0.img", &p);
        sources.push((snap, data));
    }
    // No write permission anywhere (root ignores it, but nothing should
    // even try).
    let status = Command::new("chmod")
        .args(["-R", "a-w"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(status.success());
    let before = fingerprint(&store);

    let mut agent = Agent::builder().datastore(&store).start();
    exercise(&mut agent, &store, &sources);
    let after = fingerprint(&store);
    if before != after {
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .take(10)
            .collect();
        panic!("the agent changed the store: {changed:?}");
    }

    // The same on a read-only bind mount, in a mount namespace of the
    // agent's own (so nothing outside sees the mount).
    let can_unshare = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can_unshare {
        eprintln!("skipping the read-only bind mount part: unshare -m is not permitted here");
        return;
    }
    let store_s = store.to_str().unwrap();
    let mut agent = Agent::builder()
        .datastore(&store)
        .wrapper(&[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind -o ro \"$0\" \"$0\" && exec \"$@\"",
            store_s,
        ])
        .start();
    // The agent really sees a read-only mount at the store.
    let mountinfo = fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid())).unwrap();
    let ro = mountinfo.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&store_s) && f.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))
    });
    assert!(
        ro,
        "no read-only mount at {store_s} for the agent:\n{mountinfo}"
    );
    exercise(&mut agent, &store, &sources);
    assert!(fingerprint(&store) == before, "the agent changed the store");
    // Let the temp dir be removed.
    Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(dir.path())
        .status()
        .unwrap();
    let _ = fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700));
}

/// A fixed index file: header (magic, uuid, ctime, checksum of the digests,
/// size, chunk size) padded to 4096 bytes, then the digests.
fn fidx_bytes(size: u64, chunk_size: u64, digests: &[Digest]) -> Vec<u8> {
    let body: Vec<u8> = digests.concat();
    let mut out = vec![0u8; 4096];
    out[..8].copy_from_slice(&magic_of("Proxmox Backup fixed sized chunk index v1.0"));
    out[8..24].copy_from_slice(&[1; 16]);
    out[24..32].copy_from_slice(&1_767_225_600i64.to_le_bytes());
    out[32..64].copy_from_slice(&sha256(&body));
    out[64..72].copy_from_slice(&size.to_le_bytes());
    out[72..80].copy_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A dynamic index file of `(end offset, digest)` entries.
fn didx_bytes(entries: &[(u64, Digest)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (end, d) in entries {
        body.extend_from_slice(&end.to_le_bytes());
        body.extend_from_slice(d);
    }
    let mut out = vec![0u8; 4096];
    out[..8].copy_from_slice(&magic_of("Proxmox Backup dynamic sized chunk index v1.0"));
    out[8..24].copy_from_slice(&[2; 16]);
    out[24..32].copy_from_slice(&1_767_225_600i64.to_le_bytes());
    out[32..64].copy_from_slice(&sha256(&body));
    out.extend_from_slice(&body);
    out
}

/// Writes `bytes` as archive `name` of a new snapshot with a manifest that
/// agrees with it (`size`, checksum from the header), so that only the
/// index itself or its chunks can be wrong.
fn put_archive(store: &Path, snapshot: &str, name: &str, bytes: &[u8], size: u64) {
    let dir = snapshot_dir(store, snapshot);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
    let parts: Vec<&str> = snapshot.rsplitn(3, '/').collect();
    let mut m = Manifest::new("vm", parts[1], 1_767_225_600);
    m.set_file(FileEntry {
        filename: name.into(),
        crypt_mode: "none".into(),
        size,
        csum: digest_hex(bytes[32..64].try_into().unwrap()),
    });
    m.store(&dir.join(MANIFEST_BLOB_NAME)).unwrap();
}

#[test]
fn hostile_indexes_manifests_and_chunk_files_are_refused() {
    let dir = scratch();
    let store = init_store(dir.path());
    let len = 5 * MIB + 1; // a 4 MiB chunk and a short one of 1 MiB + 1
    let mut sources = BTreeMap::new();
    let snap = |id: u32| format!("vm/{id}/{T1}");
    for id in 1..=5u32 {
        let p = dir.path().join(format!("img{id}"));
        sources.insert(id, random_image(&p, 100 + u64::from(id), len));
        import(&store, &snap(id), "drive-scsi0.img", &p);
    }
    let good = snap(1);
    let d1 = fidx_digests(&store, &good);
    let (full, short) = (d1[0], d1[1]);

    let mut hostile: Vec<(u32, &str, &str)> = Vec::new();
    // Fixed indexes with impossible geometry (manifest and checksum agree).
    for (id, size, chunk_size, digests, what) in [
        (10, 100, 0, vec![], "chunk size 0"),
        (11, 32 * MIB, 32 * MIB, vec![full], "chunk size 32 MiB"),
        (
            12,
            1u64 << 62,
            CHUNK,
            vec![full, short],
            "size 2^62 with 2 digests",
        ),
        (13, u64::MAX, 64 << 10, vec![full], "size u64::MAX"),
    ] {
        put_archive(
            &store,
            &snap(id),
            DISK,
            &fidx_bytes(size, chunk_size, &digests),
            size,
        );
        hostile.push((id, DISK, what));
    }
    // A fixed index naming the short chunk where a full one belongs.
    put_archive(
        &store,
        &snap(14),
        DISK,
        &fidx_bytes(8 * MIB, CHUNK, &[short, full]),
        8 * MIB,
    );
    hostile.push((14, DISK, "short chunk where a full one belongs"));
    // Dynamic indexes: offsets going back, one 1 GiB chunk, one chunk
    // claimed longer than it decodes.
    let didx = "root.pxar.didx";
    for (id, entries, what) in [
        (
            20,
            vec![(2 * MIB, full), (MIB, short)],
            "decreasing offsets",
        ),
        (21, vec![(1 << 30, full)], "a 1 GiB chunk"),
        (22, vec![(2 * MIB, short)], "chunk shorter than its entry"),
        (
            23,
            vec![(CHUNK, full), (CHUNK + 3 * MIB, short)],
            "second chunk short",
        ),
    ] {
        let end = entries.last().map_or(0, |e| e.0);
        put_archive(&store, &snap(id), didx, &didx_bytes(&entries), end);
        hostile.push((id, didx, what));
    }
    // Manifests: not a blob at all, and a blob holding no JSON.
    for (id, bytes) in [
        (30, b"{\"not\": \"a blob\"}".to_vec()),
        (31, blob::encode(b"this is no JSON", true)),
    ] {
        let d = snapshot_dir(&store, &snap(id));
        fs::create_dir_all(&d).unwrap();
        fs::copy(snapshot_dir(&store, &good).join(DISK), d.join(DISK)).unwrap();
        fs::write(d.join(MANIFEST_BLOB_NAME), bytes).unwrap();
        hostile.push((id, DISK, "bad manifest"));
    }
    // Another snapshot's manifest, copied with its index; and a right one
    // but for 2 MiB of notes, in a blob of a few KiB.
    let manifest = Manifest::load(&snapshot_dir(&store, &good).join(MANIFEST_BLOB_NAME)).unwrap();
    let mut padded = serde_json::to_value(&manifest).unwrap();
    padded["backup-id"] = json!("34");
    padded["unprotected"] = json!({ "notes": "x".repeat(2 * MIB as usize) });
    for (id, bytes, what) in [
        (33, manifest.to_blob(), "the manifest of another snapshot"),
        (
            34,
            blob::encode(&serde_json::to_vec(&padded).unwrap(), true),
            "a manifest of 2 MiB",
        ),
    ] {
        let d = snapshot_dir(&store, &snap(id));
        fs::create_dir_all(&d).unwrap();
        fs::copy(snapshot_dir(&store, &good).join(DISK), d.join(DISK)).unwrap();
        fs::write(d.join(MANIFEST_BLOB_NAME), bytes).unwrap();
        hostile.push((id, DISK, what));
    }
    // Chunk files: a 20 MiB (sparse) file and a directory.
    let d2 = fidx_digests(&store, &snap(2));
    let f = File::options()
        .write(true)
        .open(chunk_path(&store, &d2[0]))
        .unwrap();
    f.set_len(20 * MIB).unwrap();
    drop(f);
    hostile.push((2, DISK, "20 MiB chunk file"));
    // FIFOs where an index, a chunk and a manifest belong: a plain open
    // waited for a writer for good, freezing the whole agent (an index, on
    // a runtime thread; SIGTERM did not end it either) or a pool worker.
    let fifo = |path: &Path| {
        fs::remove_file(path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    fifo(&snapshot_dir(&store, &snap(4)).join(DISK));
    hostile.push((4, DISK, "index that is a FIFO"));
    fifo(&chunk_path(&store, &fidx_digests(&store, &snap(5))[0]));
    hostile.push((5, DISK, "chunk file that is a FIFO"));
    let d = snapshot_dir(&store, &snap(32));
    fs::create_dir_all(&d).unwrap();
    fs::copy(snapshot_dir(&store, &good).join(DISK), d.join(DISK)).unwrap();
    fs::write(d.join(MANIFEST_BLOB_NAME), b"").unwrap();
    fifo(&d.join(MANIFEST_BLOB_NAME));
    hostile.push((32, DISK, "manifest that is a FIFO"));
    let d3 = fidx_digests(&store, &snap(3));
    let p = chunk_path(&store, &d3[1]);
    fs::remove_file(&p).unwrap();
    fs::create_dir(&p).unwrap();

    let agent = Agent::builder().datastore(&store).start();
    let mut conn = agent.connect_authed();
    let src1 = sources[&1].clone();

    for (id, archive, what) in hostile {
        // Reads that touch the bad part (an archive refused on open is bad
        // everywhere).
        let reads: &[(u64, u64)] = match id {
            14 => &[(0, 10), (0, MAX_READ), (CHUNK - 1, 2)],
            22 => &[(0, 10), (0, MAX_READ), (MIB + 5, 10)],
            23 => &[(CHUNK + 1, 10), (0, MAX_READ), (CHUNK - 1, 2)],
            2 | 5 => &[(0, 10), (0, MAX_READ), (CHUNK - 1, 2)],
            _ => &[(0, 10), (0, MAX_READ), (CHUNK + 1, 10)],
        };
        for &(off, length) in reads {
            match read(&mut conn, &snap(id), archive, off, length) {
                Ok(r) => panic!(
                    "{what}: image.read at {off}+{length} returned {} bytes instead of an error",
                    r.data.len()
                ),
                Err(e) => assert_eq!(e["code"], 1004, "{what} at {off}: {e}"),
            }
            assert_eq!(conn.call_ok("ping", None), json!("pong"), "after {what}");
            expect_bytes(&mut conn, &good, DISK, &src1, off.min(len - 10), 70_000);
        }
    }
    // A chunk path that is a directory: an error (which one is the
    // agent's choice), never data; its sibling chunk reads.
    let e = read(&mut conn, &snap(3), DISK, CHUNK, 10)
        .err()
        .expect("an error");
    assert!(
        [1001, 1004, 1007].contains(&e["code"].as_i64().unwrap_or(0)),
        "{e}"
    );
    expect_bytes(&mut conn, &snap(3), DISK, &sources[&3], 0, CHUNK);

    // The listing still works and skips the snapshots whose manifest is bad.
    let l = conn.call_ok("snapshot.list", None);
    let names: BTreeSet<&str> = l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshot"].as_str().unwrap())
        .collect();
    assert!(names.contains(good.as_str()), "{l}");
    for bad in [30, 31, 32, 33, 34] {
        assert!(!names.contains(snap(bad).as_str()), "{l}");
    }
    assert!(conn.call_ok("status", None)["rss_bytes"].as_u64().unwrap() < 512 * MIB);
    assert!(
        !agent.stderr().contains("panicked"),
        "agent panicked:\n{}",
        agent.stderr()
    );
}

/// Large indexes take none of the agent's own memory: three 32 MiB indexes
/// (64 GiB disks in 64 KiB chunks, every chunk zero, so that no chunk file
/// is needed) read one after the other. They are mapped, so their pages are
/// the page cache's (file-backed, dropped under pressure), not the agent's
/// anonymous memory. Read into memory, opening first held the file and a
/// copy of its digests (twice the index) and all three were kept; then one
/// copy each, and at most two kept; an index of 200 MiB still took 200 MiB
/// (the datastore audit).
#[test]
fn large_indexes_are_mapped_not_read_into_memory() {
    const SMALL_CHUNK: u64 = 64 << 10;
    const DIGESTS: u64 = 1 << 20;
    let dir = scratch();
    let store = init_store(dir.path());
    let zero = sha256(&[0u8; SMALL_CHUNK as usize]);
    let snaps: Vec<String> = (1..=3)
        .map(|d| format!("vm/300/2026-01-0{d}T00:00:00Z"))
        .collect();
    for (i, snap) in snaps.iter().enumerate() {
        let sdir = snapshot_dir(&store, snap);
        fs::create_dir_all(&sdir).unwrap();
        let idx = FixedIndex::new(
            DISK,
            DIGESTS * SMALL_CHUNK,
            SMALL_CHUNK,
            vec![zero; DIGESTS as usize],
            [i as u8; 16],
            1_767_225_600,
        )
        .unwrap();
        idx.write(&sdir.join(DISK)).unwrap();
        let mut m = Manifest::new("vm", "300", 1_767_225_600 + i as i64 * 86_400);
        m.set_file(FileEntry {
            filename: DISK.into(),
            crypt_mode: "none".into(),
            size: idx.size(),
            csum: digest_hex(idx.index_csum()),
        });
        m.store(&sdir.join(MANIFEST_BLOB_NAME)).unwrap();
    }
    let agent = Agent::builder()
        .datastore(&store)
        .arg("--cache-mb")
        .arg("4")
        .start();
    let pid = agent.pid() as u32;
    let mut conn = agent.connect_authed();
    status(&mut conn);
    let anon = || common::proc_status_bytes(pid, "RssAnon");
    let before = anon();
    let mut grew = Vec::new();
    for snap in &snaps {
        let r = read_ok(&mut conn, snap, DISK, 5 * SMALL_CHUNK, 4096);
        assert!(r.data.iter().all(|&b| b == 0), "{snap}");
        grew.push(anon().saturating_sub(before) / MIB);
    }
    eprintln!("anonymous memory grew by {grew:?} MiB");
    // 0 here; [32, 64, 64] when indexes were read into memory
    assert!(
        grew.iter().all(|&g| g < 8),
        "indexes kept in memory: {grew:?} MiB"
    );
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
}

/// `store verify` reports what the agent cannot read: a snapshot whose
/// manifest does not read (it was skipped with a warning, and verify said
/// "ok"), and an index that expects another length of a chunk that other
/// archives share (each chunk was checked against the first length met).
/// Both found by the datastore audit.
#[test]
fn store_verify_reports_what_the_agent_cannot_read() {
    let dir = scratch();
    let store = init_store(dir.path());
    let store_s = store.to_str().unwrap();
    let img = dir.path().join("img");
    mixed_image(&img, 7);
    let snap = |id: u32| format!("vm/{id}/{T1}");
    import(&store, &snap(100), "drive-scsi0.img", &img);
    import(&store, &snap(102), "drive-scsi0.img", &img);
    client_ok(&["store", "verify", "--store", store_s]);
    // the 4 MiB zero chunk (bytes 8-12 MiB of the image) as an 8 MiB one
    let zero = fidx_digests(&store, &snap(100))[2];
    put_archive(
        &store,
        &snap(101),
        DISK,
        &fidx_bytes(8 * MIB, 8 * MIB, &[zero]),
        8 * MIB,
    );
    overwrite(
        &snapshot_dir(&store, &snap(102)).join(MANIFEST_BLOB_NAME),
        b"no manifest",
    );
    let o = client(&["--output", "json", "store", "verify", "--store", store_s]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let r: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let errors = r["errors"].to_string();
    assert!(
        errors.contains(&format!("{}/{DISK}", snap(101))) && errors.contains("8388608"),
        "{errors}"
    );
    assert!(errors.contains(&snap(102)), "{errors}");
    assert_eq!(r["snapshots"], 3, "{r}");
}

/// A dynamic index of 1-byte chunks (no backup writer cuts them so; the
/// datastore audit's 2,000,000 of them took one 4 MiB read to 208 MiB and a
/// whole read to 726 MiB): a read spanning more than 1024 chunks is refused
/// (1005), smaller ones read right, and the cache charges each chunk its
/// bookkeeping, so reading them all stays within the agent's memory.
#[test]
fn reads_over_too_many_tiny_chunks_are_refused_and_memory_stays_bounded() {
    let dir = scratch();
    let store = init_store(dir.path());
    let img = dir.path().join("img");
    random_image(&img, 9, MIB);
    import(&store, &format!("vm/1/{T1}"), "drive-scsi0.img", &img);
    let snap = format!("vm/1/{T1}");
    let n = 300_000u64;
    let data: Vec<u8> = (0..n).map(|i| b"ab"[(i % 7 == 0) as usize]).collect();
    let cuts: Vec<u64> = (1..=n).collect();
    add_didx(&store, &snap, "tiny.didx", &data, &cuts);
    let agent = Agent::builder().datastore(&store).start();
    let mut conn = agent.connect_authed();
    let e = match read(&mut conn, &snap, "tiny.didx", 0, 4 * MIB) {
        Ok(r) => panic!("a read over 300,000 chunks returned {} bytes", r.data.len()),
        Err(e) => e,
    };
    assert_eq!(e["code"], 1005, "{e}");
    assert!(
        e["message"].as_str().unwrap_or("").contains("chunks"),
        "{e}"
    );
    let mut at = 0;
    while at < n {
        let r = read(&mut conn, &snap, "tiny.didx", at, 1000).expect("a read of 1000 chunks");
        assert!(
            r.data == data[at as usize..(at + 1000).min(n) as usize],
            "at {at}"
        );
        at += 1000;
    }
    let st = status(&mut conn);
    assert!(counter(&st, "cache", "bytes") <= 48 * MIB, "{st}");
    let rss = st["rss_bytes"].as_u64().unwrap_or(0);
    assert!(rss < 150 * MIB, "agent RSS {} MiB", rss >> 20);
}
