//! Cluster state from Kubernetes manifests in a directory (`--manifests DIR`).
//!
//! Reads the files directly in the directory (not its subdirectories) whose names end in
//! `.yaml`, `.yml` or `.json` and do not start with a dot, in name order. A file may hold
//! several YAML documents, and a document may be a `kind: List` (as `kubectl get -o yaml`
//! prints). Services (`v1`), EndpointSlices (`discovery.k8s.io/v1`) and Nodes (`v1`) are kept;
//! other kinds are ignored. Object names and namespaces are validated as the API server does
//! (see [`check_object_name`]). When two documents define the same object, the later one (by
//! file name, then position) wins.
//!
//! A file that cannot be read, is empty (zero bytes or only white space: an editor or
//! `kubectl get -o yaml > file` in the middle of writing it) or holds a document that does not
//! parse keeps the content it had when it last read cleanly, until it reads cleanly again;
//! its problems are logged once per change of the file, not on every reload. Only a file that
//! was never clean contributes what of it parses. To withdraw Services, remove them from a file
//! that parses, or delete the file.
//!
//! Manifests have no NodePort allocator behind them: out of cluster (the default), a
//! LoadBalancer Service must list a `nodePort` for each port; in cluster (`KUBERNETES=true`),
//! its EndpointSlices are used instead.
//!
//! The directory is polled (every second by default): when a file is added, removed or changes
//! size or modification time, and then stays the same for one more poll (so a file is not read
//! while it is being written), the directory is read again and the new state is sent if it
//! differs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize as _;
use tokio::sync::watch;

use crate::model::{ClusterState, ObjectKey, check_object_name};

/// How often the directory is checked for changes unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Errors that stop the file source; problems with single files are [`FileProblem`]s.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The directory itself cannot be listed.
    #[error("cannot read the manifest directory {dir}: {source}; check --manifests")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The blocking task reading the directory failed (it panicked or was cancelled).
    #[error("reading the manifest directory failed: {0}")]
    Task(String),
}

/// A file or document that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub path: PathBuf,
    pub message: String,
}

/// The result of reading the directory once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub state: ClusterState,
    /// What was skipped (already logged).
    pub problems: Vec<FileProblem>,
}

/// A directory of manifests, read on demand or watched.
#[derive(Debug, Clone)]
pub struct FileSource {
    dir: PathBuf,
    interval: Duration,
    /// What each file held when last read, by path.
    files: Arc<Mutex<BTreeMap<PathBuf, CachedFile>>>,
}

/// One manifest file as last read.
#[derive(Debug, Clone)]
struct CachedFile {
    stamp: Stamp,
    /// What the last read found, with its problems.
    read: Loaded,
    /// The content of the last read that had no problem.
    good: Option<ClusterState>,
}

/// A file's size and modification time: a change of either means it must be read again.
type Stamp = Option<(u64, Option<SystemTime>)>;

