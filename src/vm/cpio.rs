//! A writer for the "newc" cpio format (the Linux initramfs format).
//!
//! Owns the byte layout only: the base image build writes the agent, device
//! nodes and modules with it, and every VM start appends a second archive
//! holding `/ticket` to a copy of the base image (the kernel merges
//! concatenated archives). It never reads archives and never touches the
//! filesystem beyond the reader it is given.

use std::io::{self, Read, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
/// Largest member: newc sizes are 32-bit.
const MAX_MEMBER: u64 = u32::MAX as u64;

/// Writes newc entries to `out`; call [`CpioWriter::finish`] to end the
/// archive with its trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// `first_ino` keeps inode numbers of a second, appended archive apart
    /// from the first one's (the kernel treats equal inode numbers with
    /// several links as hard links).
    pub fn new(out: W, first_ino: u32) -> Self {
        CpioWriter {
            out,
            next_ino: first_ino,
            written: 0,
        }
    }

    /// A directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, libc::S_IFDIR | (perm & 0o7777), 0, 0, 0)
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, libc::S_IFCHR | (perm & 0o7777), 0, major, minor)
    }

    /// A regular file with the bytes in `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.file_from(name, perm, data.len() as u64, &mut &data[..])
    }

    /// A regular file of exactly `len` bytes read from `data`.
    pub fn file_from(
        &mut self,
        name: &str,
        perm: u32,
        len: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        if len > MAX_MEMBER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {len} bytes is too large for a cpio member"),
            ));
        }
        self.header(name, libc::S_IFREG | (perm & 0o7777), len as u32, 0, 0)?;
        let copied = io::copy(&mut data.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {len} bytes, got {copied}"),
            ));
        }
        self.written += copied;
        self.pad()
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.header(TRAILER, 0, 0, 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        size: u32,
        rmajor: u32,
        rminor: u32,
    ) -> io::Result<()> {
        if name.is_empty() || name.as_bytes().contains(&0) || name.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio member name {name:?}"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let nlink = if mode & libc::S_IFMT == libc::S_IFDIR {
            2
        } else {
            1
        };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible images
            size,
            0, // devmajor
            0, // devminor
            rmajor,
            rminor,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = Vec::with_capacity(110 + name.len() + 4);
        head.extend_from_slice(MAGIC);
        for f in fields {
            head.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        self.out.write_all(&head)?;
        self.written += head.len() as u64;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn gnu_cpio_reads_what_we_write() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new(Vec::new(), 1);
        w.dir("etc", 0o755).unwrap();
        w.file("etc/ticket", 0o400, b"secret\n").unwrap();
        w.file("odd", 0o644, b"12345").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        let out = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(dir.path().join("etc/ticket")).unwrap(),
            b"secret\n"
        );
        assert_eq!(std::fs::read(dir.path().join("odd")).unwrap(), b"12345");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("etc/ticket"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        let list = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(
            list.contains("etc/ticket") && list.contains("odd"),
            "{list}"
        );
    }

    #[test]
    fn a_short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new(), 1);
        let err = w.file_from("x", 0o644, 10, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
