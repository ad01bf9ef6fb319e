//! Archive writers checked by the real tools: trees built in temp dirs are
//! written as tar / zip (optionally zstd) from a producer thread through the
//! bounded byte stream, read by an async consumer in pieces, then listed,
//! tested and extracted by GNU tar, Info-ZIP unzip and zstd, and the
//! extracted trees compared with the source.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use restore_agent::restore::archive::{
    byte_stream, new_stream_writer, new_writer, ArchiveEntry, ArchiveWriter, EntryKind, Format,
    StreamReader,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- producer

/// Runs `fill` on a producer thread writing a `format` archive into a byte
/// stream of `capacity` bytes, ending the stream as the lead's glue would:
/// finish on success, fail with the error otherwise.
fn spawn_producer<F>(
    format: Format,
    zstd: bool,
    capacity: usize,
    fill: F,
) -> (JoinHandle<io::Result<()>>, StreamReader)
where
    F: FnOnce(&mut dyn ArchiveWriter) -> io::Result<()> + Send + 'static,
{
    let (writer, reader) = byte_stream(capacity);
    let closer = writer.closer();
    let handle = std::thread::spawn(move || {
        let result = new_stream_writer(format, zstd, writer).and_then(|mut archive| {
            fill(&mut *archive)?;
            archive.finish()
        });
        match &result {
            Ok(()) => closer.finish(),
            Err(e) => closer.fail(io::Error::new(e.kind(), e.to_string())),
        }
        result
    });
    (handle, reader)
}

/// Reads the whole stream in pieces of varying size, as a client pulling
/// `stream.read` would.
fn consume(mut reader: StreamReader) -> io::Result<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut out = Vec::new();
        let sizes = [1usize, 511, 4096, 65_536, 100_000, 1 << 20];
        for i in 0.. {
            let (data, eof) = reader.read(sizes[i % sizes.len()]).await?;
            out.extend_from_slice(&data);
            if eof {
                break;
            }
        }
        Ok(out)
    })
}

/// Writes the tree at `root` (under the member name `top`) as one archive
/// and returns its bytes.
fn archive_tree(root: &Path, top: &[u8], format: Format, zstd: bool) -> Vec<u8> {
    let root = root.to_path_buf();
    let top = top.to_vec();
    let (producer, reader) = spawn_producer(format, zstd, 64 * 1024, move |w| {
        walk(w, &root, &top, format.supports_hardlinks())
    });
    let bytes = consume(reader).expect("stream read");
    producer
        .join()
        .expect("producer panicked")
        .expect("producer");
    bytes
}

// ------------------------------------------- test-only directory adapter

/// Feeds the directory tree at `dir` to `w` with member names under
/// `prefix`, like the filesystem glue does: parents before children, names
/// sorted, symlinks not followed, second names of a file as hard links when
/// the format has them.
fn walk(w: &mut dyn ArchiveWriter, dir: &Path, prefix: &[u8], hardlinks: bool) -> io::Result<()> {
    let mut seen: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    walk_inner(w, dir, prefix, hardlinks, &mut seen)
}

