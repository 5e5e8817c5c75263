//! The reconciler: from cluster state to what xlb should serve. Pure, no I/O.
//!
//! [`reconcile`] is called on every change of the cluster state with the allocations of the
//! previous call, and returns a [`Plan`]: the virtual services for the data plane, the VIPs
//! for the address manager, the status changes and Events for the status writer, and the new
//! allocations. Because it recomputes everything from the state, a Service refused for a
//! conflict is retried as soon as the conflict is gone, and an IP is released as soon as its
//! last user stops qualifying.
//!
//! Which Services: `type: LoadBalancer` with no `loadBalancerClass`, or with the one given by
//! `--lb-class`. Everything about one Service that is wrong (a bad `loadBalancerIP`, a port 0,
//! duplicate or SCTP ports, a missing NodePort...) gives that Service a Warning and leaves the
//! others untouched.
//!
//! Backends:
//! - Out of cluster (default): Ready nodes (with the worker label, unless the filter is empty,
//!   and without `node.kubernetes.io/exclude-from-external-load-balancers`), at their address
//!   of the configured type, on the port's NodePort. `externalTrafficPolicy: Local` keeps only
//!   the nodes that host a ready endpoint of the Service.
//! - In cluster (`KUBERNETES=true`, or a Service with `allocateLoadBalancerNodePorts: false`):
//!   the ready addresses of the Service's EndpointSlices, on the target port of the slice port
//!   whose name and protocol match the Service port. Pod endpoints are reached directly, so
//!   `externalTrafficPolicy: Local` does not narrow them further.
//!
//! Terminating endpoints (and not-ready ones) take no new flows: they leave the backend list,
//! and conntrack keeps the flows they already have. A port with no backends is still
//! programmed, so its VIP exists and new flows are refused rather than passed to the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use crate::config::{Announce, IpMode, LabelFilter};
use crate::ipam::{self, IpamSettings, Request};
use crate::model::{
    Allocations, Backend, ClusterState, Frontend, HostNetwork, PortKey, Protocol, ServiceKey,
    VirtualService, recorded_ingress_ip,
};
use crate::ownership;
use crate::plan::{EventKind, Plan, PlannedEvent, StatusChange};
use crate::settings::Settings;

/// Annotation with the IPs a Service asks for, comma separated; the first IPv4 one is used.
/// It takes precedence over the deprecated `spec.loadBalancerIP`.
pub const LOAD_BALANCER_IPS_ANNOTATION: &str = "xlb.io/loadBalancerIPs";

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label that keeps a node out of every load balancer's backends (as cloud providers do).
pub const EXCLUDE_NODE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// A Service with more ports than this is refused: each port is a data plane entry, and one
/// Service must not crowd out the others.
pub const MAX_PORTS_PER_SERVICE: usize = 256;

/// The reason of the Event that tells a Service its VIP is announced by another LB node.
pub const ANNOUNCED: &str = "Announced";

/// Computes the [`Plan`] for `state`.
///
/// `previous` is the `allocations` of the last plan (empty after a restart: the IPs recorded
/// in the Services' status are adopted then). `host` describes the link device.
pub fn reconcile(
    state: &ClusterState,
    config: &Settings,
    host: &HostNetwork,
    previous: &Allocations,
) -> Plan {
    let mut plan = Plan::default();
    // Every VIP in use with its Services, and the Services with a ready endpoint here.
    let mut in_use: BTreeMap<Ipv4Addr, BTreeSet<ServiceKey>> = BTreeMap::new();
    let mut local_services = BTreeSet::new();
    let slices = SliceIndex::new(state);
    let nodes = eligible_nodes(state, config);
    let mut candidates = BTreeMap::new();
    for (key, service) in &state.services {
        let mut warn = |reason: &'static str, message: String| {
            plan.events.push(PlannedEvent {
                service: key.clone(),
                kind: EventKind::Warning,
                reason,
                message,
            });
        };
        match examine(service, config, &mut warn) {
            Examined::NotOurs => release_foreign(key, service, previous, &mut plan),
            Examined::Refused => {
                if has_ingress(service) {
                    plan.statuses.insert(key.clone(), StatusChange::Clear);
                }
            }
            // A follower serves what the writer allocated, and allocates nothing itself.
            Examined::Ours(_) if !config.writer && prior_ip(key, service, previous).is_none() => {}
            Examined::Ours(candidate) => {
                candidates.insert(key.clone(), candidate);
            }
        }
    }

    let settings = IpamSettings {
        pool: &config.pool,
        host,
        require_device_prefix: config.announce == Announce::Link,
    };
    let requests = candidates
        .iter()
        .map(|(key, candidate)| Request {
            service: key.clone(),
            created: candidate.service.metadata.creation_timestamp.clone(),
            ports: candidate.ports.iter().map(|port| port.key).collect(),
            explicit: candidate.explicit,
            previous: prior_ip(key, candidate.service, previous),
        })
        .collect();
    for (key, outcome) in ipam::allocate(settings, requests) {
        let Some(candidate) = candidates.get(&key) else {
            continue;
        };
        let service = candidate.service;
        let allocation = match outcome {
            Ok(allocation) => allocation,
            Err(error) => {
                plan.events.push(PlannedEvent {
                    service: key.clone(),
                    kind: EventKind::Warning,
                    reason: "AllocationFailed",
                    message: error.to_string(),
                });
                if has_ingress(service) {
                    plan.statuses.insert(key, StatusChange::Clear);
                }
                continue;
            }
        };
        let ip = allocation.ip;
        let prior = prior_ip(&key, service, previous);
        if prior != Some(ip) {
            plan.events.push(PlannedEvent {
                service: key.clone(),
                kind: EventKind::Normal,
                reason: "IPAllocated",
                message: match prior {
                    Some(old) => format!("Moved from {old} to {ip}"),
                    None => format!("Assigned IP {ip}"),
                },
            });
        }
        if !status_is(service, ip, config.ip_mode)
            || (config.update_external_ips && !external_ips_hold(service, ip))
        {
            plan.statuses.insert(
                key.clone(),
                StatusChange::Ingress {
                    ip,
                    ip_mode: config.ip_mode,
                },
            );
        }
        let endpoints = slices.of(&key);
        let ready_nodes = endpoints.ready_nodes();
        let mut without_backends = Vec::new();
        for port in &candidate.ports {
            let backends = candidate.backends(port, &endpoints, &ready_nodes, &nodes);
            if backends.is_empty() {
                without_backends.push(format!("{}/{}", port.key.port, port.key.protocol));
            }
            plan.virtual_services.push(VirtualService {
                frontend: Frontend {
                    vip: ip,
                    port: port.key.port,
                    protocol: port.key.protocol,
                },
                backends,
                owner: key.to_string(),
            });
        }
        if !without_backends.is_empty() {
            plan.events.push(PlannedEvent {
                service: key.clone(),
                kind: EventKind::Warning,
                reason: "NoEndpoints",
                message: format!(
                    "no ready endpoints for {ip} port(s) {}: connections are refused until a backend is ready",
                    without_backends.join(", ")
                ),
            });
        }
        if let Some(node_name) = &config.node_name
            && ready_nodes.contains(node_name.as_str())
        {
            local_services.insert(key.clone());
        }
        in_use.entry(ip).or_default().insert(key.clone());
        plan.allocations.by_service.insert(key, allocation);
    }
    announce(&in_use, &local_services, config, previous, &mut plan);
    if config.tag_worker_nodes
        && let Some(label) = &config.worker_label
    {
        plan.node_labels = nodes_to_tag(state, label);
    }
    plan.virtual_services
        .sort_by_key(|virtual_service| virtual_service.frontend);
    plan.events.sort_by(|a, b| a.service.cmp(&b.service));
    plan
}

