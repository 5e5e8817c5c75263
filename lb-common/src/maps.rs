//! Map names, keys and values shared by the XDP program and userspace.
//!
//! Byte order: IPv4 addresses are `[u8; 4]` in network order (as on the wire, so `bpftool`
//! prints them as dotted bytes); ports and other integers are in **host** byte order, so
//! `bpftool map dump` prints them readably. The program swaps ports once per packet.

/// Services: hash [`ServiceKey`] → [`ServiceValue`]. Written by userspace only (the program
/// bumps [`ServiceValue::rr_cursor`]).
pub const SERVICES_MAP: &str = "XLB_SERVICES";
/// Backends: hash [`BackendKey`] → [`BackendValue`]. Written by userspace only.
pub const BACKENDS_MAP: &str = "XLB_BACKENDS";
/// VIP set: hash `[u8; 4]` (VIP, network order) → [`VipValue`]. Lets the program tell
/// malformed packets to a VIP (dropped) from other traffic (passed).
pub const VIPS_MAP: &str = "XLB_VIPS";
/// Forward conntrack: LRU hash [`FlowKey`] (client → VIP tuple) → [`CtEntry`].
pub const CT_FWD_MAP: &str = "XLB_CT_FWD";
/// Reverse conntrack: LRU hash [`FlowKey`] (backend → SNAT tuple) → [`CtEntry`].
pub const CT_REV_MAP: &str = "XLB_CT_REV";
/// Half-open conntrack: LRU hash [`FlowKey`] → [`CtEntry`] holding *both* directions of each
/// flow that has not completed its handshake yet (TCP: no ACK from the client after the
/// backend's SYN-ACK; UDP: the client has not sent again after a reply). [`CtEntry::dir`] says
/// which direction an entry is. Kept apart from the open flows so a SYN flood can only push
/// out other half-open flows, never an established one.
pub const CT_HALF_MAP: &str = "XLB_CT_HALF";
/// Each attached device's own MAC: array of [`DeviceMac`] indexed by
/// `ifindex % MAX_DEVICE_MACS`. A frame whose destination MAC is not the receiving device's
/// is never translated. Written by userspace when it attaches.
pub const DEV_MACS_MAP: &str = "XLB_DEV_MACS";
/// Service ports: array of [`SERVICE_PORT_WORDS`] `u64`, bit `port % 64` of word `port / 64`
/// set when some service listens on `port` (any VIP, any protocol). A packet to a port in the
/// SNAT range that is also a service's port tries the forward conntrack map before the
/// reverse one (it is likelier a client's than a backend's reply). Written by userspace.
pub const SERVICE_PORTS_MAP: &str = "XLB_SERVICE_PORTS";
/// Words of [`SERVICE_PORTS_MAP`]: one bit per port.
pub const SERVICE_PORT_WORDS: u32 = 65_536 / 64;
/// Devices that can take frames from native XDP (`XDP_TX`/`XDP_REDIRECT`): a `DEVMAP_HASH`
/// keyed by ifindex (value: the same ifindex). A translated packet whose egress device is missing here is passed to the kernel.
pub const XMIT_MAP: &str = "XLB_XMIT";

/// Where new flows toward each backend go: hash of backend address (network order) →
/// [`NextHop`], written by userspace from the kernel's route and neighbour tables so that a new
/// flow needs no FIB lookup. A backend without a current entry falls back to the FIB lookup.
pub const NEXT_HOPS_MAP: &str = "XLB_NEXT_HOPS";
/// The program's load-time constant holding the [`SnatPorts`] range (`.rodata`, set by the
/// loader with `EbpfLoader::set_global`).
pub const SNAT_PORTS_GLOBAL: &str = "XLB_SNAT_PORTS";

/// Extra SNAT source addresses: hash `[u8; 4]` (the LB's own address a route toward a backend
/// gives as source, network order) → [`SnatAddrs`]. A new flow probes its SNAT port
/// candidates across that address and these. Written by userspace (`--snat-addresses`).
pub const SNAT_ADDRS_MAP: &str = "XLB_SNAT_ADDRS";

