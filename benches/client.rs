//! restore-client benchmark (issue 5 figures; not run by CI).
//!
//! Builds an ext4 image holding a 100 MiB file of random bytes and a small
//! file 17 directories deep, imports it into a datastore, starts a release
//! agent on a Unix socket, and reports side by side in one run, with the same
//! data and the same (warm) cache state:
//!   - in-process `image.read` (the pool's ArchiveReader) over the whole
//!     image and over the file's own bytes (its extents), and in-process
//!     `fs.read` of the file (the agent's filesystem reader),
//!   - `restore-client cat` of the 100 MiB file to a file (whole process:
//!     spawn, connect, authenticate, stat, pipelined reads),
//!   - `restore-client cat` of the small deep file (latency),
//!   - casync, borg and restic restoring the same file from their own
//!     repositories of the same tree, when installed (Debian packages
//!     casync, borgbackup, restic).
//!
//! Warm figures: page cache dropped (when root), the data read once, then
//! each variant runs `--rounds` times interleaved; the median is reported.
//!
//! A second part (`client/tree.rs`) extracts a whole tree of many files:
//! `restore-client extract -o DIR` against `tar -xf` and `restic restore` of
//! the same tree (see that module).
//!
//! Usage: cargo bench --bench client -- [--rounds N] [--size-mib N] [--dir DIR]
//!        [--tree | --file] [--tree-gb G] [--tree-files N] [--tree-rounds N]
//!        [--tree-dir DIR] [--out-dir DIR] [--tree-setup-only]
//! Without `--tree` or `--file` both parts run; `--tree` runs only the tree
//! part, `--file` only the single-file part.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use restore_agent::pool::{ChunkPool, PoolConfig};
use restore_agent::restore::backups::Backups;
use restore_agent::restore::fs::Extent;

#[path = "client/tree.rs"]
mod tree;

const CLIENT: &str = env!("CARGO_BIN_EXE_restore-client");
const AGENT: &str = env!("CARGO_BIN_EXE_restore-agent");
const SNAPSHOT: &str = "host/bench/2026-01-01T00:00:00Z";
const ARCHIVE: &str = "bench.img.fidx";
const MB: f64 = 1e6;

const USAGE: &str = "usage: client [--file | --tree] [--rounds N (5)] [--size-mib N (100)] \
     [--dir DIR ($TMPDIR)] [--tree-gb GB (1.5)] [--tree-files N (48000)] [--tree-rounds N (3)] \
     [--tree-dir DIR (/dev/shm)] [--out-dir DIR (/dev/shm)] [--tree-setup-only]";

/// Another tool's restore of the big file into a directory.
type Restore = Box<dyn Fn(&Path)>;

pub(crate) struct Args {
    rounds: usize,
    size_mib: usize,
    dir: PathBuf,
    /// Which parts run.
    file_part: bool,
    tree_part: bool,
    pub(crate) tree: tree::TreeArgs,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 5,
        size_mib: 100,
        dir: std::env::temp_dir(),
        file_part: true,
        tree_part: true,
        tree: tree::TreeArgs::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value =
            |what: &str| -> String { it.next().unwrap_or_else(|| panic!("{what} needs a value")) };
        let num = |what: &str, v: String| -> usize {
            v.parse()
                .unwrap_or_else(|_| panic!("{what} needs a number"))
        };
        match arg.as_str() {
            "--rounds" => a.rounds = num("--rounds", value("--rounds")).max(1),
            "--size-mib" => a.size_mib = num("--size-mib", value("--size-mib")).max(1),
            "--dir" => a.dir = PathBuf::from(value("--dir")),
            "--tree" => a.file_part = false,
            "--file" => a.tree_part = false,
            "--tree-gb" => {
                a.tree.gb = value("--tree-gb")
                    .parse()
                    .expect("--tree-gb needs a number");
                assert!(a.tree.gb > 0.0, "--tree-gb must be positive");
            }
            "--tree-files" => a.tree.files = num("--tree-files", value("--tree-files")).max(10),
            "--tree-rounds" => a.tree.rounds = num("--tree-rounds", value("--tree-rounds")).max(1),
            "--tree-dir" => a.tree.dir = PathBuf::from(value("--tree-dir")),
            "--out-dir" => a.tree.out_dir = PathBuf::from(value("--out-dir")),
            "--tree-setup-only" => {
                a.tree.setup_only = true;
                a.file_part = false;
            }
            // cargo bench passes --bench
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    a
}

pub(crate) fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A restic repository at `repo` holding a backup of `src` (password `bench`).
fn restic_backup(src: &Path, repo: &Path) {
    sh(Command::new("restic")
        .env("RESTIC_PASSWORD", "bench")
        .args(["init", "-q", "--repo"])
        .arg(repo));
    sh(Command::new("restic")
        .env("RESTIC_PASSWORD", "bench")
        .current_dir(src)
        .args(["backup", "-q", "--repo"])
        .arg(repo)
        .arg("."));
}

pub(crate) fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// CPU seconds (user + system) of all waited-for children so far.
pub(crate) fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}

