//! Plain data describing what xlb should serve: no I/O here.
//!
//! `reconcile` turns cluster state into these types; the data plane, the address manager and
//! the status writer consume them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

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

/// A `(port, protocol)` pair a Service asks for on its IP: the unit of port-aware sharing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// `namespace/name` of a namespaced object (a Service or an EndpointSlice).
///
/// Orders by namespace, then name, which is the order reconcile visits objects in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// The key of a Service: its namespace and name. Displays as `namespace/name`.
pub type ServiceKey = ObjectKey;

impl ObjectKey {
    /// A key from a namespace and a name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a namespaced object, or `None` when its metadata lacks a name. A missing
    /// namespace means `default`, as `kubectl apply` of a manifest without one does.
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_deref().filter(|name| !name.is_empty())?;
        let namespace = meta
            .namespace
            .as_deref()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or("default");
        Some(Self::new(namespace, name))
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Checks an object's namespace and name as the API server validates them: a namespace is a
/// DNS-1123 label, a Service name a DNS-1035 label (it becomes a DNS name), other names DNS-1123
/// subdomains. The error says which rule is broken, with the value escaped.
pub fn check_object_name(kind: &str, namespace: Option<&str>, name: &str) -> Result<(), String> {
    if let Some(namespace) = namespace
        && !is_dns1123_label(namespace)
    {
        return Err(format!(
            "namespace {:?} of {kind} {:?} is invalid: it must be at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit",
            escape(namespace),
            escape(name)
        ));
    }
    let valid = if kind == "Service" {
        is_dns1123_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
    } else {
        name.len() <= 253 && name.split('.').all(is_dns1123_label)
    };
    if valid {
        return Ok(());
    }
    let rule = if kind == "Service" {
        "at most 63 lowercase letters, digits or '-', starting with a letter and ending with a letter or digit"
    } else {
        "at most 253 characters of dot-separated parts, each lowercase letters, digits or '-', starting and ending with a letter or digit"
    };
    Err(format!(
        "{kind} name {:?} is invalid: it must be {rule}",
        escape(name)
    ))
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
fn is_dns1123_label(text: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !text.is_empty()
        && text.len() <= 63
        && text.chars().all(|c| alnum(c) || c == '-')
        && text.starts_with(alnum)
        && text.ends_with(alnum)
}

/// Everything reconcile looks at from the cluster: the Services, EndpointSlices and Nodes as
/// the API server (or the manifest directory) has them.
///
/// Keyed by `namespace/name` (Nodes, being cluster-scoped, by name) in `BTreeMap`s so that
/// every walk over the state is in one deterministic order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ServiceKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
}

impl ClusterState {
    /// Adds or replaces a Service. Returns `false` (and changes nothing) when it has no name.
    pub fn upsert_service(&mut self, service: Service) -> bool {
        let Some(key) = ObjectKey::of(&service.metadata) else {
            return false;
        };
        self.services.insert(key, service);
        true
    }

    /// Adds or replaces an EndpointSlice. Returns `false` (and changes nothing) when it has
    /// no name.
    pub fn upsert_endpoint_slice(&mut self, slice: EndpointSlice) -> bool {
        let Some(key) = ObjectKey::of(&slice.metadata) else {
            return false;
        };
        self.endpoint_slices.insert(key, slice);
        true
    }

    /// Adds or replaces a Node. Returns `false` (and changes nothing) when it has no name.
    pub fn upsert_node(&mut self, node: Node) -> bool {
        let Some(name) = node.metadata.name.clone().filter(|name| !name.is_empty()) else {
            return false;
        };
        self.nodes.insert(name, node);
        true
    }
}

/// The IP a Service holds and the ports it holds on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The `(port, protocol)` pairs the Service occupies on `ip`.
    pub ports: BTreeSet<PortKey>,
}

