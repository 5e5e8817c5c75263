//! Connection tracking: flow lookup with expiry, new flows (backend choice, SNAT port),
//! half-open flows and their promotion, FIN/RST handling.
//!
//! A flow starts half-open: both its entries (forward, keyed by the client tuple; reverse,
//! keyed by the backend → SNAT tuple) go to `XLB_CT_HALF`, a small LRU of its own. It becomes
//! open when the handshake completes (TCP: the client's ACK after the backend's SYN-ACK, which
//! a spoofed source never sends; UDP: the client's datagram after a reply) and then moves to
//! `XLB_CT_FWD` / `XLB_CT_REV`. A flood of SYNs thus fills and evicts only the half-open map.
//! Every lookup that finds an entry whose peer is missing deletes it (forward and reverse
//! live and die together), and every deletion deletes both.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xchg};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    steps::{STEP_CLOCK, STEP_MAC_CHECK, STEP_SNAT_PROBE},
    *,
};

use crate::{
    forward::Route,
    frame::Frame,
    maps::{
        XLB_BACKENDS, XLB_CLOCK, XLB_CT_FWD, XLB_CT_HALF, XLB_CT_REV, XLB_CT_SCRATCH, XLB_DEV_MACS,
        count,
    },
    packet::{Flow, ptr_at},
    snat,
    steps::skipped,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// TCP flags that decide how a segment moves a flow.
pub const TCP_CONTROL: u8 = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK;

/// Which way a tracked packet goes: its entry is in the forward map (from the client) or in
/// the reverse map (from the backend); the peer entry is in the other.
#[derive(Clone, Copy)]
pub enum Direction {
    FromClient,
    FromBackend,
}

/// The ordering the atomic intrinsics below ask for; BPF's atomic instructions are full barriers.
const SEQ_CST: AtomicOrdering = AtomicOrdering::SeqCst;

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
    if skipped(STEP_CLOCK) {
        return 0;
    }
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
    alive_since(entry.last_seen_ns, entry.state, proto, now)
}

/// Whether an entry in `state` stamped `seen` is still live at `now`, as [`alive`].
#[inline(always)]
pub fn alive_since(seen: u64, state: u32, proto: u8, now: u64) -> bool {
    now.saturating_sub(seen) < ct_timeout_ns(proto, state)
}

/// The stamp of a half-open entry that a CPU has claimed, to delete it or to write a new flow's
/// entry over it: later than any `now`, so every other CPU finds the entry alive and just
/// seen, and leaves it alone.
const CLAIMED: u64 = u64::MAX;

/// Claims the half-open entry `e`, judged by its stamp `seen`: swaps the stamp for [`CLAIMED`]
/// in one atomic step, which succeeds only while the stamp is still `seen`.
/// Of the CPUs that judged an entry by one stamp only one wins; the others would otherwise
/// delete whatever took its key meanwhile (two new flows wanting one stale SNAT port: the
/// winner's fresh reverse entry, so both flows would hold the port). A packet of the flow
/// [`restamp`]s the entry, so a claim judged before it fails too.
#[inline(always)]
fn claim(e: *mut CtEntry, seen: u64) -> bool {
    // SAFETY: e points into a map value, valid for this program run; the stamp is an aligned
    // u64 (offset 24 of an 8-aligned value), which BPF's atomic instructions need.
    unsafe { atomic_cxchg::<u64, SEQ_CST, SEQ_CST>(&raw mut (*e).last_seen_ns, seen, CLAIMED).1 }
}

/// Stamps the half-open entry `e`, judged by its stamp `seen`, `now` for a packet of its flow:
/// in one atomic step, which succeeds only while the stamp is still `seen` and no CPU has
/// [`claim`]ed the entry. A claim and a restamp of one stamp thus exclude each other: a packet
/// whose restamp succeeded read the flow's entries before any CPU could claim them, and may
/// act on what it read (open the flow, say), while a claim that succeeded leaves the packet's
/// restamp to fail. `false` also when another CPU restamped the entry between the read and
/// now, for a packet of the same flow.
#[inline(always)]
pub fn restamp(e: *mut CtEntry, seen: u64, now: u64) -> bool {
    // SAFETY: as in claim.
    seen != CLAIMED
        && unsafe { atomic_cxchg::<u64, SEQ_CST, SEQ_CST>(&raw mut (*e).last_seen_ns, seen, now).1 }
}

