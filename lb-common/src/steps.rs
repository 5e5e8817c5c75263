//! Steps of the XDP program that a benchmark load may leave out, so `bench_xdp` can time each
//! by its absence in the same run (issue 15). Only the measuring build of the BPF object
//! (`lb-ebpf`'s feature `steps`) has them: it reads the set from its load-time constant
//! [`SKIP_STEPS_GLOBAL`], and as read-only data is frozen the verifier knows the value and
//! treats the branches it rules out as dead code. The object xlb attaches is built without
//! them: reading the constant at each step cost the established path 2-4 ns.

/// Name of the program's `u32` global holding the steps left out (a bit set of `STEP_*`).
pub const SKIP_STEPS_GLOBAL: &str = "XLB_SKIP_STEPS";

/// The global and per-service counters.
pub const STEP_COUNTERS: u32 = 1 << 0;
/// The check that the frame is addressed to the receiving device's MAC.
pub const STEP_MAC_CHECK: u32 = 1 << 1;
/// The route toward the backend of a new flow (next hop or FIB lookup): a fixed route out of
/// the ingress device instead.
pub const STEP_ROUTE: u32 = 1 << 2;
/// The SNAT port probes' lookups (who holds each candidate, in the half-open and open maps):
/// candidates are claimed by insert alone.
pub const STEP_SNAT_PROBE: u32 = 1 << 3;
/// The conntrack lookups a new flow misses before it is known to be new (open forward map and
/// half-open map).
pub const STEP_MISS_LOOKUPS: u32 = 1 << 4;
/// The packet checks beyond bounds (IP header checksum, TCP/UDP header sanity).
pub const STEP_PACKET_CHECKS: u32 = 1 << 5;
/// The redirect helper call that sends a translated packet out of another device in generic
/// XDP (the build the benchmark times): the packet goes back out of the ingress device
/// (`XDP_TX`) instead, as the floor program sends it.
pub const STEP_REDIRECT: u32 = 1 << 6;
/// The clock read (`conntrack::now_ns`): a fixed time of 0 instead, so nothing times out and
/// no entry is refreshed.
pub const STEP_CLOCK: u32 = 1 << 7;

/// Every step with the name `bench_xdp` prints for it.
pub const STEPS: [(u32, &str); 8] = [
    (STEP_COUNTERS, "counters"),
    (STEP_MAC_CHECK, "MAC check"),
    (STEP_ROUTE, "route (next hop / FIB)"),
    (STEP_SNAT_PROBE, "SNAT port probes"),
    (STEP_MISS_LOOKUPS, "conntrack miss lookups"),
    (STEP_PACKET_CHECKS, "packet checks"),
    (STEP_REDIRECT, "redirect (XDP_TX instead)"),
    (STEP_CLOCK, "clock read"),
];
