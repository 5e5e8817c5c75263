//! xlb's XDP data plane: connection-tracked full-NAT load balancing of IPv4 TCP/UDP.
//!
//! Per packet: parse (packet.rs) → open flows (conntrack.rs): the reverse map when the
//! destination port is a SNAT port (a backend reply, translated back to `VIP → client`), then
//! the forward map (client → VIP, translated to `SNAT → backend`, nat.rs) → the flow's cached
//! route (refreshed by FIB lookup), and transmit (forward.rs). A tracked packet thus costs one
//! hash lookup. On a miss `VIP:port/proto` is looked up in `XLB_SERVICES`, and a packet to a
//! service or to a SNAT port is looked up in the half-open map (flows whose handshake is not
//! complete); a sane TCP SYN / UDP datagram to a service without a flow starts a new half-open
//! flow (backend, its next hop from `XLB_NEXT_HOPS` or a FIB lookup, SNAT address and port,
//! both entries). Everything else passes to the kernel untouched. Only
//! frames addressed to the receiving device's MAC are translated.
//!
//! Three entry points share the code, one per hook (`frame.rs`): `xlb` for native (driver)
//! XDP, `xlb_skb` for generic (skb) XDP and `xlb_tc` for TC ingress; they differ in how a
//! translated packet leaves (`forward::xmit`) and in what an skb carries besides its bytes.
//! `baseline.rs` holds the programs benchmarks compare xlb with.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_cxchg` and `atomic_xchg`: the BPF target offers only atomic loads
// and stores in `core::sync`, though BPF has both instructions (`conntrack::claim`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod baseline;
mod conntrack;
mod forward;
mod frame;
mod maps;
mod nat;
mod packet;
mod snat;
mod steps;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{steps::STEP_MISS_LOOKUPS, *};

use crate::{
    conntrack::{Direction, TCP_ACK, TCP_CONTROL, TCP_FIN, TCP_RST, TCP_SYN},
    frame::{Frame, Generic, Native, Tc, tc_verdict},
    maps::{XLB_CT_FWD, XLB_CT_HALF, XLB_CT_REV, XLB_SERVICES, XLB_VIPS, count, count_service},
    packet::{Flow, Parsed, parse},
    steps::skipped,
};

/// Native-mode entry point.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    finish(try_xlb(&Native(ctx)))
}

/// Generic-mode entry point.
#[xdp]
pub fn xlb_skb(ctx: XdpContext) -> u32 {
    finish(try_xlb(&Generic(ctx)))
}

/// TC ingress entry point (clsact/TCX), for devices where the skb path beats generic XDP.
#[classifier]
pub fn xlb_tc(ctx: TcContext) -> i32 {
    let frame = Tc(ctx);
    if frame.vlan_tagged() {
        // Pass: not IPv4 as XDP would see it (an 802.1Q frame).
        return tc_verdict(finish(pass(STAT_NOT_IPV4)));
    }
    frame.pull_headers();
    frame.start_checksum();
    let action = finish(try_xlb(&frame));
    frame.finish_checksum();
    tc_verdict(action)
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
fn try_xlb<F: Frame>(ctx: &F) -> Result<u32, u32> {
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
            // Pass: not ours (a bad checksum among them: the kernel drops it, nothing here
            // forwards it).
            return pass(STAT_NOT_L4);
        }
    };
    // Open flows first, so a packet of a tracked flow costs one hash lookup. The service map is
    // consulted only on a miss: removing a service stops its new flows at once while its
    // established flows drain (as removing a backend does). Reverse keys always end in a SNAT
    // port, so a packet to any other port skips the reverse map; one to a SNAT-range port that
    // is also a service's port (8080, say) is more likely a client's, and tries the forward map
    // first.
    let key = conntrack::key_of(&flow);
    let syn_only = flow.proto == IPPROTO_TCP && flow.tcp_flags & TCP_CONTROL == TCP_SYN;
    let to_snat_port = in_snat_range(flow.dst_port);
    let reply_first = to_snat_port && !maps::service_port(flow.dst_port);
    if reply_first && let Some(verdict) = open_reply::<F>(ctx, &flow, &key) {
        return verdict;
    }
    if let Some(verdict) = open_forward::<F>(ctx, &flow, &key, syn_only) {
        return verdict;
    }
    if to_snat_port
        && !reply_first
        && let Some(verdict) = open_reply::<F>(ctx, &flow, &key)
    {
        return verdict;
    }
    // Half-open flows: a reverse entry ends in a SNAT port; a forward one is addressed to a
    // service, so traffic that is neither pays no half-open lookup.
    let service = XLB_SERVICES.get_ptr_mut(&service_key_of(&flow));
    if (service.is_some() || to_snat_port)
        && !skipped(STEP_MISS_LOOKUPS)
        && let Some(entry) = XLB_CT_HALF.get_ptr_mut(&key)
    {
        let verdict = half_open::<F>(ctx, &flow, &key, entry);
        if verdict != NOT_HANDLED {
            return Ok(verdict);
        }
    }
    if service.is_none() {
        // Pass: neither a tracked flow nor a service.
        return pass(STAT_NOT_OURS);
    }
    if flow.proto == IPPROTO_TCP && !syn_only {
        if flow.tcp_flags & TCP_SYN != 0 && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            // Pass: SYN with FIN or RST is no connection attempt; the kernel drops it.
            return pass(STAT_BAD_TCP_FLAGS);
        }
        // Pass: a TCP segment of a flow we do not track; the proxy fallback owns it.
        return pass(STAT_CT_MISS_NON_SYN);
    }
    // A new flow: the new-flow program of this hook takes the packet from here.
    ctx.to_new_flow();
    // Pass: no new-flow program to go on to.
    pass(STAT_NEW_FLOW_UNREACHABLE)
}

