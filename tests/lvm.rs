//! LVM2 logical volumes inside disk images. The volume groups are written
//! by the real tools (pvcreate, vgcreate, lvcreate, lvextend) on a loop
//! device over the image, with activation off (metadata only: this kernel
//! has no device-mapper); the filesystems are made by mkfs.ext4 -d and
//! mkfs.vfat + mcopy and laid into the extents `lvs --segments` reports.
//! A running agent serves the images (`--image`) and `restore-client` lists,
//! cats and extracts from the logical volumes.
//!
//! Needs root, a loop device and lvm2; skipped with a printed reason
//! without them, unless RESTORE_AGENT_REQUIRE_LVM=1 (CI), where that is a
//! failure.

mod common;
#[path = "common/trees.rs"]
mod trees;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::Agent;
use serde_json::Value;
use sha2::{Digest, Sha256};
use trees::*;

const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_restore-client");

/// Whether this machine can build the images; says why not when it
/// cannot (and fails when CI requires it).
fn can_run() -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root (loop devices)".to_string())
    } else if !have_tools() {
        Some("filesystem tools missing".to_string())
    } else if !Path::new("/usr/sbin/pvcreate").exists() && !Path::new("/sbin/pvcreate").exists() {
        Some("lvm2 is not installed (Debian package lvm2)".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("no loop devices".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("RESTORE_AGENT_REQUIRE_LVM").is_none(),
                "the LVM tests cannot run: {why}"
            );
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

/// A loop device over `[offset, offset + size)` of `image`, detached when
/// dropped.
struct Loop(String);

impl Loop {
    fn new(image: &Path, offset: u64, size: u64) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--offset"])
            .arg(offset.to_string())
            .arg("--sizelimit")
            .arg(size.to_string())
            .arg(image)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Runs an LVM command on `dev` alone, writing metadata only: no
/// activation, no udev, no metadata backups in /etc, no other disk looked at.
fn lvm(dev: &Loop, args: &[&str]) -> String {
    lvm_on(&[dev], args)
}

/// [`lvm`] on `devs` alone.
fn lvm_on(devs: &[&Loop], args: &[&str]) -> String {
    let accept: Vec<String> = devs.iter().map(|d| format!("\"a|^{}$|\"", d.0)).collect();
    let config = format!(
        "devices{{filter=[{},\"r|.*|\"] hints=\"none\"}} \
         backup{{backup=0 archive=0}} global{{activation=0}} \
         activation{{udev_sync=0 udev_rules=0}}",
        accept.join(",")
    );
    let out = Command::new(args[0])
        .args(&args[1..])
        .arg("--config")
        .arg(config)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run an LVM tool");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Where each extent run of LV `lv` lies on the physical volume, in LV
/// order: (byte offset on the PV, bytes).
fn lv_runs(dev: &Loop, vg: &str, lv: &str) -> Vec<(u64, u64)> {
    let runs = lv_runs_on(&[dev], vg, lv);
    runs.into_iter().map(|(_, at, len)| (at, len)).collect()
}

/// [`lv_runs`] of a group over `devs`: (which of `devs`, byte offset on
/// that PV, bytes).
fn lv_runs_on(devs: &[&Loop], vg: &str, lv: &str) -> Vec<(usize, u64, u64)> {
    let bytes = ["--noheadings", "--nosuffix", "--units", "b"];
    let fields = lvm_on(
        devs,
        &[&["vgs"][..], &bytes, &["-o", "vg_extent_size", vg]].concat(),
    );
    let extent: u64 = fields.trim().parse().unwrap();
    let pvs = lvm_on(
        devs,
        &[
            &["pvs"][..],
            &bytes,
            &["--separator", ";", "-o", "pv_name,pe_start"],
        ]
        .concat(),
    );
    let pe_start = |name: &str| -> u64 {
        let line = pvs
            .lines()
            .find(|l| l.trim().starts_with(&format!("{name};")));
        let (_, at) = line.unwrap().trim().split_once(';').unwrap();
        at.parse().unwrap()
    };
    let segs = lvm_on(
        devs,
        &[
            "lvs",
            "--noheadings",
            "--segments",
            "--separator",
            ";",
            "-o",
            "seg_start_pe,seg_pe_ranges",
            &format!("{vg}/{lv}"),
        ],
    );
    let mut runs: Vec<(u64, usize, u64, u64)> = segs
        .lines()
        .map(|l| {
            // "0;/dev/loop3:0-1"
            let (start, range) = l.trim().split_once(';').unwrap();
            let (name, pes) = range.rsplit_once(':').unwrap();
            let (a, b) = pes.split_once('-').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            let dev = devs.iter().position(|d| d.0 == name).unwrap();
            (
                start.parse().unwrap(),
                dev,
                pe_start(name) + a * extent,
                (b - a + 1) * extent,
            )
        })
        .collect();
    runs.sort();
    runs.into_iter()
        .map(|(_, dev, at, len)| (dev, at, len))
        .collect()
}

/// Writes `data` into the runs (offsets within `[base, ...)` of `image`).
fn lay(image: &Path, base: u64, runs: &[(u64, u64)], data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut done = 0usize;
    for &(at, len) in runs {
        let n = (len as usize).min(data.len() - done);
        f.seek(SeekFrom::Start(base + at)).unwrap();
        f.write_all(&data[done..done + n]).unwrap();
        done += n;
    }
    assert_eq!(done, data.len(), "the filesystem is larger than its LV");
}

const MIB: u64 = 1 << 20;

/// A new sparse file of `size` bytes.
fn blank(path: &Path, size: u64) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    path.to_path_buf()
}

/// Makes `window` (offset, size) of `image` the physical volume of a new
/// volume group `vg` holding `lvs` (name, size), created in order (metadata
/// only); returns the loop device it was written through.
fn volume_group(image: &Path, window: (u64, u64), vg: &str, lvs: &[(&str, &str)]) -> Loop {
    let dev = Loop::new(image, window.0, window.1);
    lvm(&dev, &["pvcreate", "-q", &dev.0]);
    lvm(&dev, &["vgcreate", "-q", vg, &dev.0]);
    for (name, size) in lvs {
        lvm(
            &dev,
            &["lvcreate", "-q", "-an", "-Zn", "-L", size, "-n", name, vg],
        );
    }
    dev
}

struct Images {
    _dir: tempfile::TempDir,
    /// GPT: part/1 ext4, part/2 an LVM PV of vgsys (root in two runs, swap
    /// between them, empty)
    gpt: PathBuf,
    /// a PV on the whole disk: vgdata (data: FAT)
    whole: PathBuf,
    src_root: PathBuf,
    src_data: PathBuf,
    /// the big file's bytes (crosses root's jump between runs)
    big: Vec<u8>,
}

fn build() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // root's tree: a 14 MiB file that crosses the 12 MiB mark, where the
    // logical volume jumps over swap and empty, and a few small files
    let src_root = d.join("root");
    let big = noise(7, 14 * MIB as usize);
    write(&src_root.join("big.bin"), &big);
    write(&src_root.join("etc/hostname"), b"lvm-guest\n");
    write(&src_root.join("etc/deep/er/file.txt"), &noise(8, 5000));
    std::os::unix::fs::symlink("etc/hostname", src_root.join("link")).unwrap();
    let root_img = d.join("root.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&src_root)
        .arg(&root_img)
        .arg("24M"));
    let boot_src = d.join("boot");
    write(&boot_src.join("vmlinuz"), b"kernel\n");
    let boot_img = d.join("boot.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&boot_src)
        .arg(&boot_img)
        .arg("4M"));

    // GPT: part 1 (4 MiB) ext4, part 2 (40 MiB) Linux LVM
    let gpt = blank(&d.join("gpt.img"), 48 * MIB);
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+4M", "-t", "1:8300"])
        .args(["-n", "2:0:+40M", "-t", "2:8e00"])
        .arg(&gpt));
    let (p1, p2) = (2048 * 512, 2048 * 512 + 4 * MIB);
    lay(
        &gpt,
        p1,
        &[(0, 4 * MIB)],
        &std::fs::read(&boot_img).unwrap(),
    );
    {
        let dev = volume_group(
            &gpt,
            (p2, 40 * MIB),
            "vgsys",
            &[("root", "12M"), ("swap", "4M"), ("empty", "4M")],
        );
        lvm(&dev, &["lvextend", "-q", "-L", "+12M", "vgsys/root"]);
        let runs = lv_runs(&dev, "vgsys", "root");
        assert_eq!(runs.len(), 2, "root in two runs: {runs:?}");
        lay(&gpt, p2, &runs, &std::fs::read(&root_img).unwrap());
    }

    // the whole disk a PV, its LV a FAT filesystem
    let src_data = d.join("data");
    write(&src_data.join("REPORT.TXT"), &noise(9, 70_000));
    write(&src_data.join("DIR/NOTE.TXT"), b"note\n");
    let fat = d.join("fat.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "DATA"])
        .arg(&fat)
        .arg((8 * 1024).to_string()));
    run(Command::new("mcopy")
        .args(["-s", "-m", "-i"])
        .arg(&fat)
        .arg(src_data.join("REPORT.TXT"))
        .arg(src_data.join("DIR"))
        .arg("::"));
    let whole = blank(&d.join("whole.img"), 24 * MIB);
    {
        let dev = volume_group(&whole, (0, 24 * MIB), "vgdata", &[("data", "8M")]);
        let runs = lv_runs(&dev, "vgdata", "data");
        lay(&whole, 0, &runs, &std::fs::read(&fat).unwrap());
    }
    Images {
        _dir: dir,
        gpt,
        whole,
        src_root,
        src_data,
        big,
    }
}

fn client(agent: &Agent, args: &[&str]) -> Output {
    Command::new(CLIENT_BIN)
        .arg("--connect")
        .arg(format!("unix:{}", agent.sock.display()))
        .arg("--ticket-file")
        .arg(&agent.ticket_path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run restore-client")
}

/// `restore-client extract attached ARCHIVE VOLUME / -o DIR` into a new
/// directory.
fn extract(agent: &Agent, archive: &str, volume: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let args = ["extract", "attached", archive, volume, "/", "-o", o];
    ok(client(agent, &args), &format!("extract {volume}"));
    out
}

fn ok(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The volume list of `archive`, checked against the result schema of
/// `volume.list` in schema/openrpc.json.
fn volumes(agent: &Agent, archive: &str) -> Vec<Value> {
    let out = ok(
        client(agent, &["--output", "json", "volumes", "attached", archive]),
        "volumes",
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema/openrpc.json"))
            .unwrap(),
    )
    .unwrap();
    let i = doc["methods"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m["name"] == "volume.list")
        .unwrap();
    let mut root = doc.clone();
    root["$ref"] = format!("#/methods/{i}/result/schema").into();
    let schema = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .build(&root)
        .unwrap();
    let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "volume.list of {archive}: {errors:?}\n{v}"
    );
    v["volumes"].as_array().expect("a volume list").clone()
}

fn find<'a>(vols: &'a [Value], id: &str) -> &'a Value {
    vols.iter()
        .find(|v| v["volume"] == id)
        .unwrap_or_else(|| panic!("no volume {id} in {vols:?}"))
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Every file under `src` has the same bytes under `out`.
fn same_files(src: &Path, out: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let got = out.join(e.file_name());
        let t = e.file_type().unwrap();
        if t.is_dir() {
            n += same_files(&e.path(), &got);
        } else if t.is_symlink() {
            assert_eq!(
                std::fs::read_link(&got).unwrap(),
                std::fs::read_link(e.path()).unwrap()
            );
            n += 1;
        } else {
            let (a, b) = (
                std::fs::read(e.path()).unwrap(),
                std::fs::read(&got).unwrap(),
            );
            assert!(sha(&a) == sha(&b), "{} differs", got.display());
            n += 1;
        }
    }
    n
}

