//! Helpers for the crate's unit tests; not built otherwise.
//!
//! Owns: the seeded pseudo-random numbers that tests use to make and damage
//! data. Must never be used by the daemon.

/// A xorshift64 generator from `seed` (which must not be 0): the same
/// numbers on every run, so that a failing round can be found again.
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
