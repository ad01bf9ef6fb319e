//! Method handlers: what each protocol method does, in terms of the layers
//! below (`restore`, `pool`, `store`) and the server state from `rpc`.
//!
//! Handlers validate their params and map failures to the pinned error codes;
//! they must never touch framing, ids or authentication.

mod core;

use jsonrpsee::RpcModule;
use std::sync::Arc;

use crate::rpc::{Router, Shared};

/// What every handler can reach.
pub struct Agent {
    pub shared: Arc<Shared>,
}

/// Builds the router holding every method of the protocol.
pub fn router(agent: Agent) -> Router {
    let mut module = RpcModule::new(agent);
    core::register(&mut module);
    let mut router = Router::new(module);
    core::register_rules(&mut router);
    router
}

/// Registration cannot fail for distinct static names; a clash is a bug in
/// this module, caught by every test that starts the agent.
fn must<T, E: std::fmt::Debug>(r: Result<T, E>) {
    if let Err(e) = r {
        panic!("method registration: {e:?}");
    }
}
