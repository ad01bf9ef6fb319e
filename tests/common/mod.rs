//! Test harness for the real `restore-agent` binary: starts it in a temp dir
//! on a Unix socket, and talks to it with raw bytes over a line client whose
//! every read has a deadline, so no test can hang on a silent agent.
//!
//! It never uses the crate's own client: the point is to check the wire
//! contract from the outside, byte for byte.
#![allow(dead_code)]

pub mod debugfs;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Path of the agent binary built by cargo for this test or bench.
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_restore-agent");

/// How long any single read waits before the test fails instead of hanging.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// How long the agent gets to come up (a debug build on a busy 2-core box).
pub const START_DEADLINE: Duration = Duration::from_secs(15);

/// The ticket every default agent is started with.
pub const TICKET: &str = "test-ticket-0123456789abcdef";

/// Options for one agent process. Defaults keep tests fast: idle watchdog
/// off, a 100 ms fail delay, one Unix listener in the temp dir.
pub struct AgentBuilder {
    ticket_file_content: Option<Vec<u8>>,
    ticket_mode: u32,
    unix: bool,
    idle_timeout: Option<u64>,
    auth_fail_delay_ms: Option<u64>,
    extra_args: Vec<String>,
    stdio: bool,
    ticket_is_dir: bool,
    stale_socket: bool,
    wrapper: Vec<String>,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        AgentBuilder {
            ticket_file_content: Some(format!("{TICKET}\n").into_bytes()),
            ticket_mode: 0o600,
            unix: true,
            idle_timeout: Some(0),
            auth_fail_delay_ms: Some(100),
            extra_args: Vec::new(),
            stdio: false,
            ticket_is_dir: false,
            stale_socket: false,
            wrapper: Vec::new(),
        }
    }
}

impl AgentBuilder {
    /// Raw content of the ticket file; `None` means no file at all.
    pub fn ticket_file(mut self, content: Option<&[u8]>) -> Self {
        self.ticket_file_content = content.map(|c| c.to_vec());
        self
    }
    pub fn ticket_mode(mut self, mode: u32) -> Self {
        self.ticket_mode = mode;
        self
    }
    /// Whether to add `--listen unix:DIR/agent.sock` (on by default).
    pub fn unix(mut self, on: bool) -> Self {
        self.unix = on;
        self
    }
    /// `--idle-timeout`; `None` leaves the agent's default.
    pub fn idle_timeout(mut self, secs: Option<u64>) -> Self {
        self.idle_timeout = secs;
        self
    }
    /// `--auth-fail-delay-ms`; `None` leaves the agent's default.
    pub fn auth_fail_delay_ms(mut self, ms: Option<u64>) -> Self {
        self.auth_fail_delay_ms = ms;
        self
    }
    /// Any further command-line argument, in order.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }
    /// `--datastore DIR`.
    pub fn datastore(self, dir: &Path) -> Self {
        self.arg("--datastore").arg(dir.display().to_string())
    }
    /// `--image NAME=PATH`.
    pub fn image(self, name: &str, path: &Path) -> Self {
        self.arg("--image")
            .arg(format!("{name}={}", path.display()))
    }
    /// Runs the agent as the last arguments of this command (which must
    /// `exec` it, so that the child's pid stays the agent's), e.g. `unshare`.
    pub fn wrapper(mut self, prefix: &[&str]) -> Self {
        self.wrapper = prefix.iter().map(|s| s.to_string()).collect();
        self
    }
    /// Make the ticket path a directory (unreadable as a file).
    pub fn ticket_is_dir(mut self) -> Self {
        self.ticket_is_dir = true;
        self
    }
    /// Leave a stale socket file (bound, then abandoned) at the socket path.
    pub fn stale_socket(mut self) -> Self {
        self.stale_socket = true;
        self
    }
    /// Pipe stdin and stdout (for `--listen stdio`).
    pub fn piped_stdio(mut self) -> Self {
        self.stdio = true;
        self
    }

