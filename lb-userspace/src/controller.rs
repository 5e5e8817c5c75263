//! The control loop: a source publishes cluster state, `reconcile` turns it into a plan, and
//! the actuators (addresses, data plane, status) apply only what changed. Wiring and I/O only;
//! the behaviour lives in `reconcile`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Resource as _;
use tokio::sync::watch;

use crate::addr::{AddrConfig, AddrManager, DesiredVips};
use crate::config::{Config, DataplaneKind, KubeconfigSource};
use crate::dataplane::proxy::ProxyDataplane;
use crate::dataplane::xdp::{XdpConfig, XdpDataplane};
use crate::dataplane::{Dataplane as _, Layered};
use crate::metrics::Metrics;
use crate::model::{Allocations, ClusterState, ServiceKey};
use crate::nodes::NodeTagger;
use crate::reconcile::{EventKind, Plan, StatusChange, reconcile};
use crate::source::{file::FileSource, kube as kube_source};
use crate::status::StatusWriter;

/// How often addresses are re-checked even without a change (someone may have removed one).
const RESYNC: Duration = Duration::from_secs(30);

/// How often `/readyz` follows the source's connection state between reconciles: a watch
/// failure publishes no new state, so without this an API outage would show only at the next
/// resync.
const READINESS_POLL: Duration = Duration::from_millis(500);

/// Runs xlb until SIGINT/SIGTERM, then cleans up as the lifecycle rules say.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let metrics_addr = config.metrics_addr;
    let serving = metrics.clone();
    tokio::spawn(async move {
        if let Err(error) = crate::metrics::serve(metrics_addr, serving).await {
            tracing::error!(%error, addr = %metrics_addr, "metrics listener failed");
        }
    });

    let mut addrs = AddrManager::new(AddrConfig {
        link_device: config.link_device.clone(),
        announce: config.announce,
        local_only: config.announce_local_only,
    })
    .await?;
    let mut dataplane = open_dataplane(&config, addrs.device())?;

    let connected = Arc::new(AtomicBool::new(true));
    let mut tagger = None;
    let (mut states, writer) = match &config.manifests {
        Some(dir) => {
            if config.tag_worker_nodes {
                tracing::warn!("--tag-worker-nodes does nothing with --manifests");
            }
            tracing::info!(dir = %dir.display(), "reading Services, EndpointSlices and Nodes from manifests");
            let mut states = FileSource::new(dir.clone()).spawn()?;
            states.mark_changed();
            (states, None)
        }
        None => {
            let kubeconfig = match &config.kubeconfig {
                KubeconfigSource::Infer => None,
                KubeconfigSource::File(path) => Some(path.clone()),
            };
            let (client, watch_client) = kube_source::clients(kubeconfig).await?;
            // The first value is a placeholder marked as seen: nothing is reconciled until the
            // watches have listed everything once.
            let (tx, states) = watch::channel(ClusterState::default());
            tokio::spawn(kube_source::run(watch_client, tx, connected.clone()));
            if config.tag_worker_nodes {
                match &config.worker_label {
                    Some(label) => tagger = Some(NodeTagger::new(client.clone(), label.clone())),
                    None => tracing::warn!(
                        "--tag-worker-nodes does nothing with an empty --worker-label"
                    ),
                }
            }
            let writer =
                StatusWriter::new(client, config.node_name.clone(), config.update_external_ips);
            (states, Some(writer))
        }
    };

    let mut controller = Controller {
        config: &config,
        allocations: Allocations::default(),
        warnings: BTreeSet::new(),
        writer,
        metrics: metrics.clone(),
        seen_state: false,
    };
    let mut resync = tokio::time::interval(RESYNC);
    let mut readiness = tokio::time::interval(READINESS_POLL);
    let mut applied = false;
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the cluster-state source stopped");
                }
                controller.seen_state = true;
            }
            _ = resync.tick() => {}
            _ = readiness.tick() => {
                metrics
                    .ready
                    .store(applied && connected.load(Ordering::Relaxed), Ordering::Relaxed);
                continue;
            }
            _ = &mut shutdown => break,
        }
        if !controller.seen_state {
            continue;
        }
        let state = states.borrow_and_update().clone();
        applied = controller.step(&state, &mut addrs, &mut dataplane).await;
        metrics.ready.store(
            applied && connected.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if let Some(tagger) = &mut tagger {
            tagger.tag(&state).await;
        }
    }

    tracing::info!("shutting down; a second signal exits at once");
    tokio::spawn(async {
        shutdown_signal().await;
        std::process::exit(130);
    });
    if !config.keep_on_exit {
        // Stop taking new flows: established ones keep their conntrack entries until they end.
        if let Err(error) = dataplane.apply(&[]) {
            tracing::warn!(%error, "could not withdraw the services from the data plane");
        }
        match addrs.cleanup().await {
            Ok(removed) => tracing::info!(removed, "removed xlb's addresses"),
            Err(error) => tracing::warn!(%error, "could not remove xlb's addresses"),
        }
        controller.clear_statuses(&states.borrow()).await;
    }
    if config.cleanup {
        if let Some(xdp) = dataplane.first.as_mut() {
            xdp.detach_all();
        }
        if let Err(error) = std::fs::remove_dir_all(&config.pin_dir) {
            tracing::warn!(%error, dir = %config.pin_dir.display(), "could not remove pinned maps");
        }
    }
    Ok(())
}

