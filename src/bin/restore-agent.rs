//! The restore-agent daemon: parses the command line, loads the ticket, binds
//! the listeners, and serves until `stop`, a signal, the idle watchdog, or the
//! end of a stdio session.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use restore_agent::api::Agent;
use restore_agent::demo::Demo;
use restore_agent::init::LISTENING_LOG;
use restore_agent::pool::{ChunkPool, PoolConfig};
use restore_agent::restore::backups::Backups;
use restore_agent::rpc::auth::Ticket;
use restore_agent::rpc::{Server, ServerConfig, Shared};
use restore_agent::transport::{ListenAddr, Listener};

#[derive(Parser, Debug)]
#[command(
    name = "restore-agent",
    version,
    about = "File-restore agent: JSON-RPC 2.0 over vsock, Unix, TCP or stdio"
)]
struct Args {
    /// Where to listen: vsock:PORT, vsock:CID:PORT, unix:PATH, tcp:HOST:PORT or stdio (repeatable)
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<String>,
    /// File holding the ticket clients must authenticate with
    #[arg(long, value_name = "PATH", default_value = "/ticket")]
    ticket_file: PathBuf,
    /// Shut down after this many seconds without a request (0 = never) [default: 600, with --demo 0]
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Close connections that have not authenticated within this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    auth_timeout: u64,
    /// Delay before answering a wrong ticket
    #[arg(long, value_name = "MS", default_value_t = 500)]
    auth_fail_delay_ms: u64,
    /// Most connections open at once
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Longest request line in bytes
    #[arg(long, value_name = "N", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(64..))]
    max_request_bytes: u64,
    /// Close a connection whose client takes none of an answer for this many
    /// seconds while other reads wait for the memory the answer holds (0 = never)
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stall_timeout: u64,
    /// Most requests in one batch
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch: u64,
    /// Power the machine off instead of exiting (for use as a VM's init process)
    #[arg(long)]
    poweroff_on_exit: bool,
    /// A Proxmox-Backup-style datastore to serve (opened read-only)
    #[arg(long, value_name = "DIR")]
    datastore: Option<PathBuf>,
    /// A raw image file or block device to serve as archive NAME of the snapshot `attached` (repeatable)
    #[arg(long = "image", value_name = "NAME=PATH")]
    images: Vec<String>,
    /// Decoded-chunk cache size in MiB
    #[arg(long, value_name = "MIB", default_value_t = 48)]
    cache_mb: u64,
    /// Memory for directory listings in MiB, all open filesystems together;
    /// a larger directory is refused (1005) [default: a quarter of the
    /// machine's memory, at least 16]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    listing_mb: Option<u64>,
    /// Most extraction streams open at once, all connections together; each
    /// reads its filesystem on a thread of its own, with caches and buffers
    /// of a few MiB [default: one per 24 MiB of the machine's memory, from
    /// 2 to 32]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_streams: Option<u64>,
    /// Most chunks read ahead on sequential access
    #[arg(long, value_name = "N", default_value_t = 8)]
    readahead: usize,
    /// Serve a built-in demo datastore on a Unix socket and TCP 127.0.0.1 with a fresh ticket
    /// (it makes its own listeners, ticket and datastore, so it takes none of those options)
    #[arg(long, conflicts_with_all = ["listen", "ticket_file", "datastore", "images"])]
    demo: bool,
    /// Chunk read worker threads (default: number of cores)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: Option<u64>,
    /// Run as the VM's init: set up the guest, serve vsock:807 with /ticket,
    /// power off at the end (implied when the process is PID 1)
    #[arg(long)]
    init: bool,
}

