//! Human output: aligned tables, sizes, times and `ls -l` mode strings, and
//! names made safe to show on a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

use restore_agent::calendar::civil_from_days;

/// `s` with its control characters escaped (`\n`, `\t`, `\r`, `\x1b`,
/// `\x9b`), and the characters that reorder text (`\u{202e}`). Names and
/// messages come from the backup: shown as they are, an escape sequence in a
/// file name would drive the user's terminal, a line break would make one
/// name look like two, and a right-to-left override would show `gpj.exe`
/// as `exe.jpg`. `--output json` keeps the exact names.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` bytes (at a character boundary), saying how
/// long it was: an agent's message, or an answer quoted in one, can be
/// megabytes long (a hostile agent sent 60 MiB), more than a person reads.
pub fn shortened(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes in all)", &s[..end], s.len()))
}

fn needs_escape(c: char) -> bool {
    c.is_control() || reorders(c)
}

/// The bidirectional formatting characters: marks, embeddings, overrides
/// and isolates.
fn reorders(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        // Every control character is below U+00A0: two hex digits.
        c if c.is_control() => {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        }
        c if reorders(c) => {
            let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// Name or path bytes for people: UTF-8 as [`printable`] shows it, a
/// backslash as `\\` and any byte that is not UTF-8 as `\xNN`, so that
/// names differing only there stay apart (a name holding a line break and
/// one holding a backslash and an `n` look different).
pub fn printable_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                push_escaped(&mut out, c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A size like `ls -h`: `512`, `1.5K`, `23M`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

/// `n` and the noun: `1 file`, `2 files`, `0 files`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM` (UTC).
pub fn time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// `drwxr-xr-x` from an entry type and its permission bits.
pub fn mode(kind: &str, mode: u32) -> String {
    let first = match kind {
        "dir" => 'd',
        "symlink" => 'l',
        "block" => 'b',
        "char" => 'c',
        "fifo" => 'p',
        "socket" => 's',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(first);
    let specials = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (i, (special, set, unset)) in specials.iter().enumerate() {
        let shift = 6 - 3 * i;
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & special != 0, x) {
            (true, true) => *set,
            (true, false) => *unset,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// Column alignment in a [`table`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Rows padded into aligned columns, two spaces apart; no trailing spaces.
/// With `header`, it is the first row.
pub fn table(header: Option<&[&str]>, align: &[Align], rows: &[Vec<String>]) -> String {
    let mut all: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    if let Some(h) = header {
        all.push(h.iter().map(|s| s.to_string()).collect());
    }
    all.extend(
        rows.iter()
            .map(|row| row.iter().map(|c| printable(c).into_owned()).collect()),
    );
    let columns = all.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in &all {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i] - cell.chars().count();
            let last = i + 1 == row.len();
            if align.get(i) == Some(&Align::Right) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        // A name keeps its trailing spaces; an empty last cell leaves none.
        if row.last().is_some_and(String::is_empty) {
            line.truncate(line.trim_end().len());
        }
        out.push_str(&line);
        out.push('\n');
    }
    if out.ends_with('\n') {
        out.pop();
    }
    out
}

/// An extended attribute's value as getfattr shows it: printable text in
/// quotes, anything else as 0x hex.
pub fn xattr_value(v: &[u8]) -> String {
    let text = std::str::from_utf8(v)
        .ok()
        .map(|t| t.strip_suffix('\0').unwrap_or(t))
        .filter(|t| !t.is_empty() && t.chars().all(|c| !c.is_control()));
    match text {
        Some(t) => format!("{t:?}"),
        None if v.is_empty() => "\"\"".to_string(),
        None => {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_shortened_at_a_character() {
        assert_eq!(shortened("abc", 3), "abc");
        assert_eq!(shortened("aé€", 3), "aé... (6 bytes in all)");
        assert_eq!(
            shortened(&"x".repeat(10_000), 4),
            "xxxx... (10000 bytes in all)"
        );
    }

    #[test]
    fn counts_take_the_singular_only_for_one() {
        assert_eq!(count(0, "file", "files"), "0 files");
        assert_eq!(count(1, "hard link", "hard links"), "1 hard link");
        assert_eq!(count(48_000, "file", "files"), "48000 files");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0");
        assert_eq!(size(1023), "1023");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(100 << 20), "100M");
        assert_eq!(size(5 << 30), "5.0G");
    }

    #[test]
    fn times() {
        assert_eq!(time(0), "1970-01-01 00:00");
        assert_eq!(time(1_767_225_600), "2026-01-01 00:00");
        assert_eq!(time(951_782_400 + 3_723), "2000-02-29 01:02");
        assert_eq!(time(-86_400), "1969-12-31 00:00");
    }

    #[test]
    fn modes() {
        assert_eq!(mode("dir", 0o755), "drwxr-xr-x");
        assert_eq!(mode("file", 0o4755), "-rwsr-xr-x");
        assert_eq!(mode("dir", 0o1777), "drwxrwxrwt");
        assert_eq!(mode("symlink", 0o777), "lrwxrwxrwx");
        assert_eq!(mode("file", 0o2640), "-rw-r-S---");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(printable("plain ü name"), Cow::Borrowed(_)));
        assert_eq!(printable("new\nline\ttab\r"), "new\\nline\\ttab\\r");
        assert_eq!(
            printable("\u{1b}]0;title\u{7}x\u{7f}\u{9b}"),
            "\\x1b]0;title\\x07x\\x7f\\x9b"
        );
        let t = table(None, &[Align::Left], &[vec!["a\u{1b}[2Jb".into()]]);
        assert_eq!(t, "a\\x1b[2Jb");
        assert_eq!(
            printable_bytes(b"bad\xff\xfename\n\xc3\xbc"),
            "bad\\xff\\xfename\\n\u{fc}"
        );
        // a line break and a backslash followed by `n` stay apart, and
        // a right-to-left override is shown, not obeyed
        assert_eq!(printable_bytes(b"a\nb"), "a\\nb");
        assert_eq!(printable_bytes(b"a\\nb"), "a\\\\nb");
        assert_eq!(printable("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        // a table keeps what the names are, trailing spaces included
        let t = table(
            None,
            &[Align::Left, Align::Left],
            &[vec!["1".into(), "name ".into()]],
        );
        assert_eq!(t, "1  name ");
        assert_eq!(
            table(None, &[Align::Left], &[vec![printable_bytes(b"a\\b")]]),
            "a\\\\b"
        );
    }

    #[test]
    fn tables_align() {
        let t = table(
            Some(&["NAME", "SIZE"]),
            &[Align::Left, Align::Right],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "100".into()],
            ],
        );
        assert_eq!(t, "NAME    SIZE\na          1\nlonger   100");
    }
}
