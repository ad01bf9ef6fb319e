//! restore-client against a broken or hostile agent: a scripted fake agent
//! on a Unix socket answers each method as the test says. The agent reads
//! untrusted backups inside a VM; whatever it sends, the client on the host
//! must not panic, loop for ever, grow without bound, or pass wrong data off
//! as right. (Cases found by a hostile-agent audit.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

const CLIENT: &str = env!("CARGO_BIN_EXE_restore-client");

mod common;

/// What the fake agent answers to one request.
enum Answer {
    Result(Value),
    /// the result's JSON text, as it is
    Text(std::sync::Arc<String>),
    /// a raw bulk answer: the result's head and the bytes after its line
    Raw(Value, Vec<u8>),
    /// an error object
    Error(Value),
    /// no answer at all
    Silent,
}

type Script = dyn Fn(&str, &Value) -> Answer + Send + Sync;

/// A fake agent serving every connection with `script`, until the test
/// process ends; the directory holds its socket and the ticket.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn start(script: impl Fn(&str, &Value) -> Answer + Send + Sync + 'static) -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ticket"), "T0").expect("ticket");
        let listener = UnixListener::bind(dir.path().join("agent.sock")).expect("bind");
        let script: std::sync::Arc<Script> = std::sync::Arc::new(script);
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let script = script.clone();
                thread::spawn(move || {
                    let mut out = conn.try_clone().expect("clone");
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        let Ok(req) = serde_json::from_str::<Value>(&line) else {
                            return;
                        };
                        let method = req["method"].as_str().unwrap_or("");
                        let answer = if method == "authenticate" {
                            Answer::Result(json!({"protocol": 1, "agent": "fake", "version": "0"}))
                        } else {
                            script(method, &req["params"])
                        };
                        let (body, raw) = match answer {
                            Answer::Silent => continue,
                            Answer::Text(text) => {
                                let line = format!(
                                    r#"{{"jsonrpc":"2.0","id":{},"result":{text}}}"#,
                                    req["id"]
                                );
                                if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                                    return;
                                }
                                continue;
                            }
                            Answer::Result(r) => (json!({"result": r}), Vec::new()),
                            Answer::Raw(r, bytes) => (json!({"result": r}), bytes),
                            Answer::Error(e) => (json!({"error": e}), Vec::new()),
                        };
                        let mut body = body;
                        body["jsonrpc"] = json!("2.0");
                        body["id"] = req["id"].clone();
                        let mut msg = serde_json::to_vec(&body).expect("json");
                        msg.push(b'\n');
                        msg.extend_from_slice(&raw);
                        if out.write_all(&msg).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Fake { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `extract s a raw PATH -o DEST`.
    fn extract(&self, path: &str, dest: &std::path::Path) -> Output {
        let dest = dest.to_str().expect("utf8");
        self.client(&["extract", "s", "a", "raw", path, "-o", dest])
    }

    /// restore-client against the fake with `args`, its output piped.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(CLIENT);
        c.arg("--connect")
            .arg(format!("unix:{}", self.path("agent.sock").display()))
            .arg("--ticket-file")
            .arg(self.path("ticket"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs restore-client against the fake with `args`; fails the test
    /// if it runs past 30 s (killing it).
    fn client(&self, args: &[&str]) -> Output {
        let child = self.command(args).spawn().expect("spawn restore-client");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(out) => out.expect("output"),
            Err(_) => {
                // SAFETY: kill takes no pointers; the pid is our child's,
                // not yet reaped (its waiter has not returned).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                panic!("restore-client {args:?} still ran after 30 s");
            }
        }
    }
}

/// Runs restore-client against the fake with `args` (its output must fit
/// in the pipes), watching its peak RSS; returns both.
fn client_peak(fake: &Fake, args: &[&str]) -> (Output, u64) {
    let mut child = fake.command(args).spawn().expect("spawn restore-client");
    let started = std::time::Instant::now();
    let mut peak = 0;
    while child.try_wait().expect("wait").is_none() {
        peak = peak.max(common::proc_status_bytes(child.id(), "VmHWM"));
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("restore-client {args:?} still ran after 60 s");
        }
        thread::sleep(Duration::from_millis(2));
    }
    (child.wait_with_output().expect("output"), peak)
}

/// The exit code, failing the test on a panic (101, or its message).
fn code(out: &Output) -> i32 {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "the client panicked: {err}");
    out.status.code().expect("an exit code, not a signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The cursor after the one an `fs.list` request names (pages are numbered
/// from 0): every page brings a new one.
fn next_page(params: &Value) -> String {
    let page: u64 = params["cursor"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (page + 1).to_string()
}

/// A listing entry of a directory named `name`.
fn dir_entry(name: &str) -> Value {
    json!({"name": name, "type": "dir", "size": 0, "mode": 0o755, "uid": 0, "gid": 0,
           "mtime": 0, "inode": 2, "nlink": 2})
}

fn file_stat(name: &str, size: u64) -> Value {
    json!({"name": name, "type": "file", "size": size, "mode": 0o644, "uid": 0, "gid": 0,
           "mtime": 0, "inode": 12, "nlink": 1})
}

#[test]
fn sizes_past_u64_and_escape_sequences_in_answers() {
    let fake = Fake::start(|method, _| match method {
        "snapshot.list" => Answer::Result(json!({"snapshots": [{
        "snapshot": "vm/1/2026-01-01T00:00:00Z", "type": "vm", "id": "1",
        "time": "2026-01-01T00:00:00Z", "namespace": "",
        "archives": [
            {"name": "a.img.fidx", "kind": "image", "size": u64::MAX, "crypt_mode": "none"},
            {"name": "b.img.fidx", "kind": "image", "size": 5, "crypt_mode": "none"}
        ]}]})),
        "ping" => Answer::Result(json!("\u{1b}]0;owned\u{7}pong")),
        _ => Answer::Result(json!(null)),
    });
    // the sizes' sum overflowed: a panic, exit 101, no JSON document
    for args in [&["snapshots"][..], &["--output", "json", "snapshots"]] {
        let out = fake.client(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    }
    let out = fake.client(&["ping"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        !out.stdout.contains(&0x1b),
        "escape sequence printed as it came"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\\x1b"));
}

#[test]
fn listings_that_never_end_are_refused() {
    // a new cursor with every page, and a page of 10,000 entries: the
    // client collected 5 GiB in 20 s (the entries are collected before
    // they are read, so numbers stand in for them here: cheap to send)
    let fake = Fake::start(|method, params| match method {
        "fs.list" => {
            let page = next_page(params);
            Answer::Result(json!({"entries": vec![0; 10_000], "next_cursor": page}))
        }
        _ => Answer::Result(json!(null)),
    });
    let out = fake.client(&["ls", "s", "a", "raw", "/d"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("1000000 entries"), "{}", stderr(&out));

    // cursors that come round again: the same pages for ever
    let cycle = Fake::start(|method, params| match method {
        "fs.list" => {
            let next = if params["cursor"] == "a" { "b" } else { "a" };
            Answer::Result(json!({"entries": [dir_entry("x")], "next_cursor": next}))
        }
        _ => Answer::Result(json!(null)),
    });
    let out = cycle.client(&["ls", "s", "a", "raw", "/d"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("repeated cursor"), "{}", stderr(&out));

    // a directory in every directory, with long names: ls -R went on
    // descending for ever
    let deep = Fake::start(|method, _| match method {
        "fs.list" => Answer::Result(json!({"entries": [dir_entry(&"s".repeat(255))]})),
        _ => Answer::Result(json!(null)),
    });
    let out = deep.client(&["ls", "-R", "s", "a", "raw", "/d"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("path longer than"),
        "{}",
        stderr(&out)
    );
}

/// A file whose data ends before the size `fs.stat` gave (or with a short
/// read) is an error and leaves no file; it was extracted as a whole file
/// of 100 bytes, with exit 0.
#[test]
fn a_file_whose_data_ends_before_its_size_is_an_error() {
    for eof in [true, false] {
        let fake = Fake::start(move |method, params| match method {
            "fs.stat" => Answer::Result(file_stat("f", 10_000)),
            "fs.read" => {
                let offset = params["offset"].as_u64().unwrap_or(0);
                Answer::Raw(
                    json!({"offset": offset, "length": 100, "eof": eof, "encoding": "raw"}),
                    vec![b'x'; 100],
                )
            }
            _ => Answer::Result(json!(null)),
        });
        let dest = fake.path("out");
        let out = fake.extract("/f", &dest);
        assert_eq!(code(&out), 2, "eof {eof}: {}", stderr(&out));
        assert!(stderr(&out).contains("10000"), "{}", stderr(&out));
        assert!(!dest.join("f").exists(), "a partial file was left");
        let out = fake.client(&["cat", "s", "a", "raw", "/f"]);
        assert_eq!(code(&out), 2, "cat, eof {eof}: {}", stderr(&out));
    }
}

/// A tar stream that goes on after its end-of-archive blocks: the client
/// read for as long as the agent sent (46 GiB in 20 s), and never set the
/// directories' modes.
#[test]
fn data_after_the_end_of_the_archive_is_an_error() {
    let fake = Fake::start(|method, params| match method {
        "fs.stat" => Answer::Result(dir_entry("d")),
        "fs.extract" => Answer::Result(json!({"stream": 1})),
        "stream.read" => {
            let offset = params["offset"].as_u64().unwrap_or(0);
            let length = params["length"].as_u64().unwrap_or(4096).min(16 << 20);
            // the end-of-archive blocks, then zeros without end
            Answer::Raw(
                json!({"offset": offset, "length": length, "eof": false, "encoding": "raw"}),
                vec![0u8; length as usize],
            )
        }
        _ => Answer::Result(json!(null)),
    });
    let out = fake.extract("/d", &fake.path("out"));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("end of the archive"),
        "{}",
        stderr(&out)
    );
}

/// A ustar member: header (checksum made) and data padded to 512 bytes.
fn tar_member(name: &str, typeflag: u8, data: &[u8], link: &str) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"14000000000");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h.extend_from_slice(data);
    h.resize(h.len().div_ceil(512) * 512, 0);
    h
}

/// An agent serving directory /d as `tar` (then the end blocks).
fn serving_tar(tar: Vec<u8>) -> Fake {
    let mut stream = tar;
    stream.extend(vec![0u8; 1024]);
    serving_stream(stream)
}

/// An agent whose `fs.extract` of directory /d streams `stream`, and says
/// it ended where `stream` does.
fn serving_stream(stream: Vec<u8>) -> Fake {
    serving_stream_of(dir_entry("d"), stream)
}

/// [`serving_stream`] with `stat` the extracted path's `fs.stat`.
fn serving_stream_of(stat: Value, stream: Vec<u8>) -> Fake {
    Fake::start(move |method, params| match method {
        "fs.stat" => Answer::Result(stat.clone()),
        "fs.extract" => Answer::Result(json!({"stream": 1})),
        "stream.read" => {
            let offset = params["offset"].as_u64().unwrap_or(0) as usize;
            let length = params["length"].as_u64().unwrap_or(4096) as usize;
            let end = (offset + length).min(stream.len());
            let data = stream.get(offset..end).unwrap_or_default().to_vec();
            let eof = end == stream.len();
            Answer::Raw(
                json!({"offset": offset, "length": data.len(), "eof": eof, "encoding": "raw"}),
                data,
            )
        }
        "stream.close" => Answer::Result(json!({"closed": true})),
        _ => Answer::Result(json!(null)),
    })
}

/// An agent that says its stream ended before the archive did: `--tar`,
/// `--zstd` and `-` wrote what came, as if it were the archive, and exited
/// 0.
#[test]
fn an_archive_that_ends_early_is_not_called_written() {
    let mut tar = tar_member("d/", b'5', b"", "");
    tar.extend(tar_member("d/f", b'0', &[b'x'; 5000], ""));
    tar.extend(vec![0u8; 1024]);
    let whole = tar.len();
    // in the data, where the end blocks should come, between them
    for cut in [whole, 3000, whole - 1024, whole - 512] {
        let part = tar[..cut].to_vec();
        let zst = zstd::encode_all(part.as_slice(), 3).expect("zstd");
        for (stream, args) in [
            (part.clone(), &["--tar", "out.tar"][..]),
            (part.clone(), &["-"][..]),
            (zst, &["--tar", "out.tar", "--zstd"][..]),
        ] {
            let fake = serving_stream(stream.clone());
            let dest = fake.path("out.tar");
            let args: Vec<String> = args
                .iter()
                .map(|a| match *a {
                    "out.tar" => dest.display().to_string(),
                    a => a.to_string(),
                })
                .collect();
            let mut all = vec!["extract", "s", "a", "raw", "/d"];
            all.extend(args.iter().map(String::as_str));
            let out = fake.client(&all);
            let what = format!("cut at {cut} of {whole}, {args:?}");
            if cut == whole {
                assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
                let got = if args[0] == "-" {
                    out.stdout.clone()
                } else {
                    std::fs::read(&dest).expect("archive")
                };
                assert_eq!(got, stream, "{what}");
                continue;
            }
            assert_eq!(code(&out), 2, "{what}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("ended early"),
                "{what}: {}",
                stderr(&out)
            );
            assert!(!dest.exists(), "{what}: the cut archive was left");
        }
    }
}

/// `--force` replaces an existing file with a symlink, hard link or FIFO
/// only once the new one is made: a hard link to a missing member used to
/// delete the user's file first, then fail.
#[test]
fn force_keeps_the_old_file_when_its_replacement_cannot_be_made() {
    let mut tar = tar_member("d/", b'5', b"", "");
    tar.extend(tar_member("d/h", b'1', b"", "d/missing"));
    let fake = serving_tar(tar);
    let dest = fake.path("out");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("h"), b"mine").unwrap();
    let force = |path: &str| {
        let dest = dest.to_str().unwrap();
        fake.client(&["extract", "--force", "s", "a", "raw", path, "-o", dest])
    };
    let out = force("/d");
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(std::fs::read(dest.join("h")).unwrap(), b"mine");
    let names: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["h"], "a temporary name was left");

    // one that can be made replaces the file
    let mut tar = tar_member("d/", b'5', b"", "");
    tar.extend(tar_member("d/h", b'2', b"", "elsewhere"));
    let fake2 = serving_tar(tar);
    let dest2 = dest.to_str().unwrap();
    let out = fake2.client(&["extract", "--force", "s", "a", "raw", "/d", "-o", dest2]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read_link(dest.join("h")).unwrap(),
        Path::new("elsewhere")
    );
}

/// A symlink member without a target is the agent's fault and said so:
/// it was reported as the local "No such file or directory" of making a
/// link to "", which sent the user looking at their own disk.
#[test]
fn a_symlink_without_a_target_is_the_agents_fault() {
    let mut tar = tar_member("d/", b'5', b"", "");
    tar.extend(tar_member("d/s", b'2', b"", ""));
    let fake = serving_tar(tar);
    let out = fake.extract("/d", &fake.path("out"));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("s without a target"),
        "{}",
        stderr(&out)
    );
    assert!(std::fs::symlink_metadata(fake.path("out").join("s")).is_err());
}

/// An agent's error message of 1 MiB is shortened on stderr (a hostile
/// agent's 60 MiB one was printed whole), and kept whole for scripts.
#[test]
fn long_error_messages_are_shortened_for_people() {
    let fake =
        Fake::start(|_, _| Answer::Error(json!({"code": 1001, "message": "x".repeat(1 << 20)})));
    let out = fake.client(&["stat", "s", "a", "raw", "/f"]);
    assert_eq!(
        code(&out),
        1,
        "{}",
        &stderr(&out)[..200.min(out.stderr.len())]
    );
    assert!(
        out.stderr.len() < 8192,
        "{} bytes on stderr",
        out.stderr.len()
    );
    assert!(stderr(&out).contains("bytes in all"), "{}", stderr(&out));
    let out = fake.client(&["--output", "json", "stat", "s", "a", "raw", "/f"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["error"]["message"].as_str().map(str::len), Some(1 << 20));
}

/// Second round of the audit: an entry that is an array (a panic, exit
/// 101, when `ls`/`stat` gave it a path), empty pages that only bring a new
/// cursor (`ls` ran for ever, keeping every cursor: 2.4 GB), a name that
/// lists its own directory again (`ls -R` made a million calls), C1 control
/// characters in `call` output, and a silent `stream.close` after a failed
/// extraction (it waited out the 120 s request timeout).
#[test]
fn malformed_listings_and_silent_closes() {
    let array = Fake::start(|method, _| match method {
        "fs.stat" => Answer::Result(json!(["x", null, "file", 3])),
        "fs.list" => Answer::Result(json!({"entries": [["x", null, "file", 3]]})),
        _ => Answer::Result(json!(null)),
    });
    for args in [
        &["stat", "s", "a", "raw", "/f"][..],
        &["ls", "s", "a", "raw", "/d"],
    ] {
        let out = array.client(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("not an object"), "{}", stderr(&out));
    }

    let empty = Fake::start(|method, params| match method {
        "fs.list" => {
            let page = next_page(params);
            Answer::Result(json!({"entries": [], "next_cursor": page}))
        }
        _ => Answer::Result(json!(null)),
    });
    let out = empty.client(&["ls", "s", "a", "raw", "/d"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("empty page"), "{}", stderr(&out));

    let itself = Fake::start(|method, _| match method {
        "fs.list" => Answer::Result(json!({"entries": [dir_entry("")]})),
        _ => Answer::Result(json!(null)),
    });
    let out = itself.client(&["ls", "-R", "s", "a", "raw", "/d"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("unsafe name"), "{}", stderr(&out));

    let call = Fake::start(|_, _| Answer::Result(json!({"k\u{9b}": "\u{9b}31m\u{202e}"})));
    let out = call.client(&["call", "x"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{9b}') && !text.contains('\u{202e}'),
        "{text}"
    );

    let silent = Fake::start(|method, _| match method {
        "fs.stat" => Answer::Result(dir_entry("d")),
        "fs.extract" => Answer::Result(json!({"stream": 1})),
        "stream.read" => Answer::Raw(
            json!({"offset": 12345, "length": 1, "eof": false, "encoding": "raw"}),
            vec![0],
        ),
        "stream.close" => Answer::Silent,
        _ => Answer::Result(json!(null)),
    });
    let started = std::time::Instant::now();
    let out = silent.extract("/d", &silent.path("out"));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// Without --force, a directory that was there keeps its mode and mtime (a
/// member could open up or lock the user's ~/.ssh; GNU tar's
/// --no-overwrite-dir); with --force it gets the member's.
#[test]
fn existing_directories_keep_their_modes_without_force() {
    use std::os::unix::fs::PermissionsExt;
    let mut tar = tar_member("d/", b'5', b"", "");
    tar.extend(tar_member("d/sub/", b'5', b"", ""));
    let fake = serving_tar(tar);
    let dest = fake.path("out");
    std::fs::create_dir_all(dest.join("sub")).unwrap();
    std::fs::set_permissions(dest.join("sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mode = || {
        std::fs::metadata(dest.join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    let out = fake.extract("/d", &dest);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(), 0o700);
    let d = dest.to_str().unwrap();
    let out = fake.client(&["extract", "--force", "s", "a", "raw", "/d", "-o", d]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(), 0o644, "the member's mode with --force");
}

/// `ls -R` prints each directory as soon as it is listed: with an agent
/// that never answers for one subdirectory, the sections before it are
/// already out (they were held until the whole tree was in, so nothing was
/// printed at all).
#[test]
fn ls_r_prints_each_directory_as_it_comes() {
    let fake = Fake::start(|method, params| match (method, params["path"].as_str()) {
        ("fs.list", Some("/d")) => {
            Answer::Result(json!({"entries": [dir_entry("x"), dir_entry("y")]}))
        }
        ("fs.list", Some("/d/x")) => Answer::Result(json!({"entries": [file_stat("f", 1)]})),
        ("fs.list", _) => Answer::Silent,
        _ => Answer::Result(json!(null)),
    });
    let mut child = Command::new(CLIENT)
        .arg("--connect")
        .arg(format!("unix:{}", fake.path("agent.sock").display()))
        .arg("--ticket-file")
        .arg(fake.path("ticket"))
        .args(["ls", "-R", "s", "a", "raw", "/d"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn restore-client");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("y") {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen,
        ["/d:", "x", "y"],
        "what ls -R printed before the agent stalled"
    );
}

/// An agent whose streams fail at a member again and again: `extract -o`
/// resumes after a failed member, but not after the same one twice (that
/// would go round for ever), and not on a token it cannot use.
#[test]
fn a_stream_that_fails_at_the_same_member_again_is_not_resumed_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for data in [
        json!({"member": "d/x", "resume": "ZC94"}),
        json!({"resume": 7}),
    ] {
        let opened = Arc::new(AtomicUsize::new(0));
        let seen = opened.clone();
        let resumable = data["resume"].is_string();
        let shown = data.to_string();
        let fake = Fake::start(move |method, _| match method {
            "fs.stat" => Answer::Result(dir_entry("d")),
            "fs.extract" => {
                seen.fetch_add(1, Ordering::SeqCst);
                Answer::Result(json!({"stream": 1}))
            }
            "stream.read" => Answer::Error(
                json!({"code": 1004, "message": "/d/x: unreadable", "data": data.clone()}),
            ),
            "stream.close" => Answer::Result(json!({"closed": true})),
            _ => Answer::Result(json!(null)),
        });
        let out = fake.extract("/d", &fake.path("out"));
        assert_eq!(code(&out), 1, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("/d/x: unreadable"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            opened.load(Ordering::SeqCst),
            if resumable { 2 } else { 1 },
            "streams opened, {shown}"
        );
    }
}

/// A pax record "LEN KEY=VALUE\n".
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A large file is extracted from a tar stream, where its holes do not
/// travel (through fs.read, a 100 GiB disk image with little in it sent
/// 100 GiB of zeros); the stream must hold that file and nothing else.
#[test]
fn a_large_file_comes_as_a_stream_holding_it_alone() {
    let size: u64 = 100 << 30;
    let file = |name: &str| {
        let mut pax = Vec::new();
        for (k, v) in [
            ("GNU.sparse.major", "1".to_string()),
            ("GNU.sparse.minor", "0".to_string()),
            ("GNU.sparse.name", name.to_string()),
            ("GNU.sparse.realsize", size.to_string()),
        ] {
            pax.extend(pax_record(k, &v));
        }
        let mut data = format!("2\n4096\n5\n{size}\n0\n").into_bytes();
        data.resize(512, 0);
        data.extend(b"hello");
        let mut member = tar_member("PaxHeaders/big", b'x', &pax, "");
        member.extend(tar_member("GNUSparseFile.0/big", b'0', &data, ""));
        member
    };
    for (members, whole) in [(file("big"), true), (file("other"), false)] {
        let mut stream = members;
        stream.extend(vec![0u8; 1024]);
        let fake = serving_stream_of(file_stat("big", size), stream);
        let dest = fake.path("out");
        let out = fake.extract("/big", &dest);
        if !whole {
            assert_eq!(code(&out), 2, "{}", stderr(&out));
            assert!(
                stderr(&out).contains("not the extracted file"),
                "{}",
                stderr(&out)
            );
            assert!(!dest.join("other").exists() && !dest.join("big").exists());
            continue;
        }
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let got = dest.join("big");
        let meta = std::fs::metadata(&got).expect("the file");
        assert_eq!(meta.len(), size);
        use std::os::unix::fs::{FileExt, MetadataExt};
        assert!(meta.blocks() * 512 < 1 << 20, "its holes are holes");
        let mut head = [0u8; 5];
        std::fs::File::open(&got)
            .and_then(|f| f.read_exact_at(&mut head, 4096))
            .expect("read");
        assert_eq!(&head, b"hello");
    }
}

/// An answer line of millions of tiny JSON values (here 30 million zeros in
/// 60 MB, under the 64 MiB line limit) is refused before it is parsed:
/// parsing it took the client to 1041 MiB (68 MiB refused). A large answer of few values (a 22 MB
/// string, as a 16 MiB base64 read is) still comes through.
#[test]
fn an_answer_of_millions_of_values_is_refused_before_it_is_parsed() {
    let zeros = std::sync::Arc::new(format!("[{}0]", "0,".repeat(30_000_000)));
    let fake = Fake::start(move |method, _| match method {
        "fs.list" => Answer::Text(zeros.clone()),
        _ => Answer::Result(json!(null)),
    });
    let (out, peak) = client_peak(&fake, &["ls", "s", "a", "raw", "/d"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("more than 1048576 JSON values"),
        "{}",
        stderr(&out)
    );
    assert!(peak < 400 << 20, "client peak RSS {} MiB", peak >> 20);

    let data = std::sync::Arc::new(format!(r#"{{"data":"{}"}}"#, "QUFB".repeat(5_500_000)));
    let big = Fake::start(move |_, _| Answer::Text(data.clone()));
    let out = big.client(&["--output", "json", "call", "x"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["data"].as_str().map(str::len), Some(22_000_000));
}
