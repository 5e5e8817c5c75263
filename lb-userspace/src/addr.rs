//! VIPs on the host: netlink addresses on the link device (or `lo`), reference counts by owning
//! Service, gratuitous ARP, adoption after a restart, cleanup on exit.
//!
//! The controller hands [`AddrManager::sync`] the VIPs it wants with the Services that use each
//! one; the manager reads what the kernel has, computes the difference ([`plan`], pure) and
//! applies only that. A VIP is added once however many Services share it and removed when the
//! last one goes.
//!
//! # How xlb recognises its own addresses
//!
//! Every address xlb adds carries `IFA_PROTO` = [`XLB_ADDR_PROTO`] (0x78, "x"), the address
//! "protocol" that says who put an address there (Linux 5.18). Adoption after a crash and
//! cleanup on exit only ever touch addresses with that mark, so a host address that happens to
//! be inside the pool is never removed. The mark was chosen over the older convention of an
//! `IFA_LABEL` such as `eth0:xlb` because a label is limited to 15 bytes (`eth0:xlb` does not
//! fit a long device name), is rewritten by the kernel when the device is renamed, and may be
//! set by anyone running `ip addr add … label`. The label is still set when it fits, for people
//! reading `ip addr` with an iproute2 older than 6.3 (which does not print `proto`); it is
//! informational only.
//!
//! # Why a VIP never becomes the host's source address
//!
//! On the link device a VIP is added with the prefix of the host's own address that covers it
//! (as `ip addr add 198.51.100.10/24 dev eth0` would). The kernel then makes it a *secondary*
//! address of that prefix (`IFA_F_SECONDARY`), and IPv4 source selection only ever picks primary
//! addresses; the local route it installs names the primary as preferred source. The VIP is
//! also added with `noprefixroute`, so the routing table is never changed, even if the kernel
//! ever promotes the VIP to primary (when the host's own address is removed and
//! `promote_secondaries` is on; the next sync then removes the VIP, whose prefix is gone).
//! In `--announce lo` mode a VIP is a /32 on `lo`: a /32 creates no prefix route, and the
//! outgoing device's own primary address stays the source for everything the host sends.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use futures::TryStreamExt as _;
use rtnetlink::Handle;
use rtnetlink::packet_core::ErrorMessage;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};

use crate::config::Announce;
use crate::model::{HostNetwork, VipRefusal, prefix_mask};

/// `IFA_PROTO` value that marks an address as xlb's (`0x78` is ASCII `x`). The kernel reserves
/// 0–3 for itself (unspec, loopback, router advertisement, link-local).
pub const XLB_ADDR_PROTO: u8 = 0x78;

/// Suffix of the informational `IFA_LABEL` (`eth0:xlb`) set when it fits in 15 bytes.
const LABEL_SUFFIX: &str = ":xlb";
/// Longest label the kernel stores (IFNAMSIZ - 1).
const MAX_LABEL_LEN: usize = 15;
/// Linux release that stores `IFA_PROTO` on IPv4 addresses. Older kernels drop the attribute
/// silently, so xlb could no longer tell its addresses from the host's.
const MIN_KERNEL: (u32, u32) = (5, 18);
/// Gratuitous ARP: how many announcements per VIP, and the gap between them.
const GARP_COUNT: usize = 3;
const GARP_GAP: Duration = Duration::from_millis(100);

/// The VIPs the controller wants, each with the Services (`namespace/name`) that use it: the
/// size of the set is the VIP's reference count. A VIP with an empty set is not wanted.
pub type DesiredVips = BTreeMap<Ipv4Addr, BTreeSet<String>>;

/// What the address manager needs from xlb's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrConfig {
    /// `--linkdevice` / `LINKDEVICE`; `None` picks the device of the IPv4 default route.
    pub link_device: Option<String>,
    /// `--announce` / `ANNOUNCE`.
    pub announce: Announce,
    /// `--announce-local-only` / `ANNOUNCE_LOCAL_ONLY`: in `lo` mode, announce a VIP only while
    /// this node hosts a ready endpoint of a Service that uses it (see [`vips_to_announce`]).
    pub local_only: bool,
}

