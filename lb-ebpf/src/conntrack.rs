//! Connection tracking: flow lookup with expiry, new flows (backend choice, SNAT port),
//! FIN/RST handling.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::*;

use crate::{
    forward::Route,
    maps::{XLB_BACKENDS, XLB_CLOCK, XLB_CT_FWD, XLB_CT_REV, count},
    packet::Flow,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Which way a tracked packet goes: its entry is in the forward map (from the client) or in
/// the reverse map (from the backend); the peer entry is in the other.
#[derive(Clone, Copy)]
pub enum Direction {
    FromClient,
    FromBackend,
}

/// Monotonic time in ns at tick resolution: CLOCK_MONOTONIC_COARSE, the CLOCK_MONOTONIC time
/// base as of the last tick (Linux 5.11+). Timeouts and the refresh interval are seconds, so
/// a tick (at most 10 ms) of resolution is plenty; a userspace `CLOCK_MONOTONIC` stamp may be
/// up to a tick ahead of it, which [`alive`] allows.
///
/// The coarse clock only moves when the tick advances jiffies, so it is read once per jiffy
/// per CPU and cached in `XLB_CLOCK`: `bpf_jiffies64` is inlined by the verifier (x86-64
/// JIT), so a packet costs no helper call for the time. The cached value lags the coarse
/// clock by at most the time between the jiffies update and the timekeeping update of the
/// same tick.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = XLB_CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        let [seen, ns] = *cache;
        if seen == jiffies && ns != 0 {
            return ns;
        }
        let ns = bpf_ktime_get_coarse_ns();
        *cache = [jiffies, ns];
        ns
    }
}

/// The conntrack key of a packet as it arrives.
#[inline(always)]
pub fn key_of(flow: &Flow) -> FlowKey {
    flow_key(flow.src, flow.dst, flow.src_port, flow.dst_port, flow.proto)
}

/// A conntrack key, built as four 32-bit words: a struct literal with the 3-byte zero
/// padding compiles to a call of the BPF object's byte-loop `memset`, on every packet.
#[inline(always)]
pub fn flow_key(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    let [s0, s1] = src_port.to_ne_bytes();
    let [d0, d1] = dst_port.to_ne_bytes();
    let words: [u32; 4] = [
        u32::from_ne_bytes(src),
        u32::from_ne_bytes(dst),
        u32::from_ne_bytes([s0, s1, d0, d1]),
        u32::from_ne_bytes([proto, 0, 0, 0]),
    ];
    // SAFETY: FlowKey is #[repr(C)], 16 bytes of integers and byte arrays without implicit
    // padding (asserted in lb-common), so any 16 bytes are a valid value; the words are laid
    // out field by field in FlowKey's order (src_ip, dst_ip, src_port, dst_port, proto, _pad).
    unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
}

/// Whether `entry` is still live at `now` (a stamp later than `now` counts as just seen).
#[inline(always)]
pub fn alive(entry: &CtEntry, proto: u8, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) < ct_timeout_ns(proto, entry.state)
}

/// Moves the flow of `entry` (a packet going `direction`) and its peer entry out of the open
/// state on the flow's first TCP FIN or RST, so both expire soon after the connection ends: to
/// [`CT_STATE_TIME_WAIT`] when the backend sent that FIN, to [`CT_STATE_CLOSING`] otherwise.
#[inline(always)]
pub fn on_tcp_flags(entry: *mut CtEntry, flags: u8, direction: Direction, now: u64) {
    if flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    // SAFETY: entry points into a map value, valid for this program run.
    let (state, peer_key) = unsafe { ((*entry).state, (*entry).peer_key(IPPROTO_TCP)) };
    if state != CT_STATE_OPEN {
        return;
    }
    count(STAT_TCP_CLOSE);
    let (state, peer_map) = match direction {
        Direction::FromBackend if flags & TCP_RST == 0 => (CT_STATE_TIME_WAIT, &XLB_CT_FWD),
        Direction::FromBackend => (CT_STATE_CLOSING, &XLB_CT_FWD),
        Direction::FromClient => (CT_STATE_CLOSING, &XLB_CT_REV),
    };
    // SAFETY: as above; plain stores to the value.
    unsafe {
        (*entry).state = state;
        (*entry).last_seen_ns = now;
    }
    if let Some(peer) = peer_map.get_ptr_mut(&peer_key) {
        // SAFETY: as above.
        unsafe {
            (*peer).state = state;
            (*peer).last_seen_ns = now;
        }
    }
}

