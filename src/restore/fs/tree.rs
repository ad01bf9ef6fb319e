//! Path resolution, listing, reading and walking on top of a filesystem
//! backend that only knows directories by node.
//!
//! Owns: the path rules (absolute, `/`-separated bytes; `.` and `..`
//! resolved here and clamped at the volume root; symlinks followed within
//! the volume, at most 40 hops), the listings of directories (sorted, a few
//! kept, each counted against the listing memory of [`budget`]),
//! pagination, hardlink detection in walks, and panic containment around
//! the backend crates. Must never read the disk itself.
//!
//! [`budget`]: crate::restore::fs::budget

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use crate::error::{Error, ErrorKind, Result};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::{
    Entry, EntryType, Extent, FileData, FileMap, Filesystem, Meta, WalkEntry, WalkVisitor, Xattr,
};

/// Most symlinks followed while resolving one path.
pub const MAX_SYMLINK_HOPS: usize = 40;
/// Longest path accepted (bytes).
const MAX_PATH: usize = 64 * 1024;
/// Deepest directory nesting a walk descends into.
const MAX_WALK_DEPTH: usize = 1024;
/// Most nodes one walk visits: a bound for corrupt trees whose directories
/// loop back without inode numbers to notice it (FAT).
const MAX_WALK_NODES: usize = 20_000_000;
/// Bytes of first paths a walk remembers for files with several links;
/// beyond them, further links to new files come out as copies.
const HARDLINK_PATH_BYTES: usize = 8 << 20;
/// What one remembered path costs besides its bytes (map slot, allocation).
const HARDLINK_ENTRY_BYTES: usize = 64;
/// Most directories a walk remembers besides those it is inside: one seen
/// again elsewhere (cross-linked FAT clusters) is an error while it is
/// remembered. Beyond them (4 to 8 MiB of set) only the directories the
/// walk is inside are checked, which is all that a loop needs.
const DIRS_SEEN_MAX: usize = 1 << 18;
/// Largest single read served.
const MAX_READ: usize = 64 * 1024 * 1024;
/// Directory listings kept for repeated lookups and pagination.
const DIR_CACHE: usize = 8;
/// Bytes of listings kept beyond the most recent one (by the estimate
/// below, about 25,000 entries): eight listings of 100,000 entries, over
/// 300 MB, would not fit a 128 MiB VM.
const DIR_CACHE_BYTES: usize = 8 << 20;
/// Most bytes of JSON one `list` page may take (by [`page_bytes`]): a page
/// is answered whole, and 10,000 symlinks with 4 KiB targets that are not
/// UTF-8 (lossy text plus base64) would make one of 120 MB.
const PAGE_BYTES: usize = 1 << 20;
/// What the allocator adds to one heap allocation, rounding included.
const ALLOC_OVERHEAD: usize = 24;

/// The estimated bytes one entry takes while its directory is listed, with
/// a name of `name` bytes and a symlink target of `link` bytes; backends
/// charge it for every child they list (see [`Charge`]). The vector being
/// filled may hold twice as many children as it has.
pub fn child_bytes<N>(name: usize, link: usize) -> usize {
    kept_bytes::<N>(name, link) + std::mem::size_of::<Child<N>>()
}

/// The most JSON bytes an entry of a `list` page takes: at most 320 for
/// its fixed members (numbers at their longest, a device number included),
/// plus its name and symlink target as text.
fn page_bytes(name: &[u8], link: Option<&[u8]>) -> usize {
    320 + json_text_bytes(name) + link.map_or(0, json_text_bytes)
}

/// The most bytes `raw` takes as a JSON string member's value (see
/// `Entry::set_name`): escaped UTF-8, or for other bytes lossy UTF-8 (a
/// replacement character is 3 bytes) plus their base64 in a second member.
fn json_text_bytes(raw: &[u8]) -> usize {
    match std::str::from_utf8(raw) {
        Ok(text) => text
            .bytes()
            .map(|b| match b {
                b'"' | b'\\' => 2,
                0..=0x1F => 6,
                _ => 1,
            })
            .sum(),
        Err(_) => 3 * raw.len() + 4 * raw.len().div_ceil(3) + 16,
    }
}

/// The estimated bytes one entry of a finished listing takes.
fn kept_bytes<N>(name: usize, link: usize) -> usize {
    let target = if link > 0 { link_bytes(link) } else { 0 };
    std::mem::size_of::<Child<N>>() + ALLOC_OVERHEAD + name + target
}

/// The estimated bytes of a symlink target of `len` bytes, for backends
/// that read targets after listing their children.
pub fn link_bytes(len: usize) -> usize {
    ALLOC_OVERHEAD + len
}

