//! The framing of the agent's tar stream (`fs.extract`): ustar headers, pax
//! records for what ustar cannot hold, GNU base-256 numbers, data padded to
//! 512 bytes, two zero blocks at the end. [`TarFrames`] is fed the stream piece
//! by piece as it arrives and hands each member's header and data to a
//! [`Members`]: `extract -o` unpacks them (`untar`), `--tar` and `-` only
//! check that the archive is whole before calling it written.
//!
//! It never trusts the stream: checksums, sizes and pax records are checked,
//! and a bad header is an error naming what is wrong, not a panic. It knows
//! nothing of files and directories.

use restore_agent::client::ClientError;

pub(crate) const BLOCK: usize = 512;
/// Largest pax extended header accepted: a member's path (up to 1,024
/// levels of 255-byte names) and its extended attributes (up to 1 MiB of
/// names and values, ACLs again as text) with room to spare.
const MAX_PAX: u64 = 4 << 20;
/// Most bytes accepted after the two zero blocks (a tar is padded to
/// its record size, 10 KiB for GNU tar): an agent that goes on sending
/// there is broken, and was read from for as long as it sent.
pub(crate) const MAX_AFTER_END: u64 = 1 << 20;

/// One member's header, with its pax records applied.
pub(crate) struct Member {
    pub typeflag: u8,
    pub name: Vec<u8>,
    /// symlink target or hard link name
    pub link: Vec<u8>,
    pub size: u64,
    /// permission bits (`& 0o7777`)
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// nanoseconds past `mtime` (a pax `mtime` with a fraction)
    pub mtime_ns: u32,
    /// A GNU sparse 1.0 file of this real size: its data is the map of its
    /// data regions, then their bytes (see `untar`).
    pub sparse: Option<u64>,
    /// extended attributes (pax `SCHILY.xattr.NAME`): (name, value)
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What a tar stream's members go to.
pub(crate) trait Members {
    /// The next member. Returns whether its data is wanted: then `data`
    /// gets all of it (in pieces) and `data_end` follows, even for a member
    /// of size 0; otherwise its data is skipped.
    fn member(&mut self, member: Member) -> Result<bool, ClientError>;
    fn data(&mut self, bytes: &[u8]) -> Result<(), ClientError>;
    fn data_end(&mut self) -> Result<(), ClientError>;
}

/// A [`Members`] that wants no data: checks the framing alone.
pub(crate) struct FramingOnly;

impl Members for FramingOnly {
    fn member(&mut self, _: Member) -> Result<bool, ClientError> {
        Ok(false)
    }
    fn data(&mut self, _: &[u8]) -> Result<(), ClientError> {
        Ok(())
    }
    fn data_end(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
}

/// Values from a pax extended header, for the member that follows it.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    /// seconds and nanoseconds
    mtime: Option<(i64, u32)>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// GNU.sparse.major and .minor, as given
    sparse_version: (Option<Vec<u8>>, Option<Vec<u8>>),
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

enum State {
    /// Collecting a 512-byte header in `buf`.
    Header,
    /// Collecting a pax header of this many bytes in `buf` (global ones are
    /// read and ignored).
    Pax { size: u64, global: bool },
    /// Handing over a member's data: this many bytes are left, then this
    /// much padding.
    Data { left: u64, padding: u64 },
    /// Skipping this many bytes (padding, data nobody wants).
    Skip(u64),
    /// After the first zero block of the end of the archive: this many
    /// zero bytes of the second are still to come.
    Zeros(u64),
    /// After the end of the archive (two zero blocks): this many bytes
    /// came after it.
    End(u64),
}

/// A push parser of one tar stream.
pub(crate) struct TarFrames {
    /// What the stream is of, for messages.
    what: String,
    state: State,
    buf: Vec<u8>,
    pax: Pax,
    /// Bytes fed so far.
    fed: u64,
    /// Where the last member began (its pax header, if it has one).
    member_start: u64,
    /// A pax header was read and its member's header is still to come.
    in_member: bool,
}

pub(crate) fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// A header field up to its first NUL.
fn field(block: &[u8], off: usize, len: usize) -> &[u8] {
    let f = block.get(off..off + len).unwrap_or(&[]);
    match f.iter().position(|&b| b == 0) {
        Some(n) => &f[..n],
        None => f,
    }
}

/// A numeric field: octal text, or GNU base-256 (top bit of the first byte).
fn number(block: &[u8], off: usize, len: usize) -> Option<i64> {
    let f = block.get(off..off + len)?;
    let first = *f.first()?;
    if first & 0x80 != 0 {
        // Two's complement, big-endian; 0xff leads a negative number.
        let negative = first == 0xff;
        let mut v: i64 = if negative {
            -1
        } else {
            i64::from(first & 0x7f)
        };
        for &b in f.get(1..)? {
            if !((i64::MIN >> 8)..=(i64::MAX >> 8)).contains(&v) {
                return None;
            }
            v = (v << 8) | i64::from(b);
        }
        return Some(v);
    }
    let text = field(block, off, len);
    let text = std::str::from_utf8(text).ok()?.trim_matches(|c| c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(text, 8).ok()
}

/// A pax time ("1700000000", "1700000000.5", "-1.25": 1.25 s before the
/// epoch) as seconds and the nanoseconds past them (digits past the ninth
/// dropped).
fn pax_time(text: &str) -> Option<(i64, u32)> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !ok(whole) || !ok(fraction) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut ns = 0u32;
    for (i, d) in fraction.bytes().take(9).enumerate() {
        ns += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(match (negative, ns) {
        (false, _) => (secs, ns),
        (true, 0) => (-secs, 0),
        (true, _) => (-secs - 1, 1_000_000_000 - ns),
    })
}

fn checksum_ok(block: &[u8]) -> bool {
    let Some(stored) = number(block, 148, 8) else {
        return false;
    };
    let sum: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                i64::from(b)
            }
        })
        .sum();
    sum == stored
}

