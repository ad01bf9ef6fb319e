//! `extract`: restore a file or a tree into a local directory (walking it
//! with `fs.list`/`fs.stat` and pipelined `fs.read`, several files and the
//! next directories' listings in flight at once), or as a tar/zip archive
//! from an `fs.extract` stream into a file or stdout.
//!
//! Writing into a directory never leaves it: every name from the agent is
//! checked again (no `/`, `.`, `..`, NUL, empty), directories are opened with
//! `O_NOFOLLOW` relative to their parent's descriptor, and files are created
//! with `O_EXCL` (so an existing symlink is never followed). Existing files are
//! kept unless `--force`. Every file still being written is removed on
//! failure or Ctrl-C.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use restore_agent::client::bulk::{self, FileRef};
use restore_agent::client::{ClientError, Session};
use serde_json::{json, Value};

use crate::remote::{list_dir, stat_entry, Entry, FileArgs};
use crate::{Global, Outcome};

#[derive(Args, Debug)]
pub struct ExtractArgs {
    #[command(flatten)]
    file: FileArgs,
    /// `-`: write a tar archive to stdout
    #[arg(value_name = "-")]
    stdout: Option<String>,
    /// Write the file or the directory's contents into DIR (created if missing)
    #[arg(short = 'o', value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Write a tar archive to FILE
    #[arg(long, value_name = "FILE")]
    tar: Option<PathBuf>,
    /// Write a zip archive to FILE
    #[arg(long, value_name = "FILE")]
    zip: Option<PathBuf>,
    /// Compress the tar archive with zstd
    #[arg(long)]
    zstd: bool,
    /// Replace existing files
    #[arg(long)]
    force: bool,
}

/// Files being written right now, all removed if the command fails or is
/// interrupted (with several files in flight, any of them may be partial).
#[derive(Clone, Default)]
struct Partial(Arc<Mutex<HashSet<PathBuf>>>);

impl Partial {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        // A panic while holding the lock leaves a plain set behind: still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `path` was just created and is not complete yet.
    fn add(&self, path: PathBuf) {
        self.lock().insert(path);
    }

    /// `path` is complete (or already removed).
    fn done(&self, path: &Path) {
        self.lock().remove(path);
    }

    /// Removes every file still being written.
    fn remove_all(&self) {
        for path in self.lock().drain() {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub async fn run(
    session: &Session,
    args: ExtractArgs,
    global: &Global,
) -> Result<Outcome, ClientError> {
    let targets = usize::from(args.dir.is_some())
        + usize::from(args.tar.is_some())
        + usize::from(args.zip.is_some())
        + usize::from(args.stdout.is_some());
    if targets != 1 {
        return Err(ClientError::local(
            "extract needs exactly one of -o DIR, --tar FILE, --zip FILE or -",
        ));
    }
    if let Some(s) = &args.stdout {
        if s != "-" {
            return Err(ClientError::local(format!(
                "unexpected argument `{s}` (only `-`, for a tar archive on stdout)"
            )));
        }
    }
    if args.zstd && args.zip.is_some() {
        return Err(ClientError::local("--zstd applies to tar archives only"));
    }
    let _ = global;
    let partial = Partial::default();
    let work = async {
        if let Some(dir) = &args.dir {
            to_dir(session, &args.file.file_ref(), dir, args.force, &partial).await
        } else {
            let (format, dest) = match (&args.tar, &args.zip) {
                (Some(t), _) => ("tar", Some(t.as_path())),
                (_, Some(z)) => ("zip", Some(z.as_path())),
                _ => ("tar", None),
            };
            to_archive(
                session,
                &args.file.file_ref(),
                format,
                args.zstd,
                dest,
                args.force,
                &partial,
            )
            .await
        }
    };
    let result = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            partial.remove_all();
            eprintln!("restore-client: interrupted");
            std::process::exit(130);
        }
    };
    if result.is_err() {
        partial.remove_all();
    }
    result
}

fn progress(total: Option<u64>) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let (bar, template) = match total {
        Some(t) => (
            ProgressBar::new(t),
            "{wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        ),
        None => (
            ProgressBar::no_length(),
            "{spinner} {bytes} {bytes_per_sec} {msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    Some(bar)
}

async fn to_archive(
    session: &Session,
    file: &FileRef,
    format: &str,
    zstd: bool,
    dest: Option<&Path>,
    force: bool,
    partial: &Partial,
) -> Result<Outcome, ClientError> {
    let mut out: Box<dyn Write + Send> = match dest {
        Some(path) => {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true);
            if force {
                opts.create(true).truncate(true);
            } else {
                opts.create_new(true);
            }
            let f = opts.open(path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    ClientError::local(format!(
                        "{} exists (use --force to replace it)",
                        path.display()
                    ))
                } else {
                    ClientError::local(format!("cannot create {}: {e}", path.display()))
                }
            })?;
            partial.add(path.to_path_buf());
            Box::new(io::BufWriter::with_capacity(1 << 20, f))
        }
        None => Box::new(io::BufWriter::with_capacity(1 << 20, io::stdout())),
    };
    let opened: Value = session
        .call(
            "fs.extract",
            file.params_with(json!({ "format": format, "zstd": zstd })),
        )
        .await?;
    let stream = opened
        .get("stream")
        .cloned()
        .ok_or_else(|| ClientError::local("fs.extract: no stream id in the answer"))?;
    let bar = if dest.is_some() { progress(None) } else { None };
    let what = dest
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdout".into());
    let mut sink = |data: &[u8]| {
        if let Some(b) = &bar {
            b.inc(data.len() as u64);
        }
        out.write_all(data)
            .map_err(|e| ClientError::local(format!("writing {what}: {e}")))
    };
    let result = bulk::read_stream(session, &stream, &mut sink).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let bytes = result?;
    out.flush()
        .map_err(|e| ClientError::local(format!("writing {what}: {e}")))?;
    drop(out);
    if let Some(path) = dest {
        partial.done(path);
    }
    let text = match dest {
        Some(p) => format!("wrote {} ({} bytes, {format})", p.display(), bytes),
        None => String::new(),
    };
    let json = match dest {
        Some(p) => json!({ "archive": p, "format": format, "bytes": bytes }),
        None => Value::Null,
    };
    Ok(Outcome::new(json, text))
}

