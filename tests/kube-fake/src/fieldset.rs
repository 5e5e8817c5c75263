//! Field ownership: `metadata.managedFields`, the sets of fields each manager owns,
//! and the bookkeeping of updates and server-side apply (conflicts, `force`,
//! pruning of fields an applier stopped applying).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::patch;
use crate::schema::{self, ListType};

/// A set of field paths, as a tree. `member` says the path to this node is in the
/// set itself (the `"."` of `fieldsV1` when the node also has children).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    /// Parses a `fieldsV1` object.
    pub fn from_fields_v1(value: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        if let Value::Object(map) = value {
            for (key, child) in map {
                if key == "." {
                    set.member = true;
                    continue;
                }
                let mut node = FieldSet::from_fields_v1(child);
                if node.children.is_empty() {
                    node.member = true;
                }
                set.children.insert(key.clone(), node);
            }
        }
        set
    }

    /// Serializes to `fieldsV1`.
    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    /// Whether no path is in the set.
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    fn node_mut(&mut self, path: &[String]) -> &mut FieldSet {
        path.iter().fold(self, |node, pe| {
            node.children.entry(pe.clone()).or_default()
        })
    }

    fn insert(&mut self, path: &[String]) {
        self.node_mut(path).member = true;
    }

    fn contains(&self, path: &[String]) -> bool {
        let mut node = self;
        for pe in path {
            match node.children.get(pe) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.member
    }

    /// Adds every path of `other`.
    pub fn union(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (key, child) in &other.children {
            self.children.entry(key.clone()).or_default().union(child);
        }
    }

    /// Removes the paths of `other` (exactly those paths, not what lies below them).
    pub fn subtract(&mut self, other: &FieldSet) {
        if other.member {
            self.member = false;
        }
        for (key, child) in &other.children {
            if let Some(mine) = self.children.get_mut(key) {
                mine.subtract(child);
            }
        }
        self.prune();
    }

    /// Removes the paths of `other` and everything below them.
    pub fn subtract_subtrees(&mut self, other: &FieldSet) {
        for (key, child) in &other.children {
            if child.member {
                self.children.remove(key);
            } else if let Some(mine) = self.children.get_mut(key) {
                mine.subtract_subtrees(child);
            }
        }
        self.prune();
    }

    fn prune(&mut self) {
        self.children.retain(|_, child| {
            child.prune();
            !child.is_empty()
        });
    }

    /// The paths in both sets.
    pub fn intersection(&self, other: &FieldSet) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        intersect(self, other, &mut Vec::new(), &mut out);
        out
    }

    /// Every path in the set.
    pub fn paths(&self) -> Vec<Vec<String>> {
        self.intersection(self)
    }
}

fn intersect(a: &FieldSet, b: &FieldSet, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if a.member && b.member {
        out.push(path.clone());
    }
    for (key, child) in &a.children {
        if let Some(other) = b.children.get(key) {
            path.push(key.clone());
            intersect(child, other, path, out);
            path.pop();
        }
    }
}

/// Formats a path the way conflict messages do: `.spec.ports[port=80,protocol="TCP"].name`.
pub fn path_string(path: &[String]) -> String {
    let mut out = String::new();
    for pe in path {
        if let Some(field) = pe.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = pe.strip_prefix("k:") {
            let fields: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(value) = pe.strip_prefix("v:") {
            out.push_str(&format!("[={value}]"));
        } else {
            out.push_str(&format!("[{pe}]"));
        }
    }
    out
}

fn key_element(kind: &str, path: &str, keys: &[&str], item: &Value) -> String {
    let key = patch::list_key(kind, path, keys, item);
    format!("k:{}", Value::Object(key))
}

fn is_absent(value: Option<&Value>) -> bool {
    value.is_none_or(Value::is_null)
}

/// What an update changed: paths added or modified, and paths removed.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Added or modified paths.
    pub changed: FieldSet,
    /// Removed paths.
    pub removed: FieldSet,
}

