//! The wire contract of issue 2, checked against the real binary on a Unix
//! socket with raw bytes: the JSON-RPC 2.0 specification's examples, id and
//! envelope rules, the authentication state machine, framing edge cases,
//! limits, the idle watchdog and process lifecycle.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Finds the element of a batch response with this id.
fn by_id<'a>(batch: &'a Value, id: &Value) -> &'a Value {
    let items = batch
        .as_array()
        .unwrap_or_else(|| panic!("expected a batch array, got {batch}"));
    let found: Vec<&Value> = items.iter().filter(|r| &r["id"] == id).collect();
    assert_eq!(found.len(), 1, "id {id} must appear once in {batch}");
    found[0]
}

/// Sends a ping with `id` and asserts the very next line is its pong: proves
/// nothing was written for whatever was sent before it.
fn assert_next_is_pong(c: &mut Conn, id: u64) {
    c.send_line(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#));
    let r = c.recv();
    assert_eq!(r, json!({"jsonrpc":"2.0","id":id,"result":"pong"}));
}

// ---------------------------------------------------------------------------
// The examples section of the JSON-RPC 2.0 specification, adapted to our
// methods (ping, status, authenticate; unknown names for "subtract" & co.).
// ---------------------------------------------------------------------------

#[test]
fn spec_positional_params() {
    let agent = Agent::start();
    let mut c = agent.connect();
    c.send_line(
        &json!({"jsonrpc":"2.0","method":"authenticate","params":[TICKET],"id":1}).to_string(),
    );
    assert_eq!(
        c.recv(),
        json!({"jsonrpc":"2.0","id":1,"result":auth_result()})
    );
    c.send_line(r#"{"jsonrpc": "2.0", "method": "ping", "params": [], "id": 2}"#);
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":2,"result":"pong"}));
}

#[test]
fn spec_named_params() {
    let agent = Agent::start();
    let mut c = agent.connect();
    c.send_line(
        &json!({"jsonrpc":"2.0","method":"authenticate","params":{"ticket":TICKET},"id":3})
            .to_string(),
    );
    assert_eq!(
        c.recv(),
        json!({"jsonrpc":"2.0","id":3,"result":auth_result()})
    );
    c.send_line(
        r#"{"jsonrpc": "2.0", "method": "status", "params": {"keep_timeout": false}, "id": 4}"#,
    );
    let r = c.recv();
    assert_eq!(r["id"], json!(4));
    assert!(r["result"].is_object(), "{r}");
}

#[test]
fn spec_notifications_are_not_answered() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}"#);
    c.send_line(r#"{"jsonrpc": "2.0", "method": "foobar"}"#);
    c.send_line(r#"{"jsonrpc": "2.0", "method": "ping"}"#);
    c.send_line(
        r#"{"jsonrpc": "2.0", "method": "status", "params": {"keep_timeout": "not a bool"}}"#,
    );
    assert_next_is_pong(&mut c, 5);
    c.expect_silence(ms(200));
}

#[test]
fn spec_non_existent_method() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc": "2.0", "method": "foobar", "id": "1"}"#);
    assert_error(&c.recv(), -32601, &json!("1"));
}

#[test]
fn spec_invalid_json() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]"#);
    assert_error(&c.recv(), -32700, &Value::Null);
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn spec_invalid_request_object() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc": "2.0", "method": 1, "params": "bar"}"#);
    assert_error(&c.recv(), -32600, &Value::Null);
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn spec_batch_invalid_json() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(
        r#"[ {"jsonrpc": "2.0", "method": "ping", "params": [], "id": "1"}, {"jsonrpc": "2.0", "method" ]"#,
    );
    let r = c.recv();
    assert!(r.is_object(), "a single error object, not an array: {r}");
    assert_error(&r, -32700, &Value::Null);
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn spec_empty_batch() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line("[]");
    let r = c.recv();
    assert!(r.is_object(), "[] gets a single object, not an array: {r}");
    assert_error(&r, -32600, &Value::Null);
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn spec_batch_of_one_non_object() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line("[1]");
    let r = c.recv();
    let items = r
        .as_array()
        .unwrap_or_else(|| panic!("array expected: {r}"));
    assert_eq!(items.len(), 1, "{r}");
    assert_error(&items[0], -32600, &Value::Null);
}

#[test]
fn spec_batch_of_three_non_objects() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line("[1,2,3]");
    let r = c.recv();
    let items = r
        .as_array()
        .unwrap_or_else(|| panic!("array expected: {r}"));
    assert_eq!(items.len(), 3, "{r}");
    for item in items {
        assert_error(item, -32600, &Value::Null);
    }
}

#[test]
fn spec_mixed_batch() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(
        r#"[
        {"jsonrpc": "2.0", "method": "ping", "params": [], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "status", "params": {"keep_timeout": true}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]"#
        .replace('\n', " ")
        .as_str(),
    );
    let r = c.recv();
    let items = r
        .as_array()
        .unwrap_or_else(|| panic!("array expected: {r}"));
    assert_eq!(
        items.len(),
        5,
        "one response per request, notification left out: {r}"
    );
    assert_eq!(by_id(&r, &json!("1"))["result"], json!("pong"));
    assert!(by_id(&r, &json!("2"))["result"].is_object(), "{r}");
    assert_error(by_id(&r, &Value::Null), -32600, &Value::Null);
    assert_error(by_id(&r, &json!("5")), -32601, &json!("5"));
    assert_error(by_id(&r, &json!("9")), -32601, &json!("9"));
}

#[test]
fn spec_batch_of_only_notifications_gets_no_line() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(
        r#"[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]}, {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}, {"jsonrpc": "2.0", "method": "ping"}]"#,
    );
    assert_next_is_pong(&mut c, 7);
    c.expect_silence(ms(200));
}

// ---------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------

#[test]
fn ids_are_echoed_exactly() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    for raw in [
        r#""abc""#,
        r#""""#,
        r#""1""#,
        "0",
        "-1",
        "1",
        "9007199254740993", // not representable as f64
        "-9223372036854775808",
        "9223372036854775807",
        "18446744073709551615",
    ] {
        c.send_line(&format!(
            r#"{{"jsonrpc":"2.0","id":{raw},"method":"ping"}}"#
        ));
        let line = c.recv_raw();
        assert!(
            line.contains(&format!(r#""id":{raw}"#)),
            "id {raw} not echoed byte for byte: {line}"
        );
        let v = parse_response_line(&line);
        assert_eq!(v["result"], json!("pong"), "{line}");
    }
}

#[test]
fn null_id_is_answered() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#);
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":null,"result":"pong"}));
    c.send_line(r#"{"jsonrpc":"2.0","id":null,"method":"nope"}"#);
    assert_error(&c.recv(), -32601, &Value::Null);
}

#[test]
fn bad_ids_are_invalid_requests_with_null_id() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    for raw in ["1.5", "-0.5", "{}", r#"{"a":1}"#, "[]", "[1]", "true"] {
        c.send_line(&format!(
            r#"{{"jsonrpc":"2.0","id":{raw},"method":"ping"}}"#
        ));
        let r = c.recv();
        assert_error(&r, -32600, &Value::Null);
    }
    // Inside a batch each bad id gets its own error next to the good ones.
    c.send_line(
        r#"[{"jsonrpc":"2.0","id":1.5,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
    );
    let r = c.recv();
    assert_eq!(r.as_array().map(Vec::len), Some(2), "{r}");
    assert_error(by_id(&r, &Value::Null), -32600, &Value::Null);
    assert_eq!(by_id(&r, &json!(2))["result"], json!("pong"));
}

