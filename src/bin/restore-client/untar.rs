//! Unpacks the agent's tar stream (`fs.extract`: ustar headers, pax records
//! for what ustar cannot hold, GNU base-256 numbers) into a local directory,
//! piece by piece as it arrives, under the rules of `extract -o`: every member
//! name is checked again component by component, directories are opened with
//! `O_NOFOLLOW` relative to their parent's descriptor, files are created with
//! `O_EXCL` (registered as partial until complete), hard links never follow a
//! symlink, and nothing outside the directory is touched. Existing files are
//! kept unless `--force`.
//!
//! It never trusts the stream: sizes, names and pax records are checked, and
//! a bad header is an error naming the member, not a panic.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::ProgressBar;
use restore_agent::client::ClientError;

use crate::extract::{
    local_io, mkdirat, mkfifoat, openat_dir, replace_if_forced, safe_name, set_mtime_at,
    set_mtime_fd, symlinkat, Finish, Partial, Stats,
};
use crate::newfile::{place_node, NewFile};
use crate::sparse::SparseFile;

const BLOCK: usize = 512;
/// Largest pax extended header accepted.
const MAX_PAX: u64 = 1 << 20;
/// Most bytes accepted after the end-of-archive block (a tar is padded to
/// its record size, 10 KiB for GNU tar): an agent that goes on sending
/// there is broken, and was read from for as long as it sent.
const MAX_AFTER_END: u64 = 1 << 20;

/// Values from a pax extended header, for the member that follows it.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<i64>,
}

enum State {
    /// Collecting a 512-byte header in `buf`.
    Header,
    /// Collecting a pax header of this many bytes in `buf` (global ones are
    /// read and ignored).
    Pax { size: u64, global: bool },
    /// Writing a file's data.
    Data(Open),
    /// Skipping this many bytes (padding, data of skipped members).
    Skip(u64),
    /// After the end-of-archive block: this many bytes came after it.
    End(u64),
}

/// The file being written.
struct Open {
    file: SparseFile,
    /// where it goes once complete (see [`NewFile`])
    new: NewFile,
    dir: Arc<OwnedFd>,
    name: CString,
    local: PathBuf,
    left: u64,
    size: u64,
    mode: u32,
    mtime: i64,
}

/// Parent directories kept open at most (a deeper member's further parents
/// are opened for it alone).
const MAX_OPEN_PARENTS: usize = 64;

pub(crate) struct Unpacker {
    dir: PathBuf,
    top: Arc<OwnedFd>,
    /// Name of the extracted directory itself: members start with it (empty
    /// when the volume's root is extracted).
    strip: Vec<u8>,
    /// The extracted path on the agent's side, for messages.
    remote: String,
    force: bool,
    partial: Partial,
    bar: Option<ProgressBar>,
    state: State,
    buf: Vec<u8>,
    pax: Pax,
    /// The directories of the last parent looked up, outermost first, at
    /// most [`MAX_OPEN_PARENTS`] of them: (name, descriptor). The agent
    /// sends a tree in walk order, so a member mostly shares its parents
    /// with the one before and only the names that differ are opened
    /// (re-opening the whole chain took 31,000 extra `openat`s for 48,000
    /// files).
    parents: Vec<(Vec<u8>, Arc<OwnedFd>)>,
    finish: Finish,
    /// existing directories given their modes with --force (once each)
    forced_dirs: HashSet<PathBuf>,
    stats: Stats,
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// A header field up to its first NUL.
fn field(block: &[u8], off: usize, len: usize) -> &[u8] {
    let f = block.get(off..off + len).unwrap_or(&[]);
    match f.iter().position(|&b| b == 0) {
        Some(n) => &f[..n],
        None => f,
    }
}

/// A numeric field: octal text, or GNU base-256 (top bit of the first byte).
fn number(block: &[u8], off: usize, len: usize) -> Option<i64> {
    let f = block.get(off..off + len)?;
    let first = *f.first()?;
    if first & 0x80 != 0 {
        // Two's complement, big-endian; 0xff leads a negative number.
        let negative = first == 0xff;
        let mut v: i64 = if negative {
            -1
        } else {
            i64::from(first & 0x7f)
        };
        for &b in f.get(1..)? {
            if !((i64::MIN >> 8)..=(i64::MAX >> 8)).contains(&v) {
                return None;
            }
            v = (v << 8) | i64::from(b);
        }
        return Some(v);
    }
    let text = field(block, off, len);
    let text = std::str::from_utf8(text).ok()?.trim_matches(|c| c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(text, 8).ok()
}

fn checksum_ok(block: &[u8]) -> bool {
    let Some(stored) = number(block, 148, 8) else {
        return false;
    };
    let sum: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                i64::from(b)
            }
        })
        .sum();
    sum == stored
}