    /// Spawns the agent without waiting for it to be ready.
    pub fn spawn(self) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("ra-test-")
            .tempdir()
            .expect("temp dir");
        let sock = dir.path().join("agent.sock");
        let ticket_path = dir.path().join("ticket");
        if let Some(content) = &self.ticket_file_content {
            fs::write(&ticket_path, content).expect("write ticket");
            fs::set_permissions(&ticket_path, fs::Permissions::from_mode(self.ticket_mode))
                .expect("chmod ticket");
        }
        if self.ticket_is_dir {
            fs::create_dir(&ticket_path).expect("ticket dir");
        }
        if self.stale_socket {
            drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
            assert!(sock.exists(), "stale socket file left behind");
        }
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("stderr file");

        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(AGENT_BIN);
                c
            }
            None => Command::new(AGENT_BIN),
        };
        cmd.env("RUST_LOG", "info")
            .arg("--ticket-file")
            .arg(&ticket_path);
        if self.unix {
            cmd.arg("--listen").arg(format!("unix:{}", sock.display()));
        }
        if let Some(s) = self.idle_timeout {
            cmd.arg("--idle-timeout").arg(s.to_string());
        }
        if let Some(ms) = self.auth_fail_delay_ms {
            cmd.arg("--auth-fail-delay-ms").arg(ms.to_string());
        }
        cmd.args(&self.extra_args);
        if self.stdio {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null()).stdout(Stdio::null());
        }
        cmd.stderr(Stdio::from(stderr));
        let child = cmd.spawn().expect("spawn restore-agent");
        Agent {
            child,
            dir,
            sock,
            ticket_path,
            stderr_path,
            started: Instant::now(),
        }
    }

    /// Spawns the agent and waits until its Unix listener is up (it logs
    /// `listening on unix:PATH`). Without a Unix listener it waits for the
    /// first `listening on` line.
    pub fn start(self) -> Agent {
        let unix = self.unix;
        let mut agent = self.spawn();
        let needle = if unix {
            format!("listening on unix:{}", agent.sock.display())
        } else {
            "listening on".to_string()
        };
        agent.wait_for_log(&needle, START_DEADLINE);
        agent
    }
}

