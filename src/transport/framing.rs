//! Line framing: one message per `\n`-terminated line, split at the byte level.
//!
//! `LinesCodec` is not used because `FramedRead` ends the stream after any
//! decoder error (invalid UTF-8, over-long line). This decoder never errors on
//! content: it yields [`Frame::TooLong`] for an over-long line (whose rest is
//! then discarded without buffering it) and leaves UTF-8 and JSON checks to the
//! layer above. It strips one trailing `\r`, skips leading 0xFF bytes (the
//! qemu-guest-agent sync sentinel) and drops whitespace-only lines.

use bytes::{Buf, BytesMut};
use std::io;
use tokio_util::codec::Decoder;

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One line without its terminator; never empty or whitespace-only.
    Line(BytesMut),
    /// A line longer than the limit; reported once, as soon as it is detected.
    TooLong,
}

pub struct LineDecoder {
    max_len: usize,
    /// How far the current buffer has been searched for `\n`.
    scanned: usize,
    /// Inside an over-long line: drop bytes until the next `\n`.
    discarding: bool,
}

impl LineDecoder {
    /// `max_len` is the longest accepted line, terminator excluded.
    pub fn new(max_len: usize) -> Self {
        LineDecoder {
            max_len,
            scanned: 0,
            discarding: false,
        }
    }

    /// Cleans a raw line; `None` if nothing is left of it.
    pub fn finish_line(mut line: BytesMut) -> Option<BytesMut> {
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        let sentinels = line.iter().take_while(|&&b| b == 0xFF).count();
        line.advance(sentinels);
        if line.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(line)
        }
    }
}

impl Decoder for LineDecoder {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        loop {
            // memchr: a bulk answer is a line of several MiB arriving in
            // socket-sized pieces; a byte loop here cost a third of the
            // client's CPU time.
            let newline = memchr::memchr(b'\n', &buf[self.scanned..]).map(|i| i + self.scanned);
            if self.discarding {
                match newline {
                    Some(end) => {
                        buf.advance(end + 1);
                        self.scanned = 0;
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        buf.clear();
                        self.scanned = 0;
                        return Ok(None);
                    }
                }
            }
            match newline {
                Some(end) => {
                    let mut line = buf.split_to(end + 1);
                    self.scanned = 0;
                    line.truncate(end);
                    let content = end - usize::from(line.last() == Some(&b'\r'));
                    if content > self.max_len {
                        return Ok(Some(Frame::TooLong));
                    }
                    if let Some(line) = Self::finish_line(line) {
                        return Ok(Some(Frame::Line(line)));
                    }
                }
                // One byte of slack for a `\r` that may precede the `\n`.
                None if buf.len() > self.max_len + 1 => {
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    return Ok(Some(Frame::TooLong));
                }
                None => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        // A last line without its `\n` still counts; a discarded tail does not.
        self.scanned = 0;
        if self.discarding || buf.is_empty() {
            buf.clear();
            return Ok(None);
        }
        let line = buf.split();
        Ok(Self::finish_line(line).map(Frame::Line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut dec = LineDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        while let Some(f) = dec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &[u8]) -> Frame {
        Frame::Line(BytesMut::from(s))
    }

    #[test]
    fn splits_strips_and_skips() {
        let got = frames(100, &[b"{\"a\":1}\r\n\xff\xff{\"b\":2}\n \t\n\n{\"c\":3}"]);
        assert_eq!(
            got,
            vec![line(b"{\"a\":1}"), line(b"{\"b\":2}"), line(b"{\"c\":3}")]
        );
    }

    #[test]
    fn byte_by_byte() {
        let input = b"ab\ncd\r\n";
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(frames(100, &chunks), vec![line(b"ab"), line(b"cd")]);
    }

    #[test]
    fn over_long_line_is_reported_once_and_discarded() {
        let long = [b'x'; 50];
        let got = frames(10, &[&long[..20], &long[20..], b"\nok\n"]);
        assert_eq!(got, vec![Frame::TooLong, line(b"ok")]);
        // Exactly at the limit, with CRLF, is fine; one more byte is not.
        let got = frames(3, &[b"abc\r\nabcd\nz\n"]);
        assert_eq!(got, vec![line(b"abc"), Frame::TooLong, line(b"z")]);
    }

    #[test]
    fn invalid_utf8_passes_through_for_the_layer_above() {
        assert_eq!(frames(10, &[b"\xc3\x28\n"]), vec![line(b"\xc3\x28")]);
    }
}
