//! Where cluster state comes from. Each source keeps a [`ClusterState`] current and publishes
//! it on a `tokio::sync::watch` channel, so the reconcile loop sees only the latest state.
//!
//! - [`file`]: Kubernetes manifests in a directory (`--manifests`), for running without a
//!   cluster.
//!
//! [`ClusterState`]: crate::model::ClusterState

pub mod file;