/// Errors of the address manager. Each message says what went wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The netlink socket could not be opened.
    #[error(
        "cannot open a netlink socket: {0}; xlb needs CAP_NET_ADMIN (run it as root or grant the capability)"
    )]
    Socket(#[source] std::io::Error),
    /// The kernel cannot mark addresses as xlb's.
    #[error(
        "kernel {release} is too old: xlb marks its addresses with IFA_PROTO, which needs Linux 5.18 or later; upgrade the kernel"
    )]
    KernelTooOld {
        /// `uname -r` of the running kernel.
        release: String,
    },
    /// No device given and no default route to find one.
    #[error(
        "no IPv4 default route to choose the link device from; pass --linkdevice <device> (env LINKDEVICE)"
    )]
    NoDefaultRoute,
    /// The link device does not exist.
    #[error(
        "link device {device} does not exist; pass an existing device to --linkdevice (env LINKDEVICE), see `ip link`"
    )]
    NoSuchDevice {
        /// The name or index that was looked up.
        device: String,
    },
    /// `--announce-local-only` without `--announce lo`.
    #[error(
        "--announce-local-only needs --announce lo: on a shared link only one node may answer ARP for a VIP"
    )]
    LocalOnlyNeedsLo,
    /// A netlink request failed.
    #[error(
        "{what} failed: {source}; check that xlb runs with CAP_NET_ADMIN in the host's network namespace and that the device exists"
    )]
    Netlink {
        /// The request, e.g. `adding 198.51.100.10/24 to eth0`.
        what: String,
        /// The error from the kernel or the netlink library.
        #[source]
        source: rtnetlink::Error,
    },
    /// The address cannot be a VIP on this host.
    #[error("{vip} cannot be a VIP on {device}: {reason}")]
    Refused {
        /// The VIP asked for.
        vip: Ipv4Addr,
        /// The link device.
        device: String,
        /// Why not, and what to do.
        reason: VipRefusal,
    },
    /// Gratuitous ARP could not be sent. The VIPs are in place and neighbours learn them when
    /// they ask; the next sync tries again.
    #[error(
        "sending gratuitous ARP for {vips:?} on {device} failed: {source}; neighbours with a stale entry keep it until it expires; check that the device is up"
    )]
    Arp {
        /// The VIPs being announced.
        vips: Vec<Ipv4Addr>,
        /// The link device.
        device: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
}

/// What one [`AddrManager::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// VIPs added to the device.
    pub added: Vec<Ipv4Addr>,
    /// xlb addresses removed (no Service uses them any more, or left by an earlier run).
    pub removed: Vec<Ipv4Addr>,
    /// Wanted VIPs already in place (adopted after a restart, or unchanged), left untouched.
    pub kept: Vec<Ipv4Addr>,
    /// Per-VIP failures; the other VIPs were still applied. The controller logs them and
    /// reports them on the owning Services.
    pub failed: Vec<AddrError>,
}

/// The VIPs to place on this node. Without `local_only` that is every wanted VIP. With it
/// (`--announce lo --announce-local-only`), a VIP is placed only while at least one of its
/// Services has a ready endpoint on this node (`local_endpoint_services`, `namespace/name`), and
/// its owners are narrowed to those Services, so it is withdrawn when the last one leaves.
pub fn vips_to_announce(
    desired: &DesiredVips,
    local_endpoint_services: &BTreeSet<String>,
    local_only: bool,
) -> DesiredVips {
    desired
        .iter()
        .map(|(&vip, owners)| {
            let owners: BTreeSet<String> = if local_only {
                owners
                    .intersection(local_endpoint_services)
                    .cloned()
                    .collect()
            } else {
                owners.clone()
            };
            (vip, owners)
        })
        .filter(|(_, owners)| !owners.is_empty())
        .collect()
}

