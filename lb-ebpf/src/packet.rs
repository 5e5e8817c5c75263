//! Bounds-checked packet access and header parsing.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::XdpContext};
use lb_common::*;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// Per-CPU packet counters, indexed by `lb_common::STAT_*`.
#[map(name = "XLB_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Adds one to counter `index`.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` when the frame is too
/// short. The only way this crate reads packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Ethertypes, in network byte order as they sit in `EthHdr::ether_type`.
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// What the parser found.
pub enum Parsed {
    /// Not IPv4 or IPv6: ARP and the like, never ours.
    NotIp,
    /// A header was cut short by the end of the frame.
    Truncated,
    /// IP carrying neither TCP nor UDP.
    OtherL4,
    /// TCP or UDP; `l4_offset` is where the transport header starts.
    L4 { proto: u8, l4_offset: usize },
}

/// Parses Ethernet, IP and the transport header, counting what it sees.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        count(STAT_TRUNCATED_ETH);
        return Parsed::Truncated;
    };
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let ether_type = unsafe { (*eth).ether_type };
    let (proto, l4_offset) = if ether_type == ETH_P_IPV4_BE {
        count(STAT_IPV4);
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            count(STAT_TRUNCATED_L3L4);
            return Parsed::Truncated;
        };
        // SAFETY: as above.
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        (proto, EthHdr::LEN + ((vihl & 0x0f) as usize) * 4)
    } else if ether_type == ETH_P_IPV6_BE {
        count(STAT_IPV6);
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            count(STAT_TRUNCATED_L3L4);
            return Parsed::Truncated;
        };
        // SAFETY: as above. Extension headers are not walked: such packets count as other L4.
        let proto = unsafe { (*ip).next_hdr };
        (proto, EthHdr::LEN + Ipv6Hdr::LEN)
    } else {
        count(STAT_NOT_IP);
        return Parsed::NotIp;
    };
    let header_len = match proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        _ => {
            count(STAT_OTHER_L4);
            return Parsed::OtherL4;
        }
    };
    if l4_offset + header_len > ctx.data_end() - ctx.data() {
        count(STAT_TRUNCATED_L3L4);
        return Parsed::Truncated;
    }
    count(if proto == IPPROTO_TCP {
        STAT_TCP
    } else {
        STAT_UDP
    });
    Parsed::L4 { proto, l4_offset }
}
