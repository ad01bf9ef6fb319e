//! File-level restore: turning the contents of backed-up disk images into
//! listings, file reads and archive streams.

pub mod archive;
