//! End-to-end tests of `restore-client` against a real `restore-agent`
//! serving a datastore with imported ext4 and FAT images (built by the real
//! mkfs tools from a source tree made here, imported with
//! `restore-client store import-image`). What the client lists, cats and
//! extracts must match the source tree: SHA-256 of every file, modes, mtimes,
//! symlink targets and hard links.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::debugfs::{bmap, inode_offset};
#[path = "common/trees.rs"]
mod trees;
use common::{Agent, AGENT_BIN, TICKET};
use serde_json::Value;
use sha2::{Digest, Sha256};

const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_restore-client");
const SNAPSHOT: &str = "vm/100/2026-01-01T00:00:00Z";
const EXT4: &str = "ext4.img.fidx";
const FAT: &str = "fat.img.fidx";
/// An ext4 image of a tree of many files (extract keeps many in flight).
const MANY: &str = "many.img.fidx";
/// A fixed mtime for the source tree (2025-06-15 12:34:56 UTC; even, for FAT).
const MTIME: i64 = 1_749_990_896;

/// The source tree, its ext4 and FAT images and the datastore holding them;
/// built once per test process.
struct Fixture {
    src: PathBuf,
    fat_src: PathBuf,
    many_src: PathBuf,
    store: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn set_mtime(path: &Path, secs: i64) {
    run(Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{secs}"))
        .arg(path));
}

/// Bump when the fixture's content changes, so that a stale copy is not used.
const FIXTURE_VERSION: u32 = 3;

/// The fixture is kept in cargo's target tmp dir and reused by later runs
/// (a datastore is 65,536 chunk directories: slow to create and to delete).
/// It is built in a scratch directory and renamed into place when complete.
fn build_fixture() -> Fixture {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let done = base.join(format!("client-fixture-v{FIXTURE_VERSION}"));
    let paths = |root: &Path| Fixture {
        src: root.join("src"),
        fat_src: root.join("fat-src"),
        many_src: root.join("many-src"),
        store: root.join("store"),
    };
    if done.join("complete").exists() {
        return paths(&done);
    }
    let root = base.join(format!("client-fixture-build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).expect("fixture dir");

    // The ext4 source: nested dirs, sizes from 0 to over two read chunks,
    // modes, symlinks (relative, absolute, dangling), a hard link, a
    // non-ASCII name.
    let src = root.join("src");
    let deep = src.join("a/b/c/d");
    fs::create_dir_all(&deep).expect("mkdir");
    fs::create_dir_all(src.join("empty-dir")).expect("mkdir");
    let files: [(&str, usize, u32); 7] = [
        ("empty", 0, 0o644),
        ("small.txt", 13, 0o600),
        ("a/one-chunk.bin", 1 << 20, 0o640),
        ("a/b/big.bin", (9 << 20) + 12_345, 0o644),
        ("a/b/c/d/deep.txt", 100, 0o444),
        ("a/run.sh", 4096, 0o755),
        ("a/b/héllo wörld.txt", 77, 0o644),
    ];
    for (i, (name, len, mode)) in files.iter().enumerate() {
        let p = src.join(name);
        fs::write(&p, noise(*len, i as u64 + 1)).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    fs::hard_link(src.join("a/run.sh"), src.join("run-link.sh")).expect("hard link");
    std::os::unix::fs::symlink("b/big.bin", src.join("a/rel-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs-link")).expect("symlink");
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).expect("symlink");
    fs::set_permissions(src.join("a/b/c"), fs::Permissions::from_mode(0o750)).expect("chmod");
    // Times last, deepest first, so that no later change moves them.
    let mut all = walk(&src);
    all.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (i, (rel, _)) in all.iter().enumerate() {
        set_mtime(&src.join(rel), MTIME - 1000 * i as i64);
    }
    set_mtime(&src, MTIME);

    let ext4 = root.join("ext4.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&ext4)
        .arg("64M")
        .env("E2FSPROGS_FAKE_TIME", "1750000000"));

    // FAT: names, contents and (2-second) mtimes only.
    let fat_src = root.join("fat-src");
    fs::create_dir_all(fat_src.join("DOCS/SUB")).expect("mkdir");
    fs::write(fat_src.join("README.TXT"), b"hello from FAT\n").expect("write");
    fs::write(fat_src.join("DOCS/Long File Name.bin"), noise(300_000, 99)).expect("write");
    fs::write(fat_src.join("DOCS/SUB/x.dat"), noise(5000, 7)).expect("write");
    for (rel, _) in walk(&fat_src) {
        set_mtime(&fat_src.join(rel), MTIME);
    }
    let fat = root.join("fat.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-F", "16", "-n", "RESTORE"])
        .arg(&fat)
        .arg("16384"));
    let mut mcopy = Command::new("mcopy");
    mcopy.env("TZ", "UTC").args(["-s", "-m", "-i"]).arg(&fat);
    for entry in fs::read_dir(&fat_src).expect("read_dir") {
        mcopy.arg(entry.expect("entry").path());
    }
    run(mcopy.arg("::/"));

    // Many files: 600 small ones (0 - 40 KiB) in 30 directories two levels
    // deep, three of several read chunks each, hard links across
    // directories, symlinks, varied modes.
    let many_src = root.join("many-src");
    for i in 0..600u64 {
        let p = many_src.join(format!("top{}/sub{}/f{i:03}.dat", i % 5, i % 6));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, noise((i as usize * 7919) % 40_000, 1000 + i)).expect("write");
        let mode = [0o644, 0o600, 0o755, 0o444][i as usize % 4];
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    for i in 0..3u64 {
        let p = many_src.join(format!("top{i}/sub{i}/big{i}.bin"));
        fs::write(&p, noise((5 << 20) + 777 * i as usize, 5000 + i)).expect("write");
    }
    fs::hard_link(
        many_src.join("top1/sub1/big1.bin"),
        many_src.join("top4/big-link.bin"),
    )
    .expect("hard link");
    fs::hard_link(
        many_src.join("top0/sub0/f000.dat"),
        many_src.join("top3/f000-link.dat"),
    )
    .expect("hard link");
    std::os::unix::fs::symlink("sub2/f002.dat", many_src.join("top2/link")).expect("symlink");
    let mut all = walk(&many_src);
    all.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (i, (rel, _)) in all.iter().enumerate() {
        set_mtime(&many_src.join(rel), MTIME - 10 * i as i64);
    }
    let many = root.join("many.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&many_src)
        .arg(&many)
        .arg("64M")
        .env("E2FSPROGS_FAKE_TIME", "1750000000"));

    // A damaged FAT: SHORT.BIN's directory entry says 1,000,000 bytes,
    // its cluster chain holds 4096.
    let short_src = root.join("SHORT.BIN");
    fs::write(&short_src, noise(4096, 31)).expect("write");
    let short = root.join("fat-short.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-F", "12", "-n", "SHORT"])
        .arg(&short)
        .arg("1024"));
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&short)
        .arg(&short_src)
        .arg("::/"));
    let mut image = fs::read(&short).expect("read");
    let at = image
        .windows(11)
        .position(|w| w == b"SHORT   BIN")
        .expect("directory entry");
    image[at + 28..at + 32].copy_from_slice(&1_000_000u32.to_le_bytes());
    fs::write(&short, &image).expect("write");

    let store = root.join("store");
    run(Command::new(CLIENT_BIN).args(["store", "init"]).arg(&store));
    for (img, name) in [
        (&ext4, "ext4.img"),
        (&fat, "fat.img"),
        (&many, "many.img"),
        (&short, "fat-short.img"),
    ] {
        run(Command::new(CLIENT_BIN)
            .args(["store", "import-image", "--store"])
            .arg(&store)
            .args(["--snapshot", SNAPSHOT, "--archive", name])
            .arg(img));
    }
    let _ = (src, fat_src, many_src, store);
    fs::write(root.join("complete"), b"").expect("marker");
    let _ = fs::remove_dir_all(&done);
    fs::rename(&root, &done).expect("fixture into place");
    paths(&done)
}

/// Every path under `dir` (relative, `/`-separated) with its lstat metadata.
fn walk(dir: &Path) -> Vec<(String, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(dir.join(&rel)).expect("read_dir") {
            let entry = entry.expect("entry");
            let rel_child = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path()).expect("lstat");
            if meta.is_dir() {
                stack.push(rel_child.clone());
            }
            out.push((rel_child.to_string_lossy().into_owned(), meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn sha256(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a tree looks like, per path: type, content hash or link target,
/// permission bits and mtime.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    content: String,
    mode: u32,
    mtime: i64,
}

fn describe(root: &Path, with_mode: bool, dir_mtimes: bool) -> BTreeMap<String, Node> {
    walk(root)
        .into_iter()
        .map(|(rel, m)| {
            let path = root.join(&rel);
            let (kind, content) = if m.file_type().is_symlink() {
                let t = fs::read_link(&path).expect("readlink");
                ("symlink", t.to_string_lossy().into_owned())
            } else if m.is_dir() {
                ("dir", String::new())
            } else {
                ("file", sha256(&path))
            };
            let mtime = if kind == "dir" && !dir_mtimes {
                0
            } else {
                m.mtime()
            };
            let mode = if with_mode && kind != "symlink" {
                m.mode() & 0o7777
            } else {
                0
            };
            (
                rel,
                Node {
                    kind,
                    content,
                    mode,
                    mtime,
                },
            )
        })
        .collect()
}

fn start_agent() -> Agent {
    Agent::builder()
        .arg("--datastore")
        .arg(fixture().store.to_string_lossy())
        .start()
}

/// `restore-client --connect unix:SOCK --ticket-file T ARGS...`.
fn client(agent: &Agent, args: &[&str]) -> Output {
    client_at(
        &format!("unix:{}", agent.sock.display()),
        &agent.ticket_path,
        args,
    )
}

fn client_at(connect: &str, ticket: &Path, args: &[&str]) -> Output {
    client_command(connect, ticket)
        .args(args)
        .output()
        .expect("run restore-client")
}

/// `restore-client --connect CONNECT --ticket-file TICKET`, stdin closed,
/// for the arguments and stdio a test gives it.
fn client_command(connect: &str, ticket: &Path) -> Command {
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.arg("--connect")
        .arg(connect)
        .arg("--ticket-file")
        .arg(ticket)
        .stdin(Stdio::null());
    cmd
}

/// [`client_command`] for `agent`'s Unix socket.
fn agent_command(agent: &Agent) -> Command {
    client_command(
        &format!("unix:{}", agent.sock.display()),
        &agent.ticket_path,
    )
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "restore-client failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Checks that restore-client exited with `code`, showing its stderr if not.
fn exits(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ra-client-")
        .tempdir()
        .expect("temp dir")
}

#[test]
fn snapshots_archives_volumes_as_json_and_tables() {
    let agent = start_agent();
    let v = json(&ok(client(&agent, &["--output", "json", "snapshots"])));
    let snaps = v["snapshots"].as_array().expect("snapshots array");
    let snap = snaps
        .iter()
        .find(|s| s["snapshot"] == SNAPSHOT)
        .expect("our snapshot listed");
    let names: Vec<&str> = snap["archives"]
        .as_array()
        .expect("archives")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert!(names.contains(&EXT4) && names.contains(&FAT), "{names:?}");

    // Global options after the subcommand work too.
    let v = json(&ok(client(
        &agent,
        &["archives", SNAPSHOT, "--output", "json"],
    )));
    let ext4 = v["archives"]
        .as_array()
        .expect("archives")
        .iter()
        .find(|a| a["name"] == EXT4)
        .expect("ext4 archive");
    assert_eq!(ext4["size"], 64 << 20);

    let table =
        String::from_utf8(ok(client(&agent, &["archives", SNAPSHOT])).stdout).expect("utf8");
    assert!(table.starts_with("ARCHIVE"), "{table}");
    assert!(table.contains("64M"), "{table}");

    let v = json(&ok(client(
        &agent,
        &["--output", "json", "volumes", SNAPSHOT, EXT4],
    )));
    let vols = v["volumes"].as_array().expect("volumes");
    assert_eq!(vols.len(), 1, "{v}");
    assert_eq!(vols[0]["volume"], "raw");
    assert_eq!(vols[0]["fs"], "ext4");
    let v = json(&ok(client(
        &agent,
        &["--output", "json", "volumes", SNAPSHOT, FAT],
    )));
    assert_eq!(v["volumes"][0]["fs"], "vfat", "{v}");

    let v = json(&ok(client(&agent, &["--output", "json", "status"])));
    assert_eq!(v["protocol"], 1);
    // For people: sizes readable, seconds with their unit, nothing as `-`.
    let out = ok(client(&agent, &["status"]));
    let said = String::from_utf8_lossy(&out.stdout);
    let row = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(key).filter(|r| r.starts_with(' ')))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in {said}"))
            .to_string()
    };
    assert_eq!(row("cache.capacity"), "48M (50331648)");
    assert!(row("uptime_s").ends_with(" s"), "{said}");
    assert!(row("rss_bytes").ends_with(')'), "{said}");
    assert_eq!(row("protocol"), "1");
    assert_eq!(
        json(&ok(client(&agent, &["--output", "json", "ping"]))),
        "pong"
    );
    let v = json(&ok(client(
        &agent,
        &[
            "--output",
            "json",
            "call",
            "fs.stat",
            &format!(
                r#"{{"snapshot":"{SNAPSHOT}","archive":"{EXT4}","volume":"raw","path":"/small.txt"}}"#
            ),
        ],
    )));
    assert_eq!(v["size"], 13);
    // A bulk method through `call` keeps its base64 data.
    let call_read = |encoding: &str| {
        let params = format!(
            r#"{{"snapshot":"{SNAPSHOT}","archive":"{EXT4}","volume":"raw","path":"/small.txt","offset":0,"length":100,"encoding":"{encoding}"}}"#
        );
        json(&ok(client(
            &agent,
            &["--output", "json", "call", "fs.read", &params],
        )))
    };
    let v = call_read("base64");
    assert_eq!(v["length"], 13, "{v}");
    assert_eq!(v["eof"], true, "{v}");
    assert!(v.get("slot").is_none(), "{v}");
    let want = fs::read(fixture().src.join("small.txt")).expect("read");
    let b64 = v["data"].as_str().expect("data");
    let got = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(b64.as_bytes())?;
            c.wait_with_output()
        })
        .expect("base64 -d");
    assert_eq!(got.stdout, want);
    // Asked for raw, `call` prints the same.
    let raw = call_read("raw");
    assert_eq!(raw, v);
}