/// The data planes `--dataplane` chose: XDP, the userspace proxy, or both.
type Dataplanes = Layered<Option<XdpDataplane>, Option<ProxyDataplane>>;

/// Opens the data planes `--dataplane` asks for. With `both`, an XDP program that cannot be
/// loaded or attached leaves the proxy alone, with a warning; with `xdp` it is an error.
fn open_dataplane(config: &Config, device: &str) -> anyhow::Result<Dataplanes> {
    let xdp = match config.dataplane {
        DataplaneKind::Proxy => None,
        DataplaneKind::Xdp | DataplaneKind::Both => {
            let opened = XdpDataplane::open(XdpConfig {
                pin_dir: config.pin_dir.clone(),
                mode: config.xdp_mode,
                ..XdpConfig::new(device)
            });
            match opened {
                Ok(xdp) => {
                    tracing::info!(devices = ?xdp.devices(), "XDP data plane attached");
                    Some(xdp)
                }
                Err(error) if config.dataplane == DataplaneKind::Both => {
                    tracing::warn!(
                        %error,
                        "XDP could not be loaded or attached; carrying all traffic with the userspace proxy (slower). \
                         Fix the cause above, or set --dataplane proxy to run without BPF"
                    );
                    if crate::dataplane::pins::stale_links(&config.pin_dir) {
                        tracing::warn!(
                            dir = %config.pin_dir.display(),
                            "XDP links pinned there by an earlier xlb stay attached and keep forwarding with their old maps; \
                             remove that directory if the proxy alone should carry the traffic"
                        );
                    }
                    None
                }
                Err(error) => return Err(error.into()),
            }
        }
    };
    let proxy = match config.dataplane {
        DataplaneKind::Xdp => None,
        DataplaneKind::Proxy | DataplaneKind::Both => {
            tracing::info!("userspace proxy data plane running");
            Some(ProxyDataplane::new()?)
        }
    };
    Ok(Layered {
        first: xdp,
        second: proxy,
    })
}

struct Controller<'a> {
    config: &'a Config,
    /// What the last plan allocated; `reconcile` adopts from status on the first run.
    allocations: Allocations,
    /// Warnings of the last run, so each is logged and reported once while it lasts.
    warnings: BTreeSet<(ServiceKey, String)>,
    writer: Option<StatusWriter>,
    metrics: Arc<Metrics>,
    seen_state: bool,
}

