//! Replays every exchange recorded from a real kube-apiserver (`shared/kube-api/`)
//! against kube-fake and compares status codes, Content-Types and bodies.
//!
//! Values a server chooses (uids, timestamps, resourceVersions, generated names,
//! ClusterIPs, node ports) are not compared, but checked for shape or range; the
//! recorded resourceVersions, node ports and continue tokens are mapped to the ones
//! this server gave, so later requests that carry them ask the same question.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn fixtures_dir() -> PathBuf {
    std::env::var_os("XLB_KUBE_API_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/kube-api"
            ))
        })
}

/// Every fixture file, by number.
fn fixtures() -> Vec<(u32, String, Value)> {
    let dir = fixtures_dir();
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let Some(number) = name.get(..2).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !name.ends_with(".json") {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {name}: {e}"));
        let exchange: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        out.push((number, name, exchange));
    }
    out.sort_by_key(|(n, _, _)| *n);
    assert!(
        out.len() >= 60,
        "expected all fixtures in {}, found {}",
        dir.display(),
        out.len()
    );
    out
}

fn client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// What the server answered.
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

/// What a watch streamed.
struct Streamed {
    status: u16,
    events: Vec<(f64, Value)>,
    closed_after: f64,
}

fn build_request(
    base: &str,
    method: &str,
    uri: &str,
    headers: &Value,
    body: Option<Vec<u8>>,
) -> hyper::Request<Full<Bytes>> {
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(format!("{base}{uri}"));
    for (name, value) in headers.as_object().into_iter().flatten() {
        builder = builder.header(name.as_str(), value.as_str().unwrap_or_default());
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request builds")
}

async fn send(
    http: &HttpClient,
    base: &str,
    method: &str,
    uri: &str,
    headers: &Value,
    body: Option<Vec<u8>>,
) -> Answer {
    let request = build_request(base, method, uri, headers, body);
    let response = tokio::time::timeout(Duration::from_secs(10), http.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {uri}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        content_type,
        body,
    }
}

async fn watch(
    http: HttpClient,
    base: String,
    uri: String,
    headers: Value,
    limit: Duration,
) -> Streamed {
    let started = Instant::now();
    let request = build_request(&base, "GET", &uri, &headers, None);
    let response = http
        .request(request)
        .await
        .unwrap_or_else(|e| panic!("watch {uri}: {e}"));
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at((started + limit).into(), body.frame()).await {
            Err(_) => panic!("watch {uri} still open after {limit:?}"),
            Ok(None) => break,
            Ok(Some(frame)) => frame.unwrap_or_else(|e| panic!("watch {uri}: {e}")),
        };
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let event: Value = serde_json::from_slice(&line)
                    .unwrap_or_else(|e| panic!("watch {uri}: bad line: {e}"));
                events.push((started.elapsed().as_secs_f64(), event));
            }
        }
    }
    Streamed {
        status,
        events,
        closed_after: started.elapsed().as_secs_f64(),
    }
}

/// Values this server chose in place of the recorded ones.
#[derive(Default)]
struct Mapping {
    rv: HashMap<String, String>,
    node_ports: HashMap<i64, i64>,
    tokens: HashMap<String, String>,
}

