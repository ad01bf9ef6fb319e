//! Chunk read pool benchmark (issue 3 acceptance, in-process parts).
//!
//! Builds a mixed image (random, text, zeros; 1 GiB by default), imports it
//! with the store's importer into a temporary datastore, then reports
//! side by side:
//!   (a) sequential reads through the pool (4 MiB and 128 KiB requests),
//!   (b) a naive reader: one chunk at a time, read file + decode inline,
//!       no read-ahead, no cache, no zero-chunk shortcut,
//!   (c) `image.read` through the release `restore-agent` binary (default
//!       options: 48 MiB cache, read-ahead 8, at most half the cache) over
//!       a Unix socket, 4 MiB reads pipelined 4 deep, the data raw after
//!       each answer line (`"encoding":"raw"`, as `restore-client` reads), with the
//!       agent's peak RSS (VmHWM) while reading,
//!   (d) the machine's limits: page-cache read of the chunk files and the
//!       single-core zstd + SHA-256 decode rate,
//! and the ratios (a)/(b), (a)/min(page cache, 2 x decode) and (c)/(a).
//! With `--cold` the page cache is dropped before each variant (needs root)
//! and the disk's seek time and sequential rate are measured for the
//! MAX(ACS) = ACS / (AST + ACS/MRS) figure.
//!
//! Usage: cargo bench --bench pool -- [--cold] [--size-mib N] [--dir DIR]
//!        [--agent-arg ARG]...   (extra agent options for (c), e.g. --cache-mb 16)
//!        [--agent-only]         (only (c), e.g. for profiling)

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use restore_agent::client::frames::{Response, ResponseDecoder, MAX_RESPONSE_LINE, READ_BUFFER};
use restore_agent::pool::{ChunkPool, PoolConfig};
use restore_agent::store::chunk_store::ChunkStore;
use restore_agent::store::datastore::{Archive, Datastore};
use restore_agent::store::fidx::FixedIndex;
use restore_agent::store::index::ChunkIndex;
use restore_agent::store::{blob, import, sha256, MAX_CHUNK_SIZE};

const CHUNK: usize = 4 << 20;
const MB: f64 = 1e6;

/// The snapshot and archive the agent serves the image as in (c).
const SNAPSHOT: &str = "vm/100/2026-01-01T00:00:00Z";
const ARCHIVE: &str = "drive-scsi0.img.fidx";
/// The agent's default `--cache-mb` (what the RSS goal is measured against).
const AGENT_CACHE_MIB: u64 = 48;
/// `image.read` requests kept in flight in (c).
const PIPELINE: usize = 4;

struct Args {
    cold: bool,
    size_mib: usize,
    dir: PathBuf,
    /// Extra options for the agent in (c), e.g. `--cache-mb 16`.
    agent_args: Vec<String>,
    /// Only (c): for profiling the agent and its client.
    agent_only: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        cold: false,
        size_mib: 1024,
        dir: std::env::temp_dir(),
        agent_args: Vec::new(),
        agent_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cold" => args.cold = true,
            "--size-mib" => {
                args.size_mib = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--size-mib needs a number"))
            }
            "--dir" => {
                args.dir = it
                    .next()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| usage("--dir needs a path"))
            }
            "--agent-arg" => args.agent_args.push(
                it.next()
                    .unwrap_or_else(|| usage("--agent-arg needs a value")),
            ),
            "--agent-only" => args.agent_only = true,
            "--bench" => {} // added by `cargo bench`
            other => usage(&format!("unknown argument {other}")),
        }
    }
    args
}

fn usage(msg: &str) -> ! {
    eprintln!("{msg}\nusage: pool [--cold] [--size-mib N] [--dir DIR] [--agent-arg ARG]... [--agent-only]");
    std::process::exit(2);
}

