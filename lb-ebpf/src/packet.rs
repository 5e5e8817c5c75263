//! Bounds-checked packet access and IPv4/TCP/UDP parsing.

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, steps::STEP_PACKET_CHECKS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{frame::Frame, steps::skipped};

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` when the frame is too
/// short. The only way this crate reads or writes packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// `offset`, hidden from LLVM's value tracking (through a volatile stack slot) so that a
/// bounds check on it is kept: LLVM otherwise drops a check it can prove from an earlier
/// comparison of lengths (plain scalars), which the verifier cannot relate to the packet
/// pointer, and the verifier then rejects the access.
#[inline(always)]
pub fn opaque(offset: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&offset) }
}

/// Ethertype IPv4 in network byte order, as it sits in `EthHdr::ether_type`.
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
/// "More fragments" flag and fragment offset bits of the IPv4 `frags` field.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// Offset of the data offset byte in the TCP header.
const TCP_DOFF_OFFSET: usize = 12;
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
    /// IPv4 time to live.
    pub ttl: u8,
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
pub fn parse<F: Frame>(ctx: &F) -> Parsed {
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
    let (vihl, frags, proto, tot_len, src, dst, ttl) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u16::from_be_bytes((*ip).tot_len) as usize,
            (*ip).src_addr,
            (*ip).dst_addr,
            (*ip).ttl,
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
    let frame_len = ctx.len();
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
    if !skipped(STEP_PACKET_CHECKS) && !ip_checksum_ok(ctx, ihl) {
        return Parsed::Malformed {
            reason: lb_common::STAT_DROP_BAD_IP_CSUM,
            dst,
        };
    }
    let l4_len = tot_len - ihl;
    // Ports, then (TCP) data offset and flags, or (UDP) the length.
    let (ports, tcp_flags) = if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<[u8; TCP_FLAGS_OFFSET + 1]>(ctx, opaque(l4_offset)) else {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_TRUNCATED,
                dst,
            };
        };
        // SAFETY: ptr_at checked that the bytes lie inside the frame.
        let tcp = unsafe { *tcp };
        let data_offset = (tcp[TCP_DOFF_OFFSET] >> 4) as usize * 4;
        if !skipped(STEP_PACKET_CHECKS) && (data_offset < TCP_HDR_LEN || data_offset > l4_len) {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_BAD_L4_HDR,
                dst,
            };
        }
        ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS_OFFSET])
    } else {
        let Some(udp) = ptr_at::<[u8; UDP_HDR_LEN]>(ctx, opaque(l4_offset)) else {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_TRUNCATED,
                dst,
            };
        };
        // SAFETY: as above.
        let udp = unsafe { *udp };
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
        if udp_len < UDP_HDR_LEN || udp_len > l4_len {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_BAD_L4_HDR,
                dst,
            };
        }
        ([udp[0], udp[1], udp[2], udp[3]], 0)
    };
    Parsed::Flow(Flow {
        src,
        dst,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        ttl,
        l4_offset,
        l4_len: l4_len as u16,
    })
}

/// Whether the IPv4 header checksum (over `ihl` bytes, options included) verifies.
///
/// Read in 16-bit words: the IPv4 header starts 14 bytes into the frame, and packet data
/// starts at an even address in both XDP modes (headroom is a multiple of 4), so the words are
/// 2-aligned; a byte-wise read would cost twice the instructions on every packet.
#[inline(always)]
fn ip_checksum_ok<F: Frame>(ctx: &F, ihl: usize) -> bool {
    let Some(fixed) = ptr_at::<[u16; 10]>(ctx, EthHdr::LEN) else {
        return false;
    };
    // SAFETY: ptr_at checked bounds; 2-aligned as said above.
    let w = unsafe { *fixed };
    let mut sum: u32 = w[0] as u32 + w[1] as u32 + w[2] as u32 + w[3] as u32 + w[4] as u32;
    sum += w[5] as u32 + w[6] as u32 + w[7] as u32 + w[8] as u32 + w[9] as u32;
    // Options: up to 20 more words.
    let words = ihl / 2;
    for i in 10..30 {
        if i >= words {
            break;
        }
        let Some(word) = ptr_at::<u16>(ctx, opaque(EthHdr::LEN + i * 2)) else {
            return false;
        };
        // SAFETY: as above.
        sum += unsafe { *word } as u32;
    }
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}
