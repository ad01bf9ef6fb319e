//! Transport: where connections come from and how bytes become lines.
//!
//! Owns the listen addresses (`vsock`, `unix`, `tcp`, `stdio`), the listeners that
//! accept byte streams on them, and the line framing. It knows bytes and peers,
//! never JSON-RPC: it must not parse messages or know any method name.

pub mod addr;
pub mod framing;
pub mod listener;
pub mod meter;
pub mod shortage;

pub use addr::ListenAddr;
pub use framing::{Frame, LineDecoder};
pub use listener::{Connection, Listener};
pub use meter::{Meter, Metered};
pub use shortage::ShortageRetry;