/// What identifies a node: (inode scope, inode number), see
/// [`Backend::inode_scope`]; or (0, what [`Backend::dir_identity`] says).
type Identity = (u64, u64);

/// A node in a directory listing. It keeps no [`Entry`]: that one holds
/// its name and target again, as text, and is made only when handed out.
#[derive(Clone)]
pub struct Child<N> {
    /// raw name; empty for the root
    pub name: Vec<u8>,
    pub node: N,
    pub meta: Meta,
    /// raw symlink target, for symlinks
    pub link: Option<Vec<u8>>,
    /// why this node itself (its inode, or a symlink's target) could not
    /// be read, if so: it is listed apart as unreadable, and every use of
    /// it gets this error (an archive member without its target would be
    /// a symlink to nowhere, passed off as the backup's)
    pub damaged: Option<Box<Error>>,
}

/// What a filesystem backend provides; `path` arguments are the canonical
/// absolute path of `node` (no symlinks, no `.`/`..`), for backends that
/// address by path.
pub trait Backend {
    type Node: Clone;
    fn root(&mut self) -> Result<Child<Self::Node>>;
    /// Children of a directory, in any order, without `.` and `..`. Every
    /// child is counted in `charge` ([`child_bytes`]) as it is listed, and
    /// so are the buffers the backend needs meanwhile, so that a huge
    /// directory is refused before it exhausts memory.
    fn read_dir(
        &mut self,
        dir: &Self::Node,
        path: &[u8],
        charge: &mut Charge,
    ) -> Result<Vec<Child<Self::Node>>>;
    /// Reads file data at `offset`; short only at end of file.
    fn read_at(
        &mut self,
        node: &Self::Node,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize>;
    /// Where `[offset, offset + len)` of a file (already clamped at its
    /// size) lies on the volume, or `None` when the backend cannot say.
    fn map_at(
        &mut self,
        _node: &Self::Node,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<Vec<Extent>>> {
        Ok(None)
    }
    /// Which parts of `[offset, offset + len)` of a file hold data and
    /// which are holes (only `Extent::Disk` against `Extent::Zero` counts,
    /// not where), also for data that [`Backend::map_at`] does not map
    /// because it must go through [`Backend::read_at`] to be checked.
    fn layout_at(
        &mut self,
        node: &Self::Node,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<Extent>>> {
        self.map_at(node, offset, len)
    }
    /// What identifies a directory for loop detection, for backends
    /// whose entries carry no inode numbers (FAT); `None` when unknown.
    fn dir_identity(&mut self, _dir: &Self::Node, _path: &[u8]) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Which numbering a node's inode number belongs to, for filesystems
    /// that number the inodes of several trees from the same start
    /// (btrfs subvolumes): two nodes are the same only when both agree.
    /// `None` for a node whose number is shared by nodes that are not the
    /// same (btrfs's placeholders for unlinked subvolumes, all number 2).
    fn inode_scope(&self, _node: &Self::Node) -> Option<u64> {
        Some(0)
    }
    /// The extended attributes of a node as Linux names them (see
    /// [`Xattr`]), collected within the bounds of
    /// [`XattrList`](crate::restore::fs::xattr::XattrList) and sorted by
    /// its `finish`; none by default.
    fn xattrs(&mut self, _node: &Self::Node, _path: &[u8]) -> Result<Vec<Xattr>> {
        Ok(Vec::new())
    }
    /// Names this filesystem in error messages.
    fn what(&self) -> &str;
    /// Whether names in directory `dir` match case-insensitively when no
    /// exact match exists (FAT, NTFS as Windows sees them, ext directories
    /// flagged casefold).
    fn case_insensitive(&mut self, _dir: &Self::Node) -> bool {
        false
    }
}

impl<N> Child<N> {
    /// A node whose own metadata could not be read: listed apart with
    /// `error` and its number `inode`, nothing made up, and every use of it
    /// gets the error.
    pub fn damaged(name: Vec<u8>, node: N, inode: u64, error: Error) -> Child<N> {
        Child {
            name,
            node,
            meta: Meta {
                kind: EntryType::File,
                size: 0,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_ns: 0,
                born: 0,
                inode,
                nlink: 0,
                rdev: None,
            },
            link: None,
            damaged: Some(Box::new(error)),
        }
    }

    /// The entry handed out for this node.
    fn entry(&self) -> Entry {
        let name: &[u8] = if self.name.is_empty() {
            b"/"
        } else {
            &self.name
        };
        let mut e = Entry::new(name, &self.meta, self.link.as_deref());
        e.error = self.damaged.as_ref().map(|d| d.message.clone());
        e
    }
}

/// Runs backend code, turning a panic inside a filesystem crate (they may
/// panic on garbage) into a corrupt-filesystem error.
fn guarded<T>(what: &str, path: &[u8], f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            // name the path the user asked about, once
            let p = String::from_utf8_lossy(path);
            if e.message.starts_with(p.as_ref()) {
                Err(e)
            } else {
                Err(Error::new(e.kind, format!("{p}: {}", e.message)))
            }
        }
        Err(_) => Err(Error::corrupt(format!(
            "{what}: the filesystem reader failed on {}: corrupt filesystem",
            String::from_utf8_lossy(path)
        ))),
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// A resolved path: the chain of nodes from the root.
struct Resolved<N> {
    chain: Vec<Child<N>>,
}

impl<N: Clone> Resolved<N> {
    fn path(&self) -> Vec<u8> {
        if self.chain.len() <= 1 {
            return b"/".to_vec();
        }
        let mut p = Vec::new();
        for c in &self.chain[1..] {
            p.push(b'/');
            p.extend_from_slice(&c.name);
        }
        p
    }
    fn last(&self) -> &Child<N> {
        // the chain always holds the root
        &self.chain[self.chain.len() - 1]
    }
}

/// A [`Filesystem`] made of a [`Backend`].
pub struct Tree<B: Backend> {
    backend: B,
    root: Option<Child<B::Node>>,
    dirs: VecDeque<CachedDir<B::Node>>,
}

/// A resolved regular file, its size, and the bytes a read returns.
type FileRange<N> = (Resolved<N>, u64, u64);

/// The children of one directory, sorted by name, and the memory they are
/// counted for.
struct Listing<N> {
    kids: Vec<Child<N>>,
    charge: Charge,
}

/// A directory listing kept by its canonical path.
type CachedDir<N> = (Vec<u8>, Rc<Listing<N>>);

/// A directory being walked: its listing, the next child to visit, the
/// lengths of its path relative to the walk and of its canonical absolute
/// path (the walk keeps one of each, cut back to these), its depth.
struct WalkFrame<N> {
    kids: Rc<Listing<N>>,
    /// the directory's identity, see [`Tree::dir_identity`]
    identity: Option<Identity>,
    /// `kids` in walk order (see [`walk_key`]), as indices
    order: Vec<usize>,
    /// the place in `order` of the next child to visit
    next: usize,
    rel_len: usize,
    abs_len: usize,
    depth: usize,
}

impl<B: Backend> Tree<B> {
    pub fn new(backend: B) -> Tree<B> {
        Tree {
            backend,
            root: None,
            dirs: VecDeque::new(),
        }
    }

    fn root(&mut self) -> Result<Child<B::Node>> {
        if let Some(r) = &self.root {
            return Ok(r.clone());
        }
        let what = self.backend.what().to_string();
        let backend = &mut self.backend;
        let mut r = guarded(&what, b"/", || backend.root())?;
        r.name = Vec::new();
        self.root = Some(r.clone());
        Ok(r)
    }

    /// The sorted listing of a directory, from the cache if there.
    fn listing(&mut self, dir: &Child<B::Node>, path: &[u8]) -> Result<Rc<Listing<B::Node>>> {
        if let Some(pos) = self.dirs.iter().position(|(p, _)| p == path) {
            if let Some(hit) = self.dirs.remove(pos) {
                let l = hit.1.clone();
                self.dirs.push_front(hit);
                return Ok(l);
            }
        }
        let what = self.backend.what().to_string();
        let (mut kids, mut charge) = loop {
            let mut charge = Charge::new();
            let backend = &mut self.backend;
            match guarded(&what, path, || {
                backend.read_dir(&dir.node, path, &mut charge)
            }) {
                Ok(kids) => break (kids, charge),
                // the memory for listings may be held by the ones kept
                // here: let them go and try once more
                Err(e) if e.kind == ErrorKind::Unsupported && !self.dirs.is_empty() => {
                    self.dirs.clear()
                }
                Err(e) => return Err(e),
            }
        };
        // names no path can reach (and no archive member can carry) are
        // damage, not entries: listing them would make every extraction
        // of their directory fail
        kids.retain(|c| {
            c.name != b"."
                && c.name != b".."
                && !c.name.is_empty()
                && !c.name.contains(&b'/')
                && !c.name.contains(&0)
        });
        kids.sort_by(|a, b| a.name.cmp(&b.name));
        kids.dedup_by(|a, b| a.name == b.name);
        kids.shrink_to_fit();
        let bytes = kids
            .iter()
            .map(|c| kept_bytes::<B::Node>(c.name.len(), c.link.as_ref().map_or(0, Vec::len)))
            .sum();
        // what the backend needed besides the children is gone now
        charge.settle(bytes);
        let l = Rc::new(Listing { kids, charge });
        self.dirs.push_front((path.to_vec(), l.clone()));
        self.dirs.truncate(DIR_CACHE);
        // the newest listing stays however large: it is being paged through
        let mut kept = 0;
        let fits = self.dirs.iter().skip(1).take_while(|(_, l)| {
            kept += l.charge.bytes();
            kept <= DIR_CACHE_BYTES
        });
        let keep = 1 + fits.count();
        self.dirs.truncate(keep);
        Ok(l)
    }

    /// Resolves an absolute path. Intermediate symlinks are always
    /// followed, the final one when `follow`.
    fn resolve(&mut self, path: &[u8], follow: bool) -> Result<Resolved<B::Node>> {
        if path.first() != Some(&b'/') {
            return Err(Error::invalid_path(format!(
                "path {:?} is not absolute",
                show(path)
            )));
        }
        if path.len() > MAX_PATH || path.contains(&0) {
            return Err(Error::invalid_path(format!(
                "path {:?} is too long or holds a NUL byte",
                show(path)
            )));
        }
        let root = self.root()?;
        // the identities of the directories on the chain: a directory
        // that is its own ancestor is a loop (a corrupt FAT), down which a
        // recursive listing would never end
        let mut ids = vec![self.dir_identity(&root, b"/")?];
        let mut chain = vec![root.clone()];
        let mut pending: VecDeque<Vec<u8>> = components(path).collect();
        let mut hops = 0usize;
        while let Some(comp) = pending.pop_front() {
            if comp == b".." {
                if chain.len() > 1 {
                    chain.pop();
                    ids.pop();
                }
                continue;
            }
            let cur = Resolved { chain };
            let dir = cur.last().clone();
            let dir_path = cur.path();
            chain = cur.chain;
            if dir.meta.kind != EntryType::Dir {
                return Err(Error::new(
                    ErrorKind::NotADirectory,
                    format!("{}: not a directory (in {:?})", show(&dir_path), show(path)),
                ));
            }
            let listing = self.listing(&dir, &dir_path)?;
            let kids = &listing.kids;
            let exact = kids.binary_search_by(|c| c.name.as_slice().cmp(&comp)).ok();
            let found = match exact {
                None if self.backend.case_insensitive(&dir.node) => {
                    let want = String::from_utf8_lossy(&comp).to_lowercase();
                    kids.iter()
                        .position(|c| String::from_utf8_lossy(&c.name).to_lowercase() == want)
                }
                found => found,
            };
            let child = match found {
                Some(i) => match &kids[i].damaged {
                    Some(e) => {
                        let mut p = dir_path.clone();
                        if p != b"/" {
                            p.push(b'/');
                        }
                        p.extend_from_slice(&kids[i].name);
                        return Err(damaged_at(e, &p));
                    }
                    None => kids[i].clone(),
                },
                None => {
                    let mut p = dir_path.clone();
                    if p != b"/" {
                        p.push(b'/');
                    } else {
                        p.clear();
                        p.push(b'/');
                    }
                    p.extend_from_slice(&comp);
                    // through a symlink the missing path is not the one
                    // asked for: name both
                    let via = if hops > 0 {
                        format!(" ({} leads there through a symlink)", show(path))
                    } else {
                        String::new()
                    };
                    return Err(Error::not_found(format!(
                        "{}: no such file or directory{via}",
                        show(&p)
                    )));
                }
            };
            if child.meta.kind == EntryType::Symlink && (follow || !pending.is_empty()) {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Error::invalid_path(format!(
                        "{:?}: too many levels of symbolic links (more than {MAX_SYMLINK_HOPS})",
                        show(path)
                    )));
                }
                let target = child.link.clone().unwrap_or_default();
                if target.is_empty() {
                    return Err(Error::not_found(format!(
                        "{:?}: empty symlink target",
                        show(path)
                    )));
                }
                if target.first() == Some(&b'/') {
                    chain.truncate(1);
                    ids.truncate(1);
                }
                for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(c);
                }
                continue;
            }
            let id = if child.meta.kind == EntryType::Dir {
                let mut p = dir_path;
                if p != b"/" {
                    p.push(b'/');
                }
                p.extend_from_slice(&child.name);
                let id = self.dir_identity(&child, &p)?;
                if id.is_some() && ids.contains(&id) {
                    return Err(Error::corrupt(format!("{}: directory loop", show(&p))));
                }
                id
            } else {
                None
            };
            ids.push(id);
            chain.push(child);
        }
        Ok(Resolved { chain })
    }

