//! xlb: gives Kubernetes Services of `type: LoadBalancer` an external address on bare metal
//! and carries their traffic with an XDP data plane. See `ARCHITECTURE.md` for the map.

pub mod addr;
pub mod backoff;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod group;
pub mod inspect;
pub mod ipam;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod model;
pub mod nodes;
pub mod ownership;
pub mod plan;
pub mod pool;
pub mod reconcile;
pub mod settings;
pub mod source;
pub mod status;

// Test-only builders live with the tests (`tests/src/synthetic.rs`); the unit tests here
// compile the same file, which names this crate `xlb` as the test crate does.
#[cfg(test)]
extern crate self as xlb;
#[cfg(test)]
#[path = "../../tests/src/synthetic.rs"]
mod synthetic;
