//! The representations a client can ask for with `Accept`: the object itself,
//! `PartialObjectMetadata`, or a `meta.k8s.io/v1` `Table` (what `kubectl get` prints).

use serde_json::{Map, Value, json};

use crate::discovery::Docs;
use crate::meta;
use crate::resources::Resource;

/// What the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The objects.
    Object,
    /// `PartialObjectMetadata` / `PartialObjectMetadataList`.
    Metadata,
    /// `Table`.
    Table,
}

impl Format {
    /// Reads the first acceptable representation of an `Accept` header.
    pub fn from_accept(accept: &str) -> Format {
        let first = accept.split(',').next().unwrap_or_default();
        if first.contains("as=Table") {
            Format::Table
        } else if first.contains("as=PartialObjectMetadata") {
            Format::Metadata
        } else {
            Format::Object
        }
    }
}

/// The `PartialObjectMetadata` of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

struct Column {
    name: &'static str,
    format: &'static str,
    priority: u8,
    /// `(definition, property)` in the OpenAPI v2 document the description comes from.
    doc: (&'static str, &'static str),
}

const fn column(name: &'static str, priority: u8, doc: (&'static str, &'static str)) -> Column {
    Column {
        name,
        format: "",
        priority,
        doc,
    }
}

const NAME: Column = Column {
    name: "Name",
    format: "name",
    priority: 0,
    doc: (OBJECT_META, "name"),
};
const AGE: Column = column("Age", 0, (OBJECT_META, "creationTimestamp"));

fn columns(res: &Resource) -> Vec<Column> {
    const SPEC: &str = "io.k8s.api.core.v1.ServiceSpec";
    const NODE: &str = "io.k8s.api.core.v1.NodeStatus";
    const EVENT: &str = "io.k8s.api.core.v1.Event";
    match (res.group, res.kind) {
        ("", "Service") => vec![
            NAME,
            column("Type", 0, (SPEC, "type")),
            column("Cluster-IP", 0, (SPEC, "clusterIP")),
            column("External-IP", 0, (SPEC, "externalIPs")),
            column("Port(s)", 0, (SPEC, "ports")),
            AGE,
            column("Selector", 1, (SPEC, "selector")),
        ],
        ("", "Node") => vec![
            NAME,
            column("Status", 0, (NODE, "conditions")),
            column("Roles", 0, ("", "")),
            AGE,
            column(
                "Version",
                0,
                ("io.k8s.api.core.v1.NodeSystemInfo", "kubeletVersion"),
            ),
            column("Internal-IP", 1, (NODE, "addresses")),
            column("External-IP", 1, (NODE, "addresses")),
        ],
        ("", "Event") => vec![
            column("Last Seen", 0, (EVENT, "lastTimestamp")),
            column("Type", 0, (EVENT, "type")),
            column("Reason", 0, (EVENT, "reason")),
            column("Object", 0, (EVENT, "involvedObject")),
            column("Message", 0, (EVENT, "message")),
        ],
        ("", "Namespace") => vec![
            NAME,
            column("Status", 0, ("io.k8s.api.core.v1.NamespaceStatus", "phase")),
            AGE,
        ],
        ("coordination.k8s.io", "Lease") => vec![
            NAME,
            column(
                "Holder",
                0,
                ("io.k8s.api.coordination.v1.LeaseSpec", "holderIdentity"),
            ),
            AGE,
        ],
        _ => vec![NAME, AGE],
    }
}

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn age(obj: &Value, pointer: &str) -> String {
    match meta::parse_rfc3339(text(obj, pointer)) {
        Some(t) => meta::human_duration(meta::now_secs().saturating_sub(t)),
        None => "<unknown>".into(),
    }
}