fn walk_inner(
    w: &mut dyn ArchiveWriter,
    path: &Path,
    name: &[u8],
    hardlinks: bool,
    seen: &mut BTreeMap<(u64, u64), Vec<u8>>,
) -> io::Result<()> {
    let md = std::fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink {
            target: std::fs::read_link(path)?.as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_file() {
        let key = (md.dev(), md.ino());
        match seen.get(&key) {
            Some(first) if hardlinks => EntryKind::Hardlink {
                target: first.clone(),
            },
            _ => {
                if md.nlink() > 1 {
                    seen.entry(key).or_insert_with(|| name.to_vec());
                }
                EntryKind::File { size: md.len() }
            }
        }
    } else {
        EntryKind::Fifo
    };
    let entry = ArchiveEntry {
        path: name.to_vec(),
        kind: kind.clone(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        sparse: None,
        mtime_ns: 0,
        xattrs: Vec::new(),
    };
    if let EntryKind::File { .. } = kind {
        let mut f = std::fs::File::open(path)?;
        w.append(&entry, Some(&mut f))?;
    } else {
        w.append(&entry, None)?;
    }
    if ft.is_dir() {
        let mut children: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        children.sort();
        for child in children {
            let mut child_name = name.to_vec();
            child_name.push(b'/');
            child_name.extend_from_slice(child.as_bytes());
            walk_inner(w, &path.join(&child), &child_name, hardlinks, seen)?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------ the trees

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{cmd:?} failed or warned: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout
}

fn set_mtime(path: &Path, mtime: i64) {
    run(Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{mtime}"))
        .arg(path));
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
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

/// The test tree. `tar_only` adds what zip or unzip cannot carry: a name
/// that is not UTF-8 (unzip drops bytes of it) and mtimes before 1970 or
/// past 2038 (unzip then falls back to the DOS time, clamped to 1980..2107).
fn build_tree(root: &Path, tar_only: bool) {
    let d = |p: &str| root.join(p);
    std::fs::create_dir_all(d("sub/deeper/deepest")).unwrap();
    std::fs::create_dir(d("empty_dir")).unwrap();
    write_file(&d("empty"), b"", 0o644);
    write_file(&d("small.txt"), b"hello archive\n", 0o640);
    write_file(&d("sub/script.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write_file(&d("sub/secret"), b"s3cret", 0o600);
    write_file(
        &d("sub/deeper/deepest/big.bin"),
        &noise(3 << 20 | 12345, 7),
        0o644,
    );
    write_file(&d("sub/deeper/odd"), &noise(511, 3), 0o444);
    write_file(&d("sub/deeper/block"), &noise(512, 4), 0o644);
    // Hard links: one across directories.
    write_file(&d("hard_a"), b"linked content\n", 0o644);
    std::fs::hard_link(d("hard_a"), d("sub/hard_b")).unwrap();
    // Long and non-ASCII names.
    let long255 = "L".repeat(250) + ".long";
    write_file(&d(&long255), b"255-byte name\n", 0o644);
    let long_dir = "D".repeat(120);
    std::fs::create_dir(d(&long_dir)).unwrap();
    write_file(
        &d(&format!("{long_dir}/{}", "f".repeat(140))),
        b"long path\n",
        0o644,
    );
    write_file(
        &d("Grüße_日本語_файл.txt"),
        "non-ASCII name\n".as_bytes(),
        0o644,
    );
    let e254 = "é".repeat(127);
    write_file(&d(&e254), b"254 bytes of e-acute\n", 0o644);
    // Symlinks: relative, absolute, dangling, a loop, a long target.
    symlink("sub/script.sh", d("link_rel")).unwrap();
    symlink("/etc/hostname", d("link_abs")).unwrap();
    symlink("nowhere/at/all", d("link_dangling")).unwrap();
    symlink("Grüße_日本語_файл.txt", d("link_utf8")).unwrap();
    symlink("loop_b", d("loop_a")).unwrap();
    symlink("loop_a", d("loop_b")).unwrap();
    symlink(
        format!("../{}/{}", "t".repeat(100), "u".repeat(60)),
        d("sub/link_long"),
    )
    .unwrap();
    run(Command::new("mkfifo").arg(d("fifo")));
    if tar_only {
        let bad = root.join(OsStr::from_bytes(b"bad_\xff\xfe_name"));
        write_file(&bad, b"not UTF-8\n", 0o644);
    }
    // Owners other than the test's (needs root; as another user the ids
    // stay the user's own and the comparison still holds).
    for (p, id) in [
        ("sub/secret", 1234),
        ("sub", 2000),
        ("link_rel", 3000),
        ("empty", 70_000),
    ] {
        let _ = std::os::unix::fs::lchown(d(p), Some(id), Some(id + 1));
    }
    // Varied mtimes, including before 1970 and after 2242 (beyond ustar's
    // 11 octal digits); children first so directory times stay as set.
    let mut all = Vec::new();
    collect_paths(root, &mut all);
    all.reverse();
    for (i, p) in all.iter().enumerate() {
        let mtime = match i % 5 {
            0 => 1_600_000_000 + i as i64 * 1001,
            1 => 86_400 * 365 * 3,
            2 if tar_only => -86_400 * 400,
            3 if tar_only => 9_000_000_000,
            _ => 1_234_567_890,
        };
        set_mtime(p, mtime);
    }
}

fn collect_paths(p: &Path, out: &mut Vec<PathBuf>) {
    out.push(p.to_path_buf());
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        let mut children: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        children.sort();
        for c in children {
            collect_paths(&c, out);
        }
    }
}

// ----------------------------------------------------------- comparison

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(String),
    Symlink(Vec<u8>),
    Fifo,
}

#[derive(Debug, PartialEq, Eq)]
struct Meta {
    node: Node,
    mode: u32,
    mtime: i64,
    owner: Option<(u32, u32)>,
}

struct Manifest {
    entries: BTreeMap<Vec<u8>, Meta>,
    /// Groups of paths sharing one inode (hard links).
    links: Vec<Vec<Vec<u8>>>,
}

/// The tree under `root` (relative names); `mode_mask` selects which mode
/// bits to compare, `owners` whether to compare uid/gid, `link_times`
/// whether to compare the mtimes of symlinks (unzip never sets them).
fn manifest(root: &Path, mode_mask: u32, owners: bool, link_times: bool) -> Manifest {
    let mut all = Vec::new();
    collect_paths(root, &mut all);
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for p in all {
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let node = if ft.is_dir() {
            Node::Dir
        } else if ft.is_symlink() {
            Node::Symlink(
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_file() {
            inodes.entry(md.ino()).or_default().push(rel.clone());
            Node::File(hex(&Sha256::digest(std::fs::read(&p).unwrap())))
        } else {
            Node::Fifo
        };
        // Symlink modes are not kept by Linux; compare only their targets.
        let mode = if ft.is_symlink() {
            0
        } else {
            md.mode() & mode_mask
        };
        let mtime = if ft.is_symlink() && !link_times {
            0
        } else {
            md.mtime()
        };
        let owner = owners.then(|| (md.uid(), md.gid()));
        entries.insert(
            rel,
            Meta {
                node,
                mode,
                mtime,
                owner,
            },
        );
    }
    let links = inodes.into_values().filter(|g| g.len() > 1).collect();
    Manifest { entries, links }
}

fn assert_same_tree(src: &Manifest, got: &Manifest, compare_links: bool) {
    let names = |m: &Manifest| {
        m.entries
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(src), names(got), "member names differ");
    for (name, want) in &src.entries {
        let have = &got.entries[name];
        assert_eq!(want, have, "{}", String::from_utf8_lossy(name));
    }
    if compare_links {
        assert_eq!(src.links, got.links, "hard link groups differ");
        assert!(!src.links.is_empty());
    }
}

// ---------------------------------------------------------------- tests

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("archive-test")
        .disable_cleanup(std::env::var_os("ARCHIVE_TEST_KEEP").is_some())
        .tempdir()
        .unwrap()
}

#[test]
fn tar_round_trips_through_gnu_tar() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    build_tree(&src, true);
    set_mtime(&src, 1_500_000_000);

    let bytes = archive_tree(&src, b"top", Format::Tar, false);
    let tar = tmp.path().join("out.tar");
    std::fs::write(&tar, &bytes).unwrap();

    let listing = run(Command::new("tar")
        .arg("--quoting-style=literal")
        .arg("-tf")
        .arg(&tar));
    let listing: Vec<&[u8]> = listing
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(listing.first(), Some(&&b"top/"[..]));
    assert!(listing.contains(&&b"top/bad_\xff\xfe_name"[..]));
    assert!(listing.iter().all(|l| l.starts_with(b"top")));

    let out = tmp.path().join("x");
    std::fs::create_dir(&out).unwrap();
    // GNU tar warns (exit 1?) on nothing here: any warning fails `run`.
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&tar)
        .arg("--numeric-owner")
        .arg("--warning=no-timestamp")
        .arg("-C")
        .arg(&out));
    let want = manifest(&src, 0o7777, true, true);
    let got = manifest(&out.join("top"), 0o7777, true, true);
    assert_same_tree(&want, &got, true);
}

#[test]
fn tar_zstd_round_trips_through_zstd_and_tar() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    build_tree(&src, true);

    let bytes = archive_tree(&src, b"top", Format::Tar, true);
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    let zst = tmp.path().join("out.tar.zst");
    std::fs::write(&zst, &bytes).unwrap();
    let out = tmp.path().join("x");
    std::fs::create_dir(&out).unwrap();
    run(Command::new("bash").arg("-c").arg(format!(
        "set -e -o pipefail; zstd -q -d -c '{}' | tar -xpf - --numeric-owner --warning=no-timestamp -C '{}'",
        zst.display(),
        out.display()
    )));
    let want = manifest(&src, 0o7777, true, true);
    let got = manifest(&out.join("top"), 0o7777, true, true);
    assert_same_tree(&want, &got, true);
}

fn unzip_tree(zip: &Path, out: &Path) {
    let test = run(Command::new("unzip").arg("-t").arg(zip));
    let test = String::from_utf8_lossy(&test);
    assert!(test.contains("No errors detected"), "{test}");
    std::fs::create_dir(out).unwrap();
    // -X restores uid/gid from the Unix extra field.
    run(Command::new("unzip")
        .arg("-q")
        .arg("-X")
        .arg(zip)
        .arg("-d")
        .arg(out));
}

#[test]
fn zip_round_trips_through_unzip() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    build_tree(&src, false);
    set_mtime(&src, 1_500_000_000);

    let bytes = archive_tree(&src, b"top", Format::Zip, false);
    let zip = tmp.path().join("out.zip");
    std::fs::write(&zip, &bytes).unwrap();
    let out = tmp.path().join("x");
    unzip_tree(&zip, &out);
    // unzip keeps setuid/setgid/sticky only with -K; the tree has none.
    let mut want = manifest(&src, 0o7777, true, false);
    // unzip makes fifo members empty regular files.
    want.entries.get_mut(&b"fifo"[..]).unwrap().node = Node::File(hex(&Sha256::digest(b"")));
    let got = manifest(&out.join("top"), 0o7777, true, false);
    // Zip has no hard links: the second name is a copy.
    assert_same_tree(&want, &got, false);
    assert!(got.links.is_empty());
}

#[test]
fn zip_zstd_is_a_zstd_wrapped_zip() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    build_tree(&src, false);
    let bytes = archive_tree(&src, b"top", Format::Zip, true);
    let zst = tmp.path().join("out.zip.zst");
    std::fs::write(&zst, &bytes).unwrap();
    let zip = tmp.path().join("out.zip");
    run(Command::new("zstd")
        .arg("-q")
        .arg("-d")
        .arg(&zst)
        .arg("-o")
        .arg(&zip));
    let out = tmp.path().join("x");
    unzip_tree(&zip, &out);
    let mut want = manifest(&src, 0o7777, true, false);
    want.entries.get_mut(&b"fifo"[..]).unwrap().node = Node::File(hex(&Sha256::digest(b"")));
    assert_same_tree(
        &want,
        &manifest(&out.join("top"), 0o7777, true, false),
        false,
    );
}