/// Counts for the report.
#[derive(Default)]
struct Stats {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    bytes: u64,
    skipped: Vec<String>,
}

/// Files fetched at once. A tree of small files is bound by round trips, not
/// bandwidth: with many files in flight the agent works on several while the
/// answers of others travel.
const FILES_IN_FLIGHT: usize = 16;
/// Read-ahead all files in flight may hold together (each file asks for at
/// most `READ_DEPTH * READ_CHUNK` at a time); one file is always allowed.
const BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Directory listings asked for ahead of the walk.
const LISTS_AHEAD: usize = 4;

/// What one unit of work in flight came back with.
enum Done {
    /// The listing of the directory with this number.
    Listed(u64, Result<Vec<Value>, ClientError>),
    /// A file was written (bytes) or failed; with the read-ahead it held.
    File(Result<u64, ClientError>, u64),
}

type Work<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

/// A directory whose contents are still to be written.
struct PendingDir {
    id: u64,
    remote: FileRef,
    local: PathBuf,
    asked: bool,
    listing: Option<Vec<Value>>,
}

/// One file to fetch into a file already created (and registered as partial).
struct FileJob {
    dir: Arc<OwnedFd>,
    name: CString,
    local: PathBuf,
    remote: FileRef,
    file: File,
    size: u64,
    mode: u32,
    mtime: i64,
}

struct DirWriter<'a> {
    session: &'a Session,
    force: bool,
    partial: &'a Partial,
    /// First local copy of each multiply-linked inode, for hard links.
    links: HashMap<u64, PathBuf>,
    /// Hard links to make once every file is complete: (directory, name,
    /// local path, first copy).
    link_later: Vec<(PathBuf, CString, PathBuf, PathBuf)>,
    /// Directories to give their mode and mtime at the end (after their
    /// contents, which would change the mtime and may need write permission).
    finish: Vec<(PathBuf, u32, i64)>,
    /// Directories still to walk, a stack: the next one is last (depth
    /// first, the order filesystems tend to lay files out in, so that the
    /// agent's chunk cache keeps hitting).
    dirs: Vec<PendingDir>,
    /// Number for the next directory found.
    next_id: u64,
    /// Listings and file fetches in flight.
    work: FuturesUnordered<Work<'a>>,
    files_in_flight: usize,
    bytes_in_flight: u64,
    stats: Stats,
    bar: Option<ProgressBar>,
}

