//! The method registry: jsonrpsee's `Methods` for ordinary methods, plus raw
//! methods whose result is already JSON text (bulk data, written without
//! being parsed, copied and validated again), plus the rules the gate needs
//! from method owners (which calls leave the idle watchdog alone, what to do
//! when a connection closes).

use futures_util::FutureExt;
use jsonrpsee::types::{ErrorObjectOwned, Id as JsonrpseeId, Params};
use jsonrpsee::{ConnectionId, Extensions, MethodCallback, Methods};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use super::codes::{internal, METHOD_NOT_FOUND};
use super::envelope::present;

/// Produces a result's JSON text part by part while it is being written,
/// so that a large result never sits in memory whole.
pub trait BodySource: Send {
    /// Appends the next part to `out`; `false` once the last part has been
    /// appended (later calls append nothing).
    fn next_part(&mut self, out: &mut Vec<u8>) -> bool;
}

/// The JSON text of a result value: whole, or produced while it is written.
pub enum Body {
    Bytes(Vec<u8>),
    Parts(Box<dyn BodySource>),
}

impl Body {
    /// The whole text (for a batch answer, which is built as one line).
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Body::Bytes(b) => b,
            Body::Parts(mut src) => {
                let mut out = Vec::new();
                while src.next_part(&mut out) {}
                out
            }
        }
    }
}

/// What a response keeps alive until it is written (e.g. a share of a
/// memory budget), and whether others are waiting for it: a client that
/// takes none of such a response for the server's stall timeout is cut
/// off, so that what it holds goes to them.
pub trait Hold: Send + Sync {
    /// Whether something else is waiting until this is let go.
    fn wanted(&self) -> bool;
}

/// Bytes sent as they are right after a response line, for a client that
/// asked for them so (bulk data without base64: a quarter fewer bytes and no
/// encoding on either side). The result says how many follow; the writer
/// sends them whole or closes the connection.
pub trait Trailer: Send {
    /// The next bytes to send, or `None` after the last.
    fn next_bytes(&mut self) -> Option<&[u8]>;
}

/// The JSON text of a raw method's result value, the bytes to send after
/// its line if any, and whatever must stay alive until it is written (e.g.
/// a share of a memory budget).
pub struct RawResult {
    pub json: Body,
    pub trailer: Option<Box<dyn Trailer>>,
    pub hold: Option<Box<dyn Hold>>,
}

impl RawResult {
    pub fn new(json: Vec<u8>) -> RawResult {
        RawResult {
            json: Body::Bytes(json),
            trailer: None,
            hold: None,
        }
    }

    /// A result whose text `source` produces while it is written.
    pub fn streamed(source: Box<dyn BodySource>) -> RawResult {
        RawResult {
            json: Body::Parts(source),
            trailer: None,
            hold: None,
        }
    }

    /// Sends `trailer` right after the response line.
    pub fn with_trailer(mut self, trailer: Box<dyn Trailer>) -> RawResult {
        self.trailer = Some(trailer);
        self
    }

    /// Keeps `hold` alive until the response line has been written.
    pub fn holding(mut self, hold: impl Hold + 'static) -> RawResult {
        self.hold = Some(Box::new(hold));
        self
    }
}

pub type RawFuture = Pin<Box<dyn Future<Output = Result<RawResult, ErrorObjectOwned>> + Send>>;
type RawHandler = Arc<dyn Fn(Params<'static>, Call) -> RawFuture + Send + Sync>;

/// Who calls a raw method, and how.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub conn: ConnectionId,
    /// The request is part of a batch, whose answers share one line: a
    /// method that would send data after its answer line must refuse it
    /// with [`raw_in_batch`] before it does anything (a stream read would
    /// lose its data).
    pub in_batch: bool,
}

/// The error of a request for data after its answer line (`"encoding":
/// "raw"`) inside a batch.
pub fn raw_in_batch() -> ErrorObjectOwned {
    ErrorObjectOwned::owned::<()>(super::codes::INVALID_PARAMS, RAW_IN_BATCH, None)
}

pub(super) const RAW_IN_BATCH: &str = "Invalid params: data sent after the answer line \
     (\"encoding\": \"raw\") cannot be part of a batch";