// ---------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------

#[test]
fn params_must_be_absent_object_or_array() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    for (id, params) in [(7, r#""bar""#), (8, "5"), (9, "null"), (10, "true")] {
        c.send_line(&format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"ping","params":{params}}}"#
        ));
        assert_error(&c.recv(), -32600, &json!(id));
    }
}

#[test]
fn jsonrpc_member_must_be_2_0() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    for line in [
        r#"{"jsonrpc":"1.0","id":8,"method":"ping"}"#,
        r#"{"jsonrpc":2.0,"id":8,"method":"ping"}"#,
        r#"{"id":8,"method":"ping"}"#,
    ] {
        c.send_line(line);
        let r = c.recv();
        assert_eq!(error_code(&r), -32600, "{line} -> {r}");
        assert!(r["id"] == json!(8) || r["id"].is_null(), "{line} -> {r}");
    }
}

#[test]
fn method_must_be_a_string() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    for line in [
        r#"{"jsonrpc":"2.0","id":3}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":null}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":["ping"]}"#,
    ] {
        c.send_line(line);
        let r = c.recv();
        assert_eq!(error_code(&r), -32600, "{line} -> {r}");
        assert!(r["id"] == json!(3) || r["id"].is_null(), "{line} -> {r}");
    }
}

#[test]
fn non_object_messages_are_invalid_requests() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    for line in ["5", r#""ping""#, "null", "true"] {
        c.send_line(line);
        assert_error(&c.recv(), -32600, &Value::Null);
    }
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn bad_params_are_32602_with_data() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    let r = c.call("status", Some(json!({"keep_timeout": "yes"})));
    assert_eq!(error_code(&r), -32602, "{r}");
    assert!(
        r["error"].get("data").is_some(),
        "-32602 must say which param in data: {r}"
    );
}

#[test]
fn unknown_method_after_auth_is_32601() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    let r = c.call("no.such.method", None);
    assert_eq!(error_code(&r), -32601, "{r}");
    // the connection stays usable
    assert_eq!(c.call_ok("ping", None), json!("pong"));
}

#[test]
fn trailing_garbage_is_a_parse_error() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc":"2.0","id":1,"method":"ping"} x"#);
    assert_error(&c.recv(), -32700, &Value::Null);
    c.send_line(
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
    );
    assert_error(&c.recv(), -32700, &Value::Null);
    assert_next_is_pong(&mut c, 3);
}

// ---------------------------------------------------------------------------
// Methods
// ---------------------------------------------------------------------------

#[test]
fn status_has_the_pinned_fields() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    let mut other = agent.connect_authed();
    let s = c.call_ok("status", None);
    assert_eq!(s["version"], json!(env!("CARGO_PKG_VERSION")), "{s}");
    assert_eq!(s["protocol"], json!(1), "{s}");
    assert!(s["uptime_s"].is_number(), "{s}");
    assert_eq!(s["connections"], json!(2), "two open connections: {s}");
    assert!(s["connections_total"].as_u64() >= Some(2), "{s}");
    assert!(s["requests_served"].as_u64().is_some(), "{s}");
    assert_eq!(s["idle_timeout_s"], json!(0), "{s}");
    assert!(
        s.as_object()
            .is_some_and(|o| o.contains_key("idle_remaining_s")),
        "{s}"
    );
    assert_eq!(s["idle_remaining_s"], Value::Null, "off -> null: {s}");
    assert!(s["rss_bytes"].as_u64().is_some_and(|n| n > 0), "{s}");

    // requests_served counts requests; connections follows closes.
    let before = s["requests_served"].as_u64().unwrap_or(0);
    other.call_ok("ping", None);
    drop(other);
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(3), || {
        last = c.call_ok("status", None);
        last["connections"] == json!(1)
    });
    assert!(ok, "connections did not drop to 1: {last}");
    assert!(last["requests_served"].as_u64() > Some(before), "{last}");
    assert!(
        last["uptime_s"].as_f64() >= s["uptime_s"].as_f64(),
        "{last}"
    );
}

