//! xlb's rtnetlink connection and the requests the address manager makes over it: addresses
//! (list, add, delete), devices, route dumps (default route, gateways), and the kernel check.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::TryStreamExt as _;
use rtnetlink::Handle;
use rtnetlink::packet_core::ErrorMessage;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use tokio::sync::oneshot;

use super::diff::DeviceAddr;
use super::{AddrError, XLB_ADDR_PROTO};

/// Suffix of the informational `IFA_LABEL` (`eth0:xlb`) set when it fits in 15 bytes.
const LABEL_SUFFIX: &str = ":xlb";
/// Longest label the kernel stores (IFNAMSIZ - 1).
const MAX_LABEL_LEN: usize = 15;
/// Linux release that stores `IFA_PROTO` on IPv4 addresses. Older kernels drop the attribute
/// silently, so xlb could no longer tell its addresses from the host's.
pub(super) const MIN_KERNEL: (u32, u32) = (5, 18);

/// One rtnetlink connection (`NETLINK_ROUTE`, strict checking) in the network namespace of the
/// thread that opened it. The connection is driven by a thread of its own (`xlb-netlink`, with
/// a single-threaded tokio runtime), never by the caller's runtime: requests work the same from
/// async code, from synchronous code and from threads without a runtime, and a caller that has
/// to wait for an answer synchronously (the data plane's route lookups) waits on the kernel,
/// not on a task its own thread would have to run. Clones share the connection; the thread ends
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// Dropped with the last clone, which ends the connection's thread.
    _stop: Arc<oneshot::Sender<()>>,
}

