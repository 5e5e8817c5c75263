//! What `reconcile` decides with: [`Settings`], built from the configuration once, and the
//! view of the other LB nodes ([`Peers`]) the controller fills in before each run.

use std::collections::BTreeSet;

use crate::config::{Announce, Config, IpMode, LabelFilter, NodeAddressType};
use crate::pool::Pool;

/// What `reconcile` decides with: the part of the configuration about which Services xlb
/// serves, which backends and addresses they get, and what is written back. Built from
/// [`Config`] once; nothing else of it reaches the reconciler.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The address pool (`--restricted-cidr`).
    pub pool: Pool,
    /// Whether VIPs must lie in a prefix of the link device (`--announce link`).
    pub announce: Announce,
    /// Pod endpoints for every Service (`--kubernetes`).
    pub in_cluster: bool,
    pub ip_mode: IpMode,
    /// `None`: Services without a `loadBalancerClass`.
    pub lb_class: Option<String>,
    pub node_address_type: NodeAddressType,
    /// This node (`--node-name`), for `--announce-local-only`.
    pub node_name: Option<String>,
    pub update_external_ips: bool,
    /// `None`: every Ready node is a backend.
    pub worker_label: Option<LabelFilter>,
    /// `--tag-worker-nodes`: nodes without the worker label get it (needs a label).
    pub tag_worker_nodes: bool,
    /// `--announce-local-only` (`lo` mode).
    pub announce_local_only: bool,
    /// Several LB nodes: this node and the live ones, as this instance sees them (`None`: one
    /// instance alone announces every VIP).
    pub peers: Option<Peers>,
    /// This instance is the one writer (holds the writer Lease, or runs alone). The others
    /// allocate nothing: they serve the Services whose status already names an IP.
    pub writer: bool,
}

/// The LB nodes as this instance sees them (several LB nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// This node.
    pub me: String,
    /// The LB nodes judged live, this one included while it can serve.
    pub live: BTreeSet<String>,
}

impl From<&Config> for Settings {
    fn from(config: &Config) -> Self {
        Settings {
            pool: config.pool.clone(),
            announce: config.announce,
            in_cluster: config.in_cluster,
            ip_mode: config.ip_mode,
            lb_class: config.lb_class.clone(),
            node_address_type: config.node_address_type,
            node_name: config.node_name.clone(),
            update_external_ips: config.update_external_ips,
            worker_label: config.worker_label.clone(),
            tag_worker_nodes: config.tag_worker_nodes,
            announce_local_only: config.announce_local_only,
            peers: None,
            writer: true,
        }
    }
}
