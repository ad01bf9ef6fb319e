//! The JSON-RPC 2.0 envelope, validated strictly before any dispatch, and the
//! response lines built around it.
//!
//! jsonrpsee's own `Request` type is not used for parsing: it only knows u64
//! ids, and it parses requests with invalid ids as notifications (which would
//! leave the client waiting forever). Ids are kept as their raw JSON text and
//! echoed back byte for byte.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;

use super::codes::{INVALID_REQUEST, PARSE_ERROR};

/// A message as it arrived on one line.
pub enum Message<'a> {
    Single(&'a RawValue),
    Batch(Vec<&'a RawValue>),
}

/// A validated request. `id` is `None` for a notification.
#[derive(Debug)]
pub struct Request<'a> {
    pub id: Option<Id>,
    pub method: Cow<'a, str>,
    pub params: Option<&'a RawValue>,
}

/// A request id as its raw JSON text: a string, an integer or `null`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Id(Box<str>);

impl Id {
    pub fn null() -> Id {
        Id("null".into())
    }
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// Accepts strings, null and integers in the i64 or u64 range; anything
    /// else (fractions, exponents, objects, arrays, bools) is not an id.
    fn from_raw(raw: &RawValue) -> Option<Id> {
        let text = raw.get();
        let ok = match text.as_bytes().first()? {
            b'"' => true,
            b'n' => text == "null",
            b'-' | b'0'..=b'9' => {
                let digits = text.strip_prefix('-').unwrap_or(text);
                !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && (text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok())
            }
            _ => false,
        };
        ok.then(|| Id(text.into()))
    }
}

/// Why a message could not be turned into a request: the error to answer
/// with, and the id to answer it under.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    pub id: Id,
    pub code: i32,
    pub message: &'static str,
}

impl Rejection {
    fn parse() -> Self {
        Rejection {
            id: Id::null(),
            code: PARSE_ERROR,
            message: "Parse error",
        }
    }
    fn invalid(id: Id, message: &'static str) -> Self {
        Rejection {
            id,
            code: INVALID_REQUEST,
            message,
        }
    }
}

/// Splits a line into one message or a batch; `Err` is a -32700 parse error.
pub fn parse_message(line: &[u8]) -> Result<Message<'_>, Rejection> {
    let text = std::str::from_utf8(line).map_err(|_| Rejection::parse())?;
    let raw: &RawValue = serde_json::from_str(text).map_err(|_| Rejection::parse())?;
    if raw.get().starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(raw.get()).map_err(|_| Rejection::parse())?;
        Ok(Message::Batch(items))
    } else {
        Ok(Message::Single(raw))
    }
}

/// Deserializes a present member, `null` included, as `Some`; absence is `None`
/// (through `#[serde(default)]`). This is how `"id": null` differs from no id.
pub(super) fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
}

/// Validates one request object of the JSON-RPC 2.0 specification.
pub fn parse_request(raw: &RawValue) -> Result<Request<'_>, Rejection> {
    if !raw.get().starts_with('{') {
        return Err(Rejection::invalid(
            Id::null(),
            "Invalid Request: not an object",
        ));
    }
    let env: Envelope = serde_json::from_str(raw.get())
        .map_err(|_| Rejection::invalid(Id::null(), "Invalid Request: duplicate member"))?;
    let id = match env.id {
        None => None,
        Some(raw_id) => Some(Id::from_raw(raw_id).ok_or_else(|| {
            Rejection::invalid(
                Id::null(),
                "Invalid Request: id must be a string, an integer or null",
            )
        })?),
    };
    let reply_id = || id.clone().unwrap_or_else(Id::null);
    if env.jsonrpc.map(RawValue::get) != Some("\"2.0\"") {
        return Err(Rejection::invalid(
            reply_id(),
            "Invalid Request: jsonrpc must be \"2.0\"",
        ));
    }
    let method: Cow<str> = env
        .method
        .and_then(|m| serde_json::from_str(m.get()).ok())
        .ok_or_else(|| {
            Rejection::invalid(reply_id(), "Invalid Request: method must be a string")
        })?;
    if let Some(p) = env.params {
        if !(p.get().starts_with('{') || p.get().starts_with('[')) {
            return Err(Rejection::invalid(
                reply_id(),
                "Invalid Request: params must be an object or an array",
            ));
        }
    }
    Ok(Request {
        id,
        method,
        params: env.params,
    })
}