fn strings(obj: &Value, pointer: &str) -> Vec<String> {
    obj.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn service_cells(obj: &Value) -> Vec<Value> {
    let ty = text(obj, "/spec/type");
    let mut external = strings(obj, "/spec/externalIPs");
    let external = match ty {
        "LoadBalancer" => {
            let mut ingress: Vec<String> = obj
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("ip").or_else(|| i.get("hostname"))?.as_str())
                .map(str::to_string)
                .collect();
            ingress.append(&mut external);
            if ingress.is_empty() {
                "<pending>".into()
            } else {
                ingress.join(",")
            }
        }
        "ExternalName" => text(obj, "/spec/externalName").to_string(),
        _ => none_if_empty(external.join(",")),
    };
    let ports: Vec<String> = obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p.get("port").cloned().unwrap_or(Value::Null);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{port}:{np}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect();
    let selector: Vec<String> = obj
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    vec![
        json!(text(obj, "/metadata/name")),
        json!(ty),
        json!(none_if_empty(text(obj, "/spec/clusterIP").to_string())),
        json!(external),
        json!(none_if_empty(ports.join(","))),
        json!(age(obj, "/metadata/creationTimestamp")),
        json!(none_if_empty(selector.join(","))),
    ]
}

fn node_cells(obj: &Value) -> Vec<Value> {
    let ready = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c.get("type") == Some(&json!("Ready")))
        .map(|c| match c.get("status").and_then(Value::as_str) {
            Some("True") => "Ready",
            Some("False") => "NotReady",
            _ => "Unknown",
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_string();
    if obj.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<String> = obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect();
    let address = |ty: &str| {
        obj.pointer("/status/addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|a| a.get("type") == Some(&json!(ty)))
            .and_then(|a| a.get("address")?.as_str())
            .unwrap_or("<none>")
            .to_string()
    };
    vec![
        json!(text(obj, "/metadata/name")),
        json!(status),
        json!(none_if_empty(roles.join(","))),
        json!(age(obj, "/metadata/creationTimestamp")),
        json!(text(obj, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
    ]
}

fn event_cells(obj: &Value) -> Vec<Value> {
    let last_seen = ["/series/lastObservedTime", "/lastTimestamp", "/eventTime"]
        .iter()
        .find(|p| !text(obj, p).is_empty())
        .map(|p| age(obj, p))
        .unwrap_or_else(|| age(obj, "/metadata/creationTimestamp"));
    let object = format!(
        "{}/{}",
        text(obj, "/involvedObject/kind").to_lowercase(),
        text(obj, "/involvedObject/name")
    );
    vec![
        json!(last_seen),
        json!(text(obj, "/type")),
        json!(text(obj, "/reason")),
        json!(object),
        json!(text(obj, "/message")),
    ]
}

fn cells(res: &Resource, obj: &Value) -> Vec<Value> {
    match (res.group, res.kind) {
        ("", "Service") => service_cells(obj),
        ("", "Node") => node_cells(obj),
        ("", "Event") => event_cells(obj),
        ("", "Namespace") => vec![
            json!(text(obj, "/metadata/name")),
            json!(text(obj, "/status/phase")),
            json!(age(obj, "/metadata/creationTimestamp")),
        ],
        ("coordination.k8s.io", "Lease") => vec![
            json!(text(obj, "/metadata/name")),
            json!(text(obj, "/spec/holderIdentity")),
            json!(age(obj, "/metadata/creationTimestamp")),
        ],
        _ => vec![
            json!(text(obj, "/metadata/name")),
            json!(age(obj, "/metadata/creationTimestamp")),
        ],
    }
}

/// A `Table` of `objects` (in the resource's own form). `list_meta` is the table's
/// metadata; `with_columns` is false for the second and later events of a watch,
/// which carry `columnDefinitions: null`.
pub fn table(
    docs: &Docs,
    res: &Resource,
    objects: &[Value],
    list_meta: Map<String, Value>,
    with_columns: bool,
) -> Value {
    let definitions = if with_columns {
        Value::Array(
            columns(res)
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "type": "string",
                        "format": c.format,
                        "description": docs.description(c.doc.0, c.doc.1),
                        "priority": c.priority,
                    })
                })
                .collect(),
        )
    } else {
        Value::Null
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| json!({ "cells": cells(res, obj), "object": partial_metadata(obj) }))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": Value::Object(list_meta),
        "columnDefinitions": definitions,
        "rows": rows,
    })
}
