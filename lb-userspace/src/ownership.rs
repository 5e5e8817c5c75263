//! Which live LB node announces which VIP (`--announce link` with several LB nodes). Pure.
//!
//! Rendezvous (highest-random-weight) hashing: every node scores `(node, VIP)` with the same
//! fixed hash and the highest score owns the VIP. Every instance computes the same owner from
//! the same inputs without talking to the others, VIPs spread evenly, and a node joining or
//! leaving moves only the VIPs it wins or held.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// One LB node as its Lease shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its address on the link device, if it published one.
    pub link_address: Option<Ipv4Addr>,
    /// Its Lease changed within `--lease-duration` (on the observer's clock).
    pub fresh: bool,
}

/// The LB nodes that can answer for a VIP now: this one (`me`) while its link is up; another
/// while its kernel answers ARP at its link address (`answers`), whatever its Lease says, so
/// that a crashed or restarting xlb on a healthy node moves nothing; one that published no
/// address, while its Lease is fresh. A node with no Lease (stopped with SIGTERM, or never
/// started) is no candidate.
pub fn live_nodes(
    me: &str,
    link_up: bool,
    members: &BTreeMap<String, Member>,
    answers: impl Fn(Ipv4Addr) -> bool,
) -> BTreeSet<String> {
    let mut live: BTreeSet<String> = members
        .iter()
        .filter(|(node, _)| node.as_str() != me)
        .filter(|(_, member)| match member.link_address {
            Some(address) => answers(address),
            None => member.fresh,
        })
        .map(|(node, _)| node.clone())
        .collect();
    if link_up {
        live.insert(me.to_owned());
    }
    live
}

/// The node among `live` that announces `vip`, or `None` when no node is live.
pub fn owner(vip: Ipv4Addr, live: &BTreeSet<String>) -> Option<&str> {
    live.iter()
        .map(|node| (score(node, vip), node.as_str()))
        .max()
        .map(|(_, node)| node)
}

/// The weight of `node` for `vip`: FNV-1a over the node name and the address, then a
/// SplitMix64 finaliser so that similar names still spread. Fixed, not seeded per process:
/// every instance must compute the same value.
fn score(node: &str, vip: Ipv4Addr) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain([0]).chain(vip.octets()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    fn vips(count: u32) -> Vec<Ipv4Addr> {
        (0..count)
            .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + n))
            .collect()
    }

    #[test]
    fn every_vip_has_one_owner_and_vips_spread_evenly() {
        let live = nodes(&["lb1", "lb2", "lb3"]);
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for vip in vips(3_000) {
            *count
                .entry(owner(vip, &live).expect("a live node"))
                .or_default() += 1;
        }
        assert_eq!(count.len(), 3, "{count:?}");
        for (node, owned) in &count {
            assert!(
                (850..=1_150).contains(owned),
                "{node} owns {owned} of 3,000: {count:?}"
            );
        }
        assert_eq!(owner(vips(1)[0], &BTreeSet::new()), None);
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_vips_and_joining_takes_only_a_share() {
        let three = nodes(&["lb1", "lb2", "lb3"]);
        let two = nodes(&["lb1", "lb3"]);
        let mut taken = 0;
        for vip in vips(1_000) {
            let before = owner(vip, &three).expect("owner");
            let after = owner(vip, &two).expect("owner");
            if before == "lb2" {
                assert_ne!(after, "lb2");
            } else {
                assert_eq!(before, after, "{vip} moved though its owner stayed");
            }
            // Joining is the same change seen backwards: lb2 takes only what it wins.
            if after != before {
                taken += 1;
            }
        }
        assert!((250..=420).contains(&taken), "lb2 held {taken} of 1,000");
    }

    #[test]
    fn liveness_follows_the_data_plane_not_the_lease() {
        let member = |address: Option<[u8; 4]>, fresh: bool| Member {
            link_address: address.map(Ipv4Addr::from),
            fresh,
        };
        let members = BTreeMap::from([
            ("lb1".to_owned(), member(Some([198, 51, 100, 2]), true)),
            // xlb killed: Lease stale, kernel still answering.
            ("lb2".to_owned(), member(Some([198, 51, 100, 3]), false)),
            // Node down: Lease fresh for a moment, no answer.
            ("lb3".to_owned(), member(Some([198, 51, 100, 4]), true)),
            // No address published: the Lease decides.
            ("lb4".to_owned(), member(None, true)),
            ("lb5".to_owned(), member(None, false)),
        ]);
        let answering = |ip: Ipv4Addr| ip != Ipv4Addr::new(198, 51, 100, 4);
        assert_eq!(
            live_nodes("lb1", true, &members, answering),
            nodes(&["lb1", "lb2", "lb4"])
        );
        assert_eq!(
            live_nodes("lb1", false, &members, answering),
            nodes(&["lb2", "lb4"]),
            "a node whose link is down answers for nothing"
        );
    }

    #[test]
    fn scores_are_the_same_in_every_process_and_version() {
        // Instances of different builds run side by side during an upgrade: a change of the
        // hash would make them disagree on owners. These values must never change.
        let vip = Ipv4Addr::new(198, 51, 100, 10);
        assert_eq!(score("lb1", vip), 7_860_890_784_810_314_565);
        assert_eq!(score("lb2", vip), 15_783_630_230_325_401_524);
        assert_eq!(score("lb3", vip), 12_381_126_268_862_367_350);
        assert_eq!(owner(vip, &nodes(&["lb1", "lb2", "lb3"])), Some("lb2"));
    }
}
