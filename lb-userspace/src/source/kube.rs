//! Cluster state from the Kubernetes API: reflectors over Services, EndpointSlices and Nodes in
//! all namespaces, with managed fields trimmed from the cache. Every change publishes a fresh
//! snapshot on a `watch` channel, which coalesces bursts: the reconciler always sees the latest.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use tokio::sync::watch;

use crate::model::ClusterState;

/// Errors creating the Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}; check KUBECONFIG / --kubeconfig")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster ({in_cluster}) and no ~/.kube/config ({kubeconfig}); set KUBECONFIG or use --manifests DIR"
    )]
    NoConfig {
        in_cluster: kube::config::InClusterError,
        kubeconfig: kube::config::KubeconfigError,
    },
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds two clients: `kubeconfig` when given (KUBECONFIG), else the in-cluster service
/// account, else `~/.kube/config`. The first, for writes, retries 429/503/504 answers itself
/// (kube's default). The second, for the watches, does not: the client's retries back off up to
/// 15 times over minutes without surfacing an error, which would hide an API outage from
/// `/readyz`; the watchers have their own backoff.
pub async fn clients(kubeconfig: Option<PathBuf>) -> Result<(Client, Client), KubeSourceError> {
    let config = config(kubeconfig).await?;
    let mut watch_config = config.clone();
    watch_config.default_retry = false;
    Ok((Client::try_from(config)?, Client::try_from(watch_config)?))
}

/// Builds a client as [`clients`] does, for writes (with kube's default retries).
pub async fn client(kubeconfig: Option<PathBuf>) -> Result<Client, KubeSourceError> {
    Ok(Client::try_from(config(kubeconfig).await?)?)
}

async fn config(kubeconfig: Option<PathBuf>) -> Result<kube::Config, KubeSourceError> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let config = match kubeconfig {
        Some(path) => {
            let file =
                Kubeconfig::read_from(&path).map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig { path, source })?
        }
        None => match Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .map_err(|kubeconfig| KubeSourceError::NoConfig {
                    in_cluster,
                    kubeconfig,
                })?,
        },
    };
    Ok(config)
}

/// While disconnected, how often the API server is asked for its version to see whether it is
/// back.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Watches the cluster until the channel's receivers are gone. `connected` is true while the
/// API is reachable (for /readyz): false after a watch error, true again at the next event or
/// as soon as a probe of the API server's version succeeds (a watch that resumes without a
/// change yields no event, so without the probe a quiet cluster would stay "not ready" until
/// its next change). The watchers retry with backoff and the last snapshot stays in force
/// meanwhile.
pub async fn run(client: Client, tx: watch::Sender<ClusterState>, connected: Arc<AtomicBool>) {
    let prober = client.clone();
    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let streams = stream::select_all([
        reflect(0, Api::<Service>::all(client.clone()), services_writer),
        reflect(1, Api::<EndpointSlice>::all(client.clone()), slices_writer),
        reflect(2, Api::<Node>::all(client), nodes_writer),
    ]);
    tokio::pin!(streams);
    // Nothing is published until each kind has finished its first list, so a partial view
    // never withdraws a Service.
    let mut listed = [false; 3];
    loop {
        let outcome = tokio::select! {
            outcome = streams.next() => outcome,
            _ = probe.tick(), if !connected.load(Ordering::Relaxed) => {
                if prober.apiserver_version().await.is_ok() {
                    tracing::info!("the Kubernetes API answers again");
                    connected.store(true, Ordering::Relaxed);
                }
                continue;
            }
        };
        let Some(outcome) = outcome else { return };
        match outcome {
            Ok(Change { source, list_done }) => {
                connected.store(true, Ordering::Relaxed);
                listed[source] |= list_done;
                if listed.iter().all(|done| *done) {
                    let mut state = ClusterState::default();
                    for service in services.state() {
                        state.upsert_service((*service).clone());
                    }
                    for slice in slices.state() {
                        state.upsert_endpoint_slice((*slice).clone());
                    }
                    for node in nodes.state() {
                        state.upsert_node((*node).clone());
                    }
                    if tx.send(state).is_err() {
                        return;
                    }
                }
            }
            Err(err) => {
                connected.store(false, Ordering::Relaxed);
                tracing::warn!(error = %err, "Kubernetes watch failed; keeping the last known state and retrying");
            }
        }
    }
}

/// Something changed in the store of watch number `source`; `list_done` when its (re)list ended.
struct Change {
    source: usize,
    list_done: bool,
}

type ChangeStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Change, watcher::Error>> + Send>>;

/// One reflector stream with backoff and managed fields trimmed.
fn reflect<K>(source: usize, api: Api<K>, writer: reflector::store::Writer<K>) -> ChangeStream
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|object: &mut K| object.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |event| {
            event.map(|event| Change {
                source,
                list_done: matches!(event, watcher::Event::InitDone),
            })
        })
        .boxed()
}
