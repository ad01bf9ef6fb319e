//! File-level restore inside disk images: volumes and filesystems, read in
//! userspace through the [`disk::Disk`] abstraction.
//!
//! Must never import `api`, `rpc` or `transport`, and never write to a disk.

pub mod disk;
pub mod fs;
pub mod probe;
pub mod volume;
