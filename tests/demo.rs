//! `restore-agent --demo`: builds its datastore, prints how to connect, serves
//! the demo disk's files, and removes everything when stopped.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn call(
    w: &mut UnixStream,
    r: &mut BufReader<UnixStream>,
    id: u64,
    method: &str,
    params: Value,
) -> Value {
    let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    writeln!(w, "{req}").expect("write request");
    let mut line = String::new();
    r.read_line(&mut line).expect("read response");
    let v: Value = serde_json::from_str(&line).expect("response is JSON");
    assert_eq!(v["id"], id, "{v}");
    v
}

#[test]
fn demo_serves_the_demo_disk_and_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
        .arg("--demo")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start restore-agent --demo");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut socket, mut ticket, mut tcp) = (None, None, None);
    let mut text = String::new();
    while !text.contains("Stop with Ctrl-C") {
        let mut line = String::new();
        if out.read_line(&mut line).expect("read instructions") == 0 {
            break;
        }
        if let Some(rest) = line.trim().strip_prefix("socat - UNIX-CONNECT:") {
            socket = Some(PathBuf::from(rest));
        }
        if let Some(rest) = line.trim().strip_prefix("Or over TCP: socat - TCP:") {
            tcp = Some(rest.to_string());
        }
        if let Some(start) = line.find(r#""ticket":""#) {
            let rest = &line[start + 10..];
            ticket = rest.split('"').next().map(String::from);
        }
        text.push_str(&line);
    }
    let socket = socket.unwrap_or_else(|| panic!("no socket path in:\n{text}"));
    let ticket = ticket.unwrap_or_else(|| panic!("no ticket in:\n{text}"));
    assert!(
        tcp.is_some_and(|t| t.starts_with("127.0.0.1:")),
        "no TCP address in:\n{text}"
    );
    let demo_dir = socket.parent().expect("demo dir").to_path_buf();

    let mut w = UnixStream::connect(&socket).expect("connect to the demo socket");
    w.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut r = BufReader::new(w.try_clone().expect("clone"));
    let auth = call(
        &mut w,
        &mut r,
        1,
        "authenticate",
        json!({ "ticket": ticket }),
    );
    assert_eq!(auth["result"]["agent"], "restore-agent", "{auth}");

    let target =
        json!({"snapshot": "vm/100/2026-01-01T00:00:00Z", "archive": "drive-scsi0.img.fidx"});
    let vols = call(&mut w, &mut r, 2, "volume.list", target.clone());
    let fs: Vec<&str> = vols["result"]["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("{vols}"))
        .iter()
        .filter_map(|v| v["fs"].as_str())
        .collect();
    assert_eq!(fs, ["ext4", "vfat"], "{vols}");

    let mut p = target.clone();
    p["volume"] = json!("part/1");
    p["path"] = json!("/home/alice/notes");
    let list = call(&mut w, &mut r, 3, "fs.list", p.clone());
    let names: Vec<&str> = list["result"]["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["README.md", "shopping.txt"]);

    p["path"] = json!("/etc/motd");
    p["offset"] = json!(0);
    p["length"] = json!(4096);
    let read = call(&mut w, &mut r, 4, "fs.read", p);
    let data = base64_simd::STANDARD
        .decode_to_vec(
            read["result"]["data"]
                .as_str()
                .unwrap_or_else(|| panic!("{read}")),
        )
        .expect("base64");
    assert_eq!(data, b"Welcome to the restore-agent demo.\n");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!demo_dir.exists(), "{} left behind", demo_dir.display());
}

/// `--demo` makes its own listeners, ticket and datastore: with any of
/// those options it is a usage error naming the conflict, not a demo that
/// ignores the ticket given and prints a socket it does not listen on.
#[test]
fn demo_refuses_the_options_it_would_ignore() {
    for extra in [
        ["--listen", "unix:/tmp/restore-agent-demo-test.sock"],
        ["--ticket-file", "/tmp/restore-agent-demo-ticket"],
        ["--datastore", "/tmp"],
        ["--image", "disk=/dev/null"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
            .arg("--demo")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run restore-agent --demo");
        let started = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("restore-agent --demo {extra:?} is serving");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains("cannot be used with") && err.contains(extra[0]),
            "{extra:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{extra:?} printed instructions");
    }
}
