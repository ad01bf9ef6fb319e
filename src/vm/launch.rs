//! Starting and stopping one file-restore VM: the per-VM initramfs with its
//! ticket, the vhost-device-vsock helper, the QEMU command line, the wait for
//! the agent's `ping`, and the graceful-then-forced stop.
//!
//! Owns the processes it starts and the VM's private directory. It never
//! touches the host's vsock except through the kernel's vhost-vsock device
//! when the user chose `--vsock vhost`; with vhost-user every byte goes
//! through the helper's Unix socket.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde_json::json;

use super::agent_call;
use super::console::{tail, ConsoleWatch};
use super::cpio::CpioWriter;
use super::state::{self, StateLock, VmRecord, QEMU_NAME_PREFIX};
use crate::init::{valid_image_name, DATASTORE_TAG, LISTENING_LOG, VSOCK_PORT};

/// Lowest guest CID handed out (0..2 are reserved, low ones are often taken).
const MIN_CID: u32 = 10;
/// Attempts at a free CID with the kernel's vhost-vsock.
const CID_ATTEMPTS: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when it is real hardware virtualisation, else TCG
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Vsock {
    /// vhost when /dev/vhost-vsock exists, else vhost-user
    Auto,
    /// The host kernel's vhost-vsock device
    Vhost,
    /// vhost-device-vsock behind a Unix socket (hybrid vsock)
    VhostUser,
}

/// Everything `vm start` needs.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub name: Option<String>,
    pub store: Option<PathBuf>,
    pub images: Vec<(String, PathBuf)>,
    pub accel: Accel,
    pub vsock: Vsock,
    pub memory_mib: u32,
    /// Holds `vmlinux` and `initramfs.cpio` (see scripts/build-vm-image.sh).
    pub image_dir: PathBuf,
    /// The agent's idle watchdog inside the VM (None: the agent's default).
    pub idle_timeout: Option<u64>,
    pub ready_timeout: Duration,
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
}

/// The smallest guest `start` accepts. Two extractions at once (the
/// default `--max-streams` there) panicked a 104 MiB guest's kernel
/// ("System is deadlocked on memory") in 4 runs of 4 and a 112 MiB one's
/// in 3 of 9; 128 MiB passed 30 runs of three at once.
pub const MIN_MEMORY_MIB: u32 = 128;

