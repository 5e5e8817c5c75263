//! Per-CPU packet counters.
//!
//! [`STATS_MAP`] is a `BPF_MAP_TYPE_PERCPU_ARRAY` of `u64` with [`STAT_COUNT`] entries indexed
//! by the `STAT_*` constants; userspace sums the per-CPU values. Every packet bumps
//! [`STAT_TOTAL`], exactly one verdict counter (`STAT_PASS`, `STAT_DROP`, `STAT_TX`,
//! `STAT_REDIRECT`, `STAT_ABORTED`) and at least one reason counter saying which path it took.
//!
//! [`SVC_STATS_MAP`] holds [`ServiceStats`] per service id, also per CPU.

/// Name of the global per-CPU counter array (kernel map names are at most 15 bytes).
pub const STATS_MAP: &str = "XLB_STATS";
/// Name of the per-service per-CPU counter array, indexed by service id.
pub const SVC_STATS_MAP: &str = "XLB_SVC_STATS";

/// Every packet the program saw.
pub const STAT_TOTAL: u32 = 0;
/// Verdict `XDP_PASS`: handed to the kernel stack.
pub const STAT_PASS: u32 = 1;
/// Verdict `XDP_DROP`.
pub const STAT_DROP: u32 = 2;
/// Verdict `XDP_TX`: sent back out of the device it came in on.
pub const STAT_TX: u32 = 3;
/// Verdict `XDP_REDIRECT`: sent out of another device.
pub const STAT_REDIRECT: u32 = 4;
/// Verdict `XDP_ABORTED`: a cannot-happen path was taken.
pub const STAT_ABORTED: u32 = 5;
/// Pass: not IPv4 (ARP, IPv6, LLDP, …) or a frame too short for Ethernet.
pub const STAT_NOT_IPV4: u32 = 6;
/// Pass: IPv4 but neither TCP nor UDP, or a fragment/malformed packet not addressed to a VIP.
pub const STAT_NOT_L4: u32 = 7;
/// Pass: TCP/UDP that is neither for a service nor a reply of a tracked flow.
pub const STAT_NOT_OURS: u32 = 8;
/// Pass: IPv4 header cut short; the destination cannot be read, the kernel drops it.
pub const STAT_TRUNCATED_IP: u32 = 9;
/// Drop: packet to a VIP whose IP or L4 header is cut short (or total length exceeds the frame).
pub const STAT_DROP_TRUNCATED: u32 = 10;
/// Drop: packet to a VIP with IHL < 5 or total length shorter than the header.
pub const STAT_DROP_BAD_IHL: u32 = 11;
/// Drop: IP fragment addressed to a VIP (fragments are not reassembled).
pub const STAT_DROP_FRAGMENT: u32 = 12;
/// Forward packet matched an established conntrack entry.
pub const STAT_CT_HIT: u32 = 13;
/// Reply packet matched a reverse conntrack entry and was translated back.
pub const STAT_CT_REPLY: u32 = 14;
/// Conntrack miss on a TCP SYN (or first UDP datagram) to a service: a new flow is attempted.
pub const STAT_CT_MISS_SYN: u32 = 15;
/// Pass: conntrack miss on a TCP non-SYN to a service; the kernel (proxy fallback) owns it.
pub const STAT_CT_MISS_NON_SYN: u32 = 16;
/// A new flow was created (forward and reverse half-open entries inserted).
pub const STAT_NEW_FLOW: u32 = 17;
/// Pass: the service has no backends.
pub const STAT_NO_BACKEND: u32 = 18;
/// Pass: no free SNAT port found within the probe bound for the chosen backend.
pub const STAT_SNAT_EXHAUSTED: u32 = 19;
/// Pass: inserting a conntrack entry failed.
pub const STAT_CT_INSERT_FAILED: u32 = 20;
/// Pass: FIB lookup toward the backend/client failed (no route, forwarding disabled, …).
pub const STAT_FIB_FAILED: u32 = 21;
/// Pass: FIB found the route but the neighbour is unresolved; the kernel forwards the
/// already-translated packet and resolves it.
pub const STAT_FIB_NO_NEIGH: u32 = 22;
/// Pass: translated packet whose egress device cannot take XDP frames (not in the xmit
/// devmap, e.g. a veth), or, in generic mode, a GSO super-packet longer than an Ethernet
/// frame; the kernel forwards it.
pub const STAT_XMIT_PASS: u32 = 23;
/// A TCP FIN or RST moved a flow to the closing state.
pub const STAT_TCP_CLOSE: u32 = 24;
/// A conntrack entry was found but had expired; it is treated as a miss.
pub const STAT_CT_EXPIRED: u32 = 25;

