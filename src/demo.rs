//! The built-in demo: a throw-away datastore holding one snapshot of a small
//! GPT disk (an ext4 and a FAT partition), made in a fresh private directory
//! from the compressed image embedded in the binary, with a fresh ticket.
//!
//! This is the only code of the agent that writes files, and only inside its
//! own directory, which is removed when the [`Demo`] is dropped.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::store::import;

/// The demo disk: `scripts/make-demo-image.sh` builds it.
const DISK_ZST: &[u8] = include_bytes!("../demo/disk.img.zst");

pub const SNAPSHOT: &str = "vm/100/2026-01-01T00:00:00Z";
pub const ARCHIVE: &str = "drive-scsi0.img.fidx";

pub struct Demo {
    pub dir: PathBuf,
    pub store: PathBuf,
    pub ticket: String,
    pub ticket_file: PathBuf,
    pub socket: PathBuf,
}

impl Demo {
    /// Builds the demo under /dev/shm when it exists (a datastore has 65,536
    /// chunk directories: quick to make and remove in memory), else under the
    /// temp dir.
    pub fn create() -> Result<Demo, String> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let token = hex(&random_bytes(8)?);
        let dir = base.join(format!("restore-agent-demo-{token}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let demo = Demo {
            store: dir.join("store"),
            ticket: hex(&random_bytes(24)?),
            ticket_file: dir.join("ticket"),
            socket: dir.join("agent.sock"),
            dir,
        };
        demo.populate()?;
        Ok(demo)
    }

    fn populate(&self) -> Result<(), String> {
        let disk = self.dir.join("disk.img");
        let image = zstd::decode_all(DISK_ZST).map_err(|e| format!("embedded demo image: {e}"))?;
        std::fs::write(&disk, image).map_err(|e| format!("{}: {e}", disk.display()))?;
        import::init(&self.store).map_err(|e| e.to_string())?;
        let archive = ARCHIVE.trim_end_matches(".fidx");
        import::import_image(&self.store, SNAPSHOT, archive, &disk, &|_, _| {})
            .map_err(|e| e.to_string())?;
        std::fs::remove_file(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.ticket_file)
            .map_err(|e| format!("{}: {e}", self.ticket_file.display()))?;
        std::io::Write::write_all(&mut file, self.ticket.as_bytes())
            .map_err(|e| format!("{}: {e}", self.ticket_file.display()))
    }

    /// What to try, for the person who started the demo.
    pub fn instructions(&self, tcp: Option<&str>) -> String {
        let sock = self.socket.display();
        let auth = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"authenticate","params":{{"ticket":"{}"}}}}"#,
            self.ticket
        );
        let target = format!(r#""snapshot":"{SNAPSHOT}","archive":"{ARCHIVE}""#);
        let mut out = format!(
            "restore-agent demo: datastore {store} (snapshot {SNAPSHOT}, archive {ARCHIVE}:\n\
             a GPT disk with ext4 on part/1 and FAT on part/2); ticket file {tf}\n\n\
             Try, with socat (paste one line at a time):\n\
             \x20 socat - UNIX-CONNECT:{sock}\n\
             \x20 {auth}\n\
             \x20 {{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"snapshot.list\"}}\n\
             \x20 {{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"volume.list\",\"params\":{{{target}}}}}\n\
             \x20 {{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"fs.list\",\"params\":{{{target},\"volume\":\"part/1\",\"path\":\"/home/alice/notes\"}}}}\n\
             \x20 {{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"fs.read\",\"params\":{{{target},\"volume\":\"part/1\",\"path\":\"/etc/motd\",\"offset\":0,\"length\":4096}}}}\n",
            store = self.store.display(),
            tf = self.ticket_file.display(),
        );
        if let Some(tcp) = tcp {
            out.push_str(&format!("\nOr over TCP: socat - TCP:{tcp}\n"));
        }
        let client = format!(
            "restore-client --connect unix:{sock} --ticket-file {}",
            self.ticket_file.display()
        );
        out.push_str(&format!(
            "\nWith restore-client (cargo run --release --bin restore-client -- ...):\n\
             \x20 {client} volumes {SNAPSHOT} {ARCHIVE}\n\
             \x20 {client} ls -l -R {SNAPSHOT} {ARCHIVE} part/1 /home\n\
             \x20 {client} cat {SNAPSHOT} {ARCHIVE} part/1 /etc/motd\n\
             \x20 {client} extract {SNAPSHOT} {ARCHIVE} part/1 /home -o restored-home\n\
             \nStop with Ctrl-C (the demo directory is removed).\n"
        ));
        out
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!(
                "cannot remove the demo directory {}: {e}",
                self.dir.display()
            );
        }
    }
}

fn random_bytes(n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