/// The new-flow programs of the XDP hooks (`PROG_ARRAY`, slots [`NEW_FLOW_SLOT_NATIVE`] and
/// [`NEW_FLOW_SLOT_GENERIC`]): a packet that starts a flow is tail-called from the main program
/// into the new-flow program of its hook, so the two are verified apart, each within the
/// verifier's budget. Written by userspace at start; pinned, so new flows keep working while
/// no xlb runs.
pub const NEW_FLOW_XDP_MAP: &str = "XLB_NEW_FLOW_XDP";
/// The same for TC (slot 0): a `PROG_ARRAY` holds programs of one type only.
pub const NEW_FLOW_TC_MAP: &str = "XLB_NEW_FLOW_TC";
/// Slot of the native XDP new-flow program in [`NEW_FLOW_XDP_MAP`].
pub const NEW_FLOW_SLOT_NATIVE: u32 = 0;
/// Slot of the generic XDP new-flow program in [`NEW_FLOW_XDP_MAP`].
pub const NEW_FLOW_SLOT_GENERIC: u32 = 1;

/// Every map the program defines, for pinning and `xlb inspect`.
pub const ALL_MAPS: [&str; 15] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    VIPS_MAP,
    SERVICE_PORTS_MAP,
    CT_FWD_MAP,
    CT_REV_MAP,
    CT_HALF_MAP,
    DEV_MACS_MAP,
    XMIT_MAP,
    NEXT_HOPS_MAP,
    SNAT_ADDRS_MAP,
    NEW_FLOW_XDP_MAP,
    NEW_FLOW_TC_MAP,
    crate::STATS_MAP,
    crate::SVC_STATS_MAP,
];

/// Maximum number of services (service ids are `0..MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 4096;
/// Maximum backends per service (slots are `0..MAX_BACKENDS_PER_SERVICE`).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 1024;
/// Total backend entries.
pub const MAX_BACKENDS: u32 = 65536;
/// Entries in each conntrack map (LRU: the least recently used flow is evicted when full).
pub const MAX_FLOWS: u32 = 262_144;
/// Entries in the half-open map (two per flow, so 131,072 half-open flows: a UDP exchange
/// stays half-open for its 30 s, and 2,700 exchanges a second toward one backend are 81,000
/// flows). When it is full the least recently used half-open entries go first; open flows
/// live in the other two maps.
pub const MAX_HALF_OPEN_ENTRIES: u32 = 262_144;
/// Slots in [`DEV_MACS_MAP`] (a power of two).
pub const MAX_DEVICE_MACS: u32 = 1024;
/// Entries in [`SNAT_ADDRS_MAP`] (own source addresses that have extra SNAT addresses).
pub const MAX_SNAT_SOURCES: u32 = 64;
/// Extra SNAT addresses per own source address (so 8 SNAT addresses in all).
pub const MAX_SNAT_EXTRA: usize = 7;

/// Entries in the xmit devmap (a `DEVMAP_HASH` keyed by ifindex).
pub const MAX_XMIT_DEVICES: u32 = 256;

/// IANA protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Key of [`SERVICES_MAP`]: `VIP:port/protocol`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Virtual IP, network byte order.
    pub vip: [u8; 4],
    /// Port, host byte order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// Value of [`SERVICES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id of the service: key of its backends and of its counters.
    pub id: u32,
    /// Number of backend slots in use (`0..backend_count`); 0 means new flows pass to the kernel.
    pub backend_count: u32,
    /// Round-robin cursor, incremented by the program for every new flow; userspace
    /// writes 0 when it rewrites the value.
    pub rr_cursor: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// Key of [`BACKENDS_MAP`]: `(service id, slot)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// [`ServiceValue::id`].
    pub service_id: u32,
    /// Slot, `0..backend_count`.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// Value of [`BACKENDS_MAP`]: where new flows go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    /// Backend address, network byte order.
    pub ip: [u8; 4],
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 8);

