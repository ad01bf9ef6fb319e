//! NTFS symbolic links as Unix symlink targets.
//!
//! Windows keeps symbolic links and junctions (mount points) as reparse
//! points: a `$REPARSE_POINT` attribute whose tag says what it is and whose
//! data holds the target as UTF-16, once for the system ("substitute name",
//! `\??\C:\Users`) and once for people ("print name", `C:\Users`). ntfs-3g
//! writes a Linux symlink as an Interix one instead: a system file whose
//! data is `IntxLNK\x01` and the target as UTF-16. This module turns both
//! into the target a Unix symlink would hold; it only parses bytes handed
//! to it and knows nothing of files or reads. Other reparse points
//! (deduplicated, compressed by WOF, cloud files) are not links, except
//! WSL 1's Linux symlinks, whose reparse data holds a Unix target. ntfs-3g
//! writes Linux device nodes as Interix system files too (`IntxCHR\0` or
//! `IntxBLK\0`, then the major and minor as 64-bit numbers), which this
//! module reads as well.

use crate::restore::fs::Device;

/// The reparse tag of a symbolic link.
const TAG_SYMLINK: u32 = 0xA000_000C;
/// The reparse tag of a junction (a mount point).
const TAG_MOUNT_POINT: u32 = 0xA000_0003;
/// The reparse tag of a symlink made by Linux programs under WSL 1: a
/// version word (2), then the Unix target as UTF-8.
const TAG_LX_SYMLINK: u32 = 0xA000_001D;
/// A symbolic link's flag: its target is relative to its directory.
const SYMLINK_RELATIVE: u32 = 1;
/// What an Interix symlink's data starts with.
const INTERIX_LINK: &[u8] = b"IntxLNK\x01";
/// What an Interix character device's data starts with.
const INTERIX_CHAR: &[u8] = b"IntxCHR\0";
/// What an Interix block device's data starts with.
const INTERIX_BLOCK: &[u8] = b"IntxBLK\0";
/// The length of an Interix device's data: its magic, major and minor.
pub const INTERIX_DEVICE_LEN: u64 = 24;

/// The target of a symbolic link or junction from its reparse data (the
/// `$REPARSE_POINT` attribute's value); `None` for any other reparse point
/// or data that does not hold a target.
///
/// Backslashes become slashes. An absolute target loses its drive letter
/// (`C:\Users\Public` becomes `/Users/Public`): it is taken to lie on the
/// same volume, which holds for the junctions every Windows installation
/// has (`Documents and Settings` to `C:\Users`).
pub fn reparse_target(data: &[u8]) -> Option<Vec<u8>> {
    let tag = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    let field = |at: usize| -> Option<usize> {
        let b = data.get(at..at + 2)?;
        Some(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let (path_buffer, relative): (usize, bool) = match tag {
        TAG_LX_SYMLINK => return lx_target(data),
        TAG_MOUNT_POINT => (16, false),
        TAG_SYMLINK => {
            let flags = u32::from_le_bytes(data.get(16..20)?.try_into().ok()?);
            (20, flags & SYMLINK_RELATIVE != 0)
        }
        _ => return None,
    };
    let name = |offset: usize, len: usize| -> Option<String> {
        let start = path_buffer.checked_add(offset)?;
        let bytes = data.get(start..start.checked_add(len)?)?;
        Some(utf16_lossy(bytes))
    };
    let print = name(field(12)?, field(14)?)?;
    let target = if print.is_empty() {
        let substitute = name(field(8)?, field(10)?)?;
        substitute
            .strip_prefix(r"\??\")
            .map(str::to_string)
            .unwrap_or(substitute)
    } else {
        print
    };
    unix_target(&target, relative)
}

/// The Unix target of a WSL 1 symlink from its reparse data (see
/// [`TAG_LX_SYMLINK`]): taken as it is, a Linux path.
fn lx_target(data: &[u8]) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_le_bytes(data.get(4..6)?.try_into().ok()?));
    let body = data.get(8..8usize.checked_add(len)?)?;
    let (version, target) = body.split_at_checked(4)?;
    if u32::from_le_bytes(version.try_into().ok()?) != 2 {
        return None;
    }
    (!target.is_empty() && !target.contains(&0)).then(|| target.to_vec())
}

/// The target of an Interix symlink (as ntfs-3g writes Linux symlinks)
/// from its file's data; `None` when the data is not one.
pub fn interix_target(data: &[u8]) -> Option<Vec<u8>> {
    let target = utf16_lossy(data.strip_prefix(INTERIX_LINK)?);
    (!target.is_empty() && !target.contains('\0')).then(|| target.into_bytes())
}

/// The device an Interix device file's data names (as ntfs-3g writes
/// Linux device nodes): whether it is a block device, and its number;
/// `None` when the data is not one, or names a number Linux cannot hold.
pub fn interix_device(data: &[u8]) -> Option<(bool, Device)> {
    if data.len() as u64 != INTERIX_DEVICE_LEN {
        return None;
    }
    let block = match &data[..8] {
        m if m == INTERIX_CHAR => false,
        m if m == INTERIX_BLOCK => true,
        _ => return None,
    };
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or_default());
    let device = Device {
        major: u32::try_from(word(8)).ok()?,
        minor: u32::try_from(word(16)).ok()?,
    };
    Some((block, device))
}

