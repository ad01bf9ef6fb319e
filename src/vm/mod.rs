//! The host side of the file-restore VM: `restore-client vm start|list|stop`
//! and the `--vm NAME` connect shortcut.
//!
//! A VM is QEMU booting the image from scripts/build-vm-image.sh (kernel plus
//! an initramfs with the agent as init), with a per-VM ticket appended to the
//! initramfs, the datastore shared read-only over 9p, disk images attached as
//! read-only virtio-blk disks whose serial is the image name, and vsock
//! through the kernel's vhost-vsock or vhost-device-vsock (hybrid Unix
//! socket). This module sits beside the client: it never imports the agent's
//! serving layers (`rpc` server, `api`, `restore`), only `init`'s image
//! layout constants.

mod agent_call;
mod console;
pub mod cpio;
pub mod image;
pub mod launch;
pub mod state;

use std::path::PathBuf;
use std::time::Duration;

pub use launch::{Accel, StartOptions, StopOutcome, Vsock};
pub use state::VmRecord;

/// `restore-client vm ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum VmCommand {
    /// Boot a file-restore VM serving a datastore and/or disk images
    Start(StartArgs),
    /// List the VMs started by this user
    List,
    /// Stop a VM: ask its agent to stop (the guest powers off), kill it after a timeout
    Stop {
        name: String,
        /// Seconds to wait for the guest to power off before killing QEMU
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
        /// Keep the VM's directory (console log) instead of removing it
        #[arg(long)]
        keep_logs: bool,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct StartArgs {
    /// Datastore directory, shared read-only with the VM
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Disk image attached read-only and served as NAME (repeatable)
    #[arg(long = "image", value_name = "NAME=PATH", value_parser = parse_image)]
    pub images: Vec<(String, PathBuf)>,
    /// VM name (default vmCID)
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    #[arg(long, value_enum, default_value_t = Vsock::Auto)]
    pub vsock: Vsock,
    /// Guest memory, at least 128 MiB
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub memory: u32,
    /// Directory holding vmlinux and initramfs.cpio [env: RESTORE_AGENT_VM_DIR,
    /// default /usr/lib/restore-agent/vm]
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
    /// The agent's idle watchdog in seconds (default: the agent's own, 600)
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Seconds to wait for the agent to answer ping
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub ready_timeout: u64,
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// vhost-device-vsock to run for vhost-user vsock [default: $VHOST_DEVICE_VSOCK,
    /// else from PATH or ~/.cargo/bin]
    #[arg(long, value_name = "PATH")]
    pub vhost_device_vsock: Option<PathBuf>,
}

fn parse_image(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got `{s}`"))?;
    if path.is_empty() {
        return Err(format!("empty path in `{s}`"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

impl StartArgs {
    pub fn options(&self) -> StartOptions {
        StartOptions {
            name: self.name.clone(),
            store: self.store.clone(),
            images: self.images.clone(),
            accel: self.accel,
            vsock: self.vsock,
            memory_mib: self.memory,
            image_dir: self
                .image_dir
                .clone()
                .unwrap_or_else(launch::default_image_dir),
            idle_timeout: self.idle_timeout,
            ready_timeout: Duration::from_secs(self.ready_timeout),
            qemu: self.qemu.clone(),
            vhost_device_vsock: self
                .vhost_device_vsock
                .clone()
                .or_else(|| std::env::var_os("VHOST_DEVICE_VSOCK").map(PathBuf::from))
                .unwrap_or_else(|| find_in_cargo_bin(std::path::Path::new("vhost-device-vsock"))),
        }
    }
}

/// `cargo install` puts vhost-device-vsock in ~/.cargo/bin, often not in PATH.
fn find_in_cargo_bin(prog: &std::path::Path) -> PathBuf {
    if prog.components().count() > 1 || which(prog) {
        return prog.to_path_buf();
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin").join(prog))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| prog.to_path_buf())
}

fn which(prog: &std::path::Path) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The connect address (e.g. `hybrid:/run/restore-agent/vm10/vm.vsock:807`)
/// and ticket file of the running VM `name`, for `--vm NAME`.
pub fn resolve(name: &str) -> Result<(String, PathBuf), String> {
    launch::resolve(name)
}

/// Runs a `vm` subcommand; appends what goes to stdout (JSON when `json`)
/// to `out`, prints problems on stderr, and returns the process exit code:
/// 0 done, 2 a local failure (the VM did not start, is unknown, the state
/// file is unusable), as for every other restore-client command that fails
/// without an agent error.
pub fn run(cmd: VmCommand, json: bool, out: &mut String) -> i32 {
    use std::fmt::Write as _;
    match cmd {
        VmCommand::Start(args) => {
            let started = std::time::Instant::now();
            match launch::start(&args.options()) {
                Ok(rec) => {
                    if json {
                        let _ =
                            writeln!(out, "{}", serde_json::to_string(&rec).unwrap_or_default());
                    } else {
                        let _ = writeln!(
                            out,
                            "started {} (pid {}, cid {}) in {:.1} s\nconnect: {}\nticket file: {}\nconsole log: {}",
                            rec.name,
                            rec.pid,
                            rec.cid,
                            started.elapsed().as_secs_f64(),
                            rec.connect,
                            rec.ticket_file.display(),
                            rec.console_log.display()
                        );
                    }
                    0
                }
                Err(e) => fail(&e, json, out),
            }
        }
        VmCommand::List => match launch::list() {
            Ok(vms) => {
                if json {
                    let v: Vec<_> = vms
                        .iter()
                        .map(|(r, alive)| {
                            let mut v = serde_json::to_value(r).unwrap_or_default();
                            if let Some(o) = v.as_object_mut() {
                                o.insert("running".into(), (*alive).into());
                            }
                            v
                        })
                        .collect();
                    let _ = writeln!(out, "{}", serde_json::Value::Array(v));
                } else {
                    let _ = writeln!(
                        out,
                        "{:<20} {:>8} {:>6} {:<8} CONNECT",
                        "NAME", "PID", "CID", "STATE"
                    );
                    for (r, alive) in &vms {
                        let st = if *alive { "running" } else { "gone" };
                        let _ = writeln!(
                            out,
                            "{:<20} {:>8} {:>6} {:<8} {}",
                            r.name, r.pid, r.cid, st, r.connect
                        );
                    }
                }
                0
            }
            Err(e) => fail(&e, json, out),
        },
        VmCommand::Stop {
            name,
            timeout,
            keep_logs,
        } => match launch::stop(&name, Duration::from_secs(timeout), keep_logs) {
            Ok(stopped) => {
                if json {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::to_string(&stopped).unwrap_or_default()
                    );
                } else if stopped.powered_off {
                    let _ = writeln!(out, "{name}: powered off");
                } else {
                    let _ = writeln!(out, "{name}: killed (did not power off within {timeout} s)");
                }
                0
            }
            Err(e) => fail(&e, json, out),
        },
    }
}

fn fail(msg: &str, json: bool, out: &mut String) -> i32 {
    use std::fmt::Write as _;
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({ "error": { "message": msg } })
        );
    } else {
        eprintln!("restore-client: {msg}");
    }
    2
}
