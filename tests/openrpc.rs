//! The protocol's machine-readable description, checked from every side:
//! `schema/openrpc.json` against the OpenRPC meta-schema, against the methods
//! the agent really registers, and against what a running agent answers;
//! `schema/request.schema.json` and `schema/response.schema.json` against
//! real request and response lines.
//!
//! The meta-schema is a third-party file fetched by
//! `scripts/fetch-openrpc-meta-schema.sh` into `target/`; without it the
//! meta-schema test fails rather than skipping.

use jsonschema::{Draft, Validator};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TICKET: &str = "openrpc-test-ticket";
const META_SCHEMA: &str = "target/openrpc-meta-schema.json";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn load(rel: &str) -> Value {
    let path = repo_file(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn document() -> Value {
    load("schema/openrpc.json")
}

fn draft7(schema: &Value) -> Validator {
    jsonschema::options()
        .with_draft(Draft::Draft7)
        .build(schema)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema:#}"))
}

/// Every way `instance` fails `validator`, one line each.
fn violations(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("at {:?}: {e}", e.instance_path().as_str()))
        .collect()
}

fn assert_valid(validator: &Validator, instance: &Value, what: &str) {
    let errors = violations(validator, instance);
    assert!(
        errors.is_empty(),
        "{what} is invalid:\n  {}\n{instance}",
        errors.join("\n  ")
    );
}

/// The OpenRPC meta-schema as fetched, made resolvable offline.
fn meta_schema_validator() -> Validator {
    let path = repo_file(META_SCHEMA);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the OpenRPC meta-schema is missing ({}: {e}); \
             run scripts/fetch-openrpc-meta-schema.sh first",
            path.display()
        )
    });
    let mut meta: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    // The meta-schema names its dialect, and refers to the schema of JSON
    // Schemas, by URLs of json-schema.tools that cannot be fetched here. That
    // schema is draft 7, which the validator knows built in: force the
    // dialect and point those refs at the built-in draft-07 meta-schema.
    let Some(obj) = meta.as_object_mut() else {
        panic!("{} is not a JSON object", path.display())
    };
    obj.remove("$schema");
    redirect_refs(&mut meta);
    draft7(&meta)
}

/// Rewrites the meta-schema's refs to json-schema.tools into refs to the
/// built-in draft-07 meta-schema; any other external ref fails the test, so a
/// new meta-schema release cannot silently weaken the check.
fn redirect_refs(v: &mut Value) {
    const DRAFT7: &str = "http://json-schema.org/draft-07/schema#";
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref") {
                let to = match r.as_str() {
                    "https://meta.json-schema.tools" | "https://meta.json-schema.tools/" => {
                        Some(DRAFT7.to_string())
                    }
                    "https://meta.json-schema.tools/#/definitions/JSONSchemaObject/properties/$ref" => {
                        Some(format!("{DRAFT7}/properties/$ref"))
                    }
                    local if local.starts_with('#') => None,
                    other => panic!("the meta-schema refers to {other}; teach redirect_refs about it"),
                };
                if let Some(to) = to {
                    *r = to;
                }
            }
            map.values_mut().for_each(redirect_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(redirect_refs),
        _ => {}
    }
}

fn methods(doc: &Value) -> &Vec<Value> {
    doc["methods"].as_array().expect("methods is an array")
}

fn method_index(doc: &Value, name: &str) -> usize {
    methods(doc)
        .iter()
        .position(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("method {name} is not in the document"))
}

/// Follows a local `$ref` (`#/...`) inside the document.
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {r}"));
            doc.pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        None => v,
    }
}

