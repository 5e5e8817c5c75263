//! Route lookups toward backends, as `ip route get` does them: an `RTM_GETROUTE` request with
//! `RTA_DST` and `RTM_F_LOOKUP_TABLE`, answered by the kernel's FIB with the output device, the
//! preferred source address and the gateway.
//!
//! The data plane needs them synchronously (its `apply` is not async), so [`RouteLookup`]
//! waits for the kernel's answers on the calling thread while the connection is driven by its
//! own thread ([`Netlink`]). Inside a multi-threaded tokio runtime the wait runs in
//! `block_in_place`, which hands the thread's other tasks to another worker first, so no task
//! waits behind it. [`neighbours`] reads the resolved neighbours, from which the data plane
//! writes each backend's next hop (`dataplane::next_hops`), and [`resolve`] asks the kernel to
//! resolve one that is missing or confirm one that is stale.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use rtnetlink::Handle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType,
};

use super::netlink::{LinkRef, errno, find_link, netlink_error, route_oif, wait};
use super::{AddrError, Netlink};

/// The kernel's route toward one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Name of the output device.
    pub device: String,
    /// Index of the output device.
    pub ifindex: u32,
    /// Preferred source address (`RTA_PREFSRC`): the LB's own address toward the destination,
    /// which the data plane uses as SNAT source.
    pub source: Option<Ipv4Addr>,
    /// Next hop (`RTA_GATEWAY`) when the destination is not on a directly connected prefix.
    pub gateway: Option<Ipv4Addr>,
    /// The output device's Ethernet address (none on a device without one).
    pub mac: Option<[u8; 6]>,
}

impl Route {
    /// The address whose neighbour entry gives the next hop's MAC toward `destination`.
    pub fn next_hop(&self, destination: Ipv4Addr) -> Ipv4Addr {
        self.gateway.unwrap_or(destination)
    }
}

/// What the kernel's route lookup says about one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Reached through device `ifindex`.
    Via {
        /// Index of the output device.
        ifindex: u32,
        /// Preferred source address (`RTA_PREFSRC`).
        source: Option<Ipv4Addr>,
        /// Next hop (`RTA_GATEWAY`), when not directly connected.
        gateway: Option<Ipv4Addr>,
    },
    /// Delivered on the host: one of its own addresses, or a broadcast, multicast or anycast
    /// address (what `ip route get` prints as `local`, `broadcast`, …). Nothing to attach to.
    Local,
    /// No route (`ENETUNREACH`, `EHOSTUNREACH`, or an `unreachable`/`prohibit`/`blackhole`
    /// route).
    Unreachable,
}

/// Looks up the route toward `ip` in the FIB, as `ip route get IP` does.
pub async fn route_get(handle: &Handle, ip: Ipv4Addr) -> Result<Lookup, AddrError> {
    let mut message = RouteMessage::default();
    message.header.address_family = AddressFamily::Inet;
    message.header.destination_prefix_length = 32;
    // The table the route was found in, not the "main" placeholder, as `ip route get` asks.
    message.header.flags = RouteFlags::LookupTable;
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
    let answer = handle.route().get(message).execute().try_next().await;
    let route = match answer {
        Ok(Some(route)) => route,
        Ok(None) => return Ok(Lookup::Unreachable),
        Err(err)
            if matches!(
                errno(&err),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL)
            ) =>
        {
            return Ok(Lookup::Unreachable);
        }
        Err(source) => {
            return Err(netlink_error(
                format!("looking up the route to {ip}"),
                source,
            ));
        }
    };
    Ok(match route.header.kind {
        RouteType::Local | RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast => {
            Lookup::Local
        }
        RouteType::Unicast => match route_oif(&route) {
            Some(ifindex) => Lookup::Via {
                ifindex,
                source: route.attributes.iter().find_map(|attr| match attr {
                    RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                }),
                gateway: route.attributes.iter().find_map(|attr| match attr {
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                }),
            },
            None => Lookup::Unreachable,
        },
        _ => Lookup::Unreachable,
    })
}

/// The routes toward `ips`, with device names filled in. Addresses without a route, and the
/// host's own addresses, are left out.
pub async fn routes(
    handle: &Handle,
    ips: &[Ipv4Addr],
) -> Result<BTreeMap<Ipv4Addr, Route>, AddrError> {
    let mut links: BTreeMap<u32, (String, Option<[u8; 6]>)> = BTreeMap::new();
    let mut found = BTreeMap::new();
    for &ip in ips {
        let Lookup::Via {
            ifindex,
            source,
            gateway,
        } = route_get(handle, ip).await?
        else {
            tracing::debug!(backend = %ip, "no route through a device toward the backend");
            continue;
        };
        let (device, mac) = match links.get(&ifindex) {
            Some(link) => link.clone(),
            None => match find_link(handle, LinkRef::Index(ifindex)).await {
                Ok(link) => {
                    links.insert(ifindex, (link.name.clone(), link.mac));
                    (link.name, link.mac)
                }
                Err(AddrError::NoSuchDevice { .. }) => {
                    // The device went away between the two requests: no route any more.
                    tracing::debug!(backend = %ip, ifindex, "the route's device is gone");
                    continue;
                }
                Err(err) => return Err(err),
            },
        };
        let route = Route {
            device,
            ifindex,
            source,
            gateway,
            mac,
        };
        found.insert(ip, route);
    }
    Ok(found)
}

