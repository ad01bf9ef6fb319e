//! A minimal blocking JSON-RPC caller for the launcher's own needs: the
//! readiness `ping`, `status` and the graceful `stop` of a VM's agent.
//!
//! It speaks `hybrid:PATH:PORT` (a vhost-device-vsock Unix socket: send
//! `CONNECT PORT`, expect a line starting with `OK `) and `vsock:CID:PORT`.
//! It is deliberately tiny and private to `vm`; the host CLI's full client
//! lives elsewhere. It never retries: the caller owns the deadline.
//!
//! HANDSHAKE: a hybrid connection must not be closed while its `CONNECT` is
//! unanswered. vhost-device-vsock 0.3.0 writes the guest's `OK` to the
//! socket and panics when that write fails, which ends its worker thread:
//! the VM can then never be reached again. So the wait for the reply gets
//! the caller's whole timeout; the helper itself closes the socket at once
//! when the guest refuses, so a guest that is not listening yet costs no
//! wait.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Longest response line accepted (the launcher only reads small answers).
const MAX_LINE: u64 = 1 << 20;

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Connects to `addr`, authenticates with the ticket in `ticket_file`, calls
/// `method` with `params` and returns its result.
pub fn call(
    addr: &str,
    ticket_file: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, String> {
    let ticket =
        std::fs::read(ticket_file).map_err(|e| format!("{}: {e}", ticket_file.display()))?;
    let ticket =
        String::from_utf8_lossy(ticket.strip_suffix(b"\n").unwrap_or(&ticket)).into_owned();
    let stream = connect(addr, timeout)?;
    let mut reader = BufReader::new(stream);
    request(&mut reader, 1, "authenticate", json!({ "ticket": ticket }))?;
    request(&mut reader, 2, method, params)
}

fn request(
    reader: &mut BufReader<Box<dyn Stream>>,
    id: u64,
    method: &str,
    params: Value,
) -> Result<Value, String> {
    let mut line = serde_json::to_vec(
        &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
    )
    .map_err(|e| e.to_string())?;
    line.push(b'\n');
    reader
        .get_mut()
        .write_all(&line)
        .map_err(|e| format!("send {method}: {e}"))?;
    let mut answer = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut answer)
        .map_err(|e| format!("read {method} answer: {e}"))?;
    if answer.is_empty() {
        return Err(format!("connection closed before the {method} answer"));
    }
    let v: Value =
        serde_json::from_slice(&answer).map_err(|e| format!("bad {method} answer: {e}"))?;
    if let Some(err) = v.get("error") {
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!("{method}: error {code}: {msg}"));
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| format!("{method}: answer without result"))
}

fn connect(addr: &str, timeout: Duration) -> Result<Box<dyn Stream>, String> {
    let bad = || {
        format!(
            "unsupported connect address `{addr}` (expected hybrid:PATH:PORT or vsock:CID:PORT)"
        )
    };
    let (scheme, rest) = addr.split_once(':').ok_or_else(bad)?;
    let (target, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u32 = port.parse().map_err(|_| bad())?;
    match scheme {
        "hybrid" => {
            let mut s =
                UnixStream::connect(target).map_err(|e| format!("connect {target}: {e}"))?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .map_err(|e| format!("hybrid handshake: {e}"))?;
            // Byte by byte: nothing after the reply line may be consumed here.
            let mut reply = Vec::new();
            let mut byte = [0u8; 1];
            while reply.len() < 256 {
                match s.read(&mut byte) {
                    Ok(0) => return Err("hybrid handshake: connection closed".into()),
                    Ok(_) if byte[0] == b'\n' => break,
                    Ok(_) => reply.push(byte[0]),
                    Err(e) => return Err(format!("hybrid handshake: {e}")),
                }
            }
            if !reply.starts_with(b"OK ") {
                return Err(format!(
                    "hybrid handshake refused: {:?}",
                    String::from_utf8_lossy(&reply)
                ));
            }
            Ok(Box::new(s))
        }
        "vsock" => {
            let cid: u32 = target.parse().map_err(|_| bad())?;
            vsock_connect(cid, port, timeout).map(|s| Box::new(s) as Box<dyn Stream>)
        }
        _ => Err(bad()),
    }
}

/// AF_VSOCK stream to `cid:port` (used only with the kernel's vhost-vsock).
fn vsock_connect(cid: u32, port: u32, timeout: Duration) -> Result<UnixStream, String> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: plain socket/connect calls on a fresh fd with a zeroed,
    // fully initialised sockaddr_vm of the size passed.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("vsock socket: {}", std::io::Error::last_os_error()));
        }
        let mut sa: libc::sockaddr_vm = std::mem::zeroed();
        sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        sa.svm_cid = cid;
        sa.svm_port = port;
        let rc = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        );
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(format!("connect vsock:{cid}:{port}: {e}"));
        }
        // The stream methods used (read, write, timeouts) work on any socket.
        let s = UnixStream::from_raw_fd(fd);
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }
}
