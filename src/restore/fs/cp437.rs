//! Code page 437, the IBM PC character set, in which FAT stores short
//! names and volume labels.
//!
//! A short name holds bytes of the writer's OEM code page, which the
//! volume does not record. 437 is the one the Linux kernel reads FAT with
//! unless told otherwise (and so Proxmox's own file restore), and what DOS
//! and US Windows write. Every byte decodes to its own character, so names
//! that differ on disk never come out the same (fatfs on its own turns
//! every byte above 0x7F into U+FFFD).

use fatfs::OemCpConverter;

/// The characters of bytes 0x80..=0xFF; 0x00..=0x7F are ASCII.
const HIGH: [char; 128] = [
    'Ç', 'ü', 'é', 'â', 'ä', 'à', 'å', 'ç', 'ê', 'ë', 'è', 'ï', 'î', 'ì', 'Ä', 'Å', 'É', 'æ', 'Æ',
    'ô', 'ö', 'ò', 'û', 'ù', 'ÿ', 'Ö', 'Ü', '¢', '£', '¥', '₧', 'ƒ', 'á', 'í', 'ó', 'ú', 'ñ', 'Ñ',
    'ª', 'º', '¿', '⌐', '¬', '½', '¼', '¡', '«', '»', '░', '▒', '▓', '│', '┤', '╡', '╢', '╖', '╕',
    '╣', '║', '╗', '╝', '╜', '╛', '┐', '└', '┴', '┬', '├', '─', '┼', '╞', '╟', '╚', '╔', '╩', '╦',
    '╠', '═', '╬', '╧', '╨', '╤', '╥', '╙', '╘', '╒', '╓', '╫', '╪', '┘', '┌', '█', '▄', '▌', '▐',
    '▀', 'α', 'ß', 'Γ', 'π', 'Σ', 'σ', 'µ', 'τ', 'Φ', 'Θ', 'Ω', 'δ', '∞', 'φ', 'ε', '∩', '≡', '±',
    '≥', '≤', '⌠', '⌡', '÷', '≈', '°', '∙', '·', '√', 'ⁿ', '²', '■', '\u{a0}',
];

/// Code page 437 for fatfs's `FsOptions::oem_cp_converter`.
#[derive(Debug)]
pub struct Cp437;

pub static CP437: Cp437 = Cp437;

impl OemCpConverter for Cp437 {
    fn decode(&self, byte: u8) -> char {
        decode(byte)
    }

    fn encode(&self, c: char) -> Option<u8> {
        if c.is_ascii() {
            return Some(c as u8);
        }
        let i = HIGH.iter().position(|&h| h == c)?;
        u8::try_from(0x80 + i).ok()
    }
}

/// The character of one byte.
pub fn decode(byte: u8) -> char {
    match byte.checked_sub(0x80) {
        Some(i) => HIGH[usize::from(i)],
        None => char::from(byte),
    }
}

/// A label field (boot sector or root directory entry): its bytes decoded,
/// trailing spaces and NULs left out; `None` when nothing is left.
pub fn label(bytes: &[u8]) -> Option<String> {
    let s: String = bytes.iter().map(|&b| decode(b)).collect();
    let s = s.trim_end_matches(['\0', ' ']);
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips_to_its_own_character() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = decode(b);
            assert!(seen.insert(c), "{b:#x} decodes to a character seen before");
            assert_eq!(CP437.encode(c), Some(b));
        }
        assert_eq!(decode(0x8E), 'Ä');
        assert_eq!(decode(0x9A), 'Ü');
        assert_eq!(decode(0xE1), 'ß');
        assert_eq!(CP437.encode('€'), None);
    }

    #[test]
    fn labels_are_trimmed() {
        assert_eq!(label(b"\x8EPFEL     ").as_deref(), Some("ÄPFEL"));
        assert_eq!(label(b"           "), None);
        assert_eq!(label(b"DATA\0\0\0\0\0\0\0").as_deref(), Some("DATA"));
    }
}
