//! Plain data describing what xlb should serve: no I/O here.
//!
//! `reconcile` turns cluster state into these types; the data plane, the address manager and
//! the status writer consume them.

use std::net::Ipv4Addr;

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number, as stored in BPF map keys.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where a virtual service sends traffic: a node's address and NodePort, or a pod's address
/// and target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// The front end of a virtual service: `VIP:port/protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One `VIP:port/protocol` and the backends it balances over, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    pub frontend: Frontend,
    /// Backends that take new flows.
    pub backends: Vec<Backend>,
    /// `namespace/name` of the Service this came from, for logs and `xlb inspect`.
    pub owner: String,
}

/// The host's view of the link device, read over netlink by
/// [`AddrManager::host_network`](crate::addr::AddrManager::host_network) and handed to the pure
/// reconciler, so that it never allocates an address the host network needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostNetwork {
    /// Name of the link device (`--linkdevice`, or the device of the default route).
    pub device: String,
    /// Interface index of `device`.
    pub ifindex: u32,
    /// Prefixes of the host's own IPv4 addresses on `device`, as `(network, length)`.
    pub prefixes: Vec<(Ipv4Addr, u8)>,
    /// The host's own IPv4 addresses (not xlb's) on `device`, and on `lo` in `--announce lo` mode.
    pub own_addresses: Vec<Ipv4Addr>,
    /// Next hops of routes through `device` (the default gateway among them).
    pub gateways: Vec<Ipv4Addr>,
    /// True when VIPs go on `device` and are answered by ARP: a VIP must then lie inside one of
    /// `prefixes`. False in `--announce lo` mode, where a VIP is a /32 that a routing daemon
    /// announces, so any address will do.
    pub vip_prefix_required: bool,
}

/// Why an address cannot be a VIP on this host: see [`HostNetwork::check_vip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipRefusal {
    /// The host itself uses the address.
    OwnAddress,
    /// A route through the device uses the address as its next hop.
    Gateway,
    /// The address is the network address of a prefix of the device.
    NetworkAddress { prefix: (Ipv4Addr, u8) },
    /// The address is the broadcast address of a prefix of the device.
    BroadcastAddress { prefix: (Ipv4Addr, u8) },
    /// The address lies outside every prefix of the device (ARP mode only).
    OutsidePrefixes { prefixes: Vec<(Ipv4Addr, u8)> },
}

impl std::fmt::Display for VipRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VipRefusal::OwnAddress => f.write_str(
                "it is one of the host's own addresses; choose another address or remove it from the host",
            ),
            VipRefusal::Gateway => f.write_str(
                "it is a gateway of the host's routes; announcing it would take over the gateway, choose another address",
            ),
            VipRefusal::NetworkAddress { prefix: (net, len) } => {
                write!(f, "it is the network address of {net}/{len}; choose another address")
            }
            VipRefusal::BroadcastAddress { prefix: (net, len) } => {
                write!(f, "it is the broadcast address of {net}/{len}; choose another address")
            }
            VipRefusal::OutsidePrefixes { prefixes } => {
                let list: Vec<String> = prefixes
                    .iter()
                    .map(|(net, len)| format!("{net}/{len}"))
                    .collect();
                let list = if list.is_empty() {
                    "none: the device has no IPv4 address".to_owned()
                } else {
                    list.join(", ")
                };
                write!(
                    f,
                    "it is outside every prefix of the device ({list}); choose an address inside them, \
                     add an address covering it to the device, or use --announce lo on a routed fabric"
                )
            }
        }
    }
}

impl HostNetwork {
    /// The longest prefix of the device that contains `ip`: the prefix `ip addr add` would need.
    pub fn covering_prefix(&self, ip: Ipv4Addr) -> Option<(Ipv4Addr, u8)> {
        self.prefixes
            .iter()
            .copied()
            .filter(|&(net, len)| prefix_contains(net, len, ip))
            .max_by_key(|&(_, len)| len)
    }

    /// Whether `ip` may be a VIP on this host: not the host's own address, not a gateway, not
    /// the network or broadcast address of a prefix of the device, and (when
    /// `vip_prefix_required`) inside one of its prefixes.
    pub fn check_vip(&self, ip: Ipv4Addr) -> Result<(), VipRefusal> {
        if self.own_addresses.contains(&ip) {
            return Err(VipRefusal::OwnAddress);
        }
        if self.gateways.contains(&ip) {
            return Err(VipRefusal::Gateway);
        }
        for &(net, len) in &self.prefixes {
            // /31 and /32 have no network or broadcast address (RFC 3021).
            if len > 30 || !prefix_contains(net, len, ip) {
                continue;
            }
            let host_bits = u32::MAX >> len;
            if u32::from(ip) & host_bits == 0 {
                return Err(VipRefusal::NetworkAddress { prefix: (net, len) });
            }
            if u32::from(ip) & host_bits == host_bits {
                return Err(VipRefusal::BroadcastAddress { prefix: (net, len) });
            }
        }
        if self.vip_prefix_required && self.covering_prefix(ip).is_none() {
            return Err(VipRefusal::OutsidePrefixes {
                prefixes: self.prefixes.clone(),
            });
        }
        Ok(())
    }
}

/// Whether `ip` lies inside `net/len` (`len` above 32 contains nothing).
pub fn prefix_contains(net: Ipv4Addr, len: u8, ip: Ipv4Addr) -> bool {
    let Some(mask) = prefix_mask(len) else {
        return false;
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The netmask of a prefix length, `None` above 32.
pub fn prefix_mask(len: u8) -> Option<u32> {
    match len {
        0 => Some(0),
        1..=32 => Some(u32::MAX << (32 - u32::from(len))),
        _ => None,
    }
}