/// A Windows target as a Unix one (see [`reparse_target`]).
fn unix_target(target: &str, relative: bool) -> Option<Vec<u8>> {
    let mut t = target.replace('\\', "/");
    if !relative {
        let b = t.as_bytes();
        let drive = b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':';
        if drive && (b.len() == 2 || b[2] == b'/') {
            t = match &t[2..] {
                "" => "/".to_string(),
                rest => rest.to_string(),
            };
        }
    }
    (!t.is_empty() && !t.contains('\0')).then(|| t.into_bytes())
}

fn utf16_lossy(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    /// Reparse data as Windows writes it: the header, the four name
    /// fields, the symlink flags, then the substitute and print names.
    fn reparse(tag: u32, substitute: &str, print: &str, flags: Option<u32>) -> Vec<u8> {
        let (s, p) = (utf16(substitute), utf16(print));
        let mut body = Vec::new();
        for v in [0, s.len(), s.len(), p.len()] {
            body.extend_from_slice(&(v as u16).to_le_bytes());
        }
        if let Some(f) = flags {
            body.extend_from_slice(&f.to_le_bytes());
        }
        body.extend_from_slice(&s);
        body.extend_from_slice(&p);
        let mut out = tag.to_le_bytes().to_vec();
        out.extend_from_slice(&(body.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn junctions_and_symlinks_become_unix_targets() {
        let target = |d: &[u8]| reparse_target(d).map(|t| String::from_utf8(t).unwrap());
        let junction = reparse(TAG_MOUNT_POINT, r"\??\C:\Users", r"C:\Users", None);
        assert_eq!(target(&junction).as_deref(), Some("/Users"));
        let rel = reparse(TAG_SYMLINK, r"..\a b\c.txt", r"..\a b\c.txt", Some(1));
        assert_eq!(target(&rel).as_deref(), Some("../a b/c.txt"));
        let abs = reparse(TAG_SYMLINK, r"\??\D:\x", r"D:\x", Some(0));
        assert_eq!(target(&abs).as_deref(), Some("/x"));
        // without a print name, the substitute name without its prefix
        let bare = reparse(TAG_MOUNT_POINT, r"\??\C:\", "", None);
        assert_eq!(target(&bare).as_deref(), Some("/"));
        // another volume's GUID path is kept as it is
        let guid = reparse(TAG_MOUNT_POINT, r"\??\Volume{1}\", "", None);
        assert_eq!(target(&guid).as_deref(), Some("Volume{1}/"));
        // a deduplicated file, a name past the data, an empty target
        assert_eq!(target(&reparse(0x8000_0013, "x", "x", None)), None);
        let mut short = rel.clone();
        short.truncate(short.len() - 2);
        assert_eq!(target(&short), None);
        assert_eq!(target(&reparse(TAG_SYMLINK, "", "", Some(1))), None);
        assert_eq!(target(&[]), None);
    }

    #[test]
    fn wsl_symlinks_keep_their_unix_targets() {
        let lx = |version: u32, target: &[u8]| {
            let mut d = TAG_LX_SYMLINK.to_le_bytes().to_vec();
            d.extend_from_slice(&(4 + target.len() as u16).to_le_bytes());
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&version.to_le_bytes());
            d.extend_from_slice(target);
            d
        };
        let t = b"../lib/x86_64-linux-gnu/libc.so.6";
        assert_eq!(reparse_target(&lx(2, t)), Some(t.to_vec()));
        assert_eq!(
            reparse_target(&lx(2, b"/etc\\x")),
            Some(b"/etc\\x".to_vec())
        );
        // another version, no target, a length past the data
        assert_eq!(reparse_target(&lx(1, t)), None);
        assert_eq!(reparse_target(&lx(2, b"")), None);
        let mut short = lx(2, t);
        short.truncate(short.len() - 1);
        assert_eq!(reparse_target(&short), None);
    }

    #[test]
    fn interix_devices_are_read_as_ntfs_3g_writes_them() {
        let device = |magic: &[u8], major: u64, minor: u64| {
            let mut d = magic.to_vec();
            d.extend_from_slice(&major.to_le_bytes());
            d.extend_from_slice(&minor.to_le_bytes());
            d
        };
        let number = |major, minor| Device { major, minor };
        assert_eq!(
            interix_device(&device(INTERIX_CHAR, 1, 3)),
            Some((false, number(1, 3)))
        );
        assert_eq!(
            interix_device(&device(INTERIX_BLOCK, 259, 70_000)),
            Some((true, number(259, 70_000)))
        );
        // another magic, a length that is not a device's, a number past 32 bits
        assert_eq!(interix_device(&device(b"IntxFOO\0", 1, 3)), None);
        assert_eq!(interix_device(&device(INTERIX_CHAR, 1, 3)[..23]), None);
        assert_eq!(interix_device(&device(INTERIX_CHAR, 1 << 32, 3)), None);
    }

    #[test]
    fn interix_links_are_read_as_ntfs_3g_writes_them() {
        let mut data = INTERIX_LINK.to_vec();
        data.extend_from_slice(&utf16("Users/Public"));
        assert_eq!(interix_target(&data), Some(b"Users/Public".to_vec()));
        assert_eq!(interix_target(INTERIX_LINK), None);
        assert_eq!(interix_target(b"IntxCHR\x00"), None);
    }
}