    /// What identifies directory `dir` (at `path`) for loop detection: its
    /// inode number in its scope, or what the backend knows of it.
    fn dir_identity(&mut self, dir: &Child<B::Node>, path: &[u8]) -> Result<Option<Identity>> {
        if let Some(id) = self.node_identity(dir) {
            return Ok(Some(id));
        }
        let what = self.backend.what().to_string();
        let backend = &mut self.backend;
        guarded(&what, path, || backend.dir_identity(&dir.node, path))
            .map(|id| id.map(|id| (0, id)))
    }

    /// A node's inode number in its scope ([`Backend::inode_scope`]), when
    /// it has one.
    fn node_identity(&self, node: &Child<B::Node>) -> Option<Identity> {
        let scope = self.backend.inode_scope(&node.node)?;
        (node.meta.inode != 0).then_some((scope, node.meta.inode))
    }

    /// The regular file at `path` (symlinks followed), its size and the
    /// bytes a read of `len` at `offset` returns (at most [`MAX_READ`]);
    /// `None` at or past its end.
    fn file_range(
        &mut self,
        path: &[u8],
        offset: u64,
        len: usize,
    ) -> Result<Option<FileRange<B::Node>>> {
        let r = self.resolve(path, true)?;
        let meta = &r.last().meta;
        check_regular(meta, &r.path())?;
        let size = meta.size;
        if offset >= size {
            return Ok(None);
        }
        let want = (len.min(MAX_READ) as u64).min(size - offset);
        Ok(Some((r, size, want)))
    }

