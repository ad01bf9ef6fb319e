//! The ticket: loaded once from its file, compared in constant time, never
//! printed (its `Debug` is redacted).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub struct Ticket(Vec<u8>);

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(<redacted>)")
    }
}

impl Ticket {
    /// Reads the ticket file: its content minus one trailing newline. A
    /// missing, unreadable or empty file is an error for the command line.
    pub fn load(path: &Path) -> Result<Ticket, String> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read ticket file {}: {e}", path.display()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(format!("ticket file {} is empty", path.display()));
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "ticket file {} is readable by group or others (mode {:o})",
                    path.display(),
                    meta.permissions().mode() & 0o777
                );
            }
        }
        Ok(Ticket(bytes))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Ticket {
        Ticket(bytes)
    }

    /// Compares every byte of the longer of the two, so the time taken says
    /// nothing about where a guess first differs.
    pub fn matches(&self, guess: &[u8]) -> bool {
        let len = self.0.len().max(guess.len());
        let mut diff = u8::from(self.0.len() != guess.len());
        for i in 0..len {
            let a = self.0.get(i).copied().unwrap_or(0);
            let b = guess.get(i).copied().unwrap_or(0);
            diff |= std::hint::black_box(a ^ b);
        }
        diff == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_ticket() {
        let t = Ticket::from_bytes(b"secret".to_vec());
        assert!(t.matches(b"secret"));
        for g in [&b"secre"[..], b"secret!", b"Secret", b"", b"secret\0"] {
            assert!(!t.matches(g));
        }
        assert_eq!(format!("{t:?}"), "Ticket(<redacted>)");
    }

    #[test]
    fn load_strips_one_newline_and_refuses_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "abc\n\n").unwrap();
        assert!(Ticket::load(&p).unwrap().matches(b"abc\n"));
        std::fs::write(&p, "\n").unwrap();
        assert!(Ticket::load(&p).is_err());
        assert!(Ticket::load(&dir.path().join("missing")).is_err());
    }
}
