//! End to end through a real VM: build the image (scripts/build-vm-image.sh),
//! boot it under TCG with vhost-user vsock (vhost-device-vsock), and talk to
//! the agent running as the guest's init over the hybrid Unix socket. No
//! AF_VSOCK socket is ever opened on this machine: every byte goes through
//! vhost-device-vsock's Unix socket.
//!
//! Needs qemu-system-x86_64, vhost-device-vsock (PATH or ~/.cargo/bin), the
//! musl target and Debian's kernel package. Without qemu or
//! vhost-device-vsock the tests are skipped with a message, unless
//! RESTORE_AGENT_REQUIRE_VM=1 (set by .ci/run) makes that a failure.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Conn, Recv};
use restore_agent::store::fidx::FixedIndex;
use restore_agent::store::index::ChunkIndex;
use restore_agent::store::manifest::{FileEntry, Manifest, MANIFEST_BLOB_NAME};
use restore_agent::store::{digest_hex, sha256};
use restore_agent::vm::{self, Accel, StartOptions, VmRecord, Vsock};
use serde_json::{json, Value};

/// One VM at a time: two TCG guests on 2 shared cores slow each other down.
static VM_LOCK: Mutex<()> = Mutex::new(());
static SETUP: OnceLock<Option<Setup>> = OnceLock::new();

struct Setup {
    image_dir: PathBuf,
    vhost: PathBuf,
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn setup() -> Option<&'static Setup> {
    SETUP
        .get_or_init(|| {
            let require = std::env::var_os("RESTORE_AGENT_REQUIRE_VM").is_some_and(|v| v == "1");
            let home_bin = std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cargo/bin/vhost-device-vsock"))
                .filter(|p| p.is_file());
            let vhost = which("vhost-device-vsock").or(home_bin);
            let (Some(_), Some(vhost)) = (which("qemu-system-x86_64"), vhost) else {
                assert!(
                    !require,
                    "qemu-system-x86_64 or vhost-device-vsock missing and RESTORE_AGENT_REQUIRE_VM=1"
                );
                eprintln!("SKIPPED: qemu-system-x86_64 or vhost-device-vsock not installed");
                return None;
            };
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let t = Instant::now();
            let status = Command::new(root.join("scripts/build-vm-image.sh"))
                .status()
                .expect("run scripts/build-vm-image.sh");
            assert!(status.success(), "scripts/build-vm-image.sh failed");
            eprintln!("VM image built in {:.1} s", t.elapsed().as_secs_f64());
            // `vm start` leaves QEMU behind when it exits: adopt such orphans
            // so the tests can collect QEMU's exit code.
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            // The state file of these tests' VMs, apart from the user's. It
            // lives in the target directory, not in a TempDir: this setup is
            // a static, never dropped, so a TempDir was left in /tmp by every
            // run. The previous run's directory is removed first.
            let run_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm_e2e-run");
            match std::fs::remove_dir_all(&run_dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    panic!("remove {}: {e}", run_dir.display())
                }
                _ => {}
            }
            std::env::set_var("RESTORE_AGENT_RUN_DIR", &run_dir);
            Some(Setup {
                image_dir: root.join("target/vm"),
                vhost,
            })
        })
        .as_ref()
}

fn options(s: &Setup, name: &str) -> StartOptions {
    StartOptions {
        name: Some(name.into()),
        store: None,
        images: Vec::new(),
        accel: Accel::Tcg,
        vsock: Vsock::VhostUser,
        memory_mib: 128,
        image_dir: s.image_dir.clone(),
        idle_timeout: None,
        // Generous: one boot took 42 s while both cores were compiling.
        ready_timeout: Duration::from_secs(120),
        qemu: "qemu-system-x86_64".into(),
        vhost_device_vsock: s.vhost.clone(),
    }
}

/// A raw line connection to the guest's agent through the hybrid socket.
fn connect(rec: &VmRecord) -> Conn {
    let rest = rec.connect.strip_prefix("hybrid:").expect("hybrid address");
    let (path, port) = rest.rsplit_once(':').expect("PATH:PORT");
    let mut s = UnixStream::connect(path).expect("connect hybrid socket");
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut s, format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut conn = Conn::from_stream(Box::new(s));
    match conn.recv_line_within(Duration::from_secs(10)) {
        Recv::Line(l) => assert!(
            l.starts_with(b"OK "),
            "handshake: {:?}",
            String::from_utf8_lossy(&l)
        ),
        other => panic!("hybrid handshake: {other:?}"),
    }
    conn
}