pub(crate) fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

/// Reads every file under `dir` once (to warm the page cache).
pub(crate) fn read_tree(dir: &Path) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find '{}' -type f -exec cat {{}} + > /dev/null",
            dir.display()
        ))
        .status();
}

/// A release agent on a Unix socket, killed when dropped.
pub(crate) struct Agent {
    child: Child,
    connect: String,
    ticket: PathBuf,
}

impl Agent {
    /// Starts an agent serving `store` with its socket and ticket in `root`,
    /// and waits until it answers.
    pub(crate) fn start(root: &Path, store: &Path) -> Agent {
        let ticket = root.join("ticket");
        fs::write(&ticket, "bench-ticket\n").expect("ticket");
        fs::set_permissions(&ticket, fs::Permissions::from_mode(0o600)).expect("chmod");
        let sock = root.join("agent.sock");
        let child = Command::new(AGENT)
            .env("RUST_LOG", "warn")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--ticket-file")
            .arg(&ticket)
            .args(["--idle-timeout", "0", "--datastore"])
            .arg(store)
            .stdin(Stdio::null())
            .spawn()
            .expect("start agent");
        let agent = Agent {
            child,
            connect: format!("unix:{}", sock.display()),
            ticket,
        };
        let started = Instant::now();
        while !agent
            .client(&["ping"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "agent did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// CPU seconds (user + system) the agent has used so far.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and
        // stime are the 12th and 13th.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / tick.max(1.0)
    }

    /// `restore-client` connected to this agent, with `extra` arguments.
    pub(crate) fn client(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(CLIENT);
        c.arg("--connect")
            .arg(&self.connect)
            .arg("--ticket-file")
            .arg(&self.ticket)
            .args(extra)
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    let args = parse_args();
    if args.file_part {
        file_bench(&args);
    }
    if args.tree_part {
        if args.file_part {
            println!();
        }
        tree::run(&args.tree);
    }
}

/// One 100 MiB file and one small deep file: `cat` against in-process reads
/// and the other tools.
fn file_bench(args: &Args) {
    let work = tempfile::Builder::new()
        .prefix("ra-bench-client-")
        .tempdir_in(&args.dir)
        .expect("temp dir");
    let root = work.path();
    let size = args.size_mib << 20;

    // The tree: one big random file, one small file 17 directories deep.
    let src = root.join("src");
    let deep_rel: String = (1..=17).map(|i| format!("d{i:02}/")).collect();
    let deep_dir = src.join(&deep_rel);
    fs::create_dir_all(&deep_dir).expect("mkdir");
    fs::write(
        deep_dir.join("small.txt"),
        b"a small file seventeen levels down\n",
    )
    .expect("write");
    {
        let mut f = fs::File::create(src.join("big.bin")).expect("create");
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..args.size_mib {
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&buf).expect("write");
        }
    }
    let image = root.join("bench.img");
    let image_mib = args.size_mib + args.size_mib / 8 + 16;
    eprintln!("building a {image_mib} MiB ext4 image and importing it ...");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&image)
        .arg(format!("{image_mib}M")));
    let store = root.join("store");
    sh(Command::new(CLIENT).args(["store", "init"]).arg(&store));
    sh(Command::new(CLIENT)
        .args(["store", "import-image", "--store"])
        .arg(&store)
        .args(["--snapshot", SNAPSHOT, "--archive", "bench.img"])
        .arg(&image));

