//! What can go wrong on the client side, and the exit code each failure maps to.

use std::fmt;

/// A client failure. The agent's own errors keep their JSON-RPC code.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientError {
    /// The agent answered with a JSON-RPC error object.
    Agent {
        code: i32,
        message: String,
        data: Option<serde_json::Value>,
    },
    /// A `store` command (run here, without an agent) failed; the code is
    /// the one the agent gives for the same failure.
    Store { code: i32, message: String },
    /// The agent could not be reached, or the connection broke.
    Connection(String),
    /// A local failure: a file that cannot be written, an unsafe name from the
    /// agent, a response that does not fit the protocol.
    Local(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl ClientError {
    /// The process exit code: 1 when the agent (or the datastore, for
    /// `store` commands) reported an error, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Agent { .. } | ClientError::Store { .. } => 1,
            ClientError::Connection(_) | ClientError::Local(_) => 2,
        }
    }

    /// The agent's error code, if the agent (or the datastore) gave one.
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Agent { code, .. } | ClientError::Store { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn local(message: impl Into<String>) -> Self {
        ClientError::Local(message.into())
    }

    pub fn connection(message: impl Into<String>) -> Self {
        ClientError::Connection(message.into())
    }

    /// This error as the JSON document printed with `--output json`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ClientError::Agent {
                code,
                message,
                data,
            } => {
                let mut e = serde_json::json!({ "code": code, "message": message });
                if let Some(d) = data {
                    e["data"] = d.clone();
                }
                serde_json::json!({ "error": e })
            }
            ClientError::Store { code, message } => {
                serde_json::json!({ "error": { "code": code, "message": message } })
            }
            ClientError::Connection(m) => {
                serde_json::json!({ "error": { "kind": "connection", "message": m } })
            }
            ClientError::Local(m) => {
                serde_json::json!({ "error": { "kind": "local", "message": m } })
            }
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Agent {
                code,
                message,
                data,
            } => {
                write!(f, "agent error {code}: {message}")?;
                match data {
                    Some(serde_json::Value::String(s)) => write!(f, " ({s})"),
                    Some(d) => write!(f, " ({d})"),
                    None => Ok(()),
                }
            }
            ClientError::Store { code, message } => write!(f, "store error {code}: {message}"),
            // its messages say what failed ("connection to the agent lost:
            // ...", "cannot connect to ..."): no prefix to say it twice
            ClientError::Connection(m) => f.write_str(m),
            ClientError::Local(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<jsonrpsee::core::client::Error> for ClientError {
    fn from(e: jsonrpsee::core::client::Error) -> Self {
        use jsonrpsee::core::client::Error as E;
        match e {
            E::Call(obj) => ClientError::Agent {
                code: obj.code(),
                message: obj.message().to_string(),
                data: obj.data().and_then(|d| serde_json::from_str(d.get()).ok()),
            },
            E::RestartNeeded(inner) => {
                ClientError::Connection(format!("connection to the agent lost: {inner}"))
            }
            E::ParseError(err) => {
                ClientError::Local(format!("unexpected answer from the agent: {err}"))
            }
            E::RequestTimeout => ClientError::Connection(
                "the agent did not answer in time (request timed out)".into(),
            ),
            other => ClientError::Connection(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClientError;

    /// A connection failure is shown as its message alone: the message
    /// says what failed ("connection: connection to the agent lost" said
    /// it twice).
    #[test]
    fn connection_errors_show_their_message_once() {
        let e = ClientError::connection(
            "connection to the agent lost: the agent closed the connection",
        );
        assert_eq!(
            e.to_string(),
            "connection to the agent lost: the agent closed the connection"
        );
        assert_eq!(e.exit_code(), 2);
        assert_eq!(e.to_json()["error"]["kind"], "connection");
    }
}
