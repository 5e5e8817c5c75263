//! The patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic
//! merge patch, and the structural merge server-side apply does.

use serde_json::{Map, Value};

use crate::schema::{self, ListType, PatchStrategy};

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not shaped as its format requires.
    #[error("{0}")]
    Malformed(String),
    /// A JSON patch `test` operation failed.
    #[error("the server rejected our request due to an error in our request")]
    TestFailed,
}

/// Applies a JSON merge patch (RFC 7386) to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Applies a JSON patch (RFC 6902) to `target`.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Malformed("json patch must be a list of operations".into()))?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError::Malformed(format!("missing path in {op}")))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Malformed(format!("missing value in {op}")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Malformed(format!("missing from in {op}")))
        };
        match name {
            "add" => pointer_add(target, path, value()?)?,
            "remove" => {
                pointer_remove(target, path)?;
            }
            "replace" => {
                pointer_remove(target, path)?;
                pointer_add(target, path, value()?)?;
            }
            "move" => {
                let moved = pointer_remove(target, from()?)?;
                pointer_add(target, path, moved)?;
            }
            "copy" => {
                let copied = target
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| PatchError::Malformed(format!("missing path {path}")))?;
                pointer_add(target, path, copied)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(PatchError::TestFailed);
                }
            }
            other => {
                return Err(PatchError::Malformed(format!("Unexpected kind: {other}")));
            }
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), PatchError> {
    let idx = path
        .rfind('/')
        .ok_or_else(|| PatchError::Malformed(format!("invalid JSON pointer {path:?}")))?;
    let last = path[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..idx].to_string(), last))
}

fn pointer_add(target: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let missing = || {
        PatchError::Malformed(format!(
            "add operation does not apply: doc is missing path: {path:?}"
        ))
    };
    match target.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(map) => {
            map.insert(last, value);
        }
        Value::Array(items) => {
            let idx = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>().map_err(|_| missing())?
            };
            if idx > items.len() {
                return Err(missing());
            }
            items.insert(idx, value);
        }
        _ => return Err(missing()),
    }
    Ok(())
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parent, last) = split_pointer(path)?;
    let missing = || {
        PatchError::Malformed(format!(
            "remove operation does not apply: doc is missing path: {path:?}"
        ))
    };
    match target.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(map) => map.remove(&last).ok_or_else(missing),
        Value::Array(items) => {
            let idx = last.parse::<usize>().map_err(|_| missing())?;
            if idx >= items.len() {
                return Err(missing());
            }
            Ok(items.remove(idx))
        }
        _ => Err(missing()),
    }
}

/// Applies a strategic merge patch to `target`, an object of `kind`.
pub fn strategic_merge(kind: &str, target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    smp_value(kind, "", target, patch)
}

fn smp_value(kind: &str, path: &str, target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return Ok(());
    };
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(remove)) = (target.get_mut(list), value)
            {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            // `$setElementOrder/…`, `$retainKeys`, `$patch`: ordering and pruning
            // hints this server does not need.
            continue;
        }
        let child = schema::child(path, key);
        if value.is_null() {
            target.remove(key);
            continue;
        }
        let slot = target.entry(key.clone()).or_insert(Value::Null);
        match (value, schema::patch_strategy(kind, &child)) {
            (Value::Array(items), PatchStrategy::MergeKey(merge_key)) => {
                smp_keyed_list(kind, &child, slot, items, merge_key)?;
            }
            (Value::Array(items), PatchStrategy::MergeScalars) => {
                let mut merged = slot.as_array().cloned().unwrap_or_default();
                for item in items {
                    if !merged.contains(item) {
                        merged.push(item.clone());
                    }
                }
                *slot = Value::Array(merged);
            }
            (Value::Object(_), _) if !schema::atomic_map(kind, &child) => {
                smp_value(kind, &child, slot, value)?;
            }
            _ => *slot = value.clone(),
        }
    }
    Ok(())
}

