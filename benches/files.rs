//! File-level benchmark (not a test): `cargo bench --bench files`.
//!
//! Builds an ext4 image with mke2fs -d (a 10,000-entry directory, 2,000
//! small files, one 200 MiB file), lays it into a GPT disk, imports it into a
//! datastore on tmpfs with `restore-client store import-image`, starts the
//! agent cargo built for this bench (release profile) on a Unix socket, and
//! reports, side by side:
//! - `fs.list` of the 10,000-entry directory in one page (goal: < 100 ms),
//!   the first listing (the volume's first use: it opens the filesystem,
//!   with no chunk cached) and the median of 5 more;
//! - `fs.extract` of the 2,000 small files as tar, pulled with `stream.read`
//!   (files/s and MB/s, median of 3);
//! - `fs.read` of the 200 MiB file against `image.read` of the same disk
//!   bytes (its extents), 16 MiB requests on one connection, median of 5
//!   alternating runs each (goal: fs.read >= 80% of image.read).
//!
//! Needs e2fsprogs, gdisk and debugfs; exits with a message if missing.
//! `FILES_BENCH_AGENT_ARGS` adds agent options (e.g. `--readahead 0`).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/trees.rs"]
mod trees;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Conn, Recv};
use serde_json::{json, Value};
use trees::{mkimg_ext, noise, place, run, sectors, set_mtimes, write, MIB};

const SNAPSHOT: &str = "vm/100/2026-01-01T00:00:00Z";
const ARCHIVE: &str = "drive-scsi0.img.fidx";
const VOLUME: &str = "part/1";
const BIG: u64 = 200 * MIB;
const PIECE: u64 = 16 * MIB;
const LIST_ENTRIES: usize = 10_000;
const SMALL_FILES: usize = 2_000;

