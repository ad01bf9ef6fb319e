//! RPC benchmark (not a test): `cargo bench --bench rpc`.
//!
//! Starts the agent binary cargo built for this bench (release profile) on a
//! Unix socket, authenticates one connection, then reports
//! - `ping` round-trip latency with 1 request in flight (p50, p99), and
//! - `ping` requests per second with 64 in flight, pipelined on the same
//!   connection.
//!
//! Goal (issue 2): at least 50,000 requests/s pipelined on a 2-core machine.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Agent, Conn};

const PHASE: Duration = Duration::from_secs(5);
const IN_FLIGHT: usize = 64;
const PING: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n";

fn main() {
    // `cargo bench` passes `--bench`; any other flag such as a filter is ignored.
    let agent = Agent::start();
    let stream = UnixStream::connect(&agent.sock).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut conn = Conn::from_stream(Box::new(stream.try_clone().expect("clone")));
    conn.authenticate();
    let mut stream = stream;

    latency(&mut stream);
    throughput(&mut stream);
}

/// Reads until `want` more newlines arrived; returns the count read (== want).
fn read_lines(stream: &mut UnixStream, buf: &mut [u8], want: usize) -> usize {
    let mut got = 0;
    while got < want {
        let n = stream.read(buf).expect("read response");
        assert!(n > 0, "agent closed the connection");
        got += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
    got
}

fn latency(stream: &mut UnixStream) {
    let mut buf = vec![0u8; 4096];
    let mut samples = Vec::with_capacity(100_000);
    // warm-up
    for _ in 0..1000 {
        stream.write_all(PING).expect("write");
        read_lines(stream, &mut buf, 1);
    }
    let start = Instant::now();
    while start.elapsed() < PHASE {
        let t = Instant::now();
        stream.write_all(PING).expect("write");
        read_lines(stream, &mut buf, 1);
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    println!(
        "ping latency, 1 in flight: p50 {:.1} us",
        pct(0.50).as_secs_f64() * 1e6
    );
    println!(
        "ping latency, 1 in flight: p99 {:.1} us",
        pct(0.99).as_secs_f64() * 1e6
    );
    println!(
        "ping rate, 1 in flight: {:.0} req/s ({} requests)",
        samples.len() as f64 / start.elapsed().as_secs_f64(),
        samples.len()
    );
}

fn throughput(stream: &mut UnixStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::with_capacity(PING.len() * IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        out.extend_from_slice(PING);
    }
    stream.write_all(&out).expect("write");
    let mut in_flight = IN_FLIGHT;
    let mut done: u64 = 0;
    let start = Instant::now();
    loop {
        let n = stream.read(&mut buf).expect("read response");
        assert!(n > 0, "agent closed the connection");
        let answered = buf[..n].iter().filter(|&&b| b == b'\n').count();
        in_flight -= answered;
        done += answered as u64;
        if start.elapsed() >= PHASE {
            break;
        }
        // Refill to IN_FLIGHT with one write.
        out.clear();
        for _ in 0..answered {
            out.extend_from_slice(PING);
        }
        stream.write_all(&out).expect("write");
        in_flight += answered;
    }
    let secs = start.elapsed().as_secs_f64();
    // drain what is still in flight so the agent is not cut off mid-write
    read_lines(stream, &mut buf, in_flight);
    println!(
        "ping pipelined, {IN_FLIGHT} in flight, one connection: {:.0} req/s ({done} requests in {secs:.2} s; goal >= 50000)",
        done as f64 / secs
    );
}