#[test]
fn status_reports_idle_timeout_when_on() {
    let agent = Agent::builder().idle_timeout(Some(600)).start();
    let mut c = agent.connect_authed();
    let s = c.call_ok("status", Some(json!({"keep_timeout": true})));
    assert_eq!(s["idle_timeout_s"], json!(600), "{s}");
    let rem = s["idle_remaining_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("idle_remaining_s must be a number: {s}"));
    assert!(rem > 590.0 && rem <= 600.0, "{s}");
}

#[test]
fn rpc_discover_returns_openrpc_document() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    let doc = c.call_ok("rpc.discover", None);
    assert!(doc["openrpc"].is_string(), "openrpc member: {doc}");
    let names: Vec<&str> = doc["methods"]
        .as_array()
        .unwrap_or_else(|| panic!("methods array: {doc}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for m in ["authenticate", "ping", "status", "stop"] {
        assert!(
            names.contains(&m),
            "{m} missing from rpc.discover: {names:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Authentication state machine
// ---------------------------------------------------------------------------

/// Sends `bytes` first on a fresh connection and expects one -32001 with
/// `id`, then EOF.
fn assert_rejected_before_auth(agent: &Agent, bytes: &[u8], id: Value) {
    let mut c = agent.connect();
    c.send(bytes);
    let r = c.recv();
    assert_error(&r, -32001, &id);
    c.expect_eof(READ_DEADLINE);
}

#[test]
fn pre_auth_request_is_rejected_and_closed() {
    let agent = Agent::start();
    assert_rejected_before_auth(
        &agent,
        b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"ping\"}\n",
        json!(3),
    );
    assert_rejected_before_auth(
        &agent,
        b"{\"jsonrpc\":\"2.0\",\"id\":\"s\",\"method\":\"stop\"}\n",
        json!("s"),
    );
    assert_rejected_before_auth(
        &agent,
        b"{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"nope\"}\n",
        json!(4),
    );
    // the agent was not stopped by the rejected `stop`
    let mut c = agent.connect_authed();
    assert_eq!(c.call_ok("ping", None), json!("pong"));
}

#[test]
fn pre_auth_notification_is_rejected_and_closed() {
    let agent = Agent::start();
    assert_rejected_before_auth(
        &agent,
        b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}\n",
        Value::Null,
    );
    // even an authenticate sent as a notification
    let line = format!(
        "{}\n",
        json!({"jsonrpc":"2.0","method":"authenticate","params":{"ticket":TICKET}})
    );
    assert_rejected_before_auth(&agent, line.as_bytes(), Value::Null);
}

#[test]
fn pre_auth_batch_is_rejected_and_closed() {
    let agent = Agent::start();
    let line = format!("[{}]\n", auth_line(1));
    assert_rejected_before_auth(&agent, line.as_bytes(), Value::Null);
    assert_rejected_before_auth(&agent, b"[]\n", Value::Null);
}

#[test]
fn pre_auth_bad_json_is_rejected_and_closed() {
    let agent = Agent::start();
    assert_rejected_before_auth(&agent, b"{\"jsonrpc\": \n", Value::Null);
    assert_rejected_before_auth(&agent, b"\xc3\x28\n", Value::Null);
}

#[test]
fn pre_auth_over_long_line_is_rejected_and_closed() {
    let agent = Agent::builder()
        .arg("--max-request-bytes")
        .arg("1024")
        .start();
    let mut long = vec![b'x'; 4096];
    long.push(b'\n');
    assert_rejected_before_auth(&agent, &long, Value::Null);
}

#[test]
fn wrong_ticket_fails_after_the_delay_and_closes() {
    let agent = Agent::builder().auth_fail_delay_ms(Some(400)).start();
    let mut c = agent.connect();
    let t0 = Instant::now();
    c.send_line(
        &json!({"jsonrpc":"2.0","id":9,"method":"authenticate","params":{"ticket":"wrong"}})
            .to_string(),
    );
    let r = c.recv();
    let elapsed = t0.elapsed();
    assert_error(&r, -32002, &json!(9));
    assert!(
        elapsed >= ms(400),
        "answered after {elapsed:?}, before the 400 ms delay"
    );
    c.expect_eof(READ_DEADLINE);
}

#[test]
fn near_miss_tickets_fail() {
    let agent = Agent::start();
    let short = &TICKET[..TICKET.len() - 1];
    let longer = format!("{TICKET}x");
    let with_nl = format!("{TICKET}\n");
    let upper = TICKET.to_uppercase();
    for t in [short, longer.as_str(), with_nl.as_str(), upper.as_str(), ""] {
        let mut c = agent.connect();
        c.send_line(
            &json!({"jsonrpc":"2.0","id":1,"method":"authenticate","params":[t]}).to_string(),
        );
        assert_error(&c.recv(), -32002, &json!(1));
        c.expect_eof(READ_DEADLINE);
    }
}

#[test]
fn authenticate_with_bad_params_is_32602_and_closes() {
    let agent = Agent::start();
    for params in [
        Some(json!({})),
        Some(json!({"ticket": 5})),
        Some(json!({"ticket": null})),
        Some(json!({"token": TICKET})),
        Some(json!([])),
        Some(json!([5])),
        None,
    ] {
        let mut c = agent.connect();
        let mut req = json!({"jsonrpc":"2.0","id":2,"method":"authenticate"});
        if let Some(p) = &params {
            req["params"] = p.clone();
        }
        c.send_json(&req);
        let r = c.recv();
        assert_error(&r, -32602, &json!(2));
        c.expect_eof(READ_DEADLINE);
    }
}

#[test]
fn second_authenticate_returns_the_same_result() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    let r = c.call_ok("authenticate", Some(json!([TICKET])));
    assert_eq!(r, auth_result());
    let r = c.call_ok("authenticate", Some(json!({"ticket": TICKET})));
    assert_eq!(r, auth_result());
    assert_eq!(c.call_ok("ping", None), json!("pong"));
}

#[test]
fn auth_deadline_closes_silent_and_slow_connections() {
    let agent = Agent::builder().arg("--auth-timeout").arg("1").start();
    let mut silent = agent.connect();
    let mut partial = agent.connect();
    partial.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,");
    let mut authed = agent.connect_authed();
    let t0 = Instant::now();
    for c in [&mut silent, &mut partial] {
        // The agent may say why before closing; it must close.
        match c.recv_line_within(Duration::from_secs(5)) {
            Recv::Eof(rest) => assert!(rest.is_empty()),
            Recv::Line(l) => {
                let v = parse_response_line(&String::from_utf8_lossy(&l));
                assert!(v["error"].is_object(), "{v}");
                c.expect_eof(READ_DEADLINE);
            }
            Recv::Timeout => panic!("unauthenticated connection not closed after 5 s"),
        }
    }
    let elapsed = t0.elapsed();
    assert!(elapsed >= ms(700), "closed too early: {elapsed:?}");
    // an authenticated connection is not subject to the deadline
    thread::sleep(ms(300));
    assert_eq!(authed.call_ok("ping", None), json!("pong"));
}

#[test]
fn pipelined_authenticate_and_status_in_one_write() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let bytes = format!(
        "{}\n{}\n{}\n",
        auth_line(1),
        r#"{"jsonrpc":"2.0","id":2,"method":"status"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#
    );
    c.send(bytes.as_bytes());
    let mut got = HashMap::new();
    for _ in 0..3 {
        let r = c.recv();
        got.insert(r["id"].to_string(), r);
    }
    assert_eq!(got["1"]["result"], auth_result());
    assert!(got["2"]["result"].is_object(), "{}", got["2"]);
    assert_eq!(got["3"]["result"], json!("pong"));
}

#[test]
fn ticket_is_never_logged_and_failures_are() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.call_ok("ping", None);
    let mut bad = agent.connect();
    bad.send_line(&json!({"jsonrpc":"2.0","id":1,"method":"authenticate","params":[format!("{TICKET}-wrong")]}).to_string());
    assert_error(&bad.recv(), -32002, &json!(1));
    bad.expect_eof(READ_DEADLINE);
    drop(c);
    let ok = wait_until(Duration::from_secs(3), || {
        agent.stderr().to_lowercase().contains("auth")
    });
    let log = agent.stderr();
    assert!(ok, "failed authentication not logged:\n{log}");
    assert!(!log.contains(TICKET), "ticket appears in the log:\n{log}");
}

#[test]
fn world_readable_ticket_file_is_warned_about() {
    let agent = Agent::builder().ticket_mode(0o644).start();
    let mut c = agent.connect_authed();
    c.call_ok("ping", None);
    let log = agent.stderr();
    assert!(
        log.to_lowercase().contains("warn"),
        "no warning for a 0644 ticket file:\n{log}"
    );
}

#[test]
fn only_one_trailing_newline_is_removed_from_the_ticket() {
    let agent = Agent::builder().ticket_file(Some(b"abc\n\n")).start();
    let mut c = agent.connect();
    c.send_line(
        &json!({"jsonrpc":"2.0","id":1,"method":"authenticate","params":["abc\n"]}).to_string(),
    );
    assert_eq!(c.recv()["result"], auth_result());
    let mut c = agent.connect();
    c.send_line(
        &json!({"jsonrpc":"2.0","id":1,"method":"authenticate","params":["abc"]}).to_string(),
    );
    assert_error(&c.recv(), -32002, &json!(1));

    let agent = Agent::builder().ticket_file(Some(b"no-newline")).start();
    let mut c = agent.connect();
    c.send_line(
        &json!({"jsonrpc":"2.0","id":1,"method":"authenticate","params":["no-newline"]})
            .to_string(),
    );
    assert_eq!(c.recv()["result"], auth_result());
}

// ---------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------