/// Labels that mark a control-plane node.
pub const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// The nodes of `state` to label with `label` (`--tag-worker-nodes`), by name: those without
/// the label's key that are not control-plane nodes.
pub fn nodes_to_tag(state: &ClusterState, label: &LabelFilter) -> Vec<String> {
    state
        .nodes
        .iter()
        .filter(|(_, node)| {
            let labels = node.metadata.labels.as_ref();
            let has = |key: &str| labels.is_some_and(|labels| labels.contains_key(key));
            !has(&label.key) && !CONTROL_PLANE_LABELS.iter().any(|key| has(key))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Which VIPs this node puts on its device, the one place that decides it:
/// - `--announce-local-only` (`lo` mode): a VIP while one of its Services has a ready endpoint
///   on this node, owned by those Services only, so it goes with the last of them;
/// - several LB nodes in `--announce link` mode: the VIPs this node owns among the live LB
///   nodes ([`ownership::owner`]); an Event tells each Service when its announcer changes;
/// - otherwise every VIP in use.
fn announce(
    in_use: &BTreeMap<Ipv4Addr, BTreeSet<ServiceKey>>,
    local_services: &BTreeSet<ServiceKey>,
    config: &Settings,
    previous: &Allocations,
    plan: &mut Plan,
) {
    for (&vip, services) in in_use {
        let services: BTreeSet<ServiceKey> = if config.announce_local_only {
            services.intersection(local_services).cloned().collect()
        } else {
            services.clone()
        };
        let announced = match (&config.peers, config.announce) {
            (Some(peers), Announce::Link) => {
                let Some(owner) = ownership::owner(vip, &peers.live) else {
                    continue;
                };
                if let Some(before) = previous.announcers.get(&vip)
                    && before != owner
                {
                    for service in in_use.get(&vip).into_iter().flatten() {
                        plan.events.push(PlannedEvent {
                            service: service.clone(),
                            kind: EventKind::Normal,
                            reason: ANNOUNCED,
                            message: format!("{vip} announced by {owner} (was {before})"),
                        });
                    }
                }
                plan.allocations.announcers.insert(vip, owner.to_owned());
                owner == peers.me
            }
            _ => true,
        };
        if announced && !services.is_empty() {
            plan.vips.insert(vip, services);
        }
    }
}

/// The IP a Service held before this run: from the previous plan, or else from its status.
fn prior_ip(key: &ServiceKey, service: &Service, previous: &Allocations) -> Option<Ipv4Addr> {
    previous.ip_of(key).or_else(|| recorded_ingress_ip(service))
}

/// A Service that is not (or no longer) ours: if xlb gave it an address, that address is
/// released and the status xlb wrote is cleared.
fn release_foreign(key: &ServiceKey, service: &Service, previous: &Allocations, plan: &mut Plan) {
    let Some(ip) = previous.ip_of(key) else {
        return;
    };
    plan.events.push(PlannedEvent {
        service: key.clone(),
        kind: EventKind::Normal,
        reason: "IPReleased",
        message: format!(
            "Released IP {ip}: the Service is no longer of type LoadBalancer with a loadBalancerClass xlb serves"
        ),
    });
    if recorded_ingress_ip(service) == Some(ip) {
        plan.statuses.insert(key.clone(), StatusChange::Clear);
    }
}

fn has_ingress(service: &Service) -> bool {
    service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref())
        .is_some_and(|ingress| !ingress.is_empty())
}

/// True when `spec.externalIPs` lists `ip` exactly once (other entries are someone else's).
fn external_ips_hold(service: &Service, ip: Ipv4Addr) -> bool {
    let ip = ip.to_string();
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.external_ips.as_ref())
        .is_some_and(|ips| ips.iter().filter(|listed| **listed == ip).count() == 1)
}

/// True when the status holds exactly one ingress entry, with this IP and ipMode (an unset
/// ipMode counts as VIP, as the API server defaults it).
fn status_is(service: &Service, ip: Ipv4Addr, ip_mode: IpMode) -> bool {
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_deref())
        .unwrap_or_default();
    match ingress {
        [only] => {
            only.ip.as_deref() == Some(ip.to_string().as_str())
                && only.ip_mode.as_deref().unwrap_or("VIP") == ip_mode.as_api_str()
        }
        _ => false,
    }
}

/// One port of a Service, validated.
#[derive(Debug, Clone)]
struct PortSpec {
    key: PortKey,
    /// The port's name; `None` when unnamed.
    name: Option<String>,
    node_port: Option<u16>,
}

/// A Service xlb serves, with what it needs to allocate and build backends.
struct Candidate<'a> {
    service: &'a Service,
    ports: Vec<PortSpec>,
    explicit: Option<Ipv4Addr>,
    in_cluster: bool,
    local_traffic: bool,
}

enum Examined<'a> {
    /// Not a LoadBalancer of a class xlb serves.
    NotOurs,
    /// Ours, but unusable: the reasons have been reported.
    Refused,
    Ours(Candidate<'a>),
}

/// Decides whether xlb serves `service` and validates it, reporting every problem to `warn`.
fn examine<'a>(
    service: &'a Service,
    config: &Settings,
    warn: &mut dyn FnMut(&'static str, String),
) -> Examined<'a> {
    let Some(spec) = &service.spec else {
        // The API server always sets a spec; a manifest may lack one.
        warn("InvalidService", "the Service has no spec".to_owned());
        return Examined::Refused;
    };
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.load_balancer_class.as_deref() != config.lb_class.as_deref()
    {
        return Examined::NotOurs;
    }
    let explicit = match requested_ip(service) {
        Ok(explicit) => explicit,
        Err(message) => {
            warn("InvalidLoadBalancerIP", message);
            return Examined::Refused;
        }
    };
    let service_ports = spec.ports.as_deref().unwrap_or_default();
    if service_ports.is_empty() {
        warn("InvalidService", "the Service has no ports".to_owned());
        return Examined::Refused;
    }
    if service_ports.len() > MAX_PORTS_PER_SERVICE {
        warn(
            "InvalidService",
            format!(
                "the Service has {} ports; xlb serves at most {MAX_PORTS_PER_SERVICE} per Service",
                service_ports.len()
            ),
        );
        return Examined::Refused;
    }
    let in_cluster = config.in_cluster || spec.allocate_load_balancer_node_ports == Some(false);
    let mut ports: Vec<PortSpec> = Vec::with_capacity(service_ports.len());
    for port in service_ports {
        let Some(checked) = check_port(port, in_cluster, warn) else {
            continue;
        };
        if ports.iter().any(|seen| seen.key == checked.key) {
            warn(
                "InvalidService",
                format!(
                    "port {} is listed more than once; only the first is served",
                    checked.key
                ),
            );
            continue;
        }
        ports.push(checked);
    }
    if ports.is_empty() {
        warn(
            "InvalidService",
            "the Service has no port xlb can serve".to_owned(),
        );
        return Examined::Refused;
    }
    Examined::Ours(Candidate {
        service,
        ports,
        explicit,
        in_cluster,
        local_traffic: spec.external_traffic_policy.as_deref() == Some("Local"),
    })
}