#[test]
fn ls_matches_the_source_tree() {
    let agent = start_agent();
    let fx = fixture();
    let v = json(&ok(client(
        &agent,
        &["--output", "json", "ls", "-R", SNAPSHOT, EXT4, "raw", "/"],
    )));
    let mut listed = BTreeMap::new();
    for e in v["entries"].as_array().expect("entries") {
        let path = e["path"]
            .as_str()
            .expect("path")
            .trim_start_matches('/')
            .to_string();
        if path == "lost+found" || path.starts_with("lost+found/") {
            continue;
        }
        listed.insert(path, e.clone());
    }
    let source = walk(&fx.src);
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        source.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (rel, m) in &source {
        let e = &listed[rel];
        let kind = if m.file_type().is_symlink() {
            "symlink"
        } else if m.is_dir() {
            "dir"
        } else {
            "file"
        };
        assert_eq!(e["type"], kind, "{rel}");
        assert_eq!(e["mtime"], m.mtime(), "{rel}");
        if kind == "symlink" {
            let target = fs::read_link(fx.src.join(rel)).expect("readlink");
            assert_eq!(e["target"], target.to_string_lossy().as_ref(), "{rel}");
        } else {
            assert_eq!(e["mode"], m.mode() & 0o7777, "{rel}");
        }
        if kind == "file" {
            assert_eq!(e["size"], m.len(), "{rel}");
        }
    }

    // Human long listing: ls -l style rows.
    let text =
        String::from_utf8(ok(client(&agent, &["ls", "-l", SNAPSHOT, EXT4, "raw", "/a"])).stdout)
            .expect("utf8");
    let run_sh = text
        .lines()
        .find(|l| l.ends_with(" run.sh"))
        .expect("run.sh row");
    assert!(run_sh.starts_with("-rwxr-xr-x  2"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with('l') && l.ends_with("rel-link -> b/big.bin")),
        "{text}"
    );
    // ls of a file lists that file.
    let text =
        String::from_utf8(ok(client(&agent, &["ls", SNAPSHOT, EXT4, "raw", "/small.txt"])).stdout)
            .expect("utf8");
    assert_eq!(text.trim(), "/small.txt");
}

#[test]
fn cat_matches_the_source_files() {
    let agent = start_agent();
    let fx = fixture();
    for rel in [
        "a/b/big.bin",
        "small.txt",
        "empty",
        "a/b/héllo wörld.txt",
        "a/one-chunk.bin",
    ] {
        let out = ok(client(
            &agent,
            &["cat", SNAPSHOT, EXT4, "raw", &format!("/{rel}")],
        ));
        let want = fs::read(fx.src.join(rel)).expect("read source");
        assert!(
            out.stdout == want,
            "cat /{rel}: {} bytes, want {}",
            out.stdout.len(),
            want.len()
        );
    }
    // Through a symlink.
    let out = ok(client(
        &agent,
        &["cat", SNAPSHOT, EXT4, "raw", "/a/rel-link"],
    ));
    assert_eq!(
        out.stdout,
        fs::read(fx.src.join("a/b/big.bin")).expect("read")
    );
    let out = ok(client(
        &agent,
        &["cat", SNAPSHOT, FAT, "raw", "/DOCS/Long File Name.bin"],
    ));
    assert_eq!(
        out.stdout,
        fs::read(fx.fat_src.join("DOCS/Long File Name.bin")).expect("read")
    );
}