#[test]
fn byte_by_byte_writes() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let bytes = format!(
        "{}\n{}\n",
        auth_line(1),
        r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#
    );
    for (i, b) in bytes.as_bytes().iter().enumerate() {
        c.send(&[*b]);
        if i % 16 == 0 {
            thread::sleep(ms(1));
        }
    }
    assert_eq!(c.recv()["result"], auth_result());
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":2,"result":"pong"}));
}

#[test]
fn crlf_line_endings() {
    let agent = Agent::start();
    let mut c = agent.connect();
    c.send(format!("{}\r\n", auth_line(1)).as_bytes());
    assert_eq!(c.recv()["result"], auth_result());
    c.send(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\r\n");
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":2,"result":"pong"}));
}

#[test]
fn leading_0xff_bytes_are_skipped() {
    let agent = Agent::start();
    let mut c = agent.connect();
    let mut bytes = vec![0xff, 0xff, 0xff];
    bytes.extend_from_slice(auth_line(1).as_bytes());
    bytes.push(b'\n');
    c.send(&bytes);
    assert_eq!(c.recv()["result"], auth_result());
    c.send(b"\xff{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n");
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":2,"result":"pong"}));
}

#[test]
fn over_long_line_then_valid_line_on_same_connection() {
    let agent = Agent::builder()
        .arg("--max-request-bytes")
        .arg("1024")
        .start();
    let mut c = agent.connect_authed();

    // one write
    let mut long = vec![b'a'; 5000];
    long.push(b'\n');
    c.send(&long);
    assert_error(&c.recv(), -32600, &Value::Null);
    assert_next_is_pong(&mut c, 1);

    // split over writes, the valid line in the same write as the tail
    c.send(&[b' '; 1500]);
    thread::sleep(ms(50));
    c.send(&[b'{'; 1500]);
    thread::sleep(ms(50));
    c.send(b"\"tail\"\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n");
    assert_error(&c.recv(), -32600, &Value::Null);
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":2,"result":"pong"}));

    // a line within the limit is fine (padded with JSON whitespace)
    let mut ok = br#"{"jsonrpc":"2.0","id":3,"method":"ping""#.to_vec();
    ok.resize(1000, b' ');
    ok.extend_from_slice(b"}\n");
    c.send(&ok);
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":3,"result":"pong"}));
}

#[test]
fn huge_line_is_discarded_without_closing() {
    let agent = Agent::builder()
        .arg("--max-request-bytes")
        .arg("1024")
        .start();
    let mut c = agent.connect_authed();
    let chunk = vec![b'z'; 64 * 1024];
    for _ in 0..64 {
        c.send(&chunk); // 4 MiB
    }
    c.send(b"\n");
    assert_error(&c.recv(), -32600, &Value::Null);
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn blank_and_whitespace_lines_are_ignored() {
    let agent = Agent::start();
    let mut c = agent.connect();
    c.send(b"\n\n   \n\t\r\n \t \n");
    c.expect_silence(ms(200));
    c.authenticate();
    c.send(b"\n\r\n  \n");
    assert_next_is_pong(&mut c, 1);
    c.expect_silence(ms(200));
}

#[test]
fn invalid_utf8_is_a_parse_error_and_connection_stays() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"p\xc3\x28ing\"}\n");
    assert_error(&c.recv(), -32700, &Value::Null);
    c.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\xfe\"}\n");
    assert_error(&c.recv(), -32700, &Value::Null);
    assert_next_is_pong(&mut c, 2);
}

#[test]
fn the_agent_never_writes_first() {
    let agent = Agent::start();
    let mut c = agent.connect();
    c.expect_silence(ms(300));
    c.authenticate();
}

// ---------------------------------------------------------------------------
// Limits and pipelining
// ---------------------------------------------------------------------------

fn ping_batch(n: usize, first_id: usize) -> String {
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"jsonrpc":"2.0","id":{},"method":"ping"}}"#,
                first_id + i
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

#[test]
fn max_batch_is_enforced() {
    let agent = Agent::builder().arg("--max-batch").arg("4").start();
    let mut c = agent.connect_authed();
    c.send_line(&ping_batch(4, 1));
    let r = c.recv();
    assert_eq!(r.as_array().map(Vec::len), Some(4), "{r}");
    for id in 1..=4 {
        assert_eq!(by_id(&r, &json!(id))["result"], json!("pong"));
    }
    c.send_line(&ping_batch(5, 10));
    let r = c.recv();
    assert!(r.is_object(), "over-long batch gets a single object: {r}");
    assert_error(&r, -32600, &Value::Null);
    // also when the batch holds only notifications
    let notes: Vec<&str> = vec![r#"{"jsonrpc":"2.0","method":"ping"}"#; 5];
    c.send_line(&format!("[{}]", notes.join(",")));
    assert_error(&c.recv(), -32600, &Value::Null);
    assert_next_is_pong(&mut c, 99);
}

const MIB: u64 = 1 << 20;

/// An agent serving a 16 MiB image of pseudo-random bytes as `attached`
/// `disk`; the image's directory lives as long as the first value.
fn agent_on_a_16_mib_image() -> (tempfile::TempDir, Vec<u8>, Agent) {
    agent_on_a_16_mib_image_with(&[])
}

/// The same, with `args` added to the agent's command line.
fn agent_on_a_16_mib_image_with(args: &[&str]) -> (tempfile::TempDir, Vec<u8>, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let src: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(&image, &src).unwrap();
    let agent = args
        .iter()
        .fold(Agent::builder().image("disk", &image), |b, a| b.arg(*a))
        .start();
    (dir, src, agent)
}

fn read_item(id: u64, offset: u64, length: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "image.read",
        "params": {"snapshot": "attached", "archive": "disk", "offset": offset, "length": length}})
}

fn base64_data(r: &Value) -> Vec<u8> {
    let text = r["result"]["data"]
        .as_str()
        .unwrap_or_else(|| panic!("no data: {r}"));
    base64_simd::STANDARD.decode_to_vec(text).expect("base64")
}

