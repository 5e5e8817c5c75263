//! Connection tracking: flow lookup with expiry, new flows (backend choice, SNAT port),
//! FIN/RST handling.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    btf_maps::LruHashMap,
    helpers::bpf_ktime_get_ns,
};
use lb_common::*;

use crate::{
    maps::{XLB_BACKENDS, XLB_CT_FWD, XLB_CT_REV, count},
    packet::Flow,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

type CtMap = LruHashMap<FlowKey, CtEntry, { MAX_FLOWS as usize }>;

/// Monotonic time in ns (CLOCK_MONOTONIC, like `clock_gettime` in userspace).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The conntrack key of a packet as it arrives.
#[inline(always)]
pub fn key_of(flow: &Flow) -> FlowKey {
    FlowKey {
        src_ip: flow.src,
        dst_ip: flow.dst,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// Whether `entry` is still live at `now`.
#[inline(always)]
pub fn alive(entry: &CtEntry, proto: u8, now: u64) -> bool {
    now.wrapping_sub(entry.last_seen_ns) < ct_timeout_ns(proto, entry.state)
}

/// Moves the flow of `entry` (found in `map`, peer in `peer_map`) to the closing state on
/// a TCP FIN or RST, so both entries expire soon after the connection ends.
#[inline(always)]
pub fn on_tcp_flags(entry: *mut CtEntry, flags: u8, proto: u8, peer_map: &CtMap, now: u64) {
    if flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    // SAFETY: entry points into a map value, valid for this program run.
    let (state, peer_key) = unsafe { ((*entry).state, (*entry).peer_key(proto)) };
    if state == CT_STATE_CLOSING {
        return;
    }
    count(STAT_TCP_CLOSE);
    // SAFETY: as above; plain stores to the value.
    unsafe {
        (*entry).state = CT_STATE_CLOSING;
        (*entry).last_seen_ns = now;
    }
    if let Some(peer) = peer_map.get_ptr_mut(&peer_key) {
        // SAFETY: as above.
        unsafe {
            (*peer).state = CT_STATE_CLOSING;
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

/// Creates the forward and reverse entries of a new flow to `backend`, translated from
/// `snat_ip`. The SNAT port is the first of [`SNAT_PROBES`] candidates (derived from the
/// client tuple's hash) whose reverse key `(backend, snat_ip, backend port, port)` is free or
/// expired, so two flows to the same backend never share a port. Returns the forward entry.
#[inline(always)]
pub fn create(
    flow: &Flow,
    service_id: u32,
    backend: &BackendValue,
    snat_ip: [u8; 4],
    now: u64,
) -> Result<CtEntry, u32> {
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
        let key = FlowKey {
            src_ip: backend.ip,
            dst_ip: snat_ip,
            src_port: backend.port,
            dst_port: port,
            proto: flow.proto,
            _pad: [0; 3],
        };
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
