//! [`FsHandle`]: an open filesystem living on its own thread.
//!
//! Owns: the thread that holds a filesystem reader (ext4-view is `!Send`),
//! the job queue to it, and panic containment for jobs. Callers send
//! closures and await their results; jobs for one filesystem run one after
//! another. The thread ends when the last handle clone is dropped.
//! [`FsHandle::open`] blocks while it reads the volume's metadata (call it
//! from `spawn_blocking`); [`FsHandle::run`] only awaits.
//! Must never run filesystem work on an async executor thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::restore::disk::{Disk, Layout};
use crate::restore::fs::btrfs::BtrfsBackend;
use crate::restore::fs::ext::ExtBackend;
use crate::restore::fs::fat::{self, FatBackend};
use crate::restore::fs::ntfs::NtfsBackend;
use crate::restore::fs::tree::Tree;
use crate::restore::fs::xfs::XfsBackend;
use crate::restore::fs::Filesystem;
use crate::restore::probe::{probe_kind, FsKind};
use crate::restore::volume::{volume_layout, Siblings};

type Job = Box<dyn FnOnce(&mut dyn Filesystem) + Send>;

/// Serves jobs from `queue` until every sender is gone.
fn serve_jobs(fs: &mut dyn Filesystem, queue: &mpsc::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        job(fs);
    }
}

/// Opens the reader for a detected filesystem on this thread, reports
/// the outcome on `ready`, then serves jobs. FAT's reader borrows its
/// filesystem object, so that object lives in this stack frame.
fn serve(
    kind: FsKind,
    disk: Arc<dyn Disk>,
    ready: mpsc::SyncSender<Result<()>>,
    queue: mpsc::Receiver<Job>,
) {
    let report = |r: Result<()>| ready.send(r).is_ok();
    match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => match ExtBackend::open(disk) {
            Ok(b) if report(Ok(())) => serve_jobs(&mut Tree::new(b), &queue),
            Ok(_) => {}
            Err(e) => {
                report(Err(e));
            }
        },
        FsKind::Vfat => match fat::open(disk) {
            Ok(fat) if report(Ok(())) => serve_jobs(&mut Tree::new(FatBackend::new(&fat)), &queue),
            Ok(_) => {}
            Err(e) => {
                report(Err(e));
            }
        },
        FsKind::Ntfs => match NtfsBackend::open(disk) {
            Ok(b) if report(Ok(())) => serve_jobs(&mut Tree::new(b), &queue),
            Ok(_) => {}
            Err(e) => {
                report(Err(e));
            }
        },
        FsKind::Xfs => match XfsBackend::open(disk) {
            Ok(b) if report(Ok(())) => serve_jobs(&mut Tree::new(b), &queue),
            Ok(_) => {}
            Err(e) => {
                report(Err(e));
            }
        },
        FsKind::Btrfs => match BtrfsBackend::open(disk) {
            Ok(b) if report(Ok(())) => serve_jobs(&mut Tree::new(b), &queue),
            Ok(_) => {}
            Err(e) => {
                report(Err(e));
            }
        },
    }
}

/// A handle to one open filesystem; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct FsHandle {
    jobs: mpsc::Sender<Job>,
    kind: FsKind,
    layout: Arc<Layout>,
    /// the names of the sibling disks the layout's runs use (disk 1 is the
    /// first)
    siblings: Arc<[String]>,
}

impl FsHandle {
    /// Opens the filesystem of `volume` (`part/N`, `lvm/VG/LV` or `raw`) of
    /// `disk` on a new thread.
    /// Blocks while the superblock and metadata are read. Errors 1005 when
    /// the volume holds no filesystem this agent reads.
    pub fn open(disk: Arc<dyn Disk>, volume: &str) -> Result<FsHandle> {
        FsHandle::open_in_backup(disk, volume, &Vec::new)
    }

    /// [`open`](Self::open) for a disk of a backup whose other disks are
    /// `siblings`, which a logical volume may lie on too.
    pub fn open_in_backup(
        disk: Arc<dyn Disk>,
        volume: &str,
        siblings: Siblings,
    ) -> Result<FsHandle> {
        // the partition table is read once: the layout is both the volume
        // and what `FileMap` offsets are relative to
        let placed = volume_layout(&disk, volume, siblings)?;
        let layout = Arc::new(placed.layout);
        let mut disks = vec![disk];
        let mut names = Vec::new();
        for (name, sibling) in placed.siblings {
            names.push(name);
            disks.push(sibling);
        }
        let siblings: Arc<[String]> = names.into();
        let vol = layout.open(&disks);
        // (the reader opened below recovers an XFS log itself)
        let probed = probe_kind(&vol)?;
        let kind = match (probed.fs, probed.unsupported) {
            (Some(k), None) => k,
            (_, Some(why)) => {
                return Err(Error::new(
                    why.kind,
                    format!("volume {volume}: {}", why.message),
                ))
            }
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
                let failed = ready_tx.clone();
                let run = catch_unwind(AssertUnwindSafe(move || serve(kind, vol, ready_tx, queue)));
                if run.is_err() {
                    // a panic while opening (after it, jobs catch their own)
                    let _ = failed.try_send(Err(Error::corrupt(format!(
                        "volume {label}: the filesystem reader failed while opening it"
                    ))));
                }
            })
            .map_err(|e| Error::io("filesystem thread", &e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(FsHandle {
                jobs,
                kind,
                layout,
                siblings,
            }),
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

    /// Where the volume lies on its disk (a partition clipped to the
    /// disk). [`FileMap`](super::FileMap) offsets are volume offsets.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The names of the sibling disks the layout's disks 1, 2, ... are.
    pub fn siblings(&self) -> &[String] {
        &self.siblings
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
