//! The data of a GNU sparse 1.0 tar member, as the agent sends a file with
//! holes: a map (decimal lines: how many regions, then each region's offset
//! and length; padded with zeros to 512 bytes), then the regions' bytes one
//! after another. [`SparseMember`] takes that data piece by piece as it
//! arrives and writes each region where it belongs in a [`SparseFile`];
//! what no region covers stays a hole.
//!
//! The map comes from the agent: it is checked (regions in order, inside
//! the file, at most [`MAX_REGIONS`] of them, the data exactly as long as
//! they are), never trusted.

use crate::sparse::SparseFile;

/// Most regions a map may give (the agent sends at most 65,536 and the
/// end of the file).
const MAX_REGIONS: u64 = 1 << 17;
/// Longest number in a map.
const MAX_DIGITS: usize = 20;
const BLOCK: u64 = 512;

pub(crate) struct SparseMember {
    /// The file's real size.
    size: u64,
    /// While the map comes: the digits of the number being read.
    digits: Vec<u8>,
    /// The numbers read so far (how many regions, offset, length, ...).
    numbers: Vec<u64>,
    /// Map bytes read so far.
    map_bytes: u64,
    /// Once the map is read: zeros of its padding still to come.
    padding: Option<u64>,
    /// Regions still to come, the next one first (reversed map order).
    regions: Vec<(u64, u64)>,
    /// Bytes left of the region being written.
    left: u64,
    /// Where the last region ended.
    end: u64,
}

