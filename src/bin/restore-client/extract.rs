//! `extract`: restore a file or a tree into a local directory, or as a
//! tar/zip archive from an `fs.extract` stream into a file or stdout. A single
//! file comes through pipelined `fs.read`; a directory comes as the agent's
//! tar stream (`fs.extract`), unpacked as it arrives by `untar` on a thread of
//! its own: one stream in the agent's walk order instead of a round trip per
//! file.
//!
//! Writing into a directory never leaves it: every name from the agent is
//! checked again (no `/`, `.`, `..`, NUL, empty), directories are opened with
//! `O_NOFOLLOW` relative to their parent's descriptor, and files are created
//! with `O_EXCL` (so an existing symlink is never followed). Existing files are
//! kept unless `--force`. Every file still being written is removed on
//! failure, Ctrl-C or SIGTERM.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, IsTerminal, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::TrySendError;
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use restore_agent::client::bulk::{self, FileRef};
use restore_agent::client::{ClientError, Session};
use serde_json::{json, Value};

use crate::archive_check::ArchiveCheck;
use crate::fmt;
use crate::meta::{self, Attrs, MetaStats, Owner};
use crate::newfile::{place_node, NewFile};
use crate::remote::{data_stdout, stat_entry, Entry, FileArgs};
use crate::sparse::SparseFile;
use crate::untar::{Top, Unpacker};
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
    /// Leave out extended attributes (SELinux labels, file capabilities,
    /// ACLs, user attributes), which are otherwise restored (-o) or
    /// written into the tar archive
    #[arg(long)]
    no_xattrs: bool,
    /// Leave files owned by the user running the command; as root they
    /// otherwise get their owners from the backup (numeric uid and gid),
    /// as with tar
    #[arg(long)]
    no_same_owner: bool,
}

/// Files being written right now, all removed if the command fails or is
/// interrupted. Once removed, no new file can be registered (the unpacker
/// thread may still be running when Ctrl-C removes them).
#[derive(Clone, Default)]
pub(crate) struct Partial(Arc<Mutex<PartialState>>);

#[derive(Default)]
struct PartialState {
    paths: HashSet<PathBuf>,
    closed: bool,
}

