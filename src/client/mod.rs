//! The host-side client library: how `restore-client` (or any Rust program)
//! reaches an agent and calls its methods.
//!
//! It owns connect addresses (`vsock`, `unix`, `tcp`, `hybrid`, `exec`), the
//! hybrid-vsock handshake, the authenticated jsonrpsee session over our own
//! line transport, and pipelined bulk reads. It sits on `transport` (line
//! framing), `rpc` (error codes) and the `base64` codec only: it must never import `api` or any
//! layer below it, so that it speaks to the agent exactly as a remote program
//! would.

pub mod addr;
pub mod bulk;
mod connect;
pub mod error;
pub mod frames;
mod lines;
pub mod session;

pub use addr::ConnectAddr;
pub use error::ClientError;
pub use session::{ConnectOptions, Session};
