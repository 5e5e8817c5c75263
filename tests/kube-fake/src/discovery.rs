//! Discovery and OpenAPI documents, served as recorded from a real kube-apiserver
//! (the fixtures in `shared/kube-api/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Bytes;
use serde_json::Value;

/// The environment variable that overrides where the fixtures are read from.
pub const FIXTURES_ENV: &str = "XLB_KUBE_API_FIXTURES";

/// Content-Type of aggregated discovery answers.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// The documents could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// A fixture file is missing or unreadable.
    #[error(
        "cannot read the kube-api fixture {path}: {source}; set {FIXTURES_ENV} to the directory holding 01-version.json"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A fixture file is not a transcript.
    #[error("kube-api fixture {path} is not a recorded exchange: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One served document.
#[derive(Debug, Clone)]
pub struct Doc {
    /// The Content-Type the real server answered with.
    pub content_type: String,
    /// The body.
    pub body: Bytes,
}

/// All discovery and OpenAPI documents, keyed by path (plus `#aggregated` for the
/// aggregated form of `/api` and `/apis`).
#[derive(Debug)]
pub struct Docs {
    docs: BTreeMap<String, Doc>,
    /// `definitions` of the OpenAPI v2 document, for table column descriptions.
    definitions: Value,
}

/// The fixture directory: `$XLB_KUBE_API_FIXTURES`, or `shared/kube-api` beside the
/// repository.
pub fn default_dir() -> PathBuf {
    std::env::var_os(FIXTURES_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/kube-api"
            ))
        })
}

const FILES: &[(&str, &str)] = &[
    ("01-version.json", "/version"),
    ("02-api-legacy.json", "/api"),
    ("03-api-aggregated.json", "/api#aggregated"),
    ("04-api-v1.json", "/api/v1"),
    ("05-apis-legacy.json", "/apis"),
    ("06-apis-aggregated.json", "/apis#aggregated"),
    ("07-apis-discovery-v1.json", "/apis/discovery.k8s.io/v1"),
    (
        "08-apis-coordination-v1.json",
        "/apis/coordination.k8s.io/v1",
    ),
    ("09-apis-events-v1.json", "/apis/events.k8s.io/v1"),
    ("10-openapi-v2.json", "/openapi/v2"),
    ("11-openapi-v3-index.json", "/openapi/v3"),
    ("12-openapi-v3-api-v1.json", "/openapi/v3/api/v1"),
    (
        "13-openapi-v3-discovery-v1.json",
        "/openapi/v3/apis/discovery.k8s.io/v1",
    ),
    (
        "14-openapi-v3-coordination-v1.json",
        "/openapi/v3/apis/coordination.k8s.io/v1",
    ),
    (
        "15-openapi-v3-events-v1.json",
        "/openapi/v3/apis/events.k8s.io/v1",
    ),
];

impl Docs {
    /// Loads the documents from `dir`, once per directory per process (the OpenAPI
    /// documents are several megabytes).
    pub fn load(dir: &Path) -> Result<Arc<Docs>, DocsError> {
        static CACHE: OnceLock<Mutex<BTreeMap<PathBuf, Arc<Docs>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(docs) = cache.get(dir) {
            return Ok(docs.clone());
        }
        let docs = Arc::new(Docs::read(dir)?);
        cache.insert(dir.to_path_buf(), docs.clone());
        Ok(docs)
    }

    fn read(dir: &Path) -> Result<Docs, DocsError> {
        let mut docs = BTreeMap::new();
        let mut definitions = Value::Null;
        for (file, key) in FILES {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(|source| DocsError::Read {
                path: path.clone(),
                source,
            })?;
            let format_error = |reason: String| DocsError::Format {
                path: path.clone(),
                reason,
            };
            let mut exchange: Value =
                serde_json::from_str(&text).map_err(|e| format_error(e.to_string()))?;
            let response = exchange
                .get_mut("response")
                .ok_or_else(|| format_error("no response".into()))?;
            let content_type = response
                .pointer("/headers/Content-Type")
                .and_then(Value::as_str)
                .unwrap_or("application/json")
                .to_string();
            let body = response
                .get_mut("body")
                .map(Value::take)
                .ok_or_else(|| format_error("no response body".into()))?;
            if *key == "/openapi/v2" {
                definitions = body.get("definitions").cloned().unwrap_or(Value::Null);
            }
            let bytes = serde_json::to_vec(&body).map_err(|e| format_error(e.to_string()))?;
            docs.insert(
                (*key).to_string(),
                Doc {
                    content_type,
                    body: Bytes::from(bytes),
                },
            );
        }
        Ok(Docs { docs, definitions })
    }

    /// The document for `path`, in its aggregated form when asked for.
    pub fn get(&self, path: &str, aggregated: bool) -> Option<&Doc> {
        if aggregated && let Some(doc) = self.docs.get(&format!("{path}#aggregated")) {
            return Some(doc);
        }
        self.docs.get(path)
    }

    /// The description of a property in the OpenAPI v2 definitions, without the
    /// list of enum values (as table column descriptions show it).
    pub fn description(&self, definition: &str, property: &str) -> String {
        let text = self
            .definitions
            .get(definition)
            .and_then(|d| d.pointer(&format!("/properties/{property}/description")))
            .and_then(Value::as_str)
            .unwrap_or_default();
        text.split("\n\nPossible enum values:")
            .next()
            .unwrap_or(text)
            .to_string()
    }
}
