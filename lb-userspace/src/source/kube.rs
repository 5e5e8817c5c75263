//! Cluster state from the Kubernetes API: reflectors over Services, EndpointSlices and Nodes in
//! all namespaces, with managed fields trimmed from the cache. Every change publishes a fresh
//! snapshot on a `watch` channel, which coalesces bursts: the reconciler always sees the latest.
//!
//! A watch that fails is started again from a fresh list after a jittered backoff (0.2 s
//! doubling to [`WATCH_BACKOFF_CAP`]), as client-go's reflector does after an expired version:
//! a completed list is the only sure sign that a watch is in sync again, which is what
//! `/readyz` reports. While any watch is down the last snapshot stays in force. An outage is
//! logged once when it starts (WARN) and once when every watch has listed again (INFO); the
//! failed attempts in between are DEBUG.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::model::ClusterState;

/// The `User-Agent` of every request xlb makes, so API server logs and audit name it.
pub const USER_AGENT: &str = concat!("xlb/", env!("CARGO_PKG_VERSION"));

/// The longest wait between two attempts to restart a failed watch: short enough that a
/// change made right after the API returns applies within a few seconds, long enough that an
/// outage costs the API server about one request a second per watch at most.
pub const WATCH_BACKOFF_CAP: Duration = Duration::from_secs(3);

/// The first wait after a watch fails.
const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(200);

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
pub async fn clients(
    kubeconfig: Option<PathBuf>,
    node: Option<&str>,
) -> Result<(Client, Client), KubeSourceError> {
    let mut config = config(kubeconfig).await?;
    // With several LB nodes, API server logs (and tests) tell the instances apart.
    if let Some(agent) = node
        .and_then(|node| http::HeaderValue::from_str(&format!("{USER_AGENT} (node {node})")).ok())
    {
        config
            .headers
            .retain(|(name, _)| name != http::header::USER_AGENT);
        config.headers.push((http::header::USER_AGENT, agent));
    }
    let mut watch_config = config.clone();
    watch_config.default_retry = false;
    Ok((Client::try_from(config)?, Client::try_from(watch_config)?))
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
    let mut config = config;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    Ok(config)
}

/// Watches the cluster until the channel's receivers are gone (or the task is aborted, which
/// stops the watches too). `synced` is true while every watch has listed since its last failure
/// (for `/readyz`). Nothing is published until each kind has listed once, so a partial view
/// never withdraws a Service.
pub async fn run(client: Client, tx: watch::Sender<ClusterState>, synced: Arc<AtomicBool>) {
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let (reports, mut received) = mpsc::unbounded_channel();
    let mut watches = tokio::task::JoinSet::new();
    watches.spawn(watch_kind(
        0,
        Api::<Service>::all(client.clone()),
        services_writer,
        reports.clone(),
    ));
    watches.spawn(watch_kind(
        1,
        Api::<EndpointSlice>::all(client.clone()),
        slices_writer,
        reports.clone(),
    ));
    watches.spawn(watch_kind(
        2,
        Api::<Node>::all(client),
        nodes_writer,
        reports,
    ));
    let mut listed = [false; KINDS.len()];
    let mut in_sync = [false; KINDS.len()];
    let mut outage: Option<Instant> = None;
    while let Some(report) = received.recv().await {
        match report {
            Report::Failed { kind, error } => {
                in_sync[kind] = false;
                synced.store(false, Ordering::Relaxed);
                if outage.is_none() {
                    outage = Some(Instant::now());
                    tracing::warn!(%error, watch = KINDS[kind], "Kubernetes API lost; keeping the last known state and retrying");
                } else {
                    tracing::debug!(%error, watch = KINDS[kind], "Kubernetes watch failed again");
                }
            }
            Report::Changed { kind, list_done } => {
                if list_done {
                    listed[kind] = true;
                    in_sync[kind] = true;
                }
                let all_synced = in_sync.iter().all(|done| *done);
                synced.store(all_synced, Ordering::Relaxed);
                if all_synced && let Some(since) = outage.take() {
                    tracing::info!(after = ?since.elapsed(), "Kubernetes API answers again; every watch listed afresh");
                }
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
        }
    }
}

/// The watched kinds, by index, for logs.
const KINDS: [&str; 3] = ["services", "endpointslices", "nodes"];

/// What one watch tells the aggregator.
enum Report {
    /// Its store changed; `list_done` when a (re)list has just completed.
    Changed { kind: usize, list_done: bool },
    /// It failed and will list afresh after a backoff.
    Failed { kind: usize, error: String },
}

/// Keeps one kind's store in step with the API: list, then watch; on any error, wait a
/// jittered backoff and start over from a fresh list. The store keeps its last content until
/// the new list completes.
async fn watch_kind<K>(
    kind: usize,
    api: Api<K>,
    mut writer: reflector::store::Writer<K>,
    reports: mpsc::UnboundedSender<Report>,
) where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut backoff = Backoff::new(WATCH_BACKOFF_FIRST, WATCH_BACKOFF_CAP);
    loop {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        let error = loop {
            match events.next().await {
                Some(Ok(event)) => {
                    let event = event.modify(|object| object.managed_fields_mut().clear());
                    writer.apply_watcher_event(&event);
                    let list_done = matches!(event, watcher::Event::InitDone);
                    if list_done {
                        backoff.reset();
                    }
                    if reports.send(Report::Changed { kind, list_done }).is_err() {
                        return;
                    }
                }
                Some(Err(error)) => break error.to_string(),
                // A watcher restarts its own watches and never ends; if it did, list again.
                None => break "the watch stream ended".to_owned(),
            }
        };
        drop(events);
        if reports.send(Report::Failed { kind, error }).is_err() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