/// xorshift64* pseudo-random generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Chunk `i` of the mixed image: 2 of 5 random, 2 of 5 text-like (words
/// drawn from a fixed vocabulary, compresses about 3x), 1 of 5 zeros.
fn make_chunk(i: usize, vocabulary: &[String]) -> Vec<u8> {
    let mut rng = Rng((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    match i % 5 {
        0 | 2 => {
            let mut out = Vec::with_capacity(CHUNK + 8);
            while out.len() < CHUNK {
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
            out.truncate(CHUNK);
            out
        }
        1 | 3 => {
            let mut out = Vec::with_capacity(CHUNK + 64);
            while out.len() < CHUNK {
                let r = rng.next();
                out.extend_from_slice(
                    vocabulary[(r % vocabulary.len() as u64) as usize].as_bytes(),
                );
                out.push(if r >> 60 == 0 { b'\n' } else { b' ' });
            }
            out.truncate(CHUNK);
            out
        }
        _ => vec![0u8; CHUNK],
    }
}

fn vocabulary() -> Vec<String> {
    let mut rng = Rng(42);
    (0..2000)
        .map(|_| {
            let len = 2 + (rng.next() % 9) as usize;
            (0..len)
                .map(|_| (b'a' + (rng.next() % 26) as u8) as char)
                .collect()
        })
        .collect()
}

struct Dataset {
    _tmp: tempfile::TempDir,
    /// The datastore directory (holding `.chunks` and the snapshot).
    store: PathBuf,
    image: PathBuf,
    chunks: Arc<ChunkStore>,
    index: Arc<FixedIndex>,
    /// Unique chunk files and their total size.
    files: Vec<PathBuf>,
    file_bytes: u64,
    /// Chunk files and image bytes of the non-zero chunks (for the ACS figure).
    nonzero_chunks: usize,
    nonzero_file_bytes: u64,
}

/// Writes the image file (both cores generate) and imports it with the
/// store's importer, as `restore-client store import-image` does.
fn build(args: &Args) -> Dataset {
    let tmp = tempfile::Builder::new()
        .prefix("pool-bench-")
        .tempdir_in(&args.dir)
        .unwrap_or_else(|e| panic!("cannot create a directory in {}: {e}", args.dir.display()));
    let image = tmp.path().join("image.raw");
    let count = args.size_mib * (1 << 20) / CHUNK;
    let vocabulary = vocabulary();
    let mut image_file = File::create(&image).expect("create image");
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut i = 0;
    while i < count {
        // One batch of `workers` chunks at a time keeps memory small.
        let batch: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (i..(i + workers).min(count))
                .map(|n| {
                    let vocabulary = &vocabulary;
                    s.spawn(move || make_chunk(n, vocabulary))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("generator"))
                .collect()
        });
        for data in batch {
            image_file.write_all(&data).expect("write image");
            i += 1;
        }
    }
    image_file.sync_all().expect("sync image");
    drop(image_file);

    let store = tmp.path().join("store");
    // Only `.chunks`, not `import::init`'s 65536 directories: removing
    // those takes minutes on a disk mounted with `discard`.
    fs::create_dir_all(store.join(".chunks")).expect("create datastore");
    import::import_image(
        &store,
        SNAPSHOT,
        ARCHIVE.trim_end_matches(".fidx"),
        &image,
        &|_, _| {},
    )
    .expect("import image");
    let datastore = Datastore::open(&store).expect("open datastore");
    let index = match datastore
        .open_archive(SNAPSHOT, ARCHIVE)
        .expect("open archive")
    {
        Archive::Fixed(index) => index,
        other => panic!("unexpected archive {other:?}"),
    };
    let chunks = Arc::new(datastore.chunk_store().clone());

    let zero = sha256(&vec![0u8; CHUNK]);
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (mut file_bytes, mut nonzero_chunks, mut nonzero_file_bytes) = (0, 0, 0);
    for n in 0..index.chunk_count() {
        let d = *index.chunk_digest(n);
        let path = chunks.chunk_path(&d);
        let len = fs::metadata(&path).expect("stat chunk").len();
        if d != zero {
            nonzero_chunks += 1;
            nonzero_file_bytes += len;
        }
        if seen.insert(d) {
            file_bytes += len;
            files.push(path);
        }
    }
    Dataset {
        _tmp: tmp,
        store,
        image,
        chunks,
        index,
        files,
        file_bytes,
        nonzero_chunks,
        nonzero_file_bytes,
    }
}

fn drop_caches() {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("cannot drop caches ({e}); --cold needs root");
        std::process::exit(1);
    }
}

/// CPU time (user + system) of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs one variant: (its result, wall time, cores busy on average).
fn measured<T>(f: impl FnOnce() -> (T, Duration)) -> (T, Duration, f64) {
    let cpu = cpu_seconds();
    let (out, wall) = f();
    let busy = (cpu_seconds() - cpu) / wall.as_secs_f64();
    (out, wall, busy)
}

fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / MB
}

