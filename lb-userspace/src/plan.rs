//! The plan: what one reconcile decided, for the actuators. Every actuator (addresses, data
//! plane, status and Events, node labels) reads only its part of a [`Plan`]; none looks at the
//! cluster state or the configuration to decide anything itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::config::IpMode;
use crate::model::{Allocations, ServiceKey, VirtualService};

/// Kind of a Kubernetes Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    Normal,
    Warning,
}

/// An Event to record on a Service. Warnings are repeated on every reconcile while their cause
/// lasts: the event writer de-duplicates them. The message of a Warning is also the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub service: ServiceKey,
    pub kind: EventKind,
    /// CamelCase reason, e.g. `IPAllocated`, `AllocationFailed`, `InvalidService`.
    pub reason: &'static str,
    pub message: String,
}

/// What to write in a Service's `status.loadBalancer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// One ingress entry with this IP and ipMode.
    Ingress { ip: Ipv4Addr, ip_mode: IpMode },
    /// No ingress: the Service lost (or never got) its address from xlb.
    Clear,
}

/// Everything the actuators need, computed from one cluster state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// For the data plane: one entry per `VIP:port/protocol`, sorted by front end, backends
    /// sorted and de-duplicated.
    pub virtual_services: Vec<VirtualService>,
    /// For the address manager: each VIP this node puts on its device, and the Services it
    /// is there for (see `reconcile::announce`: local-only and ownership among several LB
    /// nodes are already applied). The data plane serves every VIP regardless.
    pub vips: BTreeMap<Ipv4Addr, BTreeSet<ServiceKey>>,
    /// For the status writer: only Services whose status differs from what it should be.
    pub statuses: BTreeMap<ServiceKey, StatusChange>,
    /// The allocations to pass to the next reconcile.
    pub allocations: Allocations,
    /// Events to record, sorted by Service.
    pub events: Vec<PlannedEvent>,
    /// Nodes to give the worker label (`--tag-worker-nodes`), by name.
    pub node_labels: Vec<String>,
}
