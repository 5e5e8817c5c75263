//! xlb: gives Kubernetes Services of `type: LoadBalancer` an external address on bare metal
//! and carries their traffic with an XDP data plane. See `ARCHITECTURE.md` for the map.

pub mod addr;
pub mod dataplane;
pub mod model;
