//! ext2/3/4 extended attributes: the entry tables kept in an inode's extra
//! space and in the inode's attribute block, and the names Linux gives them.
//!
//! On disk (ext4's `xattr.h`; integers little-endian): an entry is
//! `name_len` (u8), `name_index` (u8), `value_offs` (u16), `value_inum`
//! (u32: the value is the data of that inode, the ea_inode feature),
//! `value_size` (u32), `hash` (u32), then the name, padded to 4 bytes; a
//! table ends with a zero word. In the inode, the table follows a magic
//! word at the start of the extra space and value offsets count from its
//! first entry; the attribute block has a 32-byte header (magic, refcount,
//! blocks, hash, checksum) and its offsets count from the block's start.
//!
//! Owns: decoding those tables with every offset checked, and the name
//! prefixes. Must never read the disk itself: [`super::ext_raw`] hands it
//! bytes and reads values kept in inodes of their own.

use crate::error::{Error, Result};
use crate::le::{le16, le32};
use crate::restore::acl;
use crate::restore::fs::xattr::acl_from_ext4;

/// What an attribute table and an attribute block start with.
pub const MAGIC: u32 = 0xEA02_0000;
/// Bytes of an attribute block's header; its entries follow.
pub const BLOCK_HEADER: usize = 32;
/// Where the attribute block keeps its crc32c.
pub const BLOCK_CSUM_AT: usize = 16;
/// Bytes of an entry before its name.
const ENTRY_HEAD: usize = 16;

/// One entry of a table, its name already given its Linux prefix.
pub struct RawEntry<'a> {
    pub name: Vec<u8>,
    pub value: Value<'a>,
    /// the name is an ACL kept in ext4's own form
    pub acl: bool,
}

/// Where an entry's value is.
pub enum Value<'a> {
    /// in the table's own bytes
    Here(&'a [u8]),
    /// the data of this inode, of this many bytes (ea_inode)
    Inode { number: u32, size: u32 },
}

/// The Linux name of an attribute of index `index` and stored name `name`;
/// `None` for what the kernel does not list (inline data's `system.data`,
/// encryption contexts, Lustre and rich ACL entries).
fn linux_name(index: u8, name: &[u8]) -> Option<(Vec<u8>, bool)> {
    let prefix: &[u8] = match index {
        1 => b"user.",
        2 => return name.is_empty().then(|| (acl::ACCESS.to_vec(), true)),
        3 => return name.is_empty().then(|| (acl::DEFAULT.to_vec(), true)),
        4 => b"trusted.",
        6 => b"security.",
        10 => b"gnu.",
        _ => return None,
    };
    Some(([prefix, name].concat(), false))
}

/// The entries of a table in `region` whose first entry is at `first`;
/// value offsets count from `base` within `region`. `what` names the table
/// in errors.
pub fn entries<'a>(
    region: &'a [u8],
    first: usize,
    base: usize,
    what: &dyn Fn() -> String,
) -> Result<Vec<RawEntry<'a>>> {
    let bad = |m: &str| Error::corrupt(format!("ext filesystem: {}: {m}", what()));
    let mut out = Vec::new();
    let mut at = first;
    loop {
        // a table ends with a zero word; the space may also end right there
        let Some(word) = region.get(at..at + 4) else {
            if at == region.len() {
                return Ok(out);
            }
            return Err(bad("attribute table runs past its space"));
        };
        if le32(word, 0) == 0 {
            return Ok(out);
        }
        let head = region
            .get(at..at + ENTRY_HEAD)
            .ok_or_else(|| bad("attribute entry runs past its space"))?;
        let name_len = usize::from(head[0]);
        let name = region
            .get(at + ENTRY_HEAD..at + ENTRY_HEAD + name_len)
            .ok_or_else(|| bad("attribute name runs past its space"))?;
        let (offs, inum, size) = (usize::from(le16(head, 2)), le32(head, 4), le32(head, 8));
        at += (ENTRY_HEAD + name_len + 3) & !3;
        let Some((linux, acl)) = linux_name(head[1], name) else {
            continue;
        };
        let value = if inum != 0 {
            Value::Inode { number: inum, size }
        } else {
            let start = base
                .checked_add(offs)
                .ok_or_else(|| bad("attribute value out of range"))?;
            let v = start
                .checked_add(size as usize)
                .and_then(|end| region.get(start..end))
                .ok_or_else(|| bad("attribute value runs past its space"))?;
            Value::Here(v)
        };
        out.push(RawEntry {
            name: linux,
            value,
            acl,
        });
    }
}

/// A value as Linux shows it: ACLs in the kernel's form.
pub fn linux_value(
    entry: &RawEntry<'_>,
    raw: Vec<u8>,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    if !entry.acl {
        return Ok(raw);
    }
    acl_from_ext4(&raw).ok_or_else(|| {
        Error::corrupt(format!(
            "ext filesystem: {}: malformed ACL in {}",
            what(),
            String::from_utf8_lossy(&entry.name)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u8, name: &[u8], offs: u16, size: u32) -> Vec<u8> {
        let mut e = vec![name.len() as u8, index];
        e.extend_from_slice(&offs.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(name);
        while e.len() % 4 != 0 {
            e.push(0);
        }
        e
    }

    #[test]
    fn names_get_their_prefixes_and_hidden_ones_are_left_out() {
        let mut region = Vec::new();
        region.extend(entry(1, b"comment", 96, 5));
        region.extend(entry(7, b"data", 101, 0));
        region.extend(entry(6, b"selinux", 101, 3));
        region.extend(entry(2, b"", 104, 0));
        region.extend([0; 4]);
        region.resize(96, 0);
        region.extend(b"helloabc");
        let got = entries(&region, 0, 0, &|| "t".into()).unwrap();
        let names: Vec<_> = got.iter().map(|e| e.name.clone()).collect();
        assert_eq!(
            names,
            [
                b"user.comment".to_vec(),
                b"security.selinux".to_vec(),
                b"system.posix_acl_access".to_vec()
            ]
        );
        assert!(matches!(got[0].value, Value::Here(b"hello")));
        assert!(matches!(got[1].value, Value::Here(b"abc")));
        assert!(got[2].acl);
    }

    #[test]
    fn offsets_past_the_space_are_errors_not_panics() {
        let mut region = entry(1, b"a", 200, 5);
        region.extend([0; 4]);
        assert!(entries(&region, 0, 0, &|| "t".into()).is_err());
        let region = entry(1, b"a", 0, 0);
        // no terminator and no room for one: the space ends with the entry
        assert_eq!(entries(&region, 0, 0, &|| "t".into()).unwrap().len(), 1);
        assert!(entries(&region[..10], 0, 0, &|| "t".into()).is_err());
        for cut in 0..region.len() {
            let _ = entries(&region[..cut], 0, 0, &|| "t".into());
        }
    }
}
