//! NTFS backend on the ntfs crate.
//!
//! The crate reads LZNT1-compressed and encrypted data as zero bytes without
//! an error, so every read checks the $DATA attribute's flags and refuses
//! those files (1005); reparse points (symlinks, junctions, dedup) are
//! refused the same way. NTFS has no Unix owners or modes: uid/gid 0, mode
//! 0755 (dirs) / 0644 (files, minus write bits when read-only); inode is the
//! file record number. Metafiles (`$MFT`, ...) are not listed. Names match
//! exactly first, then case-insensitively, as on Windows.
//! Must never write.

use std::collections::HashSet;
use std::io::SeekFrom;
use std::sync::Arc;

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{
    NtfsFileAttributeFlags, NtfsFileNamespace, NtfsIndexAllocation, NtfsIndexRoot,
};
use ntfs::types::Vcn;
use ntfs::{
    Ntfs, NtfsAttributeFlags, NtfsAttributeItem, NtfsAttributeType, NtfsError, NtfsFile,
    NtfsIndexNodeEntries, NtfsReadSeek,
};

use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::{Disk, DiskCursor};
use crate::restore::fs::tree::{Backend, Child};
use crate::restore::fs::{Entry, EntryType};
use crate::restore::probe::{FsKind, Probe};

const ROOT_RECORD: u64 = 5;
/// Records below this are NTFS metafiles.
const FIRST_USER_RECORD: u64 = 24;
/// Seconds between 1601-01-01 and 1970-01-01.
const NT_TO_UNIX: i64 = 11_644_473_600;
/// Most entries read from one directory index.
const MAX_DIR_ENTRIES: usize = 4 << 20;
/// The name of a directory's file name index.
const DIR_INDEX: &str = "$I30";

fn map_err(what: &str, e: NtfsError) -> Error {
    if let NtfsError::Io(io) = &e {
        if let Some(ours) = io.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
            return Error::new(ours.kind, format!("{what}: {}", ours.message));
        }
        return Error::new(ErrorKind::Io, format!("{what}: {e}"));
    }
    Error::corrupt(format!("{what}: corrupt NTFS filesystem: {e}"))
}

fn open_ntfs(cur: &mut DiskCursor) -> Result<Ntfs> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Ntfs::new(cur))) {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(map_err("NTFS filesystem", e)),
        Err(_) => Err(Error::corrupt(
            "NTFS filesystem: the reader failed on the boot sector: corrupt filesystem",
        )),
    }
}

/// Describes the NTFS filesystem on `disk`.
pub fn probe(disk: Arc<dyn Disk>) -> Probe {
    let mut cur = DiskCursor::new(disk);
    let mut probe = Probe {
        fs: Some(FsKind::Ntfs),
        ..Probe::default()
    };
    match open_ntfs(&mut cur) {
        Ok(ntfs) => {
            probe.uuid = Some(format!("{:016X}", ntfs.serial_number()));
            let name = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ntfs.volume_name(&mut cur)
                    .and_then(|r| r.ok())
                    .map(|n| n.name().to_string_lossy())
            }));
            probe.label = name.ok().flatten().filter(|n| !n.is_empty());
        }
        Err(e) => probe.unsupported = Some(e),
    }
    probe
}

fn unix_time(nt: u64) -> i64 {
    (nt / 10_000_000) as i64 - NT_TO_UNIX
}

pub struct NtfsBackend {
    ntfs: Ntfs,
    cur: DiskCursor,
}

impl NtfsBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<NtfsBackend> {
        let mut cur = DiskCursor::new(disk);
        let ntfs = open_ntfs(&mut cur)?;
        Ok(NtfsBackend { ntfs, cur })
    }
}

/// Why the default $DATA of `file` cannot be read correctly, if so.
fn unreadable(
    file: &NtfsFile<'_>,
    cur: &mut DiskCursor,
    attrs: NtfsFileAttributeFlags,
) -> Option<&'static str> {
    if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
        return Some("reparse points (symlinks, junctions, deduplicated files) are not supported");
    }
    if attrs.contains(NtfsFileAttributeFlags::ENCRYPTED) {
        return Some("encrypted NTFS files are not supported");
    }
    if attrs.contains(NtfsFileAttributeFlags::COMPRESSED) {
        return Some("compressed NTFS files are not supported");
    }
    if let Some(Ok(item)) = file.data(cur, "") {
        if let Ok(attr) = item.to_attribute() {
            let f = attr.flags();
            if f.contains(NtfsAttributeFlags::COMPRESSED) {
                return Some("compressed NTFS files are not supported");
            }
            if f.contains(NtfsAttributeFlags::ENCRYPTED) {
                return Some("encrypted NTFS files are not supported");
            }
        }
    }
    None
}

