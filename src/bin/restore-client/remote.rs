//! Commands that talk to an agent: `call`, `status`, `stop`, `ping`,
//! `snapshots`, `archives`, `volumes`, `ls`, `stat` and `cat` (`extract`
//! lives in its own module).

use std::collections::HashSet;
use std::io::Write;

use clap::Args;
use restore_agent::client::bulk::{self, FileRef};
use restore_agent::client::{ClientError, Session};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::fmt::{self, Align};
use crate::{Command, Global, Outcome};

/// Error code "not a directory" (fs.list on a file).
const NOT_A_DIRECTORY: i32 = 1002;
/// Entries asked for per `fs.list` call.
const LIST_PAGE: u64 = 10_000;
/// Most entries one `ls` holds (about 600 bytes each): those of one
/// directory, or for `ls -R` those listed and not yet printed (with
/// `--output json`, all of them). An agent that pages on without end, or a
/// tree of a directory in every directory, took the client to 5 GiB.
const MAX_LS_ENTRIES: usize = 1_000_000;
/// Most bytes of entries (as JSON) one `ls` holds: entries padded with
/// 4 MiB names took the client to 10 GB within the count above.
const MAX_LS_BYTES: usize = 128 << 20;
/// Longest cursor taken from the agent (the agent's are short numbers).
const MAX_CURSOR: usize = 4096;
/// Longest path `ls -R` descends to (each entry keeps its path).
const MAX_LS_PATH: usize = 32 << 10;

/// SNAPSHOT ARCHIVE VOLUME PATH, common to the file commands.
#[derive(Args, Debug, Clone)]
pub struct FileArgs {
    /// Snapshot, e.g. vm/100/2026-01-01T00:00:00Z
    pub snapshot: String,
    /// Archive, e.g. drive-scsi0.img.fidx
    pub archive: String,
    /// Volume, e.g. part/1, raw or lvm/VG/LV (see `volumes`)
    pub volume: String,
    /// Absolute path inside the volume (any bytes: names need not be UTF-8)
    pub path: std::ffi::OsString,
}

impl FileArgs {
    pub fn file_ref(&self) -> FileRef {
        FileRef {
            snapshot: self.snapshot.clone(),
            archive: self.archive.clone(),
            volume: self.volume.clone(),
            path: std::os::unix::ffi::OsStrExt::as_bytes(self.path.as_os_str()).to_vec(),
        }
    }
}

/// One directory entry as `fs.list` and `fs.stat` return it.
#[derive(Deserialize, Clone, Debug)]
pub struct Entry {
    pub name: String,
    #[serde(default)]
    pub name_b64: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u64,
    #[serde(default)]
    pub gid: u64,
    #[serde(default)]
    pub mtime: Option<serde_json::Number>,
    #[serde(default)]
    pub mtime_ns: u32,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub target_b64: Option<String>,
    #[serde(default)]
    pub inode: u64,
    #[serde(default)]
    pub nlink: u64,
    /// a device's number
    #[serde(default)]
    pub rdev: Option<Device>,
}

/// A device number as entries give it.
#[derive(Deserialize, Clone, Copy, Debug)]
pub struct Device {
    pub major: u32,
    pub minor: u32,
}

impl Entry {
    pub fn from_value(v: &Value) -> Result<Self, ClientError> {
        // an object only: serde reads a struct from an array too, and the
        // entry is then given a `path` member (which panicked on an array)
        if !v.is_object() {
            return Err(ClientError::local(
                "unexpected entry from the agent: not an object",
            ));
        }
        Entry::deserialize(v)
            .map_err(|e| ClientError::local(format!("unexpected entry from the agent: {e}")))
    }

    /// The name's raw bytes (from `name_b64` when the name is not UTF-8).
    pub fn raw_name(&self) -> Result<Vec<u8>, ClientError> {
        decode_b64_or(&self.name_b64, &self.name)
    }

    /// The symlink target's raw bytes.
    pub fn raw_target(&self) -> Result<Vec<u8>, ClientError> {
        decode_b64_or(&self.target_b64, self.target.as_deref().unwrap_or(""))
    }