    /// A node's extended attributes, sorted by name, each name once.
    fn node_xattrs(&mut self, node: &Child<B::Node>, path: &[u8]) -> Result<Vec<Xattr>> {
        let what = self.backend.what().to_string();
        let backend = &mut self.backend;
        guarded(&what, path, || backend.xattrs(&node.node, path))
    }

    fn read_node(&mut self, r: &Resolved<B::Node>, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let what = self.backend.what().to_string();
        let path = r.path();
        let last = r.last();
        let backend = &mut self.backend;
        guarded(&what, &path, || {
            backend.read_at(&last.node, &path, offset, buf)
        })
    }
}

/// The non-empty, non-`.` components of a path.
fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| c.to_vec())
}

fn check_regular(meta: &Meta, path: &[u8]) -> Result<()> {
    match meta.kind {
        EntryType::File => Ok(()),
        EntryType::Dir => Err(Error::new(
            ErrorKind::IsADirectory,
            format!("{}: is a directory", show(path)),
        )),
        _ => Err(Error::unsupported(format!(
            "{}: not a regular file, it has no data to read",
            show(path)
        ))),
    }
}

impl<B: Backend> Filesystem for Tree<B> {
    fn list(
        &mut self,
        path: &[u8],
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, Option<String>)> {
        let r = self.resolve(path, true)?;
        let dir = r.last().clone();
        let dir_path = r.path();
        if dir.meta.kind != EntryType::Dir {
            return Err(Error::new(
                ErrorKind::NotADirectory,
                format!("{}: not a directory", show(&dir_path)),
            ));
        }
        let listing = self.listing(&dir, &dir_path)?;
        let kids = &listing.kids;
        let start = match cursor {
            None => 0,
            Some(c) => c
                .parse::<usize>()
                .ok()
                .filter(|&i| i <= kids.len())
                .ok_or_else(|| {
                    Error::invalid_path(format!(
                        "invalid list cursor {c:?} for {}",
                        show(&dir_path)
                    ))
                })?,
        };
        // at most `limit` entries and PAGE_BYTES, but never none
        let last = start.saturating_add(limit.max(1)).min(kids.len());
        let mut end = start;
        let mut bytes = 0;
        while let Some(k) = kids.get(end).filter(|_| end < last) {
            bytes += page_bytes(&k.name, k.link.as_deref());
            if end > start && bytes > PAGE_BYTES {
                break;
            }
            end += 1;
        }
        let entries = kids[start..end].iter().map(Child::entry).collect();
        let next = (end < kids.len()).then(|| end.to_string());
        Ok((entries, next))
    }

