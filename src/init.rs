//! The agent as a VM's init process (PID 1 inside the file-restore VM).
//!
//! Owns the guest-side system setup before the agent serves: mounting proc,
//! sys and devtmpfs, loading the kernel modules shipped in the image in their
//! fixed order, mounting the datastore share read-only, finding the attached
//! disks by their virtio serial, reaping orphans, and powering the machine
//! off at the end. It returns what it found as an [`InitPlan`]; the binary
//! turns that into the normal serve path. It never serves requests itself,
//! never writes to a disk or the datastore, and does nothing when the
//! process is not PID 1 (so a test can call it safely).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Where the image keeps its kernel modules; files are loaded in name order,
/// so the image build prefixes each with its position (`01-virtio_ring.ko`).
pub const MODULE_DIR: &str = "/lib/modules";
/// The 9p mount tag the host gives the datastore share.
pub const DATASTORE_TAG: &str = "datastore";
/// Where the datastore share is mounted.
pub const DATASTORE_MOUNT: &str = "/datastore";
/// The ticket file the host appends to the initramfs.
pub const TICKET_FILE: &str = "/ticket";
/// The vsock port the agent listens on inside the VM.
pub const VSOCK_PORT: u32 = 807;
/// How the agent's console log line about a bound listener begins. The
/// host's launcher connects only once the console shows it for vsock: a
/// connection made while the guest is still setting up its vsock device can
/// stop vhost-device-vsock 0.3.0 from relaying anything (see
/// `vm::launch::wait_ready`).
pub const LISTENING_LOG: &str = "listening on";
/// 9p message size: large reads of chunk files need few round trips. The
/// virtio transport of the 6.1 kernel accepts up to about 512 KiB.
const NINEP_MSIZE: u32 = 512 * 1024;
/// Most disks attached to one VM that are served.
const MAX_DISKS: usize = 256;

/// What the guest offers the agent: a datastore mount and named disk images.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitPlan {
    /// The datastore share, mounted read-only, when the host attached one.
    pub datastore: Option<PathBuf>,
    /// `(serial, /dev/vdX)` for every virtio disk with a serial, sorted by
    /// serial; the agent serves each as `--image SERIAL=/dev/vdX`.
    pub images: Vec<(String, PathBuf)>,
    /// Modules that were loaded, in order (for the console log).
    pub modules: Vec<String>,
}

/// True when this process is the machine's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Prepares the guest system and reports what the agent should serve.
/// Returns an empty plan without touching anything when not PID 1.
pub fn init_setup() -> Result<InitPlan> {
    if !is_pid1() {
        return Ok(InitPlan::default());
    }
    mount_fs("proc", "/proc", "proc", 0, "")?;
    mount_fs("sysfs", "/sys", "sysfs", 0, "")?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    let modules = load_modules(Path::new(MODULE_DIR))?;
    start_reaper();
    let datastore = mount_datastore()?;
    let images = find_disks(Path::new("/sys/block"), Path::new("/dev"))?;
    Ok(InitPlan {
        datastore,
        images,
        modules,
    })
}

/// Syncs and powers the machine off. Only returns when that failed (not
/// PID 1, or no permission).
pub fn power_off() -> io::Error {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    io::Error::last_os_error()
}

/// The process's peak resident set size in bytes (VmHWM), if readable.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The largest chunk cache in MiB that suits this machine's memory: a sixth
/// of it (at least 8 MiB), so that a 128 MiB VM keeps the agent near 32 MiB
/// while extracting. `None` when the memory size is unknown.
pub fn cache_cap_mb() -> Option<u64> {
    Some((memory_mb()? / 6).max(8))
}

/// This machine's memory in MiB (MemTotal), if readable.
pub fn memory_mb() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<()> {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| {
        CString::new(s)
            .map_err(|_| Error::new(ErrorKind::Io, format!("mount argument {s:?} holds NUL")))
    };
    let (src, tgt, ty, dat) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // A kernel that mounted devtmpfs itself reports EBUSY.
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(Error::io(format!("mount {fstype} on {target}"), &err));
        }
    }
    Ok(())
}

