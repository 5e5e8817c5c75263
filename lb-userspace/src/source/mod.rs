//! Where cluster state comes from: the Kubernetes API or manifests on disk.

pub mod kube;