impl Mapping {
    /// Maps the resourceVersion and continue token of a query. A resourceVersion
    /// never seen (one the recorder got from a request not recorded) is taken to be
    /// the current one.
    fn query(&mut self, query: &str, current_rv: u64) -> String {
        query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some(("resourceVersion", v)) if v != "0" => {
                    let mapped = self
                        .rv
                        .entry(v.to_string())
                        .or_insert_with(|| current_rv.to_string())
                        .clone();
                    format!("resourceVersion={mapped}")
                }
                Some(("continue", v)) => {
                    format!("continue={}", self.tokens.get(v).map_or(v, String::as_str))
                }
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    fn body(&self, body: &mut Value) {
        match body {
            Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    match (key.as_str(), &*value) {
                        ("resourceVersion", Value::String(rv)) => {
                            if let Some(mapped) = self.rv.get(rv) {
                                *value = json!(mapped);
                            }
                        }
                        ("nodePort", Value::Number(n)) => {
                            if let Some(mapped) = n.as_i64().and_then(|n| self.node_ports.get(&n)) {
                                *value = json!(mapped);
                            }
                        }
                        _ => self.body(value),
                    }
                }
                // A JSON patch `test` of the resourceVersion.
                if map.get("path") == Some(&json!("/metadata/resourceVersion"))
                    && let Some(Value::String(rv)) = map.get("value")
                    && let Some(mapped) = self.rv.get(rv)
                {
                    map.insert("value".into(), json!(mapped));
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.body(v)),
            _ => {}
        }
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn is_time(s: &str) -> bool {
    s.len() == 20 && s.ends_with('Z') && s.as_bytes().get(10) == Some(&b'T')
}

fn is_service_ip(s: &str) -> bool {
    s.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.octets()[..2] == [10, 96])
}

/// Replaces node ports (30000–32767) and Service IPs in a string by placeholders,
/// and the versions in a "too old resource version" message.
fn normalize_text(s: &str) -> String {
    if s.starts_with("too old resource version:") {
        return s.replace(|c: char| c.is_ascii_digit(), "");
    }
    let mut out = String::new();
    for token in s.split_inclusive(|c: char| !(c.is_ascii_alphanumeric() || c == '.')) {
        let (word, sep) = match token.char_indices().last() {
            Some((i, c)) if !(c.is_ascii_alphanumeric() || c == '.') => (&token[..i], &token[i..]),
            _ => (token, ""),
        };
        let normalized = if word
            .parse::<i64>()
            .is_ok_and(|n| (30000..=32767).contains(&n))
        {
            "<nodePort>".to_string()
        } else if is_service_ip(word) && word != "10.96.0.1" {
            "<clusterIP>".to_string()
        } else {
            word.to_string()
        };
        out.push_str(&normalized);
        out.push_str(sep);
    }
    out
}

fn manager_key(entry: &Value) -> String {
    format!(
        "{}|{}|{}",
        entry["manager"].as_str().unwrap_or_default(),
        entry["operation"].as_str().unwrap_or_default(),
        entry["subresource"].as_str().unwrap_or_default()
    )
}

/// Compares an expected (recorded) value with the actual one, collecting
/// differences, and learning the mapping of server-chosen values.
fn compare(
    expected: &Value,
    actual: &Value,
    path: &str,
    map: &mut Mapping,
    diffs: &mut Vec<String>,
) {
    let key = path.rsplit('.').next().unwrap_or_default();
    let mut diff = |what: String| diffs.push(format!("{path}: {what}"));
    match (key, expected, actual) {
        ("uid", Value::String(_), Value::String(a)) => {
            if !is_uuid(a) {
                diff(format!("not a uid: {a}"));
            }
        }
        ("resourceVersion", Value::String(e), Value::String(a)) => {
            if e.parse::<i64>().is_ok() && a.parse::<i64>().is_err() {
                diff(format!("not a resourceVersion: {a}"));
            }
            map.rv.insert(e.clone(), a.clone());
        }
        (
            "creationTimestamp" | "deletionTimestamp" | "time",
            Value::String(_),
            Value::String(a),
        ) => {
            if !is_time(a) {
                diff(format!("not a time: {a}"));
            }
        }
        ("continue", Value::String(e), Value::String(a)) => {
            if a.is_empty() {
                diff("empty continue token".into());
            }
            map.tokens.insert(e.clone(), a.clone());
        }
        ("clusterIP", Value::String(e), Value::String(a)) if e != "None" && e != "10.96.0.1" => {
            if !is_service_ip(a) {
                diff(format!("not a Service IP: {a}"));
            }
        }
        ("nodePort" | "healthCheckNodePort", Value::Number(e), Value::Number(a)) => {
            let (e, a) = (e.as_i64().unwrap_or(0), a.as_i64().unwrap_or(0));
            if !(30000..=32767).contains(&a) {
                diff(format!("node port {a} out of range"));
            }
            map.node_ports.insert(e, a);
        }
        ("message" | "cells", _, _) => {
            let norm = |v: &Value| match v {
                Value::String(s) => json!(normalize_text(s)),
                Value::Array(cells) => Value::Array(
                    cells
                        .iter()
                        .map(|c| match c.as_str() {
                            // Ages are whatever time passed.
                            Some(s)
                                if s.ends_with('s') && s[..s.len() - 1].parse::<u64>().is_ok() =>
                            {
                                json!("<age>")
                            }
                            Some(s) => json!(normalize_text(s)),
                            None => c.clone(),
                        })
                        .collect(),
                ),
                other => other.clone(),
            };
            let (e, a) = (norm(expected), norm(actual));
            if e != a {
                diff(format!("expected {e}, got {a}"));
            }
        }
        ("name", Value::String(e), Value::String(a))
            if path.ends_with("metadata.name")
                && e.len() == a.len()
                && e.len() > 6
                && e[..e.len() - 5].ends_with('-')
                && a.starts_with(&e[..e.len() - 5])
                && e != a =>
        {
            // A generated name: same prefix, random 5-character suffix.
        }
        ("managedFields", Value::Array(e), Value::Array(a)) => {
            let mut e = e.clone();
            let mut a = a.clone();
            e.sort_by_key(manager_key);
            a.sort_by_key(manager_key);
            compare(
                &Value::Array(e),
                &Value::Array(a),
                &format!("{path}[]"),
                map,
                diffs,
            );
        }
        (_, Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => compare(ev, av, &format!("{path}.{k}"), map, diffs),
                    None => diffs.push(format!("{path}.{k}: missing (expected {ev})")),
                }
            }
            for k in a.keys().filter(|k| !e.contains_key(*k)) {
                diffs.push(format!("{path}.{k}: unexpected {}", a[k]));
            }
        }
        (_, Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                diff(format!(
                    "expected {} items, got {}: {}",
                    e.len(),
                    a.len(),
                    Value::Array(a.clone())
                ));
                return;
            }
            let element = if path.ends_with("[]") {
                path.to_string()
            } else {
                format!("{path}[]")
            };
            for (ev, av) in e.iter().zip(a) {
                if key == "clusterIPs"
                    && ev.as_str().is_some_and(|s| s != "None" && s != "10.96.0.1")
                {
                    if !av.as_str().is_some_and(is_service_ip) {
                        diffs.push(format!("{element}: not a Service IP: {av}"));
                    }
                    continue;
                }
                compare(ev, av, &element, map, diffs);
            }
        }
        (_, e, a) => {
            if e != a {
                diff(format!("expected {e}, got {a}"));
            }
        }
    }
}

