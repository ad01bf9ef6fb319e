//! Unpacks the agent's tar stream (`fs.extract`, framed by `tarframe`) into
//! a local directory, piece by piece as it arrives, under the rules of
//! `extract -o`: every member name is checked again component by component,
//! directories are opened with `O_NOFOLLOW` relative to their parent's
//! descriptor, files are created with `O_EXCL` (registered as partial until
//! complete), hard links never follow a symlink, and nothing outside the
//! directory is touched. Existing files are kept unless `--force`.
//!
//! It never trusts the stream: a member outside the directory, or of a type
//! it cannot make, is an error naming the member, not a panic.

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
    set_mtime_fd, symlinkat, FailedMember, Finish, FinishDir, Keep, Mtime, Partial, Stats,
};
use crate::meta::{self, Attrs, Owner};
use crate::newfile::{place_node, NewFile};
use crate::sparse::SparseFile;
use crate::sparsemap::SparseMember;
use crate::tarframe::{Member, Members, TarFrames};

/// The file being written.
struct Open {
    file: SparseFile,
    /// for a sparse member: where its data goes
    sparse: Option<SparseMember>,
    /// where it goes once complete (see [`NewFile`])
    new: NewFile,
    dir: Arc<OwnedFd>,
    name: CString,
    local: PathBuf,
    size: u64,
    mode: u32,
    mtime: Mtime,
    owner: Owner,
    xattrs: Attrs,
}

/// Parent directories kept open at most (a deeper member's further parents
/// are opened for it alone).
const MAX_OPEN_PARENTS: usize = 64;
/// Bytes of directories' extended attributes kept until the directories
/// are finished (a default ACL set at once would be inherited by the
/// files made in them, which had their own); past it they are set at once.
const MAX_DEFERRED_XATTRS: usize = 64 << 20;

/// What was extracted, as the stream's members name it.
pub(crate) enum Top {
    /// A directory: its members start with this name (empty when the
    /// volume's root is extracted), and DIR stands for it.
    Dir(Vec<u8>),
    /// One file of this name: the only member, written into DIR under its
    /// name.
    File(Vec<u8>),
}

pub(crate) struct Unpacker {
    frames: TarFrames,
    out: Output,
}

/// Where the members go: the directory, and what is being written there.
struct Output {
    dir: PathBuf,
    top: Arc<OwnedFd>,
    /// What was extracted, as the members name it.
    strip: Top,
    /// The extracted path on the agent's side, for messages.
    remote: String,
    force: bool,
    /// what members get besides modes and mtimes
    keep: Keep,
    /// bytes of them kept in `finish`
    deferred_xattrs: usize,
    partial: Partial,
    bar: Option<ProgressBar>,
    open: Option<Open>,
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

impl Unpacker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dir: &Path,
        top: OwnedFd,
        strip: Top,
        remote: String,
        force: bool,
        keep: Keep,
        partial: Partial,
        bar: Option<ProgressBar>,
    ) -> Self {
        Unpacker {
            frames: TarFrames::new(remote.clone()),
            out: Output {
                dir: dir.to_path_buf(),
                top: Arc::new(top),
                strip,
                remote,
                force,
                keep,
                deferred_xattrs: 0,
                partial,
                bar,
                open: None,
                parents: Vec::new(),
                finish: Vec::new(),
                forced_dirs: HashSet::new(),
                stats: Stats::default(),
            },
        }
    }

    /// Takes the next piece of the stream.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.frames.feed(data, &mut self.out)
    }

    /// The stream failed at a member the agent could not read, and a new
    /// one resumes after it: the member's partial file goes, and the new
    /// stream starts with a header.
    pub(crate) fn member_failed(&mut self, member: FailedMember) {
        if let Some(open) = self.out.open.take() {
            open.new.abandon(&self.out.partial, &open.dir, &open.name);
        }
        self.frames = TarFrames::new(self.out.remote.clone());
        self.out.stats.failed(member);
    }

    /// The stream ended: it must have ended where the archive does. The
    /// directories made so far come back whether it did or not: they get
    /// their modes and mtimes after a failure too (as tar gives them), not
    /// the 0700 they were made with.
    pub(crate) fn end(mut self) -> (Result<Stats, ClientError>, Finish) {
        self.out.parents.clear();
        // The file being written stays registered as partial: removed.
        let ended = self
            .frames
            .end()
            .map(|()| std::mem::take(&mut self.out.stats));
        (ended, std::mem::take(&mut self.out.finish))
    }
}

