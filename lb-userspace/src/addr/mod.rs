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
//!
//! # Layout
//! [`diff`] decides what to add, keep and remove (pure); `netlink` holds xlb's rtnetlink
//! connection and the address, device and route-dump requests; `garp` announces VIPs;
//! [`route`] looks routes toward backends up for the data plane. [`AddrManager`] ties them
//! together: adoption of what an earlier run left, reference counts, cleanup on exit.

pub mod diff;
mod garp;
mod netlink;
pub mod probe;
pub mod route;
pub mod snat;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::config::Announce;
use crate::model::{HostNetwork, VipRefusal, prefix_mask};

pub use diff::{DeviceAddr, Plan, plan};
pub use netlink::Netlink;
use netlink::{Link, LinkRef};

/// `IFA_PROTO` value that marks an address as xlb's (`0x78` is ASCII `x`). The kernel reserves
/// 0–3 for itself (unspec, loopback, router advertisement, link-local).
pub const XLB_ADDR_PROTO: u8 = 0x78;
/// `IFA_PROTO` value that marks xlb's extra SNAT addresses (`0x79`, `y`): apart from the VIPs,
/// so the VIP code leaves them alone and takes them for host addresses (never allocated).
pub const XLB_SNAT_ADDR_PROTO: u8 = 0x79;

/// The VIPs the controller wants, each with the Services (`namespace/name`) that use it: the
/// size of the set is the VIP's reference count. A VIP with an empty set is not wanted.
pub type DesiredVips = BTreeMap<Ipv4Addr, BTreeSet<String>>;

/// The addresses xlb has placed on this host (those with its mark), as `(address, prefix
/// length, device index)`: the VIPs this node announces now, for `xlb inspect vips`.
pub async fn placed() -> Result<Vec<(Ipv4Addr, u8, u32)>, AddrError> {
    let netlink = Netlink::open()?;
    Ok(netlink::addresses(netlink.handle())
        .await?
        .into_iter()
        .filter(|address| address.xlb)
        .map(|address| (address.ip, address.prefix_len, address.ifindex))
        .collect())
}

/// What the address manager needs from xlb's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrConfig {
    /// `--linkdevice` / `LINKDEVICE`; `None` picks the device of the IPv4 default route.
    pub link_device: Option<String>,
    /// `--announce` / `ANNOUNCE`.
    pub announce: Announce,
}

/// Errors of the address manager. Each message says what went wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The netlink socket could not be opened.
    #[error(
        "cannot open a netlink socket: {0}; xlb needs CAP_NET_ADMIN (run it as root or grant the capability)"
    )]
    Socket(#[source] std::io::Error),
    /// The thread that drives the netlink connection could not be started.
    #[error(
        "cannot start the thread that serves xlb's netlink connection: {0}; the process is out of threads or memory (check `ulimit -u` and the cgroup's pids.max)"
    )]
    NetlinkThread(#[source] std::io::Error),
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
    /// An extra SNAT address cannot be placed.
    #[error("--snat-addresses {ip}: {reason}")]
    SnatAddress {
        /// The address asked for.
        ip: Ipv4Addr,
        /// Why not, and what to do.
        reason: String,
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

/// Places the VIPs on the host over one rtnetlink connection ([`Netlink`]). Create it in the
/// network namespace to manage, inside a tokio runtime (gratuitous ARP repeats run as tasks).
pub struct AddrManager {
    netlink: Netlink,
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
        netlink::check_kernel()?;
        let netlink = Netlink::open()?;
        let handle = netlink.handle();
        let (link, how) = match &config.link_device {
            Some(name) => (
                netlink::find_link(handle, LinkRef::Name(name)).await?,
                "--linkdevice",
            ),
            None => {
                let index = netlink::default_route_device(handle).await?;
                (
                    netlink::find_link(handle, LinkRef::Index(index)).await?,
                    "default route",
                )
            }
        };
        let target = match config.announce {
            Announce::Link => link.clone(),
            Announce::Lo => netlink::find_link(handle, LinkRef::Name("lo")).await?,
        };
        tracing::info!(
            device = %link.name, ifindex = link.index, chosen_by = how,
            announce = ?config.announce, vip_device = %target.name,
            "link device"
        );
        Ok(AddrManager {
            netlink,
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

    /// Starts probing other LB nodes' addresses on the link device with ARP, from `own`
    /// (this node's address there); see [`probe`].
    pub fn start_prober(&self, own: Ipv4Addr) -> Result<probe::Prober, AddrError> {
        probe::Prober::start(&self.link, own)
    }

    /// Whether the link device is up and has a carrier (`IFF_UP` and `IFF_RUNNING`): a node
    /// whose link is down cannot answer for a VIP.
    pub fn link_running(&self) -> bool {
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request
            .ifr_name
            .iter_mut()
            .zip(self.link.name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *slot = byte as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `request`.
        let done = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SIOCGIFFLAGS,
                &raw mut request,
            )
        };
        if done < 0 {
            return false;
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
        flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
    }

    /// The host's view of the link device, for the reconciler: prefixes, own addresses (not
    /// xlb's), gateways.
    pub async fn host_network(&self) -> Result<HostNetwork, AddrError> {
        let present = netlink::addresses(self.netlink.handle()).await?;
        self.host_network_from(&present).await
    }

    /// Makes the host carry exactly the wanted VIPs: `desired`, each with the Services that use
    /// it (the plan has already narrowed them to what this node announces). Reads the kernel's addresses,
    /// adds what is missing, removes xlb addresses no longer wanted, leaves the rest alone
    /// (so the first call after a restart adopts without flapping), and sends gratuitous ARP
    /// for VIPs this process has not announced yet. Per-VIP failures are in the report; `Err`
    /// means the host could not be read at all.
    pub async fn sync(&mut self, desired: &DesiredVips) -> Result<SyncReport, AddrError> {
        let desired: DesiredVips = desired
            .iter()
            .filter(|(_, owners)| !owners.is_empty())
            .map(|(vip, owners)| (*vip, owners.clone()))
            .collect();
        let present = netlink::addresses(self.netlink.handle()).await?;
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
            match netlink::delete(self.netlink.handle(), addr).await {
                Ok(()) => report.removed.push(addr.ip),
                Err(err) => report.failed.push(err),
            }
        }
        for &(vip, len) in &plan.add {
            let owners = desired.get(&vip).map(join).unwrap_or_default();
            tracing::info!(vip = %vip, prefix_len = len, device = %self.target.name, owners = %owners, "adding VIP");
            match netlink::add(self.netlink.handle(), &self.target, vip, len).await {
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
            match garp::announce(&self.link, &fresh) {
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
        let present = netlink::addresses(self.netlink.handle()).await?;
        let mut removed = 0;
        let mut first_error = None;
        for addr in present.iter().filter(|a| a.xlb) {
            match netlink::delete(self.netlink.handle(), addr).await {
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

    async fn host_network_from(&self, present: &[DeviceAddr]) -> Result<HostNetwork, AddrError> {
        let routes =
            netlink::dump_routes(self.netlink.handle(), None, Some(self.link.index)).await?;
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
            .flat_map(|route| netlink::gateways_via(route, self.link.index))
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
}

/// Owners as one log field: `default/a,default/b`.
fn join(owners: &BTreeSet<String>) -> String {
    owners
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address written in a test; also used by the submodules' tests.
    pub(super) fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
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
}