fn request_uri(request: &Value, map: &mut Mapping, current_rv: u64) -> String {
    let path = request["path"].as_str().unwrap_or_default();
    match request["query"].as_str() {
        None => path.to_string(),
        Some(query) => format!("{path}?{}", map.query(query, current_rv)),
    }
}

fn request_body(request: &Value, map: &Mapping) -> Option<Vec<u8>> {
    match &request["body"] {
        Value::Null => None,
        Value::String(yaml) => Some(yaml.clone().into_bytes()),
        body => {
            let mut body = body.clone();
            map.body(&mut body);
            Some(serde_json::to_vec(&body).expect("body serializes"))
        }
    }
}

/// One server and what has been learnt about it while replaying.
struct Replay {
    server: kube_fake::Server,
    http: HttpClient,
    map: Mapping,
    failures: Vec<String>,
}

impl Replay {
    async fn new() -> Replay {
        let server = kube_fake::Server::start().await.expect("kube-fake starts");
        Replay {
            server,
            http: client(),
            map: Mapping::default(),
            failures: Vec::new(),
        }
    }

    fn base(&self) -> String {
        self.server.url()
    }

    /// Replays one plain exchange and compares it.
    async fn exchange(&mut self, name: &str, exchange: &Value) {
        let request = &exchange["request"];
        let uri = request_uri(request, &mut self.map, self.server.resource_version());
        let answer = send(
            &self.http,
            &self.base(),
            request["method"].as_str().unwrap_or("GET"),
            &uri,
            &request["headers"],
            request_body(request, &self.map),
        )
        .await;
        let response = &exchange["response"];
        let mut diffs = Vec::new();
        if i64::from(answer.status) != response["status"].as_i64().unwrap_or_default() {
            diffs.push(format!(
                "status: expected {}, got {} ({})",
                response["status"], answer.status, answer.body
            ));
        }
        let expected_type = response["headers"]["Content-Type"]
            .as_str()
            .unwrap_or_default();
        if answer.content_type != expected_type {
            diffs.push(format!(
                "Content-Type: expected {expected_type:?}, got {:?}",
                answer.content_type
            ));
        }
        compare(
            &response["body"],
            &answer.body,
            "body",
            &mut self.map,
            &mut diffs,
        );
        self.record(name, diffs);
    }