async fn to_dir(
    session: &Session,
    root: &FileRef,
    dir: &Path,
    force: bool,
    partial: &Partial,
) -> Result<Outcome, ClientError> {
    let root_value = stat_entry(session, root, false).await?;
    let root_entry = Entry::from_value(&root_value)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| ClientError::local(format!("cannot create {}: {e}", dir.display())))?;
    let top = open_dir(dir)
        .map_err(|e| ClientError::local(format!("cannot open {}: {e}", dir.display())))?;
    let mut w = DirWriter {
        session,
        force,
        partial,
        links: HashMap::new(),
        link_later: Vec::new(),
        finish: Vec::new(),
        dirs: Vec::new(),
        next_id: 0,
        work: FuturesUnordered::new(),
        files_in_flight: 0,
        bytes_in_flight: 0,
        stats: Stats::default(),
        bar: progress(if root_entry.kind == "dir" {
            None
        } else {
            Some(root_entry.size)
        }),
    };
    let result = if root_entry.kind == "dir" {
        w.tree(root, dir).await
    } else {
        let name = base_name(&root.path);
        let name = safe_name(&name)?;
        let top = Arc::new(top);
        match w.entry(&top, dir, root, &name, &root_entry).await {
            Ok(_) => w.drain().await,
            Err(e) => Err(e),
        }
    };
    if let Some(b) = &w.bar {
        b.finish_and_clear();
    }
    result?;
    w.make_links()?;
    for (path, mode, mtime) in w.finish.iter().rev() {
        let fd = open_dir(path)
            .map_err(|e| ClientError::local(format!("cannot open {}: {e}", path.display())))?;
        set_mode_fd(&fd, *mode).map_err(|e| local_io(path, e))?;
        set_mtime_fd(&fd, *mtime).map_err(|e| local_io(path, e))?;
    }
    let s = &w.stats;
    let mut outcome = Outcome::new(
        json!({
            "dir": dir,
            "files": s.files,
            "dirs": s.dirs,
            "symlinks": s.symlinks,
            "hardlinks": s.hardlinks,
            "bytes": s.bytes,
            "skipped": s.skipped,
        }),
        format!(
            "extracted {} files, {} directories, {} symlinks, {} hard links ({} bytes) into {}",
            s.files,
            s.dirs,
            s.symlinks,
            s.hardlinks,
            s.bytes,
            dir.display()
        ),
    );
    if !s.skipped.is_empty() {
        eprintln!(
            "restore-client: skipped {} special files (devices, sockets): {}",
            s.skipped.len(),
            s.skipped.join(", ")
        );
        outcome
            .text
            .push_str(&format!(", {} special files skipped", s.skipped.len()));
    }
    Ok(outcome)
}

impl<'a> DirWriter<'a> {
    /// Writes the contents of remote directory `root` into local `dir`,
    /// depth first, listing order; the next directories' listings and up to
    /// `FILES_IN_FLIGHT` files are fetched while the walk goes on.
    async fn tree(&mut self, root: &FileRef, dir: &Path) -> Result<(), ClientError> {
        self.push_dirs(vec![(root.clone(), dir.to_path_buf())]);
        loop {
            self.ask_listings();
            let Some(next) = self.dirs.last_mut() else {
                break;
            };
            let Some(entries) = next.listing.take() else {
                self.wait_one().await?;
                continue;
            };
            let Some(current) = self.dirs.pop() else {
                break;
            };
            let local = current.local;
            let fd = Arc::new(open_dir(&local).map_err(|e| local_io(&local, e))?);
            let mut subdirs = Vec::new();
            for v in entries {
                let e = Entry::from_value(&v)?;
                let raw = e.raw_name()?;
                let name = safe_name(&raw)?;
                let child = current.remote.child(&raw);
                if let Some(sub) = self.entry(&fd, &local, &child, &name, &e).await? {
                    subdirs.push((child, sub));
                }
            }
            self.push_dirs(subdirs);
        }
        self.drain().await
    }

    /// Puts `found` (in listing order) on the stack so that the first is
    /// walked next.
    fn push_dirs(&mut self, found: Vec<(FileRef, PathBuf)>) {
        for (remote, local) in found.into_iter().rev() {
            self.dirs.push(PendingDir {
                id: self.next_id,
                remote,
                local,
                asked: false,
                listing: None,
            });
            self.next_id += 1;
        }
    }

    /// Asks for the listings of the next `LISTS_AHEAD` directories.
    fn ask_listings(&mut self) {
        let session = self.session;
        for d in self.dirs.iter_mut().rev().take(LISTS_AHEAD) {
            if d.asked {
                continue;
            }
            d.asked = true;
            let id = d.id;
            let remote = d.remote.clone();
            self.work.push(Box::pin(async move {
                Done::Listed(id, list_dir(session, &remote).await)
            }));
        }
    }

