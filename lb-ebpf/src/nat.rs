//! Header rewrite with incremental checksum updates.

use lb_common::{CtEntry, IPPROTO_TCP, csum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    frame::Frame,
    packet::{Flow, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, ptr_at},
};

/// Rewrites the packet of `flow` to `entry`'s source and destination (addresses and ports),
/// updating the IPv4 checksum and the L4 checksum. A full L4 checksum gets the address and
/// port deltas; a `CHECKSUM_PARTIAL` one (see `lb_common::csum`) only the address delta. A UDP
/// checksum of 0 (none) stays 0. IP options are left as they are. The frame hears how the sum of
/// its bytes changed ([`Frame::rewritten`]). `entry` is the one stored at the flow's key: its
/// [`RewriteSums`](lb_common::RewriteSums) are of that key. `Err` means a header moved out of
/// the frame, which parsing rules out (abort).
#[inline(always)]
pub fn rewrite<F: Frame>(ctx: &F, flow: &Flow, entry: &CtEntry) -> Result<(), u32> {
    let abort = aya_ebpf::bindings::xdp_action::XDP_ABORTED;
    let sums = entry.sums;
    let addr_delta = sums.addrs as u32;
    let port_delta = sums.ports as u32;
    let new_sport = entry.nat_src_port.to_be_bytes();
    let new_dport = entry.nat_dst_port.to_be_bytes();

    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN).ok_or(abort)?;
    // SAFETY: ptr_at checked bounds.
    unsafe {
        (*ip).0.check = csum::update_full((*ip).0.check, addr_delta);
        (*ip).0.src_addr = entry.nat_src_ip;
        (*ip).0.dst_addr = entry.nat_dst_ip;
    }

    let is_tcp = flow.proto == IPPROTO_TCP;
    let check_offset = flow.l4_offset
        + if is_tcp {
            TCP_CHECK_OFFSET
        } else {
            UDP_CHECK_OFFSET
        };
    // The checksum and the ports are read and written a 16-bit word at a time.
    let check = ptr_at::<u16>(ctx, check_offset).ok_or(abort)?;
    // SAFETY: as above.
    let old = unsafe { (*check).0 }.to_ne_bytes();
    let new = if !is_tcp && old == [0, 0] {
        old
    } else if csum::is_partial(old, sums.pseudo, flow.l4_len) {
        csum::update_partial(old, addr_delta)
    } else {
        let full = csum::update_full(old, addr_delta + port_delta);
        // In UDP a computed 0 is sent as 0xffff (RFC 768); 0 would mean "no checksum".
        if !is_tcp && full == [0, 0] {
            [0xff, 0xff]
        } else {
            full
        }
    };
    let ports = ptr_at::<[u16; 2]>(ctx, flow.l4_offset).ok_or(abort)?;
    // SAFETY: as above.
    unsafe {
        (*check).0 = u16::from_ne_bytes(new);
        (*ports).0 = [u16::from_ne_bytes(new_sport), u16::from_ne_bytes(new_dport)];
    }
    // The IP header's checksum cancels its address change; in the segment the ports and the
    // checksum field changed.
    ctx.rewritten(csum::segment_delta(port_delta, old, new));
    Ok(())
}
