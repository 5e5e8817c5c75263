//! The control loop: a source publishes cluster state, `reconcile` turns it into a plan, and
//! the actuators (addresses, data plane, status) apply only what changed. Wiring and I/O only;
//! the behaviour lives in `reconcile`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use kube::Resource as _;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::addr::probe::PROBE_INTERVAL;
use crate::addr::{AddrConfig, AddrManager, DesiredVips};
use crate::backoff::Backoff;
use crate::config::{Config, DataplaneKind, KubeconfigSource};
use crate::dataplane::proxy::ProxyDataplane;
use crate::dataplane::xdp::{XdpConfig, XdpDataplane};
use crate::dataplane::{Dataplane as _, Layered};
use crate::group::Group;
use crate::metrics::Metrics;
use crate::model::{Allocations, ClusterState, ServiceKey};
use crate::nodes::NodeTagger;
use crate::plan::{EventKind, Plan, StatusChange};
use crate::reconcile::{ANNOUNCED, reconcile};
use crate::settings::{Peers, Settings};
use crate::source::{file::FileSource, kube as kube_source};
use crate::status::StatusWriter;

/// How often addresses are re-checked even without a change (someone may have removed one).
const RESYNC: Duration = Duration::from_secs(30);

/// How many status clears run at once on exit.
const CLEAR_CONCURRENCY: usize = 16;

/// How often `/readyz` follows the source's connection state between reconciles: a watch
/// failure publishes no new state, so without this an API outage would show only at the next
/// resync.
const READINESS_POLL: Duration = Duration::from_millis(500);

