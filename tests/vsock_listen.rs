//! The vsock listener binds and reports itself. Nothing here ever connects
//! to a vsock address: the machine's vsock device belongs to its
//! infrastructure. The end-to-end vsock test comes with the VM issue.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

/// A pseudo-random high port, different per run and per process.
fn random_high_port(salt: u32) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = nanos ^ std::process::id().wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503);
    40_000 + mix % 20_000
}

#[test]
fn vsock_listener_reports_listening() {
    let have_vsock = Path::new("/dev/vsock").exists();
    for attempt in 0..3 {
        let port = random_high_port(attempt);
        let mut agent = Agent::builder()
            .arg("--listen")
            .arg(format!("vsock:{port}"))
            .spawn();
        // Wait for either both listeners up, or the process to exit.
        let deadline = Instant::now() + START_DEADLINE;
        let unix_line = format!("listening on unix:{}", agent.sock.display());
        let exited = loop {
            let log = agent.stderr();
            if log.contains(&unix_line) && log.contains("listening on vsock:") {
                break None;
            }
            if let Some(st) = agent.wait_exit(Duration::from_millis(20)) {
                break Some(st);
            }
            assert!(Instant::now() < deadline, "agent did not come up:\n{log}");
        };
        let log = agent.stderr();
        if let Some(st) = exited {
            if !have_vsock {
                eprintln!("no /dev/vsock on this machine: vsock bind failed as expected ({st}); skipping:\n{log}");
                return;
            }
            if log.contains("in use") || log.contains("AddrInUse") {
                eprintln!("vsock port {port} in use, retrying");
                continue;
            }
            panic!("/dev/vsock exists but the agent failed to bind vsock:{port} ({st}):\n{log}");
        }
        let line = log
            .lines()
            .find(|l| l.contains("listening on vsock:"))
            .unwrap_or_default();
        let tail = line
            .split("listening on vsock:")
            .nth(1)
            .unwrap_or_default()
            .trim();
        assert!(
            tail.ends_with(&format!(":{port}")) || tail == port.to_string(),
            "listening line does not name port {port}: {line:?}"
        );
        // The agent serves on its other listener meanwhile (never touch vsock).
        let mut c = agent.connect_authed();
        assert_eq!(c.call_ok("ping", None), json!("pong"));
        return;
    }
    panic!("three random vsock ports were all in use");
}
