//! The base initramfs of the file-restore VM: the static agent as `/init`,
//! the kernel modules it loads (in order), and the few directories and the
//! console node the kernel and init expect. No shell, no busybox.
//!
//! Owns the image's layout (it must match `crate::init`); it never builds
//! the agent or fetches the kernel (scripts/build-vm-image.sh does).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

use super::cpio::CpioWriter;
use crate::init::{DATASTORE_MOUNT, MODULE_DIR};

/// Writes the base initramfs to `out`: `agent` becomes `/init`, `modules`
/// are stored as `/lib/modules/NN-name.ko` in the given order.
pub fn build_base_initramfs(agent: &Path, modules: &[&Path], out: &Path) -> io::Result<()> {
    let ctx =
        |what: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", what.display()));
    let file = File::create(out).map_err(|e| ctx(out, e))?;
    let mut w = CpioWriter::new(BufWriter::new(file), 1);
    for dir in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        DATASTORE_MOUNT.trim_start_matches('/'),
    ] {
        w.dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for init's stdin, stdout and stderr
    // before devtmpfs is mounted.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    let module_dir = MODULE_DIR.trim_start_matches('/');
    for (i, m) in modules.iter().enumerate() {
        let base = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: no file name", m.display()),
                )
            })?;
        let mut f = File::open(m).map_err(|e| ctx(m, e))?;
        let len = f.metadata()?.len();
        w.file_from(
            &format!("{module_dir}/{:02}-{base}", i + 1),
            0o644,
            len,
            &mut f,
        )?;
    }
    let mut f = File::open(agent).map_err(|e| ctx(agent, e))?;
    let len = f.metadata()?.len();
    w.file_from("init", 0o755, len, &mut f)?;
    let buf = w.finish()?;
    buf.into_inner().map_err(|e| e.into_error())?.sync_all()
}