/// One running agent process; killed (by its own pid) when dropped.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub ticket_path: PathBuf,
    pub stderr_path: PathBuf,
    pub started: Instant,
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    /// An agent with the default test options.
    pub fn start() -> Agent {
        AgentBuilder::default().start()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Everything the agent wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// Waits until stderr contains `needle`; panics (with the log) if the
    /// agent exits first or the deadline passes.
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.stderr().contains(needle) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "agent exited ({st}) before logging {needle:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent did not log {needle:?} within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `within` for the process to exit; `None` if still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) => {}
                Err(e) => panic!("try_wait: {e}"),
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit and asserts it did with `code`.
    pub fn expect_exit_code(&mut self, code: i32, within: Duration) {
        match self.wait_exit(within) {
            Some(st) => assert_eq!(
                st.code(),
                Some(code),
                "agent exit status {st}; stderr:\n{}",
                self.stderr()
            ),
            None => panic!(
                "agent still running after {within:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` to this agent (only to the child we started).
    pub fn signal(&self, sig: libc::c_int) {
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// A raw line client on the agent's Unix socket.
    pub fn connect(&self) -> Conn {
        Conn::unix(&self.sock)
    }

    /// A connection that has authenticated successfully.
    pub fn connect_authed(&self) -> Conn {
        let mut c = self.connect();
        c.authenticate();
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe {
                libc::kill(self.pid(), libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// A byte stream with settable read deadlines.
pub trait RawStream: Read + Write + Send {
    fn set_deadline(&self, d: Option<Duration>) -> io::Result<()>;
}
impl RawStream for UnixStream {
    fn set_deadline(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
}
impl RawStream for TcpStream {
    fn set_deadline(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
}

/// Outcome of waiting for one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    Line(Vec<u8>),
    /// Peer closed; carries any bytes of an unterminated last line.
    Eof(Vec<u8>),
    Timeout,
}

/// A raw newline-delimited client. All reads have deadlines.
pub struct Conn {
    stream: Box<dyn RawStream>,
    buf: Vec<u8>,
    /// Bytes of `buf` known to hold no newline (long lines are not rescanned).
    scanned: usize,
    next_id: u64,
}

impl Conn {
    pub fn unix(path: &Path) -> Conn {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_write_timeout(Some(READ_DEADLINE)).expect("timeout");
        Conn::from_stream(Box::new(s))
    }

    pub fn tcp(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_write_timeout(Some(READ_DEADLINE)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Conn::from_stream(Box::new(s))
    }

    pub fn from_stream(stream: Box<dyn RawStream>) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            scanned: 0,
            next_id: 1000,
        }
    }

    /// Writes raw bytes; panics on error.
    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).expect("write to agent");
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes one line (adds `\n`).
    pub fn send_line(&mut self, line: &str) {
        let mut b = line.as_bytes().to_vec();
        b.push(b'\n');
        self.send(&b);
    }

    /// Writes a JSON value as one compact line.
    pub fn send_json(&mut self, v: &Value) {
        self.send_line(&v.to_string());
    }

    /// Waits up to `within` for one complete line (without its `\n`).
    pub fn recv_line_within(&mut self, within: Duration) -> Recv {
        let deadline = Instant::now() + within;
        let mut chunk = [0u8; 65536];
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let pos = self.scanned + pos;
                let rest = self.buf.split_off(pos + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.truncate(pos);
                self.scanned = 0;
                return Recv::Line(line);
            }
            self.scanned = self.buf.len();
            let now = Instant::now();
            if now >= deadline {
                return Recv::Timeout;
            }
            self.stream
                .set_deadline(Some(deadline - now))
                .expect("set read timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.scanned = 0;
                    return Recv::Eof(std::mem::take(&mut self.buf));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Recv::Timeout
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.scanned = 0;
                    return Recv::Eof(std::mem::take(&mut self.buf));
                }
                Err(e) => panic!("read from agent: {e}"),
            }
        }
    }

    /// One raw response line as text; panics on EOF or timeout.
    pub fn recv_raw(&mut self) -> String {
        match self.recv_line_within(READ_DEADLINE) {
            Recv::Line(l) => {
                String::from_utf8(l).unwrap_or_else(|e| panic!("agent sent non-UTF-8: {e}"))
            }
            Recv::Eof(rest) => panic!(
                "agent closed the connection (unterminated tail {:?})",
                String::from_utf8_lossy(&rest)
            ),
            Recv::Timeout => panic!("no response line within {READ_DEADLINE:?}"),
        }
    }

    /// One response line parsed as JSON and checked to be a well-formed
    /// JSON-RPC 2.0 response (or an array of them).
    pub fn recv(&mut self) -> Value {
        let line = self.recv_raw();
        parse_response_line(&line)
    }

    /// Asserts the next event is EOF within `within` (no further line).
    pub fn expect_eof(&mut self, within: Duration) {
        match self.recv_line_within(within) {
            Recv::Eof(rest) => assert!(
                rest.is_empty(),
                "unterminated bytes before EOF: {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Recv::Line(l) => panic!("expected EOF, got line {:?}", String::from_utf8_lossy(&l)),
            Recv::Timeout => panic!("connection still open after {within:?}"),
        }
    }

    /// Asserts nothing arrives for `d` (and the connection stays open).
    pub fn expect_silence(&mut self, d: Duration) {
        match self.recv_line_within(d) {
            Recv::Timeout => {}
            Recv::Line(l) => panic!("unexpected line {:?}", String::from_utf8_lossy(&l)),
            Recv::Eof(_) => panic!("unexpected EOF"),
        }
    }

    /// Sends a request with a fresh numeric id and returns its response.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        self.send_json(&req);
        let resp = self.recv();
        assert_eq!(resp["id"], json!(id), "response to {req}: {resp}");
        resp
    }

    /// Calls and returns `result`, panicking on an error response.
    pub fn call_ok(&mut self, method: &str, params: Option<Value>) -> Value {
        let resp = self.call(method, params);
        assert!(resp.get("error").is_none(), "{method} failed: {resp}");
        resp["result"].clone()
    }

    /// Authenticates with the default ticket and checks the result.
    pub fn authenticate(&mut self) {
        let r = self.call_ok("authenticate", Some(json!({ "ticket": TICKET })));
        assert_eq!(r, auth_result(), "authenticate result");
    }
}

/// The pinned result of a successful `authenticate`.
pub fn auth_result() -> Value {
    json!({"protocol": 1, "agent": "restore-agent", "version": env!("CARGO_PKG_VERSION")})
}

/// Parses one response line, checking compactness and the response shape.
pub fn parse_response_line(line: &str) -> Value {
    assert!(!line.ends_with('\r'), "response ends with CR: {line:?}");
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON from agent {line:?}: {e}"));
    assert!(is_compact(line), "response is not compact JSON: {line:?}");
    match &v {
        Value::Array(items) => {
            assert!(!items.is_empty(), "agent sent an empty batch array");
            for item in items {
                check_response_object(item);
            }
        }
        _ => check_response_object(&v),
    }
    v
}

/// True if `json` has no whitespace outside string literals.
pub fn is_compact(json: &str) -> bool {
    let mut in_string = false;
    let mut escaped = false;
    for ch in json.chars() {
        if in_string {
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if ch == '"' {
            in_string = true;
        } else if ch.is_whitespace() {
            return false;
        }
    }
    true
}

/// Asserts `v` is `{"jsonrpc":"2.0","id":...,"result"|"error":...}` with
/// exactly one of result/error and a well-formed error object.
pub fn check_response_object(v: &Value) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("response is not an object: {v}"));
    assert_eq!(obj.get("jsonrpc"), Some(&json!("2.0")), "jsonrpc in {v}");
    let id = obj
        .get("id")
        .unwrap_or_else(|| panic!("response without id member: {v}"));
    assert!(
        id.is_null() || id.is_string() || id.is_i64() || id.is_u64(),
        "bad response id in {v}"
    );
    let has_result = obj.contains_key("result");
    let has_error = obj.contains_key("error");
    assert!(
        has_result != has_error,
        "need exactly one of result/error: {v}"
    );
    for k in obj.keys() {
        assert!(
            ["jsonrpc", "id", "result", "error"].contains(&k.as_str()),
            "unexpected member {k} in {v}"
        );
    }
    if let Some(err) = obj.get("error") {
        let e = err
            .as_object()
            .unwrap_or_else(|| panic!("error is not an object: {v}"));
        assert!(
            e.get("code").is_some_and(Value::is_i64),
            "error.code in {v}"
        );
        assert!(
            e.get("message").is_some_and(Value::is_string),
            "error.message in {v}"
        );
        for k in e.keys() {
            assert!(
                ["code", "message", "data"].contains(&k.as_str()),
                "unexpected member {k} in error of {v}"
            );
        }
    }
}

/// The error code of a response, panicking if it is a success.
pub fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error response, got {v}"))
}

/// Asserts `v` is an error with `code` and `id`.
pub fn assert_error(v: &Value, code: i64, id: &Value) {
    assert_eq!(error_code(v), code, "error code in {v}");
    assert_eq!(&v["id"], id, "id in {v}");
}

/// A request line with the default ticket.
pub fn auth_line(id: u64) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "authenticate", "params": {"ticket": TICKET}})
        .to_string()
}

/// A free TCP port on 127.0.0.1 (bound then released; small race accepted).
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Polls `f` every 20 ms until it returns true or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A field of /proc/PID/status in bytes (e.g. `VmHWM`, `VmRSS`).
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A temporary directory on /dev/shm when there is one: a datastore's 65536
/// chunk directories come and go in a blink on tmpfs, in minutes on a busy
/// overlay disk.
pub fn shm_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir")
}