impl SparseMember {
    /// The data of a sparse member of a file of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        SparseMember {
            size,
            digits: Vec::new(),
            numbers: Vec::new(),
            map_bytes: 0,
            padding: None,
            regions: Vec::new(),
            left: 0,
            end: 0,
        }
    }

    /// Takes the next piece of the member's data, writing what belongs in
    /// the file to `file`.
    pub(crate) fn feed(&mut self, mut data: &[u8], file: &mut SparseFile) -> Result<(), String> {
        while !data.is_empty() {
            match self.padding {
                None => {
                    let (&b, rest) = data.split_first().unwrap_or((&0, &[]));
                    data = rest;
                    self.map_byte(b)?;
                }
                Some(0) => {
                    if self.left == 0 {
                        let Some((offset, len)) = self.regions.pop() else {
                            return Err("more data than its map holds".into());
                        };
                        file.skip_to(offset).map_err(|e| e.to_string())?;
                        self.left = len;
                        continue;
                    }
                    let n = data
                        .len()
                        .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    let (now, rest) = data.split_at(n);
                    file.write(now).map_err(|e| e.to_string())?;
                    self.left -= n as u64;
                    data = rest;
                }
                Some(pad) => {
                    let n = data.len().min(usize::try_from(pad).unwrap_or(usize::MAX));
                    if data[..n].iter().any(|&b| b != 0) {
                        return Err("bad padding after its map".into());
                    }
                    self.padding = Some(pad - n as u64);
                    data = &data[n..];
                }
            }
        }
        Ok(())
    }

    /// The member's data ended: every region must have come whole. Moves
    /// `file` to its real size.
    pub(crate) fn end(&mut self, file: &mut SparseFile) -> Result<(), String> {
        // regions of length 0 (the end of the file) bring no data
        self.regions.retain(|r| r.1 > 0);
        if self.padding != Some(0) || self.left > 0 || !self.regions.is_empty() {
            return Err("its data ended before its map did".into());
        }
        file.skip_to(self.size).map_err(|e| e.to_string())
    }

    fn map_byte(&mut self, b: u8) -> Result<(), String> {
        self.map_bytes += 1;
        match b {
            b'0'..=b'9' if self.digits.len() < MAX_DIGITS => self.digits.push(b),
            b'\n' if !self.digits.is_empty() => {
                let n = std::str::from_utf8(&self.digits)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or("a number too large in its map")?;
                self.digits.clear();
                self.numbers.push(n);
                self.map_number()?;
            }
            _ => return Err("a malformed map".into()),
        }
        Ok(())
    }

    /// Checks the number just read; once the map is whole, turns it into
    /// the regions to write.
    fn map_number(&mut self) -> Result<(), String> {
        let count = self.numbers[0];
        if count > MAX_REGIONS {
            return Err(format!("a map of {count} regions"));
        }
        if self.numbers.len() % 2 == 1 && self.numbers.len() > 1 {
            // a region's offset and length: in order, inside the file
            let (offset, len) = (
                self.numbers[self.numbers.len() - 2],
                self.numbers[self.numbers.len() - 1],
            );
            match offset.checked_add(len) {
                Some(end) if offset >= self.end && end <= self.size => self.end = end,
                _ => return Err("its map's regions are out of order or past its size".into()),
            }
        }
        if self.numbers.len() as u64 == 1 + 2 * count {
            self.regions = self.numbers[1..]
                .chunks(2)
                .rev()
                .map(|r| (r[0], r[1]))
                .collect();
            self.numbers = Vec::new();
            self.padding = Some((BLOCK - self.map_bytes % BLOCK) % BLOCK);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// The data of a sparse member for `regions`, filled with
    /// `fill(offset)`.
    fn member(regions: &[(u64, u64)], fill: impl Fn(u64) -> u8) -> Vec<u8> {
        let mut map = format!("{}\n", regions.len());
        for (o, l) in regions {
            map.push_str(&format!("{o}\n{l}\n"));
        }
        let mut data = map.into_bytes();
        data.resize(data.len().div_ceil(512) * 512, 0);
        for &(o, l) in regions {
            data.extend((o..o + l).map(&fill));
        }
        data
    }

    fn unpack(size: u64, data: &[u8], piece: usize) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut file = SparseFile::new(File::create(&path).expect("create"));
        let mut m = SparseMember::new(size);
        for p in data.chunks(piece) {
            m.feed(p, &mut file)?;
        }
        m.end(&mut file)?;
        file.finish().map_err(|e| e.to_string())?;
        Ok(std::fs::read(&path).expect("read"))
    }

    #[test]
    fn regions_land_where_the_map_says_in_pieces_of_any_size() {
        let size = 300_000;
        let regions = [(0, 10), (5000, 70_000), (200_000, 3), (size, 0)];
        let fill = |o: u64| (o % 251) as u8 + 1;
        let data = member(&regions, fill);
        let mut want = vec![0u8; size as usize];
        for (o, l) in regions {
            for i in o..o + l {
                want[i as usize] = fill(i);
            }
        }
        for piece in [1, 7, 511, 512, 4096, 1 << 20] {
            assert!(
                unpack(size, &data, piece).expect("unpack") == want,
                "{piece}"
            );
        }
        // a file that is all hole
        let data = member(&[(1 << 20, 0)], fill);
        assert_eq!(unpack(1 << 20, &data, 512).expect("hole"), vec![0; 1 << 20]);
    }

    #[test]
    fn bad_maps_and_data_are_errors() {
        let fill = |_| 1u8;
        let size = 10_000;
        for (what, data) in [
            ("out of order", member(&[(100, 10), (50, 10)], fill)),
            ("past its size", member(&[(9_990, 20)], fill)),
            ("overflow", b"1\n18446744073709551615\n2\n".to_vec()),
            ("too many", b"99999999\n".to_vec()),
            ("not a number", b"1\nx\n".to_vec()),
            ("too long a number", b"123456789012345678901234\n".to_vec()),
        ] {
            let err = unpack(size, &data, 100).expect_err(what);
            assert!(!err.is_empty(), "{what}");
        }
        // data shorter or longer than the map says
        let data = member(&[(0, 100)], fill);
        assert!(unpack(size, &data[..data.len() - 1], 100).is_err());
        let mut more = data.clone();
        more.push(1);
        assert!(unpack(size, &more, 100).is_err());
        // the map cut short
        assert!(unpack(size, b"2\n0\n10\n", 100).is_err());
    }
}
