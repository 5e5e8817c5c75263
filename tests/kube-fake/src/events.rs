//! core/v1 and events.k8s.io/v1 Events are the same objects. They are stored in the
//! core/v1 form and converted when read or written through events.k8s.io/v1.

use serde_json::{Map, Value};

/// `(core/v1 field, events.k8s.io/v1 field)`.
const FIELDS: &[(&str, &str)] = &[
    ("eventTime", "eventTime"),
    ("series", "series"),
    ("reportingComponent", "reportingController"),
    ("reportingInstance", "reportingInstance"),
    ("action", "action"),
    ("reason", "reason"),
    ("involvedObject", "regarding"),
    ("related", "related"),
    ("message", "note"),
    ("type", "type"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

/// Fields Go leaves out when empty, per form.
const CORE_OMIT_EMPTY: &[&str] = &[
    "message", "reason", "type", "action", "count", "series", "related",
];
const V1_OMIT_EMPTY: &[&str] = &[
    "series",
    "reportingController",
    "reportingInstance",
    "action",
    "reason",
    "related",
    "note",
    "type",
    "deprecatedCount",
];

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

fn convert(obj: &Value, from_core: bool, zero: &Value, omit_empty: &[&str]) -> Value {
    let mut out = Map::new();
    for (key, value) in obj.as_object().into_iter().flatten() {
        let renamed = FIELDS
            .iter()
            .find(|(core, v1)| if from_core { core == key } else { v1 == key })
            .map(|(core, v1)| if from_core { *v1 } else { *core });
        out.insert(renamed.unwrap_or(key).to_string(), value.clone());
    }
    let mut out = Value::Object(out);
    normalize(&mut out, zero, omit_empty);
    out
}

/// Fills in the fields Go always writes and drops the empty `omitempty` ones.
fn normalize(obj: &mut Value, zero: &Value, omit_empty: &[&str]) {
    if let (Some(map), Some(zero)) = (obj.as_object_mut(), zero.as_object()) {
        for (key, value) in zero {
            map.entry(key.clone()).or_insert(value.clone());
        }
        map.retain(|key, value| !(omit_empty.contains(&key.as_str()) && is_empty(value)));
    }
}

/// The events.k8s.io/v1 form of a stored (core/v1) Event.
pub fn to_v1(core: &Value, v1_zero: &Value) -> Value {
    convert(core, true, v1_zero, V1_OMIT_EMPTY)
}

/// The core/v1 form of an events.k8s.io/v1 Event.
pub fn to_core(v1: &Value, core_zero: &Value) -> Value {
    convert(v1, false, core_zero, CORE_OMIT_EMPTY)
}

/// Normalizes a core/v1 Event as the real server would serialize it.
pub fn normalize_core(core: &mut Value, core_zero: &Value) {
    normalize(core, core_zero, CORE_OMIT_EMPTY);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Resource;
    use serde_json::json;

    #[test]
    fn v1_event_reads_back_through_core_like_fixture_74() {
        let core_zero = Resource::find("", "v1", "events")
            .expect("served")
            .zero_object();
        let v1 = json!({"metadata": {}, "note": "n", "regarding": {"kind": "Service"}, "reportingController": "xlb",
                        "reportingInstance": "xlb-0", "eventTime": "t", "type": "Normal", "reason": "R",
                        "deprecatedSource": {}, "deprecatedFirstTimestamp": null, "deprecatedLastTimestamp": null});
        let core = to_core(&v1, &core_zero);
        assert_eq!(core["message"], "n");
        assert_eq!(core["involvedObject"], json!({"kind": "Service"}));
        assert_eq!(core["source"], json!({}));
        assert!(core.get("count").is_none());
        assert_eq!(core["firstTimestamp"], Value::Null);
    }
}