/// (a) Sequential reads of `request` bytes through a default pool.
fn pool_scan(ds: &Dataset, request: usize) -> (String, Duration) {
    let pool = ChunkPool::new(PoolConfig::default());
    let reader = pool.open_index(ds.chunks.clone(), ds.index.clone(), "bench".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cpu_before = process_cpu_time();
    let start = Instant::now();
    let checksum = rt.block_on(async {
        let mut off = 0u64;
        let mut sum = 0u64;
        while off < reader.size() {
            let slices = reader.read_slices(off, request).await.expect("pool read");
            for s in &slices {
                let b = s.as_slice();
                sum = sum.wrapping_add(u64::from(b[0]) + u64::from(b[b.len() - 1]));
                off += b.len() as u64;
            }
        }
        sum
    });
    let t = start.elapsed();
    let cpu = process_cpu_time() - cpu_before;
    let st = pool.stats();
    let info = format!(
        "reads {} zero {} hits {} misses {} readahead_hits {}; cpu {:.2}s in {:.2}s (sum {checksum})",
        st.reads,
        st.zero_reads,
        st.cache.hits,
        st.cache.misses,
        st.cache.readahead_hits,
        cpu.as_secs_f64(),
        t.as_secs_f64()
    );
    (info, t)
}

/// (b) One chunk at a time: read the file, decode, next.
fn naive_scan(ds: &Dataset) -> Duration {
    let start = Instant::now();
    let mut sum = 0u64;
    for n in 0..ds.index.chunk_count() {
        let d = ds.index.chunk_digest(n);
        let raw = fs::read(ds.chunks.chunk_path(d)).expect("read chunk");
        let data = blob::decode(&raw, Some(d), CHUNK.min(MAX_CHUNK_SIZE)).expect("decode");
        sum = sum.wrapping_add(u64::from(data[0]));
    }
    std::hint::black_box(sum);
    start.elapsed()
}

/// A running release agent serving the bench datastore; killed on drop.
struct AgentProcess {
    child: Child,
    sock: PathBuf,
}

impl AgentProcess {
    const TICKET: &'static str = "bench-ticket-0123456789abcdef";

    fn start(ds: &Dataset, run: usize, extra: &[String]) -> AgentProcess {
        let dir = ds._tmp.path();
        let ticket = dir.join("ticket");
        fs::write(&ticket, Self::TICKET).expect("write ticket");
        fs::set_permissions(&ticket, fs::Permissions::from_mode(0o600)).expect("chmod ticket");
        let sock = dir.join(format!("agent-{run}.sock"));
        let log = File::create(dir.join(format!("agent-{run}.log"))).expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
            .arg("--ticket-file")
            .arg(&ticket)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(["--idle-timeout", "0"])
            .arg("--datastore")
            .arg(&ds.store)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start restore-agent");
        AgentProcess { child, sock }
    }

    /// Connects (waiting up to 10 s for the socket) and authenticates.
    fn connect(&mut self) -> (UnixStream, BufReader<UnixStream>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        panic!("restore-agent exited ({st}) before listening");
                    }
                    if Instant::now() > deadline {
                        panic!("cannot connect to {}: {e}", self.sock.display());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone().expect("clone"));
        let mut writer = stream;
        writeln!(
            writer,
            r#"{{"jsonrpc":"2.0","id":"auth","method":"authenticate","params":{{"ticket":"{}"}}}}"#,
            Self::TICKET
        )
        .expect("send authenticate");
        let mut line = Vec::new();
        reader
            .read_until(b'\n', &mut line)
            .expect("authenticate reply");
        assert!(
            line.windows(9).any(|w| w == b"\"result\":"),
            "authenticate failed: {}",
            String::from_utf8_lossy(&line)
        );
        (writer, reader)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The numeric fields of /proc/PID/stat after the parenthesised command
/// name (`[7]` minor faults, `[11]` and `[12]` user and system clock ticks).
fn proc_stat(pid: u32) -> Vec<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .collect()
}

/// User + system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let f = proc_stat(pid);
    let ticks = f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Minor page faults of process `pid` so far.
fn minor_faults(pid: u32) -> u64 {
    proc_stat(pid).get(7).copied().unwrap_or(0)
}

/// CPU time (user + system) of the calling thread so far.
fn thread_cpu_time() -> Duration {
    rusage_cpu(libc::RUSAGE_THREAD)
}

/// CPU time (user + system) of this process (all its threads) so far.
fn process_cpu_time() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The next answer on `stream`, read through `buf` into `dec` (bulk
/// answers come with their payload decoded as it arrives).
fn next_response(
    dec: &mut ResponseDecoder,
    buf: &mut BytesMut,
    stream: &mut UnixStream,
) -> Response {
    loop {
        if let Some(r) = dec.decode(buf, &|_| true) {
            return r;
        }
        buf.reserve(READ_BUFFER);
        let spare = buf.spare_capacity_mut();
        // SAFETY: `read` only writes into the bytes it reports; they are
        // then marked initialised.
        let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast(), spare.len()) };
        let n = stream.read(dst).expect("read response");
        assert!(n > 0, "the agent closed the connection");
        // SAFETY: `read` initialised these `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
    }
}