/// Pass: a packet of a tracked flow or to a service whose destination MAC is not the receiving
/// device's own (a bridge flooding another host's unicast, broadcast, multicast), or that came
/// in on a device whose MAC xlb has not registered: never translated.
pub const STAT_NOT_OUR_MAC: u32 = 26;
/// Drop: packet to a VIP whose IPv4 header checksum is wrong (passed when not to a VIP).
pub const STAT_DROP_BAD_IP_CSUM: u32 = 27;
/// Drop: packet to a VIP with a TCP data offset below 5 or past the segment, or a UDP length
/// below 8 or past the IP payload.
pub const STAT_DROP_BAD_L4_HDR: u32 = 28;
/// Pass: a TCP SYN carrying FIN or RST to a service: creates no flow.
pub const STAT_BAD_TCP_FLAGS: u32 = 29;
/// Pass: a would-be new flow from a martian source (0/8, 127/8, 224/4 and 240/4 including
/// broadcast): creates no flow.
pub const STAT_MARTIAN_SRC: u32 = 30;
/// Pass: a would-be new flow with TTL ≤ 1: creates no flow.
pub const STAT_TTL_EXPIRED: u32 = 31;
/// A packet of a half-open flow was translated (SYN retransmission, SYN-ACK, UDP reply).
pub const STAT_HALF_OPEN_HIT: u32 = 32;
/// A half-open flow became open (TCP: the client's ACK after the backend's SYN-ACK; UDP: the
/// client's datagram after a reply) and moved to the open maps.
pub const STAT_FLOW_OPENED: u32 = 33;
/// A half-open flow was found past its timeout (and deleted).
pub const STAT_HALF_OPEN_TIMEOUT: u32 = 34;
/// Early drop: a new flow took the SNAT port of a half-open TCP flow idle for more than
/// `CT_HALF_OPEN_RECLAIM_NS` (both its entries deleted).
pub const STAT_EARLY_DROP: u32 = 35;
/// An entry whose peer (other direction) was missing was found and deleted.
pub const STAT_CT_ORPHAN: u32 = 36;
/// A TCP SYN on the tuple of a closing flow replaced that flow (both entries deleted).
pub const STAT_CT_REPLACED: u32 = 37;
/// Inserting the open entries of a completed handshake failed: the flow stays half-open and
/// its packet is translated with the half-open entry.
pub const STAT_OPEN_INSERT_FAILED: u32 = 38;
/// A new flow took the SNAT port of a flow both sides had closed whose client's last ACK was
/// seen (`CT_STATE_CLOSED_ACKED`; both its entries deleted).
pub const STAT_CLOSED_REUSED: u32 = 39;

/// A new flow's route came from the FIB: its backend had no current next hop in
/// `NEXT_HOPS_MAP` (not resolved yet, or userspace has not confirmed it lately).
pub const STAT_NEXT_HOP_MISS: u32 = 40;

/// A packet that starts a flow found no new-flow program to go on to (its `PROG_ARRAY` slot
/// empty): passed to the kernel untouched.
pub const STAT_NEW_FLOW_UNREACHABLE: u32 = 41;

/// Drop: a packet of a half-open flow found another CPU changing that flow's stamp in the same
/// instant (claiming it to delete it or to take its SNAT port over, or restamping it for a
/// packet of the same flow), so it could not tell whose entry it had read; the sender
/// retransmits.
pub const STAT_HALF_OPEN_CONTENDED: u32 = 42;

/// Number of counters in [`STATS_MAP`].
pub const STAT_COUNT: u32 = 43;

/// Human-readable name of each counter, indexed like the map (for `xlb inspect stats`).
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "total",
    "pass",
    "drop",
    "tx",
    "redirect",
    "aborted",
    "not_ipv4",
    "not_l4",
    "not_ours",
    "truncated_ip",
    "drop_truncated",
    "drop_bad_ihl",
    "drop_fragment",
    "ct_hit",
    "ct_reply",
    "ct_miss_syn",
    "ct_miss_non_syn",
    "new_flow",
    "no_backend",
    "snat_exhausted",
    "ct_insert_failed",
    "fib_failed",
    "fib_no_neigh",
    "xmit_pass",
    "tcp_close",
    "ct_expired",
    "not_our_mac",
    "drop_bad_ip_csum",
    "drop_bad_l4_hdr",
    "bad_tcp_flags",
    "martian_src",
    "ttl_expired",
    "half_open_hit",
    "flow_opened",
    "half_open_timeout",
    "early_drop",
    "ct_orphan",
    "ct_replaced",
    "open_insert_failed",
    "closed_reused",
    "next_hop_miss",
    "new_flow_unreachable",
    "half_open_contended",
];

/// Per-service counters, one per CPU in [`SVC_STATS_MAP`] at the service's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets translated for this service (both directions).
    pub packets: u64,
    /// Bytes (whole frames) translated for this service (both directions).
    pub bytes: u64,
    /// New flows created.
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 24);
