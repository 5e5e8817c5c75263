//! Extra SNAT source addresses (`--snat-addresses`).
//!
//! One LB address gives a backend at most one flow per SNAT port at a time; flows whose port is
//! held for long (60 s after a backend closed first, 30 s for a UDP exchange) need more
//! addresses than ports. Each extra address goes on the device of the host address whose
//! prefix covers it, with that prefix, `noprefixroute` and the mark [`XLB_SNAT_ADDR_PROTO`]:
//! secondary, so never the source the kernel picks, and the kernel answers the backends' ARP
//! for it. The data plane learns, for each such host address (the source a route toward the
//! backends gives), the extra addresses that go with it. Addresses with the mark that are no
//! longer listed are removed at start; listed ones stay when xlb exits, with the pinned data
//! plane whose draining flows may use them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::diff::DeviceAddr;
use super::netlink::{self, Link, LinkRef, Netlink};
use super::{AddrError, XLB_SNAT_ADDR_PROTO};
use crate::model::prefix_mask;

/// What to change on the host for the wanted extra SNAT addresses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SnatPlan {
    /// Addresses to add: `(address, prefix length, ifindex)`.
    pub add: Vec<(Ipv4Addr, u8, u32)>,
    /// Marked SNAT addresses no longer wanted (or on another device or prefix).
    pub remove: Vec<DeviceAddr>,
    /// For each host address (network order as the data plane keys it), its extra addresses.
    pub by_source: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
}

/// Pure: where each of `wanted` goes given the addresses `present`, or why it cannot.
pub fn plan(wanted: &[Ipv4Addr], present: &[DeviceAddr]) -> Result<SnatPlan, AddrError> {
    let mut plan = SnatPlan::default();
    let refuse = |ip: Ipv4Addr, reason: &str| AddrError::SnatAddress {
        ip,
        reason: reason.to_owned(),
    };
    let covers = |host: &DeviceAddr, ip: Ipv4Addr| {
        prefix_mask(host.prefix_len)
            .is_some_and(|mask| u32::from(host.ip) & mask == u32::from(ip) & mask)
            && host.prefix_len < 31
    };
    let mut placed: Vec<(Ipv4Addr, u8, u32)> = Vec::new();
    for &ip in wanted {
        if present.iter().any(|a| a.ip == ip && !a.snat) {
            return Err(refuse(
                ip,
                "is already an address of the host (or a VIP): list addresses nothing else uses",
            ));
        }
        // The kernel lists a prefix's primary address first: the source routes give.
        let Some(host) = present.iter().find(|a| !a.xlb && !a.snat && covers(a, ip)) else {
            return Err(refuse(
                ip,
                "lies in no prefix of the host's own addresses: an extra SNAT address must be on the subnet of the LB's address toward the backends",
            ));
        };
        if ip == Ipv4Addr::from(u32::from(host.ip) | !prefix_mask(host.prefix_len).unwrap_or(0))
            || u32::from(ip) & !prefix_mask(host.prefix_len).unwrap_or(0) == 0
        {
            return Err(refuse(
                ip,
                "is the network or broadcast address of its prefix",
            ));
        }
        placed.push((ip, host.prefix_len, host.ifindex));
        plan.by_source.entry(host.ip).or_default().push(ip);
    }
    for addr in present.iter().filter(|a| a.snat) {
        if !placed.contains(&(addr.ip, addr.prefix_len, addr.ifindex)) {
            plan.remove.push(*addr);
        }
    }
    plan.add = placed
        .into_iter()
        .filter(|&(ip, len, ifindex)| {
            !present
                .iter()
                .any(|a| a.snat && (a.ip, a.prefix_len, a.ifindex) == (ip, len, ifindex))
        })
        .collect();
    Ok(plan)
}

/// Puts exactly the `wanted` extra SNAT addresses on the host (in the calling thread's network
/// namespace) and returns, for each host address, its extra addresses (for
/// `XdpDataplane::set_snat_addresses`). Synchronous, like [`super::route::RouteLookup`].
pub fn place(wanted: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>, AddrError> {
    let netlink = Netlink::open()?;
    let work = async {
        let handle = netlink.handle();
        let present = netlink::addresses(handle).await?;
        let plan = plan(wanted, &present)?;
        for addr in &plan.remove {
            tracing::info!(address = %addr.ip, ifindex = addr.ifindex, "removing an extra SNAT address no longer listed");
            netlink::delete(handle, addr).await?;
        }
        for &(ip, prefix_len, ifindex) in &plan.add {
            let link: Link = netlink::find_link(handle, LinkRef::Index(ifindex)).await?;
            tracing::info!(address = %ip, prefix_len, device = %link.name, "adding an extra SNAT address");
            netlink::add_marked(handle, &link, ip, prefix_len, XLB_SNAT_ADDR_PROTO).await?;
        }
        Ok(plan.by_source)
    };
    netlink::wait(work)
}

/// The extra SNAT addresses on the host (those with the mark), as `(address, prefix length,
/// ifindex)`, in the calling thread's network namespace.
pub fn placed() -> Result<Vec<(Ipv4Addr, u8, u32)>, AddrError> {
    let netlink = Netlink::open()?;
    let present = futures::executor::block_on(netlink::addresses(netlink.handle()))?;
    Ok(present
        .into_iter()
        .filter(|a| a.snat)
        .map(|a| (a.ip, a.prefix_len, a.ifindex))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str, prefix_len: u8, ifindex: u32, xlb: bool, snat: bool) -> DeviceAddr {
        DeviceAddr {
            ip: ip.parse().expect("address"),
            prefix_len,
            ifindex,
            xlb,
            snat,
        }
    }

    fn ips(list: &[&str]) -> Vec<Ipv4Addr> {
        list.iter().map(|ip| ip.parse().expect("address")).collect()
    }

    #[test]
    fn extra_addresses_go_with_the_host_address_whose_prefix_covers_them() {
        let present = [
            addr("198.51.100.1", 24, 2, false, false),
            addr("198.51.100.10", 24, 2, true, false),
            addr("203.0.113.1", 24, 3, false, false),
            addr("203.0.113.51", 24, 3, false, true),
            addr("203.0.113.60", 24, 3, false, true),
        ];
        let plan = plan(&ips(&["203.0.113.50", "203.0.113.51"]), &present).expect("plan");
        assert_eq!(plan.add, vec![("203.0.113.50".parse().unwrap(), 24, 3)]);
        assert_eq!(plan.remove, vec![present[4]], "no longer listed");
        assert_eq!(
            plan.by_source,
            [(
                "203.0.113.1".parse().unwrap(),
                ips(&["203.0.113.50", "203.0.113.51"])
            )]
            .into()
        );
    }

    #[test]
    fn addresses_outside_every_prefix_or_in_use_are_refused() {
        let present = [
            addr("203.0.113.1", 24, 3, false, false),
            addr("198.51.100.10", 24, 2, true, false),
        ];
        for (ip, why) in [
            ("192.0.2.5", "no prefix"),
            ("203.0.113.1", "already an address"),
            ("198.51.100.10", "already an address"),
            ("203.0.113.255", "broadcast"),
            ("203.0.113.0", "network"),
        ] {
            let error = plan(&ips(&[ip]), &present).expect_err(ip).to_string();
            assert!(error.contains(why), "{ip}: {error}");
        }
    }
}
