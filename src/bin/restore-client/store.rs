//! `store init|import-image|verify`: commands on a local datastore directory
//! (no agent involved).

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use restore_agent::error::Error;
use restore_agent::store::import;

use crate::{fmt, Outcome};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Create a datastore (DIR/.chunks/0000..ffff).
    Init {
        /// Datastore directory (created if missing).
        dir: PathBuf,
    },
    /// Import a raw disk image (file or block device) as a fixed-index archive.
    ImportImage {
        /// Datastore directory.
        #[arg(long)]
        store: PathBuf,
        /// Snapshot, e.g. vm/100/2026-01-01T00:00:00Z or ns/prod/vm/100/2026-01-01T00:00:00Z.
        #[arg(long)]
        snapshot: String,
        /// Archive name, e.g. drive-scsi0.img (written as drive-scsi0.img.fidx).
        #[arg(long)]
        archive: String,
        /// The image file or block device.
        image: PathBuf,
    },
    /// Read and check every chunk of a snapshot (default: of all snapshots).
    Verify {
        /// Datastore directory.
        #[arg(long)]
        store: PathBuf,
        /// Only this snapshot.
        snapshot: Option<String>,
    },
}

pub fn run_store(cmd: StoreCommand) -> Result<Outcome, Error> {
    match cmd {
        StoreCommand::Init { dir } => {
            import::init(&dir)?;
            Ok(Outcome {
                json: serde_json::json!({ "store": dir }),
                text: format!("created datastore {}", dir.display()),
                problems: Vec::new(),
            })
        }
        StoreCommand::ImportImage {
            store,
            snapshot,
            archive,
            image,
        } => {
            let bar = progress_bar();
            let report = import::import_image(&store, &snapshot, &archive, &image, &|d, t| {
                show(&bar, d, t)
            });
            finish(bar);
            let r = report?;
            let text = format!(
                "imported {} as {}/{}: {} in {} ({} new, {} reused), {} stored, {:.1} s",
                image.display(),
                r.snapshot,
                r.archive,
                fmt::count(r.size, "byte", "bytes"),
                fmt::count(r.chunks as u64, "chunk", "chunks"),
                r.new_chunks,
                r.reused_chunks,
                fmt::count(r.stored_bytes, "byte", "bytes"),
                r.seconds
            );
            Ok(Outcome {
                json: to_json(&r),
                text,
                problems: Vec::new(),
            })
        }
        StoreCommand::Verify { store, snapshot } => {
            let bar = progress_bar();
            let report = import::verify(&store, snapshot.as_deref(), &|d, t| show(&bar, d, t));
            finish(bar);
            let r = report?;
            let summary = format!(
                "verified {}, {}, {} ({})",
                fmt::count(r.snapshots as u64, "snapshot", "snapshots"),
                fmt::count(r.archives as u64, "archive", "archives"),
                fmt::count(r.chunks as u64, "chunk", "chunks"),
                fmt::count(r.bytes, "byte", "bytes"),
            );
            let mut problems = r.errors.clone();
            if !problems.is_empty() {
                let n = r.errors.len() as u64;
                problems.push(format!(
                    "verify failed: {}",
                    fmt::count(n, "problem", "problems")
                ));
            }
            Ok(Outcome {
                json: to_json(&r),
                text: if r.ok {
                    format!("{summary}: ok")
                } else {
                    format!("{summary}: FAILED")
                },
                problems,
            })
        }
    }
}

fn to_json<T: serde::Serialize>(report: &T) -> serde_json::Value {
    serde_json::to_value(report).unwrap_or(serde_json::Value::Null)
}

/// A byte progress bar on stderr, only when stderr is a terminal.
pub fn progress_bar() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
    {
        bar.set_style(style);
    }
    Some(bar)
}

fn show(bar: &Option<ProgressBar>, done: u64, total: u64) {
    if let Some(bar) = bar {
        bar.set_length(total);
        bar.set_position(done);
    }
}

fn finish(bar: Option<ProgressBar>) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
