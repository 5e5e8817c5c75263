//! Where cluster state comes from: the Kubernetes API (`kube`) or a directory of the same
//! manifests on disk (`file`). Both produce a [`crate::model::ClusterState`].

pub mod file;
pub mod kube;