    fn record(&mut self, name: &str, diffs: Vec<String>) {
        for d in diffs.into_iter().take(20) {
            self.failures.push(format!("{name}: {d}"));
        }
    }

    /// Starts the watch of an exchange in the background.
    fn start_watch(
        &mut self,
        exchange: &Value,
        query_override: Option<&str>,
    ) -> tokio::task::JoinHandle<Streamed> {
        let request = &exchange["request"];
        let mut request = request.clone();
        if let Some(q) = query_override {
            request["query"] = json!(q);
        }
        let uri = request_uri(&request, &mut self.map, self.server.resource_version());
        let limit = Duration::from_secs_f64(
            exchange["response"]["closed_after_s"]
                .as_f64()
                .unwrap_or(5.0)
                + 5.0,
        );
        tokio::spawn(watch(
            self.http.clone(),
            self.base(),
            uri,
            request["headers"].clone(),
            limit,
        ))
    }

    /// Compares a finished watch with the recorded one: the same events in the same
    /// order (bookmarks without the initial-events-end mark are not guaranteed, so
    /// they are compared only when recorded), closed at about the same time.
    fn check_watch(&mut self, name: &str, exchange: &Value, streamed: &Streamed) {
        let response = &exchange["response"];
        let mut diffs = Vec::new();
        if i64::from(streamed.status) != response["status"].as_i64().unwrap_or_default() {
            diffs.push(format!(
                "status: expected {}, got {}",
                response["status"], streamed.status
            ));
        }
        let plain_bookmark = |e: &Value| {
            e["type"] == "BOOKMARK" && e.pointer("/object/metadata/annotations").is_none()
        };
        let expected: Vec<Value> = response["events"].as_array().cloned().unwrap_or_default();
        let recorded_bookmark = expected.iter().any(plain_bookmark);
        let actual_events: Vec<Value> = streamed.events.iter().map(|(_, e)| e.clone()).collect();
        let keep = |events: &[Value]| -> Vec<Value> {
            events
                .iter()
                .filter(|e| !plain_bookmark(e))
                .cloned()
                .collect()
        };
        compare(
            &Value::Array(keep(&expected)),
            &Value::Array(keep(&actual_events)),
            "events",
            &mut self.map,
            &mut diffs,
        );
        if recorded_bookmark {
            let expected_bookmarks: Vec<Value> = expected
                .iter()
                .filter(|e| plain_bookmark(e))
                .cloned()
                .collect();
            let actual_bookmarks: Vec<Value> = actual_events
                .iter()
                .filter(|e| plain_bookmark(e))
                .cloned()
                .collect();
            compare(
                &Value::Array(expected_bookmarks),
                &Value::Array(actual_bookmarks),
                "bookmarks",
                &mut self.map,
                &mut diffs,
            );
            let last_bookmark = streamed
                .events
                .iter()
                .rev()
                .find(|(_, e)| plain_bookmark(e))
                .map(|(t, _)| *t);
            if last_bookmark.is_some_and(|t| t >= streamed.closed_after) {
                diffs.push("the bookmark did not arrive before the stream closed".into());
            }
        }
        let recorded_close = response["closed_after_s"].as_f64().unwrap_or_default();
        if (streamed.closed_after - recorded_close).abs() > 1.5 {
            diffs.push(format!(
                "closed after {:.2} s, recorded {recorded_close} s",
                streamed.closed_after
            ));
        }
        self.record(name, diffs);
    }

