//! The program's maps, defined BTF-style (`.maps` section) so the loader creates them with key
//! and value BTF and `bpftool map dump` prints readable keys. Layouts live in `lb-common`.

use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{steps::STEP_COUNTERS, *};

use crate::steps::skipped;

/// Services by `(VIP, port, proto)`.
#[btf_map]
pub static XLB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> =
    HashMap::new();

/// Backends by `(service id, slot)`.
#[btf_map]
pub static XLB_BACKENDS: HashMap<BackendKey, BackendValue, { MAX_BACKENDS as usize }> =
    HashMap::new();

/// Set of VIPs (network order), to drop malformed packets addressed to them.
#[btf_map]
pub static XLB_VIPS: HashMap<[u8; 4], VipValue, { MAX_SERVICES as usize }> = HashMap::new();

/// Forward conntrack: client→VIP tuple → rewrite to SNAT→backend.
#[btf_map]
pub static XLB_CT_FWD: LruHashMap<FlowKey, CtEntry, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Reverse conntrack: backend→SNAT tuple → rewrite to VIP→client.
#[btf_map]
pub static XLB_CT_REV: LruHashMap<FlowKey, CtEntry, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Half-open conntrack: both directions of flows whose handshake is not complete, apart from
/// the open flows so that a flood of them evicts only its own kind.
#[btf_map]
pub static XLB_CT_HALF: LruHashMap<FlowKey, CtEntry, { MAX_HALF_OPEN_ENTRIES as usize }> =
    LruHashMap::new();

/// Bit `port % 64` of word `port / 64` is set when `port` is some service's port (filled by
/// userspace): which open map a packet to a SNAT-range port tries first ([`service_port`]).
#[btf_map]
pub static XLB_SERVICE_PORTS: Array<u64, { SERVICE_PORT_WORDS as usize }> = Array::new();

/// Each attached device's MAC, at `ifindex % MAX_DEVICE_MACS` (filled by userspace).
#[btf_map]
pub static XLB_DEV_MACS: Array<DeviceMac, { MAX_DEVICE_MACS as usize }> = Array::new();

/// Devices that accept frames from native XDP, by ifindex (filled by userspace).
#[btf_map]
pub static XLB_XMIT: DevMapHash<{ MAX_XMIT_DEVICES as usize }> = DevMapHash::new();

/// Next hop toward each backend, by backend address (filled by userspace).
#[btf_map]
pub static XLB_NEXT_HOPS: HashMap<[u8; 4], NextHop, { MAX_BACKENDS as usize }> = HashMap::new();

/// Extra SNAT addresses by own source address (filled by userspace).
#[btf_map]
pub static XLB_SNAT_ADDRS: HashMap<[u8; 4], SnatAddrs, { MAX_SNAT_SOURCES as usize }> =
    HashMap::new();

/// Global per-CPU counters indexed by `lb_common::STAT_*`.
#[btf_map]
pub static XLB_STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Per-service per-CPU counters indexed by service id.
#[btf_map]
pub static XLB_SVC_STATS: PerCpuArray<ServiceStats, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Per-CPU clock cache, private to the program (not pinned, userspace never reads it):
/// `[jiffies, CLOCK_MONOTONIC_COARSE ns read at that jiffy]`, see `conntrack::now_ns`.
#[btf_map]
pub static XLB_CLOCK: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

/// Per-CPU scratch space for the 64-byte `bpf_fib_lookup` parameters (kept off the 512-byte
/// BPF stack), private to the program (not pinned).
#[btf_map]
pub static XLB_FIB_SCRATCH: PerCpuArray<[u64; 8], 1> = PerCpuArray::new();

/// Per-CPU scratch space where a new flow's two entries are built (off the BPF stack),
/// private to the program (not pinned).
#[btf_map]
pub static XLB_CT_SCRATCH: PerCpuArray<CtEntry, 2> = PerCpuArray::new();

/// Per-CPU scratch list of a new flow's SNAT addresses (`snat::prepare`), private to the
/// program (not pinned).
#[btf_map]
pub static XLB_SNAT_SCRATCH: PerCpuArray<[u32; crate::snat::SCRATCH_WORDS], 1> = PerCpuArray::new();

/// Per-CPU scratch slot for the result of a FIB lookup (`forward::route`), private to the
/// program (not pinned).
#[btf_map]
pub static XLB_ROUTE_SCRATCH: PerCpuArray<crate::forward::Route, 1> = PerCpuArray::new();

/// The XDP new-flow programs (`lb_common::NEW_FLOW_XDP_MAP`).
#[btf_map]
pub static XLB_NEW_FLOW_XDP: ProgramArray<2> = ProgramArray::new();

/// The TC new-flow program (`lb_common::NEW_FLOW_TC_MAP`).
#[btf_map]
pub static XLB_NEW_FLOW_TC: ProgramArray<1> = ProgramArray::new();

/// Adds one to global counter `index`.
#[inline(always)]
pub fn count(index: u32) {
    if skipped(STEP_COUNTERS) {
        return;
    }
    if let Some(counter) = XLB_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Counts one packet of `bytes` for service `id`, and a new flow when `new_flow`.
#[inline(always)]
pub fn count_service(id: u32, bytes: u64, new_flow: u64) {
    if skipped(STEP_COUNTERS) {
        return;
    }
    if let Some(stats) = XLB_SVC_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
            (*stats).new_flows += new_flow;
        }
    }
}

/// Whether `port` (host order) is some service's port (`XLB_SERVICE_PORTS`). Only an ordering
/// hint: a packet is looked up in both open maps either way. An array lookup, which the
/// verifier inlines.
#[inline(always)]
pub fn service_port(port: u16) -> bool {
    match XLB_SERVICE_PORTS.get(u32::from(port / 64)) {
        Some(word) => (word >> (port % 64)) & 1 != 0,
        None => false,
    }
}
