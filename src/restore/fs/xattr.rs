//! Extended attributes as Linux names them, whatever filesystem they come
//! from: `user.*`, `trusted.*`, `security.*` (SELinux labels, file
//! capabilities) and POSIX ACLs as `system.posix_acl_access` /
//! `system.posix_acl_default` in the kernel's xattr form (what `getfattr`
//! shows and `setxattr` takes).
//!
//! Owns: the [`Xattr`] record, the bounds on what one node may carry, and
//! the conversion of the on-disk ACL forms (ext4's compact one, XFS's
//! big-endian one) to the kernel's. Must never read a disk: backends hand
//! it bytes.

use crate::error::{Error, Result};
use crate::restore::acl;

/// One extended attribute: its full name ("user.comment") and raw value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Most bytes of names and values one node's attributes may take. Linux
/// allows 64 KiB per value and 64 KiB of names; real systems carry a few
/// hundred bytes (an SELinux label, an ACL, a capability set). A node
/// claiming more is refused rather than held in memory.
pub const MAX_XATTR_BYTES: usize = 1 << 20;
/// Largest single value Linux accepts (XATTR_SIZE_MAX).
pub const MAX_VALUE: usize = 64 * 1024;

/// Collects one node's attributes within [`MAX_XATTR_BYTES`].
pub struct XattrList {
    what: String,
    bytes: usize,
    list: Vec<Xattr>,
}

impl XattrList {
    /// `what` names the node in errors.
    pub fn new(what: impl Into<String>) -> XattrList {
        XattrList {
            what: what.into(),
            bytes: 0,
            list: Vec::new(),
        }
    }

    /// Counts `len` more bytes of value against the bound before they are
    /// read (an ext4 value in an inode of its own, XFS remote values).
    pub fn reserve(&self, len: usize) -> Result<()> {
        if len > MAX_VALUE {
            return Err(Error::corrupt(format!(
                "{}: an extended attribute value of {len} bytes (Linux allows {MAX_VALUE})",
                self.what
            )));
        }
        if self.bytes.saturating_add(len) > MAX_XATTR_BYTES {
            return Err(Error::unsupported(format!(
                "{}: more than {MAX_XATTR_BYTES} bytes of extended attributes",
                self.what
            )));
        }
        Ok(())
    }

    pub fn push(&mut self, name: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.reserve(name.len() + value.len())?;
        self.bytes += name.len() + value.len();
        self.list.push(Xattr { name, value });
        Ok(())
    }

    /// The attributes sorted by name, each name once (the first kept).
    pub fn finish(mut self) -> Vec<Xattr> {
        self.list.sort_by(|a, b| a.name.cmp(&b.name));
        self.list.dedup_by(|a, b| a.name == b.name);
        self.list
    }
}

/// ext4's on-disk ACL (version 1; entries without an id take 4 bytes, the
/// named user and group ones 8) in the kernel's form; `None` if malformed.
pub fn acl_from_ext4(raw: &[u8]) -> Option<Vec<u8>> {
    let version = u32::from_le_bytes(raw.get(..4)?.try_into().ok()?);
    if version != 1 {
        return None;
    }
    let mut entries = Vec::new();
    let mut at = 4;
    while at < raw.len() {
        let head = raw.get(at..at + 4)?;
        let tag = u16::from_le_bytes([head[0], head[1]]);
        let perm = u16::from_le_bytes([head[2], head[3]]);
        let id = if tag == acl::USER || tag == acl::GROUP {
            let id = u32::from_le_bytes(raw.get(at + 4..at + 8)?.try_into().ok()?);
            at += 8;
            id
        } else {
            at += 4;
            acl::UNDEFINED_ID
        };
        entries.push((tag, perm, id));
    }
    acl::encode(&entries)
}

