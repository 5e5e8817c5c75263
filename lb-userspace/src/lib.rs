//! xlb: gives Kubernetes Services of `type: LoadBalancer` an external address on bare metal
//! and carries their traffic with an XDP data plane. See `ARCHITECTURE.md` for the map.

pub mod addr;
pub mod backoff;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod inspect;
pub mod ipam;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod nodes;
pub mod plan;
pub mod pool;
pub mod reconcile;
pub mod source;
pub mod status;
pub mod synthetic;