/// Compares two tracked views of an object of `kind`.
pub fn compare(kind: &str, old: &Value, new: &Value) -> Comparison {
    let mut cmp = Comparison::default();
    diff(kind, "", Some(old), Some(new), &mut Vec::new(), &mut cmp);
    cmp
}

fn diff(
    kind: &str,
    spath: &str,
    old: Option<&Value>,
    new: Option<&Value>,
    path: &mut Vec<String>,
    cmp: &mut Comparison,
) {
    let (old, new) = match (is_absent(old), is_absent(new)) {
        (true, true) => return,
        (true, false) => {
            if let Some(new) = new {
                added(kind, spath, new, path, &mut cmp.changed);
            }
            return;
        }
        (false, true) => {
            cmp.removed.insert(path);
            return;
        }
        (false, false) => match (old, new) {
            (Some(old), Some(new)) => (old, new),
            _ => return,
        },
    };
    match (old, new) {
        (Value::Object(o), Value::Object(n)) if !schema::atomic_map(kind, spath) => {
            let keys: std::collections::BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for key in keys {
                path.push(format!("f:{key}"));
                diff(
                    kind,
                    &schema::child(spath, key),
                    o.get(key),
                    n.get(key),
                    path,
                    cmp,
                );
                path.pop();
            }
        }
        (Value::Array(o), Value::Array(n)) => match schema::list_type(kind, spath) {
            ListType::Map(keys) => {
                let element = schema::element(spath);
                let index = |items: &[Value]| -> BTreeMap<String, Value> {
                    items
                        .iter()
                        .map(|item| (key_element(kind, spath, keys, item), item.clone()))
                        .collect()
                };
                let (o, n) = (index(o), index(n));
                for key in o
                    .keys()
                    .chain(n.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    path.push(key.clone());
                    diff(kind, &element, o.get(key), n.get(key), path, cmp);
                    path.pop();
                }
            }
            ListType::Set => {
                for item in n.iter().filter(|item| !o.contains(item)) {
                    path.push(format!("v:{item}"));
                    cmp.changed.insert(path);
                    path.pop();
                }
                for item in o.iter().filter(|item| !n.contains(item)) {
                    path.push(format!("v:{item}"));
                    cmp.removed.insert(path);
                    path.pop();
                }
            }
            ListType::Atomic => {
                if o != n {
                    cmp.changed.insert(path);
                }
            }
        },
        (o, n) => {
            if o != n {
                cmp.changed.insert(path);
            }
        }
    }
}

/// Inserts `path` and everything below it in `value`, as a newly added subtree.
fn added(kind: &str, spath: &str, value: &Value, path: &mut Vec<String>, out: &mut FieldSet) {
    out.insert(path);
    children(kind, spath, value, path, out, true);
}

/// The set of fields an apply configuration specifies.
pub fn config_set(kind: &str, value: &Value) -> FieldSet {
    let mut out = FieldSet::default();
    children(kind, "", value, &mut Vec::new(), &mut out, false);
    out
}

/// Walks the children of `value`. With `containers`, maps and lists are members
/// too (as in the "added" half of a comparison); without, only leaves and list-map
/// elements are (as in an apply configuration).
fn children(
    kind: &str,
    spath: &str,
    value: &Value,
    path: &mut Vec<String>,
    out: &mut FieldSet,
    containers: bool,
) {
    match value {
        Value::Object(map) if !schema::atomic_map(kind, spath) => {
            for (key, child) in map {
                if child.is_null() {
                    continue;
                }
                path.push(format!("f:{key}"));
                let cpath = schema::child(spath, key);
                let is_leaf = match child {
                    Value::Object(_) => schema::atomic_map(kind, &cpath),
                    Value::Array(_) => schema::list_type(kind, &cpath) == ListType::Atomic,
                    _ => true,
                };
                if containers || is_leaf {
                    out.insert(path);
                }
                children(kind, &cpath, child, path, out, containers);
                path.pop();
            }
        }
        Value::Array(items) => match schema::list_type(kind, spath) {
            ListType::Map(keys) => {
                let element = schema::element(spath);
                for item in items {
                    path.push(key_element(kind, spath, keys, item));
                    out.insert(path);
                    children(kind, &element, item, path, out, containers);
                    path.pop();
                }
            }
            ListType::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path);
                    path.pop();
                }
            }
            ListType::Atomic => {}
        },
        _ => {}
    }
}

