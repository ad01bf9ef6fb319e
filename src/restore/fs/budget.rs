//! The memory that directory listings may take, all open filesystems
//! together.
//!
//! Owns: the process-wide limit and the meter of listing bytes alive, and
//! [`Charge`], the share of one listing being built or kept. A listing is
//! held whole (it is sorted, paged through and walked), and a directory
//! can hold millions of entries: without a bound, one `fs.list` of such a
//! directory would take more memory than the file-restore VM has. Must
//! never allocate on behalf of the caller; it only counts.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// The limit until [`set_listing_limit`] is called (tests, tools).
const DEFAULT_LIMIT: usize = 256 << 20;

static LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_LIMIT);
static USED: AtomicUsize = AtomicUsize::new(0);

/// Sets how many bytes all listings together may take (the agent's
/// `--listing-mb`).
pub fn set_listing_limit(bytes: usize) {
    LIMIT.store(bytes.max(1), Ordering::Relaxed);
}

/// How many bytes all listings together may take.
pub fn listing_limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

/// The bytes of one directory's listing, counted against the limit until
/// dropped. It keeps no path: a walk holds the listings of all the
/// directories it is inside, and their paths would grow with the square
/// of the depth.
#[derive(Debug, Default)]
pub struct Charge {
    bytes: usize,
}

impl Charge {
    pub fn new() -> Charge {
        Charge::default()
    }

    /// Counts `n` more bytes, or refuses (1005) when all listings together
    /// would pass the limit; the caller then drops what it built, and names
    /// the directory in the error.
    pub fn add(&mut self, n: usize) -> Result<()> {
        let before = USED.fetch_add(n, Ordering::Relaxed);
        let limit = listing_limit();
        if before.saturating_add(n) > limit {
            USED.fetch_sub(n, Ordering::Relaxed);
            return Err(Error::unsupported(format!(
                "directory too large to list in the {} MiB the agent keeps for \
                 directory listings (--listing-mb)",
                limit.div_ceil(1 << 20)
            )));
        }
        self.bytes += n;
        Ok(())
    }

    /// Lowers the count to `n` bytes (what a finished listing keeps, once
    /// the buffers of building it are gone); never raises it.
    pub fn settle(&mut self, n: usize) {
        if n < self.bytes {
            USED.fetch_sub(self.bytes - n, Ordering::Relaxed);
            self.bytes = n;
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        USED.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
