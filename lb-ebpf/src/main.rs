//! xlb's XDP data plane: connection-tracked full-NAT load balancing of IPv4 TCP/UDP.
//!
//! Per packet: parse (packet.rs) → conntrack (conntrack.rs): the reverse map when the
//! destination port is a SNAT port (a backend reply, translated back to `VIP → client`), then
//! the forward map (client → VIP, translated to `SNAT → backend`, nat.rs) → cached route or
//! FIB lookup, and transmit (forward.rs). Only on a conntrack miss is `VIP:port/proto` looked
//! up in `XLB_SERVICES`: a TCP SYN / UDP datagram to a service starts a new flow (backend,
//! SNAT port, both entries). Everything else passes to the kernel untouched. A tracked packet
//! thus costs one hash lookup.
//!
//! Two entry points share the code: `xlb` for native (driver) XDP and `xlb_skb` for generic
//! (skb) XDP; they differ only in how a translated packet is transmitted (see
//! `forward::xmit`). `xlb_noop` is a do-nothing baseline for benchmarks.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod maps;
mod nat;
mod packet;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::*;

use crate::{
    conntrack::{Direction, TCP_ACK, TCP_SYN},
    maps::{XLB_CT_FWD, XLB_CT_REV, XLB_SERVICES, XLB_VIPS, count, count_service},
    packet::{Flow, Parsed, parse},
};

/// Native-mode entry point.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    finish(try_xlb::<false>(&ctx))
}

/// Generic-mode entry point.
#[xdp]
pub fn xlb_skb(ctx: XdpContext) -> u32 {
    finish(try_xlb::<true>(&ctx))
}

/// Does nothing: the baseline `xlb bench` compares against.
#[xdp]
pub fn xlb_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Counts the packet and its verdict.
#[inline(always)]
fn finish(result: Result<u32, u32>) -> u32 {
    let action = match result {
        Ok(action) | Err(action) => action,
    };
    count(STAT_TOTAL);
    count(match action {
        xdp_action::XDP_PASS => STAT_PASS,
        xdp_action::XDP_DROP => STAT_DROP,
        xdp_action::XDP_TX => STAT_TX,
        xdp_action::XDP_REDIRECT => STAT_REDIRECT,
        _ => STAT_ABORTED,
    });
    action
}