/// The IP a Service asks for: the first IPv4 address of the annotation, else
/// `spec.loadBalancerIP`. An unparsable request is an error, not a dynamic allocation.
fn requested_ip(service: &Service) -> Result<Option<Ipv4Addr>, String> {
    let annotation = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(LOAD_BALANCER_IPS_ANNOTATION))
        .filter(|value| !value.trim().is_empty());
    if let Some(value) = annotation {
        return value
            .split(',')
            .find_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
            .map(Some)
            .ok_or_else(|| {
                format!("annotation {LOAD_BALANCER_IPS_ANNOTATION} {value:?} holds no IPv4 address")
            });
    }
    let spec_ip = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_ip.as_deref())
        .map(str::trim)
        .filter(|ip| !ip.is_empty());
    match spec_ip {
        Some(ip) => ip
            .parse()
            .map(Some)
            .map_err(|_| format!("spec.loadBalancerIP {ip:?} is not an IPv4 address")),
        None => Ok(None),
    }
}

/// Validates one Service port; reports and drops what cannot be served.
fn check_port(
    port: &ServicePort,
    in_cluster: bool,
    warn: &mut dyn FnMut(&'static str, String),
) -> Option<PortSpec> {
    let label = port
        .name
        .as_deref()
        .filter(|name| !name.is_empty())
        .map_or_else(
            || port.port.to_string(),
            |name| format!("{name:?} ({})", port.port),
        );
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => {
            warn(
                "UnsupportedProtocol",
                format!(
                    "port {label}: protocol {other} is not supported (TCP and UDP are); the port is not served"
                ),
            );
            return None;
        }
    };
    let Some(number) = u16::try_from(port.port).ok().filter(|&number| number != 0) else {
        warn(
            "InvalidService",
            format!("port {label} is not a valid port number (1-65535); the port is not served"),
        );
        return None;
    };
    let node_port = port
        .node_port
        .and_then(|node_port| u16::try_from(node_port).ok())
        .filter(|&node_port| node_port != 0);
    if node_port.is_none() && !in_cluster {
        warn(
            "MissingNodePort",
            format!(
                "port {label}/{protocol} has no nodePort, which xlb needs out of cluster; \
                 the port is not served (or set KUBERNETES=true to balance over pod endpoints)"
            ),
        );
        return None;
    }
    Some(PortSpec {
        key: PortKey {
            port: number,
            protocol,
        },
        name: port.name.clone().filter(|name| !name.is_empty()),
        node_port,
    })
}

impl Candidate<'_> {
    /// The backends of one port, sorted and de-duplicated.
    fn backends(
        &self,
        port: &PortSpec,
        endpoints: &ServiceSlices<'_>,
        ready_nodes: &BTreeSet<&str>,
        nodes: &[(&str, Ipv4Addr)],
    ) -> Vec<Backend> {
        let backends: BTreeSet<Backend> = if self.in_cluster {
            endpoints.ready_backends(port).collect()
        } else {
            let Some(node_port) = port.node_port else {
                return Vec::new();
            };
            nodes
                .iter()
                .filter(|(name, _)| !self.local_traffic || ready_nodes.contains(name))
                .map(|&(_, ip)| Backend {
                    ip,
                    port: node_port,
                })
                .collect()
        };
        backends.into_iter().collect()
    }
}