/// (c) The whole image through `image.read` on a fresh release agent,
/// `request`-byte raw reads with `PIPELINE` in flight, framed and checked
/// against the image file every 16th read. Returns the time, the agent's
/// peak RSS (VmHWM), its RSS right after start, and its counters and CPU
/// time.
fn agent_scan(
    ds: &Dataset,
    request: usize,
    run: usize,
    extra: &[String],
) -> (Duration, u64, u64, String) {
    let mut agent = AgentProcess::start(ds, run, extra);
    let (mut writer, reader) = agent.connect();
    let idle_rss = common::proc_status_bytes(agent.pid(), "VmRSS");
    let image = File::open(&ds.image).expect("open image");
    let size = ds.index.size();
    let count = size.div_ceil(request as u64) as usize;
    assert!(
        reader.buffer().is_empty(),
        "nothing but the authenticate answer yet"
    );
    let mut stream = reader.into_inner();
    let mut dec = ResponseDecoder::new(MAX_RESPONSE_LINE);
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut expect = vec![0u8; request];
    let mut sent = 0;
    let mut received = 0;
    let mut bytes = 0u64;
    let send = |w: &mut UnixStream, i: usize| {
        let offset = i as u64 * request as u64;
        writeln!(
            w,
            r#"{{"jsonrpc":"2.0","id":{i},"method":"image.read","params":{{"snapshot":"{SNAPSHOT}","archive":"{ARCHIVE}","offset":{offset},"length":{request},"encoding":"raw"}}}}"#
        )
        .expect("send image.read");
    };
    let cpu_before = cpu_time(agent.pid());
    let faults_before = minor_faults(agent.pid());
    let client_before = thread_cpu_time();
    let start = Instant::now();
    while sent < count.min(PIPELINE) {
        send(&mut writer, sent);
        sent += 1;
    }
    while received < count {
        let answer = match next_response(&mut dec, &mut buf, &mut stream) {
            Response::Bulk(answer) => answer,
            other => panic!("not an image.read answer: {other:?}"),
        };
        let id = answer.id as usize;
        let data = answer
            .payload
            .unwrap_or_else(|e| panic!("response {id}: {e}"));
        let n = data.len();
        let offset = id as u64 * request as u64;
        assert_eq!(
            n as u64,
            (size - offset).min(request as u64),
            "length of read {id}"
        );
        if id.is_multiple_of(16) {
            image
                .read_exact_at(&mut expect[..n], offset)
                .expect("read image");
            assert!(
                data[..n] == expect[..n],
                "read {id} at {offset}: wrong bytes"
            );
        }
        bytes += n as u64;
        received += 1;
        if sent < count {
            send(&mut writer, sent);
            sent += 1;
        }
    }
    let t = start.elapsed();
    assert_eq!(bytes, size);
    let peak = common::proc_status_bytes(agent.pid(), "VmHWM");
    let cpu = cpu_time(agent.pid()) - cpu_before;
    let faults = minor_faults(agent.pid()) - faults_before;
    let client_cpu = thread_cpu_time() - client_before;
    // The agent's own view of the scan.
    writeln!(writer, r#"{{"jsonrpc":"2.0","id":"st","method":"status"}}"#).expect("send status");
    let Response::Line(line) = next_response(&mut dec, &mut buf, &mut stream) else {
        panic!("no status answer");
    };
    let st: serde_json::Value = serde_json::from_slice(&line).expect("status JSON");
    let c = &st["result"]["cache"];
    let p = &st["result"]["pool"];
    let info = format!(
        "agent reads {} zero {} hits {} misses {} readahead_hits {}, {faults} page faults; cpu {:.2}s agent, {:.2}s client, in {:.2}s",
        p["reads"],
        p["zero_reads"],
        c["hits"],
        c["misses"],
        c["readahead_hits"],
        cpu.as_secs_f64(),
        client_cpu.as_secs_f64(),
        t.as_secs_f64()
    );
    (t, peak, idle_rss, info)
}

/// (d1) cat-like read of every chunk file into one reused buffer.
fn page_cache_scan(ds: &Dataset) -> Duration {
    let mut buf = vec![0u8; CHUNK + (1 << 20)];
    let start = Instant::now();
    for path in &ds.files {
        let mut f = File::open(path).expect("open chunk");
        loop {
            let n = f.read(&mut buf).expect("read chunk");
            if n == 0 {
                break;
            }
        }
    }
    start.elapsed()
}

/// (d2) Single-core decode of every chunk of the image as the pool decodes
/// it (zstd + SHA-256; the digest stands in for the CRC), timing only the
/// decode. Returns (decoded bytes, time).
fn decode_scan(ds: &Dataset) -> (u64, Duration) {
    let mut total = Duration::ZERO;
    let mut bytes = 0u64;
    for n in 0..ds.index.chunk_count() {
        let d = ds.index.chunk_digest(n);
        let raw = fs::read(ds.chunks.chunk_path(d)).expect("read chunk");
        let start = Instant::now();
        let header = blob::parse_header(&raw, Some(d)).expect("header");
        let payload = std::borrow::Cow::Borrowed(&raw[blob::HEADER_SIZE..]);
        let data = blob::decode_payload(&header, payload, Some(d), CHUNK).expect("decode");
        total += start.elapsed();
        bytes += data.len() as u64;
    }
    (bytes, total)
}

/// An O_DIRECT-aligned buffer of `len` bytes inside `storage`.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + len]
}