impl Netlink {
    /// Opens the socket in the calling thread's network namespace and starts its thread.
    pub fn open() -> Result<Netlink, AddrError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(AddrError::NetlinkThread)?;
        // The socket registers with the runtime that will drive it, and is created here, on
        // the caller's thread, so it belongs to the caller's network namespace.
        let (connection, handle, _) = {
            let _context = runtime.enter();
            rtnetlink::new_connection_with_strict_check().map_err(AddrError::Socket)?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("xlb-netlink".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        () = connection => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(AddrError::NetlinkThread)?;
        Ok(Netlink {
            handle,
            _stop: Arc::new(stop),
        })
    }

    /// The rtnetlink handle to make requests with.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// A network device.
#[derive(Debug, Clone)]
pub(super) struct Link {
    pub(super) name: String,
    pub(super) index: u32,
    /// Ethernet address, when the device has one (needed for ARP).
    pub(super) mac: Option<[u8; 6]>,
}

/// Waits on the calling thread for `work`, whose connection runs on its own thread
/// ([`Netlink`]), so the wait cannot deadlock: inside a multi-threaded tokio runtime in
/// `block_in_place`, which hands the thread's other tasks to another worker first; elsewhere
/// (a current-thread runtime included) directly.
pub(super) fn wait<T>(work: impl std::future::Future<Output = T>) -> T {
    let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    if multi_thread {
        tokio::task::block_in_place(|| futures::executor::block_on(work))
    } else {
        futures::executor::block_on(work)
    }
}

/// Every IPv4 address on the host.
pub(super) async fn addresses(handle: &Handle) -> Result<Vec<DeviceAddr>, AddrError> {
    let mut request = handle.address().get();
    request.message_mut().header.family = AddressFamily::Inet;
    let messages: Vec<AddressMessage> = request
        .execute()
        .try_collect()
        .await
        .map_err(|source| netlink_error("listing IPv4 addresses".to_owned(), source))?;
    Ok(messages.iter().filter_map(device_addr).collect())
}

/// Adds a VIP to `target`, marked as xlb's. "Already there" is success.
pub(super) async fn add(
    handle: &Handle,
    target: &Link,
    vip: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), AddrError> {
    add_marked(handle, target, vip, prefix_len, XLB_ADDR_PROTO).await
}

/// Adds `vip` to `target` with the mark `proto` ([`XLB_ADDR_PROTO`] or
/// [`super::XLB_SNAT_ADDR_PROTO`]). "Already there" is success.
pub(super) async fn add_marked(
    handle: &Handle,
    target: &Link,
    vip: Ipv4Addr,
    prefix_len: u8,
    proto: u8,
) -> Result<(), AddrError> {
    let mut request = handle
        .address()
        .add(target.index, IpAddr::V4(vip), prefix_len);
    let message = request.message_mut();
    // Like `ip addr add`: no broadcast address of our own, the primary's serves the prefix.
    message
        .attributes
        .retain(|attr| !matches!(attr, AddressAttribute::Broadcast(_)));
    message
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
    message
        .attributes
        .push(AddressAttribute::Protocol(AddressProtocol::from(proto)));
    let label = format!("{}{LABEL_SUFFIX}", target.name);
    if label.len() <= MAX_LABEL_LEN && proto == XLB_ADDR_PROTO {
        message.attributes.push(AddressAttribute::Label(label));
    }
    match request.execute().await {
        Err(err) if errno(&err) == Some(libc::EEXIST) => {
            tracing::debug!(vip = %vip, device = %target.name, "VIP already on the device");
            Ok(())
        }
        result => result.map_err(|source| {
            netlink_error(
                format!("adding {vip}/{prefix_len} to {}", target.name),
                source,
            )
        }),
    }
}

/// Removes exactly this address (device, address and prefix). "Not there" is success.
pub(super) async fn delete(handle: &Handle, addr: &DeviceAddr) -> Result<(), AddrError> {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.index = addr.ifindex;
    message.header.prefix_len = addr.prefix_len;
    message.attributes = vec![
        AddressAttribute::Local(IpAddr::V4(addr.ip)),
        AddressAttribute::Address(IpAddr::V4(addr.ip)),
    ];
    match handle.address().del(message).execute().await {
        Err(err) if errno(&err) == Some(libc::EADDRNOTAVAIL) => Ok(()),
        result => result.map_err(|source| {
            netlink_error(
                format!(
                    "removing {}/{} from ifindex {}",
                    addr.ip, addr.prefix_len, addr.ifindex
                ),
                source,
            )
        }),
    }
}

pub(super) fn netlink_error(what: String, source: rtnetlink::Error) -> AddrError {
    AddrError::Netlink { what, source }
}

/// The positive errno of a kernel NACK.
pub(super) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(ErrorMessage {
            code: Some(code), ..
        }) => Some(-code.get()),
        _ => None,
    }
}

/// An IPv4 address from a kernel address message; `None` for anything else.
fn device_addr(message: &AddressMessage) -> Option<DeviceAddr> {
    let local = message.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    // Without IFA_LOCAL (never on IPv4 in practice) IFA_ADDRESS is the address.
    let ip = local.or_else(|| {
        message.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
    })?;
    let proto = message.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Protocol(proto) => Some(u8::from(*proto)),
        _ => None,
    });
    Some(DeviceAddr {
        ip,
        prefix_len: message.header.prefix_len,
        ifindex: message.header.index,
        xlb: proto == Some(XLB_ADDR_PROTO),
        snat: proto == Some(super::XLB_SNAT_ADDR_PROTO),
    })
}

/// Next hops of `route` that leave through device `ifindex`.
pub(super) fn gateways_via(route: &RouteMessage, ifindex: u32) -> Vec<Ipv4Addr> {
    let gateway = |attrs: &[RouteAttribute]| {
        attrs.iter().find_map(|attr| match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
    };
    let mut found = Vec::new();
    if route_oif(route) == Some(ifindex) {
        found.extend(gateway(&route.attributes));
    }
    for attr in &route.attributes {
        if let RouteAttribute::MultiPath(hops) = attr {
            found.extend(
                hops.iter()
                    .filter(|hop| hop.interface_index == ifindex)
                    .filter_map(|hop| gateway(&hop.attributes)),
            );
        }
    }
    found
}

/// The output device of a route: its `RTA_OIF`, or the first next hop's device.
pub(super) fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Oif(index) => Some(*index),
        RouteAttribute::MultiPath(hops) => hops.first().map(|hop| hop.interface_index),
        _ => None,
    })
}

