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

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Conn, Recv};
use restore_agent::vm::{self, Accel, StartOptions, VmRecord, Vsock};
use serde_json::{json, Value};

/// One VM at a time: two TCG guests on 2 shared cores slow each other down.
static VM_LOCK: Mutex<()> = Mutex::new(());
static SETUP: OnceLock<Option<Setup>> = OnceLock::new();

struct Setup {
    image_dir: PathBuf,
    vhost: PathBuf,
    _run_dir: tempfile::TempDir,
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
            let run_dir = tempfile::tempdir().expect("tempdir");
            // The state file of these tests' VMs, apart from the user's.
            std::env::set_var("RESTORE_AGENT_RUN_DIR", run_dir.path());
            Some(Setup {
                image_dir: root.join("target/vm"),
                vhost,
                _run_dir: run_dir,
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

/// The agent's peak RSS as init prints it to the console before power off.
fn peak_rss_kib(console: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains("peak RSS"))?;
    line.split_whitespace().rev().nth(1)?.parse().ok()
}

#[test]
fn boot_ping_status_and_stop_powers_off() {
    let Some(s) = setup() else { return };
    let _one = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let rec = vm::launch::start(&options(s, "e2e")).unwrap_or_else(|e| panic!("vm start: {e}"));
    let ready = t.elapsed();
    eprintln!("boot to ready: {:.2} s (TCG, 128 MiB)", ready.as_secs_f64());
    assert!(rec.connect.starts_with("hybrid:") && rec.connect.ends_with(":807"));
    assert!(rec.cid >= 10);

    // The VM is listed and resolvable.
    let listed = vm::launch::list().unwrap();
    assert!(listed.iter().any(|(r, alive)| r.name == "e2e" && *alive));
    assert_eq!(
        vm::resolve("e2e").unwrap(),
        (rec.connect.clone(), rec.ticket_file.clone())
    );

    let mut c = connect(&rec);
    let auth = c.call_ok("authenticate", Some(json!({ "ticket": ticket(&rec) })));
    assert_eq!(auth["agent"], "restore-agent");
    assert_eq!(c.call_ok("ping", None), json!("pong"));
    let status = c.call_ok("status", Some(json!({"keep_timeout": true})));
    assert_eq!(status["idle_timeout_s"], json!(600));
    eprintln!(
        "guest agent RSS after boot: {} KiB",
        status["rss_bytes"].as_u64().unwrap_or(0) / 1024
    );
    drop(c);

    let out = vm::launch::stop("e2e", Duration::from_secs(60), true).unwrap();
    let log = console(&rec);
    assert!(
        out.powered_off,
        "the guest did not power off; console:\n{log}"
    );
    assert_eq!(out.qemu_exit, Some(0), "QEMU exit; console:\n{log}");
    assert!(log.contains("reboot: Power down"), "console:\n{log}");
    if let Some(peak) = peak_rss_kib(&log) {
        eprintln!("guest agent peak RSS: {peak} KiB");
        assert!(peak < 32 * 1024, "agent peak RSS {peak} KiB");
    }
    assert!(vm::launch::list()
        .unwrap()
        .iter()
        .all(|(r, _)| r.name != "e2e"));
    assert!(vm::resolve("e2e").is_err());
    let _ = std::fs::remove_dir_all(&rec.dir);
}

#[test]
fn wrong_ticket_is_refused_and_the_idle_watchdog_powers_off() {
    let Some(s) = setup() else { return };
    let _one = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
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