/// A backend's packet to a SNAT port of an open flow (reverse map): translated back to
/// `VIP → client`. `None` when there is no live entry (an expired one is deleted with its
/// peer): the packet is then looked at afresh.
///
/// Inlined at both its call sites, which took the main programs' verifier counts from about
/// 220,000 instructions to 290,000-380,000. Two ways to keep one copy, tried: one `translate`
/// shared by both maps (the direction a runtime value) cost every tracked packet about 25 ns
/// more, and a BPF subprogram cost the verifier as much or more (273,000-401,000).
#[inline(always)]
fn open_reply<F: Frame>(ctx: &F, flow: &Flow, key: &FlowKey) -> Option<Result<u32, u32>> {
    let entry = XLB_CT_REV.get_ptr_mut(key)?;
    let now = conntrack::now_ns();
    // SAFETY: entry points into a map value, valid for this program run.
    let e = unsafe { &*entry };
    if conntrack::alive(e, flow.proto, now) {
        return Some(translate::<F>(
            ctx,
            flow,
            key,
            entry,
            Direction::FromBackend,
            now,
            true,
        ));
    }
    count(STAT_CT_EXPIRED);
    conntrack::delete_open_pair(Direction::FromBackend, key, e, flow.proto);
    None
}

/// A client's packet of an open flow (forward map): translated to `SNAT → backend`. `None`
/// when there is no live entry, or a SYN replaces a closing flow (either way the entry is
/// deleted with its peer), so the packet is looked at afresh.
#[inline(always)]
fn open_forward<F: Frame>(
    ctx: &F,
    flow: &Flow,
    key: &FlowKey,
    syn_only: bool,
) -> Option<Result<u32, u32>> {
    if skipped(STEP_MISS_LOOKUPS) {
        return None;
    }
    let entry = XLB_CT_FWD.get_ptr_mut(key)?;
    let now = conntrack::now_ns();
    // SAFETY: entry points into a map value, valid for this program run.
    let e = unsafe { &*entry };
    if conntrack::alive(e, flow.proto, now) {
        // A SYN on a closing flow is a new connection reusing the tuple: it replaces the
        // flow (as Linux conntrack does), wherever the new flow then goes.
        if !(syn_only && e.state != CT_STATE_OPEN) {
            return Some(translate::<F>(
                ctx,
                flow,
                key,
                entry,
                Direction::FromClient,
                now,
                true,
            ));
        }
        if !conntrack::to_our_mac(ctx) {
            return Some(pass(STAT_NOT_OUR_MAC));
        }
        count(STAT_CT_REPLACED);
    } else {
        count(STAT_CT_EXPIRED);
    }
    conntrack::delete_open_pair(Direction::FromClient, key, e, flow.proto);
    None
}