/// Which IP each Service holds: the output of one reconcile and the input of the next.
///
/// After a restart the previous allocations are empty; reconcile then adopts the IPs recorded
/// in the Services' `status.loadBalancer.ingress` (see [`recorded_ingress_ip`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub by_service: BTreeMap<ServiceKey, Allocation>,
    /// Which LB node announced each VIP (several LB nodes, `--announce link`), so the next
    /// run can tell a Service when that changes.
    pub announcers: BTreeMap<Ipv4Addr, String>,
}

impl Allocations {
    /// The IP `service` holds, if any.
    pub fn ip_of(&self, service: &ServiceKey) -> Option<Ipv4Addr> {
        self.by_service.get(service).map(|allocation| allocation.ip)
    }
}

/// The first IPv4 address recorded in a Service's `status.loadBalancer.ingress`, which is
/// where xlb keeps its allocations across restarts.
pub fn recorded_ingress_ip(service: &Service) -> Option<Ipv4Addr> {
    service
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|ingress| ingress.ip.as_deref()?.parse().ok())
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
    /// The longest prefix of the device that contains `ip`, as `(network address, length)`: the
    /// prefix `ip addr add` would need.
    pub fn covering_prefix(&self, ip: Ipv4Addr) -> Option<(Ipv4Addr, u8)> {
        self.prefixes
            .iter()
            .copied()
            .filter(|&(net, len)| prefix_contains(net, len, ip))
            .max_by_key(|&(_, len)| len)
            .map(|(address, len)| (network(address, len), len))
    }

    /// Whether `ip` may be a VIP on this host: not the host's own address, not a gateway, not
    /// the network or broadcast address of a prefix of the device, and (when
    /// `vip_prefix_required`) inside one of its prefixes.
    pub fn check_vip(&self, ip: Ipv4Addr) -> Result<(), VipRefusal> {
        self.check_vip_requiring(ip, self.vip_prefix_required)
    }

    /// [`Self::check_vip`] with the prefix requirement given: the one rule for "may this address
    /// be a VIP here", which IPAM applies before the address manager sees the device.
    pub fn check_vip_requiring(
        &self,
        ip: Ipv4Addr,
        prefix_required: bool,
    ) -> Result<(), VipRefusal> {
        if self.own_addresses.contains(&ip) {
            return Err(VipRefusal::OwnAddress);
        }
        if self.gateways.contains(&ip) {
            return Err(VipRefusal::Gateway);
        }
        for &(address, len) in &self.prefixes {
            // /31 and /32 have no network or broadcast address (RFC 3021).
            if len > 30 || !prefix_contains(address, len, ip) {
                continue;
            }
            let prefix = (network(address, len), len);
            if ip == prefix.0 {
                return Err(VipRefusal::NetworkAddress { prefix });
            }
            if ip == broadcast(address, len) {
                return Err(VipRefusal::BroadcastAddress { prefix });
            }
        }
        if prefix_required && self.covering_prefix(ip).is_none() {
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

/// The network address of `ip/len` (`len` above 32 is taken as 32).
pub fn network(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & prefix_mask(len.min(32)).unwrap_or(u32::MAX))
}

/// The broadcast address of `ip/len` (`len` above 32 is taken as 32).
pub fn broadcast(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) | !prefix_mask(len.min(32)).unwrap_or(u32::MAX))
}

/// `record` with control characters escaped; a final newline stays.
pub fn escape_record(record: &[u8]) -> Vec<u8> {
    let (body, end) = match record.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (record, &b""[..]),
    };
    let mut out = Vec::with_capacity(record.len());
    for &byte in body {
        match byte {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b'\t'),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{byte:02x}").as_bytes()),
            _ => out.push(byte),
        }
    }
    out.extend_from_slice(end);
    out
}

/// `text` with control characters escaped, for strings from outside printed other than
/// through the log (error messages on stdout).
pub fn escape(text: &str) -> String {
    String::from_utf8_lossy(&escape_record(text.as_bytes())).into_owned()
}