/// A neighbour whose link-layer address the kernel holds as valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: [u8; 6],
    /// Not confirmed within the reachable time, and no probe under way (`NUD_STALE`): the
    /// kernel confirms such an entry only when it sends a packet there itself, which a data
    /// plane forwarding in XDP or TC never makes it do.
    pub stale: bool,
}

/// The IPv4 neighbours whose link-layer address the kernel holds as valid (the states
/// `bpf_fib_lookup` forwards to, `NUD_VALID`: reachable, stale, delay, probe, permanent, and
/// noarp, a device that resolves nothing, whose entries carry its own address), by (ifindex,
/// address).
pub async fn neighbours(
    handle: &Handle,
) -> Result<BTreeMap<(u32, Ipv4Addr), Neighbour>, AddrError> {
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    let mut found = BTreeMap::new();
    loop {
        let message = match dump.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(source) => return Err(netlink_error("reading the neighbour table".into(), source)),
        };
        let valid = matches!(
            message.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        if !valid {
            continue;
        }
        let mut address = None;
        let mut mac = None;
        for attribute in &message.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => address = Some(*ip),
                NeighbourAttribute::LinkLayerAddress(bytes) => {
                    mac = <[u8; 6]>::try_from(bytes.as_slice()).ok();
                }
                _ => {}
            }
        }
        if let (Some(address), Some(mac)) = (address, mac) {
            let stale = message.header.state == NeighbourState::Stale;
            found.insert((message.header.ifindex, address), Neighbour { mac, stale });
        }
    }
    Ok(found)
}

/// Asks the kernel to resolve neighbour `ip` on device `ifindex` as a packet sent there would
/// (`RTM_NEWNEIGH` with `NTF_USE`, what `ip neigh replace IP dev DEV use` sends): a missing or
/// failed entry starts an ARP request, a stale one a reachability probe (unicast, after
/// `delay_first_probe_time`; when unanswered the entry fails and the next request resolves it
/// afresh), and one being resolved or reachable is left as it is. No address is written: the
/// kernel learns it from the answer.
pub async fn resolve(handle: &Handle, ifindex: u32, ip: Ipv4Addr) -> Result<(), AddrError> {
    handle
        .neighbours()
        .add(ifindex, ip.into())
        .state(NeighbourState::None)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
        .map_err(|source| {
            netlink_error(
                format!("resolving neighbour {ip} on ifindex {ifindex}"),
                source,
            )
        })
}

/// Route lookups for synchronous callers, over a [`Netlink`] connection of their own opened in
/// the caller's network namespace.
#[derive(Clone)]
pub struct RouteLookup {
    netlink: Netlink,
}

impl RouteLookup {
    /// Opens the netlink connection in the calling thread's network namespace.
    pub fn open() -> Result<RouteLookup, AddrError> {
        Ok(RouteLookup {
            netlink: Netlink::open()?,
        })
    }

    /// The routes toward `ips` (see [`routes`]). Waits for the kernel's answers; inside a
    /// multi-threaded tokio runtime it first hands the thread's other tasks to another worker
    /// (`block_in_place`). Elsewhere, including a current-thread runtime, it waits on the
    /// calling thread: the connection runs on its own thread, so this cannot deadlock, and the
    /// kernel answers route lookups without waiting on the network.
    pub fn routes(&self, ips: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, Route>, AddrError> {
        wait(routes(self.netlink.handle(), ips))
    }

    /// The valid neighbours (see [`neighbours`]), waited for as [`RouteLookup::routes`].
    pub fn neighbours(&self) -> Result<BTreeMap<(u32, Ipv4Addr), Neighbour>, AddrError> {
        wait(neighbours(self.netlink.handle()))
    }

    /// Starts resolving a neighbour (see [`resolve`]), waited for as [`RouteLookup::routes`]:
    /// the kernel answers at once and resolves in the background.
    pub fn resolve(&self, ifindex: u32, ip: Ipv4Addr) -> Result<(), AddrError> {
        wait(resolve(self.netlink.handle(), ifindex, ip))
    }
}