#[test]
fn logical_volumes_are_listed_read_and_extracted() {
    if !can_run() {
        return;
    }
    let im = build();
    let agent = Agent::builder()
        .image("disk", &im.gpt)
        .image("whole", &im.whole)
        .start();

    let vols = volumes(&agent, "disk");
    let ids: Vec<&str> = vols.iter().filter_map(|v| v["volume"].as_str()).collect();
    assert_eq!(
        ids,
        [
            "part/1",
            "part/2",
            "lvm/vgsys/root",
            "lvm/vgsys/swap",
            "lvm/vgsys/empty"
        ]
    );
    let pv = find(&vols, "part/2");
    assert_eq!(pv["vg"], "vgsys");
    assert_eq!(pv["supported"], false);
    let why = pv["reason"].as_str().unwrap();
    assert!(
        why.contains("LVM physical volume of volume group vgsys"),
        "{why}"
    );
    let root = find(&vols, "lvm/vgsys/root");
    assert_eq!(root["kind"], "lvm");
    assert_eq!(
        (&root["vg"], &root["lv"]),
        (&"vgsys".into(), &"root".into())
    );
    assert_eq!(root["fs"], "ext4");
    assert_eq!(root["supported"], true);
    assert_eq!(root["size"], 24 * MIB);
    // the first extent: partition 2, after the PV's 1 MiB of metadata
    assert_eq!(root["start"], 2048 * 512 + 4 * MIB + MIB);
    let swap = find(&vols, "lvm/vgsys/swap");
    assert_eq!(
        (&swap["fs"], &swap["supported"]),
        (&Value::Null, &false.into())
    );
    assert_eq!(find(&vols, "part/1")["fs"], "ext4");

    // cat goes through fs.read (file extents mapped onto the LV's runs);
    // the big file crosses the jump from the first run to the second
    let cat = ok(
        client(
            &agent,
            &["cat", "attached", "disk", "lvm/vgsys/root", "/big.bin"],
        ),
        "cat big.bin",
    );
    assert!(
        cat.len() == im.big.len() && sha(&cat) == sha(&im.big),
        "big.bin"
    );
    // extract goes through the filesystem's own reads of the LV
    let out = extract(&agent, "disk", "lvm/vgsys/root");
    assert_eq!(same_files(&im.src_root, out.path()), 4);

    // a PV on the whole disk
    let vols = volumes(&agent, "whole");
    let ids: Vec<&str> = vols.iter().filter_map(|v| v["volume"].as_str()).collect();
    assert_eq!(ids, ["raw", "lvm/vgdata/data"]);
    assert_eq!(find(&vols, "raw")["vg"], "vgdata");
    let data = find(&vols, "lvm/vgdata/data");
    assert_eq!(
        (&data["fs"], &data["label"]),
        (&"vfat".into(), &"DATA".into())
    );
    let out = extract(&agent, "whole", "lvm/vgdata/data");
    assert_eq!(same_files(&im.src_data, out.path()), 2);

    // errors: no such LV (1001), no filesystem (1005), and serving goes on
    let out = client(&agent, &["ls", "attached", "disk", "lvm/vgsys/nope", "/"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1001") && err.contains("no such logical volume"),
        "{err}"
    );
    let out = client(&agent, &["ls", "attached", "disk", "lvm/vgsys/swap", "/"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1005"));
    ok(client(&agent, &["ping"]), "ping");
}

/// Damaged LVM metadata is reported on the physical volume, and nothing of
/// its volume group is listed as readable; the agent serves on.
#[test]
fn damaged_metadata_is_reported_not_read() {
    if !can_run() {
        return;
    }
    let im = build();
    let image = std::fs::read(&im.gpt).unwrap();
    let part2 = 2048 * 512 + 4 * MIB as usize;
    // the current metadata text: where the first location of the metadata
    // area's header (at 4 KiB) points, from the area's start
    let mda = part2 + 4096;
    assert_eq!(&image[mda + 4..mda + 20], b" LVM2 x[5A%r0N*>");
    let text = mda + u64::from_le_bytes(image[mda + 40..mda + 48].try_into().unwrap()) as usize;
    assert_eq!(&image[text..text + 6], b"vgsys ");
    let dir = tempfile::tempdir().unwrap();
    let damaged = |name: &str, at: usize| -> PathBuf {
        let mut bad = image.clone();
        bad[at] ^= 0x20;
        let p = dir.path().join(name);
        std::fs::write(&p, &bad).unwrap();
        p
    };
    // a byte of the text (its checksum fails), the label's UUID (the
    // label's checksum fails)
    let text_img = damaged("text.img", text + 1);
    let label_img = damaged("label.img", part2 + 512 + 32 + 3);
    let agent = Agent::builder()
        .image("text", &text_img)
        .image("label", &label_img)
        .start();
    for (archive, want) in [
        (
            "text",
            "metadata text of the area at byte 4096 fails its checksum",
        ),
        ("label", "the label in sector 1 fails its checksum"),
    ] {
        let vols = volumes(&agent, archive);
        let ids: Vec<&str> = vols.iter().filter_map(|v| v["volume"].as_str()).collect();
        assert_eq!(ids, ["part/1", "part/2"], "{archive}");
        let why = find(&vols, "part/2")["reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            why.starts_with("LVM physical volume: ") && why.contains(want),
            "{why}"
        );
        let out = client(&agent, &["ls", "attached", archive, "lvm/vgsys/root", "/"]);
        assert_eq!(out.status.code(), Some(1), "{archive}");
    }
    ok(client(&agent, &["ping"]), "ping");
}

/// An image in memory, as a disk.
struct MemDisk(Vec<u8>);

impl restore_agent::restore::disk::Disk for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> restore_agent::error::Result<usize> {
        let from = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - from);
        buf[..n].copy_from_slice(&self.0[from..from + n]);
        Ok(n)
    }
}

/// Metadata text damaged at random but with its checksums made right again
/// (so that the parser, not the checksum, meets it) never panics the
/// listing or the opening of a volume: each round lists the volumes and
/// opens every logical volume listed as readable.
#[test]
fn damaged_metadata_with_good_checksums_never_panics() {
    use restore_agent::restore::lvm::crc;
    use restore_agent::restore::volume::{list_volumes, open_volume};
    use std::sync::Arc;
    if !can_run() {
        return;
    }
    let im = build();
    let image = std::fs::read(&im.gpt).unwrap();
    let mda = 2048 * 512 + 4 * MIB as usize + 4096;
    let le = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap()) as usize;
    let (text, len) = (mda + le(mda + 40), le(mda + 48));
    let mut draw = xorshift(0x2545_f491_4f6c_dd1d);
    let mut next = move |n: usize| (draw() % n as u64) as usize;
    const BYTES: &[u8] = b"{}[]=\",#-0123456789 \nabcz\\\0";
    let (mut parsed, mut refused) = (0, 0);
    let (text_copy, head_copy) = (
        image[text..text + len].to_vec(),
        image[mda..mda + 512].to_vec(),
    );
    let mut d = image;
    for _ in 0..300 {
        d[text..text + len].copy_from_slice(&text_copy);
        d[mda..mda + 512].copy_from_slice(&head_copy);
        for _ in 0..1 + next(6) {
            let at = text + next(len);
            d[at] = BYTES[next(BYTES.len())];
        }
        let sum = crc(&d[text..text + len]).to_le_bytes();
        d[mda + 56..mda + 60].copy_from_slice(&sum);
        let head = crc(&d[mda + 4..mda + 512]).to_le_bytes();
        d[mda..mda + 4].copy_from_slice(&head);
        let mem = Arc::new(MemDisk(std::mem::take(&mut d)));
        let disk: Arc<dyn restore_agent::restore::disk::Disk> = mem.clone();
        let vols = list_volumes(disk.clone()).expect("a listing");
        let pv = vols.iter().find(|v| v.volume == "part/2").unwrap();
        if pv.vg.is_some() {
            parsed += 1;
        } else {
            refused += 1;
        }
        for v in vols.iter().filter(|v| v.kind == "lvm" && v.supported) {
            let vol = open_volume(disk.clone(), &v.volume).expect("a listed volume opens");
            let mut buf = vec![0u8; 4096];
            let _ = vol.read_at(v.size.saturating_sub(4096), &mut buf);
        }
        drop(disk);
        d = Arc::try_unwrap(mem)
            .ok()
            .expect("nothing holds the image")
            .0;
    }
    // both ways were taken: damage the parser refused, and damage in
    // places (values, comments) that still parse
    assert!(
        parsed > 0 && refused > 0,
        "parsed {parsed}, refused {refused}"
    );
}