    /// Waits for one listing or file in flight to finish.
    async fn wait_one(&mut self) -> Result<(), ClientError> {
        match self.work.next().await {
            Some(Done::Listed(id, listing)) => {
                let listing = listing?;
                // A directory leaves the stack only once listed: it is there.
                match self.dirs.iter_mut().rev().find(|d| d.id == id) {
                    Some(d) => d.listing = Some(listing),
                    None => {
                        return Err(ClientError::local("internal: a listing lost its directory"))
                    }
                }
            }
            Some(Done::File(result, held)) => {
                self.files_in_flight -= 1;
                self.bytes_in_flight -= held;
                self.stats.files += 1;
                self.stats.bytes += result?;
            }
            None => {
                return Err(ClientError::local(
                    "internal: waiting with nothing in flight",
                ))
            }
        }
        Ok(())
    }

    /// Waits for every file in flight.
    async fn drain(&mut self) -> Result<(), ClientError> {
        while !self.work.is_empty() {
            self.wait_one().await?;
        }
        Ok(())
    }

    /// Creates one entry `name` in `dir` (open as `fd`); returns the local path
    /// of a directory, whose contents are still to be written. A file's
    /// contents may still be in flight on return.
    async fn entry(
        &mut self,
        fd: &Arc<OwnedFd>,
        dir: &Path,
        remote: &FileRef,
        name: &CStr,
        e: &Entry,
    ) -> Result<Option<PathBuf>, ClientError> {
        let local = dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        match e.kind.as_str() {
            "dir" => {
                match mkdirat(fd, name) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(local_io(&local, err)),
                }
                // Refuses a symlink (or anything else) standing where the
                // directory should be.
                openat_dir(fd, name).map_err(|err| local_io(&local, err))?;
                self.finish.push((local.clone(), e.mode, e.mtime_s()));
                self.stats.dirs += 1;
                Ok(Some(local))
            }
            "file" => {
                if e.nlink > 1 {
                    if let Some(first) = self.links.get(&e.inode) {
                        // The first copy may still be in flight: linked at
                        // the end, so a failed copy never leaves a second name.
                        self.link_later.push((
                            dir.to_path_buf(),
                            name.to_owned(),
                            local,
                            first.clone(),
                        ));
                        return Ok(None);
                    }
                }
                self.file(fd, name, &local, remote, e).await?;
                if e.nlink > 1 {
                    self.links.insert(e.inode, local);
                }
                Ok(None)
            }
            "symlink" => {
                let target = CString::new(e.raw_target()?).map_err(|_| {
                    ClientError::local(format!(
                        "symlink {}: target holds a NUL byte",
                        remote.display()
                    ))
                })?;
                self.replace_if_forced(fd, name, &local)?;
                symlinkat(&target, fd, name).map_err(|err| exists_or(&local, err))?;
                set_mtime_at(fd, name, e.mtime_s()).map_err(|err| local_io(&local, err))?;
                self.stats.symlinks += 1;
                Ok(None)
            }
            "fifo" => {
                self.replace_if_forced(fd, name, &local)?;
                mkfifoat(fd, name, e.mode & 0o7777).map_err(|err| exists_or(&local, err))?;
                set_mtime_at(fd, name, e.mtime_s()).map_err(|err| local_io(&local, err))?;
                Ok(None)
            }
            _ => {
                self.stats.skipped.push(remote.display());
                Ok(None)
            }
        }
    }

    /// With `--force`, removes a non-directory at `name` so it can be created.
    fn replace_if_forced(
        &self,
        fd: &OwnedFd,
        name: &CStr,
        local: &Path,
    ) -> Result<(), ClientError> {
        if !self.force {
            return Ok(());
        }
        match unlinkat(fd, name) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(local_io(local, err)),
        }
    }

    /// Creates file `name` and starts fetching its contents, once there is
    /// room in flight.
    async fn file(
        &mut self,
        fd: &Arc<OwnedFd>,
        name: &CStr,
        local: &Path,
        remote: &FileRef,
        e: &Entry,
    ) -> Result<(), ClientError> {
        let held = e.size.min(bulk::READ_CHUNK * bulk::READ_DEPTH as u64);
        while self.files_in_flight >= FILES_IN_FLIGHT
            || (self.files_in_flight > 0 && self.bytes_in_flight + held > BYTES_IN_FLIGHT)
        {
            self.wait_one().await?;
        }
        self.replace_if_forced(fd, name, local)?;
        let file = create_at(fd, name).map_err(|err| exists_or(local, err))?;
        // No await between creating and registering: Ctrl-C sees every file.
        self.partial.add(local.to_path_buf());
        let job = FileJob {
            dir: fd.clone(),
            name: name.to_owned(),
            local: local.to_path_buf(),
            remote: remote.clone(),
            file,
            size: e.size,
            mode: e.mode,
            mtime: e.mtime_s(),
        };
        let (session, partial, bar) = (self.session, self.partial.clone(), self.bar.clone());
        self.files_in_flight += 1;
        self.bytes_in_flight += held;
        self.work.push(Box::pin(async move {
            Done::File(fetch_file(session, job, &partial, bar).await, held)
        }));
        Ok(())
    }

    /// Makes the hard links whose first copy is now complete.
    fn make_links(&mut self) -> Result<(), ClientError> {
        for (dir, name, local, first) in std::mem::take(&mut self.link_later) {
            let fd = open_dir(&dir).map_err(|err| local_io(&dir, err))?;
            self.replace_if_forced(&fd, &name, &local)?;
            std::fs::hard_link(&first, &local).map_err(|err| exists_or(&local, err))?;
            self.stats.hardlinks += 1;
        }
        Ok(())
    }
}