/// A single file (not a directory) as the whole archive.
#[test]
fn one_file_archives() {
    let tmp = tempdir();
    let file = tmp.path().join("only.bin");
    write_file(&file, &noise(100_000, 9), 0o640);
    for (format, name) in [(Format::Tar, "a.tar"), (Format::Zip, "a.zip")] {
        let arc = tmp.path().join(name);
        std::fs::write(&arc, archive_tree(&file, b"only.bin", format, false)).unwrap();
        let out = tmp.path().join(format!("x-{name}"));
        std::fs::create_dir(&out).unwrap();
        match format {
            Format::Tar => run(Command::new("tar").arg("-xf").arg(&arc).arg("-C").arg(&out)),
            Format::Zip => run(Command::new("unzip")
                .arg("-q")
                .arg(&arc)
                .arg("-d")
                .arg(&out)),
        };
        assert_eq!(
            std::fs::read(out.join("only.bin")).unwrap(),
            std::fs::read(&file).unwrap()
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------- synthetic member lists

fn meta(path: &[u8], kind: EntryKind) -> ArchiveEntry {
    ArchiveEntry {
        path: path.to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        sparse: None,
        mtime_ns: 0,
        xattrs: Vec::new(),
    }
}

/// Yields `len` zero bytes without holding them.
struct Zeros(u64);

impl Read for Zeros {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(usize::try_from(self.0).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.0 -= n as u64;
        Ok(n)
    }
}

/// Writes to a file, turning 4 KiB-aligned blocks of zeros into holes, so
/// archives of many GiB of zeros cost no disk.
struct SparseFile {
    file: std::fs::File,
    pos: u64,
}

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        const ZERO: [u8; 4096] = [0; 4096];
        let n = if self.pos.is_multiple_of(4096) && buf.len() >= 4096 {
            let n = buf.len() / 4096 * 4096;
            if buf[..n].chunks(4096).all(|c| c == ZERO) {
                self.file.seek(SeekFrom::Current(n as i64))?;
                n
            } else {
                self.file.write(&buf[..n])?
            }
        } else {
            let to_boundary = (4096 - self.pos % 4096) as usize;
            self.file.write(&buf[..buf.len().min(to_boundary)])?
        };
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.set_len(self.pos)
    }
}

fn sparse_writer(path: &Path) -> Box<dyn Write + Send> {
    Box::new(SparseFile {
        file: std::fs::File::create(path).unwrap(),
        pos: 0,
    })
}

/// Prints the member names of a zip after checking every CRC.
const PY_ZIP_LIST: &str = "import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
bad = z.testzip()
assert bad is None, bad
print('\\n'.join(z.namelist()))";

/// Paths deeper than PATH_MAX (4096): 20 components of 250 bytes.
#[test]
fn deep_paths_over_4k_in_tar_and_zip() {
    let tmp = tempdir();
    let comp = |i: usize| format!("{i:02}{}", "d".repeat(248));
    let mut dirs = Vec::new();
    let mut path = String::from("deep");
    dirs.push(path.clone());
    for i in 0..20 {
        path = format!("{path}/{}", comp(i));
        dirs.push(path.clone());
    }
    let file = format!("{path}/leaf.txt");
    assert!(file.len() > 5000);
    let fill = {
        let (dirs, file) = (dirs.clone(), file.clone());
        move |w: &mut dyn ArchiveWriter| -> io::Result<()> {
            for d in &dirs {
                w.append(&meta(d.as_bytes(), EntryKind::Dir), None)?;
            }
            w.append(
                &meta(file.as_bytes(), EntryKind::File { size: 5 }),
                Some(&mut &b"leaf\n"[..]),
            )?;
            let link = format!("{}/link", dirs[1]);
            w.append(
                &meta(
                    link.as_bytes(),
                    EntryKind::Hardlink {
                        target: file.clone().into_bytes(),
                    },
                ),
                None,
            )
            .or_else(|e| {
                if e.kind() == io::ErrorKind::InvalidInput {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        }
    };

    // tar: GNU tar lists the names exactly.
    let (producer, reader) = spawn_producer(Format::Tar, false, 1 << 16, fill.clone());
    let bytes = consume(reader).unwrap();
    producer.join().unwrap().unwrap();
    let tar = tmp.path().join("deep.tar");
    std::fs::write(&tar, bytes).unwrap();
    let listing = String::from_utf8(run(Command::new("tar").arg("-tf").arg(&tar))).unwrap();
    let mut want: Vec<String> = dirs.iter().map(|d| format!("{d}/")).collect();
    want.push(file.clone());
    want.push(format!("{}/link", dirs[1]));
    assert_eq!(listing.lines().collect::<Vec<_>>(), want);
    // GNU tar cannot extract names longer than PATH_MAX itself; extracting
    // the member's data by name shows its header and data are intact.
    let data = run(Command::new("tar").arg("-xOf").arg(&tar).arg(&file));
    assert_eq!(data, b"leaf\n");

    // zip: Info-ZIP unzip truncates names past its 4 KiB limit, so
    // Python's zipfile lists and CRC-checks this one.
    let (producer, reader) = spawn_producer(Format::Zip, false, 1 << 16, fill);
    let bytes = consume(reader).unwrap();
    producer.join().unwrap().unwrap();
    let zip = tmp.path().join("deep.zip");
    std::fs::write(&zip, bytes).unwrap();
    let names = String::from_utf8(run(Command::new("python3")
        .arg("-c")
        .arg(PY_ZIP_LIST)
        .arg(&zip)))
    .unwrap();
    let mut want: Vec<String> = dirs.iter().map(|d| format!("{d}/")).collect();
    want.push(file);
    assert_eq!(names.lines().collect::<Vec<_>>(), want);
}

/// Device nodes, fifos, odd ids and times as GNU tar reports them.
#[test]
fn tar_devices_ids_and_times_as_listed_by_gnu_tar() {
    let tmp = tempdir();
    let (producer, reader) = spawn_producer(Format::Tar, false, 4096, |w| {
        let mut e = meta(b"dev/null", EntryKind::Char { major: 1, minor: 3 });
        e.mode = 0o666;
        w.append(&e, None)?;
        let mut e = meta(
            b"dev/sda",
            EntryKind::Block {
                major: 8,
                minor: 1_048_575,
            },
        );
        e.mode = 0o660;
        e.gid = 6;
        w.append(&e, None)?;
        let mut e = meta(b"fifo", EntryKind::Fifo);
        e.uid = 4_000_000_000;
        e.gid = 3_000_000_000;
        e.mtime = -1_000_000_000;
        w.append(&e, None)?;
        let mut e = meta(b"sticky", EntryKind::Dir);
        e.mode = 0o1777;
        e.mtime = 20_000_000_000;
        w.append(&e, None)
    });
    let bytes = consume(reader).unwrap();
    producer.join().unwrap().unwrap();
    let tar = tmp.path().join("dev.tar");
    std::fs::write(&tar, bytes).unwrap();
    let listing = String::from_utf8(run(Command::new("tar")
        .env("TZ", "UTC")
        .arg("--numeric-owner")
        .arg("--full-time")
        .arg("-tvf")
        .arg(&tar)))
    .unwrap();
    let lines: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "crw-rw-rw-",
            "0/0",
            "1,3",
            "2023-11-14",
            "22:13:20",
            "dev/null"
        ]
    );
    assert_eq!(
        lines[1],
        [
            "brw-rw----",
            "0/6",
            "8,1048575",
            "2023-11-14",
            "22:13:20",
            "dev/sda"
        ]
    );
    assert_eq!(
        lines[2],
        [
            "prw-r--r--",
            "4000000000/3000000000",
            "0",
            "1938-04-24",
            "22:13:20",
            "fifo"
        ]
    );
    assert_eq!(
        lines[3],
        [
            "drwxrwxrwt",
            "0/0",
            "0",
            "2603-10-11",
            "11:33:20",
            "sticky/"
        ]
    );
    assert_eq!(lines.len(), 4);
}

/// Writes `fill` as a `format` archive straight into a sparse file (no
/// stream: these archives are many GiB of zeros).
fn archive_to_sparse_file(
    format: Format,
    path: &Path,
    fill: impl FnOnce(&mut dyn ArchiveWriter) -> io::Result<()>,
) {
    let mut w = new_writer(format, false, sparse_writer(path)).unwrap();
    fill(&mut *w).unwrap();
    w.finish().unwrap();
}

/// A member of 8 GiB and more needs a pax size; the member after it must
/// still be found at the right offset.
#[test]
fn tar_member_over_8_gib() {
    let tmp = tempdir();
    let tar = tmp.path().join("big.tar");
    let size = (8u64 << 30) + 4097;
    archive_to_sparse_file(Format::Tar, &tar, |w| {
        w.append(
            &meta(b"huge.bin", EntryKind::File { size }),
            Some(&mut Zeros(size)),
        )?;
        w.append(
            &meta(b"after.txt", EntryKind::File { size: 6 }),
            Some(&mut &b"after\n"[..]),
        )
    });
    let listing = String::from_utf8(run(Command::new("tar").arg("-tvf").arg(&tar))).unwrap();
    let lines: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][2], size.to_string());
    assert_eq!(lines[0][5], "huge.bin");
    assert_eq!(lines[1][5], "after.txt");
    let after = run(Command::new("tar").arg("-xOf").arg(&tar).arg("after.txt"));
    assert_eq!(after, b"after\n");
}