/// Native XDP new-flow program: a packet `xlb` found to start a flow (tail call).
#[xdp]
pub fn xlb_new_flow(ctx: XdpContext) -> u32 {
    finish(try_new_flow_entry(&Native(ctx)))
}

/// Generic XDP new-flow program, tail-called by `xlb_skb`.
#[xdp]
pub fn xlb_skb_new_flow(ctx: XdpContext) -> u32 {
    finish(try_new_flow_entry(&Generic(ctx)))
}

/// TC new-flow program, tail-called by `xlb_tc` (which made the headers readable).
#[classifier]
pub fn xlb_tc_new_flow(ctx: TcContext) -> i32 {
    let frame = Tc(ctx);
    frame.start_checksum();
    let action = finish(try_new_flow_entry(&frame));
    frame.finish_checksum();
    tc_verdict(action)
}

/// A packet the main program found to start a flow: parsed again (a tail call keeps only the
/// packet) and its service looked up again (userspace may have removed it in between).
#[inline(always)]
fn try_new_flow_entry<F: Frame>(ctx: &F) -> Result<u32, u32> {
    let Parsed::Flow(flow) = parse(ctx) else {
        // Pass: the main program parsed this same packet; nothing here forwards it.
        return pass(STAT_NOT_OURS);
    };
    let Some(service) = XLB_SERVICES.get_ptr_mut(&service_key_of(&flow)) else {
        // Pass: the service went away since.
        return pass(STAT_NOT_OURS);
    };
    Ok(new_flow::<F>(ctx, &flow, service))
}

/// The service a packet of `flow` is addressed to: `VIP:port/proto`.
#[inline(always)]
fn service_key_of(flow: &Flow) -> ServiceKey {
    ServiceKey {
        vip: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        _pad: 0,
    }
}

/// [`half_open`]'s answer when the entry was dead: not an XDP action.
const NOT_HANDLED: u32 = u32::MAX;

/// The XDP action of a `Result` whose both arms are actions.
#[inline(always)]
fn action(result: Result<u32, u32>) -> u32 {
    match result {
        Ok(action) | Err(action) => action,
    }
}