    fn stat(&mut self, path: &[u8], follow: bool) -> Result<Entry> {
        Ok(self.resolve(path, follow)?.last().entry())
    }

    fn xattrs(&mut self, path: &[u8], follow: bool) -> Result<Vec<Xattr>> {
        let r = self.resolve(path, follow)?;
        self.node_xattrs(r.last(), &r.path())
    }

    fn read(&mut self, path: &[u8], offset: u64, len: usize) -> Result<(Vec<u8>, bool)> {
        let Some((r, size, want)) = self.file_range(path, offset, len)? else {
            return Ok((Vec::new(), true));
        };
        let mut buf = vec![0u8; want as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_node(&r, offset + done as u64, &mut buf[done..])?;
            if n == 0 {
                // `want` stops at the size: the data ends before the
                // file does (a corrupt FAT chain shorter than its size)
                return Err(Error::corrupt(format!(
                    "{}: {}: file data ends at {} of {size} bytes",
                    self.backend.what(),
                    show(&r.path()),
                    offset + done as u64
                )));
            }
            done += n;
        }
        Ok((buf, offset + want >= size))
    }

    fn map(&mut self, path: &[u8], offset: u64, len: usize) -> Result<Option<FileMap>> {
        let Some((r, size, want)) = self.file_range(path, offset, len)? else {
            return Ok(Some(FileMap {
                extents: Vec::new(),
                eof: true,
            }));
        };
        let what = self.backend.what().to_string();
        let canonical = r.path();
        let last = r.last();
        let backend = &mut self.backend;
        let Some(extents) = guarded(&what, &canonical, || {
            backend.map_at(&last.node, offset, want)
        })?
        else {
            return Ok(None);
        };
        let mapped: u64 = extents.iter().map(Extent::bytes).sum();
        if mapped != want {
            return Err(Error::corrupt(format!(
                "{what}: {}: the block map covers {mapped} of {want} bytes",
                show(&canonical)
            )));
        }
        Ok(Some(FileMap {
            extents,
            eof: offset + want >= size,
        }))
    }