impl Partial {
    fn lock(&self) -> std::sync::MutexGuard<'_, PartialState> {
        // A panic while holding the lock leaves a plain set behind: still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates `path` with `create` and registers it, in one step, so that
    /// an interruption never misses it. Only a regular file is registered:
    /// `--tar /dev/null --force` or a FIFO opens what is there, and removing
    /// that would delete a device node or someone's pipe.
    pub(crate) fn create(
        &self,
        path: &Path,
        create: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<File> {
        self.register(path, create, false)
    }

    /// [`create`](Self::create) for a file `create` makes new (with
    /// `O_EXCL`), so a regular file: registered without asking the
    /// filesystem (one system call less for each of a tree's files).
    pub(crate) fn create_new(
        &self,
        path: &Path,
        create: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<File> {
        self.register(path, create, true)
    }

    fn register(
        &self,
        path: &Path,
        create: impl FnOnce() -> io::Result<File>,
        new: bool,
    ) -> io::Result<File> {
        let mut state = self.lock();
        if state.closed {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        let file = create()?;
        if new || file.metadata()?.file_type().is_file() {
            state.paths.insert(path.to_path_buf());
        }
        Ok(file)
    }

    /// `path` is complete (or already removed).
    pub(crate) fn done(&self, path: &Path) {
        self.lock().paths.remove(path);
    }

    /// Removes every file still being written; registers no more.
    fn remove_all(&self) {
        let mut state = self.lock();
        state.closed = true;
        for path in state.paths.drain() {
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
    if args.zstd && (args.zip.is_some() || args.dir.is_some()) {
        return Err(ClientError::local(
            "--zstd applies to tar archives only (--tar FILE or -)",
        ));
    }
    if args.stdout.is_some() && io::stdout().is_terminal() {
        return Err(ClientError::local(
            "refusing to write a tar archive to a terminal (redirect stdout, or use -o DIR)",
        ));
    }
    let _ = global;
    warn_of_volume(session, &args.file).await;
    let partial = Partial::default();
    let work = async {
        if let Some(dir) = &args.dir {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let keep = Keep {
                xattrs: !args.no_xattrs,
                owners: root && !args.no_same_owner,
            };
            to_dir(
                session,
                &args.file.file_ref(),
                dir,
                args.force,
                keep,
                &partial,
            )
            .await
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
                !args.no_xattrs,
                dest,
                args.force,
                &partial,
            )
            .await
        }
    };
    // Ctrl-C, or a SIGTERM (`kill`, `timeout`, a service stopping): the
    // files still being written go, and the exit status says which signal.
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ClientError::local(format!("cannot watch for SIGTERM: {e}")))?;
    let result = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => interrupted(&partial, "interrupted", 130),
        _ = terminate.recv() => interrupted(&partial, "terminated", 143),
    };
    if result.is_err() {
        partial.remove_all();
    }
    result
}

/// Says on stderr what the agent warns of the volume (an XFS log that
/// needs recovery the agent could not do, so that the extraction may not
/// hold the latest changes),
/// before a transfer that could take long. An agent that lists no
/// volumes, or none with a warning, says nothing.
async fn warn_of_volume(session: &Session, file: &FileArgs) {
    let params = json!({ "snapshot": file.snapshot, "archive": file.archive });
    let Ok(v) = session.call::<Value>("volume.list", params).await else {
        return;
    };
    let volumes = v.get("volumes").and_then(Value::as_array);
    let ours = volumes
        .into_iter()
        .flatten()
        .find(|vol| vol.get("volume").and_then(Value::as_str) == Some(file.volume.as_str()));
    if let Some(w) = ours
        .and_then(|vol| vol.get("warning"))
        .and_then(Value::as_str)
    {
        eprintln!(
            "restore-client: warning: volume {}: {}",
            fmt::printable(&file.volume),
            fmt::printable(&fmt::shortened(w, 4096))
        );
    }
}

/// Removes the files still being written and exits with `status` (128 +
/// the signal's number, as a shell reports a process the signal killed).
fn interrupted(partial: &Partial, what: &str, status: i32) -> ! {
    partial.remove_all();
    eprintln!("restore-client: {what}");
    std::process::exit(status);
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

#[allow(clippy::too_many_arguments)]
async fn to_archive(
    session: &Session,
    file: &FileRef,
    format: &str,
    zstd: bool,
    xattrs: bool,
    dest: Option<&Path>,
    force: bool,
    partial: &Partial,
) -> Result<Outcome, ClientError> {
    // With --force, a regular file there (or the one a symlink there names)
    // is replaced only once the new archive is complete.
    let replace = dest.filter(|_| force).and_then(replaced_file);
    let written = replace.as_ref().map(|(temp, _)| temp.as_path()).or(dest);
    let mut out = match written {
        Some(path) => {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true);
            if force && replace.is_none() {
                // a FIFO or a device (`--tar /dev/null`) is written in place
                opts.create(true).truncate(true);
            } else {
                opts.create_new(true);
            }
            let f = partial.create(path, || opts.open(path)).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    ClientError::local(format!(
                        "{} exists (use --force to replace it)",
                        path.display()
                    ))
                } else {
                    ClientError::local(format!("cannot create {}: {e}", path.display()))
                }
            })?;
            io::BufWriter::with_capacity(1 << 20, f)
        }
        None => io::BufWriter::with_capacity(1 << 20, data_stdout()?),
    };
    // A plain tar in a regular file can be cut back to before a member the
    // agent could not read, and go on with the members after it.
    let can_resume = format == "tar"
        && !zstd
        && dest.is_some()
        && out.get_ref().metadata().is_ok_and(|m| m.is_file());
    let bar = if dest.is_some() { progress(None) } else { None };
    let what = dest
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdout".into());
    let remote = file.display();
    let mut check = ArchiveCheck::new(format, zstd, remote.clone())?;
    let mut bytes = 0u64;
    // where in the archive the current stream's bytes began
    let mut stream_start = 0u64;
    let mut resume: Option<String> = None;
    let mut stats = Stats::default();
    let result = loop {
        let mut params = json!({ "format": format, "zstd": zstd });
        if !xattrs {
            params["xattrs"] = false.into();
        }
        let stream = match open_extract(session, file, params, resume.as_deref()).await {
            Ok(stream) => stream,
            Err(e) => break Err(e),
        };
        let mut sink = |data: Vec<u8>| {
            if let Some(b) = &bar {
                b.inc(data.len() as u64);
            }
            check.feed(&data)?;
            bytes += data.len() as u64;
            out.write_all(&data)
                .map_err(|e| write_error(dest, &what, e))
        };
        let read = bulk::read_stream(session, &stream, &mut sink).await;
        let e = match read {
            Ok(_) => break Ok(()),
            Err(e) if !can_resume => break Err(e),
            Err(e) => e,
        };
        let (member, token) = match resumable(e, resume.as_deref(), stats.failed_count as usize) {
            Ok(go_on) => go_on,
            Err(e) => break Err(e),
        };
        // Back to where the failed member began: the archive holds the
        // members before it, whole, and the next stream's follow.
        let at = stream_start + check.tar_whole_members().unwrap_or(0);
        let cut = out.flush().and_then(|()| {
            let f = out.get_mut();
            f.set_len(at)?;
            f.seek(io::SeekFrom::Start(at)).map(|_| ())
        });
        if let Err(e) = cut {
            break Err(write_error(dest, &what, e));
        }
        (bytes, stream_start) = (at, at);
        if let Some(b) = &bar {
            b.set_position(at);
        }
        check = ArchiveCheck::new(format, zstd, remote.clone())?;
        stats.failed(member);
        resume = Some(token);
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result?;
    // The agent said the stream ended: written is only a whole archive.
    check.end(&remote)?;
    out.flush().map_err(|e| write_error(dest, &what, e))?;
    drop(out);
    if let Some((temp, target)) = &replace {
        std::fs::rename(temp, target).map_err(|e| write_error(dest, &what, e))?;
    }
    if let Some(path) = written {
        partial.done(path);
    }
    let mut text = match dest {
        Some(p) => format!(
            "wrote {} ({}, {format})",
            p.display(),
            fmt::count(bytes, "byte", "bytes")
        ),
        None => String::new(),
    };
    let json = match dest {
        Some(p) => json!({
            "archive": p, "format": format, "bytes": bytes,
            "failed": failed_json(&stats), "failed_count": stats.failed_count,
        }),
        None => Value::Null,
    };
    let mut outcome = Outcome::new(json, String::new());
    report_failed(&stats, &mut text, &mut outcome.problems);
    outcome.text = text;
    Ok(outcome)
}