fn smp_keyed_list(
    kind: &str,
    path: &str,
    slot: &mut Value,
    patch_items: &[Value],
    merge_key: &str,
) -> Result<(), PatchError> {
    let mut merged = slot.as_array().cloned().unwrap_or_default();
    let element = schema::element(path);
    for item in patch_items {
        let key = item.get(merge_key).ok_or_else(|| {
            PatchError::Malformed(format!(
                "map: {item} does not contain declared merge key: {merge_key}"
            ))
        })?;
        let existing = merged.iter().position(|m| m.get(merge_key) == Some(key));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (existing, delete) {
            (Some(idx), true) => {
                merged.remove(idx);
            }
            (None, true) => {}
            (Some(idx), false) => smp_value(kind, &element, &mut merged[idx], item)?,
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                smp_value(kind, &element, &mut fresh, item)?;
                merged.push(fresh);
            }
        }
    }
    *slot = Value::Array(merged);
    Ok(())
}

/// The structural merge of server-side apply: `config` over `live`, maps merged,
/// list-maps merged by key, sets united, everything else replaced.
pub fn apply_merge(kind: &str, path: &str, live: &mut Value, config: &Value) {
    match config {
        Value::Object(config_map) if !schema::atomic_map(kind, path) => {
            if !live.is_object() {
                *live = Value::Object(Map::new());
            }
            if let Value::Object(live_map) = live {
                for (key, value) in config_map {
                    let child = schema::child(path, key);
                    apply_merge(
                        kind,
                        &child,
                        live_map.entry(key.clone()).or_insert(Value::Null),
                        value,
                    );
                }
            }
        }
        Value::Array(items) => match schema::list_type(kind, path) {
            ListType::Atomic => *live = config.clone(),
            ListType::Set => {
                let mut merged = live.as_array().cloned().unwrap_or_default();
                for item in items {
                    if !merged.contains(item) {
                        merged.push(item.clone());
                    }
                }
                *live = Value::Array(merged);
            }
            ListType::Map(keys) => {
                let mut merged = live.as_array().cloned().unwrap_or_default();
                let element = schema::element(path);
                for item in items {
                    let key = list_key(kind, path, keys, item);
                    match merged
                        .iter()
                        .position(|m| list_key(kind, path, keys, m) == key)
                    {
                        Some(idx) => apply_merge(kind, &element, &mut merged[idx], item),
                        None => merged.push(item.clone()),
                    }
                }
                *live = Value::Array(merged);
            }
        },
        other => *live = other.clone(),
    }
}

/// The key of a list-map element: its key fields (defaulted), as a JSON object
/// with sorted fields, e.g. `{"port":80,"protocol":"TCP"}`.
pub fn list_key(kind: &str, path: &str, keys: &[&str], item: &Value) -> Map<String, Value> {
    let mut key = Map::new();
    for name in keys {
        let value = item.get(*name).cloned().or_else(|| {
            schema::key_default(kind, path, name).map(|d| Value::String(d.to_string()))
        });
        if let Some(value) = value {
            key.insert((*name).to_string(), value);
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_ports_by_port_and_replaces_external_ips() {
        let mut svc =
            json!({"spec": {"ports": [{"port": 80, "name": "a"}], "externalIPs": ["1.1.1.1"]}});
        strategic_merge(
            "Service",
            &mut svc,
            &json!({"$setElementOrder/ports": [{"port": 80}], "spec": {"ports": [{"port": 80, "name": "b"}, {"port": 81}], "externalIPs": ["2.2.2.2"]}}),
        )
        .expect("patch applies");
        assert_eq!(
            svc,
            json!({"spec": {"ports": [{"port": 80, "name": "b"}, {"port": 81}], "externalIPs": ["2.2.2.2"]}})
        );
    }

    #[test]
    fn json_patch_test_failure_is_reported() {
        let mut obj = json!({"metadata": {"resourceVersion": "2"}});
        let patch = json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}]);
        assert!(matches!(
            json_patch(&mut obj, &patch),
            Err(PatchError::TestFailed)
        ));
    }

    #[test]
    fn merge_patch_deletes_nulls() {
        let mut obj = json!({"a": {"b": 1, "c": 2}});
        merge_patch(&mut obj, &json!({"a": {"b": null, "d": 3}}));
        assert_eq!(obj, json!({"a": {"c": 2, "d": 3}}));
    }
}