    fn walk(
        &mut self,
        path: &[u8],
        after: Option<&[u8]>,
        xattrs: bool,
        visit: &mut WalkVisitor<'_>,
    ) -> Result<()> {
        let r = self.resolve(path, false)?;
        let top = r.last().clone();
        let mut walk = Walk {
            path,
            after: after.map(|a| a.split(|&b| b == b'/').map(<[u8]>::to_vec).collect()),
            xattrs,
            visit,
            hardlinks: HashMap::new(),
            hardlink_bytes: 0,
            dirs_seen: HashSet::new(),
            visited: 0,
        };
        // Directories are walked from frames that share the cached listing:
        // a child is copied only while it is being visited, so a walk holds
        // no more than the listings of the directories it is inside. One
        // path of each kind grows and shrinks with the walk: a path per
        // frame would be quadratic in the depth (1,024 levels of 255-byte
        // names: 256 MiB).
        let mut stack: Vec<WalkFrame<B::Node>> = Vec::new();
        let (mut rel, mut abs) = (top.name.clone(), r.path());
        if let Some(frame) = walk.node(self, &rel, &abs, &top, 0, &[])? {
            stack.push(frame);
        }
        while let Some(frame) = stack.last_mut() {
            let next = frame.order.get(frame.next).copied();
            let Some(child) = next.and_then(|i| frame.kids.kids.get(i)) else {
                stack.pop();
                continue;
            };
            frame.next += 1;
            let child = child.clone();
            rel.truncate(frame.rel_len);
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&child.name);
            abs.truncate(frame.abs_len);
            if abs != b"/" {
                abs.push(b'/');
            }
            abs.extend_from_slice(&child.name);
            let depth = frame.depth + 1;
            if let Some(frame) = walk.node(self, &rel, &abs, &child, depth, &stack)? {
                stack.push(frame);
            }
        }
        Ok(())
    }
}

/// The state of one [`Filesystem::walk`].
struct Walk<'p, 'v, 'w> {
    /// the walked path, for error messages
    path: &'p [u8],
    /// the components of the node a resumed walk goes on after, until a
    /// node past it is met
    after: Option<Vec<Vec<u8>>>,
    /// whether nodes come with their extended attributes
    xattrs: bool,
    visit: &'v mut WalkVisitor<'w>,
    /// identity of a file with several links -> where it was first met
    hardlinks: HashMap<Identity, Vec<u8>>,
    /// bytes of the paths in `hardlinks`, at most [`HARDLINK_PATH_BYTES`]
    hardlink_bytes: usize,
    /// identities of the directories met, the first [`DIRS_SEEN_MAX`]
    dirs_seen: HashSet<Identity>,
    visited: usize,
}