/// A member of 4 GiB and more, offsets past 4 GiB and the zip64 end records:
/// unzip lists them and tests the small members around the big one (a
/// full `unzip -t` takes half a minute here, so Python's zipfile checks the
/// CRC of the whole archive instead).
#[test]
fn zip64_member_over_4_gib() {
    let tmp = tempdir();
    let zip = tmp.path().join("big.zip");
    let size = (4u64 << 30) + 1;
    archive_to_sparse_file(Format::Zip, &zip, |w| {
        w.append(
            &meta(b"before.txt", EntryKind::File { size: 7 }),
            Some(&mut &b"before\n"[..]),
        )?;
        w.append(
            &meta(b"huge.bin", EntryKind::File { size }),
            Some(&mut Zeros(size)),
        )?;
        w.append(
            &meta(b"after.txt", EntryKind::File { size: 6 }),
            Some(&mut &b"after\n"[..]),
        )
    });
    let test = String::from_utf8(run(Command::new("unzip")
        .arg("-t")
        .arg(&zip)
        .arg("before.txt")
        .arg("after.txt")))
    .unwrap();
    assert!(test.contains("No errors detected"), "{test}");
    let names = String::from_utf8(run(Command::new("python3")
        .arg("-c")
        .arg(PY_ZIP_LIST)
        .arg(&zip)))
    .unwrap();
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["before.txt", "huge.bin", "after.txt"]
    );
    let listing = String::from_utf8(run(Command::new("unzip").arg("-l").arg(&zip))).unwrap();
    assert!(listing.contains(&format!("{size}")), "{listing}");
    let after = run(Command::new("unzip").arg("-p").arg(&zip).arg("after.txt"));
    assert_eq!(after, b"after\n");
}

