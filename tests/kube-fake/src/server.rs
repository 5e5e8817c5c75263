//! Starting and stopping a server, and the kubeconfig that points at it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::api;
use crate::discovery::{Docs, DocsError};
use crate::faults::Faults;
use crate::store::Store;

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on: loopback by default; another (a test namespace's bridge address)
    /// lets several network namespaces reach one server.
    pub addr: std::net::IpAddr,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// How many changes the store keeps for watches and old-version lists. A watch
    /// or list from a version older than that gets `410 Gone`.
    pub history_limit: usize,
    /// How often a watch with `allowWatchBookmarks` gets a bookmark (besides the one
    /// shortly before its `timeoutSeconds` deadline). The real server uses about a
    /// minute.
    pub bookmark_interval: Duration,
    /// Directory of the recorded discovery/OpenAPI fixtures.
    pub fixtures_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port: 0,
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(60),
            fixtures_dir: crate::discovery::default_dir(),
        }
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The discovery/OpenAPI documents could not be read.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}:{port}: {source}")]
    Listen {
        /// The address asked for.
        addr: std::net::IpAddr,
        /// The port asked for.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
}

/// State shared by all requests of one server.
#[derive(Debug)]
pub struct Shared {
    /// The objects.
    pub store: Store,
    /// Discovery and OpenAPI documents.
    pub docs: Arc<Docs>,
    /// Fault injection.
    pub faults: Faults,
    /// Settings.
    pub config: Config,
}

/// A running in-memory API server. Dropping it stops it (and ends its watches).
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Server {
    /// Starts a server with the default [`Config`] on an ephemeral loopback port.
    pub async fn start() -> Result<Server, StartError> {
        Server::start_with(Config::default()).await
    }

    /// Starts a server.
    pub async fn start_with(config: Config) -> Result<Server, StartError> {
        let docs = Docs::load(&config.fixtures_dir)?;
        let listener = TcpListener::bind((config.addr, config.port))
            .await
            .map_err(|source| StartError::Listen {
                addr: config.addr,
                port: config.port,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.addr,
            port: config.port,
            source,
        })?;
        let store = Store::new(config.history_limit);
        api::seed(&mut store.lock());
        let shared = Arc::new(Shared {
            store,
            docs,
            faults: Faults::default(),
            config,
        });
        let (shutdown, stop) = oneshot::channel::<()>();
        let app = crate::http::router(shared.clone());
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stop.await;
            });
            if let Err(err) = serve.await {
                tracing::warn!(error = %err, "kube-fake server stopped");
            }
        });
        tracing::debug!(%addr, "kube-fake listening");
        Ok(Server {
            addr,
            shared,
            shutdown: Some(shutdown),
        })
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (plain HTTP, no credentials, namespace `default`).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// Writes [`Server::kubeconfig_yaml`] to `path` (for `KUBECONFIG=path kubectl …`).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// The fault hooks of this server.
    pub fn faults(&self) -> Faults {
        self.shared.faults.clone()
    }

    /// Forgets the change history now: a watch from any resourceVersion up to now
    /// (and a list at any earlier one) gets `410 Gone` (`Expired`), so clients must
    /// list again.
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    /// Changes how many changes the store keeps (see [`Config::history_limit`]).
    pub fn set_history_limit(&self, limit: usize) {
        self.shared.store.lock().set_history_limit(limit);
    }

    /// The current resourceVersion of the store.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().rv()
    }

    /// Waits until the server stops (it does not stop by itself: for binaries that
    /// serve until killed).
    pub async fn serve_forever(self) {
        std::future::pending::<()>().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.faults.drop_watches();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// A kubeconfig for a server at `url`.
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-fake
  cluster:
    server: {url}
contexts:
- name: kube-fake
  context:
    cluster: kube-fake
    user: kube-fake
    namespace: default
current-context: kube-fake
users:
- name: kube-fake
  user: {{}}
preferences: {{}}
"
    )
}