/// A batch is answered in one line built whole, so the answers of batches
/// not yet written may take 8 MiB in all: a read whose answer does not fit
/// gets -32003 with advice, its neighbours their answers, and the same read
/// sent on its own its data. A batch of 16 base64 reads of 16 MiB used to
/// build a 360 MB line (64 of them, 1.4 GB: more than the VM has).
#[test]
fn batch_answers_are_bounded() {
    let (_dir, src, agent) = agent_on_a_16_mib_image();
    let mut c = agent.connect_authed();

    for round in 0..2 {
        let ping = json!({"jsonrpc": "2.0", "id": 4, "method": "ping"});
        let items = [
            read_item(1, 0, 4 * MIB),
            read_item(2, 4 * MIB, 4 * MIB),
            read_item(3, 8 * MIB, 4 * MIB),
            ping,
        ];
        c.send_json(&Value::Array(items.to_vec()));
        let r = c.recv();
        assert!(
            base64_data(by_id(&r, &json!(1))) == src[..4 << 20],
            "round {round}"
        );
        for id in [2, 3] {
            let e = by_id(&r, &json!(id));
            assert!(e.get("error").is_some(), "round {round}: {id} got its data");
            assert_eq!(error_code(e), -32003, "round {round}: {e}");
            let msg = e["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains("send this request on its own"), "{e}");
        }
        assert_eq!(by_id(&r, &json!(4))["result"], "pong", "{r}");
    }
    c.send_json(&read_item(2, 4 * MIB, 4 * MIB));
    assert!(base64_data(&c.recv()) == src[4 << 20..8 << 20]);

    let big: Vec<Value> = (1..=16).map(|id| read_item(id, 0, 16 * MIB)).collect();
    c.send_json(&Value::Array(big));
    let r = c.recv();
    for id in 1..=16 {
        let e = by_id(&r, &json!(id));
        assert!(e.get("error").is_some(), "{id} got its data");
        assert_eq!(error_code(e), -32003, "{e}");
    }
    let peak = proc_status_bytes(agent.pid() as u32, "VmHWM");
    // 75 MiB here; 400 MiB when the whole line was built
    assert!(peak < 128 * MIB, "agent peak RSS {} MiB", peak / MIB);
    assert_next_is_pong(&mut c, 99);
}

/// A client that stops reading keeps what its unwritten answers hold of
/// the read budget, but no more than a connection's share: another
/// client's reads go on. One unread 16 MiB `image.read` (and more queued
/// behind it) used to hold the whole budget, and every other connection's
/// reads waited until that client read or left.
#[test]
fn a_client_that_stops_reading_does_not_stall_the_reads_of_others() {
    let (_dir, src, agent) = agent_on_a_16_mib_image();
    let mut stalled = agent.connect_authed();
    for id in 1..=4 {
        stalled.send_json(&read_item(id, 0, 16 * MIB));
    }
    // its first answer fills the socket's buffers and waits to be written
    thread::sleep(ms(500));
    let mut other = agent.connect_authed();
    for (id, offset) in [(10, 0), (11, 4 * MIB), (12, 12 * MIB)] {
        other.send_json(&read_item(id, offset, 4 * MIB));
        let r = match other.recv_line_within(Duration::from_secs(10)) {
            Recv::Line(line) => parse_response_line(&String::from_utf8_lossy(&line)),
            _ => panic!("read {id} of the other client got no answer"),
        };
        let at = offset as usize;
        assert!(base64_data(&r) == src[at..at + (4 << 20)], "read {id}");
    }
    assert_next_is_pong(&mut other, 99);
    drop(stalled);
}

/// Clients that stop reading and between them hold the whole read budget
/// (one unread 16 MiB read takes a connection's 8 MiB share, one unread 4
/// MiB read the last 4 MiB) are cut off once they have taken nothing for
/// `--stall-timeout` while another client's read waits for that memory:
/// that read is answered, a stalled one gets its connection closed in the
/// middle of an answer. Before, the third client waited for as long as
/// they did.
#[test]
fn stalled_clients_holding_the_read_budget_are_cut_off_when_others_wait() {
    let (_dir, src, mut agent) = agent_on_a_16_mib_image_with(&["--stall-timeout", "1"]);
    let mut big = agent.connect_authed();
    big.send_json(&read_item(1, 0, 16 * MIB));
    let mut small = agent.connect_authed();
    small.send_json(&read_item(1, 0, 4 * MIB));
    // both answers fill their sockets' buffers and wait to be written
    thread::sleep(ms(500));
    let mut other = agent.connect_authed();
    other.send_json(&read_item(10, 8 * MIB, 4 * MIB));
    let r = match other.recv_line_within(Duration::from_secs(10)) {
        Recv::Line(line) => parse_response_line(&String::from_utf8_lossy(&line)),
        _ => panic!("the other client's read got no answer"),
    };
    assert!(base64_data(&r) == src[8 << 20..12 << 20]);
    // Cutting one off may free enough: the other then keeps its connection
    // and, reading on, gets its answer whole.
    let mut cut_off = 0;
    for (name, c, len) in [
        ("16 MiB", &mut big, 16 << 20),
        ("4 MiB", &mut small, 4 << 20),
    ] {
        match c.recv_line_within(Duration::from_secs(10)) {
            Recv::Eof(part) => {
                assert!(!part.is_empty(), "{name}: nothing of its answer");
                cut_off += 1;
            }
            Recv::Line(line) => {
                let r = parse_response_line(&String::from_utf8_lossy(&line));
                assert!(base64_data(&r) == src[..len], "{name}: wrong data");
            }
            Recv::Timeout => panic!("{name}: neither an answer nor the end"),
        }
    }
    assert!(cut_off >= 1, "no stalled client was cut off");
    agent.wait_for_log("took none of an answer", Duration::from_secs(5));
    assert_next_is_pong(&mut other, 99);
}

/// A client that pauses (`restore-client cat | less`) while nobody else
/// waits for the memory its answers hold keeps its connection however long
/// it pauses: its answers arrive whole when it reads on.
#[test]
fn a_paused_client_keeps_its_connection_while_nobody_waits_for_its_memory() {
    let (_dir, src, agent) = agent_on_a_16_mib_image_with(&["--stall-timeout", "1"]);
    let mut paused = agent.connect_authed();
    paused.send_json(&read_item(1, 0, 4 * MIB));
    paused.send_json(&read_item(2, 4 * MIB, 4 * MIB));
    thread::sleep(Duration::from_secs(3));
    let mut got = HashMap::new();
    for _ in 0..2 {
        let r = paused.recv();
        got.insert(r["id"].as_u64().unwrap(), base64_data(&r));
    }
    assert!(got[&1] == src[..4 << 20] && got[&2] == src[4 << 20..8 << 20]);
    assert_next_is_pong(&mut paused, 99);
}

/// What a pipelined request should get back.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Pong,
    Status,
    NotFound,
    BadParams,
}

#[test]
fn pipelined_requests_each_answered_once() {
    let agent = Agent::start();
    let (mut c, mut writer) = split_authed(&agent);
    let n = 2000usize;
    let mut expect = HashMap::new();
    let mut bytes = Vec::new();
    for i in 0..n {
        let id = format!("r{i}");
        let (line, e) = match i % 4 {
            0 => (
                json!({"jsonrpc":"2.0","id":id,"method":"ping"}),
                Expect::Pong,
            ),
            1 => (
                json!({"jsonrpc":"2.0","id":id,"method":"status","params":{"keep_timeout":true}}),
                Expect::Status,
            ),
            2 => (
                json!({"jsonrpc":"2.0","id":id,"method":"nope"}),
                Expect::NotFound,
            ),
            _ => (
                json!({"jsonrpc":"2.0","id":id,"method":"status","params":{"keep_timeout":1}}),
                Expect::BadParams,
            ),
        };
        bytes.extend_from_slice(line.to_string().as_bytes());
        bytes.push(b'\n');
        expect.insert(id, e);
    }
    // Write from another thread so neither side can block the other.
    let t = thread::spawn(move || {
        writer.write_all(&bytes).expect("pipelined write");
    });
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = c.recv();
        let id = r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string();
        let e = *expect
            .get(&id)
            .unwrap_or_else(|| panic!("unknown id in {r}"));
        match e {
            Expect::Pong => assert_eq!(r["result"], json!("pong"), "{r}"),
            Expect::Status => assert!(r["result"].is_object(), "{r}"),
            Expect::NotFound => assert_eq!(error_code(&r), -32601, "{r}"),
            Expect::BadParams => assert_eq!(error_code(&r), -32602, "{r}"),
        }
        assert!(seen.insert(id, ()).is_none(), "duplicate response {r}");
    }
    t.join().expect("writer thread");
    c.expect_silence(ms(200));
}