/// The members that could not be read, for `--output json`.
fn failed_json(s: &Stats) -> Vec<Value> {
    s.failed
        .iter()
        .map(|(code, message)| json!({ "code": code, "message": message }))
        .collect()
}

/// Adds the members that could not be read to a report's `text`, and names
/// each as a problem (on stderr, exit status 1: the agent reported errors).
fn report_failed(s: &Stats, text: &mut String, problems: &mut Vec<String>) {
    if s.failed_count == 0 {
        return;
    }
    text.push_str(&format!(
        "; {} could not be read from the backup",
        s.failed_count
    ));
    for (code, message) in &s.failed {
        problems.push(format!("{message} (code {code})"));
    }
    let more = s.failed_count - s.failed.len() as u64;
    if more > 0 {
        problems.push(format!("and {more} more that could not be read"));
    }
}

/// For `--force`: when `dest` is (or a symlink there names) a regular file,
/// a temporary name beside that file and the file's path, to write the new
/// archive under and rename over the file once complete.
fn replaced_file(dest: &Path) -> Option<(PathBuf, PathBuf)> {
    if !std::fs::metadata(dest).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let target = std::fs::canonicalize(dest).ok()?;
    let temp = target.with_file_name(crate::newfile::temp_name());
    Some((temp, target))
}