/// Value of [`NEXT_HOPS_MAP`]: the route toward one backend, resolved down to the MACs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `CLOCK_MONOTONIC` ns when userspace last found this current. The program ignores an
    /// entry older than [`NEXT_HOP_MAX_AGE_NS`] (userspace stopped, or the neighbour is gone)
    /// and asks the FIB instead.
    pub confirmed_ns: u64,
    /// Egress device.
    pub ifindex: u32,
    /// The LB's source address toward the backend (the SNAT address), network order.
    pub src: [u8; 4],
    /// The egress device's MAC.
    pub smac: [u8; 6],
    /// The next hop's MAC (the backend's, or its gateway's).
    pub dmac: [u8; 6],
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

/// Age past which a [`NextHop`] is stale. Userspace confirms every entry each second
/// (`NEXT_HOP_REFRESH`), so a stale one means it stopped or lost the neighbour.
pub const NEXT_HOP_MAX_AGE_NS: u64 = 5 * 1_000_000_000;

/// Value of [`VIPS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Number of services on this VIP.
    pub services: u32,
}
const _: () = assert!(core::mem::size_of::<VipValue>() == 4);

/// Key of both conntrack maps: the 5-tuple of a packet as it arrives at the LB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub src_ip: [u8; 4],
    /// Destination address, network byte order.
    pub dst_ip: [u8; 4],
    /// Source port, host byte order.
    pub src_port: u16,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Value of [`DEV_MACS_MAP`]: the MAC of the device with `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceMac {
    /// The device's ifindex (0: slot unused). Checked, since the slot is `ifindex % N`.
    pub ifindex: u32,
    /// Its MAC address.
    pub mac: [u8; 6],
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<DeviceMac>() == 16);

/// Value of [`SNAT_ADDRS_MAP`]: the extra SNAT addresses that go with an own source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatAddrs {
    /// How many of [`Self::addrs`] are in use, `0..=MAX_SNAT_EXTRA`.
    pub count: u32,
    /// The addresses, network byte order; on the same device and prefix as the key.
    pub addrs: [[u8; 4]; MAX_SNAT_EXTRA],
}
const _: () = assert!(core::mem::size_of::<SnatAddrs>() == 32);

/// [`CtEntry::state`]: TCP flow open (or UDP flow active).
pub const CT_STATE_OPEN: u32 = 0;
/// [`CtEntry::state`]: the client sent the first FIN, or either side a RST: the backend keeps
/// no TIME_WAIT for the flow's tuple.
pub const CT_STATE_CLOSING: u32 = 1;
/// [`CtEntry::state`]: the backend sent the first FIN, so it holds the `SNAT:port → backend`
/// tuple in TIME_WAIT (60 s on Linux) and could refuse a new flow on the same SNAT port with a
/// bare ACK until then; the entry (and the port) is kept as long as that TIME_WAIT and no
/// longer ([`CT_TIMEOUT_TCP_TIME_WAIT_NS`]).
pub const CT_STATE_TIME_WAIT: u32 = 2;

/// [`CtEntry::state`] of a half-open flow ([`CT_HALF_MAP`]): TCP SYN forwarded, no SYN-ACK from
/// the backend yet; UDP: first datagram forwarded, no reply yet.
pub const CT_STATE_HALF_OPEN: u32 = 3;
/// [`CtEntry::state`] of a half-open flow whose backend has answered (TCP SYN-ACK, UDP reply);
/// the client's next packet (TCP: an ACK without SYN) makes it open.
pub const CT_STATE_HALF_OPEN_REPLIED: u32 = 4;

/// [`CtEntry::state`]: the client sent the first FIN and the backend its FIN after it: the
/// backend's socket closes on the client's last ACK, without TIME_WAIT (the client keeps it,
/// on its own tuple), so the SNAT port may serve a new flow after
/// [`CT_TIMEOUT_TCP_CLOSED_NS`].
pub const CT_STATE_CLOSED: u32 = 5;
/// [`CtEntry::state`]: [`CT_STATE_CLOSED`] and the client has since sent a bare ACK (no SYN,
/// FIN or RST), taken as its last ACK: the backend's socket is gone once that ACK reaches it,
/// so the SNAT port goes to the next new flow that probes it, at once. The entries still
/// translate (a retransmitted FIN and its answer) for [`CT_TIMEOUT_TCP_CLOSED_NS`] unless the
/// port is taken over. Should that ACK be lost after the LB, or have been an earlier ACK
/// overtaken by the backend's FIN, the backend, still in LAST_ACK, answers the new flow's SYN
/// with a challenge ACK (or retransmits its FIN to it); the new client, in SYN_SENT, answers
/// that with a RST, which ends the stale LAST_ACK socket (its sequence number is the one the
/// backend expects), and sends its SYN again after 1 s. No reset reaches any application: the
/// new connection takes a second longer.
pub const CT_STATE_CLOSED_ACKED: u32 = 6;

/// Idle timeout of a TCP flow in [`CT_STATE_CLOSED`] or [`CT_STATE_CLOSED_ACKED`]: 2 s, time for the client's last ACK
/// and, if it is lost, the backend's FIN retransmissions (from 200 ms on) and their answers.
pub const CT_TIMEOUT_TCP_CLOSED_NS: u64 = 2 * 1_000_000_000;

/// [`CtEntry::dir`]: the entry translates client → VIP packets (forward).
pub const CT_DIR_FORWARD: u8 = 0;
/// [`CtEntry::dir`]: the entry translates backend → SNAT packets (reverse).
pub const CT_DIR_REVERSE: u8 = 1;

/// Idle timeout of a half-open TCP flow: 5 s. Long enough for a client's SYN retransmissions
/// at 1 s and 3 s (Linux's initial RTO is 1 s) and for any backend's SYN-ACK; short, because
/// a half-open flow costs a SNAT port and spoofed SYNs never complete. (Linux conntrack keeps
/// SYN_SENT 120 s but drops such unassured entries first when its table is full; here they
/// live in their own table and also give their port up early, see
/// [`CT_HALF_OPEN_RECLAIM_NS`].)
pub const CT_TIMEOUT_HALF_OPEN_NS: u64 = 5 * 1_000_000_000;
/// Idle timeout of a UDP flow whose traffic has not gone both ways more than once (a
/// datagram, or a query and its answer): 30 s, Linux's `nf_conntrack_udp_timeout`.
pub const CT_TIMEOUT_UDP_HALF_OPEN_NS: u64 = 30 * 1_000_000_000;
/// A half-open TCP flow idle this long gives its SNAT port to a new flow that needs it (an
/// "early drop"): a client that has heard nothing for 1 s retransmits its SYN anyway.
pub const CT_HALF_OPEN_RECLAIM_NS: u64 = 1_000_000_000;

/// Under pressure (every SNAT port a new flow probes is held), the longest idle of the
/// half-open TCP flows holding them gives its port up if idle at least this long: 100 ms,
/// far more than a backend on the LB's network takes to answer a SYN, so a flood cannot keep
/// every port; a legitimate client slower than that to send its ACK may lose its attempt
/// while a flood lasts (its ACK then finds no flow).
pub const CT_HALF_OPEN_MIN_RECLAIM_NS: u64 = 100_000_000;

/// Idle timeout of an open TCP flow.
pub const CT_TIMEOUT_TCP_OPEN_NS: u64 = 3600 * 1_000_000_000;
/// Idle timeout of a TCP flow in [`CT_STATE_CLOSING`].
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
/// Idle timeout of a TCP flow in [`CT_STATE_TIME_WAIT`]: 60 s, Linux's `TCP_TIMEWAIT_LEN`,
/// how long the backend's socket holds the tuple after it closed first. (Linux conntrack keeps
/// such flows 120 s, longer than any Linux peer needs; here each costs a SNAT port.)
pub const CT_TIMEOUT_TCP_TIME_WAIT_NS: u64 = 60 * 1_000_000_000;
/// Idle timeout of an open UDP flow, one whose traffic has gone both ways more than once (a
/// stream): 120 s, Linux's `nf_conntrack_udp_timeout_stream`. A query and its answer stay
/// half-open, [`CT_TIMEOUT_UDP_HALF_OPEN_NS`].
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
/// The program refreshes [`CtEntry::last_seen_ns`] and the cached forwarding result at most
/// this often per flow, so established packets rarely write to shared memory.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Idle timeout for a flow of protocol `proto` in state `state`.
#[inline(always)]
pub const fn ct_timeout_ns(proto: u8, state: u32) -> u64 {
    let half_open = state == CT_STATE_HALF_OPEN || state == CT_STATE_HALF_OPEN_REPLIED;
    if proto == IPPROTO_UDP {
        if half_open {
            CT_TIMEOUT_UDP_HALF_OPEN_NS
        } else {
            CT_TIMEOUT_UDP_NS
        }
    } else if half_open {
        CT_TIMEOUT_HALF_OPEN_NS
    } else if state == CT_STATE_CLOSING {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else if state == CT_STATE_CLOSED || state == CT_STATE_CLOSED_ACKED {
        CT_TIMEOUT_TCP_CLOSED_NS
    } else if state == CT_STATE_TIME_WAIT {
        CT_TIMEOUT_TCP_TIME_WAIT_NS
    } else {
        CT_TIMEOUT_TCP_OPEN_NS
    }
}

/// Value of both conntrack maps: how to rewrite a packet of the flow, and where it went last.
///
/// Forward entries rewrite `client→VIP` into `SNAT→backend`; reverse entries rewrite
/// `backend→SNAT` into `VIP→client`. The peer entry's key is always
/// `(nat_dst_ip, nat_src_ip, nat_dst_port, nat_src_port, proto)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// New source address, network byte order.
    pub nat_src_ip: [u8; 4],
    /// New destination address, network byte order.
    pub nat_dst_ip: [u8; 4],
    /// New source port, host byte order.
    pub nat_src_port: u16,
    /// New destination port, host byte order.
    pub nat_dst_port: u16,
    /// Service the flow belongs to (for per-service counters).
    pub service_id: u32,
    /// [`CT_STATE_OPEN`], [`CT_STATE_CLOSING`], [`CT_STATE_CLOSED`],
    /// [`CT_STATE_CLOSED_ACKED`] or [`CT_STATE_TIME_WAIT`] in the open maps;
    /// [`CT_STATE_HALF_OPEN`] or [`CT_STATE_HALF_OPEN_REPLIED`] in [`CT_HALF_MAP`].
    pub state: u32,
    /// Cached egress ifindex from the last FIB lookup; 0 when none is cached.
    pub ifindex: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the flow was last refreshed.
    pub last_seen_ns: u64,
    /// Cached source MAC for the egress device.
    pub smac: [u8; 6],
    /// Cached destination MAC (next hop).
    pub dmac: [u8; 6],
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REVERSE`].
    pub dir: u8,
    pub _pad: [u8; 3],
    /// What the rewrite does to a packet's checksums, computed when the entry is made
    /// ([`CtEntry::with_sums`]).
    pub sums: RewriteSums,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 56);

/// How rewriting a packet of a flow key to its entry's tuple changes the packet's checksums:
/// RFC 1624 deltas, folded (see [`crate::csum`]). They are the same for every packet of the
/// entry, since the key fixes the addresses and ports before the rewrite and the entry those
/// after it, so they are summed once when the entry is made rather than per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewriteSums {
    /// Delta of the two addresses: the IPv4 header's checksum and the L4 pseudo-header's.
    pub addrs: u16,
    /// Delta of the two ports.
    pub ports: u16,
    /// The key's pseudo-header sum without the length, folded: what tells a
    /// `CHECKSUM_PARTIAL` field ([`crate::csum::is_partial`]).
    pub pseudo: u16,
}
const _: () = assert!(core::mem::size_of::<RewriteSums>() == 6);

impl RewriteSums {
    /// The sums of rewriting a packet of `key` to `entry`'s tuple.
    #[inline(always)]
    pub const fn of(key: &FlowKey, entry: &CtEntry) -> Self {
        use crate::csum::{delta2, delta4, fold, pseudo_header_sum};
        RewriteSums {
            addrs: fold(
                delta4(key.src_ip, entry.nat_src_ip) + delta4(key.dst_ip, entry.nat_dst_ip),
            ),
            ports: fold(
                delta2(key.src_port.to_be_bytes(), entry.nat_src_port.to_be_bytes())
                    + delta2(key.dst_port.to_be_bytes(), entry.nat_dst_port.to_be_bytes()),
            ),
            pseudo: fold(pseudo_header_sum(key.src_ip, key.dst_ip, key.proto, 0)),
        }
    }

    /// These sums for a key whose destination port is `port` where it was `was` (host order),
    /// all else alike: the next SNAT candidate's, from the last one's, at a few instructions
    /// where [`RewriteSums::of`] takes about a hundred.
    #[inline(always)]
    pub const fn at_dst_port(self, was: u16, port: u16) -> Self {
        use crate::csum::{delta2, fold};
        // The key's port is the old value of its term: `~was + new` becomes `~port + new`.
        RewriteSums {
            ports: fold(self.ports as u32 + delta2(port.to_be_bytes(), was.to_be_bytes())),
            ..self
        }
    }
}

impl CtEntry {
    /// Whether `peer` (found at the peer key of an entry stored at `key`) points back to `key`:
    /// the two are one flow's two directions.
    #[inline(always)]
    pub fn is_peer_of(key: &FlowKey, peer: &CtEntry) -> bool {
        peer.nat_dst_ip == key.src_ip
            && peer.nat_src_ip == key.dst_ip
            && peer.nat_dst_port == key.src_port
            && peer.nat_src_port == key.dst_port
    }

    /// This entry stored at `key`, with the [`RewriteSums`] of that key filled in.
    #[inline(always)]
    pub const fn with_sums(mut self, key: &FlowKey) -> Self {
        self.sums = RewriteSums::of(key, &self);
        self
    }

    /// Key of the peer entry (the other direction of the same flow).
    #[inline(always)]
    pub const fn peer_key(&self, proto: u8) -> FlowKey {
        FlowKey {
            src_ip: self.nat_dst_ip,
            dst_ip: self.nat_src_ip,
            src_port: self.nat_dst_port,
            dst_port: self.nat_src_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// The SNAT port range: ports `first..first + count` of every SNAT address toward every
/// backend. Set at start (`--snat-ports`) and handed to the program as load-time constants;
/// userspace reserves it with `net.ipv4.ip_local_reserved_ports` so the LB host's own
/// connections (the proxy fallback's among them) never pick a port a translated flow may hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPorts {
    /// First port, host order.
    pub first: u16,
    pub _pad: u16,
    /// Number of ports, at least [`SNAT_PORTS_MIN_COUNT`]; `first + count - 1 <= 65535`.
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<SnatPorts>() == 8);

/// Default SNAT range: 1024-32767 (31,744 ports). Every unprivileged port below Linux's
/// default ephemeral range (`ip_local_port_range = 32768 60999`), so the kernel keeps all its
/// ephemeral ports and nothing listens by accident on a port the host picked itself.
pub const SNAT_PORTS_DEFAULT: SnatPorts = SnatPorts {
    first: 1024,
    _pad: 0,
    count: 31_744,
};
/// Fewest ports a SNAT range may have: far more than the probes, so they can spread.
pub const SNAT_PORTS_MIN_COUNT: u32 = 1024;

/// How many candidate SNAT ports a new flow probes before giving up (and passing the packet).
/// With probes spread as by [`snat_port`], all of them are taken with probability about
/// `occupancy^16`: one new flow in 65,536 with half the range in use toward one backend.
pub const SNAT_PROBES: u32 = 16;
/// After this many held candidates, the next one held by a half-open flow ends a new TCP flow's
/// probing: the longest idle half-open flow it saw then gives way if it has been idle
/// [`CT_HALF_OPEN_MIN_RECLAIM_NS`] (an early drop), and the new flow is refused otherwise.
/// Under a SYN flood every candidate is held alike and each probe is a cache-cold lookup:
/// probing all [`SNAT_PROBES`] took a new flow 5.1 µs against 2.9 µs (`bench_xdp`, full
/// tables). Probing may end sooner: [`SNAT_PROBES_BEFORE_IDLE_EARLY_DROP`].
pub const SNAT_PROBES_BEFORE_EARLY_DROP: u32 = 4;
/// After this many held candidates, sooner, probing ends when the longest idle half-open TCP
/// flow seen may already give way (idle [`CT_HALF_OPEN_MIN_RECLAIM_NS`]): under a sustained
/// flood the holders are that old, and two cache-cold probes fewer took a new flow into full
/// tables 1.9-2.0 µs against 2.3-2.4 (`bench_xdp`). While only young flows are seen, probing
/// goes on as before, so a burst of legitimate SYNs is not refused for want of two ports.
pub const SNAT_PROBES_BEFORE_IDLE_EARLY_DROP: u32 = 2;

impl SnatPorts {
    /// The range `first..=last`; `None` when it is empty, holds fewer than
    /// [`SNAT_PORTS_MIN_COUNT`] ports, or starts at port 0.
    pub const fn new(first: u16, last: u16) -> Option<SnatPorts> {
        if first == 0 || last < first || (last - first) as u32 + 1 < SNAT_PORTS_MIN_COUNT {
            return None;
        }
        Some(SnatPorts {
            first,
            _pad: 0,
            count: (last - first) as u32 + 1,
        })
    }

    /// Last port of the range.
    pub const fn last(self) -> u16 {
        (self.first as u32 + self.count - 1) as u16
    }

    /// Whether `port` (host order) lies in the range.
    #[inline(always)]
    pub const fn contains(self, port: u16) -> bool {
        (port.wrapping_sub(self.first) as u32) < self.count
    }
}

/// The `attempt`-th (`0..SNAT_PROBES`) SNAT port candidate in `ports` for a flow whose hash is
/// `hash` (see [`crate::flow_hash`]). Double hashing: the first candidate and the distance
/// between candidates come from different bits of the hash. The distance lies in
/// `1..=(count - 1) / (SNAT_PROBES - 1)`, so `attempt * distance < count` and no candidate
/// repeats within the probes whatever the range's size (no power of two needed). A fixed
/// distance would be linear probing in disguise: flows whose sequences overlap pile up into
/// runs, and a burst of a few thousand connections to one backend exhausts the probes of some
/// new flow long before the range is full.
#[inline(always)]
pub const fn snat_port(ports: SnatPorts, hash: u32, attempt: u32) -> u16 {
    let count = ports.count;
    // Multiply-shift: the hash scaled to 0..count without a division.
    let base = ((hash as u64 * count as u64) >> 32) as u32;
    let max_step = (count - 1) / (SNAT_PROBES - 1);
    let step = 1 + ((hash.rotate_left(16) as u64 * max_step as u64) >> 32) as u32;
    let mut offset = base + attempt * step;
    if offset >= count {
        offset -= count;
    }
    ports.first.wrapping_add(offset as u16)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these are #[repr(C)], Copy, made of integers and byte arrays with padding
    // written out, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::ServiceStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DeviceMac {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SnatPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SnatAddrs {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    /// The kernel reads these structs byte for byte: every field must sit where the BPF side
    /// and `bpftool` expect it, with no implicit padding.
    #[test]
    fn map_types_have_the_documented_layout() {
        assert_eq!(
            (
                offset_of!(ServiceKey, vip),
                offset_of!(ServiceKey, port),
                offset_of!(ServiceKey, proto)
            ),
            (0, 4, 6)
        );
        assert_eq!(
            (
                offset_of!(ServiceValue, id),
                offset_of!(ServiceValue, backend_count),
                offset_of!(ServiceValue, rr_cursor)
            ),
            (0, 4, 8)
        );
        assert_eq!(
            (
                offset_of!(BackendKey, service_id),
                offset_of!(BackendKey, slot)
            ),
            (0, 4)
        );
        assert_eq!(
            (offset_of!(BackendValue, ip), offset_of!(BackendValue, port)),
            (0, 4)
        );
        assert_eq!(
            (
                offset_of!(FlowKey, src_ip),
                offset_of!(FlowKey, dst_ip),
                offset_of!(FlowKey, src_port),
                offset_of!(FlowKey, dst_port),
                offset_of!(FlowKey, proto),
            ),
            (0, 4, 8, 10, 12)
        );
        assert_eq!(
            (
                offset_of!(CtEntry, nat_src_ip),
                offset_of!(CtEntry, nat_src_port),
                offset_of!(CtEntry, service_id),
                offset_of!(CtEntry, last_seen_ns),
                offset_of!(CtEntry, smac),
                offset_of!(CtEntry, dmac),
            ),
            (0, 8, 12, 24, 32, 38)
        );
    }
}
