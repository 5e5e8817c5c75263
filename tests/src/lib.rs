//! Fixtures for xlb's end-to-end tests: network-namespace topologies, backends, clients.

pub mod netns;