/// The error for a failed write of the archive to `dest` (stdout if none).
fn write_error(dest: Option<&Path>, what: &str, e: io::Error) -> ClientError {
    match dest {
        Some(_) => ClientError::local(format!("writing {what}: {e}")),
        None => crate::stdout_error(e),
    }
}

/// Counts for the report.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) files: u64,
    pub(crate) dirs: u64,
    pub(crate) symlinks: u64,
    pub(crate) hardlinks: u64,
    pub(crate) fifos: u64,
    pub(crate) bytes: u64,
    /// the first [`SKIPPED_NAMED`] special files skipped, by name
    pub(crate) skipped: Vec<String>,
    /// how many were skipped in all
    pub(crate) skipped_count: u64,
    /// the first [`SKIPPED_NAMED`] members the agent could not read, as
    /// its messages (which name them) with their codes
    pub(crate) failed: Vec<(i32, String)>,
    /// how many could not be read in all
    pub(crate) failed_count: u64,
    /// owners and extended attributes
    pub(crate) meta: MetaStats,
}

/// What `extract -o` gives its files besides modes and mtimes.
#[derive(Clone, Copy)]
pub(crate) struct Keep {
    /// extended attributes
    pub(crate) xattrs: bool,
    /// owners (as root)
    pub(crate) owners: bool,
}

/// Special files skipped that are named in the report (a hostile stream of
/// devices with 1 MiB names made a 200 MB line).
const SKIPPED_NAMED: usize = 100;

impl Stats {
    /// Notes a member the agent could not read.
    pub(crate) fn failed(&mut self, member: FailedMember) {
        self.failed_count += 1;
        if self.failed.len() < SKIPPED_NAMED {
            self.failed.push((member.code, member.message));
        }
    }

    /// Notes a special file skipped.
    pub(crate) fn skip(&mut self, name: String) {
        self.skipped_count += 1;
        if self.skipped.len() < SKIPPED_NAMED {
            self.skipped.push(name);
        }
    }
}

/// Files of this size and more are extracted from a tar stream, where
/// their holes are not sent, instead of through `fs.read`.
const STREAMED_FILE: u64 = 64 << 20;

/// Stream pieces (of up to `READ_CHUNK` bytes) queued for the unpacker.
const PIECES_AHEAD: usize = 4;

