//! What xlb may do in a cluster: the grants of `deploy/rbac.yaml`, and the RBAC name of each
//! request the in-memory API server logged, so tests check that xlb asks for nothing more.

use kube_fake::RequestRecord;

/// `(verb, resource)` of an API request as RBAC names them (`services/status` for a
/// subresource).
pub fn verb_and_resource(request: &RequestRecord) -> (String, String) {
    let (path, query) = request.uri.split_once('?').unwrap_or((&request.uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/GROUP/VERSION/...; then optionally namespaces/NS.
    let rest = match parts.first() {
        Some(&"api") => &parts[2.min(parts.len())..],
        Some(&"apis") => &parts[3.min(parts.len())..],
        _ => return (request.method.to_lowercase(), path.to_owned()),
    };
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => (path.to_owned(), false),
    };
    let verb = match request.method.as_str() {
        "GET"
            if query
                .split('&')
                .any(|pair| pair == "watch=true" || pair == "watch=1") =>
        {
            "watch"
        }
        "GET" if named => "get",
        "GET" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        other => other,
    };
    (verb.to_owned(), resource)
}

/// Every `(verb, resource)` the ClusterRole and Role in `deploy/rbac.yaml` grant.
pub fn granted_by_rbac() -> std::collections::BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut granted = std::collections::BTreeSet::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        if !matches!(kind, Some("ClusterRole" | "Role")) {
            continue;
        }
        let strings = |rule: &serde_yaml::Value, key: &str| -> Vec<String> {
            rule.get(key)
                .and_then(serde_yaml::Value::as_sequence)
                .into_iter()
                .flatten()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        };
        for rule in value
            .get("rules")
            .and_then(serde_yaml::Value::as_sequence)
            .into_iter()
            .flatten()
        {
            for resource in strings(rule, "resources") {
                for verb in strings(rule, "verbs") {
                    granted.insert((verb, resource.clone()));
                }
            }
        }
    }
    granted
}