    /// Modification time in whole seconds.
    pub fn mtime_s(&self) -> i64 {
        match &self.mtime {
            Some(n) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f.floor() as i64))
                .unwrap_or(0),
            None => 0,
        }
    }

    /// Modification time: seconds, and nanoseconds past them (below 10^9;
    /// more from an agent is no time).
    pub fn mtime(&self) -> (i64, u32) {
        (
            self.mtime_s(),
            Some(self.mtime_ns)
                .filter(|&ns| ns < 1_000_000_000)
                .unwrap_or(0),
        )
    }
}

pub(crate) fn decode_b64_or(b64: &Option<String>, plain: &str) -> Result<Vec<u8>, ClientError> {
    match b64 {
        Some(b) => base64_simd::STANDARD
            .decode_to_vec(b.as_bytes())
            .map_err(|e| ClientError::local(format!("bad base64 name from the agent: {e}"))),
        None => Ok(plain.as_bytes().to_vec()),
    }
}

pub async fn run(
    session: &Session,
    command: Command,
    global: &Global,
) -> Result<Outcome, ClientError> {
    match command {
        Command::Call { method, params } => call(session, &method, params.as_deref()).await,
        Command::Status => {
            let v: Value = session.call("status", ()).await?;
            let mut rows = Vec::new();
            flatten("", &v, &mut rows);
            let text = fmt::table(None, &[Align::Left, Align::Left], &rows);
            Ok(Outcome::new(v, text))
        }
        Command::Ping => {
            let v: Value = session.call("ping", ()).await?;
            let text = fmt::printable(v.as_str().unwrap_or("pong")).into_owned();
            Ok(Outcome::new(v, text))
        }
        Command::Stop => {
            let v: Value = session.call("stop", ()).await?;
            Ok(Outcome::new(v, "agent stopping"))
        }
        Command::Snapshots { namespace } => snapshots(session, namespace).await,
        Command::Archives { snapshot } => archives(session, &snapshot).await,
        Command::Volumes { snapshot, archive } => volumes(session, &snapshot, &archive).await,
        Command::Ls {
            long,
            recursive,
            file,
        } => {
            let json_out = global.output == crate::OutputFormat::Json;
            ls(session, &file.file_ref(), long, recursive, json_out).await
        }
        Command::Stat {
            follow,
            xattrs,
            file,
        } => stat(session, &file.file_ref(), follow, xattrs).await,
        Command::Cat { file } => cat(session, &file.file_ref()).await,
        Command::Blob { snapshot, archive } => blob(session, &snapshot, &archive).await,
        Command::Extract(args) => crate::extract::run(session, args, global).await,
        Command::Store(_)
        | Command::Vm(_)
        | Command::Completions { .. }
        | Command::Manpage { .. } => Err(ClientError::local(
            "internal: a local command reached the agent",
        )),
    }
}

async fn call(
    session: &Session,
    method: &str,
    params: Option<&str>,
) -> Result<Outcome, ClientError> {
    let params = match params {
        None => None,
        Some(text) => {
            let raw: Box<serde_json::value::RawValue> = serde_json::from_str(text)
                .map_err(|e| ClientError::local(format!("PARAMS_JSON is not JSON: {e}")))?;
            if !matches!(raw.get().trim_start().as_bytes().first(), Some(b'{' | b'[')) {
                return Err(ClientError::local(
                    "PARAMS_JSON must be a JSON object or array",
                ));
            }
            Some(raw)
        }
    };
    let raw = session.call_raw(method, params).await?;
    let v: Value = serde_json::from_str(raw.get())
        .map_err(|e| ClientError::local(format!("result of {method}: {e}")))?;
    let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| raw.get().to_string());
    // JSON escapes control characters below 0x20, not the C1 ones (0x9b
    // starts an escape sequence on some terminals) nor the reordering ones
    let text = text
        .lines()
        .map(|line| fmt::printable(line))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Outcome::new(v, text))
}