async fn to_dir(
    session: &Session,
    root: &FileRef,
    dir: &Path,
    force: bool,
    keep: Keep,
    partial: &Partial,
) -> Result<Outcome, ClientError> {
    let root_value = stat_entry(session, root, false, keep.xattrs).await?;
    let root_entry = Entry::from_value(&root_value)?;
    // The name the agent resolved the path to: what the tar stream's members
    // start with. The path's last component may differ (`/d/.`, `/d/..`, or
    // `/DIR` on FAT, found case-insensitively).
    let top_name = match root_entry.raw_name()? {
        root_dir if root_dir == b"/" => Vec::new(),
        name => name,
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| ClientError::local(format!("cannot create {}: {e}", dir.display())))?;
    let top = open_dir(dir)
        .map_err(|e| ClientError::local(format!("cannot open {}: {e}", dir.display())))?;
    let bar = progress(if root_entry.kind == "dir" {
        None
    } else {
        Some(root_entry.size)
    });
    // A directory, and a large file (whose holes then do not travel: a
    // stream carries them as a sparse member), come as a tar stream; a
    // smaller file through pipelined fs.read.
    let streamed = match root_entry.kind.as_str() {
        "dir" => Some(Top::Dir(top_name.clone())),
        "file" if root_entry.size >= STREAMED_FILE => Some(Top::File(top_name.clone())),
        _ => None,
    };
    let (result, finish) = if let Some(streamed) = streamed {
        unpack_tree(
            session,
            root,
            streamed,
            dir,
            top,
            force,
            keep,
            partial,
            bar.clone(),
        )
        .await
    } else {
        let attrs = meta::of_stat(&root_value)?;
        let owner = keep
            .owners
            .then(|| {
                u32::try_from(root_entry.uid)
                    .ok()
                    .zip(u32::try_from(root_entry.gid).ok())
            })
            .flatten();
        let one = single(
            session,
            root,
            &top_name,
            dir,
            &top,
            &root_entry,
            (owner, &attrs),
            force,
            partial,
            bar.clone(),
        )
        .await;
        (one, Vec::new())
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if result.is_err() {
        // Before the directories get their mtimes: removing the partial
        // file would change its directory's.
        partial.remove_all();
    }
    // After a failure too, as tar does: the directories made so far get
    // their modes and mtimes, not the 0700 they were made with.
    let mut dir_meta = MetaStats::default();
    let finished = finish_dirs(dir, &finish, &mut dir_meta);
    let mut stats = result?;
    finished?;
    stats.meta.merge(dir_meta);
    let s = &stats;
    let mut outcome = Outcome::new(
        json!({
            "dir": dir,
            "files": s.files,
            "dirs": s.dirs,
            "symlinks": s.symlinks,
            "hardlinks": s.hardlinks,
            "fifos": s.fifos,
            "bytes": s.bytes,
            "skipped": s.skipped,
            "skipped_count": s.skipped_count,
            "failed": failed_json(s),
            "failed_count": s.failed_count,
            "xattrs": s.meta.xattrs_set,
            "xattrs_failed": s.meta.xattrs_failed,
            "owners_failed": s.meta.owners_failed,
        }),
        format!(
            "extracted {}, {}, {}, {}{} ({}) into {}",
            fmt::count(s.files, "file", "files"),
            fmt::count(s.dirs, "directory", "directories"),
            fmt::count(s.symlinks, "symlink", "symlinks"),
            fmt::count(s.hardlinks, "hard link", "hard links"),
            match s.fifos {
                0 => String::new(),
                n => format!(", {}", fmt::count(n, "fifo", "fifos")),
            },
            fmt::count(s.bytes, "byte", "bytes"),
            dir.display()
        ),
    );
    if s.skipped_count > 0 {
        let more = match s.skipped_count - s.skipped.len() as u64 {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let names = s.skipped.join(", ");
        eprintln!(
            "restore-client: skipped {} (devices, sockets): {}{more}",
            fmt::count(s.skipped_count, "special file", "special files"),
            crate::fmt::printable(&crate::fmt::shortened(&names, 4096))
        );
        outcome.text.push_str(&format!(
            ", {} skipped",
            fmt::count(s.skipped_count, "special file", "special files")
        ));
    }
    if let Some(w) = s.meta.warning() {
        eprintln!(
            "{}",
            crate::fmt::printable(&crate::fmt::shortened(&w, 4096))
        );
    }
    report_failed(s, &mut outcome.text, &mut outcome.problems);
    Ok(outcome)
}

/// Directories to give their extended attributes, mode and mtime at the
/// end (after their contents, which would change the mtime, may need write
/// permission, and would inherit a default ACL).
pub(crate) type Finish = Vec<FinishDir>;

pub(crate) struct FinishDir {
    pub(crate) path: PathBuf,
    pub(crate) mode: u32,
    pub(crate) mtime: Mtime,
    pub(crate) owner: Owner,
    pub(crate) xattrs: Attrs,
}

/// Gives the directories of `finish` (made under `dir`, in walk order) their
/// extended attributes, modes and mtimes, deepest last made first.
fn finish_dirs(dir: &Path, finish: &Finish, stats: &mut MetaStats) -> Result<(), ClientError> {
    for FinishDir {
        path,
        mode,
        mtime,
        owner,
        xattrs,
    } in finish.iter().rev()
    {
        let fd = open_dir(path)
            .or_else(|e| match (e.raw_os_error(), path.strip_prefix(dir)) {
                // deeper than PATH_MAX: one component at a time from DIR
                (Some(libc::ENAMETOOLONG), Ok(rel)) => open_beneath(dir, rel),
                _ => Err(e),
            })
            .map_err(|e| ClientError::local(format!("cannot open {}: {e}", path.display())))?;
        meta::apply_fd(&fd, *owner, xattrs, path, stats);
        set_mode_fd(&fd, *mode).map_err(|e| local_io(path, e))?;
        set_mtime_fd(&fd, *mtime).map_err(|e| local_io(path, e))?;
    }
    Ok(())
}

/// A directory: the agent walks it and sends it as one tar stream
/// (`fs.extract`), unpacked on a thread of its own while the next pieces
/// travel. One stream instead of a call per file: the agent reads the tree
/// in its own order and no round trip is paid per file.
///
/// A member the agent cannot read (a missing or corrupt chunk, a damaged
/// directory) fails its stream after the members before it; its partial
/// file goes, it is noted in [`Stats::failed`], and a new stream resumes
/// after it, as tar and cp go on past a file they cannot read.
#[allow(clippy::too_many_arguments)]
async fn unpack_tree(
    session: &Session,
    root: &FileRef,
    extracted: Top,
    dir: &Path,
    top: OwnedFd,
    force: bool,
    keep: Keep,
    partial: &Partial,
    bar: Option<ProgressBar>,
) -> (Result<Stats, ClientError>, Finish) {
    let mut unpacker = Unpacker::new(
        dir,
        top,
        extracted,
        root.display(),
        force,
        keep,
        partial.clone(),
        bar,
    );
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(PIECES_AHEAD);
    let spares = session.spare_buffers();
    let worker = std::thread::Builder::new()
        .name("unpack".into())
        .spawn(move || {
            let mut fed = Ok(());
            for piece in rx {
                match piece {
                    Piece::Data(data) => {
                        fed = unpacker.feed(&data);
                        spares.give(data);
                    }
                    Piece::Failed(member) => unpacker.member_failed(member),
                }
                if fed.is_err() {
                    break;
                }
            }
            let (ended, finish) = unpacker.end();
            (fed.and(ended), finish)
        });
    let worker = match worker {
        Ok(worker) => worker,
        Err(e) => {
            let e = ClientError::local(format!("starting the unpacker: {e}"));
            return (Err(e), Vec::new());
        }
    };
    let mut gone = false;
    let mut send = |piece: Piece| {
        let sent = match tx.try_send(piece) {
            Ok(()) => Ok(()),
            // Full: wait, telling the runtime this thread blocks.
            Err(TrySendError::Full(piece)) => {
                tokio::task::block_in_place(|| tx.send(piece)).map_err(|_| ())
            }
            Err(TrySendError::Disconnected(_)) => Err(()),
        };
        sent.map_err(|()| {
            gone = true;
            ClientError::local("the unpacker stopped")
        })
    };
    let mut resume: Option<String> = None;
    let mut failures = 0usize;
    let streamed = loop {
        let mut params = json!({ "format": "tar" });
        if !keep.xattrs {
            params["xattrs"] = false.into();
        }
        let stream = match open_extract(session, root, params, resume.as_deref()).await {
            Ok(stream) => stream,
            Err(e) => break Err(e),
        };
        let read = bulk::read_stream(session, &stream, &mut |data| send(Piece::Data(data))).await;
        match read {
            Err(e) => match resumable(e, resume.as_deref(), failures) {
                Ok((member, token)) => {
                    failures += 1;
                    if let Err(e) = send(Piece::Failed(member)) {
                        break Err(e);
                    }
                    resume = Some(token);
                }
                Err(e) => break Err(e),
            },
            done => break done,
        }
    };
    drop(tx);
    let (unpacked, finish) = worker
        .join()
        .unwrap_or_else(|_| (Err(ClientError::local("the unpacker panicked")), Vec::new()));
    let result = match (streamed, unpacked) {
        (Ok(_), result) => result,
        // The unpacker failed first: its error is the one that matters.
        (Err(_), Err(e)) if gone => Err(e),
        (Err(e), _) => Err(e),
    };
    (result, finish)
}

/// What the unpacker is handed.
enum Piece {
    /// the next bytes of the tar stream
    Data(Vec<u8>),
    /// the stream failed at a member; a new stream follows
    Failed(FailedMember),
}

/// A member the agent could not read.
pub(crate) struct FailedMember {
    pub(crate) code: i32,
    pub(crate) message: String,
}

/// Opens an `fs.extract` stream of `file` with `params` (after the member
/// of `resume`, if given); returns its id.
async fn open_extract(
    session: &Session,
    file: &FileRef,
    mut params: Value,
    resume: Option<&str>,
) -> Result<Value, ClientError> {
    if let Some(token) = resume {
        params["resume"] = token.into();
    }
    let opened: Value = session.call("fs.extract", file.params_with(params)).await?;
    opened
        .get("stream")
        .cloned()
        .ok_or_else(|| ClientError::local("fs.extract: no stream id in the answer"))
}

/// For the error that ended a stream: the member the agent could not read
/// and the token to resume after it, when a new stream can go on (the
/// agent gave a token, not the one it last resumed from, and fewer than
/// [`MAX_FAILED_MEMBERS`] failed); otherwise the error.
fn resumable(
    e: ClientError,
    last: Option<&str>,
    failures: usize,
) -> Result<(FailedMember, String), ClientError> {
    let ClientError::Agent {
        code,
        message,
        data,
    } = e
    else {
        return Err(e);
    };
    let token = data
        .as_ref()
        .and_then(|d| d.get("resume"))
        .and_then(Value::as_str)
        // an empty token names no member (the agent refuses it)
        .filter(|t| !t.is_empty() && t.len() <= MAX_RESUME_TOKEN && Some(*t) != last)
        .filter(|_| failures < MAX_FAILED_MEMBERS)
        .map(str::to_string);
    match token {
        Some(token) => Ok((FailedMember { code, message }, token)),
        None => Err(ClientError::Agent {
            code,
            message,
            data,
        }),
    }
}

/// Members that may fail before an extraction gives up: each costs a new
/// stream, and a volume that damaged is better read some other way.
const MAX_FAILED_MEMBERS: usize = 10_000;
/// Longest `resume` token taken from the agent: it holds a member's path
/// (a walk's paths stay below 1,024 levels of 255-byte names, 350 KB as
/// base64).
const MAX_RESUME_TOKEN: usize = 512 << 10;

/// One file: its contents through pipelined `fs.read`, under its own name.
#[allow(clippy::too_many_arguments)]
async fn single(
    session: &Session,
    root: &FileRef,
    top_name: &[u8],
    dir: &Path,
    top: &OwnedFd,
    e: &Entry,
    (owner, attrs): (Owner, &Attrs),
    force: bool,
    partial: &Partial,
    bar: Option<ProgressBar>,
) -> Result<Stats, ClientError> {
    let name = safe_name(top_name)?;
    let local = dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
    let mut stats = Stats::default();
    match e.kind.as_str() {
        "file" => {}
        "symlink" => {
            let target = CString::new(e.raw_target()?).map_err(|_| {
                ClientError::local(format!(
                    "symlink {}: target holds a NUL byte",
                    root.display()
                ))
            })?;
            place_node(top, &name, &local, force, |n| symlinkat(&target, top, n))?;
            meta::apply_at(top, &name, owner, attrs, &local, &mut stats.meta);
            set_mtime_at(top, &name, e.mtime()).map_err(|err| local_io(&local, err))?;
            stats.symlinks += 1;
            return Ok(stats);
        }
        "fifo" => {
            place_node(top, &name, &local, force, |n| {
                mkfifoat(top, n, e.mode & 0o7777)
            })?;
            meta::apply_at(top, &name, owner, attrs, &local, &mut stats.meta);
            set_mtime_at(top, &name, e.mtime()).map_err(|err| local_io(&local, err))?;
            stats.fifos = 1;
            return Ok(stats);
        }
        _ => {
            stats.skip(root.display());
            return Ok(stats);
        }
    }
    let (file, new) = NewFile::create(partial, top, &name, &local, force)?;
    let mut file = SparseFile::new(file);
    let result = {
        let mut sink = |data: &[u8]| {
            if let Some(b) = &bar {
                b.inc(data.len() as u64);
            }
            file.write(data).map_err(|err| local_io(&local, err))
        };
        bulk::read_file(session, root, e.size, &mut sink).await
    };
    let result = result.and_then(|written| {
        let file = file.finish().map_err(|err| local_io(&local, err))?;
        meta::apply_fd(&file, owner, attrs, &local, &mut stats.meta);
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
            e.mode & 0o7777,
        ))
        .and_then(|()| set_mtime_fd(&file, e.mtime()))
        .map_err(|err| local_io(&local, err))?;
        Ok(written)
    });
    match result {
        Ok(written) => {
            new.commit(partial, top, &name, &local)?;
            stats.files = 1;
            stats.bytes = written;
            Ok(stats)
        }
        Err(e) => {
            new.abandon(partial, top, &name);
            Err(e)
        }
    }
}