/// An mkfs.xfs protofile for the tree at `src` (its directories, files
/// and symlinks, as root, mode 0644 or 0755).
fn protofile(src: &Path) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let name = p.file_name().unwrap().to_str().unwrap();
            let t = std::fs::symlink_metadata(&p).unwrap().file_type();
            if t.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.push_str(&format!("{name} l--777 0 0 {}\n", target.display()));
            } else if t.is_dir() {
                out.push_str(&format!("{name} d--755 0 0\n"));
                walk(&p, out);
                out.push_str("$\n");
            } else {
                out.push_str(&format!("{name} ---644 0 0 {}\n", p.display()));
            }
        }
    }
    let mut out = String::from("/dev/null\n0 0\nd--755 0 0\n");
    walk(src, &mut out);
    out.push_str("$\n");
    out
}

/// Copies the 4 KiB blocks of `fs_image` that are not all zeros into the
/// runs of a logical volume (offsets from `base` of `image`), keeping the
/// image sparse (an XFS image is mostly zeros: its log, free space).
fn lay_sparse(image: &Path, base: u64, runs: &[(u64, u64)], fs_image: &Path) {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let out = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut src = std::fs::File::open(fs_image).unwrap();
    let mut block = vec![0u8; 4096];
    let mut lv_off = 0u64;
    loop {
        let n = src.read(&mut block).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(n, 4096, "a short read");
        if block.iter().any(|&b| b != 0) {
            let mut at = lv_off;
            let run = runs
                .iter()
                .find(|r| {
                    let inside = at < r.1;
                    if !inside {
                        at -= r.1;
                    }
                    inside
                })
                .expect("the filesystem is larger than its LV");
            out.write_all_at(&block, base + run.0 + at).unwrap();
        }
        lv_off += 4096;
    }
}

