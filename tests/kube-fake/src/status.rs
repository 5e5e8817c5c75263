//! API errors and the `Status` bodies the real API server answers them with.

use serde_json::{Value, json};

use crate::resources::Resource;

/// One entry of `details.causes` in a `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueDuplicate`, `FieldManagerConflict`, …
    pub reason: &'static str,
    /// The message without the field path.
    pub message: String,
    /// The field path, e.g. `spec.ports[0].nodePort`.
    pub field: String,
}

impl Cause {
    /// A `FieldValueInvalid` cause: `Invalid value: <value>: <detail>`.
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {}: {detail}", go_value(value)),
            field: field.into(),
        }
    }

    /// A `FieldValueDuplicate` cause with the value already formatted.
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        Cause {
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: {value}"),
            field: field.into(),
        }
    }

    /// A `FieldValueRequired` cause.
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Cause {
            reason: "FieldValueRequired",
            message,
            field: field.into(),
        }
    }

    /// A `FieldValueNotSupported` cause.
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {}: supported values: {}",
                go_value(value),
                list.join(", ")
            ),
            field: field.into(),
        }
    }

    /// A `FieldValueForbidden` cause.
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Cause {
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {detail}"),
            field: field.into(),
        }
    }
}

/// Formats a value the way Go's field errors do: strings quoted, numbers bare.
pub fn go_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// Everything a request can fail with. Each variant maps to one `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 for a named object.
    #[error("{plural} {name:?} not found")]
    NotFound {
        /// Resource plural with group, as in the message (`leases.coordination.k8s.io`).
        plural: String,
        /// Just the plural (`details.kind`).
        kind: String,
        /// Group, when not core.
        group: String,
        /// Object name.
        name: String,
    },
    /// 404 for a path the server does not serve.
    #[error("the server could not find the requested resource")]
    NoRoute,
    /// 409 AlreadyExists.
    #[error("{plural} {name:?} already exists")]
    AlreadyExists {
        /// Resource plural with group.
        plural: String,
        /// Just the plural.
        kind: String,
        /// Group, when not core.
        group: String,
        /// Object name.
        name: String,
    },
    /// 409 Conflict on a stale resourceVersion (or a failed precondition).
    #[error(
        "Operation cannot be fulfilled on {plural} {name:?}: the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict {
        /// Resource plural with group.
        plural: String,
        /// Just the plural.
        kind: String,
        /// Group, when not core.
        group: String,
        /// Object name.
        name: String,
    },
    /// 409 from server-side apply.
    #[error("{message}")]
    ApplyConflict {
        /// The full message.
        message: String,
        /// One cause per conflicting field.
        causes: Vec<Cause>,
    },
    /// 422 Invalid.
    #[error("{kind} {name:?} is invalid: {}", invalid_summary(.causes))]
    Invalid {
        /// The Kind (`Service`).
        kind: String,
        /// Group, when not core.
        group: String,
        /// Object name.
        name: String,
        /// The field errors.
        causes: Vec<Cause>,
    },
    /// 400 BadRequest.
    #[error("{0}")]
    BadRequest(String),
    /// 410 Expired on a list (resourceVersion or continue token too old).
    #[error("{message}")]
    Expired {
        /// The message.
        message: String,
        /// A continue token for an inconsistent continuation, if any.
        continue_token: Option<String>,
    },
    /// 405.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// 415.
    #[error("the body of the request was in an unknown format - accepted media types include: {0}")]
    UnsupportedMediaType(String),
    /// 503 from the fault hook.
    #[error("{0}")]
    Unavailable(String),
}

fn invalid_summary(causes: &[Cause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    if parts.len() == 1 {
        parts.into_iter().next().unwrap_or_default()
    } else {
        format!("[{}]", parts.join(", "))
    }
}

impl ApiError {
    /// 404 for the object `name` of `res`.
    pub fn not_found(res: &Resource, name: &str) -> Self {
        ApiError::NotFound {
            plural: res.qualified_plural(),
            kind: res.plural.to_string(),
            group: res.group.to_string(),
            name: name.to_string(),
        }
    }

    /// 409 AlreadyExists for `name` of `res`.
    pub fn already_exists(res: &Resource, name: &str) -> Self {
        ApiError::AlreadyExists {
            plural: res.qualified_plural(),
            kind: res.plural.to_string(),
            group: res.group.to_string(),
            name: name.to_string(),
        }
    }

    /// 409 Conflict for `name` of `res`.
    pub fn conflict(res: &Resource, name: &str) -> Self {
        ApiError::Conflict {
            plural: res.qualified_plural(),
            kind: res.plural.to_string(),
            group: res.group.to_string(),
            name: name.to_string(),
        }
    }

    /// 422 Invalid for `name` of `res`.
    pub fn invalid(res: &Resource, name: &str, causes: Vec<Cause>) -> Self {
        ApiError::Invalid {
            kind: res.kind.to_string(),
            group: res.group.to_string(),
            name: name.to_string(),
            causes,
        }
    }

    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => 404,
            ApiError::AlreadyExists { .. }
            | ApiError::Conflict { .. }
            | ApiError::ApplyConflict { .. } => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Expired { .. } => 410,
            ApiError::MethodNotAllowed => 405,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Unavailable(_) => 503,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } | ApiError::ApplyConflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Expired { .. } => "Expired",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::Unavailable(_) => "ServiceUnavailable",
        }
    }

    /// The `Status` object, shaped like the real server's.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
        });
        let details = match self {
            ApiError::NotFound {
                kind, group, name, ..
            }
            | ApiError::AlreadyExists {
                kind, group, name, ..
            }
            | ApiError::Conflict {
                kind, group, name, ..
            } => Some(details(name, group, kind, &[])),
            ApiError::Invalid {
                kind,
                group,
                name,
                causes,
            } => Some(details(name, group, kind, causes)),
            ApiError::ApplyConflict { causes, .. } => {
                Some(json!({ "causes": causes.iter().map(cause_json).collect::<Vec<_>>() }))
            }
            ApiError::Expired {
                continue_token: Some(token),
                ..
            } => {
                status["metadata"] = json!({ "continue": token });
                None
            }
            _ => None,
        };
        if let Some(details) = details {
            status["details"] = details;
        }
        status["code"] = json!(self.code());
        status
    }
}

fn cause_json(cause: &Cause) -> Value {
    json!({ "reason": cause.reason, "message": cause.message, "field": cause.field })
}

fn details(name: &str, group: &str, kind: &str, causes: &[Cause]) -> Value {
    let mut d = json!({ "name": name });
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d["kind"] = json!(kind);
    if !causes.is_empty() {
        d["causes"] = Value::Array(causes.iter().map(cause_json).collect());
    }
    d
}

/// The `Status` for a watch that starts too far back (sent as an `ERROR` event).
pub fn expired_watch_status(requested: u64, oldest: u64) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {requested} ({oldest})"),
        "reason": "Expired",
        "code": 410,
    })
}

/// The `Status` a DELETE of a collection or a non-object answers with on success.
pub fn success_status() -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" })
}