/// A packet whose tuple is in the half-open map (`entry` at `key`). [`NOT_HANDLED`] when the
/// entry was dead (timed out, or its peer is gone: both deleted); the packet is then looked
/// at as untracked. Otherwise the packet is translated with the half-open entry, after moving the
/// flow along: the backend's SYN-ACK (or first UDP reply) marks it replied, and the client's
/// next packet (TCP: an ACK without SYN) makes it open. A RST from either side ends it (its
/// entries expire at once). Returns the XDP action.
///
/// Not inlined (a BPF subprogram): the whole program inlined exceeds the 512-byte BPF stack.
#[inline(never)]
fn half_open<F: Frame>(ctx: &F, flow: &Flow, key: &FlowKey, entry: *mut CtEntry) -> u32 {
    let now = conntrack::now_ns();
    let seen = conntrack::stamp(entry);
    // SAFETY: entry points into a map value, valid for this program run.
    let e = unsafe { &*entry };
    if !conntrack::alive_since(seen, e.state, flow.proto, now) {
        if conntrack::delete_half_pair(key, entry, seen) {
            count(STAT_HALF_OPEN_TIMEOUT);
        }
        return NOT_HANDLED;
    }
    let Some(peer) = XLB_CT_HALF.get_ptr_mut(&e.peer_key(flow.proto)) else {
        count(STAT_CT_ORPHAN);
        conntrack::delete_half_orphan(key, entry);
        return NOT_HANDLED;
    };
    // Read before the peer's fields: the restamp below checks that neither stamp changed since.
    let peer_seen = conntrack::stamp(peer);
    // SAFETY: as above.
    let p = unsafe { &*peer };
    if !CtEntry::is_peer_of(key, p) {
        count(STAT_CT_ORPHAN);
        conntrack::delete_half_orphan(key, entry);
        return NOT_HANDLED;
    }
    if !conntrack::to_our_mac(ctx) {
        return action(pass(STAT_NOT_OUR_MAC));
    }
    let tcp = flow.proto == IPPROTO_TCP;
    let flags = flow.tcp_flags;
    // Any packet of the attempt keeps both entries fresh (the SNAT port is probed at the
    // reverse one, a client's retransmitted SYN arrives at the forward one), and it is acted on
    // only when neither stamp changed since it was read: otherwise another CPU may be deleting
    // the flow or writing a new flow over its reverse entry (a takeover of its port), and a
    // flow opened from what was read here would share the port with that new flow.
    if !(conntrack::restamp(entry, seen, now) && conntrack::restamp(peer, peer_seen, now)) {
        // Drop: the sender retransmits, and finds the flow or none.
        count(STAT_HALF_OPEN_CONTENDED);
        return xdp_action::XDP_DROP;
    }
    if tcp && flags & TCP_RST != 0 {
        // The attempt is over: both entries expire now (the RST itself is translated).
        // SAFETY: plain stores to map values.
        unsafe {
            (*entry).last_seen_ns = 0;
            (*peer).last_seen_ns = 0;
        }
        count(STAT_HALF_OPEN_HIT);
        return action(translate_copy::<F>(ctx, flow, e));
    }
    let direction = if e.dir == CT_DIR_REVERSE {
        if !tcp || flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
            // SAFETY: plain stores to map values.
            unsafe {
                (*entry).state = CT_STATE_HALF_OPEN_REPLIED;
                (*peer).state = CT_STATE_HALF_OPEN_REPLIED;
            }
        }
        Direction::FromBackend
    } else {
        let completes = if tcp {
            flags & (TCP_SYN | TCP_ACK) == TCP_ACK
        } else {
            true
        };
        if e.state == CT_STATE_HALF_OPEN_REPLIED
            && completes
            && conntrack::open(key, e, p, flow.proto, now)
            && let Some(open) = XLB_CT_FWD.get_ptr_mut(key)
        {
            return action(translate::<F>(
                ctx,
                flow,
                key,
                open,
                Direction::FromClient,
                now,
                true,
            ));
        }
        Direction::FromClient
    };
    count(STAT_HALF_OPEN_HIT);
    action(translate::<F>(ctx, flow, key, entry, direction, now, false))
}

/// Whether `port` (host order) is in the SNAT port range, where every reverse key's
/// destination port lies.
#[inline(always)]
fn in_snat_range(port: u16) -> bool {
    snat::ports().contains(port)
}

/// Whether `src` (network order) is a martian source that must not start a flow: 0.0.0.0/8
/// ("this network"), 127.0.0.0/8 (loopback), 224.0.0.0/4 (multicast) and 240.0.0.0/4
/// (reserved, with the limited broadcast 255.255.255.255).
#[inline(always)]
fn martian(src: [u8; 4]) -> bool {
    src[0] == 0 || src[0] == 127 || src[0] >= 224
}

/// A TCP SYN or UDP datagram to `service` without a live conntrack entry: picks a backend,
/// creates both half-open entries and sends the translated packet on. Returns the XDP action.
///
/// Not inlined (a BPF subprogram): the whole program inlined exceeds the 512-byte BPF stack.
#[inline(never)]
fn new_flow<F: Frame>(ctx: &F, flow: &Flow, service: *mut ServiceValue) -> u32 {
    action(try_new_flow::<F>(ctx, flow, service))
}