/// With `force`, removes a non-directory at `name` so it can be created.
pub(crate) fn replace_if_forced(
    force: bool,
    fd: &OwnedFd,
    name: &CStr,
    local: &Path,
) -> Result<(), ClientError> {
    if !force {
        return Ok(());
    }
    match unlinkat(fd, name) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(local_io(local, err)),
    }
}

pub(crate) fn local_io(path: &Path, err: io::Error) -> ClientError {
    ClientError::local(format!("{}: {err}", path.display()))
}

pub(crate) fn exists_or(path: &Path, err: io::Error) -> ClientError {
    if err.kind() == io::ErrorKind::AlreadyExists {
        ClientError::local(format!(
            "{} exists (use --force to replace it)",
            path.display()
        ))
    } else {
        local_io(path, err)
    }
}

/// A name from the agent, checked again before it touches the disk.
pub(crate) fn safe_name(name: &[u8]) -> Result<CString, ClientError> {
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

pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
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

/// The directory `rel` inside `dir`, opened one component at a time
/// (never following a symlink), for paths too long to open whole.
fn open_beneath(dir: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let mut fd = open_dir(dir)?;
    for component in rel.components() {
        let name = CString::new(component.as_os_str().as_bytes()).map_err(io::Error::other)?;
        fd = openat_dir(&fd, &name)?;
    }
    Ok(fd)
}

pub(crate) fn openat_dir(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
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

pub(crate) fn mkdirat(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) }).map(drop)
}

pub(crate) fn create_at(dir: &OwnedFd, name: &CStr) -> io::Result<File> {
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

pub(crate) fn unlinkat(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

pub(crate) fn symlinkat(target: &CStr, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid NUL-terminated strings and dir fd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub(crate) fn mkfifoat(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid dir fd and NUL-terminated name.
    cvt(unsafe { libc::mkfifoat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn set_mode_fd(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), (mode & 0o7777) as libc::mode_t) }).map(drop)
}

/// A modification time: seconds since the epoch, nanoseconds past them.
pub(crate) type Mtime = (i64, u32);

fn times((secs, nanos): Mtime) -> [libc::timespec; 2] {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: libc::c_long::from(nanos),
    };
    [ts, ts]
}

pub(crate) fn set_mtime_fd(fd: &impl AsRawFd, mtime: Mtime) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: valid fd and a two-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(drop)
}

pub(crate) fn set_mtime_at(dir: &OwnedFd, name: &CStr, mtime: Mtime) -> io::Result<()> {
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
}
