//! The pool's worker threads: each takes the next load in dispatch order,
//! runs it (read + decode) and hands the result back to the shared state.
//!
//! Workers are plain std threads; they are the only place chunk I/O and
//! decoding happen. They must never wait for another chunk themselves.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::state::Shared;
use crate::error::{Error, ErrorKind};

/// Name of worker `n` of pool `pool_id` (short: Linux keeps 15 bytes).
pub(super) fn worker_name(pool_id: u64, n: usize) -> String {
    format!("pool{pool_id}-w{n}")
}

/// Starts `count` workers serving `shared` until it shuts down.
pub(super) fn spawn_workers(
    shared: &Arc<Shared>,
    count: usize,
    pool_id: u64,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .filter_map(|n| {
            let shared = Arc::clone(shared);
            std::thread::Builder::new()
                .name(worker_name(pool_id, n))
                .spawn(move || run(&shared))
                .map_err(|e| log::error!("cannot start chunk pool worker {n}: {e}"))
                .ok()
        })
        .collect()
}

fn run(shared: &Shared) {
    // Chunk file contents, reused from chunk to chunk (see load.rs).
    let mut raw = Vec::new();
    while let Some((key, load)) = shared.next_load() {
        // Decoding untrusted data must not take the worker (and every
        // waiter of this chunk) down with it, whatever a library does.
        let result = panic::catch_unwind(AssertUnwindSafe(|| load.run(&mut raw)))
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Io,
                    format!("internal error while reading {key}"),
                ))
            })
            .map(Arc::new);
        shared.finish(key, result);
    }
}