impl Walk<'_, '_, '_> {
    /// Visits one node (the walked one has an empty `rel` when it is the
    /// root, and is not visited then); for a directory, returns the frame
    /// that walks its children.
    fn node<B: Backend>(
        &mut self,
        tree: &mut Tree<B>,
        rel: &[u8],
        abs: &[u8],
        node: &Child<B::Node>,
        depth: usize,
        inside: &[WalkFrame<B::Node>],
    ) -> Result<Option<WalkFrame<B::Node>>> {
        let emit = match &self.after {
            None => true,
            Some(after) => match resumed_place(rel, node, inside.last().map(|f| &*f.kids), after) {
                Place::Before => return Ok(None),
                Place::Above => false,
                Place::Past => {
                    self.after = None;
                    true
                }
            },
        };
        if let Some(e) = &node.damaged {
            return Err(damaged_at(e, abs).at_member(rel));
        }
        self.visited += 1;
        if self.visited > MAX_WALK_NODES {
            return Err(Error::corrupt(format!(
                "{}: more than {MAX_WALK_NODES} entries, directories probably loop",
                show(self.path)
            )));
        }
        let is_dir = node.meta.kind == EntryType::Dir;
        let mut hardlink_to = None;
        let identity = tree
            .node_identity(node)
            .filter(|_| !is_dir && node.meta.nlink > 1);
        if let Some(identity) = identity {
            let cost = rel.len() + HARDLINK_ENTRY_BYTES;
            match self.hardlinks.get(&identity) {
                Some(first) => hardlink_to = Some(first.clone()),
                // past the bound, further links come out as copies
                None if self.hardlink_bytes + cost <= HARDLINK_PATH_BYTES => {
                    self.hardlink_bytes += cost;
                    self.hardlinks.insert(identity, rel.to_vec());
                }
                None => {}
            }
        }
        if emit && !rel.is_empty() {
            let xattrs = match self.xattrs {
                true => tree.node_xattrs(node, abs).map_err(|e| e.at_member(rel))?,
                false => Vec::new(),
            };
            let we = WalkEntry {
                path: rel.to_vec(),
                entry: node.entry(),
                link_target: node.link.clone(),
                hardlink_to,
                xattrs,
            };
            // Hardlinks get their data too: formats without hardlinks
            // (zip) store the file again.
            if node.meta.kind == EntryType::File {
                let r = Resolved {
                    chain: vec![node.clone()],
                };
                let mut data = WalkData {
                    tree: &mut *tree,
                    node: &r,
                    abs,
                    pos: 0,
                    size: node.meta.size,
                };
                (self.visit)(&we, Some(&mut data))?;
            } else {
                (self.visit)(&we, None)?;
            }
        }
        if !is_dir {
            return Ok(None);
        }
        // What fails from here on fails this directory: the walk can go
        // on after it.
        let at = |e: Error| e.at_member(rel);
        if depth >= MAX_WALK_DEPTH {
            return Err(at(Error::corrupt(format!(
                "{}: directories nested too deep",
                show(abs)
            ))));
        }
        let identity = tree.dir_identity(node, abs).map_err(at)?;
        if let Some(id) = identity {
            if self.dirs_seen.contains(&id) || inside.iter().any(|f| f.identity == Some(id)) {
                return Err(at(Error::corrupt(format!("{}: directory loop", show(abs)))));
            }
            if self.dirs_seen.len() < DIRS_SEEN_MAX {
                self.dirs_seen.insert(id);
            }
        }
        let kids = tree.listing(node, abs).map_err(at)?;
        // the same key a resumed walk places nodes by (`resumed_place`)
        let mut order: Vec<usize> = (0..kids.kids.len()).collect();
        order.sort_by_key(|&i| kids.kids.get(i).map(walk_key));
        Ok(Some(WalkFrame {
            kids,
            identity,
            order,
            next: 0,
            rel_len: rel.len(),
            abs_len: abs.len(),
            depth,
        }))
    }
}

/// The error of a damaged node, naming its path.
fn damaged_at(e: &Error, path: &[u8]) -> Error {
    Error::new(e.kind, format!("{}: {}", show(path), e.message))
}

/// Where a node lies against the one a resumed walk goes on after.
#[derive(Debug, PartialEq)]
enum Place {
    /// before it in the walk, or it or inside it: left out
    Before,
    /// a directory holding it: walked into, not visited again
    Above,
    /// after it and its subtree: visited, as is everything after
    Past,
}

/// The order of siblings in a walk: by creation time, inode number, then
/// name (names alone where the filesystem has neither, FAT). Filesystems
/// mostly place data in the order it is written, and most files are
/// written once, when made: in name order, the directories of a tree that a
/// running system wrote send the reads back and forth across the volume,
/// and one of 1.5 GB decoded each of its chunks four times over.
fn walk_key<N>(c: &Child<N>) -> (u64, u64, &[u8]) {
    (c.meta.born, c.meta.inode, &c.name)
}