impl FileSource {
    /// A source reading `dir`, polled every [`DEFAULT_POLL_INTERVAL`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            interval: DEFAULT_POLL_INTERVAL,
            files: Arc::default(),
        }
    }

    /// Polls every `interval` instead.
    pub fn with_interval(self, interval: Duration) -> Self {
        Self { interval, ..self }
    }

    /// Reads the directory: the files that changed since the last call are read again (and
    /// their problems logged), the others reused. Problems of the current files are returned
    /// in [`Loaded::problems`]; only an unreadable directory is an error.
    pub fn load(&self) -> Result<Loaded, FileSourceError> {
        let paths = self.manifest_paths()?;
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        files.retain(|path, _| paths.contains(path));
        let mut loaded = Loaded::default();
        for path in paths {
            let stamp = stamp(&path);
            let fresh = files
                .get(&path)
                .is_some_and(|cached| stamp.is_some() && cached.stamp == stamp);
            if !fresh {
                let read = read_file(&path);
                let good = if read.problems.is_empty() {
                    Some(read.state.clone())
                } else {
                    let good = files.get(&path).and_then(|cached| cached.good.clone());
                    if good.is_some() {
                        tracing::warn!(path = %path.display(), "keeping the file's last good content until it reads cleanly again");
                    }
                    good
                };
                files.insert(path.clone(), CachedFile { stamp, read, good });
            }
            let Some(cached) = files.get(&path) else {
                continue;
            };
            let content = cached.good.as_ref().unwrap_or(&cached.read.state);
            loaded.state.services.extend(content.services.clone());
            loaded
                .state
                .endpoint_slices
                .extend(content.endpoint_slices.clone());
            loaded.state.nodes.extend(content.nodes.clone());
            loaded.problems.extend(cached.read.problems.iter().cloned());
        }
        Ok(loaded)
    }

    /// Reads the directory, then keeps reading it on every change in a background task.
    /// The receiver holds the first state at once. The task ends when every receiver is gone.
    /// Must be called within a tokio runtime.
    pub fn spawn(self) -> Result<watch::Receiver<ClusterState>, FileSourceError> {
        let first = self.load()?;
        let fingerprint = self.fingerprint().ok();
        let (sender, receiver) = watch::channel(first.state);
        tokio::spawn(self.watch(sender, fingerprint));
        Ok(receiver)
    }

    /// The poll loop behind [`spawn`](Self::spawn).
    async fn watch(self, sender: watch::Sender<ClusterState>, mut last: Option<Fingerprint>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = last.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = sender.closed() => return,
            }
            // File system calls block: run them off the runtime's threads.
            let source = self.clone();
            let fingerprint = match blocking(move || source.fingerprint()).await {
                Ok(fingerprint) => Some(fingerprint),
                Err(error) => {
                    // Keep serving the last state; say so once per change of situation.
                    if last.is_some() {
                        tracing::warn!(%error, "keeping the last manifests");
                    }
                    None
                }
            };
            // A change is read once the directory has looked the same for a whole interval,
            // so a file caught in the middle of being written is not read half done.
            let settled = fingerprint == seen;
            seen.clone_from(&fingerprint);
            if fingerprint.is_none() || fingerprint == last {
                last = fingerprint;
                continue;
            }
            if !settled {
                continue;
            }
            last = fingerprint;
            let source = self.clone();
            match blocking(move || source.load()).await {
                Ok(loaded) => {
                    tracing::info!(
                        dir = %self.dir.display(),
                        services = loaded.state.services.len(),
                        endpoint_slices = loaded.state.endpoint_slices.len(),
                        nodes = loaded.state.nodes.len(),
                        skipped = loaded.problems.len(),
                        "manifests reloaded"
                    );
                    sender.send_if_modified(|state| {
                        let changed = *state != loaded.state;
                        if changed {
                            *state = loaded.state;
                        }
                        changed
                    });
                }
                Err(error) => tracing::warn!(%error, "keeping the last manifests"),
            }
        }
    }

    /// The manifest files of the directory, sorted.
    fn manifest_paths(&self) -> Result<Vec<PathBuf>, FileSourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| FileSourceError::ReadDir {
            dir: self.dir.clone(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| is_manifest(path))
            .collect();
        paths.sort();
        Ok(paths)
    }

    /// What identifies the directory's content cheaply: each manifest's path, size and
    /// modification time.
    fn fingerprint(&self) -> Result<Fingerprint, FileSourceError> {
        Ok(self
            .manifest_paths()?
            .into_iter()
            .map(|path| {
                let stamp = stamp(&path);
                (path, stamp)
            })
            .collect())
    }
}

type Fingerprint = Vec<(PathBuf, Stamp)>;

/// Runs a directory read on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, FileSourceError> + Send + 'static,
) -> Result<T, FileSourceError> {
    tokio::task::spawn_blocking(read)
        .await
        .unwrap_or_else(|join| Err(FileSourceError::Task(join.to_string())))
}

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|metadata| (metadata.len(), metadata.modified().ok()))
}

/// Reads and parses one file; its problems are logged.
fn read_file(path: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => loaded.problem(
            path,
            "the file is empty (being written?); delete it, or remove the objects from it, to withdraw them".to_owned(),
        ),
        Ok(text) => loaded.add_file(path, &text),
        Err(error) => loaded.problem(path, format!("cannot read: {error}")),
    }
    loaded
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|name| name.to_str())
        .is_none_or(|name| name.starts_with('.'));
    let extension = path.extension().and_then(|extension| extension.to_str());
    !hidden && matches!(extension, Some("yaml" | "yml" | "json")) && path.is_file()
}

/// Checks a manifest object's name (and namespace, for namespaced kinds); a missing name is
/// reported by the caller.
fn valid_name(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespaced: bool,
) -> Result<(), String> {
    let Some(name) = meta.name.as_deref().filter(|name| !name.is_empty()) else {
        return Ok(());
    };
    let namespace = if namespaced {
        meta.namespace
            .as_deref()
            .filter(|namespace| !namespace.is_empty())
    } else {
        None
    };
    check_object_name(kind, namespace, name)
}

impl Loaded {
    fn problem(&mut self, path: &Path, message: String) {
        tracing::warn!(path = %path.display(), "skipping manifest: {message}");
        self.problems.push(FileProblem {
            path: path.to_owned(),
            message,
        });
    }

