//! Several LB nodes, coordinated through `coordination.k8s.io/v1` Leases in one namespace
//! (`--lease-namespace`, the pod's namespace in the DaemonSet):
//!
//! - **Membership**: each instance keeps a Lease of its own, `xlb-node-<node>`, labelled
//!   [`MEMBER_LABEL`] and annotated with its address on the link device
//!   ([`LINK_ADDRESS_ANNOTATION`]), renewed every `--lease-renew`. The LB nodes are the Leases
//!   that exist; which of them are live is decided with the data plane's help
//!   ([`crate::ownership::live_nodes`]). An instance stopped with SIGTERM deletes its Lease, so
//!   the others take its VIPs over at once.
//! - **One writer**: the holder of the Lease [`WRITER_LEASE`] allocates and writes Service
//!   status, `externalIPs`, Events and node labels. It renews every `--lease-renew`; another
//!   instance takes it once it has seen no change for `--lease-duration` on its own clock (as
//!   client-go does, so clock skew between nodes does not matter), with the resourceVersion it
//!   saw, so two cannot both win. A holder that cannot renew for `--lease-duration` stops
//!   writing; one stopped with SIGTERM gives the Lease up.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};

use crate::metrics::Metrics;
use crate::ownership::Member;

/// The label on every member Lease.
pub const MEMBER_LABEL: &str = "xlb.io/lb-node";

/// The annotation with the member's address on its link device, which peers probe.
pub const LINK_ADDRESS_ANNOTATION: &str = "xlb.io/link-address";

/// The Lease whose holder is the one writer.
pub const WRITER_LEASE: &str = "xlb";

/// How this instance takes part.
#[derive(Debug, Clone)]
pub struct MembersConfig {
    pub namespace: String,
    /// This node (`--node-name`).
    pub node: String,
    pub renew: Duration,
    pub duration: Duration,
    /// This node's address on the link device, published for peers to probe.
    pub link_address: Option<Ipv4Addr>,
}

/// What this instance knows of the group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Every LB node with a member Lease, by node name (this one included once renewed).
    pub members: BTreeMap<String, Member>,
    /// This instance holds the writer Lease and renewed it within `--lease-duration`.
    pub writer: bool,
    /// Who holds the writer Lease, as last seen.
    pub writer_holder: Option<String>,
    /// The Leases have been listed once: before that, the members are unknown.
    pub listed: bool,
}

