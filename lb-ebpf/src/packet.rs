//! Bounds-checked packet access and IPv4/TCP/UDP parsing.

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, steps::STEP_PACKET_CHECKS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{frame::Frame, steps::skipped};

/// A `T` in packet memory, 2-aligned. Packet data starts at an even address at every hook
/// (XDP and skb headroom are even) and xlb reads headers only at even offsets (an IPv4 header
/// is a multiple of 4 bytes long), so every header it reads is. Saying so lets LLVM read and
/// write the headers' byte-array fields (addresses, ports, MACs, checksums) a 16-bit word at a
/// time: at an alignment of 1 it loads or stores each byte and joins them with shifts. A field
/// is written in the width it is read in: a load spanning several smaller stores is not served
/// from them but waits for them to reach the cache.
#[repr(C, align(2))]
pub struct Even<T>(pub T);

/// Returns a pointer to a `T` at `offset` (even) bytes into the frame, or `None` when the
/// frame is too short. The only way this crate reads or writes packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut Even<T>> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut Even<T>)
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
/// Offset of the data offset byte in the TCP header (even: the flags byte follows it).
const TCP_DOFF_OFFSET: usize = 12;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
/// Offset of the length in the UDP header.
const UDP_LEN_OFFSET: usize = 4;
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
    if unsafe { (*eth).0.ether_type } != ETH_P_IPV4_BE {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return Parsed::TruncatedIp;
    };
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    let (vihl, frags, proto, tot_len, src, dst, ttl) = (
        ip.0.vihl,
        u16::from_be_bytes(ip.0.frags),
        ip.0.proto,
        u16::from_be_bytes(ip.0.tot_len) as usize,
        ip.0.src_addr,
        ip.0.dst_addr,
        ip.0.ttl,
    );
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
    // Ports, then (TCP) data offset and flags, or (UDP) the length, read in 16-bit words.
    let (ports, tcp_flags) = if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<[u16; (TCP_FLAGS_OFFSET + 1) / 2]>(ctx, opaque(l4_offset)) else {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_TRUNCATED,
                dst,
            };
        };
        // SAFETY: ptr_at checked that the words lie inside the frame.
        let tcp = unsafe { (*tcp).0 };
        // The data offset's byte, then the flags' byte.
        let [doff, flags] = tcp[TCP_DOFF_OFFSET / 2].to_ne_bytes();
        let data_offset = (doff >> 4) as usize * 4;
        if !skipped(STEP_PACKET_CHECKS) && (data_offset < TCP_HDR_LEN || data_offset > l4_len) {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_BAD_L4_HDR,
                dst,
            };
        }
        ([tcp[0], tcp[1]], flags)
    } else {
        let Some(udp) = ptr_at::<[u16; UDP_HDR_LEN / 2]>(ctx, opaque(l4_offset)) else {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_TRUNCATED,
                dst,
            };
        };
        // SAFETY: as above.
        let udp = unsafe { (*udp).0 };
        let udp_len = u16::from_be(udp[UDP_LEN_OFFSET / 2]) as usize;
        if udp_len < UDP_HDR_LEN || udp_len > l4_len {
            return Parsed::Malformed {
                reason: lb_common::STAT_DROP_BAD_L4_HDR,
                dst,
            };
        }
        ([udp[0], udp[1]], 0)
    };
    Parsed::Flow(Flow {
        src,
        dst,
        src_port: u16::from_be(ports[0]),
        dst_port: u16::from_be(ports[1]),
        proto,
        tcp_flags,
        ttl,
        l4_offset,
        l4_len: l4_len as u16,
    })
}

/// Whether the IPv4 header checksum (over `ihl` bytes, options included) verifies.
#[inline(always)]
fn ip_checksum_ok<F: Frame>(ctx: &F, ihl: usize) -> bool {
    let Some(fixed) = ptr_at::<[u16; 10]>(ctx, EthHdr::LEN) else {
        return false;
    };
    // SAFETY: ptr_at checked bounds.
    let w = unsafe { (*fixed).0 };
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
        sum += unsafe { (*word).0 } as u32;
    }
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}