impl Controller<'_> {
    /// One reconcile and apply. Returns whether every actuator succeeded.
    async fn step(
        &mut self,
        state: &ClusterState,
        addrs: &mut AddrManager,
        dataplane: &mut Dataplanes,
    ) -> bool {
        let mut ok = true;
        let host = match addrs.host_network().await {
            Ok(host) => host,
            Err(error) => {
                tracing::error!(%error, "reading the link device failed; nothing applied");
                return false;
            }
        };
        let plan = reconcile(state, self.config, &host, &self.allocations);
        self.metrics.reconciles.fetch_add(1, Ordering::Relaxed);

        let desired: DesiredVips = plan
            .vips
            .iter()
            .map(|(ip, owners)| (*ip, owners.iter().map(ToString::to_string).collect()))
            .collect();
        let local: BTreeSet<String> = plan
            .vips
            .iter()
            .filter(|(ip, _)| plan.local_endpoint_vips.contains(ip))
            .flat_map(|(_, owners)| owners.iter().map(ToString::to_string))
            .collect();
        match addrs.sync(&desired, &local).await {
            Ok(report) => {
                for error in &report.failed {
                    tracing::error!(%error, "VIP not placed");
                    ok = false;
                }
                if !report.added.is_empty() || !report.removed.is_empty() {
                    tracing::info!(added = ?report.added, removed = ?report.removed, "addresses changed");
                }
            }
            Err(error) => {
                tracing::error!(%error, "syncing addresses failed");
                ok = false;
            }
        }
        if let Err(error) = dataplane.apply(&plan.virtual_services) {
            tracing::error!(%error, "programming the data plane failed");
            ok = false;
        }
        ok &= self.report(state, &plan).await;

        self.metrics
            .virtual_services
            .store(plan.virtual_services.len() as u64, Ordering::Relaxed);
        self.metrics
            .vips
            .store(plan.vips.len() as u64, Ordering::Relaxed);
        if let Some(proxy) = &dataplane.second
            && let Ok(mut slot) = self.metrics.proxy.lock()
        {
            *slot = proxy.stats().into_iter().collect();
        }
        if let Some(xdp) = &dataplane.first
            && let Ok(stats) = xdp.stats()
        {
            let counters = lb_common::STAT_NAMES
                .iter()
                .zip(stats)
                .map(|(name, value)| ((*name).to_owned(), value))
                .collect();
            if let Ok(mut slot) = self.metrics.dataplane.lock() {
                *slot = counters;
            }
        }
        if !ok {
            self.metrics.apply_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.allocations = plan.allocations;
        ok
    }

    /// Logs the plan's events (each Warning once while it lasts), writes statuses and Events.
    async fn report(&mut self, state: &ClusterState, plan: &Plan) -> bool {
        let mut ok = true;
        let mut warnings = BTreeSet::new();
        for event in &plan.events {
            let new = match event.kind {
                EventKind::Normal => {
                    tracing::info!(service = %event.service, reason = event.reason, "{}", event.message);
                    true
                }
                EventKind::Warning => {
                    let key = (event.service.clone(), event.message.clone());
                    let new = !self.warnings.contains(&key);
                    if new {
                        tracing::warn!(service = %event.service, reason = event.reason, "{}", event.message);
                    }
                    warnings.insert(key);
                    new
                }
            };
            if let (true, Some(writer), Some(service)) =
                (new, &self.writer, state.services.get(&event.service))
                && let Err(error) = writer
                    .event(
                        &service.object_ref(&()),
                        event.kind,
                        event.reason,
                        &event.message,
                    )
                    .await
            {
                tracing::warn!(%error, service = %event.service, "could not record an Event");
            }
        }
        self.warnings = warnings;
        let Some(writer) = &self.writer else {
            return ok;
        };
        for (key, change) in &plan.statuses {
            let ingress = match change {
                StatusChange::Ingress { ip, ip_mode } => Some((*ip, *ip_mode)),
                StatusChange::Clear => None,
            };
            if let Err(error) = writer.set_ingress(&key.namespace, &key.name, ingress).await {
                tracing::error!(%error, service = %key, "writing the Service status failed");
                ok = false;
            }
        }
        ok
    }

    /// On exit: removes the ingress xlb wrote on every Service it served.
    async fn clear_statuses(&self, state: &ClusterState) {
        let Some(writer) = &self.writer else {
            return;
        };
        for key in self.allocations.by_service.keys() {
            if !state.services.contains_key(key) {
                continue;
            }
            if let Err(error) = writer.set_ingress(&key.namespace, &key.name, None).await {
                tracing::warn!(%error, service = %key, "could not clear the Service status");
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops xlb");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration whose XDP data plane cannot open: the pin directory is not on bpffs
    /// (and without root the BPF load fails anyway).
    fn unloadable_xdp(dataplane: DataplaneKind) -> (Config, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = Config {
            dataplane,
            pin_dir: dir.path().join("pins"),
            ..Config::default()
        };
        (config, dir)
    }

    #[tokio::test]
    async fn both_continues_with_the_proxy_when_xdp_cannot_load() {
        let (config, _dir) = unloadable_xdp(DataplaneKind::Both);
        let dataplanes = open_dataplane(&config, "lo").expect("both falls back to the proxy");
        assert!(dataplanes.first.is_none(), "XDP cannot have loaded");
        assert!(dataplanes.second.is_some(), "the proxy must run");
    }

    #[tokio::test]
    async fn xdp_alone_fails_when_xdp_cannot_load() {
        let (config, _dir) = unloadable_xdp(DataplaneKind::Xdp);
        assert!(open_dataplane(&config, "lo").is_err());
    }

    #[tokio::test]
    async fn proxy_alone_loads_no_bpf() {
        let (config, dir) = unloadable_xdp(DataplaneKind::Proxy);
        let dataplanes = open_dataplane(&config, "lo").expect("the proxy needs no BPF");
        assert!(dataplanes.first.is_none() && dataplanes.second.is_some());
        assert!(
            !dir.path().join("pins").exists(),
            "--dataplane proxy must not touch the pin directory"
        );
    }
}
