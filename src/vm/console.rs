//! Reading a guest's serial console file (QEMU's `-serial file:`): waiting
//! for a marker the guest prints, and the last lines for error messages.
//!
//! The guest writes this file at will, so nothing here holds more of it
//! than a bounded window: the watch reads only what was appended since its
//! last look, and the tail reads only the file's last bytes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of the file's end `tail` looks at.
const TAIL_BYTES: u64 = 64 << 10;

/// Watches a console file for `marker`, reading each byte once.
pub struct ConsoleWatch {
    path: PathBuf,
    marker: Vec<u8>,
    /// Bytes of the file already looked at.
    offset: u64,
    /// The last `marker.len() - 1` bytes looked at: a marker may be split
    /// across two reads.
    carry: Vec<u8>,
    seen: bool,
}

impl ConsoleWatch {
    pub fn new(path: &Path, marker: &str) -> ConsoleWatch {
        ConsoleWatch {
            path: path.to_path_buf(),
            marker: marker.as_bytes().to_vec(),
            offset: 0,
            carry: Vec::new(),
            seen: false,
        }
    }

    /// True once the file holds the marker. A file that does not exist yet
    /// holds nothing.
    pub fn seen(&mut self) -> bool {
        if self.seen || self.marker.is_empty() {
            return true;
        }
        let Ok(mut file) = File::open(&self.path) else {
            return false;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            self.offset += n as u64;
            let mut window = std::mem::take(&mut self.carry);
            window.extend_from_slice(&buf[..n]);
            if window
                .windows(self.marker.len())
                .any(|w| w == self.marker.as_slice())
            {
                self.seen = true;
                return true;
            }
            let keep = window.len().min(self.marker.len() - 1);
            self.carry = window.split_off(window.len() - keep);
        }
    }
}

/// The last `lines` lines of the file, from at most its last 64 KiB.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err()
        || file.take(TAIL_BYTES).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line was cut by the window.
        all.remove(0);
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_marker_split_across_appends_is_seen_once_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut watch = ConsoleWatch::new(&path, "listening on vsock:");
        assert!(!watch.seen(), "no file yet");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"[ 0.1] booting\nlistening on vs").unwrap();
        assert!(!watch.seen());
        f.write_all(b"ock:4294967295:807\n").unwrap();
        assert!(watch.seen());
        assert!(watch.seen(), "stays seen");

        let mut other = ConsoleWatch::new(&path, "listening on tcp:");
        assert!(!other.seen());
    }

    #[test]
    fn tail_reads_only_the_end_of_a_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = File::create(&path).unwrap();
        for i in 0..20_000 {
            writeln!(f, "line {i}").unwrap();
        }
        assert_eq!(tail(&path, 2), "line 19998\nline 19999");
        let all = tail(&path, usize::MAX);
        assert!(all.len() <= TAIL_BYTES as usize);
        assert!(
            all.starts_with("line "),
            "no cut line first: {:?}",
            &all[..20]
        );
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }
}
