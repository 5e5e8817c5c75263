//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field
//! selectors (`=`, `==`, `!=` on the fields the real server indexes).

use serde_json::Value;

/// A selector that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(String);

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits at commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn value_list(s: &str) -> Result<Vec<String>, SelectorError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| {
            SelectorError(format!(
                "unable to parse requirement: expected a value list in {s:?}"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses the `labelSelector` query parameter.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let req = if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = term.split_once("==") {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = term.split_once('=') {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, values)) = term.split_once(" notin ") {
                Requirement::NotIn(key.trim().to_string(), value_list(values)?)
            } else if let Some((key, values)) = term.split_once(" in ") {
                Requirement::In(key.trim().to_string(), value_list(values)?)
            } else if term.contains(' ') || term.contains('(') {
                return Err(SelectorError(format!(
                    "unable to parse requirement: found '{term}', expected: in, notin, =, ==, !=, gt, lt"
                )));
            } else {
                Requirement::Exists(term)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether an object's labels match.
    pub fn matches(&self, obj: &Value) -> bool {
        let label = |key: &str| {
            obj.pointer("/metadata/labels")
                .and_then(|l| l.get(key))
                .and_then(Value::as_str)
        };
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }

    /// Whether the selector has no requirement.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// The fields each kind can be selected on, with the JSON pointer to their value.
fn field_pointer(kind: &str, field: &str) -> Option<String> {
    let common = ["metadata.name", "metadata.namespace"];
    let per_kind: &[&str] = match kind {
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        "Service" => &["spec.clusterIP", "spec.type"],
        "Node" => &["spec.unschedulable"],
        "Namespace" => &["status.phase"],
        _ => &[],
    };
    if !common.contains(&field) && !per_kind.contains(&field) {
        return None;
    }
    let field = if kind == "Event" && field == "source" {
        "source.component"
    } else {
        field
    };
    Some(format!("/{}", field.replace('.', "/")))
}

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter for objects of `kind`.
    pub fn parse(kind: &str, s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let (field, negate, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, false, v)
            } else {
                return Err(SelectorError(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            let pointer = field_pointer(kind, field)
                .ok_or_else(|| SelectorError(format!("field label not supported: {field}")))?;
            reqs.push((pointer, negate, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    /// Whether an object matches.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, negate, value)| {
            let actual = match obj.pointer(pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (actual == *value) != *negate
        })
    }

    /// Whether the selector has no requirement.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_operators() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "edge"}}});
        for (sel, expected) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing,app=web", true),
            ("missing!=x", true),
        ] {
            let parsed = LabelSelector::parse(sel).expect("selector parses");
            assert_eq!(parsed.matches(&obj), expected, "{sel}");
        }
    }

    #[test]
    fn field_selector_on_event_involved_object() {
        let obj = json!({"metadata": {"name": "e"}, "involvedObject": {"kind": "Service", "name": "echo"}});
        let sel = FieldSelector::parse(
            "Event",
            "involvedObject.name=echo,involvedObject.kind=Service",
        )
        .expect("selector parses");
        assert!(sel.matches(&obj));
        assert!(FieldSelector::parse("Service", "spec.nope=x").is_err());
    }
}