impl Unpacker {
    pub(crate) fn new(
        dir: &Path,
        top: OwnedFd,
        strip: Vec<u8>,
        remote: String,
        force: bool,
        partial: Partial,
        bar: Option<ProgressBar>,
    ) -> Self {
        Unpacker {
            dir: dir.to_path_buf(),
            top: Arc::new(top),
            strip,
            remote,
            force,
            partial,
            bar,
            state: State::Header,
            buf: Vec::with_capacity(BLOCK),
            pax: Pax::default(),
            parents: Vec::new(),
            finish: Vec::new(),
            forced_dirs: HashSet::new(),
            stats: Stats::default(),
        }
    }

    fn corrupt(&self, what: &str) -> ClientError {
        ClientError::local(format!("tar stream of {}: {what}", self.remote))
    }

    /// Takes the next piece of the stream.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<(), ClientError> {
        while !data.is_empty() {
            match &mut self.state {
                State::End(after) => {
                    *after += data.len() as u64;
                    if *after > MAX_AFTER_END {
                        return Err(self.corrupt("more than 1 MiB follows the end of the archive"));
                    }
                    return Ok(());
                }
                State::Skip(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Data(open) => {
                    let k = open.left.min(data.len() as u64) as usize;
                    let (now, rest) = data.split_at(k);
                    open.file.write(now).map_err(|e| local_io(&open.local, e))?;
                    if let Some(b) = &self.bar {
                        b.inc(k as u64);
                    }
                    open.left -= k as u64;
                    data = rest;
                    if open.left == 0 {
                        self.close_file()?;
                    }
                }
                State::Header => {
                    let k = (BLOCK - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if self.buf.len() == BLOCK {
                        let block = std::mem::take(&mut self.buf);
                        self.header(&block)?;
                        self.buf = block;
                        self.buf.clear();
                    }
                }
                State::Pax { size, global } => {
                    let (size, global) = (*size, *global);
                    let want = size as usize - self.buf.len();
                    let k = want.min(data.len());
                    self.buf.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if self.buf.len() as u64 == size {
                        let records = std::mem::take(&mut self.buf);
                        if !global {
                            self.pax = self.parse_pax(&records)?;
                        }
                        self.buf = Vec::with_capacity(BLOCK);
                        self.skip(pad(size));
                    }
                }
            }
        }
        Ok(())
    }

    /// The stream ended: it must have ended where the archive does. The
    /// directories made so far come back whether it did or not: they get
    /// their modes and mtimes after a failure too (as tar gives them), not
    /// the 0700 they were made with.
    pub(crate) fn end(mut self) -> (Result<Stats, ClientError>, Finish) {
        self.parents.clear();
        let ended = if matches!(self.state, State::End(_)) {
            Ok(std::mem::take(&mut self.stats))
        } else {
            // The file being written stays registered as partial: removed.
            Err(self.corrupt("the archive ended early"))
        };
        (ended, std::mem::take(&mut self.finish))
    }

    fn skip(&mut self, n: u64) {
        self.state = if n == 0 {
            State::Header
        } else {
            State::Skip(n)
        };
    }

    fn close_file(&mut self) -> Result<(), ClientError> {
        let State::Data(open) = std::mem::replace(&mut self.state, State::Header) else {
            return Ok(());
        };
        let Open {
            file,
            new,
            dir,
            name,
            local,
            size,
            mode,
            mtime,
            ..
        } = open;
        let done = file.finish().and_then(|file| {
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            set_mtime_fd(&file, mtime)
        });
        if let Err(e) = done {
            new.abandon(&self.partial, &dir, &name);
            return Err(local_io(&local, e));
        }
        new.commit(&self.partial, &dir, &name, &local)?;
        self.stats.files += 1;
        self.stats.bytes += size;
        self.skip(pad(size));
        Ok(())
    }

    fn parse_pax(&self, mut records: &[u8]) -> Result<Pax, ClientError> {
        let mut pax = Pax::default();
        while !records.is_empty() {
            let bad = || self.corrupt("bad pax record");
            let space = records.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&records[..space])
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)?;
            if len <= space + 1 || len > records.len() || records[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &records[space + 1..len - 1];
            records = &records[len..];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            let text = || std::str::from_utf8(value).ok();
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"size" => pax.size = Some(text().and_then(|t| t.parse().ok()).ok_or_else(bad)?),
                b"mtime" => {
                    let secs = text()
                        .and_then(|t| t.split('.').next())
                        .and_then(|t| t.parse().ok())
                        .ok_or_else(bad)?;
                    pax.mtime = Some(secs);
                }
                _ => {}
            }
        }
        Ok(pax)
    }

    fn header(&mut self, block: &[u8]) -> Result<(), ClientError> {
        if block.iter().all(|&b| b == 0) {
            self.state = State::End(0);
            return Ok(());
        }
        if !checksum_ok(block) {
            return Err(self.corrupt("a header's checksum does not match"));
        }
        let pax = std::mem::take(&mut self.pax);
        let typeflag = block[156];
        let size = match pax.size {
            Some(s) => s,
            None => number(block, 124, 12)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| self.corrupt("bad size field"))?,
        };
        // the member's data and its padding, which a hostile size overflows
        let padded = size
            .checked_add(pad(size))
            .ok_or_else(|| self.corrupt("bad size field"))?;
        if typeflag == b'x' || typeflag == b'g' {
            if size > MAX_PAX {
                return Err(self.corrupt("pax header too large"));
            }
            self.buf.clear();
            self.state = State::Pax {
                size,
                global: typeflag == b'g',
            };
            if size == 0 {
                self.state = State::Header;
            }
            return Ok(());
        }
        let name = match pax.path {
            Some(p) => p,
            None => {
                let (prefix, name) = (field(block, 345, 155), field(block, 0, 100));
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            }
        };
        let mtime = match pax.mtime {
            Some(t) => t,
            None => number(block, 136, 12).ok_or_else(|| self.corrupt("bad mtime field"))?,
        };
        let mode = number(block, 100, 8)
            .and_then(|m| u32::try_from(m).ok())
            .ok_or_else(|| self.corrupt("bad mode field"))?
            & 0o7777;
        let link = pax
            .linkpath
            .unwrap_or_else(|| field(block, 157, 100).to_vec());
        let Some(rel) = self.member(&name)? else {
            // The extracted directory itself: DIR stands for it.
            self.skip(padded);
            return Ok(());
        };
        match typeflag {
            b'0' | 0 | b'7' => self.file(&rel, size, mode, mtime),
            b'5' => {
                self.dir_member(&rel, mode, mtime)?;
                self.skip(padded);
                Ok(())
            }
            b'2' => {
                self.symlink(&rel, &link, mtime)?;
                self.skip(padded);
                Ok(())
            }
            b'1' => {
                self.hardlink(&rel, &link)?;
                self.skip(padded);
                Ok(())
            }
            b'6' => {
                let (fd, name, local) = self.parent_of(&rel)?;
                place_node(&fd, &name, &local, self.force, |n| mkfifoat(&fd, n, mode))?;
                set_mtime_at(&fd, &name, mtime).map_err(|e| local_io(&local, e))?;
                self.stats.fifos += 1;
                self.skip(padded);
                Ok(())
            }
            b'3' | b'4' => {
                let shown = String::from_utf8_lossy(&rel).into_owned();
                self.stats
                    .skip(format!("{}/{shown}", self.remote.trim_end_matches('/')));
                self.skip(padded);
                Ok(())
            }
            other => Err(self.corrupt(&format!(
                "member {} has unsupported type {:?}",
                String::from_utf8_lossy(&name),
                char::from(other)
            ))),
        }
    }

    /// A member's path relative to DIR (`None` for the extracted directory
    /// itself). Components are checked when they are used.
    fn member(&self, name: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let mut name = name;
        while name.len() > 1 && name.ends_with(b"/") {
            name = &name[..name.len() - 1];
        }
        if self.strip.is_empty() {
            return Ok(Some(name.to_vec()));
        }
        if name == self.strip.as_slice() {
            return Ok(None);
        }
        match name.strip_prefix(self.strip.as_slice()) {
            Some(rest) if rest.first() == Some(&b'/') => Ok(Some(rest[1..].to_vec())),
            _ => Err(self.corrupt(&format!(
                "member {} is outside the extracted directory",
                String::from_utf8_lossy(name)
            ))),
        }
    }

    /// The directory holding member `rel` (opened component by component,
    /// never through a symlink), the member's checked name, and its local
    /// path.
    fn parent_of(&mut self, rel: &[u8]) -> Result<(Arc<OwnedFd>, CString, PathBuf), ClientError> {
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&rel[..0], rel),
        };
        let name = safe_name(name)?;
        let local = self
            .dir
            .join(OsStr::from_bytes(parent))
            .join(OsStr::from_bytes(name.to_bytes()));
        if parent.is_empty() {
            return Ok((self.top.clone(), name, local));
        }
        let components: Vec<&[u8]> = parent.split(|&b| b == b'/').collect();
        let same = self
            .parents
            .iter()
            .zip(&components)
            .take_while(|((open, _), c)| open.as_slice() == **c)
            .count();
        self.parents.truncate(same);
        let mut fd = self.parents.last().map_or(&self.top, |(_, fd)| fd).clone();
        let mut so_far = self.dir.clone();
        for (i, component) in components.iter().enumerate() {
            so_far.push(OsStr::from_bytes(component));
            if i < same {
                continue;
            }
            let c = safe_name(component)?;
            fd = Arc::new(openat_dir(&fd, &c).map_err(|e| local_io(&so_far, e))?);
            if self.parents.len() == i && i < MAX_OPEN_PARENTS {
                self.parents.push((component.to_vec(), fd.clone()));
            }
        }
        Ok((fd, name, local))
    }

    fn file(&mut self, rel: &[u8], size: u64, mode: u32, mtime: i64) -> Result<(), ClientError> {
        let (fd, name, local) = self.parent_of(rel)?;
        let (file, new) = NewFile::create(&self.partial, &fd, &name, &local, self.force)?;
        self.state = State::Data(Open {
            file: SparseFile::new(file),
            new,
            dir: fd,
            name,
            local,
            left: size,
            size,
            mode,
            mtime,
        });
        if size == 0 {
            self.close_file()?;
        }
        Ok(())
    }

    fn dir_member(&mut self, rel: &[u8], mode: u32, mtime: i64) -> Result<(), ClientError> {
        let (fd, name, local) = self.parent_of(rel)?;
        let mut made = match mkdirat(&fd, &name) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(local_io(&local, e)),
        };
        // Refuses a symlink (or anything else) standing where the directory
        // should be; --force replaces it (never following it).
        let dir = match openat_dir(&fd, &name) {
            Ok(dir) => dir,
            Err(e) if self.force && is_not_a_directory(&e) => {
                replace_if_forced(true, &fd, &name, &local)?;
                mkdirat(&fd, &name).map_err(|e| local_io(&local, e))?;
                made = true;
                openat_dir(&fd, &name).map_err(|e| local_io(&local, e))?
            }
            Err(e) if is_not_a_directory(&e) => {
                return Err(ClientError::local(format!(
                    "{} exists and is not a directory (use --force to replace it)",
                    local.display()
                )))
            }
            Err(e) => return Err(local_io(&local, e)),
        };
        // Its members come next: keep it open as their parent, if its own
        // parents are the ones kept open.
        let depth = rel.iter().filter(|&&b| b == b'/').count();
        if self.parents.len() == depth && depth < MAX_OPEN_PARENTS {
            self.parents.push((name.to_bytes().to_vec(), Arc::new(dir)));
        }
        // A directory that was there keeps its mode and mtime without
        // --force (as GNU tar's --no-overwrite-dir; a member could otherwise
        // open up or lock the user's ~/.ssh); with --force it gets them
        // once, however often the stream names it.
        if made || (self.force && self.forced_dirs.insert(local.clone())) {
            self.finish.push((local, mode, mtime));
        }
        self.stats.dirs += 1;
        Ok(())
    }

    fn symlink(&mut self, rel: &[u8], target: &[u8], mtime: i64) -> Result<(), ClientError> {
        let (fd, name, local) = self.parent_of(rel)?;
        let target = CString::new(target).map_err(|_| {
            ClientError::local(format!(
                "symlink {}: target holds a NUL byte",
                local.display()
            ))
        })?;
        place_node(&fd, &name, &local, self.force, |n| {
            symlinkat(&target, &fd, n)
        })?;
        set_mtime_at(&fd, &name, mtime).map_err(|e| local_io(&local, e))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, rel: &[u8], target: &[u8]) -> Result<(), ClientError> {
        let Some(target_rel) = self.member(target)? else {
            return Err(self.corrupt("a hard link to the extracted directory"));
        };
        let (tfd, tname, _) = self.parent_of(&target_rel)?;
        let (fd, name, local) = self.parent_of(rel)?;
        place_node(&fd, &name, &local, self.force, |n| {
            linkat(&tfd, &tname, &fd, n)
        })?;
        self.stats.hardlinks += 1;
        Ok(())
    }
}

