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
//! (deduplicated, compressed by WOF, cloud files) are not links.

/// The reparse tag of a symbolic link.
const TAG_SYMLINK: u32 = 0xA000_000C;
/// The reparse tag of a junction (a mount point).
const TAG_MOUNT_POINT: u32 = 0xA000_0003;
/// A symbolic link's flag: its target is relative to its directory.
const SYMLINK_RELATIVE: u32 = 1;
/// What an Interix symlink's data starts with.
const INTERIX_LINK: &[u8] = b"IntxLNK\x01";

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

/// The target of an Interix symlink (as ntfs-3g writes Linux symlinks)
/// from its file's data; `None` when the data is not one.
pub fn interix_target(data: &[u8]) -> Option<Vec<u8>> {
    let target = utf16_lossy(data.strip_prefix(INTERIX_LINK)?);
    (!target.is_empty() && !target.contains('\0')).then(|| target.into_bytes())
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
    fn interix_links_are_read_as_ntfs_3g_writes_them() {
        let mut data = INTERIX_LINK.to_vec();
        data.extend_from_slice(&utf16("Users/Public"));
        assert_eq!(interix_target(&data), Some(b"Users/Public".to_vec()));
        assert_eq!(interix_target(INTERIX_LINK), None);
        assert_eq!(interix_target(b"IntxCHR\x00"), None);
    }
}