    // The other tools' repositories of the same tree.
    let mut others: Vec<(&str, Restore)> = Vec::new();
    if which("restic") {
        let repo = root.join("restic");
        restic_backup(&src, &repo);
        others.push((
            "restic restore",
            Box::new(move |out: &Path| {
                sh(Command::new("restic")
                    .env("RESTIC_PASSWORD", "bench")
                    .args(["restore", "-q", "latest", "--repo"])
                    .arg(&repo)
                    .args(["--include", "/big.bin", "--target"])
                    .arg(out));
            }),
        ));
    }
    if which("borg") {
        let repo = root.join("borg");
        sh(Command::new("borg")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .args(["init", "-e", "none"])
            .arg(&repo));
        sh(Command::new("borg")
            .current_dir(&src)
            .arg("create")
            .arg(format!("{}::a", repo.display()))
            .arg("."));
        others.push((
            "borg extract",
            Box::new(move |out: &Path| {
                sh(Command::new("borg")
                    .current_dir(out)
                    .arg("extract")
                    .arg(format!("{}::a", repo.display()))
                    .arg("big.bin"));
            }),
        ));
    }
    if which("casync") {
        let cstore = root.join("casync.castr");
        let index = root.join("big.caibx");
        sh(Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", cstore.display()))
            .arg(&index)
            .arg(src.join("big.bin")));
        others.push((
            "casync extract",
            Box::new(move |out: &Path| {
                sh(Command::new("casync")
                    .arg("extract")
                    .arg(format!("--store={}", cstore.display()))
                    .arg(&index)
                    .arg(out.join("big.bin")));
            }),
        ));
    }

    // The agent, release build, on a Unix socket.
    let agent = Agent::start(root, &store);
    let client = |extra: &[&str]| agent.client(extra);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let image_size = fs::metadata(&image).expect("stat").len();
    // A fresh pool per round: the same cache state as an agent meeting the
    // data for the first time.
    let fresh_backups = || {
        Backups::open(
            Some(&store),
            Vec::new(),
            ChunkPool::new(PoolConfig::default()),
        )
        .expect("open store")
    };
    // In-process image.read of byte ranges of the image, in 4 MiB reads.
    let in_process_ranges = |ranges: &[(u64, u64)]| {
        runtime.block_on(async {
            let backups = fresh_backups();
            let reader = backups.open_archive(SNAPSHOT, ARCHIVE).expect("archive");
            let t = Instant::now();
            for &(start, len) in ranges {
                let mut offset = start;
                while offset < start + len {
                    let want = (start + len - offset).min(4 << 20) as usize;
                    let slices = reader.read_slices(offset, want).await.expect("read_slices");
                    let n: usize = slices.iter().map(|s| s.len()).sum();
                    assert_eq!(n, want, "short image");
                    offset += n as u64;
                }
            }
            t.elapsed()
        })
    };
    let in_process_image = || in_process_ranges(&[(0, image_size)]);
    // Where the file's bytes lie in the image (volume `raw` is the whole
    // disk), for image.read of exactly the bytes cat returns.
    let file_extents: Vec<(u64, u64)> = runtime.block_on(async {
        let backups = fresh_backups();
        let fs = backups
            .filesystem(SNAPSHOT, ARCHIVE, "raw")
            .expect("filesystem");
        // map answers at most one read's worth at a time
        let mut extents = Vec::new();
        let mut offset = 0u64;
        while offset < size as u64 {
            let map = fs
                .run(move |f| f.map(b"/big.bin", offset, 16 << 20))
                .await
                .expect("fs thread")
                .expect("map")
                .expect("ext maps its files");
            for e in &map.extents {
                match *e {
                    Extent::Disk { offset, len } => extents.push((offset, len)),
                    Extent::Zero { .. } => panic!("the random file has no holes"),
                }
                offset += e.bytes();
            }
            if map.eof {
                break;
            }
        }
        extents
    });
    assert_eq!(
        file_extents.iter().map(|e| e.1).sum::<u64>(),
        size as u64,
        "extents cover the file"
    );
    let in_process_extents = || in_process_ranges(&file_extents);
    let in_process_fs = || {
        runtime.block_on(async {
            let backups = fresh_backups();
            let fs = backups
                .filesystem(SNAPSHOT, ARCHIVE, "raw")
                .expect("filesystem");
            let t = Instant::now();
            let mut offset = 0u64;
            loop {
                let (data, eof) = fs
                    .run(move |f| f.read(b"/big.bin", offset, 4 << 20))
                    .await
                    .expect("fs thread")
                    .expect("read");
                offset += data.len() as u64;
                if eof || data.is_empty() {
                    break;
                }
            }
            assert_eq!(offset, size as u64);
            t.elapsed()
        })
    };
    let out_file = root.join("cat.out");
    let cat_big = || {
        // A new file each time, as the other tools restore into a new
        // directory: ext4 writes back a file that was truncated and
        // rewritten when it is closed (auto_da_alloc), which would charge
        // cat for flushing 100 MiB of the previous round.
        let _ = fs::remove_file(&out_file);
        let f = fs::File::create(&out_file).expect("create");
        let t = Instant::now();
        let st = client(&["cat", SNAPSHOT, ARCHIVE, "raw", "/big.bin"])
            .stdout(f)
            .status()
            .expect("cat");
        let d = t.elapsed();
        assert!(st.success());
        assert_eq!(fs::metadata(&out_file).expect("stat").len(), size as u64);
        d
    };
    let deep_path = format!("/{deep_rel}small.txt");
    let cat_small = || {
        let t = Instant::now();
        let out = client(&["cat", SNAPSHOT, ARCHIVE, "raw", &deep_path])
            .output()
            .expect("cat");
        let d = t.elapsed();
        assert!(out.status.success() && out.stdout.starts_with(b"a small file"));
        d
    };