#[test]
fn extract_to_a_directory_matches_the_source_tree() {
    let agent = start_agent();
    let fx = fixture();
    let out_dir = tmp();
    let dest = out_dir.path().join("restored");
    let v = json(&ok(client(
        &agent,
        &[
            "--output",
            "json",
            "extract",
            SNAPSHOT,
            EXT4,
            "raw",
            "/",
            "-o",
            dest.to_str().expect("utf8"),
        ],
    )));
    assert_eq!(v["hardlinks"], 1, "{v}");
    let _ = fs::remove_dir_all(dest.join("lost+found"));
    assert_eq!(describe(&dest, true, true), describe(&fx.src, true, true));
    // The hard link is one inode again.
    let a = fs::metadata(dest.join("a/run.sh")).expect("stat");
    let b = fs::metadata(dest.join("run-link.sh")).expect("stat");
    assert_eq!(a.ino(), b.ino());

    let extract_root = |extra: &[&str]| {
        let mut args = vec!["extract", SNAPSHOT, EXT4, "raw", "/", "-o"];
        args.push(dest.to_str().expect("utf8"));
        args.extend(extra);
        client(&agent, &args)
    };
    // Again: refused without --force, nothing changed.
    fs::write(dest.join("small.txt"), b"local edit").expect("write");
    let out = extract_root(&[]);
    exits(&out, 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(
        fs::read(dest.join("small.txt")).expect("read"),
        b"local edit"
    );
    // A file where the tree has a directory: named, and kept without --force.
    fs::remove_dir_all(dest.join("a")).expect("rm a");
    fs::write(dest.join("a"), b"a file now").expect("write");
    let out = extract_root(&[]);
    exits(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exists and is not a directory") && err.contains("--force"),
        "{err}"
    );
    // With --force the tree is restored again, the file replaced by its
    // directory.
    ok(extract_root(&["--force"]));
    let _ = fs::remove_dir_all(dest.join("lost+found"));
    assert_eq!(describe(&dest, true, true), describe(&fx.src, true, true));

    // One file lands under its own name, and the summary counts it as one.
    let single = out_dir.path().join("single");
    let out = ok(client(
        &agent,
        &[
            "extract",
            SNAPSHOT,
            EXT4,
            "raw",
            "/a/b/big.bin",
            "-o",
            single.to_str().expect("utf8"),
        ],
    ));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("extracted 1 file, 0 directories, 0 symlinks, 0 hard links ("),
        "{said}"
    );
    assert_eq!(
        sha256(&single.join("big.bin")),
        sha256(&fx.src.join("a/b/big.bin"))
    );
    assert_eq!(
        fs::metadata(single.join("big.bin")).expect("stat").mtime(),
        fs::metadata(fx.src.join("a/b/big.bin"))
            .expect("stat")
            .mtime()
    );

    // FAT: names, contents, mtimes.
    let fat_dest = out_dir.path().join("fat");
    ok(client(
        &agent,
        &[
            "extract",
            SNAPSHOT,
            FAT,
            "raw",
            "/",
            "-o",
            fat_dest.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(
        describe(&fat_dest, false, false),
        describe(&fx.fat_src, false, false)
    );
}

#[test]
fn extract_of_many_files_matches_the_source_tree() {
    let agent = start_agent();
    let fx = fixture();
    let out_dir = tmp();
    let dest = out_dir.path().join("many");
    let v = json(&ok(client(
        &agent,
        &[
            "--output",
            "json",
            "extract",
            SNAPSHOT,
            MANY,
            "raw",
            "/",
            "-o",
            dest.to_str().expect("utf8"),
        ],
    )));
    assert_eq!(v["files"], 603, "{v}");
    assert_eq!(v["hardlinks"], 2, "{v}");
    let _ = fs::remove_dir_all(dest.join("lost+found"));
    assert_eq!(
        describe(&dest, true, true),
        describe(&fx.many_src, true, true)
    );
    for (a, b) in [
        ("top1/sub1/big1.bin", "top4/big-link.bin"),
        ("top0/sub0/f000.dat", "top3/f000-link.dat"),
    ] {
        let a = fs::metadata(dest.join(a)).expect("stat");
        let b = fs::metadata(dest.join(b)).expect("stat");
        assert_eq!(a.ino(), b.ino(), "hard link restored as a copy");
    }
    // A subdirectory: its contents land in DIR; a hard link whose other
    // name is outside it is a file of its own.
    for sub in ["top1", "top4"] {
        let d = out_dir.path().join(sub);
        ok(client(
            &agent,
            &[
                "extract",
                SNAPSHOT,
                MANY,
                "raw",
                &format!("/{sub}"),
                "-o",
                d.to_str().expect("utf8"),
            ],
        ));
        let mut want = describe(&fx.many_src.join(sub), true, true);
        let mut got = describe(&d, true, true);
        // DIR itself is not part of the comparison, only what is inside.
        want.retain(|k, _| !k.is_empty());
        got.retain(|k, _| !k.is_empty());
        assert_eq!(got, want, "/{sub}");
    }
}

#[test]
fn a_tree_transfer_cut_short_leaves_only_complete_files() {
    let agent = start_agent();
    let fx = fixture();
    let dir = tmp();
    // Cut while many files are in flight: the first stream.read answers (up
    // to 4 MiB each) get through, then one is cut.
    let vmm = fake_vmm(dir.path(), &agent.sock, Some(12 << 20));
    let dest = dir.path().join("out");
    let out = client_at(
        &format!("hybrid:{}:1234", vmm.display()),
        &agent.ticket_path,
        &[
            "extract",
            SNAPSHOT,
            MANY,
            "raw",
            "/",
            "-o",
            dest.to_str().expect("utf8"),
        ],
    );
    exits(&out, 2);
    let (mut files, mut dirs) = (0, 0);
    for (rel, meta) in walk(&dest) {
        if meta.is_file() {
            files += 1;
            assert_eq!(
                sha256(&dest.join(&rel)),
                sha256(&fx.many_src.join(&rel)),
                "{rel} left behind incomplete"
            );
        } else if meta.is_dir() && rel != "lost+found" {
            // Given their modes and mtimes after the failure too (as tar
            // does), not left at the 0700 they are made with; the mtime
            // once the partial file is gone.
            dirs += 1;
            let src = fs::metadata(fx.many_src.join(&rel)).expect("source");
            assert_eq!(meta.mode() & 0o7777, src.mode() & 0o7777, "mode of {rel}");
            assert_eq!(meta.mtime(), src.mtime(), "mtime of {rel}");
        }
    }
    assert!(files < 603, "the transfer was not cut ({files} files)");
    assert!(files > 0 && dirs > 0, "cut before any file ({dirs} dirs)");
}

#[test]
fn extract_never_writes_outside_the_directory() {
    let agent = start_agent();
    let out_dir = tmp();
    let dest = out_dir.path().join("d");
    let outside = out_dir.path().join("outside");
    fs::create_dir_all(&dest).expect("mkdir");
    fs::create_dir_all(&outside).expect("mkdir");
    // A symlink where the archive has directory `a`: never followed.
    // Without --force it stays and the extraction stops; --force replaces
    // the symlink itself with the directory.
    std::os::unix::fs::symlink(&outside, dest.join("a")).expect("symlink");
    for (force, status) in [(false, 2), (true, 0)] {
        let mut args = vec!["extract", SNAPSHOT, EXT4, "raw", "/", "-o"];
        args.push(dest.to_str().expect("utf8"));
        if force {
            args.push("--force");
        }
        exits(&client(&agent, &args), status);
        assert_eq!(
            fs::read_dir(&outside).expect("read_dir").count(),
            0,
            "wrote through a symlink"
        );
    }
    let a = fs::symlink_metadata(dest.join("a")).expect("a");
    assert!(a.is_dir(), "{a:?}");
}

#[test]
fn extract_as_tar_zip_and_stdout() {
    let agent = start_agent();
    let fx = fixture();
    let out_dir = tmp();
    let tar = out_dir.path().join("tree.tar");
    ok(client(
        &agent,
        &[
            "extract",
            SNAPSHOT,
            EXT4,
            "raw",
            "/",
            "--tar",
            tar.to_str().expect("utf8"),
        ],
    ));
    let unpacked = out_dir.path().join("from-tar");
    fs::create_dir_all(&unpacked).expect("mkdir");
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&tar)
        .arg("-C")
        .arg(&unpacked));
    let _ = fs::remove_dir_all(unpacked.join("lost+found"));
    assert_eq!(
        describe(&unpacked, true, false),
        describe(&fx.src, true, false)
    );
    // The file exists now: refused without --force.
    let out = client(
        &agent,
        &[
            "extract",
            SNAPSHOT,
            EXT4,
            "raw",
            "/",
            "--tar",
            tar.to_str().expect("utf8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));

    let zip = out_dir.path().join("tree.zip");
    ok(client(
        &agent,
        &[
            "extract",
            SNAPSHOT,
            EXT4,
            "raw",
            "/a",
            "--zip",
            zip.to_str().expect("utf8"),
        ],
    ));
    run(Command::new("unzip").arg("-tq").arg(&zip));

    // `-`: a tar on stdout.
    let out = ok(client(
        &agent,
        &["extract", SNAPSHOT, EXT4, "raw", "/a/b", "-"],
    ));
    let tar2 = out_dir.path().join("b.tar");
    fs::write(&tar2, &out.stdout).expect("write");
    let listing = run(Command::new("tar").arg("-tf").arg(&tar2));
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.trim_end_matches('/').ends_with("big.bin")),
        "{listing}"
    );
}

#[test]
fn exec_and_hybrid_connections() {
    let fx = fixture();
    let dir = tmp();
    let ticket = dir.path().join("ticket");
    fs::write(&ticket, format!("{TICKET}\n")).expect("ticket");
    fs::set_permissions(&ticket, fs::Permissions::from_mode(0o600)).expect("chmod");
    let exec = format!(
        "exec:{AGENT_BIN} --listen stdio --idle-timeout 0 --ticket-file '{}' --datastore '{}'",
        ticket.display(),
        fx.store.display()
    );
    let out = ok(client_at(
        &exec,
        &ticket,
        &["cat", SNAPSHOT, EXT4, "raw", "/a/b/big.bin"],
    ));
    assert_eq!(
        out.stdout,
        fs::read(fx.src.join("a/b/big.bin")).expect("read")
    );

    // hybrid: a fake VMM socket that speaks the CONNECT handshake and relays.
    let agent = start_agent();
    let vmm = fake_vmm(dir.path(), &agent.sock, None);
    let hybrid = format!("hybrid:{}:1234", vmm.display());
    let out = ok(client_at(
        &hybrid,
        &agent.ticket_path,
        &["--output", "json", "ping"],
    ));
    assert_eq!(json(&out), "pong");
    let out = ok(client_at(
        &hybrid,
        &agent.ticket_path,
        &["cat", SNAPSHOT, EXT4, "raw", "/a/b/big.bin"],
    ));
    assert_eq!(
        out.stdout,
        fs::read(fx.src.join("a/b/big.bin")).expect("read")
    );
    // The wrong port is refused by the fake: retried until the timeout, exit 2.
    let bad = format!("hybrid:{}:99", vmm.display());
    let out = client_at(
        &bad,
        &agent.ticket_path,
        &["--connect-timeout", "0.5", "ping"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERR unexpected"));
}

#[test]
fn bulk_reads_are_pipelined() {
    let fx = fixture();
    let agent = start_agent();
    let dir = tmp();
    // cat of a 9 MiB file: three 4 MiB fs.read calls, all sent at once.
    let (relay, most) = counting_relay(dir.path(), "cat.sock", &agent.sock, 3);
    let out = ok(client_at(
        &format!("unix:{}", relay.display()),
        &agent.ticket_path,
        &["cat", SNAPSHOT, EXT4, "raw", "/a/b/big.bin"],
    ));
    assert_eq!(
        out.stdout,
        fs::read(fx.src.join("a/b/big.bin")).expect("read")
    );
    assert_eq!(most.load(Ordering::SeqCst), 3, "fs.read calls in flight");
    // extract -o of a tree of more than 25 MiB: stream.read calls 4 deep.
    let (relay, most) = counting_relay(dir.path(), "extract.sock", &agent.sock, 4);
    let dest = dir.path().join("many");
    ok(client_at(
        &format!("unix:{}", relay.display()),
        &agent.ticket_path,
        &[
            "extract",
            SNAPSHOT,
            MANY,
            "raw",
            "/",
            "-o",
            dest.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(
        sha256(&dest.join("top1/sub1/big1.bin")),
        sha256(&fx.many_src.join("top1/sub1/big1.bin"))
    );
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "stream.read calls in flight"
    );
}

/// A relay between the client and the agent on Unix socket `name` in `dir`
/// that counts request lines sent and answer lines returned (the data that
/// follows a raw answer's line is not searched for lines), and keeps the most
/// requests that were waiting for their answers at once.
/// A relay between the client and the agent's socket that records the most
/// requests the client had waiting for an answer. The first bulk answer
/// (raw bytes after its line) is held back, for at most 2 s, until `expect`
/// requests are waiting: a client that pipelines has sent them all by then
/// however its threads are scheduled, and one that does not never gets there.
fn counting_relay(
    dir: &Path,
    name: &str,
    agent_sock: &Path,
    expect: usize,
) -> (PathBuf, Arc<AtomicUsize>) {
    let sock = dir.join(name);
    let listener = UnixListener::bind(&sock).expect("bind");
    let target = agent_sock.to_path_buf();
    let most = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&most);
    thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let agent = UnixStream::connect(&target).expect("connect to the agent");
        let asked = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (mut a_r, mut c_w) = (
            agent.try_clone().expect("clone"),
            conn.try_clone().expect("clone"),
        );
        let done = Arc::clone(&answered);
        let most_seen = Arc::clone(&seen);
        let down = thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut line = Vec::new();
            let mut raw_left = 0usize;
            while let Ok(n) = a_r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                // Counted before the client can see them (and ask again),
                // so that the count never runs ahead of the client.
                let mut at = 0;
                while at < n {
                    if raw_left > 0 {
                        let k = raw_left.min(n - at);
                        (at, raw_left) = (at + k, raw_left - k);
                        continue;
                    }
                    let Some(nl) = buf[at..n].iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(&buf[at..n]);
                        break;
                    };
                    line.extend_from_slice(&buf[at..at + nl]);
                    at += nl + 1;
                    raw_left = raw_length(&line);
                    line.clear();
                    let held = Instant::now();
                    while raw_left > 0
                        && most_seen.load(Ordering::SeqCst) < expect
                        && held.elapsed() < Duration::from_secs(2)
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                if c_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c_w.shutdown(std::net::Shutdown::Both);
        });
        let (mut c_r, mut a_w) = (conn, agent);
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = c_r.read(&mut buf) {
            if n == 0 {
                break;
            }
            for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                let waiting =
                    asked.fetch_add(1, Ordering::SeqCst) + 1 - answered.load(Ordering::SeqCst);
                seen.fetch_max(waiting, Ordering::SeqCst);
            }
            if a_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = a_w.shutdown(std::net::Shutdown::Both);
        let _ = down.join();
    });
    (sock, most)
}

/// The bytes that follow an answer line with `"encoding":"raw"`.
fn raw_length(line: &[u8]) -> usize {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return 0;
    };
    match (&v["result"]["encoding"], v["result"]["length"].as_u64()) {
        (Value::String(e), Some(n)) if e == "raw" => n as usize,
        _ => 0,
    }
}

/// A test-only stand-in for a Firecracker / vhost-device-vsock socket: accepts
/// on a Unix socket in `dir`, reads `CONNECT 1234\n`, answers `OK 1234\n` (any
/// other port gets `ERR unexpected`), then relays bytes to the agent's socket.
/// With `cut_after`, the agent-to-client direction is cut after that many
/// bytes (a connection lost mid-transfer).
fn fake_vmm(dir: &Path, agent_sock: &Path, cut_after: Option<u64>) -> PathBuf {
    let vmm = dir.join("vmm.sock");
    let listener = UnixListener::bind(&vmm).expect("bind");
    let target = agent_sock.to_path_buf();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let target = target.clone();
            thread::spawn(move || {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while conn.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                if line != b"CONNECT 1234" {
                    let _ = conn.write_all(b"ERR unexpected\n");
                    return;
                }
                let Ok(agent) = UnixStream::connect(&target) else {
                    return;
                };
                let _ = conn.write_all(b"OK 1234\n");
                let (a_r, mut c_w) = (
                    agent.try_clone().expect("clone"),
                    conn.try_clone().expect("clone"),
                );
                let down = thread::spawn(move || {
                    let _ = std::io::copy(&mut a_r.take(cut_after.unwrap_or(u64::MAX)), &mut c_w);
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                });
                let (mut c_r, mut a_w) = (conn, agent);
                let _ = std::io::copy(&mut c_r, &mut a_w);
                let _ = a_w.shutdown(std::net::Shutdown::Both);
                let _ = down.join();
            });
        }
    });
    vmm
}

#[test]
fn a_transfer_cut_short_leaves_no_partial_file() {
    let agent = start_agent();
    let dir = tmp();
    // Enough for authenticate and fs.stat, not for the first 4 MiB read.
    let vmm = fake_vmm(dir.path(), &agent.sock, Some(1 << 20));
    let connect = format!("hybrid:{}:1234", vmm.display());
    // `extract SNAPSHOT EXT4 raw ARGS...` through the cutting relay
    let extract = |args: &[&str]| {
        let mut all = vec!["extract", SNAPSHOT, EXT4, "raw"];
        all.extend_from_slice(args);
        client_at(&connect, &agent.ticket_path, &all)
    };
    let dest = dir.path().join("out");
    let out = extract(&["/a/b/big.bin", "-o", dest.to_str().expect("utf8")]);
    exits(&out, 2);
    assert!(dest.is_dir());
    assert!(!dest.join("big.bin").exists(), "partial file left behind");
    let tar = dir.path().join("cut.tar");
    let out = extract(&["/", "--tar", tar.to_str().expect("utf8")]);
    exits(&out, 2);
    assert!(!tar.exists(), "partial archive left behind");
    // what was there and is not a regular file (a FIFO here; /dev/null
    // was deleted so) is written to and left in place
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(fifo).expect("open the fifo");
            std::io::copy(&mut f, &mut std::io::sink()).expect("drain the fifo")
        })
    };
    let out = extract(&["/", "--force", "--tar", fifo.to_str().expect("utf8")]);
    exits(&out, 2);
    reader.join().expect("the reader");
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::symlink_metadata(&fifo).map(|m| m.file_type().is_fifo());
    assert!(matches!(kind, Ok(true)), "the fifo was removed: {kind:?}");
}

/// An agent at its connection limit answers a new connection with one
/// `-32003` line and closes it: the client says so (exit 2), instead of
/// "request ID=null is not a pending call" or "Broken pipe".
#[test]
fn a_full_agent_is_reported_as_refusing_the_connection() {
    let agent = Agent::builder()
        .arg("--datastore")
        .arg(fixture().store.to_string_lossy())
        .arg("--max-connections")
        .arg("1")
        .start();
    let mut held = agent.connect_authed();
    for output in ["text", "json"] {
        let out = client(&agent, &["--output", output, "status"]);
        let err = String::from_utf8_lossy(&out.stderr);
        let text = format!("{err}{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains("refused the connection") && text.contains("too many connections"),
            "{text}"
        );
    }
    held.call_ok("ping", None);
}