fn main() -> ExitCode {
    let as_init = restore_agent::init::is_pid1();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if as_init => {
            // PID 1 must not exit: that panics the kernel.
            eprintln!("restore-agent: {e}");
            power_off();
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if as_init {
        // The console is a serial port: no colour codes in the VM's log.
        std::env::set_var("RUST_LOG_STYLE", "never");
    }
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // The FAT reader warns for every open of some volumes and for every
    // damaged long name: a client could flood the VM's serial console. Its
    // errors reach the log as the agent's own; `RUST_LOG` naming it wins.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("fatfs")) {
        logger.filter_module("fatfs", log::LevelFilter::Error);
    }
    logger.init();
    return_big_buffers_to_the_system();
    let init = args.init || as_init;
    let result = if init { run_init(args) } else { run(args) };
    let code = match result {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("restore-agent: {msg}");
            2
        }
    };
    if init {
        // Whatever stopped the agent (stop, idle watchdog, an error), the VM ends.
        if let Some(peak) = restore_agent::init::peak_rss_bytes() {
            eprintln!("restore-agent: peak RSS {} KiB", peak / 1024);
        }
        power_off();
    }
    ExitCode::from(code)
}

/// The VM's init: prepare the guest, then serve what it found.
fn run_init(mut args: Args) -> Result<(), String> {
    let plan = restore_agent::init::init_setup().map_err(|e| e.to_string())?;
    log::info!(
        "init: modules {:?}, datastore {:?}, images {:?}",
        plan.modules,
        plan.datastore,
        plan.images
    );
    if plan.datastore.is_some() {
        args.datastore = plan.datastore;
    }
    args.images.extend(
        plan.images
            .iter()
            .map(|(name, dev)| format!("{name}={}", dev.display())),
    );
    if args.listen.is_empty() {
        args.listen = vec![format!("vsock:{}", restore_agent::init::VSOCK_PORT)];
    }
    args.ticket_file = restore_agent::init::TICKET_FILE.into();
    // The chunk cache (and with it the read-ahead) must fit the VM's memory.
    if let Some(cap) = restore_agent::init::cache_cap_mb() {
        args.cache_mb = args.cache_mb.min(cap);
    }
    // main() powers off once the agent has stopped.
    args.poweroff_on_exit = false;
    run(args)
}

/// Reads and responses of up to 16 MiB (22 MiB as base64) are allocated on
/// several threads. glibc raises its mmap threshold to 32 MiB once such a
/// buffer is freed, after which they come from per-thread arenas that keep
/// the memory: RSS grew from 60 to over 200 MiB reading one 200 MiB file.
/// A fixed threshold above the 4 MiB chunk buffers (which the bounded cache
/// reuses) maps each big buffer and gives it back when it is freed. Setting
/// `MALLOC_MMAP_THRESHOLD_` in the environment overrides this.
fn return_big_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt only sets an allocator tunable; called before
            // any other thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
            }
        }
        // Setting the mmap threshold also fixes the trim threshold at 128 KiB:
        // every chunk buffer freed at the top of the heap went back to the
        // system and the next one was faulted in and zeroed again (`cargo
        // bench --bench pool`: 31,000 -> 18,000 page faults per GiB read, most
        // of the rest the cache's first fill). Keeping up to 32 MiB of free
        // heap bounds that memory while buffers are reused.
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
            }
        }
        // Chunk and response buffers are allocated on pool workers and freed
        // on runtime threads; with one arena they are reused instead of
        // piling up in per-thread arenas. Measured with `cargo bench --bench
        // pool`: agent peak RSS 104 -> 84 MiB, image.read 716 -> 1136 MB/s.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
    }
}

fn run(mut args: Args) -> Result<(), String> {
    let poweroff = args.poweroff_on_exit;
    // Kept until the agent has stopped; dropping it removes the demo files.
    let demo = if args.demo {
        Some(Demo::create()?)
    } else {
        None
    };
    if let Some(demo) = &demo {
        args.listen = vec![
            format!("unix:{}", demo.socket.display()),
            "tcp:127.0.0.1:0".into(),
        ];
        args.ticket_file = demo.ticket_file.clone();
        args.datastore = Some(demo.store.clone());
        args.idle_timeout = Some(args.idle_timeout.unwrap_or(0));
    }
    // Parsed here rather than by clap so that a bad address is one line.
    let addrs = if args.listen.is_empty() {
        vec![ListenAddr::Vsock {
            cid: restore_agent::transport::addr::VSOCK_CID_ANY,
            port: 807,
        }]
    } else {
        args.listen
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?
    };
    let ticket = Ticket::load(&args.ticket_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(args, addrs, ticket, demo.as_ref()))?;
    // Connections that outlived the grace period must not keep the process.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if poweroff {
        power_off();
    }
    Ok(())
}