/// Ends this CPU's [`claim`] on `e`, whose other fields it has written: stamps it `now` with
/// an atomic exchange, a full barrier, so no CPU sees the stamp before those fields.
#[inline(always)]
fn release(e: *mut CtEntry, now: u64) {
    // SAFETY: as in claim.
    unsafe { atomic_xchg::<u64, SEQ_CST>(&raw mut (*e).last_seen_ns, now) };
}

/// The stamp of `e`, read once: what a claim on it is judged by.
#[inline(always)]
pub fn stamp(e: *const CtEntry) -> u64 {
    // SAFETY: e points into a map value, valid for this program run.
    unsafe { core::ptr::read_volatile(&raw const (*e).last_seen_ns) }
}

/// Moves the flow of `entry` (a packet going `direction`) and its peer entry out of the open
/// state on the flow's first TCP FIN or RST, so both expire soon after the connection ends: to
/// [`CT_STATE_TIME_WAIT`] when the backend sent that FIN, to [`CT_STATE_CLOSING`] otherwise;
/// from [`CT_STATE_CLOSING`] to [`CT_STATE_CLOSED`] on the backend's FIN; and from
/// [`CT_STATE_CLOSED`] to [`CT_STATE_CLOSED_ACKED`] on the client's last ACK.
#[inline(always)]
pub fn on_tcp_flags(entry: *mut CtEntry, flags: u8, direction: Direction, now: u64) {
    // SAFETY: entry points into a map value, valid for this program run.
    let state = unsafe { (*entry).state };
    let last_ack = state == CT_STATE_CLOSED
        && matches!(direction, Direction::FromClient)
        && flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK) == TCP_ACK;
    if flags & (TCP_FIN | TCP_RST) == 0 && !last_ack {
        return;
    }
    // SAFETY: as above.
    let peer_key = unsafe { (*entry).peer_key(IPPROTO_TCP) };
    let backend_fin = matches!(direction, Direction::FromBackend) && flags & TCP_RST == 0;
    let (state, peer_map) = if last_ack {
        // Both sides closed and the client acknowledged the backend's FIN: the port may
        // serve a new flow at once (see CT_STATE_CLOSED_ACKED for a lost ACK).
        (CT_STATE_CLOSED_ACKED, &XLB_CT_REV)
    } else if state == CT_STATE_OPEN {
        count(STAT_TCP_CLOSE);
        match direction {
            Direction::FromBackend if backend_fin => (CT_STATE_TIME_WAIT, &XLB_CT_FWD),
            Direction::FromBackend => (CT_STATE_CLOSING, &XLB_CT_FWD),
            Direction::FromClient => (CT_STATE_CLOSING, &XLB_CT_REV),
        }
    } else if state == CT_STATE_CLOSING && backend_fin {
        // The client closed first and now the backend too: the backend's socket ends with the
        // client's last ACK, without TIME_WAIT, so the port can serve again soon.
        (CT_STATE_CLOSED, &XLB_CT_FWD)
    } else {
        return;
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
pub fn pick_backend(service: *mut ServiceValue) -> Option<&'static BackendValue> {
    // SAFETY: service points into a map value, valid for this program run.
    let (id, count) = unsafe { ((*service).id, (*service).backend_count) };
    if count == 0 || count > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    // Bumped with a plain load and store: LLVM rejects a fetch-and-add whose old value is used
    // when it builds for the generic BPF cpu, as this object is built ("Invalid usage of the
    // XADD return value"). Two CPUs opening flows to the same service in the same instant may
    // thus pick the same slot, which skews the spread by one flow, never more.
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
    // SAFETY: points into a map value, valid for this program run (not copied: the BPF stack
    // is short).
    XLB_BACKENDS.get_ptr(&key).map(|b| unsafe { &*b })
}

/// Whether the Ethernet destination of the frame is the MAC of the device it came in on (as
/// registered by userspace in `XLB_DEV_MACS`). A frame for another host (a bridge flooding
/// unknown unicast), a broadcast or multicast frame, or a frame on an unregistered device is
/// never translated.
#[inline(always)]
pub fn to_our_mac<F: Frame>(ctx: &F) -> bool {
    if skipped(STEP_MAC_CHECK) {
        return true;
    }
    let ifindex = ctx.ingress_ifindex();
    let Some(dev) = XLB_DEV_MACS.get_ptr(ifindex & (MAX_DEVICE_MACS - 1)) else {
        return false;
    };
    // The destination MAC, in 16-bit words.
    let Some(eth) = ptr_at::<[u16; 3]>(ctx, 0) else {
        return false;
    };
    // SAFETY: dev points into a map value and eth into the frame (bounds checked); both are
    // read once.
    let (dev, dst) = unsafe { (*dev, (*eth).0) };
    let mut diff = 0u16;
    for (i, word) in dst.iter().enumerate() {
        diff |= word ^ u16::from_ne_bytes([dev.mac[2 * i], dev.mac[2 * i + 1]]);
    }
    dev.ifindex == ifindex && diff == 0
}

