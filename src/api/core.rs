//! The core methods: `ping`, `status`, `stop` and `rpc.discover`.

use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::RpcModule;
use serde::Deserialize;
use std::sync::Arc;

use super::{must, Agent};
use crate::rpc::Router;

/// The OpenRPC document describing this protocol.
pub const OPENRPC: &str = include_str!("../../schema/openrpc.json");

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatusParams {
    #[serde(default)]
    keep_timeout: bool,
}

fn status_params(params: &Params<'_>) -> Result<StatusParams, ErrorObjectOwned> {
    if params.as_str().is_none() {
        return Ok(StatusParams::default());
    }
    params.parse()
}

pub(super) fn register(module: &mut RpcModule<Arc<Agent>>) {
    must(module.register_method("ping", |_, _, _| "pong"));
    must(module.register_method("status", |params, agent, _| {
        status_params(&params)?;
        Ok::<_, ErrorObjectOwned>(status(agent))
    }));
    must(module.register_method("stop", |_, agent, _| {
        log::info!("stop requested");
        agent.shared.shutdown();
        serde_json::json!({ "stopping": true })
    }));
    must(module.register_method("rpc.discover", |_, _, _| {
        // The file is pretty-printed for people; parsing it and letting the
        // result be serialized again makes it the one compact line the wire
        // needs (a raw copy would carry its newlines into the response).
        serde_json::from_str::<serde_json::Value>(OPENRPC)
            .map_err(|e| crate::rpc::codes::internal(format!("embedded OpenRPC document: {e}")))
    }));
}

pub(super) fn register_rules(router: &mut Router) {
    router.set_idle_exempt("status", |params| {
        status_params(params)
            .map(|p| p.keep_timeout)
            .unwrap_or(false)
    });
}

fn status(agent: &Agent) -> serde_json::Value {
    let server = agent.shared.stats();
    let pool = agent.backups.pool().stats();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "uptime_s": server.uptime_s,
        "connections": server.connections,
        "connections_total": server.connections_total,
        "requests_served": server.requests_served,
        "idle_timeout_s": server.idle_timeout_s,
        "idle_remaining_s": server.idle_remaining_s,
        "rss_bytes": rss_bytes(),
        "cache": pool.cache,
        "pool": { "workers": pool.workers, "queued": pool.queued, "reads": pool.reads, "zero_reads": pool.zero_reads },
        "streams": {
            "open": agent.streams.open_count(),
            "in_use": agent.streams.in_use(),
            "max": agent.streams.max(),
        },
    })
}

/// Resident set size from /proc/self/statm (pages).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}
