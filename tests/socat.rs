//! Sessions through tools a user would really type: `socat` on the Unix
//! socket, and the agent's own `--listen stdio` mode.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Reads lines from a child's stdout on a thread so every wait has a deadline.
fn line_reader(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    rx
}

fn next_json(rx: &mpsc::Receiver<String>) -> Value {
    let line = rx
        .recv_timeout(READ_DEADLINE)
        .unwrap_or_else(|e| panic!("no line within {READ_DEADLINE:?}: {e}"));
    parse_response_line(&line)
}

/// Waits for a child we spawned; kills it (by pid) if it overstays.
fn wait_child(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn session_through_socat() {
    let agent = Agent::start();
    let mut socat = Command::new("socat")
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", agent.sock.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn socat (apt-get install socat)");
    let mut stdin = socat.stdin.take().expect("stdin");
    let rx = line_reader(socat.stdout.take().expect("stdout"));

    writeln!(stdin, "{}", auth_line(1)).expect("write");
    assert_eq!(
        next_json(&rx),
        json!({"jsonrpc":"2.0","id":1,"result":auth_result()})
    );
    writeln!(stdin, r#"{{"jsonrpc":"2.0","id":2,"method":"ping"}}"#).expect("write");
    assert_eq!(
        next_json(&rx),
        json!({"jsonrpc":"2.0","id":2,"result":"pong"})
    );
    writeln!(stdin, r#"{{"jsonrpc":"2.0","id":3,"method":"status"}}"#).expect("write");
    let s = next_json(&rx);
    assert_eq!(s["result"]["protocol"], json!(1), "{s}");

    drop(stdin); // socat half-closes; the agent closes its side; socat exits
    let st = wait_child(&mut socat, Duration::from_secs(5)).expect("socat did not exit");
    assert!(st.success(), "socat: {st}");
}

#[test]
fn session_over_stdio() {
    let mut agent = Agent::builder()
        .unix(false)
        .arg("--listen")
        .arg("stdio")
        .piped_stdio()
        .spawn();
    let mut stdin = agent.child.stdin.take().expect("stdin");
    let rx = line_reader(agent.child.stdout.take().expect("stdout"));

    writeln!(stdin, r#"{{"jsonrpc":"2.0","id":1,"method":"ping"}}"#).expect("write");
    // pre-auth rules apply on stdio too: the error, then the session ends
    let r = next_json(&rx);
    assert_error(&r, -32001, &json!(1));
    drop(stdin);
    agent.expect_exit_code(0, Duration::from_secs(7));

    let mut agent = Agent::builder()
        .unix(false)
        .arg("--listen")
        .arg("stdio")
        .piped_stdio()
        .spawn();
    let mut stdin = agent.child.stdin.take().expect("stdin");
    let rx = line_reader(agent.child.stdout.take().expect("stdout"));
    write!(stdin, "{}\r\n", auth_line(1)).expect("write");
    assert_eq!(
        next_json(&rx),
        json!({"jsonrpc":"2.0","id":1,"result":auth_result()})
    );
    writeln!(stdin, r#"{{"jsonrpc":"2.0","id":2,"method":"ping"}}"#).expect("write");
    assert_eq!(
        next_json(&rx),
        json!({"jsonrpc":"2.0","id":2,"result":"pong"})
    );
    writeln!(stdin, "[]").expect("write");
    assert_error(&next_json(&rx), -32600, &Value::Null);
    // stdout carries nothing but responses: logging goes to stderr
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(
        agent.stderr().contains("listening on stdio"),
        "{}",
        agent.stderr()
    );

    drop(stdin); // stdin closes -> the agent exits 0
    agent.expect_exit_code(0, Duration::from_secs(7));
}