/// Fetches `job`'s contents into its file, then gives it its mode and mtime;
/// returns the bytes written. On failure the file is removed.
async fn fetch_file(
    session: &Session,
    job: FileJob,
    partial: &Partial,
    bar: Option<ProgressBar>,
) -> Result<u64, ClientError> {
    let FileJob {
        dir,
        name,
        local,
        remote,
        mut file,
        size,
        mode,
        mtime,
    } = job;
    let result = {
        let mut sink = |data: &[u8]| {
            if let Some(b) = &bar {
                b.inc(data.len() as u64);
            }
            file.write_all(data).map_err(|err| local_io(&local, err))
        };
        bulk::read_file(session, &remote, size, &mut sink).await
    };
    let result = result.and_then(|written| {
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
            .and_then(|()| set_mtime_fd(&file, mtime))
            .map_err(|err| local_io(&local, err))?;
        Ok(written)
    });
    drop(file);
    if result.is_err() {
        let _ = unlinkat(&dir, &name);
    }
    partial.done(&local);
    result
}

fn local_io(path: &Path, err: io::Error) -> ClientError {
    ClientError::local(format!("{}: {err}", path.display()))
}

fn exists_or(path: &Path, err: io::Error) -> ClientError {
    if err.kind() == io::ErrorKind::AlreadyExists {
        ClientError::local(format!(
            "{} exists (use --force to replace it)",
            path.display()
        ))
    } else {
        local_io(path, err)
    }
}

/// The last component of a remote path (`/` for the root).
fn base_name(path: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = {
        let mut p = path;
        while p.len() > 1 && p.ends_with(b"/") {
            p = &p[..p.len() - 1];
        }
        p
    };
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(i) => trimmed[i + 1..].to_vec(),
        None => trimmed.to_vec(),
    }
}

/// A name from the agent, checked again before it touches the disk.
fn safe_name(name: &[u8]) -> Result<CString, ClientError> {
    let shown = String::from_utf8_lossy(name);
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(ClientError::local(format!(
            "refusing unsafe name `{shown}` from the agent"
        )));
    }
    CString::new(name)
        .map_err(|_| ClientError::local(format!("refusing name with a NUL byte `{shown}`")))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; the returned fd is owned below.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat_dir(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: valid dir fd and NUL-terminated name.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdirat(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) }).map(drop)
}

fn create_at(dir: &OwnedFd, name: &CStr) -> io::Result<File> {
    // SAFETY: valid dir fd and NUL-terminated name. O_EXCL never follows a
    // symlink at `name`.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    })?;
    // SAFETY: fd was just opened and is not owned elsewhere.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn unlinkat(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

fn symlinkat(target: &CStr, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid NUL-terminated strings and dir fd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

fn mkfifoat(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    cvt(unsafe { libc::mkfifoat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

fn set_mode_fd(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), (mode & 0o7777) as libc::mode_t) }).map(drop)
}

fn times(mtime: i64) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    [ts, ts]
}

fn set_mtime_fd(fd: &impl AsRawFd, mtime: i64) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: valid fd and a two-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(drop)
}

fn set_mtime_at(dir: &OwnedFd, name: &CStr, mtime: i64) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: valid dir fd, NUL-terminated name and a two-element array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_agent_are_checked() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/etc", b"a\0b"] {
            assert!(safe_name(bad).is_err(), "{bad:?}");
        }
        assert!(safe_name(b"...").is_ok());
        assert!(safe_name("é x".as_bytes()).is_ok());
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name(b"/a/b"), b"b");
        assert_eq!(base_name(b"/a/b/"), b"b");
        assert_eq!(base_name(b"b"), b"b");
    }
}
