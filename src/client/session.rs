//! An authenticated session with one agent: a jsonrpsee async client over our
//! line transport, with its default logging middleware removed (it would
//! re-serialise every multi-megabyte response).

use std::process::ExitStatus;
use std::time::Duration;

use bytes::BytesMut;
use jsonrpsee::core::client::async_client::{Client, ClientBuilder, RpcService};
use jsonrpsee::core::client::ClientT;
use jsonrpsee::core::middleware::RpcServiceBuilder;
use jsonrpsee::core::traits::ToRpcParams;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::process::Child;

use super::addr::ConnectAddr;
use super::connect;
use super::error::{ClientError, Result};
use super::frames::SpareBuffers;
use super::lines;
use crate::rpc::codes;
use crate::transport::{Frame, LineDecoder};

#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// How long connecting (and, for `hybrid:`, retrying) may take.
    pub connect_timeout: Duration,
    /// How long one request may wait for its response.
    pub request_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// Longest answer to `authenticate` accepted.
const AUTH_ANSWER_MAX: usize = 64 << 10;

/// The first exchange on a connection, done on the stream itself before the
/// jsonrpsee client takes it over: an agent at its connection limit sends
/// its `-32003` line and closes, and the line is still there to be read
/// when sending the request failed for the closed socket. Returns the
/// answer's result and any bytes read past its line.
async fn authenticate(
    reader: &mut connect::BoxRead,
    writer: &mut connect::BoxWrite,
    ticket: &str,
) -> Result<(serde_json::Value, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder;
    let request = serde_json::json!({"jsonrpc": "2.0", "id": "authenticate",
        "method": "authenticate", "params": {"ticket": ticket}});
    let mut line = request.to_string().into_bytes();
    line.push(b'\n');
    let sent = match writer.write_all(&line).await {
        Ok(()) => writer.flush().await,
        Err(e) => Err(e),
    };
    // the agent's framing, bounded: one line, and what came after it
    let mut decoder = LineDecoder::new(AUTH_ANSWER_MAX);
    let mut buf = BytesMut::new();
    let line = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(Frame::Line(line))) => break line,
            Ok(Some(Frame::TooLong)) => {
                return Err(ClientError::connection(
                    "the answer to `authenticate` is too long",
                ))
            }
            Ok(None) | Err(_) => {}
        }
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(|e| ClientError::connection(format!("connection to the agent lost: {e}")))?;
        if n == 0 {
            let why = match sent {
                Err(e) => e.to_string(),
                Ok(()) => "the agent closed the connection".into(),
            };
            return Err(ClientError::connection(format!(
                "connection to the agent lost: {why}"
            )));
        }
    };
    let early = buf.to_vec();
    #[derive(serde::Deserialize)]
    struct Answer {
        id: serde_json::Value,
        result: Option<serde_json::Value>,
        error: Option<ErrorObject>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorObject {
        code: i32,
        message: String,
        data: Option<serde_json::Value>,
    }
    let answer: Answer = serde_json::from_slice(&line).map_err(|e| {
        ClientError::connection(format!("the answer to `authenticate` is not JSON-RPC: {e}"))
    })?;
    match (answer.result, answer.error) {
        (_, Some(e)) if answer.id.is_null() => Err(ClientError::connection(format!(
            "the agent refused the connection: {} ({})",
            e.message, e.code
        ))),
        (_, Some(e)) => Err(ClientError::Agent {
            code: e.code,
            message: e.message,
            data: e.data,
        }),
        (Some(hello), None) if answer.id == "authenticate" => Ok((hello, early)),
        _ => Err(ClientError::connection(
            "the answer to `authenticate` is not JSON-RPC",
        )),
    }
}

/// How long an `exec:` agent gets to exit after its stdin is closed.
const CHILD_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Params already serialised, passed to jsonrpsee as they are.
struct RawParams(Option<Box<RawValue>>);

impl ToRpcParams for RawParams {
    fn to_rpc_params(self) -> std::result::Result<Option<Box<RawValue>>, serde_json::Error> {
        Ok(self.0)
    }
}

pub struct Session {
    rpc: Client<RpcService>,
    slots: lines::BulkSlots,
    spares: SpareBuffers,
    child: Option<Child>,
    /// The `authenticate` result: protocol, agent name and version.
    pub hello: serde_json::Value,
}

impl Session {
    /// Connects to `addr` and authenticates with `ticket`.
    pub async fn connect(addr: &ConnectAddr, ticket: &str, opts: &ConnectOptions) -> Result<Self> {
        let mut stream = connect::open(addr, opts.connect_timeout).await?;
        let auth = authenticate(&mut stream.reader, &mut stream.writer, ticket);
        let error = match tokio::time::timeout(opts.connect_timeout, auth).await {
            Ok(Ok((hello, early))) => return Ok(Session::start(stream, hello, early, opts)),
            Ok(Err(ClientError::Agent { code, .. })) if code == codes::AUTH_FAILED => {
                ClientError::Agent {
                    code,
                    message: format!("authentication failed: {addr} refused the ticket"),
                    data: None,
                }
            }
            Ok(Err(ClientError::Connection(m))) => ClientError::Connection(format!(
                "the connection to {addr} failed during authentication ({m})"
            )),
            Ok(Err(other)) => other,
            Err(_) => {
                ClientError::connection(format!("{addr} did not answer `authenticate` in time"))
            }
        };
        // an `exec:` agent ends when its stdin closes
        let connect::Stream {
            reader,
            writer,
            child,
        } = stream;
        drop((reader, writer));
        if let Some(child) = child {
            let _ = reap(child).await;
        }
        Err(error)
    }

