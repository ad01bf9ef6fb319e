//! The chunk pool over a datastore written by the real importer, and over
//! the raw image itself: both read back equal to the image.

use std::sync::Arc;

use restore_agent::pool::{ChunkPool, PoolConfig};
use restore_agent::store::datastore::Datastore;
use restore_agent::store::import;

fn image_bytes() -> Vec<u8> {
    // Random 4 MiB, text 4 MiB, zeros 4 MiB + a short random tail.
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut img = Vec::new();
    while img.len() < 4 << 20 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        img.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    let text = b"restore-agent reads chunk files whole, one read each.\n";
    img.extend(text.iter().copied().cycle().take(4 << 20));
    img.extend(std::iter::repeat_n(0u8, 4 << 20));
    img.extend(img[..77_777].to_vec());
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_image_and_raw_image_read_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let data = image_bytes();
    std::fs::write(&image, &data).unwrap();
    let store = dir.path().join("store");
    // Only `.chunks`: `import::init`'s 65536 directories take minutes to
    // delete on this machine's disk; the importer creates what it needs.
    std::fs::create_dir_all(store.join(".chunks")).unwrap();
    let snapshot = "vm/100/2026-01-01T00:00:00Z";
    import::import_image(&store, snapshot, "drive-scsi0.img", &image, &|_, _| {}).unwrap();

    let datastore = Datastore::open(&store).unwrap();
    let archive = datastore
        .open_archive(snapshot, "drive-scsi0.img.fidx")
        .unwrap();
    let pool = ChunkPool::new(PoolConfig::default());
    let fidx = pool.open_index(
        Arc::new(datastore.chunk_store().clone()),
        archive.index().unwrap(),
        "drive-scsi0.img.fidx".into(),
    );
    let raw = pool.open_raw_image(&image, "disk".into()).unwrap();
    let size = data.len() as u64;
    let c = 4u64 << 20;
    for reader in [&fidx, &raw] {
        assert_eq!(reader.size(), size);
        for (off, len) in [
            (0u64, 1usize),
            (c - 1, 2),
            (c, 4 << 20),
            (2 * c - 5, 10),
            (3 * c - 1, 2),
            (3 * c, 77_777),
            (3 * c + 77_776, 5),
            (size, 5),
            (0, data.len() + 1),
        ] {
            let mut buf = vec![0u8; len];
            let n = reader.read_at(off, &mut buf).await.unwrap();
            let start = (off as usize).min(data.len());
            let end = (start + len).min(data.len());
            assert_eq!(n, end - start, "{} ({off}, {len})", reader.name());
            assert!(
                buf[..n] == data[start..end],
                "{} ({off}, {len})",
                reader.name()
            );
        }
    }
    let stats = pool.stats();
    assert!(stats.zero_reads > 0, "the zero chunk is served without I/O");
    assert!(stats.cache.bytes <= stats.cache.capacity);
}