/// The routing table of a route (`RTA_TABLE` when present, the header otherwise).
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// IPv4 routes, of one table and through one device when given. The kernel does the filtering
/// (strict checking), which matters on a router that holds a full table.
pub(super) async fn dump_routes(
    handle: &Handle,
    table: Option<u8>,
    oif: Option<u32>,
) -> Result<Vec<RouteMessage>, AddrError> {
    let mut filter = RouteMessage::default();
    filter.header.address_family = AddressFamily::Inet;
    filter.header.table = table.unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    filter.attributes.extend(oif.map(RouteAttribute::Oif));
    handle
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(|source| netlink_error("listing IPv4 routes".to_owned(), source))
}

/// The device of the main table's IPv4 default route with the lowest metric.
pub(super) async fn default_route_device(handle: &Handle) -> Result<u32, AddrError> {
    let routes = dump_routes(handle, Some(RouteHeader::RT_TABLE_MAIN), None).await?;
    routes
        .iter()
        .filter(|route| {
            route.header.destination_prefix_length == 0
                && route_table(route) == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .filter_map(|route| {
            let metric = route.attributes.iter().find_map(|attr| match attr {
                RouteAttribute::Priority(metric) => Some(*metric),
                _ => None,
            });
            Some((metric.unwrap_or(0), route_oif(route)?))
        })
        .min()
        .map(|(_, index)| index)
        .ok_or(AddrError::NoDefaultRoute)
}

/// A device to look up.
#[derive(Debug, Clone, Copy)]
pub(super) enum LinkRef<'a> {
    Name(&'a str),
    Index(u32),
}

impl std::fmt::Display for LinkRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkRef::Name(name) => f.write_str(name),
            LinkRef::Index(index) => write!(f, "ifindex {index}"),
        }
    }
}

/// Looks a device up by name or by index.
pub(super) async fn find_link(handle: &Handle, wanted: LinkRef<'_>) -> Result<Link, AddrError> {
    let request = match wanted {
        LinkRef::Name(name) => handle.link().get().match_name(name.to_owned()),
        LinkRef::Index(index) => handle.link().get().match_index(index),
    };
    let message: Option<LinkMessage> = match request.execute().try_next().await {
        Ok(message) => message,
        Err(err) if errno(&err) == Some(libc::ENODEV) => None,
        Err(source) => return Err(netlink_error(format!("looking up device {wanted}"), source)),
    };
    let message = message.ok_or_else(|| AddrError::NoSuchDevice {
        device: wanted.to_string(),
    })?;
    let link_name = message.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    });
    let mac = message.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::Address(bytes) if message.header.link_layer_type == LinkLayerType::Ether => {
            <[u8; 6]>::try_from(bytes.as_slice()).ok()
        }
        _ => None,
    });
    Ok(Link {
        name: link_name.unwrap_or_else(|| wanted.to_string()),
        index: message.header.index,
        mac,
    })
}

/// Fails unless the kernel keeps `IFA_PROTO` (see [`MIN_KERNEL`]). An unreadable release is
/// let through with a warning.
pub(super) fn check_kernel() -> Result<(), AddrError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match kernel_version(release) {
        Some(version) if version < MIN_KERNEL => Err(AddrError::KernelTooOld {
            release: release.to_owned(),
        }),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(
                release,
                "cannot read the kernel version; xlb needs Linux 5.18 or later"
            );
            Ok(())
        }
    }
}

/// `(major, minor)` of a kernel release such as `6.18.44-fc`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_kernel_version_parses_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.4.0").is_some_and(|v| v < MIN_KERNEL));
    }
}
