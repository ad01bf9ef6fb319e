//! An authenticated session with one agent: a jsonrpsee async client over our
//! line transport, with its default logging middleware removed (it would
//! re-serialise every multi-megabyte response).

use std::process::ExitStatus;
use std::time::Duration;

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
        let stream = connect::open(addr, opts.connect_timeout).await?;
        let (tx, rx, slots, spares) = lines::transport(stream.reader, stream.writer);
        let rpc = ClientBuilder::default()
            .set_rpc_middleware(RpcServiceBuilder::new())
            .request_timeout(opts.request_timeout)
            .build_with_tokio(tx, rx);
        let mut session = Session {
            rpc,
            slots,
            spares,
            child: stream.child,
            hello: serde_json::Value::Null,
        };
        let auth = session
            .call::<serde_json::Value>("authenticate", serde_json::json!({ "ticket": ticket }));
        match tokio::time::timeout(opts.connect_timeout, auth).await {
            Ok(Ok(hello)) => {
                session.hello = hello;
                Ok(session)
            }
            Ok(Err(e)) => {
                let _ = session.close().await;
                Err(match e {
                    ClientError::Agent { code, .. } if code == codes::AUTH_FAILED => {
                        ClientError::Agent {
                            code,
                            message: format!("authentication failed: {addr} refused the ticket"),
                            data: None,
                        }
                    }
                    ClientError::Connection(m) => ClientError::Connection(format!(
                        "the connection to {addr} failed during authentication ({m})"
                    )),
                    other => other,
                })
            }
            Err(_) => {
                let _ = session.close().await;
                Err(ClientError::connection(format!(
                    "{addr} did not answer `authenticate` in time"
                )))
            }
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
        let Some(mut child) = child else {
            return Ok(None);
        };
        match tokio::time::timeout(CHILD_EXIT_GRACE, child.wait()).await {
            Ok(Ok(status)) => Ok(Some(status)),
            Ok(Err(e)) => Err(ClientError::local(format!(
                "waiting for the agent process: {e}"
            ))),
            Err(_) => {
                let _ = child.kill().await;
                child
                    .wait()
                    .await
                    .map(Some)
                    .map_err(|e| ClientError::local(format!("reaping the agent process: {e}")))
            }
        }
    }
}