/// An authenticated connection plus a second handle on the same socket for
/// a writer thread.
fn split_authed(agent: &Agent) -> (Conn, UnixStream) {
    let s = UnixStream::connect(&agent.sock).expect("connect");
    let w = s.try_clone().expect("clone");
    let mut c = Conn::from_stream(Box::new(s));
    c.authenticate();
    (c, w)
}

#[test]
fn pipelined_responses_may_overtake_a_slow_batch() {
    // A large batch of `status` (each touches /proc) is sent before single
    // pings in one write. The contract allows any order; this asserts every
    // response arrives exactly once and records the order seen.
    let agent = Agent::builder().arg("--max-batch").arg("5000").start();
    let mut c = agent.connect_authed();
    let items: Vec<String> = (0..5000)
        .map(|i| {
            format!(
                r#"{{"jsonrpc":"2.0","id":{i},"method":"status","params":{{"keep_timeout":true}}}}"#
            )
        })
        .collect();
    let mut bytes = format!("[{}]\n", items.join(",")).into_bytes();
    for i in 0..8 {
        bytes.extend_from_slice(
            format!(r#"{{"jsonrpc":"2.0","id":"p{i}","method":"ping"}}"#).as_bytes(),
        );
        bytes.push(b'\n');
    }
    c.send(&bytes);
    let mut order = Vec::new();
    let mut pings = 0;
    for _ in 0..9 {
        let r = c.recv();
        if let Some(batch) = r.as_array() {
            assert_eq!(batch.len(), 5000);
            order.push("batch".to_string());
        } else {
            assert_eq!(r["result"], json!("pong"), "{r}");
            pings += 1;
            order.push(r["id"].as_str().unwrap_or("?").to_string());
        }
    }
    assert_eq!(pings, 8);
    eprintln!("response order: {order:?}");
}

#[test]
fn many_in_flight_with_backpressure() {
    let agent = Agent::start();
    let (mut c, mut w) = split_authed(&agent);
    let n = 20_000;
    let t = thread::spawn(move || {
        let mut bytes = Vec::new();
        for i in 0..n {
            bytes.extend_from_slice(
                format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#).as_bytes(),
            );
            bytes.push(b'\n');
        }
        w.write_all(&bytes).expect("write");
    });
    let mut seen = vec![false; n];
    for _ in 0..n {
        let r = c.recv();
        let id = r["id"].as_u64().unwrap_or_else(|| panic!("{r}")) as usize;
        assert!(!seen[id], "duplicate {id}");
        seen[id] = true;
    }
    t.join().expect("writer");
}

#[test]
fn a_connection_whose_answers_cannot_be_written_is_closed() {
    // The client shuts down its reading side but goes on sending: the
    // agent's writes fail (EPIPE). The agent must then close the connection
    // and free its slot, not read on with nobody able to get an answer.
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    let (_deaf, mut w) = split_authed(&agent);
    w.shutdown(std::net::Shutdown::Read).expect("shutdown");
    w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n")
        .expect("write");
    let mut last = Value::Null;
    let closed = wait_until(Duration::from_secs(5), || {
        last = c.call_ok("status", None);
        last["connections"] == json!(1)
    });
    assert!(closed, "the deaf connection is still open: {last}");
    // The agent closed its end: writing on fails sooner or later.
    let refused = wait_until(Duration::from_secs(5), || {
        w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n")
            .is_err()
    });
    assert!(refused, "the agent still reads the deaf connection");
    assert_eq!(c.call_ok("ping", None), json!("pong"));
}

#[test]
fn answers_get_through_socket_writes_failing_for_lack_of_kernel_memory() {
    // A small VM's kernel can fail a socket write with ENOMEM (it could not
    // allocate the packet); nothing was sent and the same write succeeds
    // later. tests/fault/enomem_write.c, preloaded into the agent, fails
    // every third socket write of 1 KiB or more that way.
    let dir = tempfile::tempdir().expect("tempdir");
    let shim = dir.path().join("enomem_write.so");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fault/enomem_write.c");
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(source)
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(cc.success(), "cc failed");
    let image = dir.path().join("disk.img");
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&image, &data).expect("write image");
    let preload = format!("LD_PRELOAD={}", shim.display());
    let agent = Agent::builder()
        .image("disk0", &image)
        .wrapper(&["env", &preload, "RESTORE_AGENT_FAULT_ENOMEM_EVERY=3"])
        .start();
    let mut c = agent.connect_authed();
    for offset in [0u64, 4 << 20, 8 << 20] {
        let r = c.call_ok(
            "image.read",
            Some(json!({"snapshot": "attached", "archive": "disk0",
                        "offset": offset, "length": 4 << 20})),
        );
        let got = base64_simd::STANDARD
            .decode_to_vec(r["data"].as_str().unwrap_or_else(|| panic!("{r}")))
            .expect("base64");
        let at = usize::try_from(offset).expect("offset");
        assert!(got == data[at..at + (4 << 20)], "wrong bytes at {offset}");
    }
    assert_eq!(c.call_ok("ping", None), json!("pong"));
    let log = agent.stderr();
    assert!(
        log.contains("short of memory") && log.contains("shortage ended"),
        "no shortage was met or waited out:\n{log}"
    );
}