fn entry_of(file: &NtfsFile<'_>, cur: &mut DiskCursor, record: u64, what: &str) -> Result<Entry> {
    let info = file.info().map_err(|e| map_err(what, e))?;
    let dir = file.is_directory();
    let size = if dir {
        0
    } else {
        match file.data(cur, "") {
            Some(Ok(item)) => item
                .to_attribute()
                .map_err(|e| map_err(what, e))?
                .value_length(),
            Some(Err(e)) => return Err(map_err(what, e)),
            None => 0,
        }
    };
    let attrs = info.file_attributes();
    let mut mode = if dir { 0o755 } else { 0o644 };
    if attrs.contains(NtfsFileAttributeFlags::READ_ONLY) {
        mode &= !0o222;
    }
    Ok(Entry {
        name: String::new(),
        name_b64: None,
        kind: if dir { EntryType::Dir } else { EntryType::File },
        size,
        mode,
        uid: 0,
        gid: 0,
        mtime: unix_time(info.modification_time().nt_timestamp()),
        target: None,
        target_b64: None,
        inode: record,
        nlink: u64::from(file.hard_link_count()).max(1),
    })
}

/// The attribute of type `ty` of a directory's file name index, if any.
fn index_attribute<'n, 'f>(
    file: &'f NtfsFile<'n>,
    cur: &mut DiskCursor,
    ty: NtfsAttributeType,
) -> std::result::Result<Option<NtfsAttributeItem<'n, 'f>>, NtfsError> {
    let mut attributes = file.attributes();
    while let Some(item) = attributes.next(cur) {
        let item = item?;
        let attribute = item.to_attribute()?;
        if attribute.ty()? == ty && attribute.name()? == DIR_INDEX {
            return Ok(Some(item));
        }
    }
    Ok(None)
}

/// The names and file record numbers in a directory's index (any order;
/// DOS names and metafiles left out).
///
/// The index is a B-tree: an entry may name a subnode (an index record, by
/// VCN) holding the entries before it. The crate's own iterator descends
/// into every subnode it is given, so a corrupt entry naming its own record
/// made it descend forever inside one call, holding a copy of the record
/// per level until an allocation failed and aborted the agent. Here each
/// record is read at most once, one node at a time.
fn directory_names(
    file: &NtfsFile<'_>,
    cur: &mut DiskCursor,
    what: &str,
) -> Result<Vec<(String, u64)>> {
    let err = |e| map_err(what, e);
    if !file.is_directory() {
        return Err(Error::new(
            ErrorKind::NotADirectory,
            format!("{what}: not a directory"),
        ));
    }
    let root_item = index_attribute(file, cur, NtfsAttributeType::IndexRoot)
        .map_err(err)?
        .ok_or_else(|| Error::corrupt(format!("{what}: corrupt NTFS filesystem: no index root")))?;
    let root_attribute = root_item.to_attribute().map_err(err)?;
    let root = root_attribute
        .resident_structured_value::<NtfsIndexRoot>()
        .map_err(err)?;
    let allocation_item = if root.is_large_index() {
        index_attribute(file, cur, NtfsAttributeType::IndexAllocation).map_err(err)?
    } else {
        None
    };
    let allocation_attribute = match &allocation_item {
        Some(item) => Some(item.to_attribute().map_err(err)?),
        None => None,
    };
    let allocation = match &allocation_attribute {
        Some(a) => Some(
            a.structured_value::<_, NtfsIndexAllocation>(cur)
                .map_err(err)?,
        ),
        None => None,
    };
    let mut walk = IndexWalk {
        what,
        names: Vec::new(),
        pending: Vec::new(),
        seen: HashSet::new(),
        entries: 0,
    };
    walk.node(root.entries().map_err(err)?)?;
    while let Some(vcn) = walk.pending.pop() {
        let Some(allocation) = &allocation else {
            return Err(Error::corrupt(format!(
                "{what}: corrupt NTFS filesystem: a subnode without an index allocation"
            )));
        };
        let record = allocation
            .record_from_vcn(cur, root.index_record_size(), vcn)
            .map_err(err)?;
        walk.node(record.entries().map_err(err)?)?;
    }
    Ok(walk.names)
}