/// How long the cleanup after SIGINT/SIGTERM may wait on the API server (clearing statuses)
/// before xlb gives up and exits; the DaemonSet's grace period (30 s) is longer.
pub const SHUTDOWN_API_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the whole shutdown may take before xlb exits regardless (a wedged runtime, a
/// netlink call that does not return).
pub const SHUTDOWN_HARD_LIMIT: Duration = Duration::from_secs(15);

/// Runs xlb until SIGINT/SIGTERM, then cleans up as the lifecycle rules say.
pub async fn run(config: Config) -> anyhow::Result<()> {
    raise_open_file_limit();
    let metrics = Arc::new(Metrics::default());
    let listener = crate::metrics::bind(config.metrics_addr)?;
    tokio::spawn(crate::metrics::serve(listener, metrics.clone()));

    let mut addrs = AddrManager::new(AddrConfig {
        link_device: config.link_device.clone(),
        announce: config.announce,
    })
    .await?;
    let mut dataplane = open_dataplane(&config, addrs.device())?;
    if dataplane.first.is_some() {
        let _ = metrics.xdp_pins.set(config.pin_dir.clone());
    }
    if let Some(proxy) = &dataplane.second {
        let _ = metrics.proxy.set(proxy.counters());
    }

    let synced = Arc::new(AtomicBool::new(true));
    let mut tagger = None;
    let mut source_task = None;
    let mut group = None;
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
            let (client, watch_client) =
                kube_source::clients(kubeconfig, config.node_name.as_deref()).await?;
            // The first value is a placeholder marked as seen: nothing is reconciled until the
            // watches have listed everything once.
            let (tx, states) = watch::channel(ClusterState::default());
            synced.store(false, Ordering::Relaxed);
            source_task = Some(tokio::spawn(kube_source::run(
                watch_client,
                tx,
                synced.clone(),
            )));
            if config.tag_worker_nodes {
                match &config.worker_label {
                    Some(label) => tagger = Some(NodeTagger::new(client.clone(), label.clone())),
                    None => tracing::warn!(
                        "--tag-worker-nodes does nothing with an empty --worker-label"
                    ),
                }
            }
            if let Some(node) = &config.node_name {
                group = Some(
                    Group::join(client.clone(), &config, node, &addrs, metrics.clone()).await?,
                );
            }
            let writer =
                StatusWriter::new(client, config.node_name.clone(), config.update_external_ips);
            (states, Some(writer))
        }
    };

    let mut controller = Controller {
        settings: Settings::from(&config),
        group,
        last_peers: None,
        tagger,
        allocations: Allocations::default(),
        warnings: BTreeSet::new(),
        failures: Default::default(),
        writer,
        metrics: metrics.clone(),
        seen_state: false,
    };
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut readiness = tokio::time::interval(READINESS_POLL);
    readiness.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // With several LB nodes: how often the live peers are judged again (a peer's ARP
    // answers stopping is no event of its own).
    let mut liveness = tokio::time::interval(PROBE_INTERVAL);
    liveness.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // After an apply that failed, try again soon (a frontend that could not bind, a VIP that
    // could not be placed) rather than at the next resync.
    let mut retry_backoff = Backoff::new(Duration::from_secs(1), RESYNC);
    let retry = tokio::time::sleep_until(far_future());
    tokio::pin!(retry);
    let mut applied = false;
    let mut state = ClusterState::default();
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
            () = &mut retry => {}
            () = members_changed(&mut controller.group) => {}
            _ = liveness.tick(), if controller.group.is_some() => {
                if !controller.peers_changed(&addrs) {
                    continue;
                }
            }
            _ = readiness.tick() => {
                metrics.set_ready(applied, synced.load(Ordering::Relaxed));
                continue;
            }
            _ = &mut shutdown => break,
        }
        if !controller.seen_state
            || controller
                .group
                .as_ref()
                .is_some_and(|group| !group.listed())
        {
            continue;
        }
        // Cloned, so no borrow of the channel is held while the actuators await: the source
        // must always be able to publish.
        state = states.borrow_and_update().clone();
        applied = controller.step(&state, &mut addrs, &mut dataplane).await;
        metrics.set_ready(applied, synced.load(Ordering::Relaxed));
        if applied {
            retry_backoff.reset();
            retry.as_mut().reset(far_future());
        } else {
            retry
                .as_mut()
                .reset(tokio::time::Instant::now() + retry_backoff.next_delay());
        }
    }

    tracing::info!(
        limit = ?SHUTDOWN_HARD_LIMIT,
        "shutting down; a second signal exits at once"
    );
    exit_on_second_signal();
    exit_after(SHUTDOWN_HARD_LIMIT);
    metrics.set_ready(false, false);
    if let Some(task) = source_task {
        task.abort();
    }
    if !config.keep_on_exit {
        // Stop taking new flows: established ones keep their conntrack entries until they end.
        if let Err(error) = dataplane.apply(&[]) {
            tracing::warn!(%error, "could not withdraw the services from the data plane");
        }
        match addrs.cleanup().await {
            Ok(removed) => tracing::info!(removed, "removed xlb's addresses"),
            Err(error) => tracing::warn!(%error, "could not remove xlb's addresses"),
        }
    }
    // With several LB nodes the others go on serving: hand the VIPs and the writer role over
    // at once, and leave the statuses to them. The last one, alone, clears them as a single
    // instance does.
    let mut last_of_the_group = true;
    if let Some(group) = controller.group.take() {
        last_of_the_group = controller.settings.writer
            && controller
                .last_peers
                .as_ref()
                .is_none_or(|peers| peers.live.iter().all(|node| *node == peers.me));
        if tokio::time::timeout(SHUTDOWN_API_TIMEOUT, group.leave())
            .await
            .is_err()
        {
            tracing::warn!(
                "could not leave the LB nodes in time: the others take over when this node's Lease expires"
            );
        }
    }
    if last_of_the_group && !config.keep_on_exit {
        let clearing = controller.clear_statuses(&state);
        if tokio::time::timeout(SHUTDOWN_API_TIMEOUT, clearing)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?SHUTDOWN_API_TIMEOUT,
                "gave up clearing Service statuses: the API server did not answer in time"
            );
        }
    }
    if config.cleanup {
        if let Some(xdp) = dataplane.first.as_mut() {
            xdp.detach_all();
        }
        if let Err(error) = std::fs::remove_dir_all(&config.pin_dir) {
            tracing::warn!(%error, dir = %config.pin_dir.display(), "could not remove pinned maps");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// A deadline no timer reaches: the retry timer's resting state.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Raises the soft open-file limit to the hard limit: the proxy holds descriptors for every
/// frontend and connection, and the default soft limit (often 1024) is far below what a
/// node allows.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        tracing::info!(limit = limit.rlim_cur, "open-file limit");
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit(2) reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::info!(
            from = limit.rlim_cur,
            to = limit.rlim_max,
            "raised the open-file limit to the hard limit"
        );
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), limit = limit.rlim_cur, "cannot raise the open-file limit");
    }
}