/// An IPv4 address as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAddr {
    /// The local address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The device it is on.
    pub ifindex: u32,
    /// Whether it carries xlb's mark ([`XLB_ADDR_PROTO`]).
    pub xlb: bool,
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

/// A network device.
#[derive(Debug, Clone)]
struct Link {
    name: String,
    index: u32,
    /// Ethernet address, when the device has one (needed for ARP).
    mac: Option<[u8; 6]>,
}

/// Places the VIPs on the host over one rtnetlink connection. Create it inside a tokio runtime
/// (the connection runs as a task) in the network namespace to manage.
pub struct AddrManager {
    handle: Handle,
    config: AddrConfig,
    /// The link device: its prefixes decide VIP masks, its neighbours get the ARP.
    link: Link,
    /// Where VIPs go: the link device, or `lo` in `--announce lo` mode.
    target: Link,
    /// Owners at the last sync, to name them when a VIP goes away.
    owners: DesiredVips,
    /// VIPs already announced by gratuitous ARP by this process.
    announced: BTreeSet<Ipv4Addr>,
}

impl AddrManager {
    /// Opens the netlink connection, resolves the link device (given, or the device of the
    /// IPv4 default route) and logs it. Changes nothing on the host: the first [`Self::sync`]
    /// adopts what an earlier run left.
    pub async fn new(config: AddrConfig) -> Result<AddrManager, AddrError> {
        if config.local_only && config.announce != Announce::Lo {
            return Err(AddrError::LocalOnlyNeedsLo);
        }
        check_kernel()?;
        // Strict checking lets the kernel filter route dumps by table and device itself.
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(AddrError::Socket)?;
        tokio::spawn(connection);
        let (link, how) = match &config.link_device {
            Some(name) => (
                find_link(&handle, LinkRef::Name(name)).await?,
                "--linkdevice",
            ),
            None => {
                let index = default_route_device(&handle).await?;
                (
                    find_link(&handle, LinkRef::Index(index)).await?,
                    "default route",
                )
            }
        };
        let target = match config.announce {
            Announce::Link => link.clone(),
            Announce::Lo => find_link(&handle, LinkRef::Name("lo")).await?,
        };
        tracing::info!(
            device = %link.name, ifindex = link.index, chosen_by = how,
            announce = ?config.announce, vip_device = %target.name,
            local_only = config.local_only, "link device"
        );
        Ok(AddrManager {
            handle,
            config,
            link,
            target,
            owners: DesiredVips::new(),
            announced: BTreeSet::new(),
        })
    }

    /// Name of the link device.
    pub fn device(&self) -> &str {
        &self.link.name
    }

    /// The host's view of the link device, for the reconciler: prefixes, own addresses (not
    /// xlb's), gateways.
    pub async fn host_network(&self) -> Result<HostNetwork, AddrError> {
        let present = self.addresses().await?;
        self.host_network_from(&present).await
    }

