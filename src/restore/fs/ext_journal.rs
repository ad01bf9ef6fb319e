//! A bounded look at an ext3/4 journal before ext4-view replays it.
//!
//! ext4-view replays a journal that needs recovery when it loads the
//! filesystem, in memory and without limits of its own: it maps every
//! journal block, and keeps every revoked block number until a commit
//! block. A corrupt or hostile journal (an extent tree naming one leaf
//! again and again, or thousands of revocation blocks without a commit;
//! identical blocks cost next to nothing in a deduplicating datastore)
//! made one `volumes` call take gigabytes and abort the agent, or spin for
//! hours. This module walks the journal's log once, the way a replay does,
//! and refuses it before the replay when it is larger than a replay may
//! be.
//! Owns: the JBD2 block headers (big-endian) as far as needed to count
//! blocks and revocations. Must never write, and never replay anything.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::restore::fs::ext_raw::{reused_at, ExtRaw};
use crate::restore::fs::Extent;

/// JBD2 block header magic.
const JBD2_MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR_BLOCK: u32 = 1;
const COMMIT_BLOCK: u32 = 2;
const REVOKE_BLOCK: u32 = 5;
/// Journal features (incompat).
const FEATURE_64BIT: u32 = 0x2;
const FEATURE_CSUM_V2: u32 = 0x8;
const FEATURE_CSUM_V3: u32 = 0x10;
/// Descriptor tag flags.
const TAG_SAME_UUID: u32 = 0x2;
const TAG_LAST: u32 = 0x8;
/// Longest journal replayed (blocks): mke2fs makes journals of at most
/// 1 GiB, 2^18 blocks of 4 KiB or 2^20 of 1 KiB.
pub const MAX_JOURNAL_BLOCKS: u64 = 1 << 20;
/// Most revoked block numbers pending before a commit (ext4-view keeps
/// each, 8 bytes or more).
pub const MAX_PENDING_REVOKES: u64 = 1 << 18;
/// Most blocks a replay copies (descriptor tags in the whole log):
/// ext4-view maps each in memory, about 80 bytes apiece (a million took
/// 79 MiB).
pub const MAX_REPLAYED_BLOCKS: u64 = 1 << 18;
/// Journal blocks mapped at a time while checking where they lie.
const MAP_STEP: u64 = 1 << 16;

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn too_large(what: String) -> Error {
    Error::unsupported(format!(
        "ext filesystem: the journal needs replaying, and {what}"
    ))
}

