//! LVM2's text metadata format (the "config" syntax `vgcreate` writes into
//! a physical volume's metadata area) parsed into a tree of sections.
//!
//! The syntax: `name = value` assignments and `name { ... }` sections;
//! values are integers, double-quoted strings (`\` escapes the next
//! character) and `[ ... ]` lists of values separated by commas; `#`
//! starts a comment that runs to the end of the line.
//!
//! Owns: the syntax only; what the sections mean is `lvm`'s. Must never
//! panic or recurse without bound on hostile text: nesting is limited to
//! [`MAX_DEPTH`], and the tree is never larger than the text.

use std::fmt;

/// Deepest nesting of sections and lists accepted (a volume group's
/// metadata nests 4 deep: VG, `logical_volumes`, LV, segment).
const MAX_DEPTH: usize = 16;

/// A value of an assignment, or a section.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    /// Numbers with a fraction, kept as written (LVM writes none that
    /// matter here).
    Float(String),
    Str(String),
    List(Vec<Value>),
    Section(Section),
}

/// A section's items in order: assignments and subsections by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Section {
    pub items: Vec<(String, Value)>,
}

impl Section {
    /// The first item called `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.items.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn list(&self, key: &str) -> Option<&[Value]> {
        match self.get(key)? {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    pub fn section(&self, key: &str) -> Option<&Section> {
        match self.get(key)? {
            Value::Section(s) => Some(s),
            _ => None,
        }
    }

    /// The subsections, with their names, in order.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Section)> {
        self.items.iter().filter_map(|(k, v)| match v {
            Value::Section(s) => Some((k.as_str(), s)),
            _ => None,
        })
    }

    /// Whether the list `key` holds the string `flag` (`status = [...]`).
    pub fn has_flag(&self, key: &str, flag: &str) -> bool {
        self.list(key)
            .is_some_and(|l| l.iter().any(|v| matches!(v, Value::Str(s) if s == flag)))
    }
}

/// Where and why the text does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub what: &'static str,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.what)
    }
}

/// Parses a whole metadata text into its top-level section.
pub fn parse(text: &[u8]) -> Result<Section, SyntaxError> {
    let mut p = Parser {
        text,
        at: 0,
        line: 1,
    };
    let top = p.items(0)?;
    p.skip_blank();
    if p.at < text.len() {
        return Err(p.error("text after the end of the metadata"));
    }
    Ok(top)
}

struct Parser<'t> {
    text: &'t [u8],
    at: usize,
    line: usize,
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'.' | b'-')
}