/// More than 65535 members need the zip64 end records.
#[test]
fn zip64_more_than_65535_members() {
    let tmp = tempdir();
    let zip = tmp.path().join("many.zip");
    let count = 70_000u32;
    let (producer, reader) = spawn_producer(Format::Zip, false, 1 << 20, move |w| {
        w.append(&meta(b"d", EntryKind::Dir), None)?;
        for i in 1..count {
            let name = format!("d/{i:05}");
            let data = format!("{i}\n");
            w.append(
                &meta(
                    name.as_bytes(),
                    EntryKind::File {
                        size: data.len() as u64,
                    },
                ),
                Some(&mut data.as_bytes()),
            )?;
        }
        Ok(())
    });
    std::fs::write(&zip, consume(reader).unwrap()).unwrap();
    producer.join().unwrap().unwrap();
    let test = String::from_utf8(run(Command::new("unzip").arg("-tq").arg(&zip))).unwrap();
    assert!(test.contains("No errors detected"), "{test}");
    let names = run(Command::new("unzip").arg("-Z1").arg(&zip));
    assert_eq!(
        names
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        count as usize
    );
    let one = run(Command::new("unzip").arg("-p").arg(&zip).arg("d/69999"));
    assert_eq!(one, b"69999\n");
}

// ------------------------------------------------- stream failure modes

