//! Checks that an archive the agent streams for `extract --tar`, `--zip` or
//! `-` is whole before the client calls it written. The agent says where its
//! stream ends; an agent that says so too early (a bug, a crash inside the
//! VM, a hostile backup) would otherwise leave a truncated archive behind
//! an exit status of 0. A tar must end with its two zero blocks after
//! well-framed members (zstd-compressed: on a complete frame too), a zip
//! with the end records of a central directory that ends where they begin.
//!
//! It only reads what passes by; the bytes written are the agent's.

use std::io::{self, Write};

use restore_agent::client::ClientError;
use restore_agent::le::{le16, le32, le64};

use crate::tarframe::{FramingOnly, TarFrames};

/// The zip end records the agent writes: zip64 end record (56 bytes) and
/// locator (20), then the end of central directory record (22, no comment).
const ZIP_TAIL: usize = 56 + 20 + 22;
const END_SIG: u32 = 0x0605_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;

pub(crate) enum ArchiveCheck {
    Tar(Box<TarFrames>),
    ZstdTar(Box<zstd::stream::write::Decoder<'static, TarSink>>),
    Zip(ZipTail),
}

/// The decompressed side of a zstd tar: its framing, and the first error
/// in it (a `Write` can only pass an `io::Error` up).
pub(crate) struct TarSink {
    frames: TarFrames,
    error: Option<ClientError>,
}

impl Write for TarSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Err(e) = self.frames.feed(buf, &mut FramingOnly) {
            let text = e.to_string();
            self.error = Some(e);
            return Err(io::Error::new(io::ErrorKind::InvalidData, text));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The last bytes of a zip stream, and how many came in all.
#[derive(Default)]
pub(crate) struct ZipTail {
    tail: Vec<u8>,
    total: u64,
}

impl ArchiveCheck {
    /// A check of the `format` archive (`tar` or `zip`) of `what`.
    pub(crate) fn new(format: &str, zstd: bool, what: String) -> Result<Self, ClientError> {
        Ok(match (format, zstd) {
            ("zip", _) => ArchiveCheck::Zip(ZipTail::default()),
            (_, false) => ArchiveCheck::Tar(Box::new(TarFrames::new(what))),
            (_, true) => {
                let sink = TarSink {
                    frames: TarFrames::new(what),
                    error: None,
                };
                let decoder = zstd::stream::write::Decoder::new(sink)
                    .map_err(|e| ClientError::local(format!("zstd decoder: {e}")))?;
                ArchiveCheck::ZstdTar(Box::new(decoder))
            }
        })
    }

    /// For a plain tar: how many bytes of the stream hold whole members
    /// (see [`TarFrames::whole_members`]).
    pub(crate) fn tar_whole_members(&self) -> Option<u64> {
        match self {
            ArchiveCheck::Tar(frames) => Some(frames.whole_members()),
            _ => None,
        }
    }

    /// Takes the next piece of the stream.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(), ClientError> {
        match self {
            ArchiveCheck::Tar(frames) => frames.feed(data, &mut FramingOnly),
            ArchiveCheck::ZstdTar(decoder) => decoder
                .write_all(data)
                .map_err(|e| zstd_error(decoder.get_mut(), e)),
            ArchiveCheck::Zip(zip) => {
                zip.feed(data);
                Ok(())
            }
        }
    }

    /// The stream ended: is the archive whole?
    pub(crate) fn end(self, what: &str) -> Result<(), ClientError> {
        match self {
            ArchiveCheck::Tar(frames) => frames.end(),
            ArchiveCheck::ZstdTar(mut decoder) => match decoder.do_finish() {
                Ok(()) => decoder.get_ref().frames.end(),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ClientError::local(
                    format!("zstd stream of {what}: the archive ended early"),
                )),
                Err(e) => Err(zstd_error(decoder.get_mut(), e)),
            },
            ArchiveCheck::Zip(zip) => zip
                .end()
                .map_err(|e| ClientError::local(format!("zip stream of {what}: {e}"))),
        }
    }
}

/// The tar framing's own error, or the decoder's.
fn zstd_error(sink: &mut TarSink, e: io::Error) -> ClientError {
    sink.error
        .take()
        .unwrap_or_else(|| ClientError::local(format!("zstd stream: {e}")))
}

