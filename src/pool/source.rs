//! What an archive reader reads from: a chunk index over a chunk store, or a
//! raw image cut into fixed pseudo-chunks.
//!
//! Owns the mapping from archive bytes to chunks (ranges, cache keys, how to
//! load each one, which one is the all-zero chunk). It does no I/O itself.

use std::ops::Range;
use std::sync::Arc;

use super::load::{Load, RawImage, RAW_CHUNK_SIZE};
use super::{ChunkData, ChunkKey};
use crate::store::chunk_store::ChunkStore;
use crate::store::index::ChunkIndex;
use crate::store::{digest_hex, Digest, MAX_CHUNK_SIZE};

/// The all-zero chunk of one chunk size: its digest and a shared buffer.
#[derive(Clone, Debug)]
pub(super) struct ZeroChunk {
    pub digest: Digest,
    pub data: ChunkData,
}

#[derive(Debug)]
pub(super) enum Source {
    Index {
        chunks: Arc<ChunkStore>,
        index: Arc<dyn ChunkIndex>,
        /// For fixed indexes: the chunk that is all zeros.
        zero: Option<ZeroChunk>,
    },
    Raw(Arc<RawImage>),
}

impl Source {
    pub fn size(&self) -> u64 {
        match self {
            Source::Index { index, .. } => index.size(),
            Source::Raw(image) => image.size,
        }
    }

    pub fn chunk_count(&self) -> usize {
        match self {
            Source::Index { index, .. } => index.chunk_count(),
            Source::Raw(image) => {
                usize::try_from(image.size.div_ceil(RAW_CHUNK_SIZE)).unwrap_or(usize::MAX)
            }
        }
    }

    /// The chunk holding `offset`, `None` past the end.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        match self {
            Source::Index { index, .. } => index.chunk_at(offset),
            Source::Raw(image) => (offset < image.size)
                .then(|| usize::try_from(offset / RAW_CHUNK_SIZE).ok())
                .flatten(),
        }
    }

    /// Byte range of chunk `i` (`i < chunk_count()`).
    pub fn chunk_range(&self, i: usize) -> Range<u64> {
        match self {
            Source::Index { index, .. } => index.chunk_range(i),
            Source::Raw(image) => {
                let start = (i as u64).saturating_mul(RAW_CHUNK_SIZE);
                start..start.saturating_add(RAW_CHUNK_SIZE).min(image.size)
            }
        }
    }

    /// The shared zero buffer when chunk `i` is the all-zero chunk: it is
    /// served without I/O.
    pub fn zero_chunk(&self, i: usize) -> Option<ChunkData> {
        let Source::Index {
            index,
            zero: Some(zero),
            ..
        } = self
        else {
            return None;
        };
        let range = index.chunk_range(i);
        (*index.chunk_digest(i) == zero.digest
            && range.end.saturating_sub(range.start) == zero.data.len() as u64)
            .then(|| Arc::clone(&zero.data))
    }

    /// Cache key of chunk `i`: its digest, so that archives sharing chunks
    /// share cache entries; for raw images, (image, chunk number).
    pub fn key(&self, i: usize) -> ChunkKey {
        match self {
            Source::Index { index, .. } => ChunkKey::Digest(*index.chunk_digest(i)),
            Source::Raw(image) => ChunkKey::Raw {
                image: image.id,
                chunk: i as u64,
            },
        }
    }

    /// How to read chunk `i`.
    pub fn load(&self, i: usize) -> Load {
        match self {
            Source::Index { chunks, index, .. } => {
                let digest = *index.chunk_digest(i);
                let range = index.chunk_range(i);
                let len = range.end.saturating_sub(range.start);
                Load::Chunk {
                    path: chunks.chunk_path(&digest),
                    digest,
                    max_size: usize::try_from(len)
                        .unwrap_or(MAX_CHUNK_SIZE)
                        .min(MAX_CHUNK_SIZE),
                }
            }
            Source::Raw(image) => Load::Raw {
                image: Arc::clone(image),
                chunk: i as u64,
            },
        }
    }

    /// Names chunk `i` in error messages.
    pub fn describe(&self, i: usize) -> String {
        match self {
            Source::Index { index, .. } => format!("chunk {}", digest_hex(index.chunk_digest(i))),
            Source::Raw(image) => format!("image {} chunk {i}", image.name),
        }
    }
}