/// Average latency of random 4 KiB O_DIRECT reads (an upper bound on AST).
fn measure_seek(path: &Path, size: u64) -> Duration {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open image O_DIRECT");
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, 4096);
    let mut rng = Rng(7);
    let blocks = size / 4096;
    let n = 2000;
    let start = Instant::now();
    for _ in 0..n {
        let off = (rng.next() % blocks) * 4096;
        f.read_exact_at(buf, off).expect("random read");
    }
    start.elapsed() / n
}

/// Sequential O_DIRECT read rate with 4 MiB requests (MRS), bytes/s.
fn measure_sequential(path: &Path, size: u64) -> f64 {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open image O_DIRECT");
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, CHUNK);
    let start = Instant::now();
    let mut off = 0;
    while off + CHUNK as u64 <= size {
        f.read_exact_at(buf, off).expect("sequential read");
        off += CHUNK as u64;
    }
    off as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args = parse_args();
    let t0 = Instant::now();
    eprintln!(
        "building a {} MiB mixed image and datastore in {} ...",
        args.size_mib,
        args.dir.display()
    );
    let ds = build(&args);
    let size = ds.index.size();
    let zero_chunks = ds.index.chunk_count() - ds.nonzero_chunks;
    println!(
        "image {} MiB: {} chunks of 4 MiB ({} zero), {} unique chunk files, {:.1} MiB on disk (built in {:.1}s)",
        size >> 20,
        ds.index.chunk_count(),
        zero_chunks,
        ds.files.len(),
        ds.file_bytes as f64 / (1u64 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mode = if args.cold {
        "cold (caches dropped before each variant)"
    } else {
        "warm page cache"
    };
    println!("mode: {mode}; pool: {cores} workers, 48 MiB cache, read-ahead 8 (at most half the cache); rates in MB/s (1e6) of image bytes unless noted");

    let prepare = || {
        if args.cold {
            drop_caches();
        } else {
            page_cache_scan(&ds); // make sure every chunk file is cached
        }
    };
    let rounds = if args.cold { 1 } else { 3 };
    let best = |v: &[(f64, f64)]| {
        v.iter()
            .copied()
            .fold((0.0, 0.0), |m, x| if x.0 > m.0 { x } else { m })
    };
    let show = |v: &[(f64, f64)]| {
        v.iter()
            .map(|(r, busy)| format!("{r:.0} @{busy:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let (mut a4, mut a128, mut b, mut pc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c, mut peaks, mut idle_rss, mut c_info) = (Vec::new(), Vec::new(), 0, String::new());
    let (mut info4, mut info128) = (String::new(), String::new());
    if args.agent_only {
        for run in 0..rounds {
            prepare();
            let (t, peak, _, info) = agent_scan(&ds, CHUNK, run, &args.agent_args);
            println!(
                "(c)  agent image.read, 4 MiB x {PIPELINE} deep {:>7.0} MB/s, peak RSS {:.1} MiB  {info}",
                rate(size, t),
                peak as f64 / (1u64 << 20) as f64
            );
        }
        return;
    }
    for _ in 0..rounds {
        prepare();
        let (info, t, busy) = measured(|| pool_scan(&ds, CHUNK));
        a4.push((rate(size, t), busy));
        info4 = info;
        prepare();
        let (info, t, busy) = measured(|| pool_scan(&ds, 128 << 10));
        a128.push((rate(size, t), busy));
        info128 = info;
        prepare();
        let (t, peak, idle, info) = agent_scan(&ds, CHUNK, c.len(), &args.agent_args);
        c.push((rate(size, t), 0.0));
        c_info = info;
        peaks.push(peak);
        idle_rss = idle;
        prepare();
        let ((), t, busy) = measured(|| ((), naive_scan(&ds)));
        b.push((rate(size, t), busy));
        prepare();
        let ((), t, busy) = measured(|| ((), page_cache_scan(&ds)));
        pc.push((rate(ds.file_bytes, t), busy));
    }
    let (dec_bytes, dec_time) = decode_scan(&ds);
    let decode = rate(dec_bytes, dec_time);

    let (a, b_best, pc_best) = (best(&a4).0, best(&b).0, best(&pc).0);
    println!("variant                                 MB/s   runs [MB/s @ cores busy]");
    println!(
        "(a)  pool, sequential 4 MiB reads     {:>7.0}   [{}]  {info4}",
        a,
        show(&a4)
    );
    println!(
        "(a') pool, sequential 128 KiB reads   {:>7.0}   [{}]  {info128}",
        best(&a128).0,
        show(&a128)
    );
    println!(
        "(b)  naive: read + decode inline      {:>7.0}   [{}]",
        b_best,
        show(&b),
    );
    let c_best = best(&c).0;
    let peak = peaks.iter().copied().max().unwrap_or(0);
    println!(
        "(c)  agent image.read, 4 MiB x {PIPELINE} deep {:>7.0}   runs [{}]  {c_info}",
        c_best,
        show(&c),
    );
    println!(
        "(d1) page-cache read of chunk files   {:>7.0}   [{}]  (MB/s of chunk-file bytes)",
        pc_best,
        show(&pc),
    );
    println!(
        "(d2) single-core zstd+SHA decode  {:>7.0}   (decoded bytes over all {} chunks)",
        decode,
        ds.index.chunk_count()
    );
    // On a shared machine the variants may not get the cores they could
    // use; MB per CPU-second shows whether the pool wastes any.
    let per_cpu = |v: &[(f64, f64)]| {
        let (r, busy) = best(v);
        r / busy.max(1e-9)
    };
    println!(
        "cores available check: best (a) ran at {:.1} cores busy, (b) at {:.1}; MB per CPU-second: (a) {:.0}, (b) {:.0}",
        best(&a4).1,
        best(&b).1,
        per_cpu(&a4),
        per_cpu(&b)
    );
    let limit = pc_best.min(2.0 * decode);
    println!("(a)/(b) = {:.2}   (goal >= 1.7)", a / b_best);
    println!(
        "(c)/(a) = {c_best:.0}/{a:.0} = {:.2}   (goal >= 0.6)",
        c_best / a
    );
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    // A later --cache-mb wins, as on the agent's command line.
    let cache_mib = args
        .agent_args
        .windows(2)
        .filter(|w| w[0] == "--cache-mb")
        .filter_map(|w| w[1].parse().ok())
        .next_back()
        .unwrap_or(AGENT_CACHE_MIB);
    println!(
        "agent peak RSS (VmHWM) while reading: {:.1} MiB (after start {:.1} MiB); goal <= {} + 32 = {} MiB{}",
        mib(peak),
        mib(idle_rss),
        cache_mib,
        cache_mib + 32,
        if args.agent_args.is_empty() {
            String::new()
        } else {
            format!("  (agent options {:?})", args.agent_args)
        }
    );
    println!(
        "(a)/min(page cache, 2 x decode) = {a:.0}/{limit:.0} = {:.2}   (goal >= 0.8)",
        a / limit
    );

    if args.cold {
        drop_caches();
        let ast = measure_seek(&ds.image, size);
        drop_caches();
        let mrs = measure_sequential(&ds.image, size);
        let acs = ds.nonzero_file_bytes as f64 / ds.nonzero_chunks.max(1) as f64;
        let ast_s = ast.as_secs_f64();
        let max_acs = acs / (ast_s + acs / mrs);
        // Non-zero chunks hold CHUNK image bytes in `acs` file bytes.
        let image_equiv = max_acs * CHUNK as f64 / acs;
        println!(
            "disk: AST {:.3} ms (random 4 KiB O_DIRECT, mean of 2000), MRS {:.0} MB/s (sequential 4 MiB O_DIRECT)",
            ast_s * 1e3,
            mrs / MB
        );
        println!(
            "MAX(ACS) = ACS/(AST + ACS/MRS) with ACS = {:.2} MB (mean non-zero chunk file) = {:.0} MB/s of chunk files \
             = {:.0} MB/s of image bytes for non-zero chunks",
            acs / MB,
            max_acs / MB,
            image_equiv / MB
        );
        println!(
            "(a) cold / MAX(ACS) image figure = {:.2} (zero chunks, {} of {}, cost no I/O in (a))",
            a / (image_equiv / MB),
            zero_chunks,
            ds.index.chunk_count()
        );
    }
    println!("total bench time {:.1}s", t0.elapsed().as_secs_f64());
}