/// `status` as `key  value` rows, nested sections as `section.key`.
fn flatten(prefix: &str, v: &Value, rows: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        leaf => rows.push(vec![prefix.to_string(), status_value(prefix, leaf)]),
    }
}

/// One `status` value for people: byte counts (`*bytes`, `*capacity`) also
/// as sizes, seconds (`*_s`) with their unit, and none (`null`) as `-`.
fn status_value(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if key.ends_with("bytes") || key.ends_with("capacity") => {
            match n.as_u64() {
                Some(b) if b >= 1024 => format!("{} ({b})", fmt::size(b)),
                _ => n.to_string(),
            }
        }
        Value::Number(n) if key.ends_with("_s") => match n.as_f64() {
            Some(s) if n.is_f64() => format!("{s:.1} s"),
            _ => format!("{n} s"),
        },
        other => other.to_string(),
    }
}

async fn snapshot_list(session: &Session, namespace: Option<String>) -> Result<Value, ClientError> {
    let params = match namespace {
        Some(ns) => json!({ "namespace": ns }),
        None => json!({}),
    };
    session.call("snapshot.list", params).await
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn array_of<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

async fn snapshots(session: &Session, namespace: Option<String>) -> Result<Outcome, ClientError> {
    let v = snapshot_list(session, namespace).await?;
    let rows: Vec<Vec<String>> = array_of(&v, "snapshots")
        .iter()
        .map(|s| {
            let archives = array_of(s, "archives");
            let names: Vec<&str> = archives.iter().map(|a| str_of(a, "name")).collect();
            // saturating: sizes from the agent may add up past u64 (a panic)
            let size = archives
                .iter()
                .fold(0u64, |sum, a| sum.saturating_add(u64_of(a, "size")));
            vec![
                str_of(s, "snapshot").to_string(),
                fmt::size(size),
                names.join(", "),
            ]
        })
        .collect();
    let text = fmt::table(
        Some(&["SNAPSHOT", "SIZE", "ARCHIVES"]),
        &[Align::Left, Align::Right, Align::Left],
        &rows,
    );
    Ok(Outcome::new(v, text))
}

async fn archives(session: &Session, snapshot: &str) -> Result<Outcome, ClientError> {
    let v = snapshot_list(session, None).await?;
    let Some(snap) = array_of(&v, "snapshots")
        .iter()
        .find(|s| str_of(s, "snapshot") == snapshot)
    else {
        return Err(ClientError::Agent {
            code: 1001,
            message: format!("snapshot {snapshot} not found"),
            data: None,
        });
    };
    let archives = array_of(snap, "archives");
    let rows: Vec<Vec<String>> = archives
        .iter()
        .map(|a| {
            vec![
                str_of(a, "name").to_string(),
                str_of(a, "kind").to_string(),
                fmt::size(u64_of(a, "size")),
                str_of(a, "crypt_mode").to_string(),
            ]
        })
        .collect();
    let text = fmt::table(
        Some(&["ARCHIVE", "KIND", "SIZE", "CRYPT"]),
        &[Align::Left, Align::Left, Align::Right, Align::Left],
        &rows,
    );
    Ok(Outcome::new(
        json!({ "snapshot": snapshot, "archives": archives }),
        text,
    ))
}

async fn volumes(session: &Session, snapshot: &str, archive: &str) -> Result<Outcome, ClientError> {
    let v: Value = session
        .call(
            "volume.list",
            json!({ "snapshot": snapshot, "archive": archive }),
        )
        .await?;
    let rows: Vec<Vec<String>> = array_of(&v, "volumes")
        .iter()
        .map(|vol| {
            let opt = |k: &str| str_of(vol, k).to_string();
            let supported = if vol.get("supported").and_then(Value::as_bool) == Some(true) {
                match vol.get("warning").and_then(Value::as_str) {
                    Some(w) => format!("yes, but {w}"),
                    None => "yes".to_string(),
                }
            } else {
                match vol.get("reason").and_then(Value::as_str) {
                    Some(r) => format!("no: {r}"),
                    None => "no".to_string(),
                }
            };
            vec![
                opt("volume"),
                opt("kind"),
                opt("table"),
                fmt::size(u64_of(vol, "start")),
                fmt::size(u64_of(vol, "size")),
                opt("fs"),
                opt("label"),
                supported,
            ]
        })
        .collect();
    let text = fmt::table(
        Some(&[
            "VOLUME",
            "KIND",
            "TABLE",
            "START",
            "SIZE",
            "FS",
            "LABEL",
            "SUPPORTED",
        ]),
        &[
            Align::Left,
            Align::Left,
            Align::Left,
            Align::Right,
            Align::Right,
            Align::Left,
            Align::Left,
            Align::Left,
        ],
        &rows,
    );
    Ok(Outcome::new(v, text))
}

/// Every entry of directory `dir`, following `next_cursor` to the end.
/// How much more `ls` takes: entries and their bytes.
struct Room {
    entries: usize,
    bytes: usize,
}

impl Room {
    /// Takes `list` (entries of `dir`) out of the room; returns their bytes.
    fn take(&mut self, list: &[Value], dir: &FileRef) -> Result<usize, ClientError> {
        let bytes: usize = list.iter().map(|e| e.to_string().len()).sum();
        if list.len() > self.entries || bytes > self.bytes {
            return Err(ClientError::local(format!(
                "listing {}: more than {MAX_LS_ENTRIES} entries or {} MiB of them in \
                 all (list less at once, or extract)",
                dir.display(),
                MAX_LS_BYTES >> 20
            )));
        }
        self.entries -= list.len();
        self.bytes -= bytes;
        Ok(bytes)
    }

    /// Takes back what a [`Listed`] took, once it is printed.
    fn give_back(&mut self, listed: &Listed) {
        self.entries += listed.values.len() + listed.unreadable.len();
        self.bytes += listed.bytes;
    }
}

/// A directory's entries, and their bytes as counted against [`Room`].
struct Listed {
    values: Vec<Value>,
    bytes: usize,
    /// entries the agent could not read (`{"name", "error", ...}`)
    unreadable: Vec<Value>,
}

/// The entries of `dir`, page after page; `room` is how much more the
/// caller takes (it shrinks by what is returned).
async fn list_dir(
    session: &Session,
    dir: &FileRef,
    room: &mut Room,
) -> Result<Listed, ClientError> {
    let mut entries = Vec::new();
    let mut unreadable = Vec::new();
    let mut taken = 0;
    let mut cursor: Option<String> = None;
    // a cursor met again would list the same pages for ever
    let mut seen = HashSet::new();
    loop {
        let mut extra = json!({ "limit": LIST_PAGE });
        if let Some(c) = &cursor {
            extra["cursor"] = c.clone().into();
        }
        let page: Value = session.call("fs.list", dir.params_with(extra)).await?;
        match page.get("entries") {
            Some(Value::Array(list)) => {
                // entries the agent could not read count as entries
                let bad = match page.get("unreadable") {
                    Some(Value::Array(bad)) => bad.as_slice(),
                    _ => &[],
                };
                taken += room.take(list, dir)? + room.take(bad, dir)?;
                // a page that brings nothing but a cursor would page for ever
                let empty = list.is_empty() && bad.is_empty();
                if empty && page.get("next_cursor").is_some_and(Value::is_string) {
                    return Err(ClientError::local(format!(
                        "fs.list of {}: an empty page that is not the last",
                        dir.display()
                    )));
                }
                entries.extend(list.iter().cloned());
                unreadable.extend(bad.iter().cloned());
            }
            _ => {
                return Err(ClientError::local(format!(
                    "fs.list of {}: no entries in the answer",
                    dir.display()
                )))
            }
        }
        match page.get("next_cursor") {
            Some(Value::String(c)) => {
                if c.len() > MAX_CURSOR {
                    return Err(ClientError::local(format!(
                        "fs.list of {}: a cursor of {} bytes",
                        dir.display(),
                        c.len()
                    )));
                }
                if !seen.insert(c.clone()) {
                    return Err(ClientError::local(format!(
                        "fs.list of {}: the agent repeated cursor {}",
                        dir.display(),
                        fmt::printable(c)
                    )));
                }
                cursor = Some(c.clone());
            }
            _ => {
                return Ok(Listed {
                    values: entries,
                    bytes: taken,
                    unreadable,
                })
            }
        }
    }
}

/// `fs.stat` of `file`, a final symlink followed when `follow`, with its
/// extended attributes when `xattrs` (see `meta::of_stat`).
pub async fn stat_entry(
    session: &Session,
    file: &FileRef,
    follow: bool,
    xattrs: bool,
) -> Result<Value, ClientError> {
    let mut params = json!({ "follow": follow });
    if xattrs {
        params["xattrs"] = true.into();
    }
    session.call("fs.stat", file.params_with(params)).await
}

/// An entry's name for people (its exact bytes, non-UTF-8 ones escaped).
fn shown_name(e: &Entry) -> String {
    e.raw_name()
        .map(|n| fmt::printable_bytes(&n))
        .unwrap_or_else(|_| fmt::printable(&e.name).into_owned())
}

/// One `ls -l` line for an entry.
fn long_row(e: &Entry) -> Vec<String> {
    let mut name = shown_name(e);
    if e.kind == "symlink" {
        name.push_str(" -> ");
        match e.raw_target() {
            Ok(t) => name.push_str(&fmt::printable_bytes(&t)),
            Err(_) => name.push_str(&fmt::printable(e.target.as_deref().unwrap_or(""))),
        }
    }
    vec![
        fmt::mode(&e.kind, e.mode),
        e.nlink.to_string(),
        e.uid.to_string(),
        e.gid.to_string(),
        // a device's number where its size would be, as `ls -l` shows it
        match e.rdev {
            Some(d) => format!("{}, {}", d.major, d.minor),
            None => fmt::size(e.size),
        },
        fmt::time(e.mtime_s()),
        name,
    ]
}

const LONG_ALIGN: [Align; 7] = [
    Align::Left,
    Align::Right,
    Align::Right,
    Align::Right,
    Align::Right,
    Align::Left,
    Align::Left,
];

fn listing(entries: &[Entry], long: bool) -> String {
    if long {
        let rows: Vec<Vec<String>> = entries.iter().map(long_row).collect();
        fmt::table(None, &LONG_ALIGN, &rows)
    } else {
        entries
            .iter()
            .map(shown_name)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `ls`: people get each directory's section as soon as it is listed (an
/// `ls -R` of a large tree starts printing at once, and holds only the
/// directories listed but not yet printed); `--output json` gets one
/// document once all are in. A subdirectory the agent cannot list (a
/// damaged one) is named on stderr and the rest of the tree is listed, as
/// ls does; the exit status is then 1.
async fn ls(
    session: &Session,
    root: &FileRef,
    long: bool,
    recursive: bool,
    json_out: bool,
) -> Result<Outcome, ClientError> {
    let mut room = Room {
        entries: MAX_LS_ENTRIES,
        bytes: MAX_LS_BYTES,
    };
    let first = match list_dir(session, root, &mut room).await {
        Ok(entries) => entries,
        Err(ClientError::Agent { code, .. }) if code == NOT_A_DIRECTORY => {
            // Like ls: a file argument lists itself.
            let mut v = stat_entry(session, root, false, false).await?;
            let e = Entry::from_value(&v)?;
            set_path(&mut v, root);
            let text = if long {
                let mut row = long_row(&e);
                row[6] = fmt::printable_bytes(&root.path);
                fmt::table(None, &LONG_ALIGN, &[row])
            } else {
                fmt::printable_bytes(&root.path)
            };
            let mut listed = json!({ "entries": [v] });
            set_path(&mut listed, root);
            return Ok(Outcome::new(listed, text));
        }
        Err(e) => return Err(e),
    };
    let mut all = Vec::new();
    let mut printed_any = false;
    let (mut problems, mut errors) = (Vec::new(), Vec::new());
    // Directories listed and still to print, in `ls -R` order.
    let mut pending = vec![(root.clone(), first)];
    while let Some((dir, listed)) = pending.pop() {
        for bad in &listed.unreadable {
            let name = bad
                .get("name_b64")
                .and_then(Value::as_str)
                .and_then(|b| base64_simd::STANDARD.decode_to_vec(b).ok())
                .or_else(|| {
                    bad.get("name")
                        .and_then(Value::as_str)
                        .map(|n| n.as_bytes().to_vec())
                })
                .unwrap_or_default();
            let child = dir.child(&name);
            let message = bad
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unreadable");
            problems.push(format!(
                "cannot read {}: {message}",
                fmt::printable_bytes(&child.path)
            ));
            let mut error = json!({ "message": message });
            set_path(&mut error, &child);
            errors.push(error);
        }
        let mut entries = Vec::with_capacity(listed.values.len());
        let mut subdirs = Vec::new();
        for v in &listed.values {
            let e = Entry::from_value(v)?;
            // `""`, `.`, `..` or a `/` would name this directory or another
            // one again: `ls -R` listed one directory a million times
            let name = e.raw_name()?;
            crate::extract::safe_name(&name)?;
            let child = dir.child(&name);
            if json_out {
                let mut v = v.clone();
                set_path(&mut v, &child);
                all.push(v);
            }
            if recursive && e.kind == "dir" {
                if child.path.len() > MAX_LS_PATH {
                    return Err(ClientError::local(format!(
                        "ls -R: a path longer than {MAX_LS_PATH} bytes below {}",
                        fmt::printable_bytes(&dir.path)
                    )));
                }
                subdirs.push(child);
            }
            entries.push(e);
        }
        if !json_out {
            let body = listing(&entries, long);
            let section = match (recursive, body.is_empty()) {
                // an empty directory's section is its heading alone
                (true, true) => format!("{}:", fmt::printable_bytes(&dir.path)),
                (true, false) => format!("{}:\n{body}", fmt::printable_bytes(&dir.path)),
                (false, _) => body,
            };
            if !section.is_empty() {
                let gap = if printed_any { "\n" } else { "" };
                crate::write_stdout(format!("{gap}{section}\n").as_bytes());
                printed_any = true;
            }
            // printed: only what is still to print counts
            room.give_back(&listed);
        }
        drop(listed);
        for sub in subdirs.into_iter().rev() {
            match list_dir(session, &sub, &mut room).await {
                Ok(listed) => pending.push((sub, listed)),
                Err(ClientError::Agent { code, message, .. }) => {
                    let shown = fmt::printable_bytes(&sub.path);
                    problems.push(format!("cannot list {shown}: {message} (code {code})"));
                    let mut error = json!({ "code": code, "message": message });
                    set_path(&mut error, &sub);
                    errors.push(error);
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut listed = json!({ "entries": all });
    set_path(&mut listed, root);
    if !errors.is_empty() {
        listed["errors"] = errors.into();
    }
    let mut outcome = Outcome::new(if json_out { listed } else { Value::Null }, "");
    outcome.problems = problems;
    Ok(outcome)
}

/// Sets `path` to the path of `file` (lossy UTF-8), and `path_b64` to its
/// exact bytes when they are not UTF-8, as the agent does for names.
fn set_path(v: &mut Value, file: &FileRef) {
    v["path"] = file.display().into();
    if std::str::from_utf8(&file.path).is_err() {
        use base64::Engine;
        v["path_b64"] = base64::engine::general_purpose::STANDARD
            .encode(&file.path)
            .into();
    }
}

async fn stat(
    session: &Session,
    file: &FileRef,
    follow: bool,
    xattrs: bool,
) -> Result<Outcome, ClientError> {
    let v = stat_entry(session, file, follow, xattrs).await?;
    let e = Entry::from_value(&v)?;
    let mut rows = vec![
        vec!["path".to_string(), fmt::printable_bytes(&file.path)],
        vec!["type".to_string(), e.kind.clone()],
        vec![
            "size".to_string(),
            format!("{} ({})", e.size, fmt::size(e.size)),
        ],
        vec![
            "mode".to_string(),
            format!("{:04o} ({})", e.mode & 0o7777, fmt::mode(&e.kind, e.mode)),
        ],
        vec!["uid".to_string(), e.uid.to_string()],
        vec!["gid".to_string(), e.gid.to_string()],
        vec!["links".to_string(), e.nlink.to_string()],
        vec!["inode".to_string(), e.inode.to_string()],
    ];
    if let Some(d) = e.rdev {
        rows.push(vec![
            "device".to_string(),
            format!("{}, {}", d.major, d.minor),
        ]);
    }
    rows.extend([vec![
        "modified".to_string(),
        format!("{} UTC", fmt::time(e.mtime_s())),
    ]]);
    if let Some(t) = &e.target {
        // its exact bytes, as `ls -l` shows them (the lossy text made `a\nb`
        // and `a<newline>b` look alike)
        let shown = match e.raw_target() {
            Ok(raw) => fmt::printable_bytes(&raw),
            Err(_) => fmt::printable(t).into_owned(),
        };
        rows.push(vec!["target".to_string(), shown]);
    }
    for (name, value) in crate::meta::of_stat(&v)? {
        rows.push(vec![
            "xattr".to_string(),
            format!(
                "{}={}",
                fmt::printable_bytes(&name),
                fmt::xattr_value(&value)
            ),
        ]);
    }
    let text = fmt::table(None, &[Align::Left, Align::Left], &rows);
    let mut v = v;
    set_path(&mut v, file);
    Ok(Outcome::new(v, text))
}

/// Standard output for file data: its file descriptor itself (a duplicate).
/// Rust's `Stdout` is line-buffered, so every write would be searched for
/// its last newline first (a few ms per 100 MiB) and split there.
pub fn data_stdout() -> Result<std::fs::File, ClientError> {
    use std::os::fd::AsFd;
    std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .map_err(|e| ClientError::local(format!("standard output: {e}")))
}

/// `blob`: the decoded blob on stdout, as `cat` writes a file (all of
/// stdout, also with `--output json`).
async fn blob(session: &Session, snapshot: &str, archive: &str) -> Result<Outcome, ClientError> {
    let v: Value = session
        .call(
            "blob.read",
            json!({ "snapshot": snapshot, "archive": archive }),
        )
        .await?;
    let data = base64_simd::STANDARD
        .decode_to_vec(str_of(&v, "data").as_bytes())
        .map_err(|e| ClientError::local(format!("blob.read: bad base64 from the agent: {e}")))?;
    if Some(data.len() as u64) != v.get("size").and_then(Value::as_u64) {
        return Err(ClientError::local(
            "blob.read: the agent's size and data disagree",
        ));
    }
    let mut out = data_stdout()?;
    out.write_all(&data).map_err(crate::stdout_error)?;
    out.flush().map_err(crate::stdout_error)?;
    Ok(Outcome::new(Value::Null, ""))
}

async fn cat(session: &Session, file: &FileRef) -> Result<Outcome, ClientError> {
    let v = stat_entry(session, file, true, false).await?;
    let e = Entry::from_value(&v)?;
    if e.kind == "dir" {
        // Let the agent say it, with its code (1003).
        let params = file.params_with(json!({ "offset": 0, "length": 1 }));
        session.call::<Value>("fs.read", params).await?;
        return Err(ClientError::local(format!(
            "{} is a directory",
            file.display()
        )));
    }
    let mut out = std::io::BufWriter::with_capacity(1 << 20, data_stdout()?);
    let mut sink = |data: &[u8]| out.write_all(data).map_err(crate::stdout_error);
    let bytes = bulk::read_file(session, file, e.size, &mut sink).await?;
    out.flush().map_err(crate::stdout_error)?;
    log::debug!("cat {}: {bytes} bytes", file.display());
    // The file's bytes are all of stdout, also with `--output json` (as for
    // `extract -`): a report after them would corrupt the data.
    Ok(Outcome::new(Value::Null, ""))
}