    /// Adds every document of one file.
    fn add_file(&mut self, path: &Path, text: &str) {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            match serde_yaml::Value::deserialize(document) {
                Ok(value) => self.add_value(path, index + 1, value),
                Err(error) => {
                    // A syntax error ends the stream: later documents cannot be found.
                    self.problem(path, format!("document {}: {error}", index + 1));
                    break;
                }
            }
        }
    }

    /// Adds one document (or the items of a List).
    fn add_value(&mut self, path: &Path, document: usize, value: serde_yaml::Value) {
        if value.is_null() {
            return;
        }
        let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let added = match (api_version, kind) {
            (Some("v1"), Some("List")) => {
                let items = match value.get("items") {
                    Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                    _ => Vec::new(),
                };
                for item in items {
                    self.add_value(path, document, item);
                }
                return;
            }
            (Some("v1"), Some("Service")) => {
                serde_yaml::from_value::<Service>(value).map(|service| {
                    valid_name("Service", &service.metadata, true)
                        .map(|()| self.add_service(path, service))
                })
            }
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
                serde_yaml::from_value::<EndpointSlice>(value).map(|slice| {
                    valid_name("EndpointSlice", &slice.metadata, true)
                        .map(|()| self.state.upsert_endpoint_slice(slice))
                })
            }
            (Some("v1"), Some("Node")) => serde_yaml::from_value::<Node>(value).map(|node| {
                valid_name("Node", &node.metadata, false).map(|()| self.state.upsert_node(node))
            }),
            (Some(_), Some(kind)) => {
                tracing::debug!(path = %path.display(), document, kind, "ignoring manifest kind");
                return;
            }
            _ => {
                self.problem(
                    path,
                    format!("document {document}: not a Kubernetes object (no apiVersion or kind)"),
                );
                return;
            }
        };
        match added {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                self.problem(path, format!("document {document}: object has no name"));
            }
            Ok(Err(invalid)) => self.problem(path, format!("document {document}: {invalid}")),
            Err(error) => self.problem(path, format!("document {document}: {error}")),
        }
    }

    fn add_service(&mut self, path: &Path, service: Service) -> bool {
        let spec = service.spec.as_ref();
        let without_node_port = spec
            .filter(|spec| spec.type_.as_deref() == Some("LoadBalancer"))
            .is_some_and(|spec| {
                spec.ports
                    .iter()
                    .flatten()
                    .any(|port| port.node_port.is_none())
            });
        if without_node_port && let Some(key) = ObjectKey::of(&service.metadata) {
            tracing::info!(
                path = %path.display(),
                service = %key,
                "LoadBalancer Service without nodePorts: manifests have no NodePort allocator, \
                 so out of cluster its ports without nodePort are not served (in cluster, \
                 KUBERNETES=true, its EndpointSlices are used)"
            );
        }
        self.state.upsert_service(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;

    const SERVICE_AND_SLICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: LoadBalancer
  ports:
    - name: http
      port: 80
      nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
  - name: http
    port: 8080
endpoints:
  - addresses: ["10.1.0.1"]
    conditions: {ready: true}
---
"#;

    const NODE_JSON: &str = r#"{
  "apiVersion": "v1", "kind": "Node",
  "metadata": {"name": "node1", "labels": {"node-role.kubernetes.io/worker": ""}},
  "status": {"addresses": [{"type": "InternalIP", "address": "203.0.113.11"}],
             "conditions": [{"type": "Ready", "status": "True"}]}
}"#;

    const GOOD_BAD_GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: first}