/// The state of reading one directory index.
struct IndexWalk<'w> {
    what: &'w str,
    names: Vec<(String, u64)>,
    /// subnodes named but not read yet
    pending: Vec<Vcn>,
    /// every subnode named so far: a B-tree names each once
    seen: HashSet<i64>,
    /// entries read, named or not
    entries: usize,
}

impl IndexWalk<'_> {
    /// Takes the names of one node's entries and notes its subnodes.
    fn node(&mut self, entries: NtfsIndexNodeEntries<'_, NtfsFileNameIndex>) -> Result<()> {
        let what = self.what;
        for e in entries {
            self.entries += 1;
            if self.entries > MAX_DIR_ENTRIES {
                return Err(Error::corrupt(format!(
                    "{what}: too many directory entries"
                )));
            }
            let e = e.map_err(|e| map_err(what, e))?;
            if let Some(vcn) = e.subnode_vcn() {
                let vcn = vcn.map_err(|e| map_err(what, e))?;
                if !self.seen.insert(vcn.value()) {
                    return Err(Error::corrupt(format!(
                        "{what}: corrupt NTFS filesystem: index record {} is named twice",
                        vcn.value()
                    )));
                }
                self.pending.push(vcn);
            }
            let Some(key) = e.key() else { continue };
            let key = key.map_err(|e| map_err(what, e))?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let record = e.file_reference().file_record_number();
            let name = key.name().to_string_lossy();
            if record < FIRST_USER_RECORD && (name.starts_with('$') || name == ".") {
                continue;
            }
            self.names.push((name, record));
        }
        Ok(())
    }
}

impl Backend for NtfsBackend {
    type Node = u64;

    fn root(&mut self) -> Result<Child<u64>> {
        let what = "NTFS root directory";
        let file = self
            .ntfs
            .file(&mut self.cur, ROOT_RECORD)
            .map_err(|e| map_err(what, e))?;
        let mut entry = entry_of(&file, &mut self.cur, ROOT_RECORD, what)?;
        entry.name = "/".into();
        Ok(Child {
            name: Vec::new(),
            node: ROOT_RECORD,
            entry,
            link: None,
            broken: None,
        })
    }

    fn read_dir(&mut self, dir: &u64, path: &[u8]) -> Result<Vec<Child<u64>>> {
        let what = String::from_utf8_lossy(path).into_owned();
        let cur = &mut self.cur;
        let file = self.ntfs.file(cur, *dir).map_err(|e| map_err(&what, e))?;
        let names = directory_names(&file, cur, &what)?;
        let mut out = Vec::with_capacity(names.len());
        for (name, record) in names {
            let child_what = format!("{what}/{name}");
            let f = self
                .ntfs
                .file(cur, record)
                .map_err(|e| map_err(&child_what, e))?;
            let mut entry = entry_of(&f, cur, record, &child_what)?;
            entry.name = name.clone();
            out.push(Child {
                name: name.into_bytes(),
                node: record,
                entry,
                link: None,
                broken: None,
            });
        }
        Ok(out)
    }

    fn read_at(
        &mut self,
        node: &u64,
        _entry: &Entry,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let what = String::from_utf8_lossy(path).into_owned();
        let cur = &mut self.cur;
        let file = self.ntfs.file(cur, *node).map_err(|e| map_err(&what, e))?;
        let info = file.info().map_err(|e| map_err(&what, e))?;
        if let Some(why) = unreadable(&file, cur, info.file_attributes()) {
            return Err(Error::unsupported(format!("{what}: {why}")));
        }
        let item = match file.data(cur, "") {
            Some(r) => r.map_err(|e| map_err(&what, e))?,
            None => return Ok(0),
        };
        let attr = item.to_attribute().map_err(|e| map_err(&what, e))?;
        let mut value = attr.value(cur).map_err(|e| map_err(&what, e))?;
        if offset >= value.len() {
            return Ok(0);
        }
        value
            .seek(cur, SeekFrom::Start(offset))
            .map_err(|e| map_err(&what, e))?;
        let mut done = 0;
        while done < buf.len() {
            let n = value
                .read(cur, &mut buf[done..])
                .map_err(|e| map_err(&what, e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn case_insensitive(&self) -> bool {
        true
    }

    fn what(&self) -> &str {
        "NTFS filesystem"
    }
}
