//! The pinned error codes of the protocol and conversions into error objects.

use crate::error::Error;
use jsonrpsee::types::ErrorObjectOwned;

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;
pub const AUTH_REQUIRED: i32 = -32001;
pub const AUTH_FAILED: i32 = -32002;
pub const LIMIT_REACHED: i32 = -32003;
pub const SHUTTING_DOWN: i32 = -32004;

/// An application error as a JSON-RPC error object (codes 1001..1008). A
/// failed archive member is named in `data`: `member` (lossy UTF-8) and
/// `resume`, the token for `fs.extract` to go on after it.
pub fn app_error(e: Error) -> ErrorObjectOwned {
    let data = e.member.map(|m| {
        serde_json::json!({
            "member": String::from_utf8_lossy(&m),
            "resume": base64_simd::STANDARD.encode_to_string(&m),
        })
    });
    ErrorObjectOwned::owned(e.kind.code(), e.message, data)
}

/// A `-32602` error whose `data` says what is wrong with the params.
pub fn invalid_params(what: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(INVALID_PARAMS, "Invalid params", Some(what.into()))
}

pub fn limit_reached(what: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned::<()>(LIMIT_REACHED, what.into(), None)
}

pub fn internal(what: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned::<()>(INTERNAL_ERROR, what.into(), None)
}