/// Deletes the open flow whose entry `e` sits at `key` in the map of `direction`, and its peer
/// in the other open map when that peer points back to `key`: open flows live and die whole.
#[inline(always)]
pub fn delete_open_pair(direction: Direction, key: &FlowKey, e: &CtEntry, proto: u8) {
    let (own, peer_map) = match direction {
        Direction::FromClient => (&XLB_CT_FWD, &XLB_CT_REV),
        Direction::FromBackend => (&XLB_CT_REV, &XLB_CT_FWD),
    };
    let peer_key = e.peer_key(proto);
    if let Some(peer) = peer_map.get_ptr(&peer_key)
        // SAFETY: points into a map value, read once.
        && CtEntry::is_peer_of(key, unsafe { &*peer })
    {
        let _ = peer_map.remove(&peer_key);
    }
    let _ = own.remove(key);
}

/// Claims the half-open flow whose entry `e` sits at `key`, judged by its stamp `seen`, and
/// deletes its peer when that peer points back to `key`. `false` when this CPU did not win the
/// [`claim`] (another CPU claimed the entry first or a packet restamped it); `true` leaves `e`
/// to the caller, claimed, to delete or to write a new flow's entry over.
#[inline(always)]
fn claim_half_pair(key: &FlowKey, e: *mut CtEntry, seen: u64) -> bool {
    if !claim(e, seen) {
        return false;
    }
    // SAFETY: e points into a map value, valid for this program run; claimed, so no other CPU
    // deletes it or reuses its key until this CPU is done with it.
    let peer_key = unsafe { (*e).peer_key(key.proto) };
    if let Some(peer) = XLB_CT_HALF.get_ptr(&peer_key)
        // SAFETY: points into a map value, read once.
        && CtEntry::is_peer_of(key, unsafe { &*peer })
    {
        let _ = XLB_CT_HALF.remove(&peer_key);
    }
    true
}

/// Deletes the half-open flow whose entry `e` sits at `key`, judged by its stamp `seen`, and
/// its peer when that peer points back to `key`, if this CPU wins the [`claim`] on `e`.
#[inline(always)]
pub fn delete_half_pair(key: &FlowKey, e: *mut CtEntry, seen: u64) -> bool {
    if !claim_half_pair(key, e, seen) {
        return false;
    }
    let _ = XLB_CT_HALF.remove(key);
    true
}

/// Deletes the half-open entry `e` at `key`, found without its peer, unless another CPU has
/// claimed it (it is then deleted or taken over by that CPU).
#[inline(always)]
pub fn delete_half_orphan(key: &FlowKey, e: *mut CtEntry) {
    let seen = stamp(e);
    if seen != CLAIMED && claim(e, seen) {
        let _ = XLB_CT_HALF.remove(key);
    }
}

/// Whether the open flow whose entry `e` sits at `key` in the map of `direction` has its peer
/// in the other open map, pointing back.
#[inline(always)]
pub fn open_peer_ok(direction: Direction, key: &FlowKey, e: &CtEntry, proto: u8) -> bool {
    let peer_map = match direction {
        Direction::FromClient => &XLB_CT_REV,
        Direction::FromBackend => &XLB_CT_FWD,
    };
    match peer_map.get_ptr(&e.peer_key(proto)) {
        // SAFETY: points into a map value, read once.
        Some(peer) => CtEntry::is_peer_of(key, unsafe { &*peer }),
        None => false,
    }
}

/// Why SNAT port key `key`'s half-open flow, idle `idle` ns in `state`, may give the port up
/// (the counter to bump): it timed out, or is a TCP flow idle for more than
/// [`CT_HALF_OPEN_RECLAIM_NS`] (an early drop). `None` while it keeps it. Its peer is not
/// looked at: under a flood that was one more cache-cold lookup for every held port every new
/// flow probed; a reverse entry that lost its forward one to the LRU is never used (see
/// `half_open`), and gives its port back when it times out or is dropped early.
#[inline(always)]
fn half_open_gives_way(idle: u64, state: u32, proto: u8) -> Option<u32> {
    if idle >= ct_timeout_ns(proto, state) {
        Some(STAT_HALF_OPEN_TIMEOUT)
    } else if proto == IPPROTO_TCP && idle > CT_HALF_OPEN_RECLAIM_NS {
        Some(STAT_EARLY_DROP)
    } else {
        None
    }
}