    // Warm: drop caches, read everything once, then measure.
    let dropped = drop_caches();
    read_tree(root);
    in_process_image();
    cat_big();
    cat_small();
    let restore_dirs: Vec<PathBuf> = (0..others.len())
        .map(|i| root.join(format!("restore-{i}")))
        .collect();

    let mut t_image = Vec::new();
    let mut t_extents = Vec::new();
    let mut t_fs = Vec::new();
    let mut t_cat = Vec::new();
    let mut t_small = Vec::new();
    let mut t_others: Vec<Vec<Duration>> = vec![Vec::new(); others.len()];
    for _ in 0..args.rounds {
        t_image.push(in_process_image());
        t_extents.push(in_process_extents());
        t_fs.push(in_process_fs());
        t_cat.push(cat_big());
        for _ in 0..5 {
            t_small.push(cat_small());
        }
        for (i, (_, restore)) in others.iter().enumerate() {
            let _ = fs::remove_dir_all(&restore_dirs[i]);
            fs::create_dir_all(&restore_dirs[i]).expect("mkdir");
            let t = Instant::now();
            restore(&restore_dirs[i]);
            t_others[i].push(t.elapsed());
        }
    }

    let rate = |bytes: u64, d: Duration| bytes as f64 / MB / d.as_secs_f64();
    let image_rate = rate(image_size, median(t_image.clone()));
    let extents_t = median(t_extents);
    let extents_rate = rate(size as u64, extents_t);
    let cat = median(t_cat.clone());
    let cat_rate = rate(size as u64, cat);
    println!(
        "restore-client benchmark: {} MiB file, {} rounds (median), page cache {}",
        args.size_mib,
        args.rounds,
        if dropped {
            "dropped, then warmed"
        } else {
            "warm (could not drop: not root)"
        }
    );
    println!("{:<44} {:>10} {:>10}", "variant", "seconds", "MB/s");
    println!(
        "{:<44} {:>10.3} {:>10.0}",
        "in-process image.read (whole image)",
        median(t_image).as_secs_f64(),
        image_rate
    );
    println!(
        "{:<44} {:>10.3} {:>10.0}",
        "in-process image.read of the file's bytes",
        extents_t.as_secs_f64(),
        extents_rate
    );
    let fs_t = median(t_fs);
    println!(
        "{:<44} {:>10.3} {:>10.0}",
        "in-process fs.read of the file",
        fs_t.as_secs_f64(),
        rate(size as u64, fs_t)
    );
    println!(
        "{:<44} {:>10.3} {:>10.0}",
        "restore-client cat (whole process)",
        cat.as_secs_f64(),
        cat_rate
    );
    let mut casync = None;
    for (i, (name, _)) in others.iter().enumerate() {
        let d = median(t_others[i].clone());
        if *name == "casync extract" {
            casync = Some(d);
        }
        println!(
            "{:<44} {:>10.3} {:>10.0}",
            name,
            d.as_secs_f64(),
            rate(size as u64, d)
        );
    }
    let small = median(t_small.clone());
    let small_min = t_small.iter().min().copied().unwrap_or_default();
    println!(
        "{:<44} {:>10.4} (min {:.4})",
        "restore-client cat, file 17 dirs deep",
        small.as_secs_f64(),
        small_min.as_secs_f64()
    );
    println!();
    println!(
        "cat / in-process image.read of the same bytes: {:.0}% (goal >= 60%); \
         of the whole image, whose zero chunks cost nothing: {:.0}%",
        100.0 * cat_rate / extents_rate,
        100.0 * cat_rate / image_rate
    );
    println!(
        "cat of {} MiB warm: {:.3} s (goal <= 0.15 s for 100 MiB)",
        args.size_mib,
        cat.as_secs_f64()
    );
    if let Some(c) = casync {
        println!(
            "casync / cat time: {:.1}x (goal >= 2x)",
            c.as_secs_f64() / cat.as_secs_f64()
        );
    }
    println!(
        "small deep file: {:.1} ms (goal < 10 ms warm)",
        small.as_secs_f64() * 1e3
    );
}