#[test]
fn max_connections_rejects_the_extra_one() {
    let agent = Agent::builder().arg("--max-connections").arg("2").start();
    let mut a = agent.connect_authed();
    let b = agent.connect(); // unauthenticated connections count too
    thread::sleep(ms(100));
    let mut extra = agent.connect();
    let r = extra.recv();
    assert_error(&r, -32003, &Value::Null);
    extra.expect_eof(READ_DEADLINE);
    assert_eq!(a.call_ok("ping", None), json!("pong"));

    // a slot frees up when a connection closes
    drop(b);
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(3), || {
        let mut c = agent.connect();
        match c.recv_line_within(ms(150)) {
            Recv::Timeout => {
                c.authenticate();
                true
            }
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(ok, "no slot after a close; last: {last}");
}

// ---------------------------------------------------------------------------
// Lifecycle: idle watchdog, stop, signals, exit codes, listeners
// ---------------------------------------------------------------------------

#[test]
fn idle_watchdog_exits_on_its_own() {
    let mut agent = Agent::builder().idle_timeout(Some(2)).start();
    let t0 = agent.started;
    agent.expect_exit_code(0, Duration::from_secs(8));
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= ms(1500),
        "exited after {elapsed:?}, before the 2 s timeout"
    );
    assert!(!agent.sock.exists(), "socket file left behind");
}

#[test]
fn idle_watchdog_ignores_status_with_keep_timeout() {
    let mut agent = Agent::builder().idle_timeout(Some(2)).start();
    let mut c = agent.connect_authed();
    let t_auth = Instant::now();
    let mut remaining = Vec::new();
    loop {
        if t_auth.elapsed() > Duration::from_secs(6) {
            panic!("agent still serving 6 s after the last resetting request; idle_remaining_s {remaining:?}");
        }
        if c.try_send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\",\"params\":{\"keep_timeout\":true}}\n").is_err() {
            break;
        }
        match c.recv_line_within(Duration::from_secs(2)) {
            Recv::Line(l) => {
                let v = parse_response_line(&String::from_utf8_lossy(&l));
                if v.get("error").is_some() {
                    assert_eq!(error_code(&v), -32004, "{v}");
                    break;
                }
                remaining.push(v["result"]["idle_remaining_s"].as_f64().unwrap_or(-1.0));
            }
            Recv::Eof(_) => break,
            Recv::Timeout => panic!("no status answer"),
        }
        thread::sleep(ms(250));
    }
    agent.expect_exit_code(0, Duration::from_secs(5));
    assert!(
        remaining.windows(2).all(|w| w[1] <= w[0]),
        "idle_remaining_s must not go up with keep_timeout: {remaining:?}"
    );
    assert!(
        remaining.iter().all(|r| (0.0..=2.0).contains(r)),
        "{remaining:?}"
    );
}

#[test]
fn idle_watchdog_is_reset_by_ping() {
    let mut agent = Agent::builder().idle_timeout(Some(2)).start();
    let mut c = agent.connect_authed();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(4000) {
        assert_eq!(c.call_ok("ping", None), json!("pong"));
        thread::sleep(ms(400));
    }
    assert!(agent.is_running(), "agent exited although pinged");
    let t_last = Instant::now();
    agent.expect_exit_code(0, Duration::from_secs(6));
    let idle = t_last.elapsed();
    assert!(idle >= ms(1500), "exited {idle:?} after the last ping");
    c.expect_eof(READ_DEADLINE);
}

#[test]
fn stop_answers_then_exits_zero_and_removes_socket() {
    let mut agent = Agent::start();
    let mut c = agent.connect_authed();
    assert_eq!(c.call_ok("stop", None), json!({"stopping": true}));
    agent.expect_exit_code(0, Duration::from_secs(7));
    assert!(!agent.sock.exists(), "socket file left behind");
    c.expect_eof(READ_DEADLINE);
}

/// Requests already sent when the agent begins to shut down are answered
/// (normally, or with -32004), never dropped without an answer.
#[test]
fn requests_pipelined_behind_stop_are_all_answered() {
    let mut agent = Agent::start();
    let mut c = agent.connect_authed();
    let mut batch = String::from("{\"jsonrpc\":\"2.0\",\"id\":\"stop\",\"method\":\"stop\"}\n");
    for i in 0..300 {
        batch.push_str(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"ping\"}}\n"
        ));
    }
    c.send(batch.as_bytes());
    let mut seen = std::collections::BTreeSet::new();
    let mut refused = 0;
    while seen.len() < 301 {
        let v = c.recv();
        let id = v["id"].to_string();
        if v.get("error").is_some() {
            assert_eq!(v["error"]["code"], -32004, "{v}");
            refused += 1;
        } else if id == "\"stop\"" {
            assert_eq!(v["result"], json!({"stopping": true}));
        } else {
            assert_eq!(v["result"], "pong", "{v}");
        }
        assert!(seen.insert(id), "answered twice: {v}");
    }
    println!("{refused} of 300 pings refused with -32004");
    agent.expect_exit_code(0, Duration::from_secs(7));
    c.expect_eof(READ_DEADLINE);
}

#[test]
fn stop_as_notification_is_executed() {
    let mut agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc":"2.0","method":"stop"}"#);
    agent.expect_exit_code(0, Duration::from_secs(7));
    c.expect_eof(READ_DEADLINE);
}

fn signal_exits_zero(sig: libc::c_int) {
    let mut agent = Agent::start();
    let mut c = agent.connect_authed();
    c.call_ok("ping", None);
    agent.signal(sig);
    agent.expect_exit_code(0, Duration::from_secs(7));
    assert!(!agent.sock.exists(), "socket file left behind");
    c.expect_eof(READ_DEADLINE);
}

#[test]
fn sigterm_exits_zero() {
    signal_exits_zero(libc::SIGTERM);
}

#[test]
fn sigint_exits_zero() {
    signal_exits_zero(libc::SIGINT);
}

fn assert_exit_2(b: AgentBuilder, what: &str) {
    let mut agent = b.spawn();
    agent.expect_exit_code(2, Duration::from_secs(10));
    let log = agent.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one line on stderr, got:\n{log}"
    );
}

#[test]
fn exit_2_on_ticket_problems() {
    assert_exit_2(Agent::builder().ticket_file(None), "missing ticket file");
    assert_exit_2(Agent::builder().ticket_file(Some(b"")), "empty ticket file");
    assert_exit_2(
        Agent::builder().ticket_file(Some(b"\n")),
        "ticket file holding only a newline",
    );
    assert_exit_2(
        Agent::builder().ticket_file(None).ticket_is_dir(),
        "ticket path is a directory",
    );
}

#[test]
fn exit_2_on_bad_listen_addresses() {
    for addr in [
        "bogus:1",
        "tcp:nohost",
        "tcp:127.0.0.1:99999",
        "vsock:notaport",
        "unix:/nonexistent-dir-ra-test/agent.sock",
    ] {
        assert_exit_2(Agent::builder().unix(false).arg("--listen").arg(addr), addr);
    }
}