type IdleExempt = fn(&Params<'_>) -> bool;
type CloseHook = Arc<dyn Fn(ConnectionId) + Send + Sync>;

/// Largest response a jsonrpsee method may produce; bulk data goes through
/// raw methods instead.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The name of the one method the gate implements itself.
pub const AUTHENTICATE: &str = "authenticate";

pub struct Router {
    methods: Methods,
    raw: HashMap<&'static str, RawHandler>,
    idle_exempt: HashMap<&'static str, IdleExempt>,
    close_hooks: Vec<CloseHook>,
}

/// What a method call produced.
pub enum Outcome {
    /// The result value, as a raw method returns it.
    Result(RawResult),
    /// JSON text of an error object.
    Error(String),
}

impl Outcome {
    pub fn error(e: ErrorObjectOwned) -> Outcome {
        Outcome::Error(
            serde_json::to_string(&e)
                .unwrap_or_else(|_| format!("{{\"code\":{},\"message\":\"error\"}}", e.code())),
        )
    }
}

impl Router {
    pub fn new(methods: impl Into<Methods>) -> Router {
        Router {
            methods: methods.into(),
            raw: HashMap::new(),
            idle_exempt: HashMap::new(),
            close_hooks: Vec::new(),
        }
    }

    /// Registers a method whose handler returns ready-made result JSON.
    pub fn register_raw<F, Fut>(&mut self, name: &'static str, handler: F)
    where
        F: Fn(Params<'static>, Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<RawResult, ErrorObjectOwned>> + Send + 'static,
    {
        self.raw
            .insert(name, Arc::new(move |p, c| Box::pin(handler(p, c))));
    }

    /// Calls of `name` for which `exempt(params)` holds do not reset the idle
    /// watchdog.
    pub fn set_idle_exempt(&mut self, name: &'static str, exempt: IdleExempt) {
        self.idle_exempt.insert(name, exempt);
    }

    /// Runs `hook` with the id of every connection that closes.
    pub fn on_connection_closed(&mut self, hook: impl Fn(ConnectionId) + Send + Sync + 'static) {
        self.close_hooks.push(Arc::new(hook));
    }

    /// Every method name a client can call, sorted.
    pub fn method_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .methods
            .method_names()
            .chain(self.raw.keys().copied())
            .chain([AUTHENTICATE])
            .map(String::from)
            .collect();
        names.sort();
        names
    }

    pub(super) fn resets_watchdog(&self, method: &str, params: Option<&RawValue>) -> bool {
        match self.idle_exempt.get(method) {
            Some(exempt) => !exempt(&Params::new(params.map(RawValue::get))),
            None => true,
        }
    }

    pub(super) fn connection_closed(&self, conn: ConnectionId) {
        for hook in &self.close_hooks {
            hook(conn);
        }
    }

    /// Calls a method; a panicking handler becomes an internal error instead
    /// of a request that is never answered.
    pub(super) async fn call(
        &self,
        method: &str,
        params: Option<&RawValue>,
        call: Call,
        ext: &Extensions,
    ) -> Outcome {
        let call = self.dispatch(method, params, call, ext);
        match AssertUnwindSafe(call).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(_) => {
                log::error!("method {method} panicked");
                Outcome::error(internal(format!("internal error in {method}")))
            }
        }
    }

    async fn dispatch(
        &self,
        method: &str,
        params: Option<&RawValue>,
        call: Call,
        ext: &Extensions,
    ) -> Outcome {
        let params = Params::new(params.map(RawValue::get));
        let conn = call.conn;
        if let Some(handler) = self.raw.get(method) {
            return match handler(params.into_owned(), call).await {
                Ok(result) => Outcome::Result(result),
                Err(e) => Outcome::error(e),
            };
        }
        // jsonrpsee never sees the real id (it only knows u64 ids); the
        // response is unwrapped and re-enveloped under the client's id.
        let id = JsonrpseeId::Number(0);
        let response = match self.methods.method(method) {
            Some(MethodCallback::Sync(cb)) => cb(id, params, MAX_RESPONSE_BYTES, ext.clone()),
            Some(MethodCallback::Async(cb)) => {
                cb(
                    id,
                    params.into_owned(),
                    conn,
                    MAX_RESPONSE_BYTES,
                    ext.clone(),
                )
                .await
            }
            // Subscriptions are not part of this protocol.
            Some(_) | None => {
                return Outcome::error(ErrorObjectOwned::owned(
                    METHOD_NOT_FOUND,
                    "Method not found",
                    Some(method),
                ))
            }
        };
        unwrap_response(response.into_json().get())
    }
}

/// Takes the `result` or `error` member out of a jsonrpsee response.
fn unwrap_response(json: &str) -> Outcome {
    #[derive(Deserialize)]
    struct Response<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        result: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        error: Option<&'a RawValue>,
    }
    match serde_json::from_str::<Response>(json) {
        Ok(Response {
            result: Some(r), ..
        }) => Outcome::Result(RawResult::new(r.get().as_bytes().to_vec())),
        Ok(Response { error: Some(e), .. }) => Outcome::Error(e.get().to_string()),
        _ => Outcome::error(internal("malformed method response")),
    }
}