fn ticket(rec: &VmRecord) -> String {
    std::fs::read_to_string(&rec.ticket_file).expect("ticket file")
}

fn console(rec: &VmRecord) -> String {
    std::fs::read_to_string(&rec.console_log).unwrap_or_default()
}

/// Stops VM `.0` when a test panics before it has stopped the VM itself: a
/// failed assertion must not leave QEMU and its helper running.
struct StopOnPanic(&'static str);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = vm::launch::stop(self.0, Duration::from_secs(5), false);
        }
    }
}

const CLIENT: &str = env!("CARGO_BIN_EXE_restore-client");

/// An archive whose index (140,000 digests, 4.3 MiB) is large enough to be
/// mapped rather than read: a 547 GiB disk of zeros.
const BIG: &str = "big.img.fidx";
const BIG_CHUNK: u64 = 4 << 20;
const BIG_CHUNKS: u64 = 140_000;
const SNAPSHOT: &str = "vm/100/2026-01-01T00:00:00Z";

/// Runs restore-client with `args`, panicking unless it exits 0; returns stdout.
fn client(args: &[&str]) -> String {
    client_env(args, &[])
}

/// `client` with `env` added to restore-client's environment (and so to
/// that of the processes `vm start` leaves running).
fn client_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let t = Instant::now();
    let out = Command::new(CLIENT)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run restore-client");
    let cmd: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !a.starts_with('/'))
        .collect();
    eprintln!(
        "  restore-client {cmd:?}: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // With --output json a failure's reason (for `vm start`: QEMU's output
    // and the console's last lines) is on stdout.
    assert!(
        out.status.success(),
        "restore-client {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A source tree, an ext4 image made from it, and a datastore holding that
/// image as `SNAPSHOT/drive-scsi0.img.fidx`, and [`BIG`] beside it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = common::shm_tempdir();
        let src = dir.path().join("src");
        let d = src.join("dir");
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        fs::write(d.join("a.txt"), b"hello from the guest\n").unwrap();
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs::write(d.join("sub/big.bin"), &big).unwrap();
        fs::write(d.join("sub/deeper/empty"), b"").unwrap();
        fs::set_permissions(d.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("a.txt", d.join("link")).unwrap();
        fs::write(src.join("outside.txt"), b"not extracted").unwrap();
        let img = dir.path().join("disk.img");
        fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let mkfs = Command::new("mkfs.ext4")
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&img)
            .status()
            .expect("run mkfs.ext4");
        assert!(mkfs.success());
        let store = dir.path().join("store");
        client(&["store", "init", store.to_str().unwrap()]);
        client(&[
            "store",
            "import-image",
            "--store",
            store.to_str().unwrap(),
            "--snapshot",
            SNAPSHOT,
            "--archive",
            "drive-scsi0.img",
            img.to_str().unwrap(),
        ]);
        // BIG: zero chunks only, so that no chunk file is needed
        let zero = sha256(&vec![0u8; BIG_CHUNK as usize]);
        let idx = FixedIndex::new(
            BIG,
            BIG_CHUNKS * BIG_CHUNK,
            BIG_CHUNK,
            vec![zero; BIG_CHUNKS as usize],
            [9; 16],
            1_767_225_600,
        )
        .unwrap();
        let snap_dir = store.join(SNAPSHOT);
        idx.write(&snap_dir.join(BIG)).unwrap();
        let manifest_path = snap_dir.join(MANIFEST_BLOB_NAME);
        let mut m = Manifest::load(&manifest_path).unwrap();
        m.set_file(FileEntry {
            filename: BIG.into(),
            crypt_mode: "none".into(),
            size: idx.size(),
            csum: digest_hex(idx.index_csum()),
        });
        m.store(&manifest_path).unwrap();
        Fixture { dir }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// Asserts that `got` holds the same tree as `want`: names, file bytes,
/// permission bits and symlink targets.
fn assert_same_tree(want: &Path, got: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let (w, g) = (names(want), names(got));
    assert_eq!(w, g, "entries of {}", got.display());
    for name in w {
        let (a, b) = (want.join(&name), got.join(&name));
        let (ma, mb) = (
            fs::symlink_metadata(&a).unwrap(),
            fs::symlink_metadata(&b).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
        if ma.file_type().is_symlink() {
            assert_eq!(fs::read_link(&a).unwrap(), fs::read_link(&b).unwrap());
            continue;
        }
        assert_eq!(
            ma.permissions().mode() & 0o7777,
            mb.permissions().mode() & 0o7777,
            "{}",
            b.display()
        );
        if ma.is_dir() {
            assert_same_tree(&a, &b);
        } else {
            assert!(
                fs::read(&a).unwrap() == fs::read(&b).unwrap(),
                "contents of {}",
                b.display()
            );
        }
    }
}

/// The agent's peak RSS as init prints it to the console before power off.
fn peak_rss_kib(console: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains("peak RSS"))?;
    line.split_whitespace().rev().nth(1)?.parse().ok()
}

#[test]
fn boot_list_extract_status_and_stop_powers_off() {
    let Some(s) = setup() else { return };
    let t = Instant::now();
    let fx = Fixture::new();
    eprintln!(
        "fixture (ext4 image, import): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let _one = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _stop = StopOnPanic("e2e");
    let t = Instant::now();
    // vhost-device-vsock logs each connection that arrives before QEMU has
    // handed it the guest's memory, at level warn.
    let started = client_env(
        &[
            "--output",
            "json",
            "vm",
            "start",
            "--name",
            "e2e",
            "--store",
            fx.path("store").to_str().unwrap(),
            "--image",
            &format!("disk0={}", fx.path("disk.img").display()),
            "--accel",
            "tcg",
            "--vsock",
            "vhost-user",
            "--memory",
            "128",
            "--image-dir",
            s.image_dir.to_str().unwrap(),
            "--vhost-device-vsock",
            s.vhost.to_str().unwrap(),
            // Generous: one boot took 42 s while both cores were compiling.
            "--ready-timeout",
            "120",
        ],
        &[("RUST_LOG", "warn")],
    );
    let ready = t.elapsed();
    eprintln!(
        "boot to ready: {:.2} s (TCG, 128 MiB, vm start to ping)",
        ready.as_secs_f64()
    );
    let rec: VmRecord = serde_json::from_str(&started).expect("vm start --output json");
    assert!(rec.connect.starts_with("hybrid:") && rec.connect.ends_with(":807"));
    assert!(rec.cid >= 10);
    let mode = fs::metadata(&rec.ticket_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "ticket file mode {mode:o}");

    // `vm start` connected only once the guest listened: a connection made
    // while the guest sets up its vsock device can stop the helper from
    // relaying anything at all (src/vm/launch.rs, wait_ready).
    let helper_log = fs::read_to_string(rec.dir.join("vhost.log")).unwrap();
    assert!(
        !helper_log.contains("before vring initialization"),
        "vm start connected before the guest's vsock device was up:\n{helper_log}"
    );

    // The VM is listed and resolvable.
    let listed: Value = serde_json::from_str(&client(&["--output", "json", "vm", "list"])).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "e2e" && v["running"] == true),
        "{listed}"
    );
    assert_eq!(
        vm::resolve("e2e").unwrap(),
        (rec.connect.clone(), rec.ticket_file.clone())
    );

    // Raw protocol over the hybrid socket.
    let mut c = connect(&rec);
    let auth = c.call_ok("authenticate", Some(json!({ "ticket": ticket(&rec) })));
    assert_eq!(auth["agent"], "restore-agent");
    assert_eq!(c.call_ok("ping", None), json!("pong"));
    // An index large enough to be mapped, over the guest's 9p mount.
    let read = c.call_ok(
        "image.read",
        Some(json!({"snapshot": SNAPSHOT, "archive": BIG,
                    "offset": (BIG_CHUNKS - 2) * BIG_CHUNK + 5, "length": 12})),
    );
    assert_eq!(
        (&read["data"], &read["eof"]),
        (&json!("AAAAAAAAAAAAAAAA"), &json!(false))
    );
    drop(c);

    // Through the real client with --vm.
    let with = |args: &[&str]| client(&[&["--vm", "e2e"][..], args].concat());
    let snaps: Value = serde_json::from_str(&with(&["--output", "json", "snapshots"])).unwrap();
    let names: Vec<&str> = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["snapshot"].as_str())
        .collect();
    assert_eq!(names, [SNAPSHOT, "attached"], "{snaps}");
    let vols: Value = serde_json::from_str(&with(&[
        "--output",
        "json",
        "volumes",
        SNAPSHOT,
        "drive-scsi0.img.fidx",
    ]))
    .unwrap();
    assert_eq!(vols["volumes"][0]["fs"], "ext4", "{vols}");
    let ls = with(&["ls", SNAPSHOT, "drive-scsi0.img.fidx", "raw", "/dir"]);
    for name in ["a.txt", "link", "sub"] {
        assert!(ls.contains(name), "ls /dir: {ls}");
    }
    // The attached virtio disk, found by its serial.
    let cat = with(&["cat", "attached", "disk0", "raw", "/dir/a.txt"]);
    assert_eq!(cat, "hello from the guest\n");
    let out_dir = fx.path("out");
    let t = Instant::now();
    with(&[
        "extract",
        SNAPSHOT,
        "drive-scsi0.img.fidx",
        "raw",
        "/dir",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    eprintln!(
        "extract of /dir (3 MB) through the VM: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_same_tree(&fx.path("src/dir"), &out_dir);
    let status: Value = serde_json::from_str(&with(&["--output", "json", "status"])).unwrap();
    eprintln!(
        "guest agent RSS after extract: {} KiB",
        status["rss_bytes"].as_u64().unwrap_or(0) / 1024
    );
    assert!(
        status["requests_served"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    // Each extraction stream takes a few MiB: 8 at once exhausted 128 MiB
    // and the guest kernel panicked. Its limit follows the guest's memory.
    let max_streams = status["streams"]["max"].as_u64().unwrap_or(0);
    assert!((2..=6).contains(&max_streams), "{status}");

    // A guest slow to answer a connection: QEMU stopped for 7 s. Clients must
    // wait for the answer instead of closing the connection unanswered:
    // vhost-device-vsock 0.3.0 panics writing the late `OK` to a closed
    // socket, and the VM can never be reached again (src/vm/agent_call.rs).
    let pause = || {
        let pid = libc::pid_t::try_from(rec.pid).unwrap();
        // SAFETY: kill takes no pointers; the pid is this test's QEMU.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(7));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        })
    };
    let resume = pause();
    with(&["--connect-timeout", "30", "ping"]);
    resume.join().unwrap();
    with(&["ping"]);

    let resume = pause();
    let t = Instant::now();
    let stopped: Value = serde_json::from_str(&client(&[
        "--output",
        "json",
        "vm",
        "stop",
        "e2e",
        "--keep-logs",
    ]))
    .unwrap();
    resume.join().unwrap();
    eprintln!(
        "stop to power off: {:.2} s (7 s of it with QEMU stopped)",
        t.elapsed().as_secs_f64()
    );
    let log = console(&rec);
    assert_eq!(stopped["powered_off"], true, "{stopped}; console:\n{log}");
    // QEMU was orphaned when `vm start` exited; this process is its subreaper.
    assert_eq!(
        vm::state::reap_within(rec.pid, Duration::from_secs(10)),
        Some(0),
        "QEMU exit; console:\n{log}"
    );
    assert!(log.contains("reboot: Power down"), "console:\n{log}");
    let peak = peak_rss_kib(&log).unwrap_or_else(|| panic!("no peak RSS line; console:\n{log}"));
    eprintln!("guest agent peak RSS: {peak} KiB");
    assert!(peak < 32 * 1024, "agent peak RSS {peak} KiB");
    let listed: Value = serde_json::from_str(&client(&["--output", "json", "vm", "list"])).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "e2e"),
        "{listed}"
    );
    assert!(vm::resolve("e2e").is_err());
    let _ = fs::remove_dir_all(&rec.dir);
}

#[test]
fn wrong_ticket_is_refused_and_the_idle_watchdog_powers_off() {
    let Some(s) = setup() else { return };
    let _one = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _stop = StopOnPanic("idle");
    let mut opts = options(s, "idle");
    opts.idle_timeout = Some(8);
    let rec = vm::launch::start(&opts).unwrap_or_else(|e| panic!("vm start: {e}"));

    let mut c = connect(&rec);
    let resp: Value = c.call("authenticate", Some(json!({ "ticket": "not-the-ticket" })));
    assert_eq!(resp["error"]["code"], json!(-32002), "{resp}");
    c.expect_eof(Duration::from_secs(10));

    // No more requests: the watchdog stops the agent and init powers off.
    let deadline = Instant::now() + Duration::from_secs(90);
    while vm::state::qemu_alive(rec.pid, "idle") {
        assert!(
            Instant::now() < deadline,
            "VM still running; console:\n{}",
            console(&rec)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = console(&rec);
    assert!(log.contains("reboot: Power down"), "console:\n{log}");
    let out = vm::launch::stop("idle", Duration::from_secs(5), true).unwrap();
    assert_eq!(out.qemu_exit, Some(0));
    let _ = std::fs::remove_dir_all(&rec.dir);
}