/// Where node `rel` (a child of `parent`, the listing of the directory it
/// is in, if any) lies against `after` (its components) in the walk's
/// order: pre-order, siblings by [`walk_key`]. The walk only comes to a
/// node whose parents are `after`'s, so only its last component is placed
/// by key; `after`'s is found in the same listing (gone from it: the walk
/// goes on from here).
fn resumed_place<N>(
    rel: &[u8],
    node: &Child<N>,
    parent: Option<&Listing<N>>,
    after: &[Vec<u8>],
) -> Place {
    if rel.is_empty() {
        // the root of the volume, never visited
        return Place::Above;
    }
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let last = parts.len() - 1;
    for (i, r) in parts.iter().enumerate() {
        let Some(a) = after.get(i) else {
            // inside the node the walk goes on after
            return Place::Before;
        };
        let ord = match parent.filter(|_| i == last) {
            Some(listing) => {
                let theirs = listing
                    .kids
                    .binary_search_by(|c| c.name.as_slice().cmp(a))
                    .ok()
                    .and_then(|j| listing.kids.get(j));
                match theirs {
                    Some(t) => walk_key(node).cmp(&walk_key(t)),
                    None => std::cmp::Ordering::Greater,
                }
            }
            None => r.cmp(&a.as_slice()),
        };
        match ord {
            std::cmp::Ordering::Less => return Place::Before,
            std::cmp::Ordering::Greater => return Place::Past,
            std::cmp::Ordering::Equal => {}
        }
    }
    if parts.len() == after.len() {
        // the node itself
        Place::Before
    } else {
        Place::Above
    }
}

/// A file's data during a walk.
struct WalkData<'t, B: Backend> {
    tree: &'t mut Tree<B>,
    node: &'t Resolved<B::Node>,
    abs: &'t [u8],
    pos: u64,
    size: u64,
}

impl<B: Backend> FileData for WalkData<'_, B> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size - self.pos) as usize;
        let what = self.tree.backend.what().to_string();
        let last = self.node.last();
        let backend = &mut self.tree.backend;
        let (pos, abs) = (self.pos, self.abs);
        let n = guarded(&what, abs, || {
            backend.read_at(&last.node, abs, pos, &mut buf[..want])
        })?;
        if n == 0 {
            return Err(Error::corrupt(format!(
                "{}: file data ends at {} of {} bytes",
                show(abs),
                self.pos,
                self.size
            )));
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn data_regions(&mut self, min_holes: u64, max: usize) -> Result<Option<Vec<(u64, u64)>>> {
        let what = self.tree.backend.what().to_string();
        let last = self.node.last();
        let backend = &mut self.tree.backend;
        let mut regions: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        // A window at a time: a fragmented file's whole map at once could
        // take more memory than the holes save.
        while pos < self.size {
            let len = MAP_WINDOW.min(self.size - pos);
            let Some(extents) =
                guarded(&what, self.abs, || backend.layout_at(&last.node, pos, len))?
            else {
                return Ok(None);
            };
            let before = pos;
            for extent in extents {
                match extent {
                    Extent::Disk { len, .. } => match regions.last_mut() {
                        Some((start, n)) if *start + *n == pos => *n += len,
                        _ => regions.push((pos, len)),
                    },
                    Extent::Zero { .. } => {}
                }
                pos += extent.bytes();
            }
            if pos == before {
                // a map that covers nothing would be asked again for ever
                return Err(Error::corrupt(format!(
                    "{}: the block map ends at {pos} of {} bytes",
                    show(self.abs),
                    self.size
                )));
            }
            if regions.len() > max {
                return Ok(None);
            }
        }
        if pos != self.size {
            return Err(Error::corrupt(format!(
                "{}: the block map covers {pos} of {} bytes",
                show(self.abs),
                self.size
            )));
        }
        let data: u64 = regions.iter().map(|r| r.1).sum();
        Ok((self.size - data >= min_holes).then_some(regions))
    }

    fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }
}

/// Bytes of a file mapped at a time when looking for its holes.
const MAP_WINDOW: u64 = 256 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::fs::Device;

    /// The estimate bounds the real JSON, however the name and target are
    /// made, with every number at its longest.
    #[test]
    fn page_bytes_bound_the_json_of_an_entry() {
        let meta = Meta {
            kind: EntryType::Symlink,
            size: u64::MAX,
            mode: u32::MAX,
            uid: u32::MAX,
            gid: u32::MAX,
            mtime: i64::MIN,
            mtime_ns: u32::MAX,
            born: u64::MAX,
            inode: u64::MAX,
            nlink: u64::MAX,
            rdev: Some(Device {
                major: u32::MAX,
                minor: u32::MAX,
            }),
        };
        let texts: [&[u8]; 6] = [
            b"",
            b"plain-name.txt",
            b"\"quoted\\back\"",
            b"\x01\x02\n\t\x1f",
            b"\xff\xfe not UTF-8 \x80",
            "Grüße, 日本".as_bytes(),
        ];
        for name in texts {
            for link in texts {
                let e = Entry::new(name, &meta, Some(link));
                let json = serde_json::to_vec(&e).unwrap();
                let bound = page_bytes(name, Some(link));
                assert!(json.len() <= bound, "{} > {bound}: {e:?}", json.len());
            }
        }
    }
}
