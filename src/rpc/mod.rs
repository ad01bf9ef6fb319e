//! JSON-RPC 2.0 over lines: envelope validation, the authentication gate,
//! dispatch to the method registry, and every per-connection limit.
//!
//! It owns the wire contract (ids, batches, notifications, error codes) and the
//! server lifecycle (connection accounting, idle watchdog, shutdown). Method
//! handlers live in `api`; this layer must never implement one beyond
//! `authenticate`, which is part of the gate.

pub mod auth;
pub mod codes;
mod connection;
pub mod envelope;
pub mod router;
pub mod server;

pub use router::{raw_in_batch, Body, BodySource, Call, Hold, RawResult, Router, Trailer};
pub use server::{Server, ServerConfig, Shared};