/// Whether opening a directory failed on something else standing there (a
/// file: ENOTDIR; a symlink, with O_NOFOLLOW: ELOOP).
fn is_not_a_directory(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP))
}

/// A hard link `dir/name` to `from_dir/from`; a symlink at `from` is linked
/// itself, never followed.
fn linkat(from_dir: &OwnedFd, from: &CStr, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fds and NUL-terminated names; flags 0 (no follow).
    let r = unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_octal_and_base256() {
        let mut block = [0u8; BLOCK];
        block[124..135].copy_from_slice(b"00000001750");
        assert_eq!(number(&block, 124, 12), Some(0o1750));
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[4..12].copy_from_slice(&(9u64 << 30).to_be_bytes());
        block[124..136].copy_from_slice(&b256);
        assert_eq!(number(&block, 124, 12), Some(9 << 30));
        let neg = (-5i64).to_be_bytes();
        let mut b256 = [0xffu8; 12];
        b256[4..12].copy_from_slice(&neg);
        block[136..148].copy_from_slice(&b256);
        assert_eq!(number(&block, 136, 12), Some(-5));
        block[100..108].copy_from_slice(b"0000x44\0");
        assert_eq!(number(&block, 100, 8), None);
    }

    /// A ustar header block for `name`.
    fn header(name: &str, typeflag: u8, size: u64, link: &str) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b[100..107].copy_from_slice(b"0000644");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[136..147].copy_from_slice(b"14000000000");
        b[156] = typeflag;
        b[157..157 + link.len()].copy_from_slice(link.as_bytes());
        b[257..263].copy_from_slice(b"ustar\0");
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        b
    }

    fn member(name: &str, typeflag: u8, data: &[u8], link: &str) -> Vec<u8> {
        let mut m = header(name, typeflag, data.len() as u64, link);
        m.extend_from_slice(data);
        m.resize(m.len() + pad(data.len() as u64) as usize, 0);
        m
    }

    fn unpack(
        dir: &Path,
        strip: &str,
        stream: &[u8],
        piece: usize,
    ) -> Result<(Stats, Finish), ClientError> {
        let top = crate::extract::open_dir(dir).expect("open");
        let mut u = Unpacker::new(
            dir,
            top,
            strip.as_bytes().to_vec(),
            "/x".into(),
            false,
            Partial::default(),
            None,
        );
        for p in stream.chunks(piece) {
            u.feed(p)?;
        }
        let (ended, finish) = u.end();
        ended.map(|stats| (stats, finish))
    }

    #[test]
    fn unpacks_in_pieces_of_any_size() {
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = Vec::new();
        stream.extend(member("top", b'5', b"", ""));
        stream.extend(member("top/d", b'5', b"", ""));
        stream.extend(member("top/d/a.bin", b'0', &big, ""));
        stream.extend(member("top/empty", b'0', b"", ""));
        stream.extend(member("top/d/link", b'2', b"", "a.bin"));
        stream.extend(member("top/hard", b'1', b"", "top/d/a.bin"));
        stream.extend(member("top/pipe", b'6', b"", ""));
        stream.extend([0u8; 2 * BLOCK]);
        for piece in [1, 7, 511, 512, 513, 1 << 20] {
            let t = tempfile::tempdir().expect("tmp");
            let (stats, finish) = unpack(t.path(), "top", &stream, piece).expect("unpack");
            assert_eq!(
                (stats.files, stats.dirs, stats.symlinks, stats.hardlinks),
                (2, 1, 1, 1)
            );
            assert_eq!(stats.fifos, 1);
            assert_eq!(std::fs::read(t.path().join("d/a.bin")).expect("read"), big);
            assert_eq!(std::fs::read(t.path().join("hard")).expect("read"), big);
            assert_eq!(
                std::fs::read_link(t.path().join("d/link")).expect("readlink"),
                Path::new("a.bin")
            );
            assert_eq!(finish.len(), 1);
        }
    }

    #[test]
    fn hostile_members_never_leave_the_directory() {
        for (name, typeflag, link) in [
            ("../evil", b'0', ""),
            ("a/../../evil", b'0', ""),
            ("/evil", b'0', ""),
            ("other/evil", b'0', ""),
            ("top/../evil", b'5', ""),
            ("top/h", b'1', "../evil"),
        ] {
            let t = tempfile::tempdir().expect("tmp");
            let inner = t.path().join("in");
            std::fs::create_dir(&inner).expect("mkdir");
            let mut stream = member(name, typeflag, b"x", link);
            stream.extend([0u8; 2 * BLOCK]);
            assert!(
                unpack(&inner, "top", &stream, 100).is_err(),
                "{name} accepted"
            );
            assert!(!t.path().join("evil").exists(), "{name} wrote outside");
        }
        // A symlink in the archive is never followed by a later member.
        let t = tempfile::tempdir().expect("tmp");
        let inner = t.path().join("in");
        std::fs::create_dir(&inner).expect("mkdir");
        let mut stream = member("l", b'2', b"", "..");
        stream.extend(member("l/evil", b'0', b"x", ""));
        stream.extend([0u8; 2 * BLOCK]);
        assert!(unpack(&inner, "", &stream, 4096).is_err());
        assert!(!t.path().join("evil").exists());
    }

    #[test]
    fn members_land_in_their_own_directories_as_the_walk_comes_and_goes() {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        // Directories end in '/' here. In and out of directories, back into
        // one left before, into one of the same name under another parent;
        // "b/" (top level) right after the walk was in "a/": not taken for
        // "a/b".
        for name in [
            "a/", "a/b/", "a/f", "b/", "a/b/11", "a/b/c/", "a/d/", "e/", "e/b/", "e/b/c/",
            "a/b/c/1", "a/d/2", "a/b/3", "a/b/c/4", "e/b/c/5", "a/b/c/6", "7", "e/8", "a/b/c/9",
        ] {
            match name.strip_suffix('/') {
                Some(dir) => stream.extend(member(dir, b'5', b"", "")),
                None => {
                    stream.extend(member(name, b'0', name.as_bytes(), ""));
                    want.push(name);
                }
            }
        }
        // deeper than the parents kept open
        let deep: String = (0..MAX_OPEN_PARENTS + 5)
            .map(|i| format!("x{i}/"))
            .collect();
        let mut path = String::new();
        for part in deep.split_terminator('/') {
            path.push_str(part);
            stream.extend(long_member(&path, b'5', b""));
            path.push('/');
        }
        let deep_file = format!("{deep}f");
        stream.extend(long_member(&deep_file, b'0', b"deep"));
        stream.extend(member("a/b/c/10", b'0', b"a/b/c/10", ""));
        want.push("a/b/c/10");
        stream.extend([0u8; 2 * BLOCK]);
        let t = tempfile::tempdir().expect("tmp");
        unpack(t.path(), "", &stream, 4096).expect("unpack");
        for file in want {
            let got = std::fs::read(t.path().join(file)).expect(file);
            assert_eq!(got, file.as_bytes(), "{file}");
        }
        assert_eq!(
            std::fs::read(t.path().join(&deep_file)).expect("deep"),
            b"deep"
        );
        let files = walkdir_count(t.path());
        assert_eq!(files, 13, "no file anywhere else");
    }

    /// A member whose name may be longer than a header holds: a pax `path`
    /// record before it.
    fn long_member(name: &str, typeflag: u8, data: &[u8]) -> Vec<u8> {
        let body = format!(" path={name}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        let mut m = member("pax", b'x', format!("{len}{body}").as_bytes(), "");
        m.extend(member("short", typeflag, data, ""));
        m
    }

    /// Regular files under `dir`.
    fn walkdir_count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry"))
            .map(|e| {
                if e.file_type().expect("type").is_dir() {
                    walkdir_count(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }

    #[test]
    fn a_bad_checksum_or_a_short_stream_is_an_error() {
        let t = tempfile::tempdir().expect("tmp");
        let mut m = member("f", b'0', b"data", "");
        m[0] = b'g';
        assert!(unpack(t.path(), "", &m, 512).is_err());
        let m = member("f", b'0', b"data", "");
        let err = unpack(t.path(), "", &m[..BLOCK + 2], 512)
            .err()
            .expect("short");
        assert!(err.to_string().contains("ended early"), "{err}");
    }

    /// From a hostile agent: a pax size of 2^64 - 1 on a member with no
    /// data overflowed the skip (a panic in the unpacker), and data after
    /// the end of the archive was read for as long as it came.
    #[test]
    fn hostile_sizes_and_data_after_the_end_are_errors() {
        let t = tempfile::tempdir().expect("tmp");
        let record = b"29 size=18446744073709551615\n";
        let mut m = member("pax", b'x', record, "");
        m.extend(member("d/", b'5', b"", ""));
        let err = unpack(t.path(), "", &m, 512).err().expect("overflow");
        assert!(err.to_string().contains("bad size field"), "{err}");

        let mut m = member("f", b'0', b"data", "");
        m.extend(vec![0u8; 2 * BLOCK]);
        let (ok, bad) = (t.path().join("ok"), t.path().join("bad"));
        std::fs::create_dir(&ok).expect("mkdir");
        std::fs::create_dir(&bad).expect("mkdir");
        assert!(unpack(&ok, "", &m, 4096).is_ok(), "end blocks and padding");
        m.extend(vec![0u8; MAX_AFTER_END as usize]);
        let err = unpack(&bad, "", &m, 1 << 16).err().expect("trailing data");
        assert!(err.to_string().contains("follows the end"), "{err}");
    }

    #[test]
    fn padding() {
        assert_eq!(pad(0), 0);
        assert_eq!(pad(1), 511);
        assert_eq!(pad(512), 0);
        assert_eq!(pad(513), 511);
    }
}