#[test]
fn error_paths_have_their_exit_codes() {
    let agent = start_agent();
    let dir = tmp();
    // Wrong ticket: exit 1 and a clear message.
    let wrong = dir.path().join("wrong");
    fs::write(&wrong, "not the ticket\n").expect("write");
    let out = client_at(&format!("unix:{}", agent.sock.display()), &wrong, &["ping"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    // No agent: exit 2.
    let none = format!("unix:{}", dir.path().join("none.sock").display());
    let out = client_at(&none, &agent.ticket_path, &["ping"]);
    assert_eq!(out.status.code(), Some(2));
    let out = client_at(&none, &agent.ticket_path, &["--output", "json", "ping"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["error"]["kind"], "connection");
    // Unknown path: exit 1 with code 1001, as text and as JSON.
    let out = client(&agent, &["stat", SNAPSHOT, EXT4, "raw", "/no/such/file"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1001"));
    let out = client(
        &agent,
        &["--output", "json", "cat", SNAPSHOT, EXT4, "raw", "/nope"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], 1001);
    // cat of a directory: the agent's 1003.
    let out = client(
        &agent,
        &["--output", "json", "cat", SNAPSHOT, EXT4, "raw", "/a"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], 1003);
    // Usage errors: exit 2.
    let out = client(&agent, &["extract", SNAPSHOT, EXT4, "raw", "/"]);
    assert_eq!(out.status.code(), Some(2));
    let into = dir.path().join("zstd-into-dir");
    let into = into.to_str().expect("utf-8 path");
    let out = client(
        &agent,
        &["extract", SNAPSHOT, EXT4, "raw", "/a", "-o", into, "--zstd"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--zstd applies to tar archives only"), "{err}");
    // A tar archive is not written to a terminal (`script` gives the
    // client one).
    let cmd = format!(
        "{CLIENT_BIN} --connect unix:{} --ticket-file {} extract {SNAPSHOT} {EXT4} raw /a -",
        agent.sock.display(),
        agent.ticket_path.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("refusing to write a tar archive to a terminal"),
        "{text}"
    );
    assert!(
        !text.contains("ustar"),
        "a tar archive went to the terminal"
    );
    let out = client(&agent, &["ls"]);
    assert_eq!(out.status.code(), Some(2));
    // ... with --output json, also as one JSON document on stdout
    for args in [&["--output", "json", "ls"][..], &["--output=json", "bogus"]] {
        let out = client(&agent, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = &json(&out)["error"];
        assert_eq!(err["kind"], "local", "{err}");
        assert!(!err["message"].as_str().unwrap_or("").is_empty(), "{err}");
    }
}

/// A file whose data ends before its size (a FAT chain shorter than the
/// directory entry says) is an error, never a download that ends early and
/// passes for the whole file.
#[test]
fn a_file_shorter_than_its_size_is_an_error() {
    let agent = start_agent();
    let dir = tmp();
    let short = "fat-short.img.fidx";
    let out = client(&agent, &["cat", SNAPSHOT, short, "raw", "/SHORT.BIN"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1004"), "{err}");
    assert!(
        err.contains("file data ends at 4096 of 1000000 bytes"),
        "{err}"
    );
    // extract of the file, and of the directory holding it (a stream)
    for path in ["/SHORT.BIN", "/"] {
        let to = dir
            .path()
            .join(path.trim_start_matches('/').replace('.', "-"));
        let out = client(
            &agent,
            &[
                "extract",
                SNAPSHOT,
                short,
                "raw",
                path,
                "-o",
                to.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path}: {err}");
        assert!(err.contains("file data ends at 4096"), "{path}: {err}");
        // no truncated file is left behind
        assert!(
            walk(&to).iter().all(|(_, m)| !m.is_file()),
            "{path}: {:?}",
            walk(&to)
        );
    }
}

#[test]
fn completions_and_manpage() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(Command::new(CLIENT_BIN)
            .args(["completions", shell])
            .output()
            .expect("run"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("restore-client"),
            "{shell}"
        );
    }
    let out = ok(Command::new(CLIENT_BIN)
        .arg("manpage")
        .output()
        .expect("run"));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH restore-client"));
    // every page the main page names is written by `manpage --dir` (into
    // a directory it makes), and documents its options
    let parent = tmp();
    let dir = parent.path().join("man/man1");
    ok(Command::new(CLIENT_BIN)
        .arg("manpage")
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("run"));
    let mut named = 0;
    for line in page.lines() {
        if let Some(name) = line.strip_suffix("(1)") {
            let file = format!("{}.1", name.replace("\\-", "-"));
            assert!(dir.join(&file).is_file(), "{file} not written");
            named += 1;
        }
    }
    assert!(named >= 10, "{named} subcommand pages named:\n{page}");
    let extract = fs::read_to_string(dir.join("restore-client-extract.1")).expect("read");
    assert!(extract.contains("\\-\\-force"), "{extract}");
}

/// The bash script completes a subcommand's options (`restore-client
/// extract --<TAB>`); clap_complete's own script completed nothing after
/// the subcommand for a binary named with a hyphen.
#[test]
fn bash_completes_the_options_of_a_subcommand() {
    let out = ok(Command::new(CLIENT_BIN)
        .args(["completions", "bash"])
        .output()
        .expect("run"));
    let dir = tmp();
    let script = dir.path().join("restore-client.bash");
    fs::write(&script, &out.stdout).expect("write");
    let complete = |words: &str| {
        let line = format!(
            "source {}; f=$(complete -p restore-client | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p'); \
             COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             $f restore-client \"${{COMP_WORDS[COMP_CWORD]}}\" \
             \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
            script.display()
        );
        let out = ok(Command::new("bash")
            .args(["-c", &line])
            .output()
            .expect("bash"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = complete("restore-client --o");
    assert!(top.contains("--output"), "{top}");
    let sub = complete("restore-client extract --");
    assert!(sub.contains("--force") && sub.contains("--tar"), "{sub}");
    let nested = complete("restore-client store i");
    assert!(
        nested.contains("init") && nested.contains("import-image"),
        "{nested}"
    );
}

/// Runs `cmd` with its stderr on a new pseudo-terminal (120 columns) and
/// returns its exit status and everything it wrote there.
fn with_stderr_on_a_terminal(cmd: &mut Command) -> (std::process::ExitStatus, Vec<u8>) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the given ints and reads `size`.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn");
    // Replacing it drops the command's copy of the slave end: the child's is
    // then the only one, and reading the master ends (EIO) when it exits.
    cmd.stderr(Stdio::null());
    let reader = thread::spawn(move || {
        let mut master = fs::File::from(master);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let status = child.wait().expect("wait");
    (status, reader.join().expect("reader"))
}

#[test]
fn progress_bars_show_on_a_terminal_only() {
    let agent = start_agent();
    let out_dir = tmp();
    let run = |args: &[&str]| {
        let (status, seen) = with_stderr_on_a_terminal(agent_command(&agent).args(args));
        assert!(
            status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        // Whatever else it wrote, the bar is cleared at the end.
        String::from_utf8_lossy(&seen).into_owned()
    };
    // One file: a bar with its total and an ETA.
    let file = out_dir.path().join("one");
    let shown = run(&[
        "extract",
        SNAPSHOT,
        EXT4,
        "raw",
        "/a/b/big.bin",
        "-o",
        file.to_str().expect("utf8"),
    ]);
    assert!(
        shown.contains("ETA") && shown.contains("9.01 MiB"),
        "{shown:?}"
    );
    // A tree: bytes and rate, no total.
    let tree = out_dir.path().join("tree");
    let shown = run(&[
        "extract",
        SNAPSHOT,
        EXT4,
        "raw",
        "/a",
        "-o",
        tree.to_str().expect("utf8"),
    ]);
    assert!(shown.contains("/s"), "{shown:?}");
    assert_eq!(
        sha256(&tree.join("b/big.bin")),
        sha256(&fixture().src.join("a/b/big.bin"))
    );
    // An import: a bar with its total and an ETA.
    let store_dir = common::shm_tempdir();
    let image = store_dir.path().join("disk.img");
    fs::write(&image, noise(6 << 20, 9)).expect("write image");
    let store = store_dir.path().join("store");
    ok(Command::new(CLIENT_BIN)
        .args(["store", "init"])
        .arg(&store)
        .output()
        .expect("run"));
    let mut import = Command::new(CLIENT_BIN);
    import
        .args(["store", "import-image", "--store"])
        .arg(&store)
        .args([
            "--snapshot",
            "host/t/2026-01-01T00:00:00Z",
            "--archive",
            "disk.img",
        ])
        .arg(&image);
    let (status, seen) = with_stderr_on_a_terminal(&mut import);
    let shown = String::from_utf8_lossy(&seen);
    assert!(status.success(), "{shown}");
    assert!(
        shown.contains("ETA") && shown.contains("6.00 MiB"),
        "{shown:?}"
    );
    // Not a terminal: nothing on stderr.
    let again = out_dir.path().join("again");
    let out = ok(client(
        &agent,
        &[
            "extract",
            SNAPSHOT,
            EXT4,
            "raw",
            "/a/b/big.bin",
            "-o",
            again.to_str().expect("utf8"),
        ],
    ));
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Unix-socket relay to the agent that passes on the first `pass` bytes
/// of the agent's answers and holds back the rest until the client goes.
fn stalling_relay(dir: &Path, agent_sock: &Path, pass: u64) -> PathBuf {
    relay(dir, agent_sock, pass, false)
}

/// A relay that passes on `pass` bytes of the agent's answers, then closes
/// the connection (as an agent that dies does), or with `!cut` holds the
/// rest back until the client goes.
fn relay(dir: &Path, agent_sock: &Path, pass: u64, cut: bool) -> PathBuf {
    let path = dir.join(if cut { "cut.sock" } else { "stall.sock" });
    let listener = UnixListener::bind(&path).expect("bind");
    let target = agent_sock.to_path_buf();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let Ok(agent) = UnixStream::connect(&target) else {
                return;
            };
            let (gone_tx, gone_rx) = std::sync::mpsc::channel::<()>();
            let (a_r, mut c_w) = (
                agent.try_clone().expect("clone"),
                conn.try_clone().expect("clone"),
            );
            thread::spawn(move || {
                let _ = std::io::copy(&mut (&a_r).take(pass), &mut c_w);
                if cut {
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                    let _ = a_r.shutdown(std::net::Shutdown::Both);
                }
                // Holds the connection open: ends when the client's side
                // closed (the sender below is dropped).
                let _ = gone_rx.recv();
            });
            let (mut c_r, mut a_w) = (conn, agent);
            thread::spawn(move || {
                let _ = std::io::copy(&mut c_r, &mut a_w);
                let _ = a_w.shutdown(std::net::Shutdown::Both);
                drop(gone_tx);
            });
        }
    });
    path
}

/// An agent that goes away in the middle of an answer's data is a lost
/// connection (exit 2, kind `connection`), not bad data from the agent.
#[test]
fn an_agent_gone_in_the_middle_of_the_data_is_a_lost_connection() {
    let agent = start_agent();
    let dir = tmp();
    let cut = relay(dir.path(), &agent.sock, 3 << 20, true);
    let out = client_at(
        &format!("unix:{}", cut.display()),
        &agent.ticket_path,
        &[
            "--output",
            "json",
            "cat",
            SNAPSHOT,
            EXT4,
            "raw",
            "/a/b/big.bin",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = &json(&out)["error"];
    // "went away in the middle of the answer", or, when the end of the
    // stream reaches the client before that answer does, "the agent
    // closed the connection": never "bad data"
    assert_eq!(err["kind"], "connection", "{err}");
    let message = err["message"].as_str().unwrap_or("");
    assert!(!message.contains("bad data"), "{err}");
}

#[test]
fn ctrl_c_during_extract_removes_the_partial_file() {
    interrupted_extract_removes_the_partial_file(libc::SIGINT, 130, "interrupted");
}

#[test]
fn sigterm_during_extract_removes_the_partial_file() {
    interrupted_extract_removes_the_partial_file(libc::SIGTERM, 143, "terminated");
}

fn interrupted_extract_removes_the_partial_file(signal: i32, status: i32, says: &str) {
    let agent = start_agent();
    let dir = tmp();
    // authenticate and fs.stat get through, no 4 MiB read does: the client
    // has created the file and waits for its data. (Letting a read through
    // would not make data certain: pipelined answers may come in any
    // order, and the file is written in order.)
    let relay = stalling_relay(dir.path(), &agent.sock, 1 << 20);
    let dest = dir.path().join("out");
    let mut child = client_command(&format!("unix:{}", relay.display()), &agent.ticket_path)
        .args(["extract", SNAPSHOT, EXT4, "raw", "/a/b/big.bin", "-o"])
        .arg(&dest)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let file = dest.join("big.bin");
    let under_way = common::wait_until(std::time::Duration::from_secs(30), || {
        file.exists() || child.try_wait().ok().flatten().is_some()
    });
    assert!(under_way, "the file was not created within 30 s");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the client ended before it was interrupted"
    );
    // SAFETY: kill with the pid of a child this test started and has not
    // reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{err}");
    assert!(err.contains(says), "{err}");
    assert!(!file.exists(), "partial file left behind");
    assert!(dest.is_dir());
}

/// `--force` replaces a file only once the new one is complete: Ctrl-C in
/// the middle of the transfer leaves the old file (and no temporary one).
/// The old file used to be deleted first, and the partial new one removed
/// on the interruption, so nothing was left.
#[test]
fn ctrl_c_during_a_forced_extract_keeps_the_old_file() {
    let agent = start_agent();
    for archive in [false, true] {
        let dir = tmp();
        let relay = stalling_relay(dir.path(), &agent.sock, 1 << 20);
        let dest = dir.path().join("out");
        fs::create_dir(&dest).expect("mkdir");
        let (old, target): (PathBuf, Vec<std::ffi::OsString>) = if archive {
            let old = dest.join("big.tar");
            (old.clone(), vec!["--tar".into(), old.into()])
        } else {
            (dest.join("big.bin"), vec!["-o".into(), dest.clone().into()])
        };
        fs::write(&old, b"ORIGINAL").expect("write");
        let mut child = client_command(&format!("unix:{}", relay.display()), &agent.ticket_path)
            .args(["extract", "--force", SNAPSHOT, EXT4, "raw", "/a/b/big.bin"])
            .args(&target)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let temps = || {
            fs::read_dir(&dest)
                .expect("read_dir")
                .filter(|e| {
                    let name = e.as_ref().expect("entry").file_name();
                    name.to_string_lossy().starts_with(".restore-client.")
                })
                .count()
        };
        let original = || fs::read(&old).ok().as_deref() == Some(&b"ORIGINAL"[..]);
        let under_way = common::wait_until(std::time::Duration::from_secs(30), || {
            temps() > 0 || !original() || child.try_wait().ok().flatten().is_some()
        });
        assert!(under_way, "no new file was started within 30 s");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the client ended"
        );
        // SAFETY: kill with the pid of a child this test started and has
        // not reaped yet.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert!(original(), "the old file is gone or changed");
        assert_eq!(temps(), 0, "a temporary file was left behind");
    }
}

/// RESTORE_AGENT_CONNECT stands in for --connect, and --vm wins over it
/// (README's session exports it; --vm then said "give either --vm or
/// --connect, not both").
#[test]
fn the_address_from_the_environment_yields_to_vm() {
    let agent = start_agent();
    let run_dir = tmp();
    let run = |args: &[&str]| {
        Command::new(CLIENT_BIN)
            .args(args)
            .env(
                "RESTORE_AGENT_CONNECT",
                format!("unix:{}", agent.sock.display()),
            )
            .env("RESTORE_AGENT_RUN_DIR", run_dir.path())
            .env_remove("RESTORE_AGENT_TICKET")
            .stdin(Stdio::null())
            .output()
            .expect("run")
    };
    let ticket = agent.ticket_path.to_str().expect("utf-8 path");
    let out = run(&["--ticket-file", ticket, "ping"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--vm", "nosuchvm", "ping"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nosuchvm") && !err.contains("not both"),
        "{err}"
    );
    let out = run(&["--vm", "nosuchvm", "--connect", "unix:/nowhere", "ping"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn ticket_from_the_environment_and_a_tcp_connection() {
    let port = common::free_tcp_port();
    let mut agent = common::Agent::builder()
        .arg("--datastore")
        .arg(fixture().store.to_string_lossy())
        .arg("--listen")
        .arg(format!("tcp:127.0.0.1:{port}"))
        .start();
    agent.wait_for_log(
        &format!("listening on tcp:127.0.0.1:{port}"),
        std::time::Duration::from_secs(20),
    );
    let ticket = fs::read_to_string(&agent.ticket_path).expect("ticket");
    let run = |env_ticket: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(CLIENT_BIN);
        cmd.arg("--connect")
            .arg(format!("tcp:127.0.0.1:{port}"))
            .args(args)
            .env_remove("RESTORE_AGENT_TICKET")
            .stdin(Stdio::null());
        if let Some(t) = env_ticket {
            cmd.env("RESTORE_AGENT_TICKET", t);
        }
        cmd.output().expect("run")
    };
    // The ticket from the environment; options after the subcommand.
    let out = ok(run(
        Some(ticket.trim_end()),
        &[
            "cat",
            SNAPSHOT,
            EXT4,
            "raw",
            "/small.txt",
            "--output",
            "json",
        ],
    ));
    assert_eq!(
        out.stdout,
        fs::read(fixture().src.join("small.txt")).expect("read")
    );
    // A wrong one is the agent's refusal: exit 1.
    let out = run(Some("not the ticket"), &["ping"]);
    exits(&out, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // None at all: a usage error that says where a ticket comes from.
    let out = run(None, &["ping"]);
    exits(&out, 2);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RESTORE_AGENT_TICKET"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let agent = start_agent();
    let connect = format!("unix:{}", agent.sock.display());
    let ticket = agent.ticket_path.to_str().expect("utf8");
    let remote = |args: &[&'static str]| {
        let mut v = vec!["--connect", connect.as_str(), "--ticket-file", ticket];
        v.extend_from_slice(args);
        v
    };
    for args in [
        remote(&["ls", "-R", SNAPSHOT, EXT4, "raw", "/"]),
        remote(&["--output", "json", "snapshots"]),
        remote(&["cat", SNAPSHOT, EXT4, "raw", "/a/b/big.bin"]),
        remote(&["extract", SNAPSHOT, EXT4, "raw", "/a", "-"]),
        vec!["completions", "bash"],
        vec!["manpage"],
    ] {
        // `restore-client ... | head` once head has gone: every write to
        // stdout fails with EPIPE.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(CLIENT_BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A command that failed keeps its exit status.
    let run_dir = tmp();
    for (args, status, says) in [
        (
            remote(&["--output", "json", "cat", SNAPSHOT, EXT4, "raw", "/nope"]),
            1,
            Some("1001"),
        ),
        // (vm reports its failure in the JSON on stdout only)
        (
            vec!["--output", "json", "vm", "stop", "no-such-vm"],
            2,
            None,
        ),
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(CLIENT_BIN)
            .args(&args)
            .env("RESTORE_AGENT_RUN_DIR", run_dir.path())
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run");
        exits(&out, status);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(says.is_none_or(|s| err.contains(s)), "{args:?}: {err}");
    }
    // Any other write failure is an error.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = Command::new(CLIENT_BIN)
        .args(remote(&["cat", SNAPSHOT, EXT4, "raw", "/a/b/big.bin"]))
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    exits(&out, 2);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent serving `src` as an ext4 image of `mib` MiB (made in `dir` by
/// mkfs.ext4 -d), imported as snapshot `host/NAME/2026-01-01T00:00:00Z`,
/// archive `NAME.img.fidx`.
fn serve_image_of(dir: &Path, src: &Path, name: &str, mib: u64) -> Agent {
    let img = dir.join(format!("{name}.img"));
    fs::File::create(&img)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(src)
        .arg(&img)
        .status()
        .expect("mkfs.ext4");
    assert!(mkfs.success());
    let store = store_of(dir, &img, name);
    Agent::builder()
        .arg("--datastore")
        .arg(store.to_string_lossy())
        .start()
}

/// A datastore `dir/store` holding image `img` as snapshot
/// `host/NAME/2026-01-01T00:00:00Z`, archive `NAME.img.fidx`.
fn store_of(dir: &Path, img: &Path, name: &str) -> PathBuf {
    let store = dir.join("store");
    ok(Command::new(CLIENT_BIN)
        .args(["store", "init"])
        .arg(&store)
        .output()
        .expect("run"));
    ok(Command::new(CLIENT_BIN)
        .args(["store", "import-image", "--store"])
        .arg(&store)
        .arg("--snapshot")
        .arg(format!("host/{name}/2026-01-01T00:00:00Z"))
        .arg("--archive")
        .arg(format!("{name}.img"))
        .arg(img)
        .output()
        .expect("run"));
    store
}

#[test]
fn names_with_control_characters_are_escaped_for_people_and_exact_for_scripts() {
    // Their own small image: names a terminal would act on.
    let dir = common::shm_tempdir();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    let nasty = ["new\nline", "esc\u{1b}[2Jclear", "bell\u{7}"];
    for (i, name) in nasty.iter().enumerate() {
        fs::write(src.join("d").join(name), format!("{i}")).expect("write");
    }
    let agent = serve_image_of(dir.path(), &src, "w", 16);
    let snap = ["host/w/2026-01-01T00:00:00Z", "w.img.fidx", "raw"];
    let human = |args: &[&str], path: &str| {
        let mut v = args.to_vec();
        v.extend_from_slice(&snap);
        v.push(path);
        let out = ok(client(&agent, &v));
        String::from_utf8(out.stdout).expect("utf8")
    };
    for args in [&["ls"][..], &["ls", "-l"], &["ls", "-R"]] {
        let shown = human(args, "/d");
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{args:?}: {shown:?}"
        );
        for escaped in ["new\\nline", "esc\\x1b[2Jclear", "bell\\x07"] {
            assert!(shown.contains(escaped), "{args:?}: {shown:?}");
        }
    }
    let shown = human(&["stat"], "/d/esc\u{1b}[2Jclear");
    assert!(shown.contains("/d/esc\\x1b[2Jclear"), "{shown:?}");
    // `ls -R` of a tree with an empty directory (lost+found, the last):
    // its heading alone, with no blank lines after it.
    let shown = human(&["ls", "-R"], "/");
    assert!(shown.ends_with("\n\n/lost+found:\n"), "{shown:?}");
    // An error naming such a path escapes it on stderr too.
    let mut v = vec!["stat"];
    v.extend_from_slice(&snap);
    v.push("/d/gone\u{1b}[2J");
    let out = client(&agent, &v);
    exits(&out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gone\\x1b[2J") && !err.contains('\u{1b}'),
        "{err:?}"
    );
    // JSON and extract keep the exact names.
    let mut v = vec!["--output", "json", "ls"];
    v.extend_from_slice(&snap);
    v.push("/d");
    let listed = json(&ok(client(&agent, &v)));
    let mut names: Vec<&str> = listed["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    names.sort_unstable();
    let mut want = nasty.to_vec();
    want.sort_unstable();
    assert_eq!(names, want);
    let out_dir = dir.path().join("out");
    let mut v = vec!["extract"];
    v.extend_from_slice(&snap);
    v.extend_from_slice(&["/d", "-o", out_dir.to_str().expect("utf8")]);
    ok(client(&agent, &v));
    for (i, name) in nasty.iter().enumerate() {
        assert_eq!(
            fs::read_to_string(out_dir.join(name)).expect("restored"),
            format!("{i}")
        );
    }
}

#[test]
fn sparse_files_come_back_sparse() {
    let dir = common::shm_tempdir();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    // 1 MiB of data, a 40 MiB hole, 1 MiB of data, an 8 MiB hole at the end;
    // and a file of zeros that were written, not a hole.
    let sparse = src.join("d/disk.raw");
    {
        let f = fs::File::create(&sparse).expect("create");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&noise(1 << 20, 31), 0).expect("write");
        f.write_all_at(&noise(1 << 20, 32), 41 << 20)
            .expect("write");
        f.set_len(50 << 20).expect("set_len");
    }
    fs::write(src.join("d/zeros"), vec![0u8; 3 << 20]).expect("write");
    let agent = serve_image_of(dir.path(), &src, "s", 64);
    // `extract PATH ARGS...`
    let extract = |path: &str, args: &[&str]| {
        let head = [
            "extract",
            "host/s/2026-01-01T00:00:00Z",
            "s.img.fidx",
            "raw",
            path,
        ];
        ok(client(&agent, &[&head[..], args].concat()));
    };
    let to = |p: &Path| p.to_str().expect("utf8").to_string();
    // The tree (a tar stream) and the one file (fs.read) take different paths.
    let tree = dir.path().join("tree");
    extract("/d", &["-o", &to(&tree)]);
    let one = dir.path().join("one");
    extract("/d/disk.raw", &["-o", &to(&one)]);
    for got in [tree.join("disk.raw"), one.join("disk.raw")] {
        assert_eq!(sha256(&got), sha256(&sparse), "{}", got.display());
        let meta = fs::metadata(&got).expect("stat");
        assert_eq!(meta.len(), 50 << 20);
        // 2 MiB of data; the holes take no space.
        assert!(
            meta.blocks() * 512 < 3 << 20,
            "{}: {} bytes allocated",
            got.display(),
            meta.blocks() * 512
        );
    }
    let zeros = tree.join("zeros");
    assert_eq!(fs::read(&zeros).expect("read"), vec![0u8; 3 << 20]);

    // As a tar, a file with holes is a GNU sparse member: the archive holds
    // its data, not its 48 MiB of holes, and GNU tar restores it whole and
    // sparse (the tree above came the same way)
    let tar = dir.path().join("d.tar");
    extract("/d", &["--tar", &to(&tar)]);
    let size = fs::metadata(&tar).expect("stat").len();
    assert!(size < 6 << 20, "the tar takes {size} bytes");
    let untarred = dir.path().join("untarred");
    fs::create_dir(&untarred).expect("mkdir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&untarred));
    let got = untarred.join("d/disk.raw");
    assert_eq!(sha256(&got), sha256(&sparse));
    assert!(fs::metadata(&got).expect("stat").blocks() * 512 < 3 << 20);
    assert_eq!(
        fs::read(untarred.join("d/zeros")).expect("read"),
        vec![0u8; 3 << 20]
    );
}

#[test]
fn names_and_link_targets_that_are_not_utf8_round_trip() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = common::shm_tempdir();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("b")).expect("mkdir");
    let name = OsStr::from_bytes(b"caf\xe9");
    let target = OsStr::from_bytes(b"tgt\xfe\xff");
    fs::write(src.join("b").join(name), "latin1").expect("write");
    std::os::unix::fs::symlink(target, src.join("b/link")).expect("symlink");
    for d in [&b"d\xfe"[..], b"d\xff"] {
        let d = src.join(OsStr::from_bytes(d));
        fs::create_dir(&d).expect("mkdir");
        fs::write(d.join("f"), "f").expect("write");
    }
    let agent = serve_image_of(dir.path(), &src, "u", 16);
    let run = |args: &[&OsStr]| ok(agent_command(&agent).args(args).output().expect("run"));
    let snap = ["host/u/2026-01-01T00:00:00Z", "u.img.fidx", "raw"].map(OsStr::new);
    let with = |head: &[&str], path: &OsStr, tail: &[&OsStr]| {
        let mut v: Vec<&OsStr> = head.iter().map(OsStr::new).collect();
        v.extend_from_slice(&snap);
        v.push(path);
        v.extend_from_slice(tail);
        run(&v)
    };
    // People see the bytes that are not UTF-8 as \xNN.
    let shown = String::from_utf8(with(&["ls", "-l"], OsStr::new("/b"), &[]).stdout).expect("utf8");
    assert!(shown.contains("caf\\xe9"), "{shown}");
    assert!(shown.contains("link -> tgt\\xfe\\xff"), "{shown}");
    // Scripts get them exact, in base64.
    let listed = json(&with(&["--output", "json", "ls"], OsStr::new("/b"), &[]));
    let entries = listed["entries"].as_array().expect("entries");
    let link = entries
        .iter()
        .find(|e| e["name"] == "link")
        .expect("link entry");
    assert_eq!(link["target_b64"], "dGd0/v8=", "{link}");
    assert!(
        entries.iter().any(|e| e["name_b64"] == "Y2Fm6Q=="),
        "{listed}"
    );
    // ... and the paths of `ls -R` too: two directories whose names differ
    // only in bytes that are not UTF-8 (the lossy text is the same).
    let listed = json(&with(
        &["--output", "json", "ls", "-R"],
        OsStr::new("/"),
        &[],
    ));
    let mut fs_paths: Vec<Vec<u8>> = listed["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["name"] == "f")
        .map(|e| {
            let b64 = e["path_b64"]
                .as_str()
                .unwrap_or_else(|| panic!("no path_b64: {e}"));
            base64_simd::STANDARD.decode_to_vec(b64).expect("base64")
        })
        .collect();
    fs_paths.sort();
    assert_eq!(fs_paths, [b"/d\xfe/f".to_vec(), b"/d\xff/f".to_vec()]);
    // `stat` names the path it was given, as its text does.
    let mut path = b"/b/".to_vec();
    path.extend_from_slice(name.as_bytes());
    let stat = json(&with(
        &["--output", "json", "stat"],
        OsStr::from_bytes(&path),
        &[],
    ));
    assert_eq!(stat["path_b64"], "L2IvY2Fm6Q==", "{stat}");
    // Paths that are not UTF-8 can be given on the command line.
    let mut path = b"/b/".to_vec();
    path.extend_from_slice(name.as_bytes());
    assert_eq!(
        with(&["cat"], OsStr::from_bytes(&path), &[]).stdout,
        b"latin1"
    );
    // Extract keeps both exact, alone and in a tree.
    for (path, to) in [("/b/link", "one"), ("/b", "tree")] {
        let out = dir.path().join(to);
        with(
            &["extract"],
            OsStr::new(path),
            &[OsStr::new("-o"), out.as_os_str()],
        );
        let link = fs::read_link(out.join("link")).expect("readlink");
        assert_eq!(link.as_os_str(), target, "{path}");
    }
    let tree = dir.path().join("tree");
    assert_eq!(fs::read(tree.join(name)).expect("read"), b"latin1");
}

#[test]
fn extract_takes_the_name_the_path_resolves_to() {
    let agent = start_agent();
    let fx = fixture();
    let out = tmp();
    let extract = |archive: &str, path: &str, to: &str| -> PathBuf {
        let dest = out.path().join(to);
        ok(client(
            &agent,
            &[
                "extract",
                SNAPSHOT,
                archive,
                "raw",
                path,
                "-o",
                dest.to_str().expect("utf8"),
            ],
        ));
        dest
    };
    // `.` and `..` resolve as the agent resolves them.
    let here = extract(EXT4, "/a/b/c/.", "here");
    assert_eq!(
        sha256(&here.join("d/deep.txt")),
        sha256(&fx.src.join("a/b/c/d/deep.txt"))
    );
    let up = extract(EXT4, "/a/b/c/d/..", "up");
    assert!(up.join("d/deep.txt").is_file());
    let file = extract(EXT4, "/a/b/../b/big.bin", "file");
    assert_eq!(
        sha256(&file.join("big.bin")),
        sha256(&fx.src.join("a/b/big.bin"))
    );
    // FAT finds names in any case; the files keep their own.
    let docs = extract(FAT, "/docs/sub", "docs");
    assert_eq!(
        sha256(&docs.join("x.dat")),
        sha256(&fx.fat_src.join("DOCS/SUB/x.dat"))
    );
    let readme = extract(FAT, "/readme.txt", "readme");
    assert_eq!(
        fs::read(readme.join("README.TXT")).expect("read"),
        b"hello from FAT\n"
    );
}

#[test]
fn vm_start_refuses_a_guest_smaller_than_128_mib() {
    // Checked before anything is started: empty stand-ins for the kernel,
    // the initramfs and the disk are enough to reach the check.
    let dir = tmp();
    for f in ["vmlinux", "initramfs.cpio", "disk.img"] {
        fs::write(dir.path().join(f), b"").expect("write");
    }
    let run_dir = tmp();
    let image = format!("disk0={}", dir.path().join("disk.img").display());
    let start = |memory: &str| {
        Command::new(CLIENT_BIN)
            .args(["vm", "start", "--image", &image, "--memory", memory])
            .arg("--image-dir")
            .arg(dir.path())
            .env("RESTORE_AGENT_RUN_DIR", run_dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run")
    };
    let out = start("112");
    exits(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--memory must be at least 128 MiB"), "{err}");
    let list = Command::new(CLIENT_BIN)
        .args(["--output", "json", "vm", "list"])
        .env("RESTORE_AGENT_RUN_DIR", run_dir.path())
        .output()
        .expect("run");
    let vms: Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(vms, serde_json::json!([]), "nothing was started");
}

/// A tree deeper than PATH_MAX (20 directories of 250-byte names: a
/// 5,000-byte path) extracts whole, the modes of its directories set. The
/// modes were set by path at the end, which failed with "File name too
/// long" after every file was written, leaving every directory at 0700.
#[test]
fn a_tree_deeper_than_path_max_extracts_whole() {
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = common::shm_tempdir();
    let src = dir.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let open = |at: libc::c_int, name: &CString| {
        // SAFETY: a valid dir fd and NUL-terminated name; the fd returned
        // is owned by the caller.
        let fd = unsafe { libc::openat(at, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(fd >= 0, "openat: {}", std::io::Error::last_os_error());
        // SAFETY: just opened, owned nowhere else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let mut fd = fs::File::open(&src).expect("open").into();
    for i in 0..20 {
        let name = CString::new(format!("{i:02}{}", "d".repeat(248))).expect("name");
        // SAFETY: a valid dir fd and NUL-terminated name.
        let r = unsafe { libc::mkdirat(fd_of(&fd), name.as_ptr(), 0o750) };
        assert_eq!(r, 0, "mkdirat: {}", std::io::Error::last_os_error());
        fd = open(fd_of(&fd), &name);
    }
    let leaf = CString::new("leaf").expect("name");
    // SAFETY: a valid dir fd and NUL-terminated name.
    let file = unsafe {
        libc::openat(
            fd_of(&fd),
            leaf.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT,
            0o640,
        )
    };
    assert!(file >= 0, "create leaf");
    // SAFETY: just opened, owned nowhere else.
    let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(file) });
    std::io::Write::write_all(&mut file, b"deep").expect("write");
    drop((file, fd));
    let agent = serve_image_of(dir.path(), &src, "p", 16);
    let out = dir.path().join("out");
    ok(client(
        &agent,
        &[
            "extract",
            "host/p/2026-01-01T00:00:00Z",
            "p.img.fidx",
            "raw",
            "/",
            "-o",
            out.to_str().expect("utf8"),
        ],
    ));
    // `find` walks paths of any length
    let found = ok(Command::new("find")
        .arg(&out)
        .args(["-type", "d", "-name", "??dddd*", "-perm", "0750"])
        .output()
        .expect("find"));
    assert_eq!(String::from_utf8_lossy(&found.stdout).lines().count(), 20);
    let leaf = ok(Command::new("find")
        .arg(&out)
        .args(["-name", "leaf", "-size", "4c"])
        .output()
        .expect("find"));
    assert_eq!(String::from_utf8_lossy(&leaf.stdout).lines().count(), 1);
}

fn fd_of(fd: &std::os::fd::OwnedFd) -> libc::c_int {
    std::os::fd::AsRawFd::as_raw_fd(fd)
}

/// An ext4 image of `mib` MiB with 4 KiB blocks holding the tree `src`.
fn mkfs_ext4(src: &Path, img: &Path, mib: u64) {
    fs::File::create(img)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(src)
        .arg(img));
}

/// Writes `bytes` over image `img` at `offset`: damage.
fn overwrite(img: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new()
        .write(true)
        .open(img)
        .and_then(|f| f.write_all_at(bytes, offset))
        .expect("damage the image");
}

/// `restore-client extract attached disk0 raw / --tar DIR/x.tar`, then
/// GNU `tar ARGS DIR/x.tar -C DIR/untarred`; returns DIR/untarred.
fn through_gnu_tar(agent: &Agent, dir: &Path, tar_args: &[&str]) -> PathBuf {
    let tar = dir.join("x.tar");
    let dest = tar.to_str().expect("utf8");
    ok(client(
        agent,
        &["extract", "attached", "disk0", "raw", "/", "--tar", dest],
    ));
    let untarred = dir.join("untarred");
    fs::create_dir(&untarred).expect("mkdir");
    run(Command::new("tar")
        .args(tar_args)
        .arg(&tar)
        .arg("-C")
        .arg(&untarred));
    untarred
}

/// `restore-client --output json extract attached disk0 raw PATH EXTRA...
/// -o DEST`, which must succeed; its JSON answer.
fn extract_attached_json(agent: &Agent, path: &str, dest: &Path, extra: &[&str]) -> Value {
    let dest = dest.to_str().expect("utf8");
    let mut args = vec![
        "--output", "json", "extract", "attached", "disk0", "raw", path,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-o", dest]);
    json(&ok(client(agent, &args)))
}

/// `restore-client extract attached disk0 raw / -o out_dir`.
fn extract_attached(agent: &Agent, out_dir: &Path) -> Output {
    let dest = out_dir.to_str().expect("utf8");
    client(
        agent,
        &["extract", "attached", "disk0", "raw", "/", "-o", dest],
    )
}

/// Extended attributes (user ones, trusted and security ones such as a
/// file capability, ACLs with a directory's default one, a symlink's own)
/// come back with `extract -o`, of a tree and of one file, and go into a tar
/// that GNU tar restores them from; `--no-xattrs` leaves them out.
#[test]
fn extract_restores_extended_attributes() {
    let t = common::shm_tempdir();
    let src = t.path().join("src");
    let paths = trees::make_xattr_tree(&src);
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 16);
    let agent = Agent::builder().image("disk0", &img).start();
    let same_as_source = |root: &Path, what: &str| {
        for p in &paths {
            assert_eq!(
                trees::kernel_xattrs(&root.join(&p[1..])),
                trees::kernel_xattrs(&src.join(&p[1..])),
                "{what}: {p}"
            );
        }
    };
    let all: usize = paths
        .iter()
        .map(|p| trees::kernel_xattrs(&src.join(&p[1..])).len())
        .sum();

    let out = t.path().join("tree");
    let done = extract_attached_json(&agent, "/", &out, &[]);
    assert_eq!(
        (done["xattrs"].as_u64(), done["xattrs_failed"].as_u64()),
        (Some(all as u64), Some(0))
    );
    same_as_source(&out, "extract -o");
    // the default ACL was set after the directory's files were made: they
    // have only their own ACLs, not ones inherited from it
    assert!(trees::kernel_xattrs(&out.join("d/sub/cap"))
        .iter()
        .all(|(n, _)| !n.starts_with(b"system.posix_acl")));

    let shown = ok(client(
        &agent,
        &["stat", "-x", "attached", "disk0", "raw", "/f"],
    ));
    let text = String::from_utf8_lossy(&shown.stdout);
    for line in [
        "xattr     user.binary=0x000102ff3d0a",
        "xattr     user.comment=\"hello\"",
        "xattr     user.empty=\"\"",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    let one = t.path().join("one");
    extract_attached_json(&agent, "/f", &one, &[]);
    assert_eq!(
        trees::kernel_xattrs(&one.join("f")),
        trees::kernel_xattrs(&src.join("f"))
    );

    let bare = t.path().join("bare");
    extract_attached_json(&agent, "/", &bare, &["--no-xattrs"]);
    for p in &paths {
        assert_eq!(trees::kernel_xattrs(&bare.join(&p[1..])), vec![], "{p}");
    }

    let untarred = through_gnu_tar(
        &agent,
        t.path(),
        &["--xattrs", "--xattrs-include=*", "--acls", "-xpf"],
    );
    same_as_source(&untarred, "GNU tar -x");
}

/// Modification times come back to the nanosecond: of files, directories
/// and symlinks with `extract -o`, of one file, and through a `--tar` that
/// GNU tar extracts.
#[test]
fn extract_keeps_nanosecond_mtimes() {
    let t = common::shm_tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    fs::write(src.join("d/f"), "f").expect("write");
    std::os::unix::fs::symlink("d/f", src.join("l")).expect("symlink");
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 8);
    // mke2fs -d keeps whole seconds: the nanoseconds go in with debugfs
    let nanos = [("/d", 1u32), ("/d/f", 123_456_789), ("/l", 999_999_999)];
    for (p, ns) in nanos {
        run(Command::new("debugfs")
            .args(["-w", "-R", &format!("sif {p} mtime_extra {}", ns << 2)])
            .arg(&img));
    }
    let agent = Agent::builder().image("disk0", &img).start();
    let check = |root: &Path, what: &str| {
        for (p, ns) in nanos {
            let m = fs::symlink_metadata(root.join(&p[1..])).expect("stat");
            assert_eq!(m.mtime_nsec(), i64::from(ns), "{what}: {p}");
        }
    };
    let out = t.path().join("out");
    extract_attached_json(&agent, "/", &out, &[]);
    check(&out, "extract -o");
    let one = t.path().join("one");
    extract_attached_json(&agent, "/d/f", &one, &[]);
    let m = fs::metadata(one.join("f")).expect("stat");
    assert_eq!(m.mtime_nsec(), 123_456_789);
    let untarred = through_gnu_tar(&agent, t.path(), &["-xf"]);
    check(&untarred, "GNU tar -x");
}

/// As root, `extract -o` gives what it makes the owners of the backup
/// (numeric, as tar does for root), a setuid file keeping its bit and its
/// capability through the change of owner; `--no-same-owner` leaves them
/// to the user running it.
#[test]
fn extract_as_root_restores_owners() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: owners are restored as root only");
        return;
    }
    let t = common::shm_tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    fs::write(src.join("a"), "a").expect("write");
    fs::write(src.join("d/s"), "s").expect("write");
    std::os::unix::fs::symlink("a", src.join("l")).expect("symlink");
    run(Command::new("mkfifo").arg(src.join("p")));
    let owners = [
        ("a", 1000, 50),
        ("d", 1001, 51),
        ("d/s", 1002, 52),
        ("l", 1003, 53),
        ("p", 1004, 54),
    ];
    for (p, uid, gid) in owners {
        std::os::unix::fs::lchown(src.join(p), Some(uid), Some(gid)).expect("chown");
    }
    fs::set_permissions(src.join("d/s"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    let cap = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    trees::set_xattr(&src.join("d/s"), c"security.capability", &cap).expect("setcap");
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 8);
    let agent = Agent::builder().image("disk0", &img).start();

    let out = t.path().join("out");
    let done = extract_attached_json(&agent, "/", &out, &[]);
    assert_eq!(done["owners_failed"].as_u64(), Some(0));
    for (p, uid, gid) in owners {
        let m = fs::symlink_metadata(out.join(p)).expect("stat");
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{p}");
    }
    let s = fs::metadata(out.join("d/s")).expect("stat");
    assert_eq!(
        s.mode() & 0o7777,
        0o4755,
        "the setuid bit outlives the chown"
    );
    assert_eq!(
        trees::kernel_xattrs(&out.join("d/s")),
        vec![(b"security.capability".to_vec(), cap.to_vec())],
        "so does the capability"
    );
    let one = t.path().join("one");
    extract_attached_json(&agent, "/a", &one, &[]);
    let m = fs::metadata(one.join("a")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (1000, 50));

    let mine = t.path().join("mine");
    extract_attached_json(&agent, "/", &mine, &["--no-same-owner"]);
    for (p, _, _) in owners {
        let m = fs::symlink_metadata(mine.join(p)).expect("stat");
        assert_eq!((m.uid(), m.gid()), (0, 0), "{p}");
    }
}

/// `ls -R` of an ext4 volume with one damaged directory (its block
/// overwritten with noise): the rest of the tree is listed, the damaged
/// one is named on stderr (and under `errors` in JSON), and the exit
/// status is 1. One such directory made the whole listing fail, with
/// nothing printed.
#[test]
fn ls_r_lists_around_a_damaged_directory() {
    let t = tmp();
    let src = t.path().join("src");
    for (dir, files) in [("a", ["1", "2"]), ("b", ["3", "4"]), ("c", ["5", "6"])] {
        fs::create_dir_all(src.join(dir).join("sub")).expect("mkdir");
        for f in files {
            fs::write(src.join(dir).join(f), f).expect("write");
        }
    }
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 8);
    overwrite(&img, bmap(&img, "/b", 0) * 4096, &noise(4096, 7));
    // and the inode of /c/6: its checksum no longer matches (a byte of its
    // mtime flipped: set to a fixed value, it was already that one second
    // in 256)
    let at = inode_offset(&img, "/c/6", 4096) as u64 + 0x10;
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(&img).expect("open"), &mut byte, at)
        .expect("read the image");
    overwrite(&img, at, &[!byte[0]]);
    let agent = Agent::builder().image("disk0", &img).start();
    let out = client(&agent, &["ls", "-R", "attached", "disk0", "raw", "/"]);
    exits(&out, 1);
    let text = String::from_utf8_lossy(&out.stdout);
    for section in ["/a:\n1\n2\nsub", "/a/sub:", "/c:\n5\nsub", "/c/sub:"] {
        assert!(text.contains(section), "{section:?} missing from\n{text}");
    }
    assert!(!text.contains("/b:") && !text.contains("\n3\n"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot list /b: ") && err.contains("(code 1004)"),
        "{err}"
    );
    assert!(err.contains("cannot read /c/6: "), "{err}");

    let out = client(
        &agent,
        &[
            "--output", "json", "ls", "-R", "attached", "disk0", "raw", "/",
        ],
    );
    exits(&out, 1);
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let paths: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"/c/5") && paths.contains(&"/b"),
        "{paths:?}"
    );
    assert!(!paths.contains(&"/b/3"), "{paths:?}");
    assert_eq!(v["errors"][0]["path"], "/b", "{v}");
    assert_eq!(v["errors"][0]["code"], 1004, "{v}");
    assert_eq!(v["errors"][1]["path"], "/c/6", "{v}");
    assert!(!paths.contains(&"/c/6"), "{paths:?}");

    // extract: everything but the damaged directory's contents and the
    // damaged file (one bad inode made its whole directory unreadable)
    let out_dir = t.path().join("out");
    let out = extract_attached(&agent, &out_dir);
    exits(&out, 1);
    for name in ["a/1", "a/2", "c/5"] {
        assert_eq!(
            fs::read(out_dir.join(name)).expect(name),
            &name.as_bytes()[2..]
        );
    }
    assert!(!out_dir.join("c/6").exists());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/c/6") && err.contains("/b: "), "{err}");
}

/// A symlink whose target cannot be read (its block damaged) is named as
/// unreadable by `ls` and fails as a member of `extract`, which goes on
/// with the rest: it never comes out as a symlink to nowhere. It was
/// listed with an empty target, and `extract -o` stopped at it (exit 2,
/// trying to make a link to "") and lost every file after it.
#[test]
fn a_symlink_whose_target_cannot_be_read_is_not_made() {
    let t = tmp();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("a")).expect("mkdir");
    fs::write(src.join("a/1"), "1").expect("write");
    fs::write(src.join("b"), "b").expect("write");
    // a target of more than 60 bytes lives in a block of its own
    std::os::unix::fs::symlink("x".repeat(200), src.join("a/long")).expect("symlink");
    std::os::unix::fs::symlink("1", src.join("a/short")).expect("symlink");
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 8);
    overwrite(&img, bmap(&img, "/a/long", 0) * 4096, &[0; 4096]);
    let agent = Agent::builder().image("disk0", &img).start();

    let out = client(&agent, &["ls", "-l", "attached", "disk0", "raw", "/a"]);
    exits(&out, 1);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("short -> 1") && !text.contains("long"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read /a/long: "), "{err}");

    let out_dir = t.path().join("out");
    let out = extract_attached(&agent, &out_dir);
    exits(&out, 1);
    assert_eq!(fs::read(out_dir.join("a/1")).expect("a/1"), b"1");
    assert_eq!(fs::read(out_dir.join("b")).expect("b"), b"b");
    assert_eq!(
        fs::read_link(out_dir.join("a/short")).expect("a/short"),
        Path::new("1")
    );
    assert!(fs::symlink_metadata(out_dir.join("a/long")).is_err());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/a/long: "), "{err}");
}

/// Extracting a volume whose root directory cannot be read fails with the
/// agent's reason, for `-o` and `--tar` alike, and leaves no archive. The
/// agent named the root as a member to go on after (with an empty name),
/// the client asked to resume after it, and the user saw "-32602 Invalid
/// params (resume is not a token ...)" instead of why the root cannot be
/// read (first met on NTFS with 64 KiB clusters).
#[test]
fn a_tree_whose_root_cannot_be_read_says_why() {
    let t = tmp();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d/sub")).expect("mkdir");
    fs::write(src.join("d/sub/f"), "f").expect("write");
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 8);
    overwrite(&img, bmap(&img, "/", 0) * 4096, &noise(4096, 5));
    let agent = Agent::builder().image("disk0", &img).start();
    let tar = t.path().join("root.tar");
    let out_dir = t.path().join("out");
    for to in [
        ["--tar", tar.to_str().expect("utf8")],
        ["-o", out_dir.to_str().expect("utf8")],
    ] {
        let args = [&["extract", "attached", "disk0", "raw", "/"][..], &to].concat();
        let out = client(&agent, &args);
        exits(&out, 1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("1004") && err.contains("checksum"),
            "{to:?}: {err}"
        );
        assert!(!err.contains("-32602"), "{to:?}: {err}");
    }
    assert!(fs::metadata(&tar).is_err(), "a partial archive was left");
}

/// Extracting a tree goes on past what cannot be read from the backup, as
/// tar and cp go on past a file they cannot read: a chunk missing from
/// the datastore loses the file it holds, a damaged directory its
/// contents, and the rest comes back whole, with both named on stderr and
/// exit status 1. The first of them ended the extraction, and every file
/// after it in the walk was lost.
#[test]
fn extract_goes_on_past_what_cannot_be_read() {
    let t = tmp();
    let src = t.path().join("src");
    for dir in ["a", "b", "c"] {
        fs::create_dir_all(src.join(dir)).expect("mkdir");
    }
    let small = |name: &str| fs::write(src.join(name), name).expect("write");
    for name in ["a/1", "a/2", "b/3", "b/4", "c/5", "c/zz"] {
        small(name);
    }
    fs::write(src.join("c/big"), noise(12 << 20, 3)).expect("big");
    let img = t.path().join("tree.img");
    mkfs_ext4(&src, &img, 64);
    let bmap = |path: &str, n: u64| bmap(&img, path, n);
    // /b's directory block: noise
    overwrite(&img, bmap("/b", 0) * 4096, &noise(4096, 9));
    // a 4 MiB chunk that lies inside /c/big's data
    let first = bmap("/c/big", 0);
    let chunk = (first * 4096).div_ceil(4 << 20);
    let (from, to) = (chunk * 1024 - first, (chunk + 1) * 1024 - 1 - first);
    assert!(to < 3072, "the chunk lies inside the file");
    assert_eq!(
        (bmap("/c/big", from), bmap("/c/big", to)),
        (first + from, first + to),
        "contiguous"
    );
    let store = store_of(t.path(), &img, "t");
    let index = fs::read(store.join("host/t/2026-01-01T00:00:00Z/t.img.fidx")).expect("index");
    let at = 4096 + chunk as usize * 32;
    let digest: String = index[at..at + 32]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fs::remove_file(store.join(".chunks").join(&digest[..4]).join(&digest))
        .expect("remove the chunk");

    let agent = Agent::builder().datastore(&store).start();
    let out_dir = t.path().join("out");
    let dest = out_dir.to_str().expect("utf8");
    let args = [
        "extract",
        "host/t/2026-01-01T00:00:00Z",
        "t.img.fidx",
        "raw",
        "/",
    ];
    let out = client(&agent, &[&args[..], &["-o", dest]].concat());
    exits(&out, 1);
    for name in ["a/1", "a/2", "c/5", "c/zz"] {
        assert_eq!(
            fs::read(out_dir.join(name)).expect(name),
            name.as_bytes(),
            "{name}"
        );
    }
    assert!(out_dir.join("b").is_dir(), "the damaged directory itself");
    assert_eq!(fs::read_dir(out_dir.join("b")).expect("b").count(), 0);
    assert!(
        !out_dir.join("c/big").exists(),
        "the unreadable file is not left"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/b: ") && err.contains("(code 1004)"), "{err}");
    assert!(
        err.contains("/c/big: chunk ") && err.contains("missing (code 1001)"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 could not be read"), "{text}");

    // the same as JSON, into a fresh directory
    let again = t.path().join("again");
    let out = client(
        &agent,
        &[
            &["--output", "json"],
            &args[..],
            &["-o", again.to_str().expect("utf8")],
        ]
        .concat(),
    );
    exits(&out, 1);
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["failed_count"], 2, "{v}");
    assert_eq!(v["files"], 4, "{v}");
    let codes: Vec<&Value> = v["failed"]
        .as_array()
        .expect("failed")
        .iter()
        .map(|f| &f["code"])
        .collect();
    assert_eq!(codes, [1004, 1001], "{v}");

    // --tar: the archive is cut back to before each member that failed and
    // goes on with the ones after it; it is whole, without them
    let tar = t.path().join("tree.tar");
    let out = client(
        &agent,
        &[&args[..], &["--tar", tar.to_str().expect("utf8")]].concat(),
    );
    exits(&out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/c/big: chunk "), "{err}");
    let from_tar = t.path().join("from-tar");
    fs::create_dir(&from_tar).expect("mkdir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&from_tar));
    let mut names: Vec<String> = walk(&from_tar).into_iter().map(|(p, _)| p).collect();
    names.retain(|n| !n.starts_with("lost+found"));
    assert_eq!(names, ["a", "a/1", "a/2", "b", "c", "c/5", "c/zz"]);
    for name in ["a/1", "c/zz"] {
        assert_eq!(fs::read(from_tar.join(name)).expect(name), name.as_bytes());
    }
}

/// A snapshot's blob archive (a VM's configuration, as Proxmox VE stores
/// it beside the disks) is written to stdout whole by `blob`, also with
/// `--output json` (the data is all of stdout, as with `cat`). A blob
/// whose bytes no longer match the manifest is refused (1004), and so is
/// an image archive (1005); the agent serves on.
#[test]
fn blob_writes_a_vms_configuration() {
    use restore_agent::store::datastore::SnapshotPath;
    use restore_agent::store::manifest::{FileEntry, Manifest, MANIFEST_BLOB_NAME};
    use restore_agent::store::{blob, digest_hex, sha256};
    let t = tmp();
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("f"), "f").expect("write");
    let img = t.path().join("disk.img");
    mkfs_ext4(&src, &img, 8);
    let store = t.path().join("store");
    run(Command::new(CLIENT_BIN).args(["store", "init"]).arg(&store));
    run(Command::new(CLIENT_BIN)
        .args(["store", "import-image", "--store"])
        .arg(&store)
        .args(["--snapshot", SNAPSHOT, "--archive", "drive-scsi0.img"])
        .arg(&img));
    let conf = b"boot: order=scsi0\ncores: 2\nmemory: 2048\nname: web\n\
                 scsi0: local-lvm:vm-100-disk-0,size=8G\n"
        .repeat(50);
    let raw = blob::encode(&conf, true);
    let dir = store.join(SnapshotPath::parse(SNAPSHOT).expect("name").rel_path());
    let path = dir.join("qemu-server.conf.blob");
    fs::write(&path, &raw).expect("blob");
    let manifest = dir.join(MANIFEST_BLOB_NAME);
    let mut m = Manifest::load(&manifest).expect("manifest");
    m.set_file(FileEntry {
        filename: "qemu-server.conf.blob".into(),
        crypt_mode: "none".into(),
        size: raw.len() as u64,
        csum: digest_hex(&sha256(&raw)),
    });
    m.store(&manifest).expect("store manifest");
    let agent = Agent::builder().datastore(&store).start();

    let out = client(&agent, &["archives", SNAPSHOT]);
    exits(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("qemu-server.conf.blob  blob"), "{text}");
    for json in [false, true] {
        let mut args = vec!["blob", SNAPSHOT, "qemu-server.conf.blob"];
        if json {
            args.splice(0..0, ["--output", "json"]);
        }
        let out = client(&agent, &args);
        exits(&out, 0);
        assert!(
            out.stdout == conf,
            "json {json}: {} bytes",
            out.stdout.len()
        );
    }

    let out = client(&agent, &["blob", SNAPSHOT, "drive-scsi0.img.fidx"]);
    exits(&out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1005") && err.contains("not a blob"), "{err}");

    // one byte of the compressed data changed: the file's SHA-256 no
    // longer matches the manifest's
    let mut bad = raw.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    fs::write(&path, &bad).expect("damage");
    let out = client(&agent, &["blob", SNAPSHOT, "qemu-server.conf.blob"]);
    exits(&out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1004") && err.contains("checksum"), "{err}");
    assert!(out.stdout.is_empty());
    exits(&client(&agent, &["ping"]), 0);
}

/// Device nodes keep their numbers: ext4's in both of the kernel's forms
/// (8-bit major and minor, and the 32-bit one with a minor past 255), and
/// XFS's (18-bit minor), are listed (`ls -l`, JSON `rdev`) and written into
/// tars, which `tar` reads back. They were all 0, 0.
#[test]
fn device_numbers_are_listed_and_archived() {
    let dir = tmp();
    let ext = dir.path().join("ext.img");
    fs::File::create(&ext)
        .and_then(|f| f.set_len(32 << 20))
        .expect("image");
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&ext));
    // debugfs takes minors up to 255: the large one is set in i_block[1]
    // directly, as Linux's new_encode_dev lays it out
    let (major, minor) = (259u32, 300_000u32);
    let encoded = (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12);
    let script = format!(
        "mknod null c 1 3\nmknod tty c 300 5\nmknod disk b 259 0\n\
         sif disk block[1] {encoded:#x}\n"
    );
    let mut debugfs = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(&ext)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("debugfs");
    debugfs
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(debugfs.wait().expect("debugfs").success());

    let xfs = dir.path().join("xfs.img");
    fs::File::create(&xfs)
        .and_then(|f| f.set_len(320 << 20))
        .expect("image");
    let proto = dir.path().join("proto");
    fs::write(
        &proto,
        "/dev/null\n0 0\nd--755 0 0\nnull c--666 0 0 1 3\ntty c--620 0 5 300 5\n\
         disk b--660 0 6 259 200000\n$\n",
    )
    .expect("proto");
    run(Command::new("mkfs.xfs")
        .args(["-q", "-p"])
        .arg(&proto)
        .arg(&xfs));

    let agent = Agent::builder()
        .image("ext", &ext)
        .image("xfs", &xfs)
        .start();
    for (archive, disk) in [("ext", "259, 300000"), ("xfs", "259, 200000")] {
        let listed = json(&ok(client(
            &agent,
            &["--output", "json", "ls", "attached", archive, "raw", "/"],
        )));
        let rdev = |name: &str| {
            let entries = listed["entries"].as_array().expect("entries");
            let e = entries.iter().find(|e| e["name"] == name).expect(name);
            (e["rdev"]["major"].clone(), e["rdev"]["minor"].clone())
        };
        assert_eq!(rdev("null"), (1.into(), 3.into()), "{archive}");
        assert_eq!(rdev("tty"), (300.into(), 5.into()), "{archive}");
        let (major, minor) = disk.split_once(", ").expect("pair");
        let (major, minor): (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
        assert_eq!(rdev("disk"), (major.into(), minor.into()), "{archive}");

        let long = ok(client(
            &agent,
            &["ls", "-l", "attached", archive, "raw", "/"],
        ));
        let long = String::from_utf8_lossy(&long.stdout).into_owned();
        assert!(long.contains(&format!(" {disk} ")), "{long}");

        let tar = dir.path().join(format!("{archive}.tar"));
        let dest = tar.to_str().expect("utf8");
        ok(client(
            &agent,
            &["extract", "attached", archive, "raw", "/", "--tar", dest],
        ));
        let listing = ok(Command::new("tar")
            .arg("-tvf")
            .arg(&tar)
            .output()
            .expect("tar"));
        let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
        for (name, numbers) in [("null", "1,3"), ("tty", "300,5")] {
            let line = listing.lines().find(|l| l.ends_with(name)).expect(name);
            assert!(line.contains(numbers), "{line}");
        }
        let line = listing.lines().find(|l| l.ends_with("disk")).expect("disk");
        assert!(line.contains(&disk.replace(", ", ",")), "{line}");
    }
}