#[test]
fn unix_socket_is_0600_and_stale_file_replaced() {
    let agent = Agent::builder().stale_socket().start();
    let mode = fs::metadata(&agent.sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let mut c = agent.connect_authed();
    assert_eq!(c.call_ok("ping", None), json!("pong"));
}

#[test]
fn tcp_listener_serves_the_same_agent() {
    let port = free_tcp_port();
    let mut agent = Agent::builder()
        .arg("--listen")
        .arg(format!("tcp:127.0.0.1:{port}"))
        .start();
    agent.wait_for_log(
        &format!("listening on tcp:127.0.0.1:{port}"),
        START_DEADLINE,
    );
    let mut t = Conn::tcp(&format!("127.0.0.1:{port}"));
    t.authenticate();
    assert_eq!(t.call_ok("ping", None), json!("pong"));
    let mut u = agent.connect_authed();
    let s = u.call_ok("status", None);
    assert_eq!(s["connections"], json!(2), "tcp + unix: {s}");
    // pre-auth rules hold on TCP too
    let mut t2 = Conn::tcp(&format!("127.0.0.1:{port}"));
    t2.send_line(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
    assert_error(&t2.recv(), -32001, &json!(1));
    t2.expect_eof(READ_DEADLINE);
}

#[test]
fn tcp_port_zero_logs_the_bound_port() {
    let mut agent = Agent::builder()
        .arg("--listen")
        .arg("tcp:127.0.0.1:0")
        .start();
    agent.wait_for_log("listening on tcp:127.0.0.1:", START_DEADLINE);
    let log = agent.stderr();
    let port: u16 = log
        .lines()
        .find_map(|l| l.split("listening on tcp:127.0.0.1:").nth(1))
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in log:\n{log}"));
    assert_ne!(port, 0, "logged port 0 instead of the bound port:\n{log}");
    let mut t = Conn::tcp(&format!("127.0.0.1:{port}"));
    t.authenticate();
    assert_eq!(t.call_ok("ping", None), json!("pong"));
}

#[test]
fn connections_are_logged_with_peer() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.call_ok("ping", None);
    drop(c);
    // One line says a connection opened from a unix peer; another that it
    // closed.
    let mut log = String::new();
    let ok = wait_until(Duration::from_secs(3), || {
        log = agent.stderr();
        let opened = log
            .lines()
            .any(|l| l.contains("open") && l.contains("unix") && !l.contains("listening on"));
        opened && log.lines().any(|l| l.contains("closed"))
    });
    assert!(
        ok,
        "open (with peer) / close of a unix connection not logged:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// Further edge cases a client can hit
// ---------------------------------------------------------------------------

#[test]
fn escaped_strings_are_decoded() {
    let agent = Agent::start();
    let mut c = agent.connect();
    // the ticket and the method name spelled with \u escapes
    let escaped_ticket: String = TICKET
        .chars()
        .map(|ch| format!("\\u{:04x}", ch as u32))
        .collect();
    c.send_line(&format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"authentic\u0061te","params":["{escaped_ticket}"]}}"#
    ));
    assert_eq!(c.recv()["result"], auth_result());
    c.send_line(r#"{"jsonrpc":"2.0","id":"a\"b\u00e9\\","method":"p\u0069ng"}"#);
    let r = c.recv();
    assert_eq!(r["id"], json!("a\"b\u{e9}\\"), "{r}");
    assert_eq!(r["result"], json!("pong"), "{r}");
}

#[test]
fn max_request_bytes_boundary() {
    let agent = Agent::builder()
        .arg("--max-request-bytes")
        .arg("1024")
        .start();
    let mut c = agent.connect_authed();
    for (len, ok) in [(1023, true), (1024, true), (1025, false)] {
        let mut line = br#"{"jsonrpc":"2.0","id":7,"method":"ping""#.to_vec();
        line.resize(len - 1, b' ');
        line.push(b'}');
        assert_eq!(line.len(), len);
        line.push(b'\n');
        c.send(&line);
        let r = c.recv();
        if ok {
            assert_eq!(r["result"], json!("pong"), "{len} bytes: {r}");
        } else {
            assert_error(&r, -32600, &Value::Null);
        }
    }
}

#[test]
fn deeply_nested_json_does_not_crash() {
    let mut agent = Agent::start();
    let mut c = agent.connect_authed();
    // unbalanced: a parse error
    c.send_line(&"[".repeat(100_000));
    assert_error(&c.recv(), -32700, &Value::Null);
    // balanced and deep: a parse error (recursion limit) or an invalid batch
    c.send_line(&format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)));
    let r = c.recv();
    if r.is_object() {
        assert!([-32700, -32600].contains(&error_code(&r)), "{r}");
    }
    c.send_line(&format!(
        "{}{}",
        "{\"a\":".repeat(20_000),
        "}".repeat(20_000)
    ));
    let r = c.recv();
    assert!([-32700, -32600].contains(&error_code(&r)), "{r}");
    assert_next_is_pong(&mut c, 1);
    assert!(agent.is_running());
}

#[test]
fn lone_0xff_line_is_ignored() {
    let agent = Agent::start();
    let mut c = agent.connect();
    c.send(b"\xff\n\xff\xff\r\n");
    c.expect_silence(ms(200));
    c.authenticate();
    c.send(b"\xff\n");
    assert_next_is_pong(&mut c, 1);
}

#[test]
fn invalid_notification_is_answered_with_null_id() {
    let agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(r#"{"jsonrpc":"2.0","method":"ping","params":"bar"}"#);
    assert_error(&c.recv(), -32600, &Value::Null);
    c.send_line(r#"{"jsonrpc":"1.0","method":"ping"}"#);
    assert_error(&c.recv(), -32600, &Value::Null);
}

#[test]
fn half_close_still_gets_every_response() {
    // `printf ... | socat - UNIX-CONNECT:...` half-closes right after writing.
    let agent = Agent::start();
    let s = UnixStream::connect(&agent.sock).expect("connect");
    let mut w = s.try_clone().expect("clone");
    let mut c = Conn::from_stream(Box::new(s));
    let mut bytes = format!("{}\n", auth_line(0)).into_bytes();
    for i in 1..=20 {
        bytes.extend_from_slice(
            format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#).as_bytes(),
        );
        bytes.push(b'\n');
    }
    w.write_all(&bytes).expect("write");
    w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut ids = Vec::new();
    for _ in 0..21 {
        ids.push(c.recv()["id"].as_u64().unwrap_or(999));
    }
    ids.sort();
    assert_eq!(ids, (0..=20).collect::<Vec<u64>>());
    c.expect_eof(READ_DEADLINE);
}

#[test]
fn stop_inside_a_batch_answers_the_whole_batch() {
    let mut agent = Agent::start();
    let mut c = agent.connect_authed();
    c.send_line(
        r#"[{"jsonrpc":"2.0","id":1,"method":"stop"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
    );
    let r = c.recv();
    assert_eq!(by_id(&r, &json!(1))["result"], json!({"stopping": true}));
    assert_eq!(by_id(&r, &json!(2))["result"], json!("pong"));
    agent.expect_exit_code(0, Duration::from_secs(7));
}

#[test]
fn auth_deadline_is_not_extended_by_trickling_bytes() {
    let agent = Agent::builder().arg("--auth-timeout").arg("1").start();
    let mut c = agent.connect();
    let t0 = Instant::now();
    loop {
        if c.try_send(b" ").is_err() {
            break;
        }
        match c.recv_line_within(ms(100)) {
            Recv::Eof(_) => break,
            Recv::Line(l) => {
                let v = parse_response_line(&String::from_utf8_lossy(&l));
                assert!(v["error"].is_object(), "{v}");
            }
            Recv::Timeout => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "trickling kept the connection open"
        );
    }
    assert!(t0.elapsed() >= ms(700), "closed after {:?}", t0.elapsed());
}

#[test]
fn idle_watchdog_is_not_reset_by_unauthenticated_traffic() {
    let mut agent = Agent::builder().idle_timeout(Some(2)).start();
    let t0 = Instant::now();
    loop {
        if !agent.is_running() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "pre-auth requests kept the agent alive"
        );
        if let Ok(s) = UnixStream::connect(&agent.sock) {
            let mut c = Conn::from_stream(Box::new(s));
            if c.try_send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n")
                .is_ok()
            {
                let _ = c.recv_line_within(ms(500));
            }
        }
        thread::sleep(ms(200));
    }
    agent.expect_exit_code(0, Duration::from_secs(1));
}