/// The error codes the document lists for `method`.
fn documented_codes(doc: &Value, method: &str) -> BTreeSet<i64> {
    let m = &methods(doc)[method_index(doc, method)];
    m["errors"]
        .as_array()
        .map(|errs| {
            errs.iter()
                .map(|e| {
                    deref(doc, e)["code"]
                        .as_i64()
                        .unwrap_or_else(|| panic!("{method}: error without an integer code"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A validator for the schema at `pointer` inside the document, compiled
/// with the document as its root so that `#/components/...` refs resolve.
fn embedded_schema(doc: &Value, pointer: &str) -> Result<Validator, String> {
    let schema = doc
        .pointer(pointer)
        .ok_or_else(|| format!("no schema at {pointer}"))?;
    jsonschema::draft7::meta::validate(schema)
        .map_err(|e| format!("{pointer} is not a draft-07 JSON Schema: {e}"))?;
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#{pointer}"));
    jsonschema::options()
        .with_draft(Draft::Draft7)
        .build(&root)
        .map_err(|e| format!("{pointer} does not compile: {e}"))
}

fn result_schema(doc: &Value, method: &str) -> Validator {
    let i = method_index(doc, method);
    embedded_schema(doc, &format!("/methods/{i}/result/schema")).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `$ref` anywhere in `v`.
fn collect_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r);
            }
            map.values().for_each(|x| collect_refs(x, out));
        }
        Value::Array(items) => items.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

#[test]
fn document_is_valid_openrpc() {
    let meta = meta_schema_validator();
    let doc = document();
    assert_valid(&meta, &doc, "schema/openrpc.json");
    assert_eq!(doc["info"]["title"], "restore-agent");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    // The check has teeth: broken documents are refused.
    let mut no_params = doc.clone();
    no_params["methods"][0]
        .as_object_mut()
        .map(|m| m.remove("params"));
    assert!(!meta.is_valid(&no_params), "a method without params passed");
    let mut bad_schema = doc.clone();
    bad_schema["methods"][0]["result"]["schema"] = json!({"type": 5});
    assert!(!meta.is_valid(&bad_schema), "an invalid JSON Schema passed");
    let mut bad_version = doc;
    bad_version["openrpc"] = json!("9.9.9");
    assert!(
        !meta.is_valid(&bad_version),
        "an unknown OpenRPC version passed"
    );
}

#[test]
fn documented_methods_are_the_registered_methods() {
    let pool = restore_agent::pool::ChunkPool::new(Default::default());
    let backups = restore_agent::restore::backups::Backups::open(None, Vec::new(), pool)
        .expect("an empty set of backups");
    let router = restore_agent::api::router(restore_agent::api::Agent::new(
        restore_agent::rpc::Shared::new(None),
        backups,
    ));
    let registered = router.method_names();
    let doc = document();
    let mut documented: Vec<String> = methods(&doc)
        .iter()
        .map(|m| m["name"].as_str().expect("method name").to_string())
        .collect();
    documented.sort();
    let unique: BTreeSet<&String> = documented.iter().collect();
    assert_eq!(unique.len(), documented.len(), "duplicate method names");
    assert_eq!(
        documented, registered,
        "schema/openrpc.json and the agent's methods differ"
    );
}

#[test]
fn every_embedded_schema_compiles() {
    let doc = document();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for r in refs {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
    let mut checked = 0;
    for (i, m) in methods(&doc).iter().enumerate() {
        let name = &m["name"];
        let params = m["params"].as_array().expect("params is an array");
        for (j, p) in params.iter().enumerate() {
            assert!(
                p.get("$ref").is_none(),
                "{name}: inline the param descriptors"
            );
            embedded_schema(&doc, &format!("/methods/{i}/params/{j}/schema"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            checked += 1;
        }
        embedded_schema(&doc, &format!("/methods/{i}/result/schema"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        checked += 1;
        let codes = documented_codes(&doc, name.as_str().unwrap_or_default());
        let listed = m["errors"].as_array().map_or(0, Vec::len);
        assert_eq!(codes.len(), listed, "{name}: error codes must be unique");
    }
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    for key in schemas.keys() {
        embedded_schema(&doc, &format!("/components/schemas/{key}"))
            .unwrap_or_else(|e| panic!("{e}"));
        checked += 1;
    }
    assert!(checked > 10, "only {checked} schemas found");

    // Examples, where given, fit their schemas.
    for (i, m) in methods(&doc).iter().enumerate() {
        for ex in m["examples"].as_array().into_iter().flatten() {
            let result = result_schema(&doc, m["name"].as_str().unwrap_or_default());
            assert_valid(
                &result,
                &ex["result"]["value"],
                &format!("example of method {i}"),
            );
        }
    }
}

#[test]
fn line_schemas_accept_good_lines_and_refuse_bad_ones() {
    let request = draft7(&load("schema/request.schema.json"));
    let response = draft7(&load("schema/response.schema.json"));
    for good in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": "a", "method": "status", "params": {"keep_timeout": true}}),
        json!({"jsonrpc": "2.0", "id": null, "method": "authenticate", "params": ["t"]}),
        json!({"jsonrpc": "2.0", "id": 18446744073709551615u64, "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": -9223372036854775808i64, "method": "ping"}),
        json!({"jsonrpc": "2.0", "method": "notify"}),
        json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "method": "n"}]),
    ] {
        assert_valid(&request, &good, "request");
    }
    for bad in [
        json!({"jsonrpc": "1.0", "id": 1, "method": "ping"}),
        json!({"id": 1, "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": 1}),
        json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
        json!({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": {}, "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "bar"}),
        json!([]),
        json!([1]),
        json!(1),
    ] {
        assert!(!request.is_valid(&bad), "request schema accepted {bad}");
    }
    for good in [
        json!({"jsonrpc": "2.0", "id": 1, "result": "pong"}),
        json!({"jsonrpc": "2.0", "id": "x", "result": null}),
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}}),
        json!({"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "Invalid params", "data": "x"}}),
        json!([{"jsonrpc": "2.0", "id": 1, "result": 1}]),
    ] {
        assert_valid(&response, &good, "response");
    }
    for bad in [
        json!({"jsonrpc": "2.0", "id": 1}),
        json!({"jsonrpc": "2.0", "id": 1, "result": 1, "error": {"code": 1, "message": "m"}}),
        json!({"jsonrpc": "2.0", "result": 1}),
        json!({"jsonrpc": "2.0", "id": 1, "error": {"code": 1.5, "message": "m"}}),
        json!({"jsonrpc": "2.0", "id": 1, "error": {"code": 1}}),
        json!({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "m", "x": 1}}),
        json!({"jsonrpc": "2.0", "id": 1, "result": 1, "extra": 1}),
        json!({"jsonrpc": "2.0", "id": [1], "result": 1}),
        json!([]),
    ] {
        assert!(!response.is_valid(&bad), "response schema accepted {bad}");
    }
}

/// A restore-agent process on a Unix socket in a temp dir; killed on drop.
struct RunningAgent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RunningAgent {
    fn start() -> RunningAgent {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&std::ffi::OsStr]) -> RunningAgent {
        let dir = tempfile::tempdir().expect("temp dir");
        let ticket = dir.path().join("ticket");
        std::fs::write(&ticket, format!("{TICKET}\n")).expect("write ticket");
        std::fs::set_permissions(&ticket, std::fs::Permissions::from_mode(0o600))
            .expect("chmod ticket");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--ticket-file")
            .arg(&ticket)
            .args(["--idle-timeout", "0", "--auth-fail-delay-ms", "10"])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start restore-agent");
        let mut agent = RunningAgent {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&agent.socket).is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("restore-agent exited early: {status}");
            }
            assert!(Instant::now() < deadline, "restore-agent did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        Client {
            reader: BufReader::new(stream.try_clone().expect("clone stream")),
            writer: stream,
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "restore-agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Sends one line and reads the one line that answers it.
    fn exchange(&mut self, line: &str) -> Value {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("write request");
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("read response");
        assert!(answer.ends_with('\n'), "no response line to {line}");
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("response to {line} is not one JSON line ({e}): {answer}"))
    }

    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.reader.read_to_end(&mut rest), Ok(0))
    }
}

/// The checks every answer gets: the response line schema, then the method's
/// result schema or its documented error codes.
fn b64(data: &Value) -> Vec<u8> {
    base64_simd::STANDARD
        .decode_to_vec(data.as_str().expect("data is a string"))
        .expect("data is base64")
}

struct Checker {
    doc: Value,
    request: Validator,
    response: Validator,
}

impl Checker {
    fn new() -> Checker {
        Checker {
            doc: document(),
            request: draft7(&load("schema/request.schema.json")),
            response: draft7(&load("schema/response.schema.json")),
        }
    }

    /// Calls `method`, checks the request and the response, returns the response.
    fn call(&self, client: &mut Client, id: Value, method: &str, params: Option<Value>) -> Value {
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        assert_valid(&self.request, &req, "request");
        let resp = client.exchange(&req.to_string());
        assert_valid(&self.response, &resp, &format!("response to {method}"));
        assert_eq!(resp["id"], id, "id not echoed");
        resp
    }

    /// Calls a documented method and checks its result against its schema.
    fn call_ok(&self, client: &mut Client, method: &str, params: Option<Value>) -> Value {
        let resp = self.call(client, json!(method), method, params);
        let Some(result) = resp.get("result") else {
            panic!("{method} failed: {resp}")
        };
        assert_valid(
            &result_schema(&self.doc, method),
            result,
            &format!("result of {method}"),
        );
        result.clone()
    }

    /// Calls a documented method expecting the error `code`, which the
    /// document must list for that method.
    /// Calls a bulk read with `"encoding": "raw"`: checks its line like
    /// `call_ok`, then reads the `length` data bytes that follow the line.
    fn call_raw(&self, client: &mut Client, method: &str, mut params: Value) -> (Value, Vec<u8>) {
        params["encoding"] = json!("raw");
        let result = self.call_ok(client, method, Some(params));
        assert_eq!(result["encoding"], "raw", "{method}: {result}");
        assert!(result.get("data").is_none(), "{method}: {result}");
        let length = result["length"].as_u64().expect("length");
        let mut data = vec![0; length as usize];
        client.reader.read_exact(&mut data).expect("raw data");
        (result, data)
    }

    fn call_err(&self, client: &mut Client, method: &str, params: Option<Value>, code: i64) {
        let resp = self.call(client, json!(7), method, params);
        assert_eq!(resp["error"]["code"], code, "{method}: {resp}");
        assert!(
            documented_codes(&self.doc, method).contains(&code),
            "{method} answered {code}, which schema/openrpc.json does not list for it"
        );
    }
}

#[test]
fn running_agent_answers_as_documented() {
    let check = Checker::new();
    let mut agent = RunningAgent::start();

    // Before authenticate: -32001, then the connection is closed.
    let mut early = agent.connect();
    check.call_err(&mut early, "ping", None, -32001);
    assert!(early.closed(), "connection stayed open after -32001");

    // A wrong ticket: -32002, then closed.
    let mut wrong = agent.connect();
    check.call_err(
        &mut wrong,
        "authenticate",
        Some(json!({"ticket": "nope"})),
        -32002,
    );
    assert!(wrong.closed(), "connection stayed open after -32002");

    let mut c = agent.connect();
    let session = check.call_ok(&mut c, "authenticate", Some(json!([TICKET])));
    assert_eq!(session["version"], env!("CARGO_PKG_VERSION"));
    let again = check.call_ok(&mut c, "authenticate", Some(json!({"ticket": TICKET})));
    assert_eq!(again, session);

    assert_eq!(check.call_ok(&mut c, "ping", None), json!("pong"));
    let status = check.call_ok(&mut c, "status", None);
    // The two refused connections may not be counted out yet: their EOF
    // reaches us just before the agent's bookkeeping.
    assert!(status["connections"].as_u64() >= Some(1), "{status}");
    // Three here, plus the start-up probe.
    assert!(status["connections_total"].as_u64() >= Some(3), "{status}");
    check.call_ok(&mut c, "status", Some(json!({"keep_timeout": true})));
    check.call_ok(&mut c, "status", Some(json!([true])));
    check.call_err(&mut c, "status", Some(json!({"keep": 1})), -32602);

    let discovered = check.call_ok(&mut c, "rpc.discover", None);
    assert_eq!(
        discovered, check.doc,
        "rpc.discover differs from schema/openrpc.json"
    );

    // Protocol-level errors fit the response schema too.
    let unknown = check.call(&mut c, json!(8), "no.such.method", None);
    assert_eq!(unknown["error"]["code"], -32601, "{unknown}");
    for bad in [
        r#"{"jsonrpc":"1.0","id":9,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":9,"method":"ping","params":"bar"}"#,
        r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
    ] {
        let req: Value = serde_json::from_str(bad).expect("test JSON");
        assert!(
            !check.request.is_valid(&req),
            "request schema accepted {bad}"
        );
        let resp = c.exchange(bad);
        assert_valid(&check.response, &resp, bad);
        assert_eq!(resp["error"]["code"], -32600, "{bad}: {resp}");
    }
    let parse = c.exchange("{not json");
    assert_valid(&check.response, &parse, "parse error");
    assert_eq!(parse["error"]["code"], -32700);
    let batch = c.exchange(
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","id":"s","method":"status"}]"#,
    );
    assert_valid(&check.response, &batch, "batch response");
    assert_eq!(batch.as_array().map(Vec::len), Some(2), "{batch}");

    check.call_ok(&mut c, "stop", None);
    let status = agent.wait_exit();
    assert!(
        status.success(),
        "restore-agent exited with {status} after stop"
    );
}

/// The data and file methods, on the demo disk (GPT: ext4 + FAT) imported
/// into a datastore: every result fits its documented schema, every error
/// code is one the document lists.
#[test]
fn data_methods_answer_as_documented() {
    use restore_agent::store::import;
    let check = Checker::new();
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    let disk = base.path().join("disk.img");
    let zst = std::fs::read(repo_file("demo/disk.img.zst")).expect("demo image");
    std::fs::write(&disk, zstd::decode_all(&zst[..]).expect("unzstd")).expect("write disk");
    let store = base.path().join("store");
    import::init(&store).expect("init");
    let snapshot = "vm/100/2026-01-01T00:00:00Z";
    import::import_image(&store, snapshot, "drive-scsi0.img", &disk, &|_, _| {}).expect("import");
    let image_arg = format!("raw0={}", disk.display());
    let mut agent = RunningAgent::start_with(&[
        "--datastore".as_ref(),
        store.as_os_str(),
        "--image".as_ref(),
        image_arg.as_ref(),
    ]);
    let mut c = agent.connect();
    check.call_ok(&mut c, "authenticate", Some(json!({"ticket": TICKET})));

    let snaps = check.call_ok(&mut c, "snapshot.list", None);
    assert_eq!(
        snaps["snapshots"].as_array().map(Vec::len),
        Some(2),
        "{snaps}"
    );
    check.call_ok(&mut c, "snapshot.list", Some(json!({"namespace": ""})));
    let arch = json!({"snapshot": snapshot, "archive": "drive-scsi0.img.fidx"});
    let mut read = arch.clone();
    read["offset"] = json!(1 << 20);
    read["length"] = json!(4096);
    let as_base64 = check.call_ok(&mut c, "image.read", Some(read.clone()));
    // The same bytes raw, then the connection goes on with lines; a newline
    // in the data must not end anything.
    let (raw, data) = check.call_raw(&mut c, "image.read", read.clone());
    assert_eq!(raw["length"], 4096, "{raw}");
    assert_eq!(
        data,
        b64(&as_base64["data"]),
        "image.read raw against base64"
    );
    let mut inside = read.clone();
    inside["encoding"] = json!("raw");
    let batch = c.exchange(
        &json!([{"jsonrpc": "2.0", "id": 1, "method": "image.read", "params": inside}]).to_string(),
    );
    assert_eq!(
        batch[0]["error"]["code"], -32602,
        "raw data inside a batch: {batch}"
    );
    inside["encoding"] = json!("hex");
    check.call_err(&mut c, "image.read", Some(inside), -32602);
    read["length"] = json!((16 << 20) + 1);
    check.call_err(&mut c, "image.read", Some(read), -32602);
    let missing = json!({"snapshot": "vm/1/2026-01-01T00:00:00Z", "archive": "x.img.fidx", "offset": 0, "length": 1});
    check.call_err(&mut c, "image.read", Some(missing), 1001);
    check.call_ok(
        &mut c,
        "image.read",
        Some(json!({"snapshot": "attached", "archive": "raw0", "offset": 0, "length": 512})),
    );

    let vols = check.call_ok(&mut c, "volume.list", Some(arch.clone()));
    assert_eq!(vols["volumes"].as_array().map(Vec::len), Some(2), "{vols}");
    for volume in ["part/1", "part/2"] {
        let mut target = arch.clone();
        target["volume"] = json!(volume);
        target["path"] = json!("/");
        let list = check.call_ok(&mut c, "fs.list", Some(target.clone()));
        assert!(
            list["entries"].as_array().is_some_and(|e| !e.is_empty()),
            "{list}"
        );
        check.call_ok(&mut c, "fs.stat", Some(target.clone()));
        let mut paged = target.clone();
        paged["limit"] = json!(1);
        let page = check.call_ok(&mut c, "fs.list", Some(paged));
        let more = list["entries"].as_array().is_some_and(|e| e.len() > 1);
        assert_eq!(page["next_cursor"].is_string(), more, "{page}");
    }
    let mut file = arch.clone();
    file["volume"] = json!("part/1");
    file["path"] = json!("/etc/motd");
    file["offset"] = json!(0);
    file["length"] = json!(100);
    let as_base64 = check.call_ok(&mut c, "fs.read", Some(file.clone()));
    let (raw, data) = check.call_raw(&mut c, "fs.read", file.clone());
    assert_eq!(raw["eof"], as_base64["eof"], "{raw}");
    assert_eq!(data, b64(&as_base64["data"]), "fs.read raw against base64");
    file["path"] = json!("/etc");
    check.call_err(&mut c, "fs.read", Some(file.clone()), 1003);
    file["path"] = json!("/nope");
    check.call_err(&mut c, "fs.read", Some(file), 1001);
    let mut link = arch.clone();
    link["volume"] = json!("part/1");
    link["path"] = json!("/home/alice/readme-link");
    link["follow"] = json!(true);
    let stat = check.call_ok(&mut c, "fs.stat", Some(link));
    assert_eq!(stat["type"], "file", "{stat}");
    let mut with_xattrs = arch.clone();
    with_xattrs["volume"] = json!("part/1");
    with_xattrs["path"] = json!("/etc/motd");
    with_xattrs["xattrs"] = json!(true);
    let stat = check.call_ok(&mut c, "fs.stat", Some(with_xattrs));
    assert!(stat["xattrs"].is_array(), "{stat}");

    let mut extract = arch.clone();
    extract["volume"] = json!("part/1");
    extract["path"] = json!("/home");
    extract["format"] = json!("tar");
    let handle = check.call_ok(&mut c, "fs.extract", Some(extract.clone()));
    let stream = handle["stream"].clone();
    let mut whole = Vec::new();
    loop {
        let chunk = check.call_ok(&mut c, "stream.read", Some(json!({"stream": stream})));
        whole.extend_from_slice(&b64(&chunk["data"]));
        if chunk["eof"] == json!(true) {
            break;
        }
    }
    // the read that reached the end closed the stream
    check.call_err(&mut c, "stream.read", Some(json!({"stream": stream})), 1008);
    let handle = check.call_ok(&mut c, "fs.extract", Some(extract));
    let stream = handle["stream"].clone();
    check.call_ok(
        &mut c,
        "stream.read",
        Some(json!({"stream": stream, "offset": 0, "length": 10})),
    );
    // refused inside a batch before it runs: offset 10 is still to be read
    let read = json!({"stream": stream, "offset": 10, "length": 300, "encoding": "raw"});
    let batch = c.exchange(
        &json!([{"jsonrpc": "2.0", "id": 1, "method": "stream.read", "params": read}]).to_string(),
    );
    assert_eq!(batch[0]["error"]["code"], -32602, "{batch}");
    // ... also with its params by position (it used to run, and its data
    // was lost with the refusal)
    let batch = c.exchange(
        &json!([{"jsonrpc": "2.0", "id": 2, "method": "stream.read",
            "params": [stream, 300, 10, "raw"]}])
        .to_string(),
    );
    assert_eq!(batch[0]["error"]["code"], -32602, "{batch}");
    let (raw, data) = check.call_raw(
        &mut c,
        "stream.read",
        json!({"stream": stream, "offset": 10, "length": 300}),
    );
    assert_eq!(raw["offset"], 10, "{raw}");
    assert_eq!(data, whole[10..310], "stream.read raw against base64");
    check.call_ok(&mut c, "stream.close", Some(json!({"stream": stream})));
    check.call_err(&mut c, "stream.read", Some(json!({"stream": stream})), 1008);
    check.call_err(
        &mut c,
        "stream.close",
        Some(json!({"stream": stream})),
        1008,
    );

    let status = check.call_ok(&mut c, "status", None);
    for section in ["cache", "pool", "streams"] {
        assert!(status[section].is_object(), "no {section} in {status}");
    }
    check.call_ok(&mut c, "stop", None);
    assert!(agent.wait_exit().success());
}