/// From now on SIGINT and SIGTERM have their default action (the process ends at once),
/// whatever state the runtime is in.
fn exit_on_second_signal() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: resetting a signal's disposition to the default has no preconditions.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// Ends the process after `limit` from a plain thread, so a shutdown that hangs (even with
/// every runtime thread blocked) still ends.
fn exit_after(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("xlb: shutdown did not finish within {limit:?}; exiting");
        std::process::exit(1);
    });
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
                snat_ports: config.snat_ports,
                ..XdpConfig::new(device)
            });
            match opened {
                Ok(mut xdp) => {
                    // A SNAT address that cannot be placed is a configuration error: fatal
                    // in every mode, as a bad flag is (the program is attached by now).
                    let extra = crate::addr::snat::place(&config.snat_addresses)?;
                    xdp.set_snat_addresses(&extra)?;
                    tracing::info!(
                        devices = ?xdp.devices(),
                        snat_ports = %format!("{}-{}", config.snat_ports.first, config.snat_ports.last()),
                        snat_addresses = ?config.snat_addresses,
                        "XDP data plane attached"
                    );
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

struct Controller {
    /// What reconcile decides with.
    settings: Settings,
    /// This instance among several LB nodes, if it is one of them.
    group: Option<Group>,
    /// The peers the last reconcile used.
    last_peers: Option<Peers>,
    /// Writes the node labels the plan asks for (`--tag-worker-nodes`).
    tagger: Option<NodeTagger>,
    /// What the last plan allocated; `reconcile` adopts from status on the first run.
    allocations: Allocations,
    /// Warnings of the last run, so each is logged and reported once while it lasts.
    warnings: BTreeSet<(ServiceKey, String)>,
    /// Failures of the last run and of this one, so each is logged once while it lasts
    /// (a failed apply is retried every few seconds).
    failures: (BTreeSet<String>, BTreeSet<String>),
    writer: Option<StatusWriter>,
    metrics: Arc<Metrics>,
    seen_state: bool,
}

impl Controller {
    /// One reconcile and apply. Returns whether every actuator succeeded.
    async fn step(
        &mut self,
        state: &ClusterState,
        addrs: &mut AddrManager,
        dataplane: &mut Dataplanes,
    ) -> bool {
        let mut ok = true;
        self.failures.0 = std::mem::take(&mut self.failures.1);
        let host = match addrs.host_network().await {
            Ok(host) => host,
            Err(error) => {
                self.failed(format!(
                    "reading the link device failed; nothing applied: {error}"
                ));
                return false;
            }
        };
        if let Some(group) = &self.group {
            let (peers, writer) = group.peers(addrs);
            self.settings.peers = Some(peers.clone());
            self.settings.writer = writer;
            self.last_peers = Some(peers);
        }
        self.metrics
            .writer
            .store(self.settings.writer, Ordering::Relaxed);
        let plan = reconcile(state, &self.settings, &host, &self.allocations);
        let moves = plan
            .events
            .iter()
            .filter(|event| event.reason == ANNOUNCED)
            .count();
        self.metrics
            .ownership_changes
            .fetch_add(moves as u64, Ordering::Relaxed);
        if let Ok(mut owned) = self.metrics.owned_vips.lock() {
            *owned = plan.vips.keys().copied().collect();
        }
        self.metrics.reconciles.fetch_add(1, Ordering::Relaxed);

        let desired: DesiredVips = plan
            .vips
            .iter()
            .map(|(ip, owners)| (*ip, owners.iter().map(ToString::to_string).collect()))
            .collect();
        match addrs.sync(&desired).await {
            Ok(report) => {
                for error in &report.failed {
                    self.failed(format!("VIP not placed: {error}"));
                    ok = false;
                }
                if !report.added.is_empty() || !report.removed.is_empty() {
                    tracing::info!(added = ?report.added, removed = ?report.removed, "addresses changed");
                }
            }
            Err(error) => {
                self.failed(format!("syncing addresses failed: {error}"));
                ok = false;
            }
        }
        if let Err(error) = dataplane.apply(&plan.virtual_services) {
            self.failed(format!("programming the data plane failed: {error}"));
            ok = false;
        }
        ok &= self.report(state, &plan).await;
        if let Some(tagger) = self.tagger.as_mut().filter(|_| self.settings.writer) {
            tagger.tag(&plan.node_labels).await;
        }

        self.metrics
            .virtual_services
            .store(plan.virtual_services.len() as u64, Ordering::Relaxed);
        self.metrics
            .vips
            .store(plan.vips.len() as u64, Ordering::Relaxed);
        if let Some(proxy) = &dataplane.second {
            if let Ok(mut slot) = self.metrics.proxy_listen_failures.lock() {
                *slot = proxy
                    .listen_failures()
                    .iter()
                    .map(|(reason, count)| (reason.label(), *count))
                    .collect();
            }
            self.metrics
                .proxy_not_listening
                .store(proxy.failing().len() as u64, Ordering::Relaxed);
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
        // Only the writer writes; the others log what they would have reported.
        let writer = self.writer.clone().filter(|_| self.settings.writer);
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
                (new, &writer, state.services.get(&event.service))
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
        let Some(writer) = writer else {
            return ok;
        };
        for (key, change) in &plan.statuses {
            let ingress = match change {
                StatusChange::Ingress { ip, ip_mode } => Some((*ip, *ip_mode)),
                StatusChange::Clear => None,
            };
            if let Err(error) = writer.set_ingress(&key.namespace, &key.name, ingress).await {
                self.failed(format!(
                    "writing the status of Service {key} failed: {error}"
                ));
                ok = false;
            }
        }
        ok
    }

    /// Whether the live peers differ from those of the last reconcile.
    fn peers_changed(&self, addrs: &AddrManager) -> bool {
        self.group
            .as_ref()
            .is_some_and(|group| Some(group.peers(addrs).0) != self.last_peers)
    }

    /// Logs a failure of this run at ERROR, unless the last run logged the same one.
    fn failed(&mut self, message: String) {
        if !self.failures.0.contains(&message) {
            tracing::error!("{message}");
        }
        self.failures.1.insert(message);
    }

    /// On exit: removes the ingress xlb wrote on every Service it served, a few at a time.
    async fn clear_statuses(&self, state: &ClusterState) {
        let Some(writer) = &self.writer else {
            return;
        };
        let clears = self
            .allocations
            .by_service
            .keys()
            .filter(|key| state.services.contains_key(*key))
            .map(|key| async move {
                if let Err(error) = writer.set_ingress(&key.namespace, &key.name, None).await {
                    tracing::warn!(%error, service = %key, "could not clear the Service status");
                }
            });
        futures::stream::iter(clears)
            .buffer_unordered(CLEAR_CONCURRENCY)
            .collect::<()>()
            .await;
        tracing::info!("cleared the Service statuses xlb wrote");
    }
}

/// Resolves when the group's Leases change; never without a group.
async fn members_changed(group: &mut Option<Group>) {
    match group {
        Some(group) => group.changed().await,
        None => std::future::pending().await,
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