#[inline(always)]
fn try_new_flow<F: Frame>(ctx: &F, flow: &Flow, service: *mut ServiceValue) -> Result<u32, u32> {
    if !conntrack::to_our_mac(ctx) {
        // Pass: not addressed to this host; the kernel drops it.
        return pass(STAT_NOT_OUR_MAC);
    }
    if martian(flow.src) {
        // Pass: the kernel drops martians (and logs them with log_martians).
        return pass(STAT_MARTIAN_SRC);
    }
    if flow.ttl <= 1 {
        // Pass: the kernel answers with ICMP time exceeded, as a router must.
        return pass(STAT_TTL_EXPIRED);
    }
    count(STAT_CT_MISS_SYN);
    let now = conntrack::now_ns();
    let Some(backend) = conntrack::pick_backend(service) else {
        // Pass: no backend; the kernel (proxy or RST) answers.
        return pass(STAT_NO_BACKEND);
    };
    let tot_len = flow.l4_len + (flow.l4_offset - network_types::eth::EthHdr::LEN) as u16;
    let Some(route) = forward::new_flow_route(ctx, flow.proto, backend.ip, tot_len, now) else {
        // Pass: no route to the backend; nothing was created, the proxy may take it.
        return pass(STAT_FIB_FAILED);
    };
    // SAFETY: service points into a map value, valid for this program run.
    let service_id = unsafe { (*service).id };
    let entry = conntrack::create(flow, backend, route, now, service_id);
    if entry.is_null() {
        // Pass: no conntrack entry (counted in create); the proxy may take it.
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: points into a per-CPU scratch slot, valid for this program run.
    let entry = unsafe { &*entry };
    count(STAT_NEW_FLOW);
    count_service(service_id, ctx.len() as u64, 1);
    nat::rewrite(ctx, flow, entry)?;
    if !route.resolved {
        // Pass: the kernel forwards the translated packet and resolves the neighbour.
        return pass(STAT_FIB_NO_NEIGH);
    }
    forward::xmit::<F>(ctx, route.ifindex, route.smac, route.dmac)
}

/// Translates a packet per the copied entry `e` without touching any map (the last packet of
/// an ended half-open flow) and sends it on.
#[inline(always)]
fn translate_copy<F: Frame>(ctx: &F, flow: &Flow, e: &CtEntry) -> Result<u32, u32> {
    count_service(e.service_id, ctx.len() as u64, 0);
    nat::rewrite(ctx, flow, e)?;
    let tot_len = flow.l4_len + (flow.l4_offset - network_types::eth::EthHdr::LEN) as u16;
    let Some(route) = forward::route(ctx, flow.proto, e.nat_dst_ip, tot_len, false) else {
        return pass(STAT_FIB_FAILED);
    };
    if !route.resolved {
        return pass(STAT_FIB_NO_NEIGH);
    }
    forward::xmit::<F>(ctx, route.ifindex, route.smac, route.dmac)
}

/// Translates a packet of a tracked flow per `entry` (found at `key`) and sends it on,
/// refreshing the entry (timestamp and cached route) at most once per `CT_REFRESH_NS`. For an
/// `open` flow (open maps) FIN/RST move its state, and each refresh also checks that the
/// peer entry is still there: an entry found without its peer is deleted and the packet
/// passed untouched, so no flow ever translates one way only.
#[inline(always)]
fn translate<F: Frame>(
    ctx: &F,
    flow: &Flow,
    key: &FlowKey,
    entry: *mut CtEntry,
    direction: Direction,
    now: u64,
    open: bool,
) -> Result<u32, u32> {
    if !conntrack::to_our_mac(ctx) {
        // Pass: a frame for another host (or a broadcast) that happens to match a flow.
        return pass(STAT_NOT_OUR_MAC);
    }
    // SAFETY: entry points into a map value, valid for this program run (not copied: the BPF
    // stack is small).
    let e = unsafe { &*entry };
    let refresh = now.saturating_sub(e.last_seen_ns) > CT_REFRESH_NS || e.ifindex == 0;
    if open {
        if refresh && !conntrack::open_peer_ok(direction, key, e, flow.proto) {
            // Pass: the flow lost its other half; this half goes too, and the packet is
            // treated as untracked (the proxy fallback or a RST answers).
            conntrack::delete_open_pair(direction, key, e, flow.proto);
            return pass(STAT_CT_ORPHAN);
        }
        count(match direction {
            Direction::FromClient => STAT_CT_HIT,
            Direction::FromBackend => STAT_CT_REPLY,
        });
        if flow.proto == IPPROTO_TCP {
            conntrack::on_tcp_flags(entry, flow.tcp_flags, direction, now);
        }
    }
    count_service(e.service_id, ctx.len() as u64, 0);
    nat::rewrite(ctx, flow, e)?;
    if refresh {
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
    }
    // SAFETY: as above; read after the refresh.
    let (ifindex, smac, dmac) = unsafe { ((*entry).ifindex, (*entry).smac, (*entry).dmac) };
    forward::xmit::<F>(ctx, ifindex, smac, dmac)
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