/// Closing the consumer stops the producer: its next write fails and the
/// archive writer returns the error instead of producing the rest.
#[test]
fn dropping_the_reader_stops_the_producer() {
    for format in [Format::Tar, Format::Zip] {
        let size = 1u64 << 40; // would take hours if the producer kept going
        let (producer, mut reader) = spawn_producer(format, false, 64 * 1024, move |w| {
            w.append(
                &meta(b"endless", EntryKind::File { size }),
                Some(&mut Zeros(size)),
            )
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (first, eof) = rt.block_on(reader.read(1000)).unwrap();
        assert!(!first.is_empty() && !eof);
        let started = Instant::now();
        drop(reader);
        let err = producer.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

/// A read failing inside the filesystem reaches the consumer as an error,
/// never as a short archive ending normally.
#[test]
fn a_producer_error_reaches_the_consumer() {
    struct Failing(u64);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("chunk 3f2a…: digest mismatch"));
            }
            let n = buf.len().min(self.0 as usize);
            buf[..n].fill(b'x');
            self.0 -= n as u64;
            Ok(n)
        }
    }
    for (format, zstd) in [
        (Format::Tar, false),
        (Format::Zip, false),
        (Format::Tar, true),
    ] {
        let (producer, reader) = spawn_producer(format, zstd, 64 * 1024, |w| {
            w.append(
                &meta(b"ok.txt", EntryKind::File { size: 3 }),
                Some(&mut &b"ok\n"[..]),
            )?;
            w.append(
                &meta(b"broken.bin", EntryKind::File { size: 1 << 20 }),
                Some(&mut Failing(300_000)),
            )
        });
        let err = consume(reader).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(producer.join().unwrap().is_err());
    }
}