/// Loads every `*.ko` in `dir` in file-name order. A module the kernel
/// already has (built in, or loaded) is not an error.
pub fn load_modules(dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ko"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir.display(), &e)),
    };
    files.sort();
    let mut loaded = Vec::with_capacity(files.len());
    for path in files {
        let file = fs::File::open(&path).map_err(|e| Error::io(path.display(), &e))?;
        let params = c"";
        // SAFETY: a valid open fd and a NUL-terminated parameter string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                params.as_ptr(),
                0 as libc::c_int,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(Error::io(format!("load module {}", path.display()), &err));
            }
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        loaded.push(name);
    }
    Ok(loaded)
}

/// Mounts the 9p share tagged [`DATASTORE_TAG`] read-only on
/// [`DATASTORE_MOUNT`] when the host attached it.
fn mount_datastore() -> Result<Option<PathBuf>> {
    if !has_9p_tag(Path::new("/sys/bus/virtio/devices"), DATASTORE_TAG) {
        return Ok(None);
    }
    let opts = format!("trans=virtio,version=9p2000.L,msize={NINEP_MSIZE},cache=none");
    mount_fs(
        DATASTORE_TAG,
        DATASTORE_MOUNT,
        "9p",
        libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
        &opts,
    )?;
    Ok(Some(PathBuf::from(DATASTORE_MOUNT)))
}

fn has_9p_tag(devices: &Path, tag: &str) -> bool {
    let Ok(rd) = fs::read_dir(devices) else {
        return false;
    };
    rd.filter_map(|e| e.ok()).any(|e| {
        fs::read(e.path().join("mount_tag"))
            .map(|t| t.split(|&b| b == 0).next().unwrap_or(&[]) == tag.as_bytes())
            .unwrap_or(false)
    })
}

/// Finds `vd*` block devices under `sys_block` that carry a serial and
/// returns `(serial, dev_dir/vdX)` sorted by serial. Disks without a usable
/// serial (empty, or not a plain name) are skipped with a log line.
pub fn find_disks(sys_block: &Path, dev_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = match fs::read_dir(sys_block) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(sys_block.display(), &e)),
    };
    let mut disks = Vec::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let dev = entry.file_name();
        if !dev.as_bytes().starts_with(b"vd") {
            continue;
        }
        let Ok(raw) = fs::read(entry.path().join("serial")) else {
            continue;
        };
        let serial = String::from_utf8_lossy(&raw).trim().to_string();
        if !valid_image_name(&serial) {
            log::warn!(
                "disk {}: unusable serial {serial:?}, not served",
                dev.to_string_lossy()
            );
            continue;
        }
        if disks.len() >= MAX_DISKS {
            log::warn!("more than {MAX_DISKS} disks; the rest are not served");
            break;
        }
        disks.push((serial, dev_dir.join(&dev)));
    }
    disks.sort();
    Ok(disks)
}

/// Image names the host may use as a disk serial: QEMU keeps at most 20
/// bytes, and the agent takes names of letters, digits, `.`, `_` and `-`.
pub fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Reaps orphaned children that the kernel hands to PID 1. The agent itself
/// starts no child processes, so waiting for any child steals nothing.
fn start_reaper() {
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            let mut status = 0;
            // SAFETY: a valid pointer to a local status word.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid <= 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the zombie reaper: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_found_by_serial_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("block");
        for (dev, serial) in [
            ("vdb", Some("zeta\n")),
            ("vda", Some("alpha")),
            ("vdc", None),
            ("vdd", Some("../evil")),
            ("sda", Some("other")),
        ] {
            fs::create_dir_all(sys.join(dev)).unwrap();
            if let Some(s) = serial {
                fs::write(sys.join(dev).join("serial"), s).unwrap();
            }
        }
        let disks = find_disks(&sys, Path::new("/dev")).unwrap();
        assert_eq!(
            disks,
            vec![
                ("alpha".to_string(), PathBuf::from("/dev/vda")),
                ("zeta".to_string(), PathBuf::from("/dev/vdb")),
            ]
        );
    }

    #[test]
    fn the_9p_tag_is_matched_exactly() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("virtio0")).unwrap();
        fs::create_dir_all(dir.path().join("virtio1")).unwrap();
        fs::write(dir.path().join("virtio1/mount_tag"), b"datastore\0").unwrap();
        assert!(has_9p_tag(dir.path(), "datastore"));
        assert!(!has_9p_tag(dir.path(), "data"));
        assert!(!has_9p_tag(&dir.path().join("missing"), "datastore"));
    }

    #[test]
    fn setup_is_a_no_op_outside_pid1() {
        assert_eq!(init_setup().unwrap(), InitPlan::default());
    }
}