    /// A request this replay makes itself (what the recorder did between exchanges).
    async fn act(&self, method: &str, uri: &str, content_type: &str, body: Value) -> Answer {
        let headers = json!({ "Content-Type": content_type });
        let answer = send(
            &self.http,
            &self.base(),
            method,
            uri,
            &headers,
            Some(serde_json::to_vec(&body).expect("json")),
        )
        .await;
        assert!(
            answer.status < 300,
            "{method} {uri} failed: {} {}",
            answer.status,
            answer.body
        );
        answer
    }

    /// Creates the Service a watch event shows (without what the server allocated).
    async fn create_from_event(&self, event: &Value) {
        let obj = &event["object"];
        let mut spec = obj["spec"].clone();
        for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            spec.as_object_mut().map(|s| s.remove(field));
        }
        if let Some(Value::Array(ports)) = spec.get_mut("ports") {
            for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                port.remove("nodePort");
            }
        }
        let mut metadata = json!({ "name": obj["metadata"]["name"] });
        if let Some(labels) = obj["metadata"].get("labels") {
            metadata["labels"] = labels.clone();
        }
        let body =
            json!({ "apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec });
        self.act(
            "POST",
            "/api/v1/namespaces/default/services",
            "application/json",
            body,
        )
        .await;
    }
}

fn event_of<'a>(exchange: &'a Value, kind: &str) -> &'a Value {
    exchange["response"]["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} event recorded"))
}

#[tokio::test]
async fn discovery_and_openapi_documents_are_served_exactly() {
    let mut replay = Replay::new().await;
    for (number, name, exchange) in fixtures() {
        if number > 15 {
            continue;
        }
        let request = &exchange["request"];
        let uri = request_uri(request, &mut replay.map, 0);
        let answer = send(
            &replay.http,
            &replay.base(),
            "GET",
            &uri,
            &request["headers"],
            None,
        )
        .await;
        let response = &exchange["response"];
        assert_eq!(
            i64::from(answer.status),
            response["status"].as_i64().unwrap_or_default(),
            "{name}: status"
        );
        assert_eq!(
            answer.content_type,
            response["headers"]["Content-Type"]
                .as_str()
                .unwrap_or_default(),
            "{name}: Content-Type"
        );
        assert!(
            answer.body == response["body"],
            "{name}: the body differs from the recorded document"
        );
        replay.failures.clear();
    }
}

