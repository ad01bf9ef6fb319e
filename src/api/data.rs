//! Datastore methods: `snapshot.list`, `image.read` and `blob.read`.

use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::RpcModule;
use serde::Deserialize;
use std::sync::Arc;

use super::bulk::{self, Encoding, Piece, MAX_READ};
use super::{must, Agent};
use crate::pool::ArchiveReader;
use crate::rpc::codes::{app_error, invalid_params};
use crate::rpc::{Call, RawResult, Router};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    snapshot: String,
    archive: String,
    offset: u64,
    length: u64,
    #[serde(default)]
    encoding: Encoding,
}

/// Largest blob `blob.read` returns, decoded: a VM's configuration or a
/// backup's log is far smaller, and the answer is held whole (and as
/// base64) in a VM of 128 MiB.
const MAX_BLOB: usize = 4 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobParams {
    snapshot: String,
    archive: String,
}

pub(super) fn register(module: &mut RpcModule<Arc<Agent>>) {
    must(
        module.register_blocking_method("blob.read", |params, agent, _| {
            let p: BlobParams = params.parse()?;
            let data = agent
                .backups
                .read_blob(&p.snapshot, &p.archive, MAX_BLOB)
                .map_err(app_error)?;
            Ok::<_, ErrorObjectOwned>(serde_json::json!({
                "size": data.len(),
                "data": base64_simd::STANDARD.encode_to_string(&data),
            }))
        }),
    );
    must(
        module.register_blocking_method("snapshot.list", |params, agent, _| {
            let p: ListParams = if params.as_str().is_some() {
                params.parse()?
            } else {
                ListParams { namespace: None }
            };
            let snapshots = agent
                .backups
                .list_snapshots(p.namespace.as_deref())
                .map_err(app_error)?;
            Ok::<_, ErrorObjectOwned>(serde_json::json!({ "snapshots": snapshots }))
        }),
    );
}

pub(super) fn register_raw(router: &mut Router, agent: Arc<Agent>) {
    router.register_raw("image.read", move |params, call| {
        image_read(agent.clone(), params, call)
    });
}

async fn image_read(
    agent: Arc<Agent>,
    params: Params<'static>,
    call: Call,
) -> Result<RawResult, ErrorObjectOwned> {
    let p: ReadParams = params.parse()?;
    bulk::refuse_raw_in_batch(call, p.encoding)?;
    if p.length > MAX_READ {
        return Err(invalid_params(format!(
            "length {} is over the limit of {MAX_READ}",
            p.length
        )));
    }
    let reader = agent.reader(call.conn, &p.snapshot, &p.archive)?;
    let length = usize::try_from(p.length).unwrap_or(usize::MAX);
    let hold = agent.budget.reserve(call.conn, length).await;
    read_response(&reader, p.offset, length, hold, p.encoding).await
}

/// Reads `[offset, offset + length)` of an archive (clamped at its end) into
/// a read result holding `hold` of the budget.
async fn read_response(
    reader: &ArchiveReader,
    offset: u64,
    length: usize,
    hold: Option<bulk::Hold>,
    encoding: Encoding,
) -> Result<RawResult, ErrorObjectOwned> {
    let slices = reader
        .read_slices(offset, length)
        .await
        .map_err(app_error)?;
    let read: u64 = slices.iter().map(|s| s.range.len() as u64).sum();
    let eof = offset.saturating_add(read) >= reader.size();
    let pieces = slices.into_iter().map(Piece::Chunk).collect();
    Ok(bulk::read_result(offset, eof, pieces, hold, encoding))
}
