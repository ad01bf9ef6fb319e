//! Source trees and filesystem images made by the real tools (mke2fs -d,
//! mkfs.vfat + mcopy, sgdisk, sfdisk) for the image tests: shared by
//! tests/fs_images.rs (library level) and tests/files.rs (over the wire).
//! Nothing is mounted. Include with `#[path = "common/trees.rs"] mod trees;`.
#![allow(dead_code)]

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const TOOLS: &[&str] = &[
    "mke2fs",
    "dumpe2fs",
    "debugfs",
    "mkfs.vfat",
    "mcopy",
    "mkntfs",
    "ntfscp",
    "sgdisk",
    "sfdisk",
    "mkswap",
    "mkfifo",
    "truncate",
    "dd",
];
pub const MTIME: i64 = 1_600_000_000;
pub const MIB: u64 = 1024 * 1024;

pub fn have_tools() -> bool {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| {
            !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(t).exists())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: missing tools {missing:?} (Debian: e2fsprogs dosfstools mtools ntfs-3g gdisk fdisk util-linux coreutils)"
        );
        return false;
    }
    true
}

pub fn run(cmd: &mut Command) {
    let out = cmd.env("TZ", "UTC").output().expect("spawn tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A xorshift64 generator from `seed` (not 0): the same numbers on every
/// run, so that a failing round of damage can be found again.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut next = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&next().to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

pub fn long_name() -> String {
    "L".repeat(251) + ".txt" // 255 bytes
}

/// Files common to every filesystem (no symlinks, hardlinks, modes or
/// non-UTF-8 names, which FAT and NTFS cannot hold).
pub fn make_plain(root: &Path, small: bool) {
    write(&root.join("empty.txt"), b"");
    write(&root.join("hello.txt"), b"hello, world\n");
    write(&root.join("a/b/c/d/deep.bin"), &noise(1, 70_000));
    write(&root.join("a/b/mid.txt"), b"in the middle\n");
    write(
        &root.join("Grüße_日本語_файл.txt"),
        "unicode name\n".as_bytes(),
    );
    write(
        &root.join("目录_ñ/κείμενο.txt"),
        "inside a unicode dir\n".as_bytes(),
    );
    write(&root.join(long_name()), b"255-byte name\n");
    write(&root.join("mib3.bin"), &noise(2, 3 * MIB as usize + 12345));
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    let count = if small { 300 } else { 2000 };
    for i in 0..count {
        let data = if i % 3 == 0 {
            noise(100 + i as u64, i % 5000)
        } else {
            format!("file {i}\n").repeat(i % 40).into_bytes()
        };
        write(&root.join(format!("many/f{i:04}.dat")), &data);
    }
}

/// Makes a sparse file: data at 0, at `mid` and at the end.
pub fn make_sparse(path: &Path, size: u64, mid: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&noise(7, 5000), 0).unwrap();
    f.write_all_at(&noise(8, 5000), mid).unwrap();
    f.write_all_at(b"tail", size - 4).unwrap();
}

/// The Unix extras: symlinks, hardlink, modes, owners, sparse, non-UTF-8.
pub fn make_unix(root: &Path, big: bool) {
    use std::os::unix::fs::symlink;
    symlink("hello.txt", root.join("link_rel")).unwrap();
    symlink("/a/b/mid.txt", root.join("link_abs")).unwrap();
    symlink("a/b", root.join("link_dir")).unwrap();
    symlink("does/not/exist", root.join("link_dangling")).unwrap();
    symlink("loop_b", root.join("loop_a")).unwrap();
    symlink("loop_a", root.join("loop_b")).unwrap();
    symlink("../../../../../a/b/mid.txt", root.join("a/escape")).unwrap();
    let long_target = "x/".repeat(40) + "target"; // a slow symlink (> 60 bytes)
    symlink(&long_target, root.join("link_long")).unwrap();
    std::fs::hard_link(root.join("hello.txt"), root.join("a/hard_hello.txt")).unwrap();
    write(&root.join("modes/suid"), b"#!/bin/sh\n");
    std::fs::set_permissions(
        root.join("modes/suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    write(&root.join("modes/private"), b"secret\n");
    std::fs::set_permissions(
        root.join("modes/private"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("modes/sticky")).unwrap();
    std::fs::set_permissions(
        root.join("modes/sticky"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    write(&root.join("modes/owned"), b"owned\n");
    // needs root (as in CI); without it the file keeps the caller's ids,
    // which the comparison then expects
    let _ = std::os::unix::fs::chown(root.join("modes/owned"), Some(1234), Some(5678));
    let raw = std::ffi::OsStr::from_bytes(b"latin1_\xe9t\xe9.txt");
    write(&root.join(raw), b"not utf-8 name\n");
    run(Command::new("mkfifo").arg(root.join("modes/fifo")));
    // data at 0, 8 MiB (past the direct and first indirect blocks: a hole
    // in the block map's indirect pointer on ext2/3) and at the end
    make_sparse(&root.join("sparse.img"), 20 * MIB, 8 * MIB);
    if big {
        write(&root.join("big.bin"), &noise(9, 24 * MIB as usize));
    }
}

/// Sets every mtime in the tree to distinct known values (even seconds,
/// for FAT's 2-second resolution).
pub fn set_mtimes(root: &Path) {
    let mut all = vec![];
    collect(root, &mut all);
    all.sort();
    all.reverse(); // children before parents
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, MTIME + 2 * i as i64);
    }
    set_mtime(root, MTIME);
}

/// Sets atime and mtime of `p` (not following a symlink).
pub fn set_mtime(p: &Path, t: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: t as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: a valid NUL-terminated path and two timespecs
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

pub fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        }
    }
}
pub fn mkimg_ext(src: &Path, img: &Path, args: &[&str], mib: u64) {
    let mut c = Command::new("mke2fs");
    c.arg("-q")
        .arg("-F")
        .args(args)
        .arg("-d")
        .arg(src)
        .arg(img)
        .arg(format!("{mib}M"));
    run(&mut c);
}

pub fn mkimg_fat(src: &Path, img: &Path, fat: u32, kib: u64, label: &str) {
    let _ = std::fs::remove_file(img);
    run(Command::new("mkfs.vfat")
        .arg("-C")
        .arg("-F")
        .arg(fat.to_string())
        .arg("-n")
        .arg(label)
        .arg(img)
        .arg(kib.to_string()));
    let mut c = Command::new("mcopy");
    c.arg("-s").arg("-m").arg("-Q").arg("-i").arg(img);
    for e in std::fs::read_dir(src).unwrap() {
        c.arg(e.unwrap().path());
    }
    c.arg("::/");
    run(&mut c);
}

/// Lays images into a disk at the given sector starts.
pub fn place(disk: &Path, parts: &[(&Path, u64)]) {
    for (img, start) in parts {
        run(Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", disk.display()))
            .arg("bs=1M")
            .arg(format!("seek={}", start * 512))
            .arg("oflag=seek_bytes")
            .arg("conv=notrunc,sparse")
            .arg("status=none"));
    }
}

pub fn sectors(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len() / 512
}
pub fn count_source(src: &Path) -> usize {
    let mut all = vec![];
    collect(src, &mut all);
    all.len()
}

/// Writes an MBR partition table with `sfdisk`, reading `script` on stdin.
pub fn sfdisk(disk: &Path, script: &str) {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes an NTFS image of `size` ("16M") and copies `files` to its root
/// with ntfscp (which cannot make directories). `scratch` holds the copies.
pub fn mkimg_ntfs(
    img: &Path,
    size: &str,
    label: &str,
    scratch: &Path,
    files: &[(String, Vec<u8>)],
) {
    run(Command::new("truncate").arg("-s").arg(size).arg(img));
    run(Command::new("mkntfs")
        .arg("-q")
        .arg("-F")
        .arg("-f")
        .arg("-L")
        .arg(label)
        .arg(img));
    for (name, data) in files {
        write(&scratch.join(name), data);
        run(Command::new("ntfscp")
            .arg("-q")
            .arg(img)
            .arg(scratch.join(name))
            .arg(name));
    }
}

/// Removes `dir` when the test process exits. Image fixtures live in
/// statics, which are never dropped: without this every run would leave
/// hundreds of MiB behind (in /dev/shm, that is memory).
pub fn remove_at_exit(dir: &Path) {
    use std::sync::Mutex;
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|p| p.into_inner()));
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let mut dirs = DIRS.lock().unwrap();
    if dirs.is_empty() {
        // SAFETY: registers a plain function without arguments.
        unsafe {
            libc::atexit(cleanup);
        }
    }
    dirs.push(dir.to_path_buf());
}

/// Sets extended attribute `name` of `path` (following symlinks).
pub fn set_xattr(path: &Path, name: &std::ffi::CStr, value: &[u8]) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: both strings are NUL-terminated and `value` is valid for its length.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The extended attributes of `path` (symlinks not followed), as the
/// kernel lists them: (name, value), sorted by name.
pub fn kernel_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 1 << 16];
    // SAFETY: `c` is NUL-terminated and `names` is valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 1 << 16];
        // SAFETY: both strings are NUL-terminated, `value` is valid for its length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(n >= 0, "lgetxattr {} {cname:?}", path.display());
        value.truncate(n as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// A tree whose nodes carry the extended attributes a system has: user
/// ones (text, binary, empty), trusted and security ones (a file
/// capability), POSIX ACLs (a file's, a directory's access and default
/// ones), and more than an inode holds. Returns the paths to compare.
pub fn make_xattr_tree(root: &Path) -> Vec<&'static str> {
    for d in ["d", "d/sub", "many"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["plain", "f", "acl", "d/sub/cap", "many/f", "nothing"] {
        write(&root.join(f), f.as_bytes());
    }
    std::os::unix::fs::symlink("f", root.join("link")).unwrap();
    // a symlink's own attribute (user ones are for files and directories)
    let link = std::ffi::CString::new(root.join("link").as_os_str().as_bytes()).unwrap();
    // SAFETY: the strings are NUL-terminated, the value valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            link.as_ptr(),
            c"trusted.link".as_ptr(),
            b"l".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, 0, "lsetxattr {}", std::io::Error::last_os_error());
    let f = root.join("f");
    set_xattr(&f, c"user.comment", b"hello").unwrap();
    set_xattr(&f, c"user.binary", &[0, 1, 2, 255, b'=', b'\n']).unwrap();
    set_xattr(&f, c"user.empty", b"").unwrap();
    set_xattr(&f, c"trusted.note", b"t").unwrap();
    // a v2 file capability: cap_net_raw permitted and effective
    let cap = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    set_xattr(&root.join("d/sub/cap"), c"security.capability", &cap).unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:1000:r,g:50:rw"])
        .arg(root.join("acl")));
    run(Command::new("setfacl")
        .args(["-m", "u:1000:rwx", "-d", "-m", "g:50:rx"])
        .arg(root.join("d")));
    for i in 0..40 {
        let name = std::ffi::CString::new(format!("user.attribute-{i:02}")).unwrap();
        set_xattr(&root.join("many/f"), &name, &[b'a' + i as u8; 60]).unwrap();
    }
    vec![
        "/plain",
        "/f",
        "/acl",
        "/d",
        "/d/sub",
        "/d/sub/cap",
        "/many",
        "/many/f",
        "/nothing",
        "/link",
    ]
}