#[tokio::test]
async fn transcripts_replay_like_the_real_server() {
    let all = fixtures();
    let get = |n: u32| -> &Value {
        &all.iter()
            .find(|(number, _, _)| *number == n)
            .unwrap_or_else(|| panic!("fixture {n:02} missing"))
            .2
    };
    let mut replay = Replay::new().await;
    let mut replayed = 0;
    for (number, name, exchange) in &all {
        let number = *number;
        match number {
            ..=19 => continue,
            // Recorded on a separate etcd 3.6 store; replayed on their own server below.
            57..=59 => continue,
            // The old etcd's error must not be reproduced: the same requests must
            // stream the initial events (as 58/59 show), checked below.
            51 | 52 => {
                let shortened = exchange["request"]["query"]
                    .as_str()
                    .unwrap_or_default()
                    .replace("timeoutSeconds=5", "timeoutSeconds=1");
                let streamed = replay
                    .start_watch(exchange, Some(&shortened))
                    .await
                    .expect("watch task");
                let types: Vec<&str> = streamed
                    .events
                    .iter()
                    .map(|(_, e)| e["type"].as_str().unwrap_or_default())
                    .collect();
                assert!(
                    !types.contains(&"ERROR") && types.first() == Some(&"ADDED"),
                    "{name}: a streaming list must stream the initial events, got {types:?}"
                );
                assert!(
                    streamed.events.iter().any(|(_, e)| e
                        .pointer("/object/metadata/annotations/k8s.io~1initial-events-end")
                        == Some(&json!("true"))),
                    "{name}: no initial-events-end bookmark"
                );
            }
            50 => {
                // The recorder created, patched and deleted `watch-demo` during the watch.
                let task = replay.start_watch(exchange, None);
                tokio::time::sleep(Duration::from_millis(300)).await;
                replay.create_from_event(event_of(exchange, "ADDED")).await;
                let ingress = event_of(exchange, "MODIFIED")["object"]["status"].clone();
                replay
                    .act(
                        "PATCH",
                        "/api/v1/namespaces/default/services/watch-demo/status",
                        "application/merge-patch+json",
                        json!({ "status": ingress }),
                    )
                    .await;
                replay
                    .act(
                        "DELETE",
                        "/api/v1/namespaces/default/services/watch-demo",
                        "application/json",
                        json!({}),
                    )
                    .await;
                let streamed = task.await.expect("watch task");
                replay.check_watch(name, exchange, &streamed);
            }
            53 => {
                // Keep exactly the changes after the watch's version, so that 53 is in
                // the window and 54–56 (older versions) are not.
                let from: u64 = exchange["request"]["query"]
                    .as_str()
                    .and_then(|q| {
                        q.split('&')
                            .find_map(|p| p.strip_prefix("resourceVersion="))
                    })
                    .and_then(|rv| replay.map.rv.get(rv))
                    .and_then(|rv| rv.parse().ok())
                    .expect("the resourceVersion of 53 is known from 50");
                replay
                    .server
                    .set_history_limit((replay.server.resource_version() - from) as usize);
                let streamed = replay
                    .start_watch(exchange, None)
                    .await
                    .expect("watch task");
                replay.check_watch(name, exchange, &streamed);
            }
            54 => {
                let streamed = replay
                    .start_watch(exchange, None)
                    .await
                    .expect("watch task");
                replay.check_watch(name, exchange, &streamed);
            }
            90 => {
                // The recorder had deleted np-reuse by then.
                replay
                    .act(
                        "DELETE",
                        "/api/v1/namespaces/default/services/np-reuse",
                        "application/json",
                        json!({}),
                    )
                    .await;
                replay.exchange(name, exchange).await;
            }
            91 => {
                // The recorder labelled `echo` during the watch.
                let task = replay.start_watch(exchange, None);
                tokio::time::sleep(Duration::from_millis(500)).await;
                replay
                    .act(
                        "PATCH",
                        "/api/v1/namespaces/default/services/echo",
                        "application/merge-patch+json",
                        json!({"metadata": {"labels": {"watched": "yes"}}}),
                    )
                    .await;
                let streamed = task.await.expect("watch task");
                replay.check_watch(name, exchange, &streamed);
            }
            _ => replay.exchange(name, exchange).await,
        }
        replayed += 1;
    }

    // 57–59 on a fresh server, as recorded.
    let mut fresh = Replay::new().await;
    fresh.exchange("57", get(57)).await;
    let task = fresh.start_watch(get(58), None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = &get(58)["response"]["events"][3];
    fresh.create_from_event(after).await;
    let streamed = task.await.expect("watch task");
    fresh.check_watch("58", get(58), &streamed);
    let streamed = fresh.start_watch(get(59), None).await.expect("watch task");
    fresh.check_watch("59", get(59), &streamed);

    let mut failures = replay.failures;
    failures.extend(fresh.failures);
    assert!(replayed >= 60, "only {replayed} transcripts replayed");
    assert!(
        failures.is_empty(),
        "{} differences from the real server:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_comparison_notices_differences() {
    let mut map = Mapping::default();
    let mut diffs = Vec::new();
    compare(
        &json!({"metadata": {"uid": "1e19309d-5af1-48df-a6fa-b64836897444", "resourceVersion": "1"}, "spec": {"type": "A", "ports": [{"nodePort": 30001}]}}),
        &json!({"metadata": {"uid": "x", "resourceVersion": "7"}, "spec": {"type": "B", "ports": [{"nodePort": 80}]}, "extra": 1}),
        "body",
        &mut map,
        &mut diffs,
    );
    assert_eq!(diffs.len(), 4, "{diffs:?}");
    assert_eq!(map.rv.get("1").map(String::as_str), Some("7"));
    assert_eq!(
        normalize_text("Invalid value: 32484: provided port"),
        "Invalid value: <nodePort>: provided port"
    );
}