async fn serve(
    args: Args,
    addrs: Vec<ListenAddr>,
    ticket: Ticket,
    demo: Option<&Demo>,
) -> Result<(), String> {
    let backups = open_backups(&args)?;
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        let listener = Listener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        log::info!("{LISTENING_LOG} {}", listener.local_addr());
        listeners.push(listener);
    }
    if let Some(demo) = demo {
        let tcp = listeners
            .iter()
            .map(Listener::local_addr)
            .find_map(|a| a.strip_prefix("tcp:").map(String::from));
        println!("{}", demo.instructions(tcp.as_deref()));
    }
    let idle = match args.idle_timeout.unwrap_or(600) {
        0 => None,
        secs => Some(Duration::from_secs(secs)),
    };
    let shared = Shared::new(idle);
    let max_streams = args
        .max_streams
        .map_or_else(default_max_streams, |n| n as usize);
    let router = restore_agent::api::router(
        Agent::new(shared.clone(), backups).with_max_streams(max_streams),
    );
    let cfg = ServerConfig {
        auth_timeout: Duration::from_secs(args.auth_timeout),
        auth_fail_delay: Duration::from_millis(args.auth_fail_delay_ms),
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        max_request_bytes: usize::try_from(args.max_request_bytes).unwrap_or(usize::MAX),
        max_batch: usize::try_from(args.max_batch).unwrap_or(usize::MAX),
        stall_timeout: (args.stall_timeout > 0).then(|| Duration::from_secs(args.stall_timeout)),
        ..ServerConfig::default()
    };
    tokio::spawn(on_signals(shared.clone()));
    Server::new(cfg, ticket, shared, router)
        .run(listeners)
        .await;
    log::info!("stopped");
    Ok(())
}

/// `--max-streams` by default: one per 24 MiB of memory. A stream's own
/// filesystem, its buffer and the archive blocks in flight took 4-6 MiB
/// each; 8 at once exhausted a 128 MiB VM (80 MiB for the guest), and the
/// more run at once, the more often its kernel runs short of memory for
/// vsock packets (see README.rst, "Concurrent extractions in a small VM").
fn default_max_streams() -> usize {
    restore_agent::init::memory_mb()
        .map_or(32, |m| usize::try_from(m / 24).unwrap_or(32).clamp(2, 32))
}

/// `--listing-mb` when the machine's memory size is unknown.
const LISTING_MB_UNKNOWN: u64 = 64;

fn open_backups(args: &Args) -> Result<Backups, String> {
    let listing_mb = args.listing_mb.unwrap_or_else(|| {
        restore_agent::init::memory_mb().map_or(LISTING_MB_UNKNOWN, |m| (m / 4).max(16))
    });
    restore_agent::restore::fs::set_listing_limit(
        usize::try_from(listing_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
    );
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = ChunkPool::new(PoolConfig {
        workers: args.workers.map_or(cores, |w| w as usize),
        cache_bytes: usize::try_from(args.cache_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
        readahead: args.readahead,
    });
    let mut images = Vec::with_capacity(args.images.len());
    for spec in &args.images {
        let Some((name, path)) = spec.split_once('=') else {
            return Err(format!("invalid --image `{spec}`: expected NAME=PATH"));
        };
        images.push((name.to_string(), PathBuf::from(path)));
    }
    Backups::open(args.datastore.as_deref(), images, pool).map_err(|e| e.to_string())
}

async fn on_signals(shared: std::sync::Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
    shared.shutdown();
}

fn power_off() {
    let err = restore_agent::init::power_off();
    eprintln!("restore-agent: power off failed: {err}");
}
