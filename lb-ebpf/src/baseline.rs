//! Baseline programs that `bench_xdp` measures xlb against, in the same run: `xlb_noop` does
//! nothing, `xlb_floor` does the least any flow-tracking NAT must (parse, one hash lookup,
//! rewrite, transmit). Never attached.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{IPPROTO_TCP, csum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{conntrack::flow_key, frame::Native, maps::XLB_CT_FWD, packet::ptr_at};

/// Ethertype IPv4 in network byte order, as it sits in `EthHdr::ether_type`.
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
/// Offset of the TCP header behind an IPv4 header without options.
const TCP_OFFSET: usize = EthHdr::LEN + Ipv4Hdr::LEN;
/// Offset of the checksum in the TCP header.
const TCP_CHECK_OFFSET: usize = 16;

/// Does nothing: the floor of the floor.
#[xdp]
pub fn xlb_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The floor program: an IPv4 TCP packet without IP options whose tuple is in the forward
/// conntrack map gets that entry's destination (DNAT: address and port, IP and TCP checksums
/// updated incrementally) and goes back out with `XDP_TX`; everything else passes. One hash
/// lookup, no counters, no state, no checks beyond bounds: what a new design would have to
/// beat.
#[xdp]
pub fn xlb_floor(ctx: XdpContext) -> u32 {
    floor(&Native(ctx)).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn floor(ctx: &Native) -> Option<u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    let ports = ptr_at::<[u16; 2]>(ctx, TCP_OFFSET)?;
    let check = ptr_at::<u16>(ctx, TCP_OFFSET + TCP_CHECK_OFFSET)?;
    // SAFETY: ptr_at checked bounds; the header fields are byte arrays and integers read in
    // place; entry points into a map value, valid for this program run.
    unsafe {
        if (*eth).0.ether_type != ETH_P_IPV4_BE
            || (*ip).0.vihl != 0x45
            || (*ip).0.proto != IPPROTO_TCP
        {
            return None;
        }
        let (src, dst) = ((*ip).0.src_addr, (*ip).0.dst_addr);
        let [sport, dport] = (*ports).0;
        let key = flow_key(
            src,
            dst,
            u16::from_be(sport),
            u16::from_be(dport),
            IPPROTO_TCP,
        );
        let entry = &*XLB_CT_FWD.get_ptr(&key)?;
        let new_port = entry.nat_dst_port.to_be_bytes();
        let addr_delta = csum::delta4(dst, entry.nat_dst_ip);
        (*ip).0.check = csum::update_full((*ip).0.check, addr_delta);
        (*ip).0.dst_addr = entry.nat_dst_ip;
        let port_delta = csum::delta2(dport.to_ne_bytes(), new_port);
        let l4_check = csum::update_full((*check).0.to_ne_bytes(), addr_delta + port_delta);
        (*check).0 = u16::from_ne_bytes(l4_check);
        (*ports).0[1] = u16::from_ne_bytes(new_port);
    }
    Some(xdp_action::XDP_TX)
}