impl Members for Output {
    fn member(&mut self, mut m: Member) -> Result<bool, ClientError> {
        let Some(rel) = self.member_path(&m.name)? else {
            // The extracted directory itself: DIR stands for it.
            return Ok(false);
        };
        if !self.keep.xattrs {
            m.xattrs.clear();
        }
        let owner = self.keep.owners.then_some((m.uid, m.gid));
        let mtime = (m.mtime, m.mtime_ns);
        match m.typeflag {
            b'0' | 0 | b'7' => {
                self.file(&rel, m, owner)?;
                return Ok(true);
            }
            b'5' => self.dir_member(&rel, m.mode, mtime, owner, m.xattrs)?,
            b'2' => self.symlink(&rel, &m.link, mtime, owner, &m.xattrs)?,
            b'1' => self.hardlink(&rel, &m.link)?,
            b'6' => {
                let (fd, name, local) = self.parent_of(&rel)?;
                place_node(&fd, &name, &local, self.force, |n| mkfifoat(&fd, n, m.mode))?;
                meta::apply_at(&fd, &name, owner, &m.xattrs, &local, &mut self.stats.meta);
                set_mtime_at(&fd, &name, mtime).map_err(|e| local_io(&local, e))?;
                self.stats.fifos += 1;
            }
            b'3' | b'4' => {
                let shown = String::from_utf8_lossy(&rel).into_owned();
                self.stats
                    .skip(format!("{}/{shown}", self.remote.trim_end_matches('/')));
            }
            other => {
                return Err(self.corrupt(&format!(
                    "member {} has unsupported type {:?}",
                    String::from_utf8_lossy(&m.name),
                    char::from(other)
                )))
            }
        }
        Ok(false)
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        match &mut open.sparse {
            None => open
                .file
                .write(bytes)
                .map_err(|e| local_io(&open.local, e))?,
            Some(sparse) => sparse.feed(bytes, &mut open.file).map_err(|e| {
                ClientError::local(format!(
                    "tar stream of {}: sparse member {}: {e}",
                    self.remote,
                    open.local.display()
                ))
            })?,
        }
        if let Some(b) = &self.bar {
            b.inc(bytes.len() as u64);
        }
        Ok(())
    }