/// Takes SNAT port key `key` from the half-open flow whose entry `old` sits there, judged by
/// its stamp `seen`, for the new flow whose reverse entry is `reverse`: claims `old`, deletes
/// its peer, and writes `reverse` over it in place, the stamp last. Unlike a delete and an
/// insert this takes no node from the LRU, which under a flood is full and would evict for it.
/// Until the stamp is written other CPUs leave the entry alone (claimed), and a packet that
/// reads it half written finds no forward entry pointing back to it (the old flow's is gone,
/// the new flow's comes after) and is not translated by it. Counts `reason` when it took the
/// key; `false` when the claim was lost.
/// The open map is not asked whether an open flow holds the key too (under a flood, one more
/// cache-cold lookup per new flow): none does while a half-open flow holds it, but for the
/// moment a packet of that flow opens it (its reverse entry is written to the open map before
/// the half-open one is deleted), and that packet first [`restamp`]ed the entry, which leaves
/// the entry fresh and any claim judged before it failing.
///
/// Not inlined (a BPF subprogram): its keys would overflow the caller's share of the
/// 512-byte BPF stack.
#[inline(never)]
fn take_over(key: &FlowKey, old: *mut CtEntry, seen: u64, reverse: &CtEntry, reason: u32) -> bool {
    if !claim_half_pair(key, old, seen) {
        return false;
    }
    count(reason);
    // SAFETY: old points into a map value, valid for this program run, claimed by this CPU.
    unsafe {
        *old = CtEntry {
            last_seen_ns: CLAIMED,
            ..*reverse
        };
    }
    release(old, reverse.last_seen_ns);
    true
}

/// Whether SNAT port key `key` may be taken from the open flow `old` found there in the
/// reverse map (both its entries are deleted if so): it expired, both sides closed it and the
/// client's last ACK went by, or it lost its forward entry.
///
/// Not inlined, as [`take_over`].
#[inline(never)]
fn take_open(key: &FlowKey, old: &CtEntry, proto: u8, now: u64) -> bool {
    if !alive(old, proto, now) {
        count(STAT_CT_EXPIRED);
    } else if old.state == CT_STATE_CLOSED_ACKED {
        count(STAT_CLOSED_REUSED);
    } else if open_peer_ok(Direction::FromBackend, key, old, proto) {
        return false;
    } else {
        count(STAT_CT_ORPHAN);
    }
    delete_open_pair(Direction::FromBackend, key, old, proto);
    true
}

/// Whether SNAT port key `key` is held by no live open flow: none is in the reverse map, or the
/// one there gives it up ([`take_open`]).
#[inline(always)]
fn free_of_open_flows(key: &FlowKey, now: u64) -> bool {
    match XLB_CT_REV.get_ptr(key) {
        // SAFETY: points into a map value, valid for this program run.
        Some(old) => take_open(key, unsafe { &*old }, key.proto, now),
        None => true,
    }
}