impl ZipTail {
    fn feed(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        if data.len() >= ZIP_TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - ZIP_TAIL..]);
        } else {
            self.tail.extend_from_slice(data);
            let extra = self.tail.len().saturating_sub(ZIP_TAIL);
            self.tail.drain(..extra);
        }
    }

    /// Whether the stream ended on end records whose central directory
    /// ends right where they begin.
    fn end(&self) -> Result<(), &'static str> {
        const EARLY: &str = "the archive ended early (it does not end with its central directory)";
        let (t, n) = (&self.tail, self.tail.len());
        let Some(end) = n.checked_sub(22).map(|at| &t[at..]) else {
            return Err(EARLY);
        };
        if le32(end, 0) != END_SIG || le16(end, 20) != 0 {
            return Err(EARLY);
        }
        let (mut cd_size, mut cd_offset) = (u64::from(le32(end, 12)), u64::from(le32(end, 16)));
        let mut records_at = self.total - 22;
        // Fields at their maximum say the zip64 records hold the values.
        if le16(end, 10) == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
            if n < ZIP_TAIL {
                return Err(EARLY);
            }
            records_at = self.total - ZIP_TAIL as u64;
            if le32(t, 0) != ZIP64_END_SIG
                || le32(t, 56) != ZIP64_LOCATOR_SIG
                || le64(t, 56 + 8) != records_at
            {
                return Err(EARLY);
            }
            (cd_size, cd_offset) = (le64(t, 40), le64(t, 48));
        }
        if cd_offset.checked_add(cd_size) != Some(records_at) {
            return Err(EARLY);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarframe::tests::member;
    use crate::tarframe::BLOCK;

    fn check(format: &str, zstd: bool, stream: &[u8], piece: usize) -> Result<(), ClientError> {
        let mut c = ArchiveCheck::new(format, zstd, "/x".into())?;
        for p in stream.chunks(piece) {
            c.feed(p)?;
        }
        c.end("/x")
    }

    /// A zip as the agent writes one: a stored member, its central entry,
    /// the end records (zip64 ones too when `zip64`).
    fn zip(zip64: bool) -> Vec<u8> {
        let mut z = Vec::new();
        z.extend(0x0403_4b50u32.to_le_bytes());
        z.extend([0u8; 26]);
        z.extend(b"hello");
        let cd_offset = z.len() as u64;
        z.extend(0x0201_4b50u32.to_le_bytes());
        z.extend([0u8; 42]);
        let cd_size = z.len() as u64 - cd_offset;
        if zip64 {
            let at = z.len() as u64;
            z.extend(ZIP64_END_SIG.to_le_bytes());
            z.extend(44u64.to_le_bytes());
            z.extend([0u8; 12]);
            z.extend(1u64.to_le_bytes());
            z.extend(1u64.to_le_bytes());
            z.extend(cd_size.to_le_bytes());
            z.extend(cd_offset.to_le_bytes());
            z.extend(ZIP64_LOCATOR_SIG.to_le_bytes());
            z.extend(0u32.to_le_bytes());
            z.extend(at.to_le_bytes());
            z.extend(1u32.to_le_bytes());
        }
        z.extend(END_SIG.to_le_bytes());
        z.extend([0u8; 4]);
        z.extend(1u16.to_le_bytes());
        z.extend(1u16.to_le_bytes());
        let (size, offset) = if zip64 {
            (u32::MAX, u32::MAX)
        } else {
            (cd_size as u32, cd_offset as u32)
        };
        z.extend(size.to_le_bytes());
        z.extend(offset.to_le_bytes());
        z.extend(0u16.to_le_bytes());
        z
    }

    #[test]
    fn whole_archives_pass_and_cut_ones_do_not() {
        let mut tar = member("d", b'5', b"", "");
        tar.extend(member("d/f", b'0', &[7u8; 3000], ""));
        tar.extend([0u8; 2 * BLOCK]);
        let zst = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
        for (format, zstd, whole) in [
            ("tar", false, tar.clone()),
            ("tar", true, zst),
            ("zip", false, zip(false)),
            ("zip", false, zip(true)),
        ] {
            for piece in [1, 7, 512, 1 << 20] {
                check(format, zstd, &whole, piece).expect("whole");
            }
            for cut in [0, 1, 30, whole.len() / 2, whole.len() - 1] {
                let err = check(format, zstd, &whole[..cut], 100).err();
                let err = err.unwrap_or_else(|| panic!("{format} {zstd}: cut at {cut} passed"));
                assert!(err.to_string().contains("ended early"), "{err}");
            }
        }
    }

    #[test]
    fn a_broken_compressed_tar_names_what_is_wrong() {
        let mut tar = member("f", b'0', b"data", "");
        tar[0] = b'g';
        tar.extend([0u8; 2 * BLOCK]);
        let zst = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
        let err = check("tar", true, &zst, 4096).expect_err("checksum");
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = check("tar", true, b"not zstd at all", 4096).expect_err("zstd");
        assert!(err.to_string().contains("zstd stream"), "{err}");
    }
}