/// Counts `reason` and passes the packet to the kernel.
#[inline(always)]
fn pass(reason: u32) -> Result<u32, u32> {
    count(reason);
    Ok(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_xlb<const GENERIC: bool>(ctx: &XdpContext) -> Result<u32, u32> {
    let flow = match parse(ctx) {
        Parsed::Flow(flow) => flow,
        // Pass: not ours; ARP, IPv6, ICMP and the rest belong to the kernel.
        Parsed::NotIpv4 => return pass(STAT_NOT_IPV4),
        Parsed::NotL4 => return pass(STAT_NOT_L4),
        // Pass: the destination is unreadable, so it cannot be a VIP we own; the kernel drops it.
        Parsed::TruncatedIp => return pass(STAT_TRUNCATED_IP),
        Parsed::Malformed { reason, dst } => {
            if XLB_VIPS.get_ptr(&dst).is_some() {
                // Drop: malformed and addressed to a VIP.
                count(reason);
                return Err(xdp_action::XDP_DROP);
            }
            // Pass: not ours.
            return pass(STAT_NOT_L4);
        }
    };
    // Conntrack first, so a packet of a tracked flow costs one hash lookup. The service map is
    // consulted only on a conntrack miss: removing a service stops its new flows at once while
    // its established flows drain (as removing a backend does).
    let key = conntrack::key_of(&flow);
    if in_snat_range(flow.dst_port)
        && let Some(entry) = XLB_CT_REV.get_ptr_mut(&key)
    {
        // Backend → SNAT address. Reverse keys always end in a SNAT port, so a packet to any
        // other port skips this lookup.
        let now = conntrack::now_ns();
        // SAFETY: entry points into a map value, valid for this program run.
        if conntrack::alive(unsafe { &*entry }, flow.proto, now) {
            count(STAT_CT_REPLY);
            return translate::<GENERIC>(ctx, &flow, entry, Direction::FromBackend, now);
        }
        // Expired: treated as a miss; the packet is looked at as a client packet below.
        count(STAT_CT_EXPIRED);
    }
    let is_new = flow.proto == IPPROTO_UDP || flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(entry) = XLB_CT_FWD.get_ptr_mut(&key) {
        // Client → VIP of a tracked flow.
        let now = conntrack::now_ns();
        // SAFETY: entry points into a map value, valid for this program run.
        let state = unsafe { (*entry).state };
        // SAFETY: as above.
        if conntrack::alive(unsafe { &*entry }, flow.proto, now) {
            // A SYN on a closing flow is a new connection reusing the tuple.
            if !(is_new && flow.proto == IPPROTO_TCP && state != CT_STATE_OPEN) {
                count(STAT_CT_HIT);
                return translate::<GENERIC>(ctx, &flow, entry, Direction::FromClient, now);
            }
        } else {
            count(STAT_CT_EXPIRED);
        }
    }
    let service_key = ServiceKey {
        vip: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        _pad: 0,
    };
    let Some(service) = XLB_SERVICES.get_ptr_mut(&service_key) else {
        // Pass: neither a tracked flow nor a service.
        return pass(STAT_NOT_OURS);
    };
    if !is_new {
        // Pass: a TCP segment of a flow we do not track; the proxy fallback owns it.
        return pass(STAT_CT_MISS_NON_SYN);
    }
    new_flow::<GENERIC>(ctx, &flow, service)
}

/// Whether `port` (host order) is in the SNAT port range, where every reverse key's
/// destination port lies.
#[inline(always)]
fn in_snat_range(port: u16) -> bool {
    port.wrapping_sub(SNAT_PORT_MIN) < SNAT_PORT_COUNT as u16
}

/// A TCP SYN or UDP datagram to `service` without a live conntrack entry: picks a backend,
/// creates both entries and sends the translated packet on.
#[inline(always)]
fn new_flow<const GENERIC: bool>(
    ctx: &XdpContext,
    flow: &Flow,
    service: *mut ServiceValue,
) -> Result<u32, u32> {
    count(STAT_CT_MISS_SYN);
    let now = conntrack::now_ns();
    let Some(backend) = conntrack::pick_backend(service) else {
        // Pass: no backend; the kernel (proxy or RST) answers.
        return pass(STAT_NO_BACKEND);
    };
    let tot_len = flow.l4_len + (flow.l4_offset - network_types::eth::EthHdr::LEN) as u16;
    let Some(route) = forward::route(ctx, flow.proto, backend.ip, tot_len, true) else {
        // Pass: no route to the backend; nothing was created, the proxy may take it.
        return pass(STAT_FIB_FAILED);
    };
    // SAFETY: service points into a map value, valid for this program run.
    let service_id = unsafe { (*service).id };
    let entry = match conntrack::create(flow, service_id, &backend, &route, now) {
        Ok(entry) => entry,
        // Pass: no conntrack entry (counted in create); the proxy may take it.
        Err(_) => return Ok(xdp_action::XDP_PASS),
    };
    count(STAT_NEW_FLOW);
    count_service(service_id, (ctx.data_end() - ctx.data()) as u64, 1);
    nat::rewrite(ctx, flow, &entry)?;
    if !route.resolved {
        // Pass: the kernel forwards the translated packet and resolves the neighbour.
        return pass(STAT_FIB_NO_NEIGH);
    }
    forward::xmit::<GENERIC>(ctx, route.ifindex, route.smac, route.dmac)
}

/// Translates a packet of a tracked flow per `entry` and sends it on, refreshing the entry
/// (timestamp and cached route) at most once per `CT_REFRESH_NS`.
#[inline(always)]
fn translate<const GENERIC: bool>(
    ctx: &XdpContext,
    flow: &Flow,
    entry: *mut CtEntry,
    direction: Direction,
    now: u64,
) -> Result<u32, u32> {
    if flow.proto == IPPROTO_TCP {
        conntrack::on_tcp_flags(entry, flow.tcp_flags, direction, now);
    }
    // SAFETY: entry points into a map value, valid for this program run; copied out once.
    let mut e = unsafe { *entry };
    count_service(e.service_id, (ctx.data_end() - ctx.data()) as u64, 0);
    nat::rewrite(ctx, flow, &e)?;
    if now.saturating_sub(e.last_seen_ns) > CT_REFRESH_NS || e.ifindex == 0 {
        let tot_len = flow.l4_len + (flow.l4_offset - network_types::eth::EthHdr::LEN) as u16;
        let route = forward::route(ctx, flow.proto, e.nat_dst_ip, tot_len, false);
        // SAFETY: as above; plain stores to the value.
        unsafe {
            (*entry).last_seen_ns = now;
            (*entry).ifindex = 0;
        }
        let Some(route) = route else {
            // Pass: no route any more; the kernel decides (ICMP unreachable or drop).
            return pass(STAT_FIB_FAILED);
        };
        if !route.resolved {
            // Pass: the kernel forwards the translated packet and resolves the neighbour.
            return pass(STAT_FIB_NO_NEIGH);
        }
        // SAFETY: as above.
        unsafe {
            (*entry).ifindex = route.ifindex;
            (*entry).smac = route.smac;
            (*entry).dmac = route.dmac;
        }
        e.ifindex = route.ifindex;
        e.smac = route.smac;
        e.dmac = route.dmac;
    }
    forward::xmit::<GENERIC>(ctx, e.ifindex, e.smac, e.dmac)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that can reach a panic, so this is never called.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The kernel requires a GPL-compatible license for the helpers the program calls.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