    fn data_end(&mut self) -> Result<(), ClientError> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        if let Some(sparse) = &mut open.sparse {
            if let Err(e) = sparse.end(&mut open.file) {
                let e = ClientError::local(format!(
                    "tar stream of {}: sparse member {}: {e}",
                    self.remote,
                    open.local.display()
                ));
                open.new.abandon(&self.partial, &open.dir, &open.name);
                return Err(e);
            }
        }
        let Open {
            file,
            new,
            dir,
            name,
            local,
            size,
            mode,
            mtime,
            owner,
            xattrs,
            ..
        } = open;
        let stats = &mut self.stats.meta;
        let done = file.finish().and_then(|file| {
            // after the data (writing drops a file capability), before the
            // mode (a new owner drops setuid bits, an ACL sets the group
            // bits, the mode then the mask)
            meta::apply_fd(&file, owner, &xattrs, &local, stats);
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
        Ok(())
    }
}

impl Output {
    fn corrupt(&self, what: &str) -> ClientError {
        ClientError::local(format!("tar stream of {}: {what}", self.remote))
    }
    /// A member's path relative to DIR (`None` for the extracted directory
    /// itself). Components are checked when they are used.
    fn member_path(&self, name: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let mut name = name;
        while name.len() > 1 && name.ends_with(b"/") {
            name = &name[..name.len() - 1];
        }
        let strip = match &self.strip {
            Top::File(file) if name == file.as_slice() => return Ok(Some(name.to_vec())),
            Top::File(_) => {
                return Err(self.corrupt(&format!(
                    "member {} is not the extracted file",
                    String::from_utf8_lossy(name)
                )))
            }
            Top::Dir(strip) => strip,
        };
        if strip.is_empty() {
            return Ok(Some(name.to_vec()));
        }
        if name == strip.as_slice() {
            return Ok(None);
        }
        match name.strip_prefix(strip.as_slice()) {
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

    /// A file member (a GNU sparse one when `m.sparse` gives its real
    /// size).
    fn file(&mut self, rel: &[u8], m: Member, owner: Owner) -> Result<(), ClientError> {
        let sparse = m.sparse;
        let (fd, name, local) = self.parent_of(rel)?;
        let (file, new) = NewFile::create(&self.partial, &fd, &name, &local, self.force)?;
        self.open = Some(Open {
            file: SparseFile::new(file),
            sparse: sparse.map(SparseMember::new),
            new,
            dir: fd,
            name,
            local,
            size: sparse.unwrap_or(m.size),
            mode: m.mode,
            mtime: (m.mtime, m.mtime_ns),
            owner,
            xattrs: m.xattrs,
        });
        Ok(())
    }

    fn dir_member(
        &mut self,
        rel: &[u8],
        mode: u32,
        mtime: Mtime,
        owner: Owner,
        mut xattrs: Attrs,
    ) -> Result<(), ClientError> {
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
        let dir = Arc::new(dir);
        let depth = rel.iter().filter(|&&b| b == b'/').count();
        if self.parents.len() == depth && depth < MAX_OPEN_PARENTS {
            self.parents.push((name.to_bytes().to_vec(), dir.clone()));
        }
        // A directory that was there keeps its mode and mtime without
        // --force (as GNU tar's --no-overwrite-dir; a member could otherwise
        // open up or lock the user's ~/.ssh); with --force it gets them
        // once, however often the stream names it.
        if made || (self.force && self.forced_dirs.insert(local.clone())) {
            let bytes: usize = xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
            if self.deferred_xattrs + bytes > MAX_DEFERRED_XATTRS {
                meta::apply_fd(&*dir, None, &xattrs, &local, &mut self.stats.meta);
                xattrs.clear();
            } else {
                self.deferred_xattrs += bytes;
            }
            self.finish.push(FinishDir {
                path: local,
                mode,
                mtime,
                owner,
                xattrs,
            });
        }
        self.stats.dirs += 1;
        Ok(())
    }

    fn symlink(
        &mut self,
        rel: &[u8],
        target: &[u8],
        mtime: Mtime,
        owner: Owner,
        attrs: &Attrs,
    ) -> Result<(), ClientError> {
        let (fd, name, local) = self.parent_of(rel)?;
        if target.is_empty() {
            // symlinkat would say ENOENT, which reads as a local problem
            return Err(self.corrupt(&format!("symlink {} without a target", local.display())));
        }
        let target = CString::new(target).map_err(|_| {
            ClientError::local(format!(
                "symlink {}: target holds a NUL byte",
                local.display()
            ))
        })?;
        place_node(&fd, &name, &local, self.force, |n| {
            symlinkat(&target, &fd, n)
        })?;
        meta::apply_at(&fd, &name, owner, attrs, &local, &mut self.stats.meta);
        set_mtime_at(&fd, &name, mtime).map_err(|e| local_io(&local, e))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, rel: &[u8], target: &[u8]) -> Result<(), ClientError> {
        let Some(target_rel) = self.member_path(target)? else {
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
    use crate::tarframe::tests::{long_member, member, pax_record};
    use crate::tarframe::BLOCK;

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
            Top::Dir(strip.as_bytes().to_vec()),
            "/x".into(),
            false,
            Keep {
                xattrs: true,
                owners: false,
            },
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

    /// A GNU sparse 1.0 member as the agent writes one: pax records (with
    /// `version` as major.minor), the stand-in header, the map, the data.
    fn sparse_member(name: &str, size: u64, regions: &[(u64, &[u8])], version: &str) -> Vec<u8> {
        let (major, minor) = version.split_once('.').expect("version");
        let mut pax = Vec::new();
        for (key, value) in [
            ("GNU.sparse.major", major.to_string()),
            ("GNU.sparse.minor", minor.to_string()),
            ("GNU.sparse.name", name.to_string()),
            ("GNU.sparse.realsize", size.to_string()),
        ] {
            pax.extend(pax_record(key, &value));
        }
        let mut data = format!("{}\n", regions.len());
        for (offset, bytes) in regions {
            data.push_str(&format!("{offset}\n{}\n", bytes.len()));
        }
        let mut data = data.into_bytes();
        data.resize(data.len().div_ceil(BLOCK) * BLOCK, 0);
        for (_, bytes) in regions {
            data.extend_from_slice(bytes);
        }
        let mut m = member("pax", b'x', &pax, "");
        m.extend(member("GNUSparseFile.0/f", b'0', &data, ""));
        m
    }

    #[test]
    fn sparse_members_come_back_with_their_holes() {
        let t = tempfile::tempdir().expect("tmp");
        let size = 10 << 20;
        let mut stream = sparse_member("s", size, &[(4096, b"abc"), (9 << 20, b"xyz")], "1.0");
        stream.extend(member("after", b'0', b"next", ""));
        stream.extend([0u8; 2 * BLOCK]);
        for piece in [1, 500, 4096] {
            let dir = t.path().join(format!("p{piece}"));
            std::fs::create_dir(&dir).expect("mkdir");
            let (stats, _) = unpack(&dir, "", &stream, piece).expect("unpack");
            assert_eq!((stats.files, stats.bytes), (2, size + 4));
            let got = std::fs::read(dir.join("s")).expect("read");
            let mut want = vec![0u8; size as usize];
            want[4096..4099].copy_from_slice(b"abc");
            want[9 << 20..(9 << 20) + 3].copy_from_slice(b"xyz");
            assert!(got == want, "piece {piece}");
            assert_eq!(std::fs::read(dir.join("after")).expect("read"), b"next");
            assert!(!dir.join("GNUSparseFile.0").exists());
        }
        // another sparse version, or a region past the end: errors (the
        // file begun for the latter stays registered as partial: removed)
        for (what, stream) in [
            ("version 0.1", sparse_member("s", size, &[(0, b"a")], "0.1")),
            (
                "past the end",
                sparse_member("s", size, &[(size, b"a")], "1.0"),
            ),
        ] {
            let dir = t.path().join(what);
            std::fs::create_dir(&dir).expect("mkdir");
            let mut stream = stream;
            stream.extend([0u8; 2 * BLOCK]);
            let err = unpack(&dir, "", &stream, 512).err().expect(what);
            assert!(err.to_string().contains("sparse"), "{what}: {err}");
        }
    }

    /// Streams mutated at random (bytes flipped, cut, pasted twice) give an
    /// error or a tree inside the directory, never a panic or a write
    /// outside it: the headers' checksums are fixed up after each mutation
    /// so that the damage reaches the pax records, sparse maps and sizes.
    #[test]
    fn mutated_streams_never_panic_or_leave_the_directory() {
        let mut base = sparse_member("s", 1 << 20, &[(4096, b"abc"), (8192, b"de")], "1.0");
        base.extend(member("d", b'5', b"", ""));
        base.extend(member("d/f", b'0', b"some data", ""));
        base.extend(member("d/l", b'2', b"", "f"));
        base.extend([0u8; 2 * BLOCK]);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        let t = tempfile::tempdir().expect("tmp");
        let (mut whole, mut sparse_errors) = (0, 0);
        for round in 0..300 {
            let mut stream = base.clone();
            for _ in 0..1 + next(4) {
                if stream.is_empty() {
                    break;
                }
                match next(3) {
                    0 => {
                        let at = next(stream.len());
                        stream[at] = next(256) as u8;
                    }
                    1 => stream.truncate(next(stream.len())),
                    _ => {
                        let (a, b) = (next(stream.len()), next(stream.len()));
                        let piece = stream[a.min(b)..a.max(b)].to_vec();
                        let at = next(stream.len());
                        stream.splice(at..at, piece);
                    }
                }
            }
            // fix the checksum of every block that looks like a header
            for block in stream.chunks_mut(BLOCK) {
                if block.len() == BLOCK && &block[257..262] == b"ustar" {
                    block[148..156].copy_from_slice(b"        ");
                    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
                    block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
                }
            }
            let inner = t.path().join(format!("r{round}/in"));
            std::fs::create_dir_all(&inner).expect("mkdir");
            match unpack(&inner, "", &stream, 1 + next(2000)) {
                Ok(_) => whole += 1,
                Err(e) if e.to_string().contains("sparse member") => sparse_errors += 1,
                Err(_) => {}
            }
            let outside: Vec<_> = std::fs::read_dir(inner.parent().expect("parent"))
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(outside, [std::ffi::OsString::from("in")], "round {round}");
        }
        // the damage reached both the parts that work and the sparse maps
        assert!(
            whole > 0 && sparse_errors > 0,
            "{whole} whole, {sparse_errors}"
        );
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
}