/// Picks the next backend of a service round robin (per-service cursor in the service value). `None` when it has none.
#[inline(always)]
pub fn pick_backend(service: *mut ServiceValue) -> Option<BackendValue> {
    // SAFETY: service points into a map value, valid for this program run.
    let (id, count) = unsafe { ((*service).id, (*service).backend_count) };
    if count == 0 || count > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    // The BPF target has no atomic read-modify-write in core (no `fetch_add`), so the cursor is
    // bumped with a plain load and store: two CPUs opening flows to the same service in the same
    // instant may pick the same slot, which skews the spread by one flow, never more.
    // SAFETY: service points into a map value, valid for this program run.
    let cursor = unsafe {
        let cursor = (*service).rr_cursor;
        (*service).rr_cursor = cursor.wrapping_add(1);
        cursor
    };
    let key = BackendKey {
        service_id: id,
        slot: (cursor % count as u64) as u32,
    };
    // SAFETY: the value is copied out at once.
    XLB_BACKENDS.get_ptr(&key).map(|b| unsafe { *b })
}

/// Creates the forward and reverse entries of a new flow to `backend` over `route`, translated
/// from the route's source address; the forward entry caches the route when its neighbour is
/// resolved. The SNAT port is the first of [`SNAT_PROBES`] candidates (derived from the
/// client tuple's hash) whose reverse key `(backend, snat_ip, backend port, port)` is free or
/// expired, so two flows to the same backend never share a port. Returns the forward entry.
#[inline(always)]
pub fn create(
    flow: &Flow,
    service_id: u32,
    backend: &BackendValue,
    route: &Route,
    now: u64,
) -> Result<CtEntry, u32> {
    let snat_ip = route.src;
    let hash = flow_hash(flow.src, flow.dst, flow.src_port, flow.dst_port, flow.proto);
    let reverse = CtEntry {
        nat_src_ip: flow.dst,
        nat_dst_ip: flow.src,
        nat_src_port: flow.dst_port,
        nat_dst_port: flow.src_port,
        service_id,
        state: CT_STATE_OPEN,
        last_seen_ns: now,
        ..CtEntry::default()
    };
    let mut chosen = 0u16;
    for attempt in 0..SNAT_PROBES {
        let port = snat_port(hash, attempt);
        let key = flow_key(backend.ip, snat_ip, backend.port, port, flow.proto);
        let flags = match XLB_CT_REV.get_ptr(&key) {
            None => BPF_NOEXIST,
            // SAFETY: points into a map value, read once.
            Some(old) if !alive(unsafe { &*old }, flow.proto, now) => BPF_ANY,
            Some(_) => continue,
        };
        if XLB_CT_REV.insert(&key, &reverse, flags as u64).is_ok() {
            chosen = port;
            break;
        }
    }
    if chosen == 0 {
        count(STAT_SNAT_EXHAUSTED);
        return Err(STAT_SNAT_EXHAUSTED);
    }
    let forward = CtEntry {
        nat_src_ip: snat_ip,
        nat_dst_ip: backend.ip,
        nat_src_port: chosen,
        nat_dst_port: backend.port,
        service_id,
        state: CT_STATE_OPEN,
        last_seen_ns: now,
        // 0 (no cached route): the flow's next packet looks the route up again.
        ifindex: if route.resolved { route.ifindex } else { 0 },
        smac: route.smac,
        dmac: route.dmac,
        ..CtEntry::default()
    };
    if XLB_CT_FWD
        .insert(&key_of(flow), &forward, BPF_ANY as u64)
        .is_err()
    {
        let _ = XLB_CT_REV.remove(&forward.peer_key(flow.proto));
        count(STAT_CT_INSERT_FAILED);
        return Err(STAT_CT_INSERT_FAILED);
    }
    Ok(forward)
}