    /// Makes the host carry exactly the wanted VIPs: `desired` with their owning Services, and
    /// the Services that have a ready endpoint on this node (used only with
    /// `--announce-local-only`; pass an empty set otherwise). Reads the kernel's addresses,
    /// adds what is missing, removes xlb addresses no longer wanted, leaves the rest alone
    /// (so the first call after a restart adopts without flapping), and sends gratuitous ARP
    /// for VIPs this process has not announced yet. Per-VIP failures are in the report; `Err`
    /// means the host could not be read at all.
    pub async fn sync(
        &mut self,
        desired: &DesiredVips,
        local_endpoint_services: &BTreeSet<String>,
    ) -> Result<SyncReport, AddrError> {
        let desired = vips_to_announce(desired, local_endpoint_services, self.config.local_only);
        let present = self.addresses().await?;
        let host = self.host_network_from(&present).await?;
        let mut report = SyncReport::default();

        let mut wanted = BTreeMap::new();
        for &vip in desired.keys() {
            match self.prefix_len_for(&host, vip) {
                Ok(len) => {
                    wanted.insert(vip, len);
                }
                Err(reason) => report.failed.push(AddrError::Refused {
                    vip,
                    device: self.link.name.clone(),
                    reason,
                }),
            }
        }
        let plan = plan(&wanted, self.target.index, &present);

        for addr in &plan.remove {
            match self.owners.get(&addr.ip) {
                Some(owners) => tracing::info!(
                    vip = %addr.ip, prefix_len = addr.prefix_len, ifindex = addr.ifindex,
                    last_owners = %join(owners), "removing VIP: no Service uses it here any more"
                ),
                None => tracing::info!(
                    vip = %addr.ip, prefix_len = addr.prefix_len, ifindex = addr.ifindex,
                    "removing VIP left by an earlier run, or on the wrong device or prefix"
                ),
            }
            match self.delete(addr).await {
                Ok(()) => report.removed.push(addr.ip),
                Err(err) => report.failed.push(err),
            }
        }
        for &(vip, len) in &plan.add {
            let owners = desired.get(&vip).map(join).unwrap_or_default();
            tracing::info!(vip = %vip, prefix_len = len, device = %self.target.name, owners = %owners, "adding VIP");
            match self.add(vip, len).await {
                Ok(()) => report.added.push(vip),
                Err(err) => report.failed.push(err),
            }
        }
        for &vip in &plan.keep {
            if !self.owners.contains_key(&vip) {
                tracing::info!(vip = %vip, device = %self.target.name, "adopted VIP already on the device");
            }
            report.kept.push(vip);
        }
        for &vip in &plan.foreign {
            tracing::warn!(vip = %vip, "VIP is already an address of the host, not xlb's: leaving it alone");
        }

        self.announced
            .retain(|vip| report.added.contains(vip) || report.kept.contains(vip));
        if self.config.announce == Announce::Link {
            let fresh: Vec<Ipv4Addr> = report
                .added
                .iter()
                .chain(&report.kept)
                .filter(|vip| !self.announced.contains(vip))
                .copied()
                .collect();
            // Not marked as announced on failure: the next sync tries again.
            match self.gratuitous_arp(&fresh).await {
                Ok(()) => self.announced.extend(fresh),
                Err(err) => report.failed.push(err),
            }
        }
        self.owners = desired;
        Ok(report)
    }

    /// Removes every address that carries xlb's mark, on any device, and nothing else. Used on
    /// SIGTERM unless `--keep-on-exit`. Returns how many were removed, or the first failure
    /// after trying them all.
    pub async fn cleanup(&mut self) -> Result<usize, AddrError> {
        let present = self.addresses().await?;
        let mut removed = 0;
        let mut first_error = None;
        for addr in present.iter().filter(|a| a.xlb) {
            match self.delete(addr).await {
                Ok(()) => {
                    tracing::info!(vip = %addr.ip, ifindex = addr.ifindex, "removed VIP on exit");
                    removed += 1;
                }
                Err(err) => {
                    tracing::warn!(vip = %addr.ip, error = %err, "cannot remove VIP on exit");
                    first_error.get_or_insert(err);
                }
            }
        }
        self.owners.clear();
        self.announced.clear();
        first_error.map_or(Ok(removed), Err)
    }

    /// The prefix length a VIP gets: the covering prefix of the link device in ARP mode, /32
    /// on `lo`. Refuses addresses the host network needs.
    fn prefix_len_for(&self, host: &HostNetwork, vip: Ipv4Addr) -> Result<u8, VipRefusal> {
        host.check_vip(vip)?;
        match self.config.announce {
            Announce::Lo => Ok(32),
            Announce::Link => host
                .covering_prefix(vip)
                .map(|(_, len)| len)
                .ok_or_else(|| VipRefusal::OutsidePrefixes {
                    prefixes: host.prefixes.clone(),
                }),
        }
    }

