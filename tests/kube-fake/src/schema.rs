//! The little schema knowledge merges need: how each list is merged and which
//! maps are atomic. Paths are the field names from the object root joined by `.`,
//! with `[]` for "an element of this list" (`spec.ports[]`).
//!
//! Anything not listed is a granular map or an atomic list, which is also what the
//! real server assumes for lists without a list type.

/// How server-side apply (and managedFields) treats a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole; owned as one field.
    Atomic,
    /// A set of scalars (`v:` path elements).
    Set,
    /// A list of maps keyed by these fields (`k:` path elements).
    Map(&'static [&'static str]),
}

/// How a strategic merge patch treats a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchStrategy {
    /// Replace the whole list.
    Replace,
    /// Merge maps by this key.
    MergeKey(&'static str),
    /// Union of scalars.
    MergeScalars,
}

/// The list type of the list at `path` in objects of `kind`.
pub fn list_type(kind: &str, path: &str) -> ListType {
    match (kind, path) {
        (_, "metadata.finalizers") => ListType::Set,
        (_, "metadata.ownerReferences") => ListType::Map(&["uid"]),
        ("Service", "spec.ports") => ListType::Map(&["port", "protocol"]),
        ("Node", "status.addresses" | "status.conditions") => ListType::Map(&["type"]),
        ("Namespace", "status.conditions") => ListType::Map(&["type"]),
        _ => ListType::Atomic,
    }
}

/// The strategic-merge-patch strategy of the list at `path` in objects of `kind`.
pub fn patch_strategy(kind: &str, path: &str) -> PatchStrategy {
    match (kind, path) {
        (_, "metadata.finalizers") => PatchStrategy::MergeScalars,
        (_, "metadata.ownerReferences") => PatchStrategy::MergeKey("uid"),
        ("Service", "spec.ports") => PatchStrategy::MergeKey("port"),
        ("Node", "status.addresses" | "status.conditions") => PatchStrategy::MergeKey("type"),
        ("Namespace", "status.conditions") => PatchStrategy::MergeKey("type"),
        _ => PatchStrategy::Replace,
    }
}

/// Whether the map (or struct) at `path` is atomic: replaced and owned as a whole.
pub fn atomic_map(kind: &str, path: &str) -> bool {
    matches!(
        (kind, path),
        (_, "metadata.ownerReferences[]")
            | ("Service", "spec.selector")
            | ("Event", "involvedObject" | "regarding" | "related")
    )
}

/// Default values of list-map keys that the server fills in before computing keys
/// (`protocol` of a Service port).
pub fn key_default(kind: &str, path: &str, key: &str) -> Option<&'static str> {
    match (kind, path, key) {
        ("Service", "spec.ports", "protocol") => Some("TCP"),
        _ => None,
    }
}

/// Joins a child field name to a path.
pub fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// The path of the elements of the list at `path`.
pub fn element(path: &str) -> String {
    format!("{path}[]")
}