/// The nodes that may be backends out of cluster, by name, with their address.
fn eligible_nodes<'a>(state: &'a ClusterState, config: &Settings) -> Vec<(&'a str, Ipv4Addr)> {
    state
        .nodes
        .iter()
        .filter(|(_, node)| is_ready(node) && has_worker_label(node, config.worker_label.as_ref()))
        .filter_map(|(name, node)| {
            let address = node
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .filter(|address| address.type_ == config.node_address_type.as_str())
                .find_map(|address| address.address.parse().ok())?;
            Some((name.as_str(), address))
        })
        .collect()
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

fn has_worker_label(node: &Node, filter: Option<&LabelFilter>) -> bool {
    let labels = node.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|labels| labels.get(key));
    if label(EXCLUDE_NODE_LABEL).is_some() {
        return false;
    }
    let Some(filter) = filter else {
        return true;
    };
    match (label(&filter.key), &filter.value) {
        (Some(actual), Some(wanted)) => actual == wanted,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// EndpointSlices grouped by the Service they belong to, built once per reconcile.
struct SliceIndex<'a> {
    by_service: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> SliceIndex<'a> {
    fn new(state: &'a ClusterState) -> Self {
        let mut by_service: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for (key, slice) in &state.endpoint_slices {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
            if let Some(service) = service
                && slice.address_type == "IPv4"
            {
                by_service
                    .entry((key.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        Self { by_service }
    }

    fn of(&self, service: &ServiceKey) -> ServiceSlices<'a> {
        ServiceSlices {
            slices: self
                .by_service
                .get(&(service.namespace.as_str(), service.name.as_str()))
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// The EndpointSlices of one Service.
struct ServiceSlices<'a> {
    slices: Vec<&'a EndpointSlice>,
}

impl<'a> ServiceSlices<'a> {
    /// Endpoints of `slice` that take new flows: ready (an unset `ready` means ready, as the
    /// API says) and not terminating.
    fn ready_in(slice: &'a EndpointSlice) -> impl Iterator<Item = &'a Endpoint> {
        slice.endpoints.iter().flatten().filter(|endpoint| {
            let conditions = endpoint.conditions.as_ref();
            conditions.and_then(|c| c.ready) != Some(false)
                && conditions.and_then(|c| c.terminating) != Some(true)
        })
    }

    /// Names of the nodes hosting a ready endpoint.
    fn ready_nodes(&self) -> BTreeSet<&'a str> {
        self.slices
            .iter()
            .flat_map(|&slice| Self::ready_in(slice))
            .filter_map(|endpoint| endpoint.node_name.as_deref())
            .collect()
    }

    /// Ready addresses on the target port of the slice port matching `port` by name and
    /// protocol. (All addresses of an endpoint are the same pod: the first is used.)
    fn ready_backends(&self, port: &PortSpec) -> impl Iterator<Item = Backend> + '_ {
        let protocol = port.key.protocol.to_string();
        let name = port.name.clone();
        self.slices.iter().flat_map(move |&slice| {
            let target = slice
                .ports
                .iter()
                .flatten()
                .find(|candidate| {
                    candidate.name.as_deref().filter(|name| !name.is_empty()) == name.as_deref()
                        && candidate.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .and_then(|candidate| u16::try_from(candidate.port?).ok())
                .filter(|&target| target != 0);
            target.into_iter().flat_map(move |target| {
                Self::ready_in(slice).filter_map(move |endpoint| {
                    let ip = endpoint.addresses.first()?.parse().ok()?;
                    Some(Backend { ip, port: target })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::config::Config;
    use crate::settings::Peers;
    use crate::synthetic::{EndpointSpec, endpoint_slice, load_balancer, node, port};

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("test IP literal")
    }

    fn host() -> HostNetwork {
        HostNetwork {
            prefixes: vec![(ip("198.51.100.2"), 24)],
            own_addresses: vec![ip("198.51.100.2")],
            gateways: vec![ip("198.51.100.1")],
            ..HostNetwork::default()
        }
    }

    fn config() -> Config {
        Config {
            pool: "198.51.100.10-198.51.100.20".parse().expect("test pool"),
            ..Config::default()
        }
    }

    const WORKER: (&str, &str) = ("node-role.kubernetes.io/worker", "");

    /// node1 and node2: Ready workers; node3: a NotReady worker; node4: Ready, no worker label.
    fn cluster() -> ClusterState {
        let mut state = ClusterState::default();
        state.upsert_node(node("node1", ip("203.0.113.11"), true, &[WORKER]));
        state.upsert_node(node("node2", ip("203.0.113.12"), true, &[WORKER]));
        state.upsert_node(node("node3", ip("203.0.113.13"), false, &[WORKER]));
        state.upsert_node(node("node4", ip("203.0.113.14"), true, &[]));
        state
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    /// A LoadBalancer Service in `default` with TCP ports; NodePort = 30000 + port % 1000.
    fn svc(name: &str, ports: &[i32]) -> Service {
        load_balancer(
            "default",
            name,
            ports
                .iter()
                .map(|&number| port(number, "TCP", Some(30_000 + number % 1_000)))
                .collect(),
        )
    }

    fn spec(service: &mut Service) -> &mut k8s_openapi::api::core::v1::ServiceSpec {
        service.spec.as_mut().expect("test Services have a spec")
    }

    fn requesting(mut service: Service, address: &str) -> Service {
        spec(&mut service).load_balancer_ip = Some(address.to_owned());
        service
    }

    fn with_status(mut service: Service, address: Ipv4Addr) -> Service {
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(address.to_string()),
                    ip_mode: Some("VIP".to_owned()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        });
        service
    }

    fn created(mut service: Service, seconds: i64) -> Service {
        service.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid timestamp"),
        ));
        service
    }

    fn state_with(services: Vec<Service>) -> ClusterState {
        let mut state = cluster();
        for service in services {
            assert!(state.upsert_service(service), "test Services have names");
        }
        state
    }

    fn run(state: &ClusterState, config: &Config, previous: &Allocations) -> Plan {
        reconcile(state, &Settings::from(config), &host(), previous)
    }

    fn ip_of(plan: &Plan, name: &str) -> Option<Ipv4Addr> {
        plan.allocations.ip_of(&key(name))
    }

    fn events(plan: &Plan, name: &str, kind: EventKind) -> Vec<(&'static str, String)> {
        plan.events
            .iter()
            .filter(|event| event.service == key(name) && event.kind == kind)
            .map(|event| (event.reason, event.message.clone()))
            .collect()
    }

    fn warnings(plan: &Plan, name: &str) -> Vec<(&'static str, String)> {
        events(plan, name, EventKind::Warning)
    }

    fn backends(plan: &Plan, name: &str, port: u16, protocol: Protocol) -> Vec<Backend> {
        let owner = key(name).to_string();
        plan.virtual_services
            .iter()
            .find(|vs| {
                vs.owner == owner && vs.frontend.port == port && vs.frontend.protocol == protocol
            })
            .unwrap_or_else(|| panic!("no virtual service for {owner} port {port}: {plan:#?}"))
            .backends
            .clone()
    }

    fn backend(address: &str, port: u16) -> Backend {
        Backend {
            ip: ip(address),
            port,
        }
    }

    /// Writes the plan's statuses into the state, as the status writer would.
    fn apply_statuses(state: &mut ClusterState, plan: &Plan) {
        for (key, change) in &plan.statuses {
            let service = state
                .services
                .get_mut(key)
                .expect("status for an existing Service");
            match change {
                StatusChange::Ingress { ip, .. } => *service = with_status(service.clone(), *ip),
                StatusChange::Clear => service.status = None,
            }
        }
    }

    #[test]
    fn the_original_scenario_shares_ports_and_refuses_conflicts() {
        let state = state_with(vec![
            svc("svc1", &[80]),
            requesting(svc("svc2", &[80]), "198.51.100.10"),
            svc("svc3", &[80]),
            svc("svc4", &[443]),
        ]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(ip_of(&plan, "svc1"), Some(ip("198.51.100.10")));
        assert_eq!(ip_of(&plan, "svc2"), None);
        assert_eq!(
            warnings(&plan, "svc2"),
            vec![(
                "AllocationFailed",
                "FAILED to allocate requested LoadBalancerIP 198.51.100.10:80 - Reason: IP:port already allocated to default/svc1"
                    .to_owned()
            )]
        );
        assert_eq!(ip_of(&plan, "svc3"), Some(ip("198.51.100.11")));
        assert_eq!(ip_of(&plan, "svc4"), Some(ip("198.51.100.10")));
        assert_eq!(
            plan.vips,
            BTreeMap::from([
                (
                    ip("198.51.100.10"),
                    BTreeSet::from([key("svc1"), key("svc4")])
                ),
                (ip("198.51.100.11"), BTreeSet::from([key("svc3")])),
            ])
        );
        assert_eq!(
            plan.statuses.get(&key("svc4")),
            Some(&StatusChange::Ingress {
                ip: ip("198.51.100.10"),
                ip_mode: IpMode::Vip
            })
        );
        assert!(
            !plan.statuses.contains_key(&key("svc2")),
            "svc2 has no status to clear"
        );
        assert_eq!(
            events(&plan, "svc1", EventKind::Normal),
            vec![("IPAllocated", "Assigned IP 198.51.100.10".to_owned())]
        );
    }

    #[test]
    fn update_external_ips_writes_adopted_services_until_their_ip_is_listed_once() {
        let config = Config {
            update_external_ips: true,
            ..config()
        };
        let vip = ip("198.51.100.12");
        // Adopted after a restart: the status is right, spec.externalIPs is not.
        let state = state_with(vec![with_status(svc("web", &[80]), vip)]);
        let plan = run(&state, &config, &Allocations::default());
        assert_eq!(
            plan.statuses.get(&key("web")),
            Some(&StatusChange::Ingress {
                ip: vip,
                ip_mode: IpMode::Vip
            }),
            "the missing externalIPs entry must be written"
        );
        let listed = |ips: &[&str]| {
            let mut service = with_status(svc("web", &[80]), vip);
            spec(&mut service).external_ips = Some(ips.iter().map(|ip| (*ip).to_owned()).collect());
            state_with(vec![service])
        };
        let twice = run(
            &listed(&["198.51.100.12", "198.51.100.12"]),
            &config,
            &plan.allocations,
        );
        assert!(
            twice.statuses.contains_key(&key("web")),
            "an IP listed twice is rewritten"
        );
        let once = run(
            &listed(&["192.0.2.7", "198.51.100.12"]),
            &config,
            &plan.allocations,
        );
        assert!(
            once.statuses.is_empty(),
            "listed once, beside another manager's entry: nothing to write ({:?})",
            once.statuses
        );
        let without_flag = run(&state, &self::config(), &Allocations::default());
        assert!(
            without_flag.statuses.is_empty(),
            "externalIPs are not xlb's without the flag"
        );
    }

    #[test]
    fn a_port_without_backends_is_programmed_and_warned_about() {
        let mut state = state_with(vec![svc("web", &[80])]);
        for node in state.nodes.values_mut() {
            node.metadata.labels = None;
        }
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(backends(&plan, "web", 80, Protocol::Tcp), Vec::new());
        let warnings = warnings(&plan, "web");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].0, "NoEndpoints");
        assert!(
            warnings[0].1.contains("198.51.100.10 port(s) 80/TCP")
                && warnings[0].1.contains("refused"),
            "{warnings:?}"
        );
        let served = run(
            &state_with(vec![svc("web", &[80])]),
            &config(),
            &Allocations::default(),
        );
        assert!(warnings_of_reason(&served, "NoEndpoints").is_empty());
    }

    fn warnings_of_reason(plan: &Plan, reason: &str) -> Vec<String> {
        plan.events
            .iter()
            .filter(|event| event.reason == reason)
            .map(|event| event.message.clone())
            .collect()
    }

    #[test]
    fn out_of_cluster_backends_are_ready_worker_nodes_on_the_node_port() {
        let state = state_with(vec![svc("web", &[80, 443])]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(
            backends(&plan, "web", 80, Protocol::Tcp),
            vec![
                backend("203.0.113.11", 30_080),
                backend("203.0.113.12", 30_080)
            ],
            "node3 is NotReady and node4 is no worker"
        );
        assert_eq!(
            backends(&plan, "web", 443, Protocol::Tcp),
            vec![
                backend("203.0.113.11", 30_443),
                backend("203.0.113.12", 30_443)
            ]
        );
    }

    #[test]
    fn worker_label_filter_can_be_disabled_or_given_a_value_and_excluded_nodes_stay_out() {
        let mut state = state_with(vec![svc("web", &[80])]);
        state.upsert_node(node(
            "node5",
            ip("203.0.113.15"),
            true,
            &[WORKER, (EXCLUDE_NODE_LABEL, "")],
        ));
        state.upsert_node(node("node6", ip("203.0.113.16"), true, &[("pool", "edge")]));
        let all = Config {
            worker_label: None,
            ..config()
        };
        let plan = run(&state, &all, &Allocations::default());
        assert_eq!(
            backends(&plan, "web", 80, Protocol::Tcp),
            vec![
                backend("203.0.113.11", 30_080),
                backend("203.0.113.12", 30_080),
                backend("203.0.113.14", 30_080),
                backend("203.0.113.16", 30_080),
            ]
        );
        let edge = Config {
            worker_label: Some(LabelFilter {
                key: "pool".to_owned(),
                value: Some("edge".to_owned()),
            }),
            ..config()
        };
        let plan = run(&state, &edge, &Allocations::default());
        assert_eq!(
            backends(&plan, "web", 80, Protocol::Tcp),
            vec![backend("203.0.113.16", 30_080)]
        );
    }

    #[test]
    fn external_traffic_policy_local_uses_nodes_with_a_ready_endpoint() {
        let mut web = svc("web", &[80]);
        spec(&mut web).external_traffic_policy = Some("Local".to_owned());
        let mut state = state_with(vec![web]);
        state.upsert_endpoint_slice(endpoint_slice(
            "default",
            "web-1",
            "web",
            &[(80, 8080, "TCP")],
            &[
                EndpointSpec::ready(ip("10.1.0.1"), "node2"),
                EndpointSpec {
                    ready: false,
                    ..EndpointSpec::ready(ip("10.1.0.2"), "node1")
                },
            ],
        ));
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(
            backends(&plan, "web", 80, Protocol::Tcp),
            vec![backend("203.0.113.12", 30_080)]
        );
    }

    #[test]
    fn in_cluster_backends_are_ready_endpoints_on_the_target_port() {
        let mut state = state_with(vec![load_balancer(
            "default",
            "dns",
            vec![port(53, "UDP", None), port(53, "TCP", None)],
        )]);
        let terminating = EndpointSpec {
            ready: false,
            terminating: true,
            ..EndpointSpec::ready(ip("10.1.0.3"), "node1")
        };
        state.upsert_endpoint_slice(endpoint_slice(
            "default",
            "dns-b",
            "dns",
            &[(53, 5353, "UDP"), (53, 5300, "TCP")],
            &[
                EndpointSpec::ready(ip("10.1.0.2"), "node1"),
                EndpointSpec::ready(ip("10.1.0.1"), "node2"),
                terminating,
            ],
        ));
        state.upsert_endpoint_slice(endpoint_slice(
            "default",
            "dns-a",
            "dns",
            &[(53, 5353, "UDP"), (53, 5300, "TCP")],
            &[EndpointSpec::ready(ip("10.1.0.4"), "node2")],
        ));
        // Same Service name in another namespace, and another Service: not ours.
        state.upsert_endpoint_slice(endpoint_slice(
            "other",
            "dns-x",
            "dns",
            &[(53, 5353, "UDP")],
            &[EndpointSpec::ready(ip("10.9.0.1"), "node1")],
        ));
        state.upsert_endpoint_slice(endpoint_slice(
            "default",
            "web-x",
            "web",
            &[(53, 5353, "UDP")],
            &[EndpointSpec::ready(ip("10.9.0.2"), "node1")],
        ));
        let in_cluster = Config {
            in_cluster: true,
            ..config()
        };
        let plan = run(&state, &in_cluster, &Allocations::default());
        assert_eq!(
            warnings(&plan, "dns"),
            vec![],
            "no nodePort is needed in cluster"
        );
        assert_eq!(
            backends(&plan, "dns", 53, Protocol::Udp),
            vec![
                backend("10.1.0.1", 5353),
                backend("10.1.0.2", 5353),
                backend("10.1.0.4", 5353)
            ],
            "sorted, terminating 10.1.0.3 excluded"
        );
        assert_eq!(
            backends(&plan, "dns", 53, Protocol::Tcp),
            vec![
                backend("10.1.0.1", 5300),
                backend("10.1.0.2", 5300),
                backend("10.1.0.4", 5300)
            ]
        );
    }

    #[test]
    fn services_without_node_ports_use_endpoints_automatically() {
        let mut web = load_balancer("default", "web", vec![port(80, "TCP", None)]);
        spec(&mut web).allocate_load_balancer_node_ports = Some(false);
        let mut state = state_with(vec![web]);
        state.upsert_endpoint_slice(endpoint_slice(
            "default",
            "web-1",
            "web",
            &[(80, 8080, "TCP")],
            &[EndpointSpec::ready(ip("10.1.0.1"), "node1")],
        ));
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(warnings(&plan, "web"), vec![]);
        assert_eq!(
            backends(&plan, "web", 80, Protocol::Tcp),
            vec![backend("10.1.0.1", 8080)]
        );
    }

    #[test]
    fn a_port_without_backends_is_still_programmed() {
        let state = state_with(vec![load_balancer(
            "default",
            "web",
            vec![port(80, "TCP", None)],
        )]);
        let in_cluster = Config {
            in_cluster: true,
            ..config()
        };
        let plan = run(&state, &in_cluster, &Allocations::default());
        assert_eq!(backends(&plan, "web", 80, Protocol::Tcp), vec![]);
        assert_eq!(ip_of(&plan, "web"), Some(ip("198.51.100.10")));
    }

    #[test]
    fn a_restart_adopts_the_ips_recorded_in_status() {
        // Processing order alone would give "a" .10 and "b" .11; the status says otherwise.
        let state = state_with(vec![
            with_status(created(svc("a", &[80]), 1_000), ip("198.51.100.11")),
            with_status(created(svc("b", &[80]), 2_000), ip("198.51.100.10")),
            created(svc("c", &[80]), 500),
        ]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(ip_of(&plan, "a"), Some(ip("198.51.100.11")));
        assert_eq!(ip_of(&plan, "b"), Some(ip("198.51.100.10")));
        assert_eq!(
            ip_of(&plan, "c"),
            Some(ip("198.51.100.12")),
            "new Services come after"
        );
        assert_eq!(
            events(&plan, "a", EventKind::Normal),
            vec![],
            "nothing changed for a"
        );
        assert_eq!(events(&plan, "b", EventKind::Normal), vec![]);
        assert!(
            !plan.statuses.contains_key(&key("a")),
            "a's status is already right"
        );
        assert_eq!(plan.statuses.len(), 1, "{:?}", plan.statuses);
    }

    #[test]
    fn restart_keeps_every_ip_when_an_older_service_appears_meanwhile() {
        let mut state = state_with(vec![
            created(svc("a", &[80]), 1_000),
            created(svc("b", &[80]), 2_000),
            created(svc("c", &[80, 53]), 3_000),
        ]);
        let first = run(&state, &config(), &Allocations::default());
        apply_statuses(&mut state, &first);
        state.upsert_service(created(svc("0-old", &[80]), 10));
        let after_restart = run(&state, &config(), &Allocations::default());
        for name in ["a", "b", "c"] {
            assert_eq!(
                ip_of(&after_restart, name),
                ip_of(&first, name),
                "{name} moved"
            );
        }
        assert_eq!(ip_of(&after_restart, "0-old"), Some(ip("198.51.100.13")));
    }

    #[test]
    fn a_recorded_ip_that_is_no_longer_valid_is_replaced() {
        let state = state_with(vec![with_status(svc("a", &[80]), ip("192.0.2.50"))]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(ip_of(&plan, "a"), Some(ip("198.51.100.10")));
        assert_eq!(
            events(&plan, "a", EventKind::Normal),
            vec![(
                "IPAllocated",
                "Moved from 192.0.2.50 to 198.51.100.10".to_owned()
            )]
        );
    }

    #[test]
    fn events_are_emitted_only_on_change_and_statuses_only_when_different() {
        let mut state = state_with(vec![svc("a", &[80])]);
        let first = run(&state, &config(), &Allocations::default());
        assert_eq!(events(&first, "a", EventKind::Normal).len(), 1);
        apply_statuses(&mut state, &first);
        let second = run(&state, &config(), &first.allocations);
        assert_eq!(second.events, vec![]);
        assert_eq!(second.statuses, BTreeMap::new());
        assert_eq!(second.virtual_services, first.virtual_services);
        let proxy = Config {
            ip_mode: IpMode::Proxy,
            ..config()
        };
        let third = run(&state, &proxy, &second.allocations);
        assert_eq!(
            third.statuses.get(&key("a")),
            Some(&StatusChange::Ingress {
                ip: ip("198.51.100.10"),
                ip_mode: IpMode::Proxy
            }),
            "a new ipMode is a status change"
        );
    }

    /// Runs `change` on a state where "a" holds an IP (status written), and checks that "a"
    /// loses its IP, data plane entries and status, and that the IP goes to a newcomer.
    fn assert_released(change: impl FnOnce(&mut ClusterState), expect_clear: bool) {
        let mut state = state_with(vec![svc("a", &[80])]);
        let first = run(&state, &config(), &Allocations::default());
        apply_statuses(&mut state, &first);
        change(&mut state);
        state.upsert_service(svc("z", &[80]));
        let plan = run(&state, &config(), &first.allocations);
        assert_eq!(ip_of(&plan, "a"), None);
        assert!(
            plan.virtual_services
                .iter()
                .all(|vs| vs.owner != "default/a"),
            "{plan:#?}"
        );
        assert_eq!(
            ip_of(&plan, "z"),
            Some(ip("198.51.100.10")),
            "the released IP is free again"
        );
        assert_eq!(
            plan.vips,
            BTreeMap::from([(ip("198.51.100.10"), BTreeSet::from([key("z")]))])
        );
        assert_eq!(
            plan.statuses.get(&key("a")),
            expect_clear.then_some(&StatusChange::Clear),
            "{:?}",
            plan.statuses
        );
    }

    #[test]
    fn a_deleted_service_releases_its_ip() {
        assert_released(|state| drop(state.services.remove(&key("a"))), false);
    }

    #[test]
    fn a_type_change_releases_the_ip_and_clears_the_status() {
        assert_released(
            |state| {
                let service = state.services.get_mut(&key("a")).expect("a exists");
                spec(service).type_ = Some("ClusterIP".to_owned());
            },
            true,
        );
    }

    #[test]
    fn a_class_change_releases_the_ip_and_clears_the_status() {
        assert_released(
            |state| {
                let service = state.services.get_mut(&key("a")).expect("a exists");
                spec(service).load_balancer_class = Some("example.com/other".to_owned());
            },
            true,
        );
    }

    #[test]
    fn ports_changed_away_release_the_ip_and_clear_the_status() {
        assert_released(
            |state| {
                let service = state.services.get_mut(&key("a")).expect("a exists");
                spec(service).ports = Some(vec![]);
            },
            true,
        );
    }

    #[test]
    fn a_status_written_by_another_implementation_is_left_alone() {
        let mut other = with_status(svc("other", &[80]), ip("192.0.2.7"));
        spec(&mut other).load_balancer_class = Some("example.com/other".to_owned());
        let plan = run(&state_with(vec![other]), &config(), &Allocations::default());
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn only_the_configured_class_is_served() {
        let mut classy = svc("classy", &[80]);
        spec(&mut classy).load_balancer_class = Some("xlb.io/lb".to_owned());
        let state = state_with(vec![classy, svc("plain", &[80])]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(
            (ip_of(&plan, "plain").is_some(), ip_of(&plan, "classy")),
            (true, None)
        );
        let by_class = Config {
            lb_class: Some("xlb.io/lb".to_owned()),
            ..config()
        };
        let plan = run(&state, &by_class, &Allocations::default());
        assert_eq!(
            (ip_of(&plan, "plain"), ip_of(&plan, "classy").is_some()),
            (None, true)
        );
    }

    #[test]
    fn a_conflict_is_retried_once_it_clears() {
        let mut state = state_with(vec![
            svc("svc1", &[80]),
            requesting(svc("svc2", &[80]), "198.51.100.10"),
        ]);
        let first = run(&state, &config(), &Allocations::default());
        assert_eq!(ip_of(&first, "svc2"), None);
        state.services.remove(&key("svc1"));
        let second = run(&state, &config(), &first.allocations);
        assert_eq!(ip_of(&second, "svc2"), Some(ip("198.51.100.10")));
        assert_eq!(warnings(&second, "svc2"), vec![]);
    }

    #[test]
    fn an_explicit_request_whose_status_holds_another_ip_clears_it_on_conflict() {
        let state = state_with(vec![
            svc("svc1", &[80]),
            with_status(
                requesting(svc("svc2", &[80]), "198.51.100.10"),
                ip("198.51.100.15"),
            ),
        ]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(ip_of(&plan, "svc2"), None);
        assert_eq!(plan.statuses.get(&key("svc2")), Some(&StatusChange::Clear));
    }

    #[test]
    fn tcp_and_udp_on_one_port_number_are_distinct() {
        let state = state_with(vec![
            load_balancer("default", "dns-tcp", vec![port(53, "TCP", Some(30_053))]),
            load_balancer("default", "dns-udp", vec![port(53, "UDP", Some(30_054))]),
        ]);
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(ip_of(&plan, "dns-tcp"), Some(ip("198.51.100.10")));
        assert_eq!(ip_of(&plan, "dns-udp"), Some(ip("198.51.100.10")));
        assert_eq!(
            backends(&plan, "dns-udp", 53, Protocol::Udp)[0].port,
            30_054
        );
        assert_eq!(
            backends(&plan, "dns-tcp", 53, Protocol::Tcp)[0].port,
            30_053
        );
    }

    #[test]
    fn network_gateway_own_and_broadcast_addresses_are_skipped() {
        let around = Config {
            pool: "198.51.100.0-198.51.100.3,198.51.100.255"
                .parse()
                .expect("test pool"),
            ..config()
        };
        let state = state_with(vec![svc("a", &[80]), svc("b", &[80])]);
        let plan = run(&state, &around, &Allocations::default());
        assert_eq!(ip_of(&plan, "a"), Some(ip("198.51.100.3")));
        assert_eq!(ip_of(&plan, "b"), None, "only .3 is usable");
        assert_eq!(warnings(&plan, "b")[0].0, "AllocationFailed");
    }

    #[test]
    fn an_exhausted_pool_gives_a_warning() {
        let small = Config {
            pool: "198.51.100.10-198.51.100.11".parse().expect("test pool"),
            ..config()
        };
        let state = state_with(vec![svc("a", &[80]), svc("b", &[80]), svc("c", &[80])]);
        let plan = run(&state, &small, &Allocations::default());
        assert_eq!(
            warnings(&plan, "c"),
            vec![(
                "AllocationFailed",
                "no free IP left in the address pool (198.51.100.10-198.51.100.11) for ports 80/TCP"
                    .to_owned()
            )]
        );
    }

    #[test]
    fn without_a_pool_only_explicit_requests_in_the_subnet_are_served() {
        let no_pool = Config::default();
        let state = state_with(vec![
            requesting(svc("inside", &[80]), "198.51.100.77"),
            requesting(svc("outside", &[80]), "192.0.2.77"),
            svc("dynamic", &[80]),
        ]);
        let plan = run(&state, &no_pool, &Allocations::default());
        assert_eq!(ip_of(&plan, "inside"), Some(ip("198.51.100.77")));
        assert_eq!(ip_of(&plan, "outside"), None);
        assert!(
            warnings(&plan, "outside")[0]
                .1
                .contains("outside every prefix"),
            "{plan:#?}"
        );
        assert_eq!(ip_of(&plan, "dynamic"), None);
        assert!(
            warnings(&plan, "dynamic")[0].1.contains("no address pool"),
            "{plan:#?}"
        );
    }

    #[test]
    fn the_annotation_wins_over_the_spec_field() {
        let mut web = requesting(svc("web", &[80]), "198.51.100.12");
        web.metadata.annotations = Some(BTreeMap::from([(
            LOAD_BALANCER_IPS_ANNOTATION.to_owned(),
            "2001:db8::1, 198.51.100.15,198.51.100.16".to_owned(),
        )]));
        let plan = run(&state_with(vec![web]), &config(), &Allocations::default());
        assert_eq!(ip_of(&plan, "web"), Some(ip("198.51.100.15")));
    }

    #[test]
    fn malformed_services_get_warnings_and_leave_the_others_alone() {
        let mut no_spec = svc("no-spec", &[80]);
        no_spec.spec = None;
        let mut no_ports = svc("no-ports", &[]);
        spec(&mut no_ports).ports = None;
        let mut bad_annotation = svc("bad-annotation", &[80]);
        bad_annotation.metadata.annotations = Some(BTreeMap::from([(
            LOAD_BALANCER_IPS_ANNOTATION.to_owned(),
            "nope".to_owned(),
        )]));
        let many: Vec<i32> = (1..=1_000).collect();
        let state = state_with(vec![
            svc("good", &[80]),
            requesting(svc("bad-ip", &[80]), "not-an-ip"),
            requesting(svc("outside", &[80]), "192.0.2.10"),
            svc("thousand-ports", &many),
            svc("duplicate-ports", &[81, 81]),
            no_spec,
            no_ports,
            svc("port-zero", &[0]),
            load_balancer("default", "no-node-port", vec![port(82, "TCP", None)]),
            load_balancer("default", "sctp", vec![port(83, "SCTP", Some(30_083))]),
            load_balancer("default", "negative", vec![port(-1, "TCP", Some(30_084))]),
            bad_annotation,
        ]);
        let plan = run(&state, &config(), &Allocations::default());
        let reasons = |name| -> Vec<&'static str> {
            warnings(&plan, name)
                .into_iter()
                .map(|(reason, _)| reason)
                .collect()
        };
        assert_eq!(ip_of(&plan, "good"), Some(ip("198.51.100.10")));
        assert_eq!(reasons("good"), Vec::<&str>::new());
        assert_eq!(
            backends(&plan, "good", 80, Protocol::Tcp),
            vec![
                backend("203.0.113.11", 30_080),
                backend("203.0.113.12", 30_080)
            ]
        );
        assert_eq!(
            warnings(&plan, "bad-ip"),
            vec![(
                "InvalidLoadBalancerIP",
                r#"spec.loadBalancerIP "not-an-ip" is not an IPv4 address"#.to_owned()
            )]
        );
        assert_eq!(reasons("outside"), vec!["AllocationFailed"]);
        assert_eq!(reasons("thousand-ports"), vec!["InvalidService"]);
        assert!(
            warnings(&plan, "thousand-ports")[0]
                .1
                .contains("1000 ports")
        );
        assert_eq!(reasons("duplicate-ports"), vec!["InvalidService"]);
        assert_eq!(
            ip_of(&plan, "duplicate-ports"),
            Some(ip("198.51.100.10")),
            "served once"
        );
        assert_eq!(reasons("no-spec"), vec!["InvalidService"]);
        assert_eq!(reasons("no-ports"), vec!["InvalidService"]);
        assert_eq!(
            reasons("port-zero"),
            vec!["InvalidService", "InvalidService"]
        );
        assert_eq!(
            reasons("no-node-port"),
            vec!["MissingNodePort", "InvalidService"]
        );
        assert_eq!(
            reasons("sctp"),
            vec!["UnsupportedProtocol", "InvalidService"]
        );
        assert_eq!(
            reasons("negative"),
            vec!["InvalidService", "InvalidService"]
        );
        assert_eq!(reasons("bad-annotation"), vec!["InvalidLoadBalancerIP"]);
        for name in [
            "no-spec",
            "bad-ip",
            "outside",
            "thousand-ports",
            "no-ports",
            "port-zero",
            "no-node-port",
            "sctp",
            "negative",
            "bad-annotation",
        ] {
            assert_eq!(ip_of(&plan, name), None, "{name} must get no IP");
        }
    }

    #[test]
    fn local_only_announces_a_vip_while_one_of_its_services_has_an_endpoint_here() {
        let mut state = state_with(vec![
            svc("here", &[80]),
            svc("there", &[81]),
            svc("c", &[82]),
        ]);
        for (service, node) in [("here", "node1"), ("there", "node2"), ("c", "node2")] {
            state.upsert_endpoint_slice(endpoint_slice(
                "default",
                &format!("{service}-1"),
                service,
                &[(80, 8080, "TCP")],
                &[EndpointSpec::ready(ip("10.1.0.1"), node)],
            ));
        }
        let on_node1 = Config {
            node_name: Some("node1".to_owned()),
            announce: Announce::Lo,
            announce_local_only: true,
            pool: "198.51.100.10-198.51.100.20".parse().expect("test pool"),
            ..Config::default()
        };
        let plan = run(&state, &on_node1, &Allocations::default());
        let here = ip_of(&plan, "here").expect("here gets an IP");
        let there = ip_of(&plan, "there").expect("there gets an IP");
        assert_eq!(here, there, "they share an IP (different ports)");
        assert_eq!(
            plan.vips,
            BTreeMap::from([(here, BTreeSet::from([key("here")]))]),
            "the VIP is announced for the Service with an endpoint here only"
        );
        let on_node3 = Config {
            node_name: Some("node3".to_owned()),
            ..on_node1.clone()
        };
        let plan = run(&state, &on_node3, &Allocations::default());
        assert!(
            plan.vips.is_empty(),
            "no endpoint on node3: {:?}",
            plan.vips
        );
        assert_eq!(
            plan.virtual_services.len(),
            3,
            "the data plane still serves them all"
        );
        let plan = run(&state, &config(), &Allocations::default());
        assert_eq!(
            plan.vips[&here].len(),
            3,
            "without local-only every Service counts"
        );
    }

    #[test]
    fn with_several_lb_nodes_each_announces_the_vips_it_owns_and_events_follow_moves() {
        let services: Vec<Service> = (0..30).map(|n| svc(&format!("s{n}"), &[80])).collect();
        let state = state_with(services);
        let live = |nodes: &[&str]| nodes.iter().map(|n| (*n).to_owned()).collect();
        let settings = |me: &str, nodes: &[&str]| Settings {
            peers: Some(Peers {
                me: me.to_owned(),
                live: live(nodes),
            }),
            ..Settings::from(&config())
        };
        let plans: Vec<Plan> = ["lb1", "lb2", "lb3"]
            .iter()
            .map(|me| {
                reconcile(
                    &state,
                    &settings(me, &["lb1", "lb2", "lb3"]),
                    &host(),
                    &Allocations::default(),
                )
            })
            .collect();
        let mut announced = BTreeMap::new();
        for (plan, me) in plans.iter().zip(["lb1", "lb2", "lb3"]) {
            assert_eq!(
                plan.allocations, plans[0].allocations,
                "every instance allocates alike"
            );
            for vip in plan.vips.keys() {
                assert!(
                    announced.insert(*vip, me).is_none(),
                    "{vip} announced twice"
                );
            }
            assert!(!plan.vips.is_empty(), "{me} announces some of the 11 VIPs");
        }
        let all: BTreeSet<Ipv4Addr> = plans[0]
            .allocations
            .by_service
            .values()
            .map(|a| a.ip)
            .collect();
        assert_eq!(
            announced.keys().copied().collect::<BTreeSet<_>>(),
            all,
            "every VIP has an announcer"
        );
        // lb2 goes: its VIPs move, with an Event; the others stay, without one.
        let after = reconcile(
            &state,
            &settings("lb1", &["lb1", "lb3"]),
            &host(),
            &plans[0].allocations,
        );
        for (vip, before) in &announced {
            let now = &after.allocations.announcers[vip];
            if *before == "lb2" {
                assert_ne!(now, "lb2");
            } else {
                assert_eq!(now, before, "{vip} moved though its announcer stayed");
            }
        }
        let moved: Vec<&PlannedEvent> = after
            .events
            .iter()
            .filter(|e| e.reason == "Announced")
            .collect();
        assert!(
            !moved.is_empty() && moved.iter().all(|e| e.message.contains("(was lb2)")),
            "{moved:?}"
        );
        // In lo mode (anycast) every node announces everything.
        let lo = Settings {
            announce: Announce::Lo,
            ..settings("lb2", &["lb1", "lb2", "lb3"])
        };
        assert_eq!(
            reconcile(&state, &lo, &host(), &Allocations::default())
                .vips
                .len(),
            all.len()
        );
    }

    #[test]
    fn a_synthetic_cluster_reconciles_cleanly() {
        let (state, config, host) = crate::synthetic::cluster(1_000, 10);
        let plan = reconcile(
            &state,
            &Settings::from(&config),
            &host,
            &Allocations::default(),
        );
        assert_eq!(plan.allocations.by_service.len(), 1_000);
        assert!(
            plan.events
                .iter()
                .all(|event| event.kind == EventKind::Normal),
            "{:?}",
            plan.events
                .iter()
                .find(|event| event.kind == EventKind::Warning)
        );
        // 2 TCP ports per Service, plus UDP 53 on every tenth.
        assert_eq!(plan.virtual_services.len(), 2_100);
        // Every Service uses ports 80 and 443: each needs an IP of its own.
        assert_eq!(plan.vips.len(), 1_000);
    }

    /// The size `bench_reconcile` times (under a second in a debug build): every Service gets
    /// an address.
    #[test]
    fn full_size_synthetic_cluster() {
        let (state, config, host) = crate::synthetic::cluster(10_000, 10);
        let plan = reconcile(
            &state,
            &Settings::from(&config),
            &host,
            &Allocations::default(),
        );
        assert_eq!(plan.allocations.by_service.len(), 10_000);
    }

    fn labelled_node(name: &str, labels: &[&str]) -> Node {
        Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|key| ((*key).to_owned(), String::new()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            ..Node::default()
        }
    }

    #[test]
    fn tags_plain_nodes_only() {
        let mut state = ClusterState::default();
        state.upsert_node(labelled_node("plain", &[]));
        state.upsert_node(labelled_node("worker", &["node-role.kubernetes.io/worker"]));
        state.upsert_node(labelled_node(
            "cp",
            &["node-role.kubernetes.io/control-plane"],
        ));
        state.upsert_node(labelled_node("master", &["node-role.kubernetes.io/master"]));
        state.upsert_node(Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("unlabelled".to_owned()),
                ..Default::default()
            },
            ..Node::default()
        });
        let label = LabelFilter {
            key: "node-role.kubernetes.io/worker".to_owned(),
            value: None,
        };
        assert_eq!(nodes_to_tag(&state, &label), ["plain", "unlabelled"]);
        let config = Config {
            tag_worker_nodes: true,
            worker_label: Some(label),
            ..config()
        };
        let plan = run(&state, &config, &Allocations::default());
        assert_eq!(
            plan.node_labels,
            ["plain", "unlabelled"],
            "the plan carries them"
        );
        let plan = run(&state, &self::config(), &Allocations::default());
        assert!(
            plan.node_labels.is_empty(),
            "not without --tag-worker-nodes"
        );
    }
}