/// Creates the half-open forward and reverse entries of a new flow to `backend` over `route`,
/// translated from the route's source address or one of its extra SNAT addresses
/// (`XLB_SNAT_ADDRS`); the forward entry caches the route when its neighbour is resolved. The
/// SNAT address and port are the first of [`SNAT_PROBES`] candidates (derived from the client
/// tuple's hash, going round the addresses) whose reverse key
/// `(backend, snat_ip, backend port, port)` is held by no live flow, half-open or open. A
/// candidate held by a flow that timed out, (open) lost its peer, both of whose sides closed, or
/// (TCP) that stayed half-open past [`CT_HALF_OPEN_RECLAIM_NS`] is taken over: a half-open
/// flow's reverse entry by [`take_over`] (a [`claim`], then the new entry written in its
/// place), an open flow's entries deleted and the port then claimed with `BPF_NOEXIST`; either
/// way, of two CPUs racing for it exactly one wins and the other probes on. The half-open map is checked
/// before the open map: a flow is written to the open maps before it leaves the half-open
/// one, so a port cannot slip between the two checks (a port a half-open flow holds is not
/// looked up in the open map, see [`take_over`]). When every candidate is held, or
/// (TCP) [`SNAT_PROBES_BEFORE_EARLY_DROP`] are and the next by a half-open flow, or
/// [`SNAT_PROBES_BEFORE_IDLE_EARLY_DROP`] are and one of them could already give way, the one
/// held by the longest idle half-open TCP flow seen is taken over if that flow has been idle
/// for at least [`CT_HALF_OPEN_MIN_RECLAIM_NS`] (an early drop under pressure, as Linux drops
/// an unassured entry when its table is full). Returns the forward entry (in a
/// per-CPU scratch slot, valid for this program run), null (counted) when no port or no
/// entry could be had. Both entries are built in per-CPU scratch slots: the 512-byte BPF
/// stack is short.
#[inline(always)]
pub fn create(
    flow: &Flow,
    backend: &BackendValue,
    route: &Route,
    now: u64,
    service_id: u32,
) -> *const CtEntry {
    let null = core::ptr::null();
    let (Some(reverse), Some(forward)) =
        (XLB_CT_SCRATCH.get_ptr_mut(0), XLB_CT_SCRATCH.get_ptr_mut(1))
    else {
        return null;
    };
    let proto = flow.proto;
    let hash = flow_hash(flow.src, flow.dst, flow.src_port, flow.dst_port, proto);
    if !snat::prepare(route.src, hash) {
        return null;
    }
    let ports = snat::ports();
    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
    unsafe {
        *reverse = CtEntry {
            nat_src_ip: flow.dst,
            nat_dst_ip: flow.src,
            nat_src_port: flow.dst_port,
            nat_dst_port: flow.src_port,
            service_id,
            state: CT_STATE_HALF_OPEN,
            last_seen_ns: now,
            dir: CT_DIR_REVERSE,
            ..CtEntry::default()
        };
    }
    let mut chosen = 0u16;
    let mut snat_ip = route.src;
    // The longest idle live half-open TCP flow among the candidates, taken over when every
    // candidate is held (Linux's early_drop when its table is full).
    // One word, `idle ns << 19 | address index << 16 | port`, so it costs one stack slot:
    // idle times are seconds, far below 2^45 ns.
    let mut oldest = 0u64;
    // The candidate the reverse entry's sums were last computed for: the next one's differ
    // in the port only while the address is the same (always, with one SNAT address).
    let mut sums_ip = [0u8; 4];
    let mut sums_port = 0u16;
    // Candidates go round the SNAT addresses (from one the hash picks), each with the next
    // port of the sequence, so no (address, port) pair repeats and every address takes its
    // share.
    for attempt in 0..SNAT_PROBES {
        let port = snat_port(ports, hash, attempt);
        let this = snat::candidate(attempt);
        let ip = snat::address(this);
        let key = flow_key(backend.ip, ip, backend.port, port, proto);
        // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
        let entry = unsafe {
            (*reverse).sums = sums_at(&*reverse, &key, sums_ip, sums_port);
            &*reverse
        };
        (sums_ip, sums_port) = (ip, port);
        let won = if skipped(STEP_SNAT_PROBE) {
            // The claim alone: no look at who holds the candidate.
            XLB_CT_HALF.insert(&key, entry, BPF_NOEXIST as u64).is_ok()
        } else if let Some(old) = XLB_CT_HALF.get_ptr_mut(&key) {
            let seen = stamp(old);
            let idle = now.saturating_sub(seen);
            // SAFETY: points into a map value, valid for this program run.
            let Some(reason) = half_open_gives_way(idle, unsafe { (*old).state }, proto) else {
                let candidate = (idle << 19) | (this as u64) << 16 | port as u64;
                if candidate > oldest {
                    oldest = candidate;
                }
                let held = attempt + 1;
                if proto == IPPROTO_TCP
                    && (held >= SNAT_PROBES_BEFORE_EARLY_DROP
                        || (held >= SNAT_PROBES_BEFORE_IDLE_EARLY_DROP
                            && oldest >> 19 >= CT_HALF_OPEN_MIN_RECLAIM_NS))
                {
                    // Under pressure (a flood holds the ports): the early drop below now
                    // rather than probing on through ports the flood holds just as well.
                    break;
                }
                continue;
            };
            take_over(&key, old, seen, entry, reason)
        } else {
            free_of_open_flows(&key, now)
                && XLB_CT_HALF.insert(&key, entry, BPF_NOEXIST as u64).is_ok()
        };
        if won {
            chosen = port;
            snat_ip = ip;
            break;
        }
    }
    // Through memory, so the verifier cannot tell one probe path's `oldest` from another's:
    // its value decides a branch and an index below, and the verifier would otherwise keep
    // apart (and check again) every path through the probes that left a different one. The
    // forward scratch slot is free until the forward entry is built in it below.
    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
    let oldest = unsafe {
        (*forward).last_seen_ns = oldest;
        core::ptr::read_volatile(&raw const (*forward).last_seen_ns)
    };
    if chosen == 0 && proto == IPPROTO_TCP && oldest >> 19 >= CT_HALF_OPEN_MIN_RECLAIM_NS {
        let oldest_port = oldest as u16;
        let ip = snat::address((oldest >> 16) as u32);
        let key = flow_key(backend.ip, ip, backend.port, oldest_port, proto);
        // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
        unsafe { (*reverse).sums = sums_at(&*reverse, &key, sums_ip, sums_port) };
        let taken = match XLB_CT_HALF.get_ptr_mut(&key) {
            Some(old) => {
                let seen = stamp(old);
                now.saturating_sub(seen) >= CT_HALF_OPEN_MIN_RECLAIM_NS
                    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
                    && take_over(&key, old, seen, unsafe { &*reverse }, STAT_EARLY_DROP)
            }
            // Gone meanwhile (evicted): free unless an open flow holds it.
            None => {
                free_of_open_flows(&key, now)
                    && XLB_CT_HALF
                        // SAFETY: as above.
                        .insert(&key, unsafe { &*reverse }, BPF_NOEXIST as u64)
                        .is_ok()
            }
        };
        if taken {
            chosen = oldest_port;
            snat_ip = ip;
        }
    }
    if chosen == 0 {
        count(STAT_SNAT_EXHAUSTED);
        return null;
    }
    // SAFETY: as above.
    let forward = unsafe { &mut *forward };
    *forward = CtEntry {
        nat_src_ip: snat_ip,
        nat_dst_ip: backend.ip,
        nat_src_port: chosen,
        nat_dst_port: backend.port,
        service_id,
        state: CT_STATE_HALF_OPEN,
        last_seen_ns: now,
        // 0 (no cached route): the flow's next packet looks the route up again.
        ifindex: if route.resolved { route.ifindex } else { 0 },
        smac: route.smac,
        dmac: route.dmac,
        dir: CT_DIR_FORWARD,
        ..CtEntry::default()
    };
    let forward_key = key_of(flow);
    forward.sums = RewriteSums::of(&forward_key, forward);
    if XLB_CT_HALF
        .insert(&forward_key, &*forward, BPF_ANY as u64)
        .is_err()
    {
        let _ = XLB_CT_HALF.remove(&forward.peer_key(proto));
        count(STAT_CT_INSERT_FAILED);
        return null;
    }
    forward
}