    /// Every IPv4 address on the host.
    async fn addresses(&self) -> Result<Vec<DeviceAddr>, AddrError> {
        let mut request = self.handle.address().get();
        request.message_mut().header.family = AddressFamily::Inet;
        let messages: Vec<AddressMessage> = request
            .execute()
            .try_collect()
            .await
            .map_err(|source| netlink_error("listing IPv4 addresses".to_owned(), source))?;
        Ok(messages.iter().filter_map(device_addr).collect())
    }

    async fn host_network_from(&self, present: &[DeviceAddr]) -> Result<HostNetwork, AddrError> {
        let routes = dump_routes(&self.handle, None, Some(self.link.index)).await?;
        let own = |a: &&DeviceAddr| !a.xlb && a.ifindex == self.link.index;
        let mut prefixes: Vec<(Ipv4Addr, u8)> = present
            .iter()
            .filter(own)
            .filter_map(|a| {
                Some((
                    Ipv4Addr::from(u32::from(a.ip) & prefix_mask(a.prefix_len)?),
                    a.prefix_len,
                ))
            })
            .collect();
        prefixes.sort();
        prefixes.dedup();
        let mut own_addresses: Vec<Ipv4Addr> = present
            .iter()
            .filter(|a| !a.xlb && (a.ifindex == self.link.index || a.ifindex == self.target.index))
            .map(|a| a.ip)
            .collect();
        own_addresses.sort();
        own_addresses.dedup();
        let mut gateways: Vec<Ipv4Addr> = routes
            .iter()
            .flat_map(|route| gateways_via(route, self.link.index))
            .collect();
        gateways.sort();
        gateways.dedup();
        Ok(HostNetwork {
            device: self.link.name.clone(),
            ifindex: self.link.index,
            prefixes,
            own_addresses,
            gateways,
            vip_prefix_required: self.config.announce == Announce::Link,
        })
    }

    /// Adds a VIP to the target device, marked as xlb's. "Already there" is success.
    async fn add(&self, vip: Ipv4Addr, prefix_len: u8) -> Result<(), AddrError> {
        let mut request = self
            .handle
            .address()
            .add(self.target.index, IpAddr::V4(vip), prefix_len);
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
            .push(AddressAttribute::Protocol(AddressProtocol::from(
                XLB_ADDR_PROTO,
            )));
        let label = format!("{}{LABEL_SUFFIX}", self.target.name);
        if label.len() <= MAX_LABEL_LEN {
            message.attributes.push(AddressAttribute::Label(label));
        }
        match request.execute().await {
            Err(err) if errno(&err) == Some(libc::EEXIST) => {
                tracing::debug!(vip = %vip, device = %self.target.name, "VIP already on the device");
                Ok(())
            }
            result => result.map_err(|source| {
                netlink_error(
                    format!("adding {vip}/{prefix_len} to {}", self.target.name),
                    source,
                )
            }),
        }
    }

    /// Removes exactly this address (device, address and prefix). "Not there" is success.
    async fn delete(&self, addr: &DeviceAddr) -> Result<(), AddrError> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.index = addr.ifindex;
        message.header.prefix_len = addr.prefix_len;
        message.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(addr.ip)),
            AddressAttribute::Address(IpAddr::V4(addr.ip)),
        ];
        match self.handle.address().del(message).execute().await {
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

    /// Announces `vips` on the link device with gratuitous ARP, [`GARP_COUNT`] times each: the
    /// first round before returning, the others from a background task.
    async fn gratuitous_arp(&self, vips: &[Ipv4Addr]) -> Result<(), AddrError> {
        let Some(mac) = self.link.mac else {
            tracing::debug!(device = %self.link.name, "device has no Ethernet address: no gratuitous ARP");
            return Ok(());
        };
        if vips.is_empty() {
            return Ok(());
        }
        let arp_error = |source| AddrError::Arp {
            vips: vips.to_vec(),
            device: self.link.name.clone(),
            source,
        };
        let socket = ArpSocket::open(self.link.index).map_err(arp_error)?;
        for &vip in vips {
            socket.send(&garp_frame(mac, vip)).map_err(arp_error)?;
            tracing::debug!(vip = %vip, device = %self.link.name, round = 0, "gratuitous ARP sent");
        }
        // The repeats go out in the background: waiting for them held the whole control loop
        // (data plane, status) for (GARP_COUNT - 1) * GARP_GAP = 200 ms on every new VIP.
        let (vips, device) = (vips.to_vec(), self.link.name.clone());
        tokio::spawn(async move {
            for round in 1..GARP_COUNT {
                tokio::time::sleep(GARP_GAP).await;
                for &vip in &vips {
                    if let Err(error) = socket.send(&garp_frame(mac, vip)) {
                        tracing::warn!(%error, vip = %vip, %device, round, "repeating gratuitous ARP failed");
                        return;
                    }
                    tracing::debug!(vip = %vip, %device, round, "gratuitous ARP sent");
                }
            }
        });
        Ok(())
    }
}

