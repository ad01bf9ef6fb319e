//! The host's record of running file-restore VMs: one JSON state file in a
//! private runtime directory, guarded by an exclusive `flock` that a start
//! holds for the whole boot (so two starts never pick the same CID or name).
//!
//! Owns the file layout and process liveness checks; it never starts or
//! stops anything.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Marker in QEMU's command line (`-name`) that identifies our VMs, so a
/// recycled PID is never mistaken for one.
pub const QEMU_NAME_PREFIX: &str = "restore-agent-vm:";
/// How long a start or stop waits for another one to release the lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest state file read.
const MAX_STATE: u64 = 4 << 20;

/// One running VM as `vm start` recorded it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    pub name: String,
    /// QEMU's PID.
    pub pid: u32,
    /// vhost-device-vsock's PID (vhost-user vsock only).
    pub helper_pid: Option<u32>,
    pub cid: u32,
    /// What a client passes as `--connect`, e.g. `hybrid:/run/.../vm.vsock:807`.
    pub connect: String,
    pub ticket_file: PathBuf,
    pub console_log: PathBuf,
    /// The VM's private directory (ticket, initramfs, sockets, logs).
    pub dir: PathBuf,
    /// Seconds since the epoch.
    pub started: u64,
}

/// The runtime directory: `$RESTORE_AGENT_RUN_DIR`, else
/// `$XDG_RUNTIME_DIR/restore-agent`, else `/run/restore-agent`.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RESTORE_AGENT_RUN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("restore-agent"),
        None => PathBuf::from("/run/restore-agent"),
    }
}

/// An open state directory with its lock held until drop.
pub struct StateLock {
    dir: PathBuf,
    _lock: File,
}

impl StateLock {
    /// Creates the directory (mode 0700) if needed and takes the lock.
    pub fn acquire(dir: &Path) -> Result<StateLock, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(format!("lock {}: {err}", path.display()));
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out waiting for the lock {}", path.display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(StateLock {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("vms.json")
    }

    /// The recorded VMs by name; a missing file is an empty map.
    pub fn load(&self) -> Result<BTreeMap<String, VmRecord>, String> {
        let path = self.state_file();
        let data = match File::open(&path) {
            Ok(f) => {
                let mut buf = Vec::new();
                io::Read::read_to_end(&mut io::Read::take(f, MAX_STATE), &mut buf)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                buf
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces the state file atomically.
    pub fn save(&self, vms: &BTreeMap<String, VmRecord>) -> Result<(), String> {
        let path = self.state_file();
        let tmp = self.dir.join("vms.json.tmp");
        let data = serde_json::to_vec_pretty(vms).map_err(|e| e.to_string())?;
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            io::Write::write_all(&mut f, &data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// True while `pid` runs (a zombie counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// True while `pid` is the QEMU of VM `name`.
pub fn qemu_alive(pid: u32, name: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let marker = format!("{QEMU_NAME_PREFIX}{name}");
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).any(|arg| arg == marker.as_bytes()))
        .unwrap_or(false)
}

/// Waits up to `within` for our child `pid` to exit and reaps it; `None`
/// at once when it is not our child, or when it still runs at the deadline.
pub fn reap_within(pid: u32, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    let pid = libc::pid_t::try_from(pid).ok()?;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a pointer to a local status word.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            return exit_code(status);
        }
        // rc < 0: not our child (ECHILD), nothing to wait for.
        if rc < 0 || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exit_code(status: libc::c_int) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Reaps `pid` if it is our exited child and returns its exit code
/// (128 + signal number when killed); `None` when it is not our child.
pub fn reap(pid: u32) -> Option<i32> {
    let mut status = 0;
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: waitpid with a pointer to a local status word.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if rc != pid {
        return None;
    }
    exit_code(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_the_lock_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::acquire(dir.path()).unwrap();
        assert!(lock.load().unwrap().is_empty());
        let rec = VmRecord {
            name: "a".into(),
            pid: 1,
            helper_pid: None,
            cid: 10,
            connect: "hybrid:/x:807".into(),
            ticket_file: "/x/ticket".into(),
            console_log: "/x/console.log".into(),
            dir: "/x".into(),
            started: 0,
        };
        let mut map = BTreeMap::new();
        map.insert("a".to_string(), rec.clone());
        lock.save(&map).unwrap();
        assert_eq!(lock.load().unwrap().get("a"), Some(&rec));
        // A second descriptor cannot take the lock while the first holds it.
        let other = File::open(dir.path().join("lock")).unwrap();
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(rc, 0);
        drop(lock);
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn liveness_of_this_process_and_a_reaped_child() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let _ = child.wait();
        assert!(!pid_alive(pid) || !qemu_alive(pid, "x"));
    }
}