/// The sums of the reverse entry `entry` at SNAT candidate `key`, from its sums at the last
/// candidate (`ip`, `port`) when `key` has the same address.
#[inline(always)]
fn sums_at(entry: &CtEntry, key: &FlowKey, ip: [u8; 4], port: u16) -> RewriteSums {
    if key.dst_ip == ip {
        entry.sums.at_dst_port(port, key.dst_port)
    } else {
        RewriteSums::of(key, entry)
    }
}

/// Moves a half-open flow (forward entry `fwd` at `fwd_key`, reverse entry `rev` at its peer
/// key) to the open maps: reverse entry first, then forward, then both half-open entries are
/// deleted (see [`create`] for why in that order). `false` (counted) when an insert failed;
/// the flow then stays half-open.
#[inline(always)]
pub fn open(fwd_key: &FlowKey, fwd: &CtEntry, rev: &CtEntry, proto: u8, now: u64) -> bool {
    let rev_key = fwd.peer_key(proto);
    let mut rev = *rev;
    rev.state = CT_STATE_OPEN;
    rev.last_seen_ns = now;
    let mut fwd = *fwd;
    fwd.state = CT_STATE_OPEN;
    fwd.last_seen_ns = now;
    if XLB_CT_REV.insert(&rev_key, &rev, BPF_ANY as u64).is_err() {
        count(STAT_OPEN_INSERT_FAILED);
        return false;
    }
    if XLB_CT_FWD.insert(fwd_key, &fwd, BPF_ANY as u64).is_err() {
        let _ = XLB_CT_REV.remove(&rev_key);
        count(STAT_OPEN_INSERT_FAILED);
        return false;
    }
    let _ = XLB_CT_HALF.remove(fwd_key);
    let _ = XLB_CT_HALF.remove(&rev_key);
    count(STAT_FLOW_OPENED);
    true
}
