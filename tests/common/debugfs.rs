//! Where things lie in an ext image, from debugfs: for tests that damage
//! an image at a known place.

use std::path::Path;
use std::process::Command;

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The physical block holding block `n` of `path` in ext image `img`.
pub fn bmap(img: &Path, path: &str, n: u64) -> u64 {
    debugfs(img, &format!("bmap {path} {n}"))
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("bmap {path} {n}"))
}

/// The byte offset of the inode of `path` in ext image `img` of
/// `block_size`-byte blocks.
pub fn inode_offset(img: &Path, path: &str, block_size: u64) -> usize {
    let imap = debugfs(img, &format!("imap {path}"));
    // "Inode N is part of block group G\n\tlocated at block B, offset 0xO"
    assert!(imap.contains("located at block"), "{imap}");
    let nums: Vec<u64> = imap
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|w| {
            w.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16).expect("hex"))
                .or_else(|| w.parse().ok())
        })
        .collect();
    let (b, offset) = (nums[nums.len() - 2], nums[nums.len() - 1]);
    (b * block_size + offset) as usize
}