impl Parser<'_> {
    fn error(&self, what: &'static str) -> SyntaxError {
        SyntaxError {
            line: self.line,
            what,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    /// Skips white space, NUL padding and comments.
    fn skip_blank(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b'\n' => {
                    self.line += 1;
                    self.at += 1;
                }
                b' ' | b'\t' | b'\r' | 0 => self.at += 1,
                b'#' => {
                    while self.peek().is_some_and(|b| b != b'\n') {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    /// Items up to a closing `}` (left unread) or the end of the text.
    fn items(&mut self, depth: usize) -> Result<Section, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error("sections nested too deep"));
        }
        let mut section = Section::default();
        loop {
            self.skip_blank();
            match self.peek() {
                None | Some(b'}') => return Ok(section),
                Some(b) if is_name_byte(b) => {}
                Some(_) => return Err(self.error("a name was expected")),
            }
            let start = self.at;
            while self.peek().is_some_and(is_name_byte) {
                self.at += 1;
            }
            let name = String::from_utf8_lossy(&self.text[start..self.at]).into_owned();
            self.skip_blank();
            match self.peek() {
                Some(b'{') => {
                    self.at += 1;
                    let inner = self.items(depth + 1)?;
                    self.skip_blank();
                    if self.peek() != Some(b'}') {
                        return Err(self.error("a section is not closed"));
                    }
                    self.at += 1;
                    section.items.push((name, Value::Section(inner)));
                }
                Some(b'=') => {
                    self.at += 1;
                    let value = self.value(depth + 1)?;
                    section.items.push((name, value));
                }
                _ => return Err(self.error("'=' or '{' was expected after a name")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error("lists nested too deep"));
        }
        self.skip_blank();
        match self.peek() {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'[') => {
                self.at += 1;
                let mut list = Vec::new();
                loop {
                    self.skip_blank();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                        return Ok(Value::List(list));
                    }
                    if !list.is_empty() {
                        if self.peek() != Some(b',') {
                            return Err(self.error("',' or ']' was expected in a list"));
                        }
                        self.at += 1;
                    }
                    list.push(self.value(depth + 1)?);
                }
            }
            Some(b) if b == b'-' || b.is_ascii_digit() => {
                let start = self.at;
                self.at += 1;
                while self.peek().is_some_and(|b| b.is_ascii_digit() || b == b'.') {
                    self.at += 1;
                }
                let word = std::str::from_utf8(&self.text[start..self.at]).unwrap_or_default();
                if word.contains('.') {
                    return Ok(Value::Float(word.to_string()));
                }
                word.parse()
                    .map(Value::Int)
                    .map_err(|_| self.error("a number out of range"))
            }
            _ => Err(self.error("a value was expected")),
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        self.at += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("a string is not closed")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    let escaped = self
                        .text
                        .get(self.at + 1)
                        .copied()
                        .ok_or_else(|| self.error("a string is not closed"))?;
                    out.push(escaped);
                    self.at += 2;
                }
                Some(b) => {
                    if b == b'\n' {
                        self.line += 1;
                    }
                    out.push(b);
                    self.at += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VG: &str = r#"vg0 {
id = "Tzzvu4-JT6Q-mZ0d-PHmk-0cgQ-qsUb-WAnIfU"
seqno = 3
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192	# 4 Megabytes

physical_volumes {

pv0 {
id = "u3S1k2-GGcJ-cYrT-Ihvt-XqFp-0pAj-oIDywh"
device = "/dev/loop0"	# Hint only
pe_start = 2048
pe_count = 15	# 60 Megabytes
}
}

logical_volumes {

root {
segment_count = 1

segment1 {
start_extent = 0
extent_count = 2	# 8 Megabytes
type = "striped"
stripe_count = 1	# linear
stripes = [
"pv0", 0
]
}
}
}

}
# Generated by LVM2 version 2.03.16(2) (2022-05-18): Mon Dec  7 08:17:24 2026

contents = "Text Format Volume Group"
version = 1
description = "Write from \"lvcreate\" -n root"
creation_time = 1796631444	# Mon Dec  7 08:17:24 2026
"#;

    #[test]
    fn parses_what_vgcreate_writes() {
        let top = parse(VG.as_bytes()).unwrap();
        assert_eq!(top.int("version"), Some(1));
        assert_eq!(
            top.str("description"),
            Some(r#"Write from "lvcreate" -n root"#)
        );
        let names: Vec<&str> = top.sections().map(|(n, _)| n).collect();
        assert_eq!(names, ["vg0"]);
        let vg = top.section("vg0").unwrap();
        assert_eq!(vg.int("extent_size"), Some(8192));
        assert!(vg.has_flag("status", "WRITE") && !vg.has_flag("flags", "WRITE"));
        let pv = vg
            .section("physical_volumes")
            .unwrap()
            .section("pv0")
            .unwrap();
        assert_eq!(pv.int("pe_start"), Some(2048));
        let seg = vg
            .section("logical_volumes")
            .unwrap()
            .section("root")
            .unwrap()
            .section("segment1")
            .unwrap();
        assert_eq!(
            seg.list("stripes").unwrap(),
            [Value::Str("pv0".into()), Value::Int(0)]
        );
    }

    #[test]
    fn bad_text_is_an_error_never_a_panic() {
        let cases: &[(&str, &str)] = &[
            ("vg {", "a section is not closed"),
            ("a = \"x", "a string is not closed"),
            ("a = [1 2]", "',' or ']' was expected in a list"),
            ("a = 99999999999999999999", "a number out of range"),
            ("a b", "'=' or '{' was expected after a name"),
            ("}", "text after the end of the metadata"),
            ("= 1", "a name was expected"),
            ("a = ", "a value was expected"),
            ("a = \"x\\", "a string is not closed"),
        ];
        for (text, want) in cases {
            let err = parse(text.as_bytes()).unwrap_err();
            assert_eq!(err.what, *want, "{text:?}");
        }
        let deep = "a { ".repeat(100) + &"} ".repeat(100);
        assert_eq!(
            parse(deep.as_bytes()).unwrap_err().what,
            "sections nested too deep"
        );
        let deep = "a = ".to_string() + &"[".repeat(100);
        assert_eq!(
            parse(deep.as_bytes()).unwrap_err().what,
            "lists nested too deep"
        );
        // every prefix of real metadata parses or fails cleanly
        for end in 0..VG.len() {
            let _ = parse(&VG.as_bytes()[..end]);
        }
    }

    #[test]
    fn padding_comments_and_errors_carry_their_line() {
        let top = parse(b"# c\na = -5 # d\nb = 1.5\n\0\0\0").unwrap();
        assert_eq!(top.int("a"), Some(-5));
        assert_eq!(top.get("b"), Some(&Value::Float("1.5".into())));
        assert_eq!(parse(b"a = 1\n\nb = ?").unwrap_err().line, 3);
    }
}
