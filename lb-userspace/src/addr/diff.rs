//! The pure part of address management: what to add, keep and remove given the VIPs wanted
//! and what the host has.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// An IPv4 address as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAddr {
    /// The local address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The device it is on.
    pub ifindex: u32,
    /// Whether it carries xlb's mark ([`super::XLB_ADDR_PROTO`]).
    pub xlb: bool,
    /// Whether it carries the mark of xlb's extra SNAT addresses
    /// ([`super::XLB_SNAT_ADDR_PROTO`]); the VIP code takes those for host addresses.
    pub snat: bool,
}

/// The difference between the wanted VIPs and the addresses present.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// xlb addresses to remove: not wanted, on another device, or with another prefix.
    pub remove: Vec<DeviceAddr>,
    /// VIPs to add, with their prefix length.
    pub add: Vec<(Ipv4Addr, u8)>,
    /// Wanted VIPs already present with the right device and prefix.
    pub keep: Vec<Ipv4Addr>,
    /// Wanted VIPs the host already has as an address of its own: never added nor removed.
    pub foreign: Vec<Ipv4Addr>,
}

/// Pure diff: `wanted` VIPs (with the prefix length each needs on device `target`) against the
/// addresses `present` on the host. Only xlb-marked addresses are ever removed.
pub fn plan(wanted: &BTreeMap<Ipv4Addr, u8>, target: u32, present: &[DeviceAddr]) -> Plan {
    let mut plan = Plan::default();
    for addr in present.iter().filter(|a| a.xlb) {
        if target == addr.ifindex && wanted.get(&addr.ip) == Some(&addr.prefix_len) {
            plan.keep.push(addr.ip);
        } else {
            plan.remove.push(*addr);
        }
    }
    for (&vip, &len) in wanted {
        if plan.keep.contains(&vip) {
            continue;
        }
        if present.iter().any(|a| !a.xlb && a.ip == vip) {
            plan.foreign.push(vip);
        } else {
            plan.add.push((vip, len));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::tests::ip;

    fn addr(s: &str, prefix_len: u8, ifindex: u32, xlb: bool) -> DeviceAddr {
        DeviceAddr {
            ip: ip(s),
            prefix_len,
            ifindex,
            xlb,
            snat: false,
        }
    }

    #[test]
    fn addr_plan_adds_missing_and_keeps_present_vips() {
        let wanted = BTreeMap::from([(ip("198.51.100.10"), 24), (ip("198.51.100.11"), 24)]);
        let present = [
            addr("198.51.100.1", 24, 2, false),
            addr("198.51.100.10", 24, 2, true),
        ];
        let plan = plan(&wanted, 2, &present);
        assert_eq!(plan.keep, vec![ip("198.51.100.10")]);
        assert_eq!(plan.add, vec![(ip("198.51.100.11"), 24)]);
        assert!(plan.remove.is_empty(), "nothing to remove: {plan:?}");
    }

    #[test]
    fn addr_plan_removes_only_xlb_addresses_no_longer_wanted() {
        let present = [
            addr("198.51.100.1", 24, 2, false),
            addr("198.51.100.20", 24, 2, false),
            addr("198.51.100.10", 24, 2, true),
        ];
        let plan = plan(&BTreeMap::new(), 2, &present);
        assert_eq!(plan.remove, vec![addr("198.51.100.10", 24, 2, true)]);
        assert!(plan.add.is_empty() && plan.keep.is_empty());
    }

    #[test]
    fn addr_plan_never_claims_a_host_address() {
        let wanted = BTreeMap::from([(ip("198.51.100.20"), 24)]);
        let present = [addr("198.51.100.20", 24, 2, false)];
        let plan = plan(&wanted, 2, &present);
        assert_eq!(plan.foreign, vec![ip("198.51.100.20")]);
        assert!(plan.add.is_empty() && plan.remove.is_empty());
    }

    #[test]
    fn addr_plan_moves_vips_on_another_device_or_prefix() {
        let wanted = BTreeMap::from([(ip("198.51.100.10"), 32), (ip("198.51.100.11"), 25)]);
        let present = [
            addr("198.51.100.10", 24, 2, true),
            addr("198.51.100.11", 24, 1, true),
        ];
        let plan = plan(&wanted, 1, &present);
        assert_eq!(plan.remove, present.to_vec());
        assert_eq!(
            plan.add,
            vec![(ip("198.51.100.10"), 32), (ip("198.51.100.11"), 25)]
        );
    }
}
