//! Fixtures for xlb's end-to-end tests: network-namespace topologies, backends, clients,
//! crafted packets.

pub mod arp;
pub mod bpf;
pub mod capture;
pub mod cluster;
pub mod fixture;
pub mod lb_group;
pub mod measure;
pub mod netns;
pub mod pkt;
pub mod rbac;
pub mod servers;
pub mod spec;
pub mod synthetic;
pub mod topology;
pub mod wait;
