//! Application errors shared by every layer below `rpc`.
//!
//! `store`, `pool` and `restore` report failures as an [`Error`] carrying an
//! [`ErrorKind`]; the `rpc` layer turns the kind into the pinned JSON-RPC
//! application code (1001..1008) and the message into the error message.
//! This module must never depend on any other module of the crate.

use std::fmt;
use std::io;

/// What went wrong, as the client sees it. The discriminants are the
/// protocol's pinned application error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound = 1001,
    NotADirectory = 1002,
    IsADirectory = 1003,
    Corrupt = 1004,
    Unsupported = 1005,
    InvalidPath = 1006,
    Io = 1007,
    UnknownStream = 1008,
}

impl ErrorKind {
    /// The JSON-RPC error code of this kind.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// An application error: a kind and a message that names the object concerned
/// (a file, a digest, a path), never secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// For the failure of an archive stream (`fs.extract`): the member
    /// (its path as in the archive) whose data or listing could not be
    /// read. The stream can be resumed after it; see `Filesystem::walk`.
    pub member: Option<Vec<u8>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            member: None,
        }
    }
    /// This error, as the failure of archive member `member`. An empty
    /// path (the top of a walk of the volume's root) names no member to go
    /// on after: the error stays the whole walk's.
    pub fn at_member(mut self, member: &[u8]) -> Self {
        if !member.is_empty() {
            self.member = Some(member.to_vec());
        }
        self
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn invalid_path(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidPath, message)
    }
    /// An I/O error on `what` (a file name); a missing file is `NotFound`.
    pub fn io(what: impl fmt::Display, err: &io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            // what a read found malformed (a datastore file that is no
            // regular file, see `store::file`)
            io::ErrorKind::InvalidData => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{what}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