fn main() {
    for tool in ["mke2fs", "sgdisk", "debugfs"] {
        if !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists())
        {
            eprintln!("files bench skipped: {tool} missing");
            return;
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("ra-bench-files-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .expect("scratch dir");
    let d = dir.path();
    let t0 = Instant::now();
    let (store, big_extents) = build(d);
    println!(
        "setup: tree, image, import in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let mut builder = Agent::builder()
        .arg("--datastore")
        .arg(store.to_str().unwrap());
    // e.g. FILES_BENCH_AGENT_ARGS="--readahead 0 --cache-mb 96"
    let extra = std::env::var("FILES_BENCH_AGENT_ARGS").unwrap_or_default();
    for a in extra.split_whitespace() {
        builder = builder.arg(a);
    }
    let agent = builder.start();
    if !extra.is_empty() {
        println!("agent arguments added: {extra}");
    }
    let mut c = agent.connect_authed();
    let info = call(&mut c, "status", Value::Null);
    println!(
        "agent: {} (pool workers {}, cache {} MiB)",
        common::AGENT_BIN,
        info["pool"]["workers"],
        info["cache"]["capacity"].as_u64().unwrap_or(0) >> 20
    );

    bench_list(&mut c);
    bench_extract(&mut c);
    bench_read(&mut c, &big_extents);
    let rss = call(&mut c, "status", Value::Null)["rss_bytes"]
        .as_u64()
        .unwrap_or(0);
    println!("agent RSS at the end: {} MiB", rss >> 20);
}

/// Makes the tree, the image and the datastore; returns the store and the
/// big file's extents as (byte offset in the disk, length).
fn build(d: &Path) -> (std::path::PathBuf, Vec<(u64, u64)>) {
    let src = d.join("src");
    for i in 0..LIST_ENTRIES {
        write(&src.join(format!("wide/entry_{i:05}.txt")), b"x\n");
    }
    for i in 0..SMALL_FILES {
        let data = noise(i as u64, 512 + (i * 37) % 8000);
        write(
            &src.join(format!("small/d{:02}/f{i:04}.bin", i / 100)),
            &data,
        );
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(src.join("big.bin")).unwrap());
    let text: Vec<u8> = b"All work and no play makes Jack a dull boy.\n"
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect();
    for i in 0..BIG / MIB {
        if i % 2 == 0 {
            f.write_all(&noise(1000 + i, MIB as usize)).unwrap();
        } else {
            f.write_all(&text).unwrap();
        }
    }
    f.flush().unwrap();
    drop(f);
    set_mtimes(&src);

    let ext4 = d.join("ext4.img");
    mkimg_ext(
        &src,
        &ext4,
        &["-t", "ext4", "-T", "default", "-L", "bench"],
        320,
    );
    let extents = file_extents(&ext4, "/big.bin");
    let disk = d.join("disk.img");
    let start = 2048u64;
    run(Command::new("truncate")
        .arg("-s")
        .arg(format!(
            "{}",
            (start + sectors(&ext4).div_ceil(2048) * 2048 + 2048) * 512
        ))
        .arg(&disk));
    run(Command::new("sgdisk")
        .arg(format!("-n1:{start}:{}", start + sectors(&ext4) - 1))
        .arg("-t1:8300")
        .arg(&disk));
    place(&disk, &[(&ext4, start)]);
    std::fs::remove_file(&ext4).unwrap();
    std::fs::remove_dir_all(&src).unwrap();

    let store = d.join("store");
    let client = env!("CARGO_BIN_EXE_restore-client");
    run(Command::new(client).args(["store", "init"]).arg(&store));
    run(Command::new(client)
        .args(["store", "import-image", "--store"])
        .arg(&store)
        .args(["--snapshot", SNAPSHOT, "--archive", "drive-scsi0.img"])
        .arg(&disk));
    std::fs::remove_file(&disk).unwrap();
    let extents = extents
        .into_iter()
        .map(|(off, len)| (start * 512 + off, len))
        .collect();
    (store, extents)
}

/// The extents of `file` as (byte offset in the filesystem, byte length),
/// from `debugfs -R "ex FILE"` (4 KiB blocks).
fn file_extents(img: &Path, file: &str) -> Vec<(u64, u64)> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("ex {file}"))
        .arg(img)
        .output()
        .expect("debugfs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut extents = Vec::new();
    for line in text.lines() {
        // leaf rows: "level/levels index/count lstart - lend pstart - pend len"
        let nums: Vec<u64> = line
            .split(|c: char| c.is_whitespace() || c == '-' || c == '/')
            .filter(|s| !s.is_empty())
            .map_while(|s| s.parse().ok())
            .collect();
        if nums.len() == 9 && nums[0] == nums[1] {
            extents.push((nums[6] * 4096, nums[8] * 4096));
        }
    }
    let total: u64 = extents.iter().map(|e| e.1).sum();
    assert!(
        (BIG..BIG + 4096).contains(&total),
        "extents of {file} cover {total} bytes:\n{text}"
    );
    // the last extent may extend past the file's end (block rounding)
    let over = total - BIG;
    if let Some(last) = extents.last_mut() {
        last.1 -= over;
    }
    extents
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Sends a request and returns the raw response line.
fn call_raw(c: &mut Conn, method: &str, params: Value) -> Vec<u8> {
    let mut req = json!({"jsonrpc": "2.0", "id": next_id(), "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    c.send_json(&req);
    match c.recv_line_within(Duration::from_secs(120)) {
        Recv::Line(l) => l,
        other => panic!("{method}: no response: {other:?}"),
    }
}

fn call(c: &mut Conn, method: &str, params: Value) -> Value {
    let line = call_raw(c, method, params);
    let v: Value = serde_json::from_slice(&line).expect("JSON response");
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}

fn target(path: &str) -> Value {
    json!({"snapshot": SNAPSHOT, "archive": ARCHIVE, "volume": VOLUME, "path": path})
}

fn with(mut p: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bench_list(c: &mut Conn) {
    // The first listing is the volume's first use: it opens the
    // filesystem too, and none of its chunks are cached yet.
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        let line = call_raw(
            c,
            "fs.list",
            with(target("/wide"), json!({"limit": 10_000})),
        );
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v["result"]["entries"].as_array().map(Vec::len),
            Some(LIST_ENTRIES)
        );
    }
    let first = times.remove(0);
    println!(
        "fs.list /wide ({LIST_ENTRIES} entries, one page): first use (volume opened, nothing cached) {first:.1} ms, then median {:.1} ms [{}] (goal < 100 ms)",
        median(times.clone()),
        times
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Bytes of a `stream.read` / `fs.read` response line's data, in base64
/// characters, and whether it was the last.
fn data_len(line: &[u8]) -> (usize, bool) {
    let s = line
        .windows(8)
        .position(|w| w == b"\"data\":\"")
        .expect("a data member")
        + 8;
    let e = s + line[s..].iter().position(|&b| b == b'"').unwrap();
    let tail = &line[e..];
    let eof = tail.windows(10).any(|w| w == b"\"eof\":true")
        || line[..s].windows(10).any(|w| w == b"\"eof\":true");
    let b64 = &line[s..e];
    let pad = b64.iter().rev().take_while(|&&b| b == b'=').count();
    (b64.len() / 4 * 3 - pad, eof)
}

fn bench_extract(c: &mut Conn) {
    let mut rates = Vec::new();
    let mut bytes = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let r = call(
            c,
            "fs.extract",
            with(target("/small"), json!({"format": "tar"})),
        );
        let id = r["stream"].as_u64().unwrap();
        bytes = 0;
        loop {
            let line = call_raw(c, "stream.read", json!({"stream": id, "length": PIECE}));
            let (n, eof) = data_len(&line);
            bytes += n;
            if eof {
                break;
            }
        }
        let s = t.elapsed().as_secs_f64();
        rates.push((SMALL_FILES as f64 / s, bytes as f64 / s / 1e6));
        let _ = call_raw(c, "stream.close", json!({ "stream": id }));
    }
    let files: Vec<f64> = rates.iter().map(|r| r.0).collect();
    let mbs: Vec<f64> = rates.iter().map(|r| r.1).collect();
    println!(
        "fs.extract /small as tar ({SMALL_FILES} files, {:.1} MB of tar): median {:.0} files/s, {:.1} MB/s [{}]",
        bytes as f64 / 1e6,
        median(files.clone()),
        median(mbs),
        files
            .iter()
            .map(|f| format!("{f:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn read_fs(c: &mut Conn) -> u64 {
    let mut off = 0u64;
    loop {
        let line = call_raw(
            c,
            "fs.read",
            with(target("/big.bin"), json!({"offset": off, "length": PIECE})),
        );
        let (n, eof) = data_len(&line);
        off += n as u64;
        if eof {
            return off;
        }
    }
}

fn read_image(c: &mut Conn, extents: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    for &(start, len) in extents {
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            let line = call_raw(
                c,
                "image.read",
                json!({"snapshot": SNAPSHOT, "archive": ARCHIVE, "offset": start + done, "length": n}),
            );
            let (got, _) = data_len(&line);
            assert_eq!(got as u64, n);
            done += n;
        }
        total += len;
    }
    total
}

fn bench_read(c: &mut Conn, extents: &[(u64, u64)]) {
    let (mut fs, mut img) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(read_image(c, extents), BIG);
        img.push(BIG as f64 / t.elapsed().as_secs_f64() / 1e6);
        let t = Instant::now();
        assert_eq!(read_fs(c), BIG);
        fs.push(BIG as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (f, i) = (median(fs.clone()), median(img.clone()));
    println!(
        "image.read of /big.bin's {} extent(s), 200 MiB in 16 MiB requests: median {i:.0} MB/s [{}]",
        extents.len(),
        show(&img)
    );
    println!(
        "fs.read of /big.bin, 200 MiB in 16 MiB requests: median {f:.0} MB/s [{}] = {:.0}% of image.read (goal >= 80%)",
        show(&fs),
        100.0 * f / i
    );
}