/// Checks that replaying the journal of the filesystem `raw` reads stays
/// within bounds; Ok when the journal needs no replay.
pub fn check_replay(raw: &mut ExtRaw) -> Result<()> {
    if !raw.needs_recovery() {
        return Ok(());
    }
    let Some(number) = raw.journal_inode() else {
        // an external journal: ext4-view refuses it by itself
        return Ok(());
    };
    let journal = raw.inode(number)?;
    let bs = raw.block_size();
    let blocks = journal.size / bs;
    if blocks > MAX_JOURNAL_BLOCKS {
        return Err(too_large(format!(
            "its {blocks} blocks are more than the {MAX_JOURNAL_BLOCKS} replayed"
        )));
    }
    // every journal block has a place of its own (the map's own blocks are
    // checked while it is read); mapped a step at a time, holes left out
    let mut places: Vec<Range<u64>> = Vec::new();
    for from in (0..blocks).step_by(MAP_STEP as usize) {
        let len = MAP_STEP.min(blocks - from) * bs;
        for e in raw.map(&journal, from * bs, len)? {
            if let Extent::Disk { offset, len } = e {
                match places.last_mut() {
                    Some(last) if last.end == offset => last.end += len,
                    _ => places.push(offset..offset + len),
                }
            }
        }
    }
    if let Some(at) = reused_at(&mut places) {
        return Err(Error::corrupt(format!(
            "ext filesystem: journal block at byte {at} is used twice"
        )));
    }
    let mut block = vec![0u8; bs as usize];
    let read = |raw: &mut ExtRaw, n: u64, block: &mut [u8]| -> Result<()> {
        let got = raw.read(&journal, n * bs, block)?;
        if got != block.len() {
            return Err(Error::corrupt("ext filesystem: journal block unreadable"));
        }
        Ok(())
    };
    read(raw, 0, &mut block)?;
    if be32(&block, 0) != JBD2_MAGIC {
        // not a journal ext4-view replays: it says why itself
        return Ok(());
    }
    let first = u64::from(be32(&block, 0x14));
    let last = u64::from(be32(&block, 0x10)).min(blocks);
    let mut sequence = be32(&block, 0x18);
    let start = u64::from(be32(&block, 0x1C));
    let features = be32(&block, 0x28);
    if start == 0 || first == 0 || first >= last || start < first || start >= last {
        return Ok(());
    }
    let csum_v3 = features & FEATURE_CSUM_V3 != 0;
    let is64 = features & FEATURE_64BIT != 0;
    let tag_bytes = if csum_v3 {
        16
    } else if is64 {
        12
    } else {
        8
    };
    let tail = if features & (FEATURE_CSUM_V2 | FEATURE_CSUM_V3) != 0 {
        4
    } else {
        0
    };
    let revoke_entry: u64 = if is64 { 8 } else { 4 };
    // one lap of the log at most, as a replay reads it
    let mut at = start;
    let mut walked = 0u64;
    let mut pending_revokes = 0u64;
    let mut replayed = 0u64;
    // For the revocations (see `replays_revoked`): the transactions, by
    // their place in the log, that logged each block; what the one being
    // read logs and revokes until its commit.
    let mut logged: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut revoked: HashMap<u64, u64> = HashMap::new();
    let (mut txn_logged, mut txn_revoked) = (Vec::new(), Vec::new());
    let mut txn = 0u64;
    while walked < last - first {
        read(raw, at, &mut block)?;
        if be32(&block, 0) != JBD2_MAGIC || be32(&block, 8) != sequence {
            break;
        }
        let mut step = 1;
        match be32(&block, 4) {
            DESCRIPTOR_BLOCK => {
                // one data block follows per tag
                let mut tag = 12;
                while tag + tag_bytes <= block.len() - tail {
                    step += 1;
                    replayed += 1;
                    if replayed > MAX_REPLAYED_BLOCKS {
                        return Err(too_large(format!(
                            "more than {MAX_REPLAYED_BLOCKS} blocks to copy"
                        )));
                    }
                    let flags = if csum_v3 {
                        be32(&block, tag + 4)
                    } else {
                        be32(&block, tag + 4) & 0xFFFF
                    };
                    let high = if is64 {
                        u64::from(be32(&block, tag + 8)) << 32
                    } else {
                        0
                    };
                    txn_logged.push(u64::from(be32(&block, tag)) | high);
                    tag += tag_bytes;
                    if flags & TAG_SAME_UUID == 0 {
                        tag += 16;
                    }
                    if flags & TAG_LAST != 0 {
                        break;
                    }
                }
            }
            COMMIT_BLOCK => {
                sequence = sequence.wrapping_add(1);
                pending_revokes = 0;
                for b in txn_logged.drain(..) {
                    logged
                        .entry(b)
                        .and_modify(|(_, last)| *last = txn)
                        .or_insert((txn, txn));
                }
                // only a block logged before can be replayed wrongly
                for b in txn_revoked.drain(..) {
                    if logged.contains_key(&b) {
                        revoked.insert(b, txn);
                    }
                }
                txn += 1;
            }
            REVOKE_BLOCK => {
                let used = u64::from(be32(&block, 12)).min(bs);
                pending_revokes += used.saturating_sub(16) / revoke_entry;
                if pending_revokes > MAX_PENDING_REVOKES {
                    return Err(too_large(format!(
                        "more than {MAX_PENDING_REVOKES} revoked blocks wait for one commit"
                    )));
                }
                let mut entry = 16;
                while entry + revoke_entry <= used {
                    let e = entry as usize;
                    let b = if is64 {
                        u64::from(be32(&block, e)) << 32 | u64::from(be32(&block, e + 4))
                    } else {
                        u64::from(be32(&block, e))
                    };
                    txn_revoked.push(b);
                    entry += revoke_entry;
                }
            }
            _ => break,
        }
        walked += step;
        at += step;
        if at >= last {
            at = first + (at - last);
        }
    }
    if let Some(b) = replays_revoked(&logged, &revoked) {
        return Err(too_large(format!(
            "a later transaction revokes block {b}, which an earlier one logged: this \
             reader's replay would copy it anyway (ext4-view 1.0 honours a revocation \
             only within its own transaction), and its data would be wrong"
        )));
    }
    Ok(())
}

/// A block whose copy a replay by ext4-view would write although JBD2's
/// rules revoke it: revoked by transaction `r` (the last to revoke it),
/// logged by one before `r` and by none after. (A copy logged after the
/// revocation is written by both, last; a block revoked by the
/// transaction that alone logs it, by neither.)
fn replays_revoked(logged: &HashMap<u64, (u64, u64)>, revoked: &HashMap<u64, u64>) -> Option<u64> {
    revoked.iter().find_map(|(&b, &r)| {
        let &(first, last) = logged.get(&b)?;
        (first < r && last <= r).then_some(b)
    })
}