/// XFS's on-disk ACL (a big-endian count, then 12-byte entries of tag, id,
/// permissions and padding) in the kernel's form; `None` if malformed.
pub fn acl_from_xfs(raw: &[u8]) -> Option<Vec<u8>> {
    let count = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    if count > acl::MAX_ENTRIES || raw.len() != 4 + 12 * count {
        return None;
    }
    let entries: Vec<(u16, u16, u32)> = raw[4..]
        .chunks_exact(12)
        .map(|e| {
            let tag = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
            let id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
            let perm = u16::from_be_bytes([e[8], e[9]]);
            let id = if tag == u32::from(acl::USER) || tag == u32::from(acl::GROUP) {
                id
            } else {
                acl::UNDEFINED_ID
            };
            (u16::try_from(tag).unwrap_or(0), perm, id)
        })
        .collect();
    acl::encode(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `setfacl -m u:1000:r,g:50:rw f` on a 0640 file, as getfattr shows the
    /// kernel's form.
    const KERNEL: [u8; 44] = [
        2, 0, 0, 0, //
        1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, // user::rw-
        2, 0, 4, 0, 0xe8, 3, 0, 0, // user:1000:r--
        4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff, // group::r--
        8, 0, 6, 0, 50, 0, 0, 0, // group:50:rw-
        0x10, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, // mask::rw-
    ];

    fn with_other(mut k: Vec<u8>) -> Vec<u8> {
        k.extend_from_slice(&[0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        k
    }

    #[test]
    fn ext4_acls_become_the_kernel_form() {
        let ext4 = [
            1u8, 0, 0, 0, //
            1, 0, 6, 0, //
            2, 0, 4, 0, 0xe8, 3, 0, 0, //
            4, 0, 4, 0, //
            8, 0, 6, 0, 50, 0, 0, 0, //
            0x10, 0, 6, 0, //
            0x20, 0, 0, 0,
        ];
        assert_eq!(acl_from_ext4(&ext4), Some(with_other(KERNEL.to_vec())));
        assert_eq!(acl_from_ext4(&ext4[..ext4.len() - 2]), None, "cut short");
        let mut v2 = ext4;
        v2[0] = 2;
        assert_eq!(acl_from_ext4(&v2), None, "unknown version");
        let mut perm = ext4;
        perm[6] = 8;
        assert_eq!(acl_from_ext4(&perm), None, "unknown permission bit");
    }

    #[test]
    fn xfs_acls_become_the_kernel_form() {
        let mut xfs = vec![0, 0, 0, 6];
        for (tag, id, perm) in [
            (1u32, 0u32, 6u16),
            (2, 1000, 4),
            (4, 0, 4),
            (8, 50, 6),
            (0x10, 0, 6),
            (0x20, 0, 0),
        ] {
            xfs.extend_from_slice(&tag.to_be_bytes());
            xfs.extend_from_slice(&id.to_be_bytes());
            xfs.extend_from_slice(&perm.to_be_bytes());
            xfs.extend_from_slice(&[0, 0]);
        }
        assert_eq!(acl_from_xfs(&xfs), Some(with_other(KERNEL.to_vec())));
        assert_eq!(acl_from_xfs(&xfs[..xfs.len() - 1]), None);
        xfs[3] = 7;
        assert_eq!(acl_from_xfs(&xfs), None, "count beyond the entries");
    }

    #[test]
    fn a_list_is_bounded_sorted_and_unique() {
        let mut l = XattrList::new("n");
        l.push(b"user.b".to_vec(), b"2".to_vec()).unwrap();
        l.push(b"user.a".to_vec(), b"1".to_vec()).unwrap();
        l.push(b"user.a".to_vec(), b"3".to_vec()).unwrap();
        let names: Vec<_> = l.finish().into_iter().map(|x| x.name).collect();
        assert_eq!(names, [b"user.a".to_vec(), b"user.b".to_vec()]);
        let mut l = XattrList::new("n");
        assert!(l.reserve(MAX_VALUE + 1).is_err());
        for _ in 0..MAX_XATTR_BYTES / MAX_VALUE {
            l.push(Vec::new(), vec![0; MAX_VALUE]).unwrap();
        }
        assert!(l.push(b"user.x".to_vec(), Vec::new()).is_err());
    }
}