/// Boots a VM and records it; returns once the agent answers `ping`.
pub fn start(opts: &StartOptions) -> Result<VmRecord, String> {
    let kernel = opts.image_dir.join("vmlinux");
    let base = opts.image_dir.join("initramfs.cpio");
    for f in [&kernel, &base] {
        if !f.is_file() {
            return Err(format!(
                "{} is missing: build the VM image with scripts/build-vm-image.sh or pass --image-dir",
                f.display()
            ));
        }
    }
    if let Some(store) = &opts.store {
        if !store.is_dir() {
            return Err(format!("datastore {} is not a directory", store.display()));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, path) in &opts.images {
        if !valid_image_name(name) {
            return Err(format!(
                "image name {name:?}: use up to 20 letters, digits, '.', '_' or '-'"
            ));
        }
        if !seen.insert(name) {
            return Err(format!("image name {name:?} given twice"));
        }
        if !path.exists() {
            return Err(format!("image {}: no such file", path.display()));
        }
    }
    if let Some(n) = &opts.name {
        if !valid_image_name(n) {
            return Err(format!(
                "VM name {n:?}: use up to 20 letters, digits, '.', '_' or '-'"
            ));
        }
    }
    if opts.memory_mib < MIN_MEMORY_MIB {
        return Err(format!(
            "--memory must be at least {MIN_MEMORY_MIB} MiB: the agent's memory limits \
             are sized for it, and smaller guests ran out of memory while extracting"
        ));
    }

    let lock = StateLock::acquire(&state::run_dir())?;
    let mut vms = lock.load()?;
    vms.retain(|name, rec| {
        let alive = state::qemu_alive(rec.pid, name);
        if !alive {
            cleanup_dead(rec);
        }
        alive
    });
    let mut cid = vms
        .values()
        .map(|r| r.cid + 1)
        .max()
        .unwrap_or(MIN_CID)
        .max(MIN_CID);
    let name = match &opts.name {
        Some(n) if vms.contains_key(n) => return Err(format!("a VM named {n} is already running")),
        Some(n) => n.clone(),
        None => format!("vm{cid}"),
    };
    let dir = lock.dir().join(&name);
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    let result = (|| {
        let ticket_file = dir.join("ticket");
        let ticket = new_ticket()?;
        write_private(&ticket_file, ticket.as_bytes())?;
        let initramfs = dir.join("initramfs.cpio");
        ticketed_initramfs(&base, &initramfs, ticket.as_bytes())?;
        let console_log = dir.join("console.log");
        let vsock = match opts.vsock {
            Vsock::Auto if Path::new("/dev/vhost-vsock").exists() => Vsock::Vhost,
            Vsock::Auto => Vsock::VhostUser,
            v => v,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (helper_pid, connect, vsock_args) = match vsock {
                Vsock::VhostUser => {
                    let (pid, sock, host_sock) = start_helper(opts, &dir, cid)?;
                    let args = vec![
                        "-chardev".to_string(),
                        format!("socket,id=vvs,path={}", sock.display()),
                        "-device".into(),
                        "vhost-user-vsock-pci,chardev=vvs".into(),
                    ];
                    (
                        Some(pid),
                        format!("hybrid:{}:{VSOCK_PORT}", host_sock.display()),
                        args,
                    )
                }
                _ => (
                    None,
                    format!("vsock:{cid}:{VSOCK_PORT}"),
                    vec![
                        "-device".to_string(),
                        format!("vhost-vsock-pci,guest-cid={cid}"),
                    ],
                ),
            };
            let pid = spawn_qemu(
                opts,
                &name,
                &dir,
                &kernel,
                &initramfs,
                &console_log,
                &vsock_args,
            )?;
            let rec = VmRecord {
                name: name.clone(),
                pid,
                helper_pid,
                cid,
                connect,
                ticket_file: ticket_file.clone(),
                console_log: console_log.clone(),
                dir: dir.clone(),
                started: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            match wait_ready(&rec, opts.ready_timeout) {
                Ok(()) => return Ok(rec),
                Err(e) => {
                    kill_processes(&rec);
                    let qemu_log = fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                    if vsock == Vsock::Vhost
                        && qemu_log.contains("unable to set guest cid")
                        && attempt < CID_ATTEMPTS
                    {
                        cid = cid
                            .checked_add(1)
                            .filter(|c| *c < u32::MAX - 1)
                            .unwrap_or(MIN_CID);
                        continue;
                    }
                    let mut msg = format!(
                        "{e}\n--- qemu ---\n{}\n--- console (last lines) ---\n{}",
                        qemu_log.trim_end(),
                        tail(&console_log, 20)
                    );
                    let helper_log = tail(&dir.join("vhost.log"), 20);
                    if !helper_log.is_empty() {
                        msg.push_str("\n--- vhost-device-vsock ---\n");
                        msg.push_str(&helper_log);
                    }
                    return Err(msg);
                }
            }
        }
    })();
    match result {
        Ok(rec) => {
            vms.insert(name, rec.clone());
            lock.save(&vms)?;
            Ok(rec)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StopOutcome {
    pub name: String,
    /// The guest shut down by itself after `stop` (no kill was needed).
    pub powered_off: bool,
    /// QEMU's exit code when this process was its parent.
    pub qemu_exit: Option<i32>,
}

/// Stops VM `name`: `stop` to the agent (the guest powers off), then
/// SIGTERM and SIGKILL after `timeout`. Removes its record and, unless
/// `keep_dir`, its directory.
pub fn stop(name: &str, timeout: Duration, keep_dir: bool) -> Result<StopOutcome, String> {
    let lock = StateLock::acquire(&state::run_dir())?;
    let mut vms = lock.load()?;
    let rec = vms
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no VM named {name}"))?;
    let mut powered_off = false;
    if state::qemu_alive(rec.pid, name) {
        let deadline = Instant::now() + timeout;
        // The whole timeout for the call too: see HANDSHAKE in agent_call.
        let _ = agent_call::call(&rec.connect, &rec.ticket_file, "stop", json!({}), timeout);
        powered_off = wait_gone(
            rec.pid,
            name,
            deadline.saturating_duration_since(Instant::now()),
        );
    }
    // A process that is exiting has lost its command line before it is a
    // zombie: give it a moment, then collect its exit code if it is ours.
    let mut qemu_exit = if powered_off {
        state::reap_within(rec.pid, Duration::from_secs(5))
    } else {
        None
    };
    kill_processes(&rec);
    if qemu_exit.is_none() {
        qemu_exit = state::reap_within(rec.pid, Duration::from_secs(1));
    }
    vms.remove(name);
    lock.save(&vms)?;
    if !keep_dir {
        let _ = fs::remove_dir_all(&rec.dir);
    }
    Ok(StopOutcome {
        name: name.to_string(),
        powered_off,
        qemu_exit,
    })
}

/// The recorded VMs with whether each is still running.
pub fn list() -> Result<Vec<(VmRecord, bool)>, String> {
    let lock = StateLock::acquire(&state::run_dir())?;
    Ok(lock
        .load()?
        .into_values()
        .map(|r| {
            let alive = state::qemu_alive(r.pid, &r.name);
            (r, alive)
        })
        .collect())
}

/// The connect address and ticket file of a running VM.
pub fn resolve(name: &str) -> Result<(String, PathBuf), String> {
    let lock = StateLock::acquire(&state::run_dir())?;
    let vms = lock.load()?;
    let rec = vms
        .get(name)
        .ok_or_else(|| format!("no VM named {name} (see `vm list`)"))?;
    if !state::qemu_alive(rec.pid, name) {
        return Err(format!("VM {name} is no longer running"));
    }
    Ok((rec.connect.clone(), rec.ticket_file.clone()))
}

fn new_ticket() -> Result<String, String> {
    let mut raw = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Copies the base initramfs and appends an archive holding `/ticket`.
pub fn ticketed_initramfs(base: &Path, out: &Path, ticket: &[u8]) -> Result<(), String> {
    let err = |e: io::Error| format!("{}: {e}", out.display());
    let mut src = File::open(base).map_err(|e| format!("{}: {e}", base.display()))?;
    let mut dst = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(out)
        .map_err(err)?;
    let len = io::copy(&mut src, &mut dst).map_err(err)?;
    // The kernel looks for the next archive at a 4-byte boundary.
    let pad = (4 - (len % 4) as usize) % 4;
    dst.write_all(&[0u8; 3][..pad]).map_err(err)?;
    let mut w = CpioWriter::new(io::BufWriter::new(dst), 0x7000_0000);
    w.file("ticket", 0o400, ticket).map_err(err)?;
    let buf = w.finish().map_err(err)?;
    buf.into_inner()
        .map_err(|e| err(e.into_error()))?
        .sync_all()
        .map_err(err)
}

fn detached(cmd: &mut Command, log: &Path) -> Result<(), String> {
    let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; the VM must outlive `vm start`
    // and not get the terminal's signals.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(())
}

fn start_helper(
    opts: &StartOptions,
    dir: &Path,
    cid: u32,
) -> Result<(u32, PathBuf, PathBuf), String> {
    let sock = dir.join("vhost.sock");
    let host_sock = dir.join("vm.vsock");
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(&host_sock);
    let mut cmd = Command::new(&opts.vhost_device_vsock);
    // Only the Unix-socket mode: the forward modes would open host vsock sockets.
    cmd.arg("--vm").arg(format!(
        "guest-cid={cid},socket={},uds-path={}",
        sock.display(),
        host_sock.display()
    ));
    detached(&mut cmd, &dir.join("vhost.log"))?;
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", opts.vhost_device_vsock.display()))?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if !state::pid_alive(pid) || Instant::now() > deadline {
            let _ = state::reap(pid);
            kill(pid);
            return Err(format!(
                "vhost-device-vsock did not create {}: {}",
                sock.display(),
                fs::read_to_string(dir.join("vhost.log"))
                    .unwrap_or_default()
                    .trim_end()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((pid, sock, host_sock))
}

/// True when KVM here is real hardware virtualisation (kvm_intel/kvm_amd),
/// not an emulating variant a stock guest kernel cannot run under.
fn kvm_usable() -> bool {
    let modules = fs::read_to_string("/proc/modules").unwrap_or_default();
    let hw = modules
        .lines()
        .any(|l| l.starts_with("kvm_intel ") || l.starts_with("kvm_amd "));
    hw && OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[allow(clippy::too_many_arguments)]
fn spawn_qemu(
    opts: &StartOptions,
    name: &str,
    dir: &Path,
    kernel: &Path,
    initramfs: &Path,
    console_log: &Path,
    vsock_args: &[String],
) -> Result<u32, String> {
    let kvm = match opts.accel {
        Accel::Auto => kvm_usable(),
        Accel::Kvm => true,
        Accel::Tcg => false,
    };
    let mem = opts.memory_mib;
    let mut append = "console=ttyS0 quiet panic=-1".to_string();
    if let Some(t) = opts.idle_timeout {
        // Words after `--` on the kernel command line are init's arguments.
        append.push_str(&format!(" -- --idle-timeout {t}"));
    }
    let mut cmd = Command::new(&opts.qemu);
    cmd.arg("-name").arg(format!("{QEMU_NAME_PREFIX}{name}"));
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg"]);
    }
    cmd.args(["-m", &format!("{mem}M"), "-smp", "1"])
        // vhost-user needs guest RAM it can map: a shared memfd.
        .args(["-machine", "pc,memory-backend=mem"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-no-user-config",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(append)
        .args(vsock_args);
    if let Some(store) = &opts.store {
        let path = qemu_opt_value(&store.display().to_string())?;
        cmd.arg("-virtfs").arg(format!(
            "local,path={path},mount_tag={DATASTORE_TAG},security_model=none,readonly=on,id=datastore"
        ));
    }
    for (i, (serial, path)) in opts.images.iter().enumerate() {
        let path = qemu_opt_value(&path.display().to_string())?;
        cmd.arg("-drive").arg(format!(
            "file={path},format=raw,if=none,id=disk{i},read-only=on"
        ));
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk{i},serial={serial}"));
    }
    detached(&mut cmd, &dir.join("qemu.log"))?;
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", opts.qemu.display()))?;
    Ok(child.id())
}

/// QEMU option values escape ',' by doubling it.
fn qemu_opt_value(s: &str) -> Result<String, String> {
    if s.contains('\n') {
        return Err(format!("path {s:?} holds a newline"));
    }
    Ok(s.replace(',', ",,"))
}

/// Waits until the agent answers `ping`, or `timeout`.
///
/// The first connection is made only once the console shows the agent's
/// vsock listener. vhost-device-vsock 0.3.0 handles a host connection by
/// walking the guest's TX ring; if one arrives after QEMU has handed it the
/// guest's memory but before the rings are set up, that walk fails and the
/// helper's worker thread ends for good: the guest boots and listens, and
/// every later connection hangs without an answer. Polling from the start
/// of the boot hit that window now and then on a loaded machine.
fn wait_ready(rec: &VmRecord, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut console = ConsoleWatch::new(&rec.console_log, &format!("{LISTENING_LOG} vsock:"));
    while !console.seen() {
        if !state::qemu_alive(rec.pid, &rec.name) {
            return Err("the VM exited before its agent listened".into());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the agent did not start listening within {} s (no \"{LISTENING_LOG} vsock:\" on the console)",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut last = String::new();
    loop {
        if !state::qemu_alive(rec.pid, &rec.name) {
            return Err(format!("the VM exited before its agent answered ({last})"));
        }
        // All the time left, not a few seconds per attempt: see HANDSHAKE in
        // agent_call.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match agent_call::call(&rec.connect, &rec.ticket_file, "ping", json!({}), left) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the agent did not answer ping within {} s ({last})",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_gone(pid: u32, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while state::qemu_alive(pid, name) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn kill(pid: u32) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

fn terminate(pid: u32, alive: impl Fn() -> bool) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    if !alive() {
        return;
    }
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(p, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        kill(pid);
    }
}

/// QEMU first, then its vhost-user helper (the other order makes QEMU
/// complain about the lost backend).
fn kill_processes(rec: &VmRecord) {
    terminate(rec.pid, || state::qemu_alive(rec.pid, &rec.name));
    if let Some(h) = rec.helper_pid {
        if helper_is_ours(h, &rec.dir) {
            terminate(h, || state::pid_alive(h));
        }
        let _ = state::reap(h);
    }
}

/// The helper's command line names our VM directory (guards recycled PIDs).
fn helper_is_ours(pid: u32, dir: &Path) -> bool {
    let needle = dir.join("vhost.sock").display().to_string();
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&needle))
        .unwrap_or(false)
}

fn cleanup_dead(rec: &VmRecord) {
    kill_processes(rec);
    let _ = state::reap(rec.pid);
    let _ = fs::remove_dir_all(&rec.dir);
}

/// Default `--image-dir`: `$RESTORE_AGENT_VM_DIR`, else the packaged
/// location.
pub fn default_image_dir() -> PathBuf {
    std::env::var_os("RESTORE_AGENT_VM_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/restore-agent/vm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticket_archive_is_appended_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let mut w = CpioWriter::new(Vec::new(), 1);
        w.file("init", 0o755, b"abc").unwrap();
        let mut bytes = w.finish().unwrap();
        bytes.push(0); // a base of odd length still gets an aligned second archive
        fs::write(&base, &bytes).unwrap();
        let out = dir.path().join("out");
        ticketed_initramfs(&base, &out, b"T0ken").unwrap();
        let data = fs::read(&out).unwrap();
        assert_eq!(&data[..bytes.len()], &bytes[..]);
        let second = bytes.len().div_ceil(4) * 4;
        assert_eq!(&data[second..second + 6], b"070701");
        let text = String::from_utf8_lossy(&data[second..]);
        assert!(text.contains("ticket\0") && text.contains("T0ken"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn commas_in_paths_are_escaped_for_qemu() {
        assert_eq!(qemu_opt_value("/a,b").unwrap(), "/a,,b");
        assert!(qemu_opt_value("/a\nb").is_err());
    }
}
