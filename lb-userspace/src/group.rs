//! This instance's place among several LB nodes (Kubernetes source with `--node-name`): its
//! membership in the group ([`crate::members`]), the ARP prober that tells live peers from dead
//! ones ([`crate::addr::probe`]), and from both the peers `reconcile` decides with.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::Client;
use tokio::sync::watch;

use crate::addr::AddrManager;
use crate::addr::probe::Prober;
use crate::config::{Announce, Config};
use crate::members::{Members, MembersConfig, View};
use crate::metrics::Metrics;
use crate::ownership;
use crate::settings::Peers;

/// A peer that has not answered ARP in this many rounds of probes in a row (sent
/// [`crate::addr::probe::PROBE_INTERVAL`] apart, so 500 ms) is dead.
pub const DEAD_AFTER_ROUNDS: u64 = 5;

/// This instance in the group.
pub struct Group {
    node: String,
    members: Members,
    view: watch::Receiver<View>,
    /// Probes peers in `--announce link` mode (in `lo` mode every node announces anyway).
    prober: Option<Prober>,
}

impl Group {
    /// Joins the group as `node`: this node's Lease published with its address on the link
    /// device, and (in link mode) ARP probes of the others started.
    pub async fn join(
        client: Client,
        config: &Config,
        node: &str,
        addrs: &AddrManager,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Group> {
        let host = addrs.host_network().await?;
        let link_address = host.own_addresses.first().copied();
        let prober = match (config.announce, link_address) {
            (Announce::Link, Some(own)) => Some(addrs.start_prober(own)?),
            (Announce::Link, None) => {
                tracing::warn!(
                    device = addrs.device(),
                    "the link device has no address of its own: peers cannot probe this node, so they judge it by its Lease alone"
                );
                None
            }
            (Announce::Lo, _) => None,
        };
        let members = Members::spawn(
            client,
            MembersConfig {
                namespace: config.lease_namespace.clone(),
                node: node.to_owned(),
                renew: config.lease_renew,
                duration: config.lease_duration,
                link_address,
            },
            metrics,
        );
        tracing::info!(
            node, namespace = %config.lease_namespace, link_address = ?link_address,
            renew = ?config.lease_renew, duration = ?config.lease_duration,
            "joining the LB nodes"
        );
        Ok(Group {
            node: node.to_owned(),
            view: members.view(),
            members,
            prober,
        })
    }

    /// Resolves when the Leases change.
    pub async fn changed(&mut self) {
        if self.view.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the members are known yet (the Leases listed once): until then this instance
    /// decides nothing, lest it announce every VIP alone.
    pub fn listed(&self) -> bool {
        self.view.borrow().listed
    }

    /// The peers as of now, and whether this instance is the writer.
    pub fn peers(&self, addrs: &AddrManager) -> (Peers, bool) {
        let view = self.view.borrow().clone();
        if let Some(prober) = &self.prober {
            let targets: BTreeSet<Ipv4Addr> = view
                .members
                .iter()
                .filter(|(node, _)| **node != self.node)
                .filter_map(|(_, member)| member.link_address)
                .collect();
            prober.set_targets(&targets);
        }
        let live = ownership::live_nodes(&self.node, addrs.link_running(), &view.members, |ip| {
            self.prober
                .as_ref()
                .is_none_or(|prober| prober.answers(ip, DEAD_AFTER_ROUNDS))
        });
        (
            Peers {
                me: self.node.clone(),
                live,
            },
            view.writer,
        )
    }

    /// Leaves: this node's Lease deleted and the writer Lease given up, so the others take
    /// over at once.
    pub async fn leave(self) {
        self.members.leave().await;
    }
}
