//! File-level restore inside disk images: the backups being served, their
//! volumes and filesystems read in userspace through the [`disk::Disk`]
//! abstraction, and archives streamed out of them.
//!
//! Must never import `api`, `rpc` or `transport`, and never write to a disk.

pub mod acl;
pub mod archive;
pub mod backups;
pub mod disk;
pub mod fs;
pub mod lvm;
pub mod lvm_text;
pub mod probe;
pub mod volume;