/// The running membership: its view, and how to leave.
pub struct Members {
    view: watch::Receiver<View>,
    leave: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Members {
    /// Joins the group and keeps the view current until [`Members::leave`].
    pub fn spawn(client: Client, config: MembersConfig, metrics: Arc<Metrics>) -> Members {
        let (tx, view) = watch::channel(View::default());
        let (leave, left) = oneshot::channel();
        let task = tokio::spawn(run(client, config, tx, left, metrics));
        Members {
            view,
            leave: Some(leave),
            task,
        }
    }

    /// A receiver of the view.
    pub fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// Leaves the group: deletes this node's Lease and gives the writer Lease up if held.
    /// Bounded by the caller's timeout; the task ends either way.
    pub async fn leave(mut self) {
        if let Some(leave) = self.leave.take() {
            let (done, wait) = oneshot::channel();
            if leave.send(done).is_ok() {
                let _ = wait.await;
            }
        }
        self.task.abort();
    }
}

/// A Lease as last seen, and when it last changed on this instance's clock.
struct Seen {
    lease: Lease,
    changed: Instant,
}

async fn run(
    client: Client,
    config: MembersConfig,
    tx: watch::Sender<View>,
    mut left: oneshot::Receiver<oneshot::Sender<()>>,
    metrics: Arc<Metrics>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let own_name = format!("xlb-node-{}", config.node);
    let mut leases: BTreeMap<String, Seen> = BTreeMap::new();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut renew = tokio::time::interval(config.renew);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut writer_renewed: Option<Instant> = None;
    let mut watch_failing = false;
    let mut listed = false;
    loop {
        tokio::select! {
            event = events.next() => {
                match event {
                    Some(Ok(event)) => {
                        watch_failing = false;
                        listed |= matches!(event, watcher::Event::InitDone);
                        apply_event(&mut leases, event);
                    }
                    Some(Err(error)) => {
                        if !watch_failing {
                            tracing::warn!(%error, "watching the coordination Leases failed; retrying");
                            watch_failing = true;
                        }
                        tokio::time::sleep(config.renew).await;
                    }
                    None => events = watcher(api.clone(), watcher::Config::default()).boxed(),
                }
            }
            _ = renew.tick() => {
                let started = Instant::now();
                match renew_member(&api, &own_name, &config).await {
                    Ok(()) => metrics.set_lease_renew(started.elapsed()),
                    Err(error) => tracing::debug!(%error, "renewing this node's Lease failed"),
                }
                match claim_writer(&api, &config, leases.get(WRITER_LEASE)).await {
                    Ok(Claim::Held(lease)) => {
                        writer_renewed = Some(Instant::now());
                        // The answer carries the new resourceVersion: the next renewal needs
                        // it, whether or not the watch has delivered it yet.
                        leases.insert(WRITER_LEASE.to_owned(), Seen { lease: *lease, changed: Instant::now() });
                    }
                    Ok(Claim::Other) => writer_renewed = None,
                    Ok(Claim::Raced) => {}
                    Err(error) => tracing::debug!(%error, "renewing the writer Lease failed"),
                }
            }
            done = &mut left => {
                give_up(&api, &own_name, &config, leases.get(WRITER_LEASE)).await;
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
        let writer = writer_renewed.is_some_and(|at| at.elapsed() < config.duration);
        let view = View {
            listed,
            ..view_of(&leases, &config, writer)
        };
        tx.send_if_modified(|current| {
            if *current == view {
                return false;
            }
            if current.writer != view.writer {
                tracing::info!(
                    writer = view.writer,
                    "this instance {} the writer",
                    if view.writer {
                        "is now"
                    } else {
                        "is no longer"
                    }
                );
            }
            if current.members.keys().ne(view.members.keys()) {
                tracing::info!(members = ?view.members.keys().collect::<Vec<_>>(), "LB nodes");
            }
            *current = view;
            true
        });
    }
}

/// Keeps `leases` in step with one watch event, noting when each changed.
fn apply_event(leases: &mut BTreeMap<String, Seen>, event: watcher::Event<Lease>) {
    let mut upsert = |lease: Lease| {
        let Some(name) = lease.metadata.name.clone() else {
            return;
        };
        let changed = leases
            .get(&name)
            .filter(|seen| seen.lease.metadata.resource_version == lease.metadata.resource_version)
            .map_or_else(Instant::now, |seen| seen.changed);
        leases.insert(name, Seen { lease, changed });
    };
    match event {
        watcher::Event::Apply(lease) | watcher::Event::InitApply(lease) => upsert(lease),
        watcher::Event::Delete(lease) => {
            if let Some(name) = &lease.metadata.name {
                leases.remove(name);
            }
        }
        watcher::Event::Init | watcher::Event::InitDone => {}
    }
}

/// The group as `leases` show it now.
fn view_of(leases: &BTreeMap<String, Seen>, config: &MembersConfig, writer: bool) -> View {
    let members = leases
        .values()
        .filter(|seen| {
            seen.lease
                .metadata
                .labels
                .as_ref()
                .is_some_and(|labels| labels.contains_key(MEMBER_LABEL))
        })
        .filter_map(|seen| {
            let spec = seen.lease.spec.as_ref()?;
            let node = spec.holder_identity.clone()?;
            let link_address = seen
                .lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(LINK_ADDRESS_ANNOTATION))
                .and_then(|text| text.parse().ok());
            let fresh = seen.changed.elapsed() < config.duration;
            Some((
                node,
                Member {
                    link_address,
                    fresh,
                },
            ))
        })
        .collect();
    let writer_holder = leases
        .get(WRITER_LEASE)
        .and_then(|seen| seen.lease.spec.as_ref()?.holder_identity.clone())
        .filter(|holder| !holder.is_empty());
    View {
        members,
        writer,
        writer_holder,
        listed: false,
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn duration_seconds(config: &MembersConfig) -> i32 {
    i32::try_from(config.duration.as_secs_f64().ceil() as i64).unwrap_or(i32::MAX)
}

/// Renews this node's member Lease, creating it if missing.
async fn renew_member(
    api: &Api<Lease>,
    name: &str,
    config: &MembersConfig,
) -> Result<(), kube::Error> {
    let mut annotations = BTreeMap::new();
    if let Some(address) = config.link_address {
        annotations.insert(LINK_ADDRESS_ANNOTATION.to_owned(), address.to_string());
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MEMBER_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.node.clone()),
            lease_duration_seconds: Some(duration_seconds(config)),
            renew_time: Some(now()),
            ..LeaseSpec::default()
        }),
    };
    let patch = serde_json::json!({
        "metadata": {
            "labels": lease.metadata.labels,
            "annotations": lease.metadata.annotations,
        },
        "spec": lease.spec,
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Err(error) => Err(error),
    }
}

/// The outcome of [`claim_writer`].
enum Claim {
    /// This node holds the writer Lease; here it is as the API server answered.
    Held(Box<Lease>),
    /// Another node holds it.
    Other,
    /// The Lease changed under this attempt (409): nothing learnt, try again next time.
    Raced,
}

/// Renews the writer Lease if this node holds it, takes it if it is free or expired (no
/// change seen for `--lease-duration`). A conflict (another instance was faster, or the Lease
/// changed since it was seen) is not an error.
async fn claim_writer(
    api: &Api<Lease>,
    config: &MembersConfig,
    seen: Option<&Seen>,
) -> Result<Claim, kube::Error> {
    let me = config.node.as_str();
    let fresh = |seen: &Seen| seen.changed.elapsed() < config.duration;
    let lease = match seen {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(WRITER_LEASE.to_owned()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_owned()),
                    lease_duration_seconds: Some(duration_seconds(config)),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(lease) => {
                    tracing::info!("created the writer Lease");
                    Ok(Claim::Held(Box::new(lease)))
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Claim::Raced),
                Err(error) => Err(error),
            };
        }
        Some(seen) => seen,
    };
    let spec = lease.lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mine = holder == me;
    if !mine && !holder.is_empty() && fresh(lease) {
        return Ok(Claim::Other);
    }
    let mut updated = lease.lease.clone();
    updated.spec = Some(LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(duration_seconds(config)),
        renew_time: Some(now()),
        acquire_time: if mine { spec.acquire_time } else { Some(now()) },
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
        ..spec
    });
    match api
        .replace(WRITER_LEASE, &PostParams::default(), &updated)
        .await
    {
        Ok(lease) => {
            if !mine {
                tracing::info!(previous = %holder, "took the writer Lease");
            }
            Ok(Claim::Held(Box::new(lease)))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Claim::Raced),
        Err(error) => Err(error),
    }
}

/// On SIGTERM: deletes this node's Lease and releases the writer Lease if held, so the
/// others take over at once instead of after `--lease-duration`.
async fn give_up(api: &Api<Lease>, own_name: &str, config: &MembersConfig, writer: Option<&Seen>) {
    if let Err(error) = api.delete(own_name, &DeleteParams::default()).await {
        tracing::warn!(%error, "could not delete this node's Lease; the others take over when it expires");
    }
    let Some(seen) = writer else {
        return;
    };
    let spec = seen.lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(config.node.as_str()) {
        return;
    }
    let mut released = seen.lease.clone();
    released.spec = Some(LeaseSpec {
        holder_identity: None,
        ..spec
    });
    match api
        .replace(WRITER_LEASE, &PostParams::default(), &released)
        .await
    {
        Ok(_) => tracing::info!("gave the writer Lease up"),
        Err(error) => {
            tracing::warn!(%error, "could not give the writer Lease up; another instance takes it when it expires")
        }
    }
}