/// RHEL's default layout: /boot on a partition and the root an XFS
/// logical volume (after swap, so not at the start of its physical
/// volume). Read over the wire: listed, cat, extracted and compared.
#[test]
fn an_xfs_root_on_lvm_reads_over_the_wire() {
    if !can_run() {
        return;
    }
    if !Path::new("/usr/sbin/mkfs.xfs").exists() && !Path::new("/sbin/mkfs.xfs").exists() {
        assert!(
            std::env::var_os("RESTORE_AGENT_REQUIRE_XFS").is_none(),
            "mkfs.xfs is missing (xfsprogs)"
        );
        eprintln!("SKIPPED: mkfs.xfs is missing (Debian package xfsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("root");
    write(&src.join("etc/os-release"), b"NAME=\"Rocky Linux\"\n");
    write(&src.join("usr/bin/tool"), &noise(21, 2 << 20));
    for i in 0..300 {
        write(
            &src.join(format!("usr/share/doc/pkg{i:03}/README")),
            format!("package {i}\n").repeat(i).as_bytes(),
        );
    }
    std::os::unix::fs::symlink("usr/bin", src.join("bin")).unwrap();
    let proto = d.join("proto");
    std::fs::write(&proto, protofile(&src)).unwrap();
    let rootfs = blank(&d.join("rootfs.img"), 320 * MIB);
    run(Command::new("mkfs.xfs")
        .args(["-q", "-p"])
        .arg(&proto)
        .arg(&rootfs));

    let disk = blank(&d.join("disk.img"), 344 * MIB);
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+4M", "-t", "1:8300"])
        .args(["-n", "2:0:0", "-t", "2:8e00"])
        .arg(&disk));
    let (p2, p2_size) = (
        2048 * 512 + 4 * MIB,
        344 * MIB - 2048 * 512 - 4 * MIB - 34 * 512,
    );
    {
        let dev = volume_group(
            &disk,
            (p2, p2_size),
            "rl",
            &[("swap", "8M"), ("root", "320M")],
        );
        let runs = lv_runs(&dev, "rl", "root");
        lay_sparse(&disk, p2, &runs, &rootfs);
    }
    std::fs::remove_file(&rootfs).unwrap();

    let agent = Agent::builder().image("disk", &disk).start();
    let vols = volumes(&agent, "disk");
    let root = find(&vols, "lvm/rl/root");
    assert_eq!(
        (&root["fs"], &root["supported"]),
        (&"xfs".into(), &true.into())
    );
    assert_eq!(root["size"], 320 * MIB);
    let cat = ok(
        client(
            &agent,
            &["cat", "attached", "disk", "lvm/rl/root", "/usr/bin/tool"],
        ),
        "cat tool",
    );
    assert!(sha(&cat) == sha(&noise(21, 2 << 20)), "usr/bin/tool");
    let out = extract(&agent, "disk", "lvm/rl/root");
    assert_eq!(same_files(&src, out.path()), 303);
}

/// A volume group over two disks of one backup, as a VM gets when a disk
/// was added to its group: a logical volume with extents on both is listed
/// with either disk, and cat (fs.read, mapped onto both archives) and
/// extract (the filesystem's own reads) give its files whole. Without the
/// other disk it is listed as unreadable, saying why, while a logical
/// volume on this disk alone still reads. Then the same from a datastore,
/// where the other disk is an archive of the snapshot's manifest.
#[test]
fn a_volume_group_over_two_disks_is_read_from_either() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // data's tree: a 14 MiB file that crosses from the first disk to the
    // second (its LV has 8 MiB on the first)
    let src = d.join("data");
    let big = noise(31, 14 * MIB as usize);
    write(&src.join("big.bin"), &big);
    write(&src.join("notes/todo.txt"), b"add a disk\n");
    write(&src.join("notes/deep/er/file.bin"), &noise(32, 70_000));
    let data_img = d.join("data.fs");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&data_img)
        .arg("24M"));
    let home_src = d.join("home");
    write(&home_src.join("user/.profile"), b"PATH=/usr/bin\n");
    let home_img = d.join("home.fs");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&home_src)
        .arg(&home_img)
        .arg("12M"));

    // disk a: a PV on the whole disk; disk b: a PV in GPT partition 1
    let a = blank(&d.join("a.img"), 24 * MIB);
    let b = blank(&d.join("b.img"), 32 * MIB);
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+24M", "-t", "1:8e00"])
        .arg(&b));
    let bases = [0, 2048 * 512];
    {
        let (da, db) = (
            Loop::new(&a, 0, 24 * MIB),
            Loop::new(&b, bases[1], 24 * MIB),
        );
        let both = [&da, &db];
        lvm_on(&both, &["pvcreate", "-q", &da.0, &db.0]);
        lvm_on(&both, &["vgcreate", "-q", "vgtwo", &da.0, &db.0]);
        // home fills most of a; data gets the rest of a, then b
        let lv = |args: &[&str]| {
            lvm_on(
                &both,
                &[&["lvcreate", "-q", "-an", "-Zn"][..], args].concat(),
            )
        };
        lv(&["-L", "12M", "-n", "home", "vgtwo", &da.0]);
        lv(&["-L", "24M", "-n", "data", "vgtwo"]);
        let images = [&a, &b];
        for (name, fs) in [("home", &home_img), ("data", &data_img)] {
            let runs = lv_runs_on(&both, "vgtwo", name);
            if name == "data" {
                assert!(
                    runs.iter().any(|r| r.0 == 0) && runs.iter().any(|r| r.0 == 1),
                    "data on both disks: {runs:?}"
                );
            }
            let bytes = std::fs::read(fs).unwrap();
            let mut done = 0usize;
            for (dev, at, len) in runs {
                let n = (len as usize).min(bytes.len() - done);
                lay(
                    images[dev],
                    bases[dev],
                    &[(at, len)],
                    &bytes[done..done + n],
                );
                done += n;
            }
            assert_eq!(
                done,
                bytes.len(),
                "{name}: the filesystem is larger than its LV"
            );
        }
    }

    let both = Agent::builder().image("a", &a).image("b", &b).start();
    for (archive, pv) in [("a", "raw"), ("b", "part/1")] {
        let vols = volumes(&both, archive);
        let ids: Vec<&str> = vols.iter().filter_map(|v| v["volume"].as_str()).collect();
        assert_eq!(ids, [pv, "lvm/vgtwo/home", "lvm/vgtwo/data"], "{archive}");
        assert_eq!(find(&vols, pv)["vg"], "vgtwo");
        let data = find(&vols, "lvm/vgtwo/data");
        assert_eq!(
            (&data["fs"], &data["supported"], &data["size"]),
            (&"ext4".into(), &true.into(), &(24 * MIB).into()),
            "{archive}: {data}"
        );
        let cat = ok(
            client(
                &both,
                &["cat", "attached", archive, "lvm/vgtwo/data", "/big.bin"],
            ),
            "cat big.bin",
        );
        assert!(sha(&cat) == sha(&big), "big.bin from {archive}");
    }
    let out = extract(&both, "b", "lvm/vgtwo/data");
    assert_eq!(same_files(&src, out.path()), 3);
    drop(both);

    // disk a alone: data cannot be read, and says why; home reads
    let alone = Agent::builder().image("a", &a).start();
    let vols = volumes(&alone, "a");
    let data = find(&vols, "lvm/vgtwo/data");
    let why = data["reason"].as_str().unwrap_or_default();
    assert_eq!(data["supported"], false);
    assert!(why.contains("on no disk of this backup"), "{why}");
    let out = client(&alone, &["ls", "attached", "a", "lvm/vgtwo/data", "/"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("on no disk of this backup"), "{err}");
    let out = extract(&alone, "a", "lvm/vgtwo/home");
    assert_eq!(same_files(&home_src, out.path()), 1);
    drop(alone);

    // from a datastore: the other disk is the snapshot's other image
    let store = d.join("store");
    run(Command::new(CLIENT_BIN).args(["store", "init"]).arg(&store));
    let snapshot = "vm/101/2026-12-07T00:00:00Z";
    for (img, name) in [(&a, "drive-scsi0.img"), (&b, "drive-scsi1.img")] {
        run(Command::new(CLIENT_BIN)
            .args(["store", "import-image", "--store"])
            .arg(&store)
            .args(["--snapshot", snapshot, "--archive", name])
            .arg(img));
    }
    let agent = Agent::builder().datastore(&store).start();
    let cat = ok(
        client(
            &agent,
            &[
                "cat",
                snapshot,
                "drive-scsi1.img.fidx",
                "lvm/vgtwo/data",
                "/big.bin",
            ],
        ),
        "cat big.bin from the datastore",
    );
    assert!(sha(&cat) == sha(&big), "big.bin from the datastore");
}
