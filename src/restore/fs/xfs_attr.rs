//! XFS extended attributes: an inode's attribute fork in each of its forms
//! (short form in the inode; a single leaf block; a dabtree of node and
//! leaf blocks), values stored in the leaves and remote ones in blocks of
//! their own, and POSIX ACLs, which XFS keeps as the `trusted`-namespace
//! `SGI_ACL_FILE` and `SGI_ACL_DEFAULT` in a form of its own.
//!
//! On disk (XFS's `xfs_da_format.h`; integers big-endian): the short form
//! is a header (total size, count, padding) then entries of name length,
//! value length, flags, name, value. Block forms address blocks of the fork
//! by number ("dablk"); block 0 is a leaf (`0xfbee`, v5 `0x3bee`) or a node
//! (`0xfebe`, v5 `0x3ebe`) of 8-byte entries of hash and child block. A
//! leaf's 8-byte entries (hash, name offset, flags) point at a local name
//! and value (value length, name length, name, value) or a remote one
//! (value block, value length, name length, name). Flags give the
//! namespace (none `user.`, 2 `trusted.`, 4 `security.`), and mark
//! half-written attributes (0x80) and parent pointers (8), neither of which
//! a listing shows. v5 blocks carry a CRC32c, their own disk address and
//! their owner; each block of a v5 remote value begins with a 56-byte
//! header (`XARM`) saying which bytes of the value it holds.
//!
//! Owns: decoding the attribute fork into an [`XattrList`]. Must never read
//! the disk itself (the caller maps and reads the fork's blocks, checked
//! against the filesystem), never allocate for a value before the list has
//! accepted its length, never visit more than [`MAX_BLOCKS`] blocks or one
//! block twice, and never show a value whose block fails its checks.

use std::collections::HashSet;
use std::fmt::Display;

use crate::error::{Error, Result};
use crate::le::{be16, be32, be64};
use crate::restore::acl;
use crate::restore::fs::xattr::{acl_from_xfs, XattrList};
use crate::restore::fs::xfs::crc_ok;

const ATTR_LOCAL: u8 = 0x1;
const ATTR_ROOT: u8 = 0x2;
const ATTR_SECURE: u8 = 0x4;
/// Parent pointers (`parent` feature): directory metadata, not xattrs.
const ATTR_PARENT: u8 = 0x8;
/// Set while an attribute is being made or removed.
const ATTR_INCOMPLETE: u8 = 0x80;
const LEAF_MAGIC: u16 = 0xfbee;
const LEAF3_MAGIC: u16 = 0x3bee;
const NODE_MAGIC: u16 = 0xfebe;
const NODE3_MAGIC: u16 = 0x3ebe;
const RMT_MAGIC: &[u8] = b"XARM";
/// A v5 remote value block's header.
const RMT_HEADER: usize = 56;
/// Where a v5 dabtree block keeps its CRC.
const DA3_CRC: usize = 12;
/// Deepest dabtree XFS builds (`XFS_DA_NODE_MAXDEPTH`).
const MAX_LEVEL: u16 = 5;
/// Most leaf and node blocks one inode's attributes may span: far more
/// than the bytes [`XattrList`] accepts can fill.
pub(super) const MAX_BLOCKS: usize = 1 << 14;

/// Reads block `dablk` of the attribute fork: its bytes (one filesystem
/// block) and its disk address in 512-byte sectors, or `None` in a hole.
pub(super) type ReadBlock<'r> = dyn FnMut(u64) -> Result<Option<(Vec<u8>, u64)>> + 'r;

/// The attribute fork of one inode, as much of the filesystem as its
/// decoding needs.
pub(super) struct Fork<'a> {
    /// names the filesystem in errors
    pub what: &'a str,
    pub inode: u64,
    pub v5: bool,
    /// filesystem (and attribute) block size in bytes
    pub block: u64,
}