/// Owners as one log field: `default/a,default/b`.
fn join(owners: &BTreeSet<String>) -> String {
    owners
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn netlink_error(what: String, source: rtnetlink::Error) -> AddrError {
    AddrError::Netlink { what, source }
}

/// The positive errno of a kernel NACK.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
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
    let xlb = message.attributes.iter().any(|attr| {
        matches!(attr, AddressAttribute::Protocol(proto) if u8::from(*proto) == XLB_ADDR_PROTO)
    });
    Some(DeviceAddr {
        ip,
        prefix_len: message.header.prefix_len,
        ifindex: message.header.index,
        xlb,
    })
}

/// Next hops of `route` that leave through device `ifindex`.
fn gateways_via(route: &RouteMessage, ifindex: u32) -> Vec<Ipv4Addr> {
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
fn route_oif(route: &RouteMessage) -> Option<u32> {
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
async fn dump_routes(
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
async fn default_route_device(handle: &Handle) -> Result<u32, AddrError> {
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
enum LinkRef<'a> {
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
async fn find_link(handle: &Handle, wanted: LinkRef<'_>) -> Result<Link, AddrError> {
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
fn check_kernel() -> Result<(), AddrError> {
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

/// Ethernet type of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// Length of an Ethernet frame carrying an IPv4-over-Ethernet ARP packet (no padding; the
/// driver pads to 60 bytes).
const GARP_LEN: usize = 42;

/// A gratuitous ARP request for `vip` from `mac`: broadcast, sender and target address both
/// the VIP, target hardware address zero (RFC 5227 "ARP announcement"). Multi-byte fields are
/// big-endian, as on the wire.
fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; GARP_LEN] {
    let mut frame = [0u8; GARP_LEN];
    frame[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    frame[6..12].copy_from_slice(&mac); // source
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    frame[18] = 6; // hardware address length
    frame[19] = 4; // protocol address length
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    frame[22..28].copy_from_slice(&mac); // sender hardware address
    frame[28..32].copy_from_slice(&vip.octets()); // sender protocol address
    // 32..38: target hardware address, zero.
    frame[38..42].copy_from_slice(&vip.octets()); // target protocol address
    frame
}

/// An `AF_PACKET` raw socket bound to one device, for sending whole Ethernet frames.
struct ArpSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl ArpSocket {
    fn open(ifindex: u32) -> std::io::Result<ArpSocket> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a socket just opened by us and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ArpSocket { fd, ifindex })
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = i32::try_from(self.ifindex).map_err(std::io::Error::other)?;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: frame and addr are valid for the lengths passed, and outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn owners(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn addr(s: &str, prefix_len: u8, ifindex: u32, xlb: bool) -> DeviceAddr {
        DeviceAddr {
            ip: ip(s),
            prefix_len,
            ifindex,
            xlb,
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

    #[test]
    fn addr_vips_to_announce_keeps_everything_without_local_only() {
        let desired = DesiredVips::from([
            (ip("198.51.100.10"), owners(&["default/a", "default/b"])),
            (ip("198.51.100.11"), owners(&[])),
        ]);
        let announced = vips_to_announce(&desired, &BTreeSet::new(), false);
        assert_eq!(
            announced,
            DesiredVips::from([(ip("198.51.100.10"), owners(&["default/a", "default/b"]))]),
            "a VIP without owners is not wanted"
        );
    }

    #[test]
    fn addr_vips_to_announce_local_only_needs_a_local_endpoint() {
        let desired = DesiredVips::from([
            (ip("198.51.100.10"), owners(&["default/a", "default/b"])),
            (ip("198.51.100.11"), owners(&["default/c"])),
        ]);
        let local = owners(&["default/b"]);
        assert_eq!(
            vips_to_announce(&desired, &local, true),
            DesiredVips::from([(ip("198.51.100.10"), owners(&["default/b"]))])
        );
        assert!(vips_to_announce(&desired, &BTreeSet::new(), true).is_empty());
    }

    #[test]
    fn addr_host_network_prefix_is_the_longest_covering_one() {
        let host = HostNetwork {
            prefixes: vec![(ip("198.51.100.0"), 24), (ip("198.51.100.128"), 25)],
            vip_prefix_required: true,
            ..HostNetwork::default()
        };
        assert_eq!(
            host.covering_prefix(ip("198.51.100.10")),
            Some((ip("198.51.100.0"), 24))
        );
        assert_eq!(
            host.covering_prefix(ip("198.51.100.200")),
            Some((ip("198.51.100.128"), 25))
        );
        assert_eq!(host.covering_prefix(ip("203.0.113.1")), None);
    }

    #[test]
    fn addr_host_network_refuses_what_the_host_needs() {
        let host = HostNetwork {
            device: "eth0".to_owned(),
            prefixes: vec![(ip("198.51.100.0"), 24)],
            own_addresses: vec![ip("198.51.100.1")],
            gateways: vec![ip("198.51.100.254")],
            vip_prefix_required: true,
            ..HostNetwork::default()
        };
        assert_eq!(host.check_vip(ip("198.51.100.10")), Ok(()));
        assert_eq!(
            host.check_vip(ip("198.51.100.1")),
            Err(VipRefusal::OwnAddress)
        );
        assert_eq!(
            host.check_vip(ip("198.51.100.254")),
            Err(VipRefusal::Gateway)
        );
        assert!(matches!(
            host.check_vip(ip("198.51.100.0")),
            Err(VipRefusal::NetworkAddress { .. })
        ));
        assert!(matches!(
            host.check_vip(ip("198.51.100.255")),
            Err(VipRefusal::BroadcastAddress { .. })
        ));
        let outside = host
            .check_vip(ip("203.0.113.7"))
            .expect_err("outside the prefixes");
        assert!(outside.to_string().contains("198.51.100.0/24"), "{outside}");
        let lo_mode = HostNetwork {
            vip_prefix_required: false,
            ..host
        };
        assert_eq!(lo_mode.check_vip(ip("203.0.113.7")), Ok(()));
    }

    #[test]
    fn addr_garp_frame_is_an_arp_announcement() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        let frame = garp_frame(mac, ip("198.51.100.10"));
        let expected: [u8; GARP_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x01, 0x08,
            0x06, // Ethernet
            0, 1, 0x08, 0, 6, 4, 0, 1, // htype, ptype, hlen, plen, op = request
            0x02, 0, 0, 0, 0, 0x01, 198, 51, 100, 10, // sender
            0, 0, 0, 0, 0, 0, 198, 51, 100, 10, // target
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn addr_kernel_version_parses_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.4.0").is_some_and(|v| v < MIN_KERNEL));
    }

    #[test]
    fn addr_local_only_needs_lo_mode() {
        let config = AddrConfig {
            link_device: Some("eth0".to_owned()),
            announce: Announce::Link,
            local_only: true,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        let err = runtime.block_on(AddrManager::new(config)).err();
        assert!(matches!(err, Some(AddrError::LocalOnlyNeedsLo)), "{err:?}");
    }
}
