//! `--tag-worker-nodes` (`TAG_WORKER_NODES`): labels nodes with the worker label so that they
//! become backends, as the original balancer did for clusters whose installer labels no
//! workers. The nodes come from the plan ([`crate::plan::Plan::node_labels`]); this module
//! only writes.
//!
//! Which nodes (decided by `reconcile`): every node that lacks the worker label's key and is not a control-plane node
//! (labelled `node-role.kubernetes.io/control-plane`, or the older
//! `node-role.kubernetes.io/master`). Control-plane nodes usually run no workloads and are
//! often tainted, so they are left alone; a user who wants one as a backend labels it. A node
//! that already has the key keeps its value. The label written is the `--worker-label` (key,
//! and value when one is given, else empty); with an empty `--worker-label` there is nothing
//! to tag. Labels are never removed, also not on exit.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::config::LabelFilter;

/// Writes the worker label on the nodes that need it.
pub struct NodeTagger {
    api: Api<Node>,
    label: LabelFilter,
    /// Nodes already patched, so a failure is not retried in a tight loop and a patch is not
    /// repeated before the watch reports it.
    tagged: BTreeSet<String>,
}

impl NodeTagger {
    /// A tagger writing `label`.
    pub fn new(client: Client, label: LabelFilter) -> Self {
        Self {
            api: Api::all(client),
            label,
            tagged: BTreeSet::new(),
        }
    }

    /// Labels the nodes the plan names (merge patch of one label). Returns the names of the
    /// nodes labelled now; failures are logged and retried on a later plan.
    pub async fn tag(&mut self, wanted: &[String]) -> Vec<String> {
        // Forget nodes that are gone or labelled, so a node that loses the label is tagged again.
        self.tagged.retain(|name| wanted.contains(name));
        let mut done = Vec::new();
        for name in wanted {
            if self.tagged.contains(name) {
                continue;
            }
            let value = self.label.value.clone().unwrap_or_default();
            let patch = json!({"metadata": {"labels": {self.label.key.as_str(): value}}});
            match self
                .api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %name, label = %self.label.key, "labelled a worker node");
                    self.tagged.insert(name.clone());
                    done.push(name.clone());
                }
                Err(error) => {
                    tracing::warn!(node = %name, %error, "could not label the worker node");
                }
            }
        }
        done
    }
}