/// Removes the field at `path` from `value` (used to prune fields an applier no
/// longer applies).
pub fn remove_path(kind: &str, spath: &str, value: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if let Some(field) = first.strip_prefix("f:") {
        let Value::Object(map) = value else { return };
        if rest.is_empty() {
            map.remove(field);
        } else if let Some(child) = map.get_mut(field) {
            remove_path(kind, &schema::child(spath, field), child, rest);
        }
        return;
    }
    let Value::Array(items) = value else { return };
    let position = match schema::list_type(kind, spath) {
        ListType::Map(keys) => items
            .iter()
            .position(|item| key_element(kind, spath, keys, item) == *first),
        ListType::Set => items.iter().position(|item| format!("v:{item}") == *first),
        ListType::Atomic => None,
    };
    if let Some(idx) = position {
        if rest.is_empty() {
            items.remove(idx);
        } else {
            remove_path(kind, &schema::element(spath), &mut items[idx], rest);
        }
    }
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// The apiVersion the fields are expressed in.
    pub api_version: String,
    /// RFC 3339 time, second precision.
    pub time: String,
    /// `status` or empty.
    pub subresource: String,
    /// The owned fields.
    pub set: FieldSet,
}

impl Entry {
    fn same_owner(&self, other: &Entry) -> bool {
        self.manager == other.manager
            && self.operation == other.operation
            && self.subresource == other.subresource
    }

    /// How conflict messages name this manager.
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }
}

/// Reads `metadata.managedFields`.
pub fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(Value::Array(items)) = obj.pointer("/metadata/managedFields") else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let text = |name: &str| {
                item.get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            Entry {
                manager: text("manager"),
                operation: text("operation"),
                api_version: text("apiVersion"),
                time: text("time"),
                subresource: text("subresource"),
                set: FieldSet::from_fields_v1(item.get("fieldsV1").unwrap_or(&Value::Null)),
            }
        })
        .collect()
}

/// Writes `metadata.managedFields`, sorted as the real server sorts them.
pub fn write_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|a, b| {
        (&a.operation, &a.time, &a.manager, &a.subresource).cmp(&(
            &b.operation,
            &b.time,
            &b.manager,
            &b.subresource,
        ))
    });
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut item = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": e.set.to_fields_v1(),
            });
            if !e.subresource.is_empty() {
                item["subresource"] = json!(e.subresource);
            }
            item
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if items.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(items));
        }
    }
}

/// Records an `Update` by `me`: it owns what it changed, the others lose it.
pub fn record_update(entries: &mut Vec<Entry>, me: Entry, cmp: &Comparison) {
    for other in entries.iter_mut().filter(|e| !e.same_owner(&me)) {
        other.set.subtract(&cmp.changed);
        other.set.subtract_subtrees(&cmp.removed);
    }
    match entries.iter_mut().find(|e| e.same_owner(&me)) {
        Some(mine) => {
            let before = mine.set.clone();
            mine.set.union(&cmp.changed);
            mine.set.subtract_subtrees(&cmp.removed);
            if mine.set != before {
                mine.time = me.time;
                mine.api_version = me.api_version;
            }
        }
        None => {
            let mut mine = me;
            mine.set = cmp.changed.clone();
            mine.set.subtract_subtrees(&cmp.removed);
            entries.push(mine);
        }
    }
    entries.retain(|e| !e.set.is_empty());
}

