//! restore-agent: a file-restore daemon speaking newline-delimited JSON-RPC 2.0.
//!
//! Layers, each importing only the ones below it:
//! `transport` -> `rpc` -> `api` -> `restore` -> `pool` -> `store`, with
//! `error` shared by all. `client` sits on `transport` and `rpc` framing.

pub mod api;
pub mod base64;
pub mod calendar;
pub mod client;
pub mod demo;
pub mod error;
pub mod init;
pub mod le;
pub mod pool;
pub mod restore;
pub mod rpc;
pub mod store;
#[cfg(test)]
mod testing;
pub mod transport;
pub mod vm;