spec: {type: LoadBalancer, ports: [{port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec: {ports: "not a list"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: listed}
    spec: {type: LoadBalancer, ports: [{port: 82, nodePort: 30082}]}
"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text)
            .unwrap_or_else(|error| panic!("cannot write {name}: {error}"));
    }

    fn manifest_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
        write(dir.path(), "20-node.json", NODE_JSON);
        write(dir.path(), "30-mixed.yml", GOOD_BAD_GOOD);
        write(
            dir.path(),
            "40-broken.yaml",
            "apiVersion: v1\nkind: Service\n  bad: [indent\n",
        );
        write(dir.path(), "README.txt", "not a manifest");
        write(dir.path(), ".10-web.yaml.swp", "editor junk");
        dir
    }

    #[test]
    fn loads_a_directory_skipping_broken_files_and_documents() {
        let dir = manifest_dir();
        let loaded = FileSource::new(dir.path())
            .load()
            .expect("the directory is readable");
        let services: Vec<String> = loaded
            .state
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            services,
            vec!["default/first", "default/listed", "shop/web"]
        );
        assert_eq!(
            loaded.state.endpoint_slices.keys().collect::<Vec<_>>(),
            vec![&ObjectKey::new("shop", "web-abc")]
        );
        assert_eq!(loaded.state.nodes.keys().collect::<Vec<_>>(), vec!["node1"]);
        let web = &loaded.state.services[&ServiceKey::new("shop", "web")];
        let port = &web
            .spec
            .as_ref()
            .expect("web has a spec")
            .ports
            .as_ref()
            .expect("ports")[0];
        assert_eq!(port.node_port, Some(30080));
        let problem_files: Vec<&str> = loaded
            .problems
            .iter()
            .map(|problem| {
                problem
                    .path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .unwrap_or("?")
            })
            .collect();
        assert_eq!(
            problem_files,
            vec!["30-mixed.yml", "40-broken.yaml"],
            "{:?}",
            loaded.problems
        );
        assert!(
            loaded.problems[0].message.starts_with("document 2:"),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn an_unreadable_directory_is_an_error() {
        let error = FileSource::new("/nonexistent/xlb-manifests")
            .load()
            .expect_err("a missing directory cannot be loaded");
        assert!(
            error.to_string().contains("/nonexistent/xlb-manifests"),
            "{error}"
        );
    }

    #[test]
    fn a_document_without_kind_is_reported() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        write(dir.path(), "x.yaml", "just: a map\n");
        let loaded = FileSource::new(dir.path())
            .load()
            .expect("the directory is readable");
        assert_eq!(loaded.state, ClusterState::default());
        assert!(
            loaded.problems[0]
                .message
                .contains("not a Kubernetes object"),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn a_file_being_rewritten_keeps_its_last_good_content() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
        let source = FileSource::new(dir.path());
        let services = |loaded: &Loaded| -> Vec<String> {
            loaded
                .state
                .services
                .keys()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(services(&source.load().expect("load")), vec!["shop/web"]);
        // `: > file`, then a partly written file, then garbage: web stays served.
        for (step, text) in [
            ("emptied", ""),
            (
                "partly written",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namesp",
            ),
            (
                "unparsable",
                "apiVersion: v1\nkind: Service\n  bad: [indent\n",
            ),
        ] {
            write(dir.path(), "10-web.yaml", text);
            let loaded = source.load().expect("load");
            assert_eq!(
                services(&loaded),
                vec!["shop/web"],
                "{step}: {:?}",
                loaded.problems
            );
            assert_eq!(loaded.problems.len(), 1, "{step}: {:?}", loaded.problems);
        }
        // A file that parses decides: here it no longer lists web.
        write(dir.path(), "10-web.yaml", NODE_JSON);
        let loaded = source.load().expect("load");
        assert!(
            services(&loaded).is_empty() && loaded.problems.is_empty(),
            "{loaded:?}"
        );
        write(dir.path(), "10-web.yaml", SERVICE_AND_SLICE);
        assert_eq!(services(&source.load().expect("load")), vec!["shop/web"]);
        std::fs::remove_file(dir.path().join("10-web.yaml")).expect("delete");
        assert!(
            services(&source.load().expect("load")).is_empty(),
            "deleting the file withdraws"
        );
    }

    #[test]
    fn names_are_validated_as_the_api_server_does() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let service = |namespace: &str, name: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name:?}, namespace: {namespace:?}}}\nspec: {{type: LoadBalancer, ports: [{{port: 80, nodePort: 30080}}]}}\n"
            )
        };
        let long = "a".repeat(300);
        let text = [
            service("default", "web"),
            service("default", "web/../x"),
            service("default", &long),
            service("my ns", "ok"),
            service("default", "9starts-with-digit"),
        ]
        .concat()
            + r#"---
apiVersion: v1
kind: Service
metadata: {name: "evil\x1b[31m\nINFO forged"}
spec: {type: LoadBalancer, ports: [{port: 81, nodePort: 30081}]}
"#;
        write(dir.path(), "s.yaml", &text);
        let loaded = FileSource::new(dir.path()).load().expect("load");
        let served: Vec<String> = loaded
            .state
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(served, vec!["default/web"]);
        assert_eq!(loaded.problems.len(), 5, "{:?}", loaded.problems);
        let evil = &loaded.problems[4].message;
        assert!(
            !evil.chars().any(char::is_control) && evil.contains("\\x1b"),
            "control characters must be escaped: {evil}"
        );
    }

    #[tokio::test]
    async fn changes_to_the_directory_are_sent() {
        let dir = manifest_dir();
        let mut receiver = FileSource::new(dir.path())
            .with_interval(Duration::from_millis(20))
            .spawn()
            .expect("the directory is readable");
        assert_eq!(receiver.borrow_and_update().services.len(), 3);
        std::fs::remove_file(dir.path().join("30-mixed.yml")).expect("remove a manifest");
        tokio::time::timeout(Duration::from_secs(10), receiver.changed())
            .await
            .expect("the removal is noticed within 10 s")
            .expect("the source is still running");
        let services: Vec<String> = receiver
            .borrow_and_update()
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(services, vec!["shop/web"]);
        // Touching a file without changing what it says sends nothing new.
        write(dir.path(), "20-node.json", &format!("{NODE_JSON}\n"));
        let unchanged = tokio::time::timeout(Duration::from_millis(300), receiver.changed()).await;
        assert!(
            unchanged.is_err(),
            "an identical state must not be sent again"
        );
    }
}
