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
