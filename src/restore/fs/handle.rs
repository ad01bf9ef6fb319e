//! [`FsHandle`]: an open filesystem living on its own thread.
//!
//! Owns: the thread that holds a filesystem reader (ext4-view is `!Send`),
//! the job queue to it, and panic containment for jobs. Callers send
//! closures and await their results; jobs for one filesystem run one after
//! another. The thread ends when the last handle clone is dropped.
//! Must never block an async executor thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::Disk;
use crate::restore::fs::ext::ExtBackend;
use crate::restore::fs::fat::FatBackend;
use crate::restore::fs::ntfs::NtfsBackend;
use crate::restore::fs::tree::Tree;
use crate::restore::fs::Filesystem;
use crate::restore::probe::{probe, FsKind};
use crate::restore::volume::open_volume;

type Job = Box<dyn FnOnce(&mut dyn Filesystem) + Send>;

/// Opens the reader for a detected filesystem (on the calling thread).
pub fn open_filesystem(kind: FsKind, disk: Arc<dyn Disk>) -> Result<Box<dyn Filesystem>> {
    Ok(match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Box::new(Tree::new(ExtBackend::open(disk)?)),
        FsKind::Vfat => Box::new(Tree::new(FatBackend::open(disk)?)),
        FsKind::Ntfs => Box::new(Tree::new(NtfsBackend::open(disk)?)),
    })
}

/// A handle to one open filesystem; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct FsHandle {
    jobs: mpsc::Sender<Job>,
    kind: FsKind,
}

impl FsHandle {
    /// Opens the filesystem of `volume` (`part/N` or `raw`) on a new thread.
    /// Blocks while the superblock and metadata are read. Errors 1005 when
    /// the volume holds no filesystem this agent reads.
    pub fn open(disk: Arc<dyn Disk>, volume: &str) -> Result<FsHandle> {
        let vol = open_volume(disk, volume)?;
        let probed = probe(&vol)?;
        let kind = match (probed.fs, probed.unsupported) {
            (Some(k), None) => k,
            (_, Some(why)) => return Err(Error::unsupported(format!("volume {volume}: {why}"))),
            (None, None) => {
                return Err(Error::unsupported(format!(
                    "volume {volume}: no known filesystem"
                )))
            }
        };
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let label = volume.to_string();
        std::thread::Builder::new()
            .name(format!("fs {volume}"))
            .spawn(move || {
                let opened = catch_unwind(AssertUnwindSafe(|| open_filesystem(kind, vol)))
                    .unwrap_or_else(|_| {
                        Err(Error::corrupt(format!(
                            "volume {label}: the filesystem reader failed while opening it"
                        )))
                    });
                let mut fs = match opened {
                    Ok(fs) => {
                        let _ = ready_tx.send(Ok(()));
                        fs
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = queue.recv() {
                    job(&mut *fs);
                }
            })
            .map_err(|e| Error::io("filesystem thread", &e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(FsHandle { jobs, kind }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                ErrorKind::Io,
                format!("volume {volume}: filesystem thread ended"),
            )),
        }
    }

    /// The filesystem type.
    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// Runs `job` on the filesystem's thread and returns its result. A
    /// panic inside the job (a crate choking on garbage) becomes 1004.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut dyn Filesystem) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let wrapped: Job = Box::new(move |fs| {
            let r = catch_unwind(AssertUnwindSafe(|| job(fs)));
            let _ = tx.send(r);
        });
        self.jobs
            .send(wrapped)
            .map_err(|_| Error::new(ErrorKind::Io, "filesystem thread has stopped"))?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Error::corrupt(
                "the filesystem reader failed: corrupt filesystem",
            )),
            Err(_) => Err(Error::new(ErrorKind::Io, "filesystem thread has stopped")),
        }
    }
}