/// A refused apply: the conflicting managers and paths.
#[derive(Debug)]
pub struct Conflicts(pub Vec<(String, Vec<String>)>);

impl Conflicts {
    /// The message and causes of the 409, as the real server words them.
    pub fn describe(&self) -> (String, Vec<crate::status::Cause>) {
        let causes = self
            .0
            .iter()
            .map(|(who, path)| crate::status::Cause {
                reason: "FieldManagerConflict",
                message: format!("conflict with {who}"),
                field: path_string(path),
            })
            .collect();
        let message = if let [(who, path)] = self.0.as_slice() {
            format!(
                "Apply failed with 1 conflict: conflict with {who}: {}",
                path_string(path)
            )
        } else {
            let mut by_manager: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (who, path) in &self.0 {
                by_manager.entry(who).or_default().push(path_string(path));
            }
            let mut lines = Vec::new();
            for (who, paths) in by_manager {
                lines.push(format!("conflicts with {who}:"));
                lines.extend(paths.into_iter().map(|p| format!("- {p}")));
            }
            format!(
                "Apply failed with {} conflicts: {}",
                self.0.len(),
                lines.join("\n")
            )
        };
        (message, causes)
    }
}

/// Server-side apply of `config` (a tracked view) by `me` over `live` (a tracked
/// view). Returns the merged view, or the conflicts when not forced.
pub fn apply(
    kind: &str,
    entries: &mut Vec<Entry>,
    me: Entry,
    live: &Value,
    config: &Value,
    force: bool,
) -> Result<Value, Conflicts> {
    let mut merged = live.clone();
    patch::apply_merge(kind, "", &mut merged, config);
    let new_set = config_set(kind, config);
    let cmp = compare(kind, live, &merged);

    let mut conflicts = Vec::new();
    for other in entries.iter().filter(|e| !e.same_owner(&me)) {
        for path in other.set.intersection(&cmp.changed) {
            conflicts.push((other.describe(), path));
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(Conflicts(conflicts));
    }

    // Fields this applier applied before and no longer applies, and that nobody
    // else owns, are removed.
    if let Some(previous) = entries.iter().find(|e| e.same_owner(&me)) {
        let mut dropped = previous.set.clone();
        dropped.subtract(&new_set);
        for path in dropped.paths() {
            let owned_by_other = entries
                .iter()
                .any(|e| !e.same_owner(&me) && e.set.contains(&path));
            if !owned_by_other {
                remove_path(kind, "", &mut merged, &path);
            }
        }
    }
    let cmp = compare(kind, live, &merged);
    for other in entries.iter_mut().filter(|e| !e.same_owner(&me)) {
        other.set.subtract(&cmp.changed);
        other.set.subtract_subtrees(&cmp.removed);
    }
    entries.retain(|e| !e.same_owner(&me));
    let mut mine = me;
    mine.set = new_set;
    entries.push(mine);
    entries.retain(|e| !e.set.is_empty());
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_of_a_service_owns_defaulted_fields_and_labels() {
        let zero = json!({"metadata": {}, "spec": {}});
        let new = json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP", "name": "http"}]}
        });
        let cmp = compare("Service", &zero, &new);
        assert_eq!(
            cmp.changed.to_fields_v1(),
            json!({
                "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                "f:spec": {"f:type": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}}}}
            })
        );
    }

    #[test]
    fn apply_configuration_owns_leaves_only() {
        let config = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"ports": [{"port": 80, "name": "http"}], "selector": {"app": "x"}}});
        assert_eq!(
            config_set("Service", &config).to_fields_v1(),
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}}}, "f:selector": {}}
            })
        );
    }

    #[test]
    fn round_trip_of_fields_v1() {
        let v = json!({"f:metadata": {"f:finalizers": {".": {}, "v:\"a\"": {}}}, "f:spec": {"f:type": {}}});
        assert_eq!(FieldSet::from_fields_v1(&v).to_fields_v1(), v);
    }
}