/// `{"jsonrpc":"2.0","id":<id>,"result":` — the part of a success line before
/// its result.
pub fn result_head(id: &Id) -> Vec<u8> {
    let mut head = Vec::with_capacity(40 + id.0.len());
    head.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    head.extend_from_slice(id.0.as_bytes());
    head.extend_from_slice(b",\"result\":");
    head
}

/// A complete success response (without the newline).
pub fn result_line(id: &Id, result: &str) -> Vec<u8> {
    let mut line = result_head(id);
    line.extend_from_slice(result.as_bytes());
    line.push(b'}');
    line
}

/// A complete error response from a raw JSON error object.
pub fn error_object_line(id: &Id, error: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(40 + id.0.len() + error.len());
    line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    line.extend_from_slice(id.0.as_bytes());
    line.extend_from_slice(b",\"error\":");
    line.extend_from_slice(error.as_bytes());
    line.push(b'}');
    line
}

/// A complete error response.
pub fn error_line(id: &Id, code: i32, message: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct ErrorObject<'a> {
        code: i32,
        message: &'a str,
    }
    let obj = serde_json::to_string(&ErrorObject { code, message })
        .unwrap_or_else(|_| format!("{{\"code\":{code},\"message\":\"error\"}}"));
    error_object_line(id, &obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<(Option<String>, String, Option<String>), Rejection> {
        let raw: &RawValue = serde_json::from_str(s).unwrap();
        parse_request(raw).map(|r| {
            (
                r.id.map(|i| i.as_json().to_string()),
                r.method.into_owned(),
                r.params.map(|p| p.get().to_string()),
            )
        })
    }

    #[test]
    fn ids_are_echoed_exactly() {
        for id in [
            "1",
            "0",
            "-1",
            "-9223372036854775808",
            "18446744073709551615",
            "\"a\\u0062\"",
            "null",
        ] {
            let got = req(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"x"}}"#)).unwrap();
            assert_eq!(got.0.as_deref(), Some(id));
        }
    }

    #[test]
    fn bad_ids_are_rejected_with_null() {
        for id in [
            "1.5",
            "1e3",
            "{}",
            "[]",
            "true",
            "18446744073709551616",
            "-9223372036854775809",
        ] {
            let got = req(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"x"}}"#)).unwrap_err();
            assert_eq!((got.id, got.code), (Id::null(), INVALID_REQUEST), "{id}");
        }
    }

    #[test]
    fn notification_is_the_absence_of_id() {
        assert_eq!(req(r#"{"jsonrpc":"2.0","method":"x"}"#).unwrap().0, None);
    }

    #[test]
    fn envelope_rules() {
        let e = req(r#"{"jsonrpc":"1.0","id":7,"method":"x"}"#).unwrap_err();
        assert_eq!((e.id.as_json(), e.code), ("7", INVALID_REQUEST));
        let e = req(r#"{"jsonrpc":"2.0","id":7,"method":"x","params":"bar"}"#).unwrap_err();
        assert_eq!((e.id.as_json(), e.code), ("7", INVALID_REQUEST));
        let e = req(r#"{"jsonrpc":"2.0","id":7,"method":1}"#).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        let e = req(r#"{"jsonrpc":"2.0","id":7}"#).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        assert!(req(r#"{"jsonrpc":"2.0","id":7,"method":"x","params":[1]}"#).is_ok());
        let e = parse_message(b"{\"jsonrpc\"").err().unwrap();
        assert_eq!(e.code, PARSE_ERROR);
        let e = parse_message(b"\xff\xfe").err().unwrap();
        assert_eq!(e.code, PARSE_ERROR);
    }
}
