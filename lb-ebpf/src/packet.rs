//! Bounds-checked packet access and IPv4/TCP/UDP parsing.

use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` when the frame is too
/// short. The only way this crate reads or writes packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Ethertype IPv4 in network byte order, as it sits in `EthHdr::ether_type`.
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
/// "More fragments" flag and fragment offset bits of the IPv4 `frags` field.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
/// Offset of the checksum in the TCP header.
pub const TCP_CHECK_OFFSET: usize = 16;
/// Offset of the checksum in the UDP header.
pub const UDP_CHECK_OFFSET: usize = 6;
/// Minimum TCP header length.
const TCP_HDR_LEN: usize = 20;
/// UDP header length.
const UDP_HDR_LEN: usize = 8;

/// A TCP/UDP over IPv4 packet whose headers are all inside the frame.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header in the frame.
    pub l4_offset: usize,
    /// L4 length from the IP header (`tot_len - ihl`), for the pseudo-header.
    pub l4_len: u16,
}

/// What the parser found. Everything but `Flow` ends the packet's processing.
pub enum Parsed {
    /// Not IPv4 (or shorter than an Ethernet header): never ours.
    NotIpv4,
    /// IPv4 header cut short: the destination is unreadable, the kernel deals with it.
    TruncatedIp,
    /// IPv4 but not TCP/UDP.
    NotL4,
    /// Malformed IPv4 TCP/UDP packet (counter index says why) to `dst`: dropped if `dst` is a
    /// VIP, passed otherwise.
    Malformed { reason: u32, dst: [u8; 4] },
    /// A well-formed TCP/UDP packet.
    Flow(Flow),
}

/// Parses Ethernet, IPv4 and the TCP/UDP header. IP options are allowed (skipped by IHL and
/// left untouched); fragments, IHL < 5, and headers beyond the frame or the IP total length
/// are reported as malformed.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::NotIpv4;
    };
    // SAFETY: ptr_at checked that the header lies inside the frame.
    if unsafe { (*eth).ether_type } != ETH_P_IPV4_BE {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return Parsed::TruncatedIp;
    };
    // SAFETY: as above; Ipv4Hdr is all byte fields (alignment 1).
    let (vihl, frags, proto, tot_len, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u16::from_be_bytes((*ip).tot_len) as usize,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::NotL4;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl {
        return Parsed::Malformed {
            reason: lb_common::STAT_DROP_BAD_IHL,
            dst,
        };
    }
    if frags & IP_MF_OFFSET_MASK != 0 {
        return Parsed::Malformed {
            reason: lb_common::STAT_DROP_FRAGMENT,
            dst,
        };
    }
    let frame_len = ctx.data_end() - ctx.data();
    let l4_offset = EthHdr::LEN + ihl;
    let l4_hdr_len = if proto == IPPROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    if EthHdr::LEN + tot_len > frame_len || ihl + l4_hdr_len > tot_len {
        return Parsed::Malformed {
            reason: lb_common::STAT_DROP_TRUNCATED,
            dst,
        };
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4_offset) else {
        return Parsed::Malformed {
            reason: lb_common::STAT_DROP_TRUNCATED,
            dst,
        };
    };
    // SAFETY: as above.
    let ports = unsafe { *ports };
    let tcp_flags = if proto == IPPROTO_TCP {
        match ptr_at::<u8>(ctx, l4_offset + TCP_FLAGS_OFFSET) {
            // SAFETY: as above.
            Some(flags) => unsafe { *flags },
            None => {
                return Parsed::Malformed {
                    reason: lb_common::STAT_DROP_TRUNCATED,
                    dst,
                };
            }
        }
    } else {
        0
    };
    Parsed::Flow(Flow {
        src,
        dst,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        l4_offset,
        l4_len: (tot_len - ihl) as u16,
    })
}