    /// The jsonrpsee client over an authenticated stream; `early` are the
    /// bytes read past the answer to `authenticate` (the agent sends none
    /// unasked).
    fn start(
        stream: connect::Stream,
        hello: serde_json::Value,
        early: Vec<u8>,
        opts: &ConnectOptions,
    ) -> Session {
        let reader: connect::BoxRead = if early.is_empty() {
            stream.reader
        } else {
            Box::new(tokio::io::AsyncReadExt::chain(
                std::io::Cursor::new(early),
                stream.reader,
            ))
        };
        let (tx, rx, slots, spares) = lines::transport(reader, stream.writer);
        let rpc = ClientBuilder::default()
            .set_rpc_middleware(RpcServiceBuilder::new())
            .request_timeout(opts.request_timeout)
            .build_with_tokio(tx, rx);
        Session {
            rpc,
            slots,
            spares,
            child: stream.child,
            hello,
        }
    }

    /// Calls `method` with `params` (an object, an array, or `()` for none).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: impl Serialize,
    ) -> Result<T> {
        let raw = serde_json::value::to_raw_value(&params)
            .map_err(|e| ClientError::local(format!("params of {method}: {e}")))?;
        let params = if raw.get() == "null" { None } else { Some(raw) };
        Ok(self.rpc.request(method, RawParams(params)).await?)
    }

    /// Calls `method` with params given as JSON text (or none) and returns the
    /// result as the agent sent it (a bulk payload the transport decoded is
    /// put back as base64, and a raw one too: the result then reads as the
    /// base64 answer would).
    pub async fn call_raw(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
    ) -> Result<Box<RawValue>> {
        let raw: Box<RawValue> = self.rpc.request(method, RawParams(params)).await?;
        if !lines::is_bulk_method(method) {
            return Ok(raw);
        }
        let mut v: serde_json::Value = serde_json::from_str(raw.get())
            .map_err(|e| ClientError::local(format!("result of {method}: {e}")))?;
        let Some(slot) = v.get("slot").and_then(serde_json::Value::as_u64) else {
            return Ok(raw);
        };
        let data = self.take_bulk(slot, method)?;
        if let Some(obj) = v.as_object_mut() {
            obj.remove("slot");
            if obj.remove("encoding").is_some() && method == "stream.read" {
                obj.remove("length");
            }
            obj.insert(
                "data".into(),
                base64_simd::STANDARD.encode_to_string(&data).into(),
            );
        }
        serde_json::value::to_raw_value(&v)
            .map_err(|e| ClientError::local(format!("result of {method}: {e}")))
    }

    /// The decoded payload of the bulk answer (of `what`, for messages)
    /// whose result names `slot`.
    pub(crate) fn take_bulk(&self, slot: u64, what: &str) -> Result<Vec<u8>> {
        match self.slots.take(slot) {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(e)) if e == super::frames::CONNECTION_ENDED => Err(ClientError::connection(
                format!("the agent went away in the middle of the answer for {what}"),
            )),
            Some(Err(e)) => Err(ClientError::local(format!(
                "bad data from the agent for {what}: {e}"
            ))),
            None => Err(ClientError::local(format!(
                "payload for {what} went missing"
            ))),
        }
    }

    /// Where to hand back bulk payloads once done with them (from any
    /// thread), so that later answers decode into them.
    pub fn spare_buffers(&self) -> SpareBuffers {
        self.spares.clone()
    }

    /// Ends the session; for `exec:` closes the agent's stdin and reaps it
    /// (killing it if it does not exit within a few seconds).
    pub async fn close(mut self) -> Result<Option<ExitStatus>> {
        let child = self.child.take();
        drop(self);
        match child {
            Some(child) => reap(child).await.map(Some),
            None => Ok(None),
        }
    }
}

/// Waits for an `exec:` agent whose stdin was closed to exit, killing it
/// after [`CHILD_EXIT_GRACE`].
async fn reap(mut child: Child) -> Result<ExitStatus> {
    match tokio::time::timeout(CHILD_EXIT_GRACE, child.wait()).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(ClientError::local(format!(
            "waiting for the agent process: {e}"
        ))),
        Err(_) => {
            let _ = child.kill().await;
            child
                .wait()
                .await
                .map_err(|e| ClientError::local(format!("reaping the agent process: {e}")))
        }
    }
}
