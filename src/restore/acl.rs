//! POSIX ACLs in the form the kernel gives and takes them as extended
//! attributes (`system.posix_acl_access`, `system.posix_acl_default`):
//! version 2, then 8-byte entries of tag, permissions and id, little-endian.
//!
//! Owns: that form's names, tags and bounds, making it from decoded
//! entries (filesystems keep ACLs in forms of their own) and writing it as
//! the short text `acl_from_text` takes (tar's `SCHILY.acl.*`). Must never
//! read a disk or know any filesystem's own form.

/// The name of the access ACL attribute.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The name of a directory's default ACL attribute.
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
/// The id of entries that have none.
pub const UNDEFINED_ID: u32 = u32::MAX;
/// More entries than any ACL the kernel accepts (it caps them at 32 by
/// default for ext4 and about 8,000 for XFS).
pub const MAX_ENTRIES: usize = 8192;

/// One entry: tag, permissions (rwx as 4, 2, 1), id.
pub type Entry = (u16, u16, u32);

/// The kernel's form of `entries`; `None` for an unknown tag, permission
/// bit, or more than [`MAX_ENTRIES`].
pub fn encode(entries: &[Entry]) -> Option<Vec<u8>> {
    if entries.len() > MAX_ENTRIES {
        return None;
    }
    let mut out = Vec::with_capacity(4 + 8 * entries.len());
    out.extend_from_slice(&VERSION.to_le_bytes());
    for &(tag, perm, id) in entries {
        let known = matches!(tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER);
        if !known || perm & !7 != 0 {
            return None;
        }
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

/// An ACL in the kernel's form as short text
/// (`user::rw-,user:1000:r--,group::r--,mask::r--,other::---`, ids
/// numeric); `None` if malformed.
pub fn text(value: &[u8]) -> Option<String> {
    let (version, entries) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != VERSION || entries.is_empty() || entries.len() % 8 != 0 {
        return None;
    }
    let mut parts = Vec::with_capacity(entries.len() / 8);
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let who = match tag {
            USER_OBJ => "user:".to_string(),
            USER => format!("user:{id}"),
            GROUP_OBJ => "group:".to_string(),
            GROUP => format!("group:{id}"),
            MASK => "mask:".to_string(),
            OTHER => "other:".to_string(),
            _ => return None,
        };
        let bit = |b: u16, c: char| if perm & b != 0 { c } else { '-' };
        parts.push(format!(
            "{who}:{}{}{}",
            bit(4, 'r'),
            bit(2, 'w'),
            bit(1, 'x')
        ));
    }
    Some(parts.join(","))
}