impl Fork<'_> {
    fn bad(&self, why: impl Display) -> Error {
        Error::corrupt(format!(
            "{}: corrupt: inode {}: its extended attributes {why}",
            self.what, self.inode
        ))
    }

    /// The attributes of a short-form fork (`f`: the fork's bytes).
    pub(super) fn shortform(&self, f: &[u8], list: &mut XattrList) -> Result<()> {
        let total = usize::from(be16(f, 0));
        let count = f.get(2).copied().unwrap_or(0);
        let f = f
            .get(..total)
            .filter(|_| total >= 4)
            .ok_or_else(|| self.bad("have a short form of a bad size"))?;
        let mut pos = 4;
        for _ in 0..count {
            let cut = || self.bad("have a short form cut short");
            let head = f.get(pos..pos + 3).ok_or_else(cut)?;
            let (nl, vl, flags) = (usize::from(head[0]), usize::from(head[1]), head[2]);
            let name = f.get(pos + 3..pos + 3 + nl).ok_or_else(cut)?;
            let value = f.get(pos + 3 + nl..pos + 3 + nl + vl).ok_or_else(cut)?;
            self.add(flags, name, value.to_vec(), list)?;
            pos += 3 + nl + vl;
        }
        Ok(())
    }

    /// The attributes of a fork kept in blocks (a leaf or a dabtree), each
    /// block read through `read`.
    pub(super) fn blocks(&self, read: &mut ReadBlock, list: &mut XattrList) -> Result<()> {
        let mut seen = HashSet::from([0u64]);
        self.visit(read, 0, None, &mut seen, list)
    }

    /// Block `dablk`, a leaf or a node of `level` (any at the root), and
    /// what lies under it.
    fn visit(
        &self,
        read: &mut ReadBlock,
        dablk: u64,
        level: Option<u16>,
        seen: &mut HashSet<u64>,
        list: &mut XattrList,
    ) -> Result<()> {
        let (b, daddr) = read(dablk)?.ok_or_else(|| self.bad(format!("lack block {dablk}")))?;
        let (leaf, node) = match self.v5 {
            true => (LEAF3_MAGIC, NODE3_MAGIC),
            false => (LEAF_MAGIC, NODE_MAGIC),
        };
        let magic = be16(&b, 8);
        if magic != leaf && magic != node {
            return Err(self.bad(format!("have a block {dablk} that is not one of them")));
        }
        if self.v5 && (!crc_ok(&b, DA3_CRC) || be64(&b, 16) != daddr || be64(&b, 48) != self.inode)
        {
            return Err(self.bad(format!(
                "have a block {dablk} whose checksum, address or owner is wrong"
            )));
        }
        if magic == leaf {
            if level.is_some_and(|l| l != 0) {
                return Err(self.bad(format!("have a leaf {dablk} where a node should be")));
            }
            return self.leaf(&b, read, list);
        }
        // node: header, then (hash, child) pairs
        let (hdr, count, lvl) = match self.v5 {
            true => (64, be16(&b, 56), be16(&b, 58)),
            false => (16, be16(&b, 12), be16(&b, 14)),
        };
        let count = usize::from(count);
        if lvl == 0 || lvl > MAX_LEVEL || level.is_some_and(|l| l != lvl) {
            return Err(self.bad(format!("have a node {dablk} of a bad level")));
        }
        if count == 0 || hdr + count * 8 > b.len() {
            return Err(self.bad(format!("have a node {dablk} of a bad count")));
        }
        for i in 0..count {
            let child = u64::from(be32(&b, hdr + i * 8 + 4));
            if !seen.insert(child) || seen.len() > MAX_BLOCKS {
                return Err(self.bad("have a tree that loops or is too large"));
            }
            self.visit(read, child, Some(lvl - 1), seen, list)?;
        }
        Ok(())
    }

    /// The attributes of leaf block `b`.
    fn leaf(&self, b: &[u8], read: &mut ReadBlock, list: &mut XattrList) -> Result<()> {
        let (hdr, count) = match self.v5 {
            true => (80, be16(b, 56)),
            false => (32, be16(b, 12)),
        };
        let entries_end = hdr + usize::from(count) * 8;
        if entries_end > b.len() {
            return Err(self.bad("have a leaf of a bad count"));
        }
        let cut = || self.bad("have a leaf entry cut short");
        for e in (hdr..entries_end).step_by(8) {
            let idx = usize::from(be16(b, e + 4));
            let flags = b.get(e + 6).copied().unwrap_or(0);
            if hidden(flags) {
                continue;
            }
            // names and values lie after the entries
            if idx < entries_end {
                return Err(self.bad("have a leaf entry whose name overlaps the entries"));
            }
            if flags & ATTR_LOCAL != 0 {
                let vl = usize::from(be16(b, idx));
                let nl = usize::from(*b.get(idx + 2).ok_or_else(cut)?);
                let name = b.get(idx + 3..idx + 3 + nl).ok_or_else(cut)?;
                let value = b.get(idx + 3 + nl..idx + 3 + nl + vl).ok_or_else(cut)?;
                self.add(flags, name, value.to_vec(), list)?;
            } else {
                let (first, vl) = (be32(b, idx), be32(b, idx + 4) as usize);
                let nl = usize::from(*b.get(idx + 8).ok_or_else(cut)?);
                let name = b.get(idx + 9..idx + 9 + nl).ok_or_else(cut)?;
                list.reserve(vl.saturating_add(nl))?;
                let value = self.remote(read, first, vl)?;
                self.add(flags, name, value, list)?;
            }
        }
        Ok(())
    }

    /// A remote value of `len` bytes (already accepted by the list) from
    /// block `first` on.
    fn remote(&self, read: &mut ReadBlock, first: u32, len: usize) -> Result<Vec<u8>> {
        let head = if self.v5 { RMT_HEADER } else { 0 };
        let room = (self.block as usize).saturating_sub(head);
        if room == 0 {
            return Err(self.bad("lie in blocks too small for them"));
        }
        let mut out = Vec::with_capacity(len);
        let mut dablk = u64::from(first);
        while out.len() < len {
            let bad = || {
                self.bad(format!(
                    "have a remote value block {dablk} that is not valid"
                ))
            };
            let (b, daddr) = read(dablk)?.ok_or_else(bad)?;
            let n = room.min(len - out.len());
            if self.v5
                && (b.get(..4) != Some(RMT_MAGIC)
                    || !crc_ok(&b, 12)
                    || be32(&b, 4) as usize != out.len()
                    || be32(&b, 8) as usize != n
                    || be64(&b, 32) != self.inode
                    || be64(&b, 40) != daddr)
            {
                return Err(bad());
            }
            out.extend_from_slice(b.get(head..head + n).ok_or_else(bad)?);
            dablk += 1;
        }
        Ok(out)
    }

    /// Adds an attribute of on-disk `flags` and `name` under its Linux
    /// name, an ACL in the kernel's form.
    fn add(&self, flags: u8, name: &[u8], value: Vec<u8>, list: &mut XattrList) -> Result<()> {
        if hidden(flags) {
            return Ok(());
        }
        if name.is_empty() || name.contains(&0) {
            return Err(self.bad("have a name that is empty or holds a NUL"));
        }
        let (prefix, name, value): (&[u8], &[u8], Vec<u8>) = match flags & (ATTR_ROOT | ATTR_SECURE)
        {
            0 => (b"user.", name, value),
            ATTR_SECURE => (b"security.", name, value),
            ATTR_ROOT => {
                let acl = match name {
                    b"SGI_ACL_FILE" => Some(acl::ACCESS),
                    b"SGI_ACL_DEFAULT" => Some(acl::DEFAULT),
                    _ => None,
                };
                match acl {
                    Some(acl) => {
                        let kernel = acl_from_xfs(&value).ok_or_else(|| {
                            self.bad(format!(
                                "have an ACL that is not valid ({})",
                                String::from_utf8_lossy(name)
                            ))
                        })?;
                        (b"", acl, kernel)
                    }
                    None => (b"trusted.", name, value),
                }
            }
            _ => return Err(self.bad("have an attribute in two namespaces")),
        };
        list.push([prefix, name].concat(), value)
    }
}