/// Data shorter than the size announced in the header is an error naming
/// the member (the header cannot be taken back).
#[test]
fn short_file_data_is_an_error() {
    for format in [Format::Tar, Format::Zip] {
        let (producer, reader) = spawn_producer(format, false, 64 * 1024, |w| {
            w.append(
                &meta(b"dir/short", EntryKind::File { size: 10 }),
                Some(&mut &b"only5"[..]),
            )
        });
        let err = consume(reader).unwrap_err();
        assert!(err.to_string().contains("dir/short"), "{err}");
        assert_eq!(
            producer.join().unwrap().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}

/// Member names that could escape the extraction directory, and hard links
/// in zip, are refused before anything of the member is written.
#[test]
fn bad_members_are_refused() {
    for format in [Format::Tar, Format::Zip] {
        let mut w = new_writer(format, false, Box::new(io::sink())).unwrap();
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"a/../../x",
            b"a//b",
            b"a/",
            b"",
            b"a/./b",
            b"nul\0",
        ] {
            let err = w.append(&meta(bad, EntryKind::Dir), None).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        let link = meta(
            b"l",
            EntryKind::Hardlink {
                target: b"../../etc/shadow".to_vec(),
            },
        );
        assert!(w.append(&link, None).is_err());
    }
    let mut w = new_writer(Format::Zip, false, Box::new(io::sink())).unwrap();
    let link = meta(
        b"l",
        EntryKind::Hardlink {
            target: b"a".to_vec(),
        },
    );
    let err = w.append(&link, None).unwrap_err();
    assert!(err.to_string().contains("hard links"), "{err}");
    assert!(!Format::Zip.supports_hardlinks() && Format::Tar.supports_hardlinks());
}