impl TarFrames {
    /// A parser for the tar stream of `what` (a path, for messages).
    pub(crate) fn new(what: String) -> Self {
        TarFrames {
            what,
            state: State::Header,
            buf: Vec::with_capacity(BLOCK),
            pax: Pax::default(),
            fed: 0,
            member_start: 0,
            in_member: false,
        }
    }

    /// How many bytes of the stream so far hold whole members: all of them
    /// at a member boundary, else those before the unfinished member (its
    /// pax header included). An archive cut back there after a member
    /// failed is whole but for the end blocks.
    pub(crate) fn whole_members(&self) -> u64 {
        let between = matches!(self.state, State::Header) && self.buf.is_empty() && !self.in_member;
        if between {
            self.fed
        } else {
            self.member_start
        }
    }

    /// An error in the stream, as the user sees it.
    pub(crate) fn corrupt(&self, what: &str) -> ClientError {
        ClientError::local(format!("tar stream of {}: {what}", self.what))
    }

    /// Takes the next piece of the stream.
    pub(crate) fn feed(
        &mut self,
        mut data: &[u8],
        members: &mut impl Members,
    ) -> Result<(), ClientError> {
        let (base, total) = (self.fed, data.len() as u64);
        self.fed += total;
        while !data.is_empty() {
            match &mut self.state {
                State::End(after) => {
                    *after += data.len() as u64;
                    if *after > MAX_AFTER_END {
                        return Err(self.corrupt("more than 1 MiB follows the end of the archive"));
                    }
                    return Ok(());
                }
                State::Zeros(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    let done = *n == 0;
                    if data[..k].iter().any(|&b| b != 0) {
                        return Err(self.corrupt("a lone zero block amid the archive"));
                    }
                    data = &data[k..];
                    if done {
                        self.state = State::End(0);
                    }
                }
                State::Skip(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Data { left, padding } => {
                    let k = (*left).min(data.len() as u64) as usize;
                    let (now, rest) = data.split_at(k);
                    *left -= k as u64;
                    let (done, padding) = (*left == 0, *padding);
                    data = rest;
                    members.data(now)?;
                    if done {
                        self.skip(padding);
                        members.data_end()?;
                    }
                }
                State::Header => {
                    if self.buf.is_empty() && !self.in_member {
                        self.member_start = base + total - data.len() as u64;
                    }
                    let k = (BLOCK - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if self.buf.len() == BLOCK {
                        let block = std::mem::take(&mut self.buf);
                        let result = self.header(&block, members);
                        self.buf = block;
                        self.buf.clear();
                        result?;
                    }
                }
                State::Pax { size, global } => {
                    let (size, global) = (*size, *global);
                    let want = size as usize - self.buf.len();
                    let k = want.min(data.len());
                    self.buf.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if self.buf.len() as u64 == size {
                        let records = std::mem::take(&mut self.buf);
                        if !global {
                            self.pax = self.parse_pax(&records)?;
                        }
                        self.buf = Vec::with_capacity(BLOCK);
                        self.skip(pad(size));
                    }
                }
            }
        }
        Ok(())
    }

    /// The stream ended: it must have ended where the archive does.
    pub(crate) fn end(&self) -> Result<(), ClientError> {
        if matches!(self.state, State::End(_)) {
            Ok(())
        } else {
            Err(self.corrupt("the archive ended early"))
        }
    }

    fn skip(&mut self, n: u64) {
        self.state = if n == 0 {
            State::Header
        } else {
            State::Skip(n)
        };
    }

    fn parse_pax(&self, mut records: &[u8]) -> Result<Pax, ClientError> {
        let mut pax = Pax::default();
        while !records.is_empty() {
            let bad = || self.corrupt("bad pax record");
            let space = records.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&records[..space])
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)?;
            if len <= space + 1 || len > records.len() || records[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &records[space + 1..len - 1];
            records = &records[len..];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            let text = || std::str::from_utf8(value).ok();
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"size" => pax.size = Some(text().and_then(|t| t.parse().ok()).ok_or_else(bad)?),
                b"uid" => pax.uid = Some(text().and_then(|t| t.parse().ok()).ok_or_else(bad)?),
                b"gid" => pax.gid = Some(text().and_then(|t| t.parse().ok()).ok_or_else(bad)?),
                b"GNU.sparse.major" => pax.sparse_version.0 = Some(value.to_vec()),
                b"GNU.sparse.minor" => pax.sparse_version.1 = Some(value.to_vec()),
                b"GNU.sparse.name" => pax.sparse_name = Some(value.to_vec()),
                b"GNU.sparse.realsize" => {
                    pax.sparse_realsize = Some(text().and_then(|t| t.parse().ok()).ok_or_else(bad)?)
                }
                b"mtime" => pax.mtime = Some(text().and_then(pax_time).ok_or_else(bad)?),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        if name.is_empty() {
                            return Err(bad());
                        }
                        pax.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
        Ok(pax)
    }

    fn header(&mut self, block: &[u8], members: &mut impl Members) -> Result<(), ClientError> {
        if block.iter().all(|&b| b == 0) {
            self.state = State::Zeros(BLOCK as u64);
            return Ok(());
        }
        if !checksum_ok(block) {
            return Err(self.corrupt("a header's checksum does not match"));
        }
        let pax = std::mem::take(&mut self.pax);
        let typeflag = block[156];
        let size = match pax.size {
            Some(s) => s,
            None => number(block, 124, 12)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| self.corrupt("bad size field"))?,
        };
        // the member's data and its padding, which a hostile size overflows
        let padded = size
            .checked_add(pad(size))
            .ok_or_else(|| self.corrupt("bad size field"))?;
        if typeflag == b'x' || typeflag == b'g' {
            self.in_member = true;
            if size > MAX_PAX {
                return Err(self.corrupt("pax header too large"));
            }
            self.buf.clear();
            self.state = State::Pax {
                size,
                global: typeflag == b'g',
            };
            if size == 0 {
                self.state = State::Header;
            }
            return Ok(());
        }
        self.in_member = false;
        // A GNU sparse 1.0 file: its own name and size are in the pax
        // records, the header names a stand-in (GNUSparseFile.0/).
        let sparse = match (&pax.sparse_version, &pax.sparse_name, pax.sparse_realsize) {
            ((None, None), None, None) => None,
            ((Some(major), Some(minor)), Some(_), Some(size))
                if major == b"1" && minor == b"0" && matches!(typeflag, b'0' | 0) =>
            {
                Some(size)
            }
            _ => return Err(self.corrupt("a sparse member of a format other than GNU 1.0")),
        };
        let name = match pax.sparse_name.or(pax.path) {
            Some(p) => p,
            None => {
                let (prefix, name) = (field(block, 345, 155), field(block, 0, 100));
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            }
        };
        let (mtime, mtime_ns) = match pax.mtime {
            Some(t) => t,
            None => (
                number(block, 136, 12).ok_or_else(|| self.corrupt("bad mtime field"))?,
                0,
            ),
        };
        let mode = number(block, 100, 8)
            .and_then(|m| u32::try_from(m).ok())
            .ok_or_else(|| self.corrupt("bad mode field"))?
            & 0o7777;
        let id = |pax: Option<u32>, off: usize, what: &str| match pax {
            Some(id) => Ok(id),
            None => number(block, off, 8)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.corrupt(what)),
        };
        let uid = id(pax.uid, 108, "bad uid field")?;
        let gid = id(pax.gid, 116, "bad gid field")?;
        let link = pax
            .linkpath
            .unwrap_or_else(|| field(block, 157, 100).to_vec());
        let member = Member {
            typeflag,
            name,
            link,
            size,
            mode,
            uid,
            gid,
            mtime,
            mtime_ns,
            sparse,
            xattrs: pax.xattrs,
        };
        let wanted = members.member(member)?;
        if wanted && size > 0 {
            self.state = State::Data {
                left: size,
                padding: pad(size),
            };
            return Ok(());
        }
        self.skip(padded);
        if wanted {
            members.data_end()?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_their_nanoseconds() {
        assert_eq!(pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            pax_time("1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(pax_time("5.5"), Some((5, 500_000_000)));
        assert_eq!(pax_time("5.1234567891"), Some((5, 123_456_789)));
        assert_eq!(pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time("-3"), Some((-3, 0)));
        for bad in ["", ".5", "1.x", "1e3", "--1", "1.-5"] {
            assert_eq!(pax_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn numbers_octal_and_base256() {
        let mut block = [0u8; BLOCK];
        block[124..135].copy_from_slice(b"00000001750");
        assert_eq!(number(&block, 124, 12), Some(0o1750));
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[4..12].copy_from_slice(&(9u64 << 30).to_be_bytes());
        block[124..136].copy_from_slice(&b256);
        assert_eq!(number(&block, 124, 12), Some(9 << 30));
        let neg = (-5i64).to_be_bytes();
        let mut b256 = [0xffu8; 12];
        b256[4..12].copy_from_slice(&neg);
        block[136..148].copy_from_slice(&b256);
        assert_eq!(number(&block, 136, 12), Some(-5));
        block[100..108].copy_from_slice(b"0000x44\0");
        assert_eq!(number(&block, 100, 8), None);
    }

    /// A ustar header block for `name`.
    pub(crate) fn header(name: &str, typeflag: u8, size: u64, link: &str) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b[100..107].copy_from_slice(b"0000644");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[136..147].copy_from_slice(b"14000000000");
        b[156] = typeflag;
        b[157..157 + link.len()].copy_from_slice(link.as_bytes());
        b[257..263].copy_from_slice(b"ustar\0");
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        b
    }

    pub(crate) fn member(name: &str, typeflag: u8, data: &[u8], link: &str) -> Vec<u8> {
        let mut m = header(name, typeflag, data.len() as u64, link);
        m.extend_from_slice(data);
        m.resize(m.len() + pad(data.len() as u64) as usize, 0);
        m
    }

    /// Records what it is handed, as one line per member and its data.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<(String, Vec<u8>)>,
        ended: usize,
    }

    impl Members for Recorder {
        fn member(&mut self, m: Member) -> Result<bool, ClientError> {
            let name = String::from_utf8_lossy(&m.name).into_owned();
            self.seen
                .push((format!("{name} {} {}", m.typeflag, m.size), Vec::new()));
            Ok(m.typeflag == b'0')
        }
        fn data(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
            if let Some(last) = self.seen.last_mut() {
                last.1.extend_from_slice(bytes);
            }
            Ok(())
        }
        fn data_end(&mut self) -> Result<(), ClientError> {
            self.ended += 1;
            Ok(())
        }
    }

    fn frames(stream: &[u8], piece: usize) -> Result<Recorder, ClientError> {
        let mut frames = TarFrames::new("/x".into());
        let mut rec = Recorder::default();
        for p in stream.chunks(piece) {
            frames.feed(p, &mut rec)?;
        }
        frames.end().map(|()| rec)
    }

    #[test]
    fn members_and_their_data_in_pieces_of_any_size() {
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = member("d", b'5', b"", "");
        stream.extend(member("d/a", b'0', &big, ""));
        stream.extend(member("d/empty", b'0', b"", ""));
        stream.extend(member("d/l", b'2', b"", "a"));
        stream.extend([0u8; 2 * BLOCK]);
        for piece in [1, 7, 511, 512, 513, 1 << 20] {
            let rec = frames(&stream, piece).expect("frames");
            let names: Vec<&str> = rec.seen.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["d 53 0", "d/a 48 3000", "d/empty 48 0", "d/l 50 0"]);
            assert_eq!(rec.seen[1].1, big);
            assert_eq!(rec.ended, 2, "data_end once per wanted member");
        }
        // checked alone: the same stream is whole
        let mut check = TarFrames::new("/x".into());
        check.feed(&stream, &mut FramingOnly).expect("feed");
        check.end().expect("whole");
    }

    /// The whole members so far end at a member boundary: never inside a
    /// member, its pax header or its data.
    #[test]
    fn whole_members_end_where_a_member_begins() {
        let first = member("a", b'0', &[1u8; 700], "");
        let second = long_member("b", b'0', &[2u8; 100]);
        let mut stream = first.clone();
        stream.extend(&second);
        let ends = [0, first.len() as u64, stream.len() as u64];
        for piece in [1, 100, 512, 4096] {
            let mut frames = TarFrames::new("/x".into());
            let mut fed = 0;
            for p in stream.chunks(piece) {
                frames.feed(p, &mut FramingOnly).expect("feed");
                fed += p.len() as u64;
                let whole = frames.whole_members();
                assert!(
                    ends.contains(&whole) && whole <= fed,
                    "piece {piece}: {whole}"
                );
                if fed > first.len() as u64 && fed < stream.len() as u64 {
                    assert_eq!(whole, first.len() as u64, "piece {piece}: {fed}");
                }
            }
            assert_eq!(frames.whole_members(), stream.len() as u64);
        }
    }

    /// A member preceded by a pax header naming it.
    pub(crate) fn long_member(name: &str, typeflag: u8, data: &[u8]) -> Vec<u8> {
        let mut m = member("pax", b'x', &pax_record("path", name), "");
        m.extend(member("short", typeflag, data, ""));
        m
    }

    /// A pax record "LEN KEY=VALUE\n" (LEN counts its own digits).
    pub(crate) fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    #[test]
    fn a_bad_checksum_or_a_short_stream_is_an_error() {
        let mut m = member("f", b'0', b"data", "");
        m[0] = b'g';
        let err = frames(&m, 512).err().expect("checksum");
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut m = member("f", b'0', b"data", "");
        m.extend([0u8; 2 * BLOCK]);
        // cut anywhere before the end block: ended early
        for cut in [0, 1, BLOCK, BLOCK + 2, 2 * BLOCK - 1, 2 * BLOCK] {
            let err = frames(&m[..cut], 512).err().expect("short");
            assert!(err.to_string().contains("ended early"), "cut {cut}: {err}");
        }
        assert!(frames(&m, 512).is_ok());
    }

    /// From a hostile agent: a pax size of 2^64 - 1 on a member with no
    /// data overflowed the skip (a panic in the unpacker), and data after
    /// the end of the archive was read for as long as it came.
    #[test]
    fn hostile_sizes_and_data_after_the_end_are_errors() {
        let record = b"29 size=18446744073709551615\n";
        let mut m = member("pax", b'x', record, "");
        m.extend(member("d/", b'5', b"", ""));
        let err = frames(&m, 512).err().expect("overflow");
        assert!(err.to_string().contains("bad size field"), "{err}");

        let mut m = member("f", b'0', b"data", "");
        m.extend(vec![0u8; 2 * BLOCK]);
        assert!(frames(&m, 4096).is_ok(), "end blocks and padding");
        m.extend(vec![0u8; MAX_AFTER_END as usize + 1]);
        let err = frames(&m, 1 << 16).err().expect("trailing data");
        assert!(err.to_string().contains("follows the end"), "{err}");
    }

    #[test]
    fn padding() {
        assert_eq!(pad(0), 0);
        assert_eq!(pad(1), 511);
        assert_eq!(pad(512), 0);
        assert_eq!(pad(513), 511);
    }
}