/// Whether an attribute of on-disk `flags` is left out of listings: half
/// written, or a parent pointer.
fn hidden(flags: u8) -> bool {
    flags & (ATTR_INCOMPLETE | ATTR_PARENT) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::fs::xattr::Xattr;

    const FORK: Fork = Fork {
        what: "XFS filesystem",
        inode: 131,
        v5: true,
        block: 4096,
    };

    /// A short-form fork of `entries` (flags, name, value).
    fn shortform(entries: &[(u8, &[u8], &[u8])]) -> Vec<u8> {
        let mut f = vec![0, 0, entries.len() as u8, 0];
        for (flags, name, value) in entries {
            f.extend_from_slice(&[name.len() as u8, value.len() as u8, *flags]);
            f.extend_from_slice(name);
            f.extend_from_slice(value);
        }
        let total = (f.len() as u16).to_be_bytes();
        f[..2].copy_from_slice(&total);
        // the fork runs to the end of the inode
        f.resize(f.len() + 20, 0);
        f
    }

    fn read(f: &[u8]) -> Result<Vec<Xattr>> {
        let mut list = XattrList::new("inode 131");
        FORK.shortform(f, &mut list)?;
        Ok(list.finish())
    }

    /// XFS's form of `user::rw-,group::r--,other::---`.
    fn xfs_acl() -> Vec<u8> {
        let mut acl = 3u32.to_be_bytes().to_vec();
        for (tag, perm) in [(1u32, 6u16), (4, 4), (0x20, 0)] {
            acl.extend_from_slice(&tag.to_be_bytes());
            acl.extend_from_slice(&u32::MAX.to_be_bytes());
            acl.extend_from_slice(&perm.to_be_bytes());
            acl.extend_from_slice(&[0, 0]);
        }
        acl
    }

    #[test]
    fn short_forms_name_each_namespace_and_convert_acls() {
        let acl = xfs_acl();
        let f = shortform(&[
            (0, b"comment", b"hi"),
            (ATTR_SECURE, b"selinux", b"label\0"),
            (ATTR_ROOT, b"overlay", b""),
            (ATTR_ROOT, b"SGI_ACL_FILE", &acl),
            (ATTR_ROOT | ATTR_INCOMPLETE, b"half", b"x"),
            (ATTR_PARENT, b"parent", b"y"),
        ]);
        let got: Vec<(Vec<u8>, Vec<u8>)> = read(&f)
            .unwrap()
            .into_iter()
            .map(|x| (x.name, x.value))
            .collect();
        let kernel = acl_from_xfs(&acl).unwrap();
        assert_eq!(
            got,
            [
                (b"security.selinux".to_vec(), b"label\0".to_vec()),
                (acl::ACCESS.to_vec(), kernel),
                (b"trusted.overlay".to_vec(), Vec::new()),
                (b"user.comment".to_vec(), b"hi".to_vec()),
            ]
        );
    }

    #[test]
    fn damaged_short_forms_are_corrupt() {
        let f = shortform(&[(0, b"a", b"1"), (0, b"b", b"2")]);
        assert_eq!(read(&f).unwrap().len(), 2);
        // a count past the entries
        let mut more = f.clone();
        more[2] = 3;
        assert!(read(&more).is_err());
        // a size past the fork, and one below its header
        let mut big = f.clone();
        big[..2].copy_from_slice(&1000u16.to_be_bytes());
        assert!(read(&big).is_err());
        let mut small = f.clone();
        small[..2].copy_from_slice(&2u16.to_be_bytes());
        assert!(read(&small).is_err());
        // a value running past the size
        let mut long = f.clone();
        long[5] = 200;
        assert!(read(&long).is_err());
        // an empty name, a bad ACL, two namespaces
        assert!(read(&shortform(&[(0, b"", b"1")])).is_err());
        let e = read(&shortform(&[(
            ATTR_ROOT,
            b"SGI_ACL_DEFAULT",
            b"\0\0\0\x09",
        )]))
        .unwrap_err();
        assert!(e.message.contains("inode 131"), "{}", e.message);
        assert!(read(&shortform(&[(ATTR_ROOT | ATTR_SECURE, b"x", b"")])).is_err());
        // every cut of the fork is an answer, never a panic
        for n in 0..f.len() {
            let _ = read(&f[..n]);
        }
    }
}
