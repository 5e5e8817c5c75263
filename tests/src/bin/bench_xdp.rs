//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN` (kernel-measured mean over a
//! large repeat count), beside two baselines measured in the same run (issue 15): the floor
//! program `xlb_floor` (one conntrack lookup, DNAT rewrite with incremental checksums,
//! `XDP_TX`) and the do-nothing `xlb_noop`. Every figure is the minimum and median of
//! interleaved rounds, ratios are of minima (noise on a shared machine only adds time), and the
//! run is headed by the CPU model and its mitigation state.
//!
//! `bench_xdp [REPEAT]` (root). A repeated test run hands the program the *same buffer* each
//! time, so whatever the program wrote stays: a frame that xlb translates is, from the second
//! repeat on, a different packet. Each path is therefore set up so that every repeat takes it,
//! and the bench checks that with the path's counter (it must grow by exactly `REPEAT`):
//!
//! - established: a forward conntrack entry of a flow to a service whose translation is the
//!   identity (written by the bench), so every repeat is a forward hit with the full rewrite,
//!   cached route and redirect;
//! - reply: the same with a reverse entry (destination port in the SNAT range);
//! - not for us: TCP to an address that is neither a VIP nor tracked; ARP;
//! - new flow: a service whose only backend is its own `VIP:port`, so the translated SYN
//!   (`SNAT address:fresh port → VIP:port`) is again a SYN of an untracked flow to a service:
//!   every repeat creates a flow (backend pick, next hop or FIB lookup, SNAT port probe, both
//!   inserts); with the backend's next hop, and without it (FIB lookup);
//! - new flow with full tables: the same after a flood of distinct SYNs has filled the
//!   half-open table and holds every SNAT port toward the backend;
//! - a handshake's later packets, the backend's SYN-ACK and the client's ACK that opens the
//!   flow: half-open flows written in a chain, so that each one's translated packet is the
//!   next one's ([`write_chain`]), every repeat a flow of its own.
//!
//! Where the time goes: the measuring build of the program (feature `steps`) loaded with one
//! step left out at a time (the load-time constant `XLB_SKIP_STEPS`, see `lb_common::steps`),
//! timed on the new-flow and established paths in the same interleaved rounds as the whole
//! measuring build and the program as xlb attaches it, which has no step switches: the
//! difference is what reading them costs.
//!
//! Then a SYN flood (issue 14, item 3): spoofed SYNs paced at 50,000 and 100,000 per second
//! toward a 3-backend service while legitimate clients open 1,000 connections per second; it
//! prints the share of legitimate SYNs that took the XDP path and the cost of a flood SYN
//! beside a legitimate one.
//!
//! `bench_xdp profile [SECS] [full|ack]` only opens new flows, in a loop, for a sampling
//! profiler (see [`profile_new_flows`]); with `full`, into full tables
//! ([`profile_full_tables`]); with `ack`, it times handshakes' opening ACKs instead
//! ([`profile_opening_acks`]).
//!
//! `bench_xdp capacity` instead drives whole flows (TCP closed by the client first, TCP closed
//! by the backend first, UDP query and answer) at issue 14's target rates toward one backend
//! for three hold times each and prints the share refused (item 4); it takes about 5 minutes,
//! so `cargo xtask bench` does not run it. See [`capacity_main`] for its arguments.

use std::net::Ipv4Addr;

use aya::maps::ProgramArray;
use aya::programs::{TestRun, TestRunOptions, TestRunResult, Xdp};
use aya::{Ebpf, EbpfLoader};
use lb_common::steps::{
    SKIP_STEPS_GLOBAL, STEP_CLOCK, STEP_COUNTERS, STEP_MAC_CHECK, STEP_PACKET_CHECKS,
    STEP_REDIRECT, STEP_ROUTE, STEPS,
};
use lb_common::{
    ALL_MAPS, CT_DIR_FORWARD, CT_DIR_REVERSE, CT_FWD_MAP, CT_HALF_MAP, CT_HALF_OPEN_MIN_RECLAIM_NS,
    CT_REV_MAP, CT_STATE_HALF_OPEN, CT_STATE_HALF_OPEN_REPLIED, CT_STATE_OPEN, CtEntry, FlowKey,
    IPPROTO_TCP, MAX_HALF_OPEN_ENTRIES, NEW_FLOW_SLOT_GENERIC, NEW_FLOW_XDP_MAP, NEXT_HOPS_MAP,
    NextHop, PROGRAM_FLOOR, PROGRAM_GENERIC, PROGRAM_NATIVE, PROGRAM_NEW_FLOW_GENERIC,
    PROGRAM_NEW_FLOW_NATIVE, PROGRAM_NEW_FLOW_TC, PROGRAM_NOOP, PROGRAM_TC, SNAT_PORTS_DEFAULT,
    STAT_CT_HIT, STAT_CT_REPLY, STAT_EARLY_DROP, STAT_FLOW_OPENED, STAT_HALF_OPEN_HIT, STAT_NAMES,
    STAT_NEW_FLOW, STAT_NOT_IPV4, STAT_NOT_OURS, STAT_SNAT_EXHAUSTED,
};
use xlb::dataplane::xdp::BPF_OBJECT_STEPS;
use xlb::model::Protocol;
use xlb_tests::fixture::{
    Fixture, LB_BACKEND_IP, LB_BACKEND_MAC, LO_IFINDEX, host_mac, sa, service,
};
use xlb_tests::pkt::{self, ACK, FIN, PSH, RST, SYN};

/// `XDP_TX`: the translated packet goes back out of the device it came in on.
const XDP_TX: u32 = 3;
/// `XDP_REDIRECT`: the translated packet is sent on (the XDP path).
const XDP_REDIRECT: u32 = 4;

const VIP: [u8; 4] = [198, 51, 100, 10];
const CLIENT: [u8; 4] = [192, 0, 2, 1];
const BACKEND: [u8; 4] = [203, 0, 113, 2];
/// A host behind the fixture's backend device that is also a service address (its own
/// backend), for the new-flow loop.
const SELF_VIP: [u8; 4] = [203, 0, 113, 4];
/// A client port in the SNAT range, for the reverse entry.
const REPLY_PORT: u16 = 20000;
/// A service port inside the default SNAT range (1024-32767): a client's packet to it is
/// looked up in the forward map first (`XLB_SERVICE_PORTS`), not after a reverse-map miss.
const SNAT_RANGE_SERVICE_PORT: u16 = 8080;

/// A conntrack entry translating `key` to itself.
fn identity(key: &FlowKey) -> CtEntry {
    CtEntry {
        nat_src_ip: key.src_ip,
        nat_dst_ip: key.dst_ip,
        nat_src_port: key.src_port,
        nat_dst_port: key.dst_port,
        service_id: 0,
        state: CT_STATE_OPEN,
        last_seen_ns: xlb::inspect::monotonic_ns(),
        ..CtEntry::default()
    }
    .with_sums(key)
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        src_ip: src,
        dst_ip: dst,
        src_port: sport,
        dst_port: dport,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// Rounds each figure is measured in, interleaved with its comparisons; the median is printed.
const ROUNDS: usize = 9;
/// Rounds of a new-flow measurement from an empty half-open table: one takes about 2 ms, so
/// a stray interrupt weighs more, and more rounds keep the minimum steady.
const NEW_FLOW_ROUNDS: usize = 31;
/// Rounds of a new-flow measurement into full tables: each first floods them (seconds).
const FULL_TABLE_ROUNDS: usize = 5;
/// Repeats of one new-flow measurement: each repeat opens a flow, so the half-open table is
/// emptied between measurements (the SNAT ports toward the one backend would run out).
const NEW_FLOW_REPEAT: u32 = 2000;
/// Repeats of one new-flow measurement into full tables. Every port is held there, so each
/// repeat's flow takes a port from a flood flow (an early drop), and the loop's own flows are
/// too young to give theirs up: a tuple whose probed ports are all among them is refused, as
/// designed, and the next repeats are that same refused packet. A round ends so with a
/// chance of about Σ (k / ports)⁴ over its repeats k (`SNAT_PROBES_BEFORE_EARLY_DROP` = 4
/// probed ports): 0.6% with 2000 repeats (2 rounds of about 185 fell short; the one whose
/// counters were recorded was this, `snat_exhausted`), 0.02% with 1000.
const FULL_TABLE_REPEAT: u32 = 1000;
/// Steps whose removal the established path can show (the others are new-flow steps).
const ESTABLISHED_STEPS: u32 =
    STEP_COUNTERS | STEP_MAC_CHECK | STEP_PACKET_CHECKS | STEP_REDIRECT | STEP_CLOCK;
/// A service address with eight backends, of which only the fixture's three have neighbours:
/// the target of the flood that fills the conntrack tables.
const FLOOD_VIP: [u8; 4] = [198, 51, 100, 20];

/// The (minimum, median) of a round's figures: noise on a shared machine only ever adds time,
/// so the minimum is the steadier figure and ratios are taken of minima.
fn min_median(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[0], values[values.len() / 2])
}

/// `min/median` for a table cell.
fn cell((min, median): (f64, f64)) -> String {
    format!("{min:.0}/{median:.0}")
}

/// Runs `program` `repeat` times on `frame` inside the fixture's namespace; returns the
/// kernel's mean ns per run and the last run's verdict.
fn time<P>(fx: &Fixture, program: &P, frame: &[u8], repeat: u32) -> (f64, u32)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult> + Sync,
{
    let mut out = vec![0u8; frame.len() + 512];
    let result = fx
        .ns
        .enter(|| {
            program.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
        })
        .expect("test run");
    (result.duration.as_nanos() as f64, result.return_value)
}

/// Deletes the next hop toward the new-flow loop's backend: new flows then ask the FIB.
fn forget_next_hop(fx: &Fixture) {
    let _ = fx
        .pins
        .hash_map::<[u8; 4], NextHop>(NEXT_HOPS_MAP)
        .remove(&SELF_VIP);
}

/// Writes the next hop toward the new-flow loop's backend (`SELF_VIP`, behind `fxb`) as xlb's
/// next-hop thread would, confirmed now.
fn confirm_next_hop(fx: &Fixture) {
    let mut hops = fx.pins.hash_map::<[u8; 4], NextHop>(NEXT_HOPS_MAP);
    let (ifindex, smac, dmac) = backend_route(fx);
    let hop = NextHop {
        confirmed_ns: xlb::inspect::monotonic_ns(),
        ifindex,
        src: LB_BACKEND_IP.octets(),
        smac,
        dmac,
        _pad: [0; 4],
    };
    hops.insert(SELF_VIP, hop, 0).expect("next hop");
}

/// The route toward `SELF_VIP` (behind `fxb`): egress ifindex, source and destination MAC.
fn backend_route(fx: &Fixture) -> (u32, [u8; 6], [u8; 6]) {
    let ifindex = fx
        .ns
        .enter(|| xlb::dataplane::devices::ifindex("fxb"))
        .expect("fxb's ifindex");
    (ifindex, LB_BACKEND_MAC, host_mac(SELF_VIP.into()))
}

/// Empties the half-open table, so each new-flow measurement starts from the same state.
fn clear_half_open(fx: &Fixture) {
    let mut half = fx.ct_map(CT_HALF_MAP);
    let keys: Vec<FlowKey> = half.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = half.remove(&key);
    }
}

fn half_open_entries(fx: &Fixture) -> usize {
    fx.ct_map(CT_HALF_MAP).keys().count()
}

/// The programs xlb attaches in generic mode (main and new-flow), from the measuring build,
/// with `skip` steps left out, on the fixture's pinned maps but with a new-flow `PROG_ARRAY`
/// of their own (so the variant's main program goes on to the variant's new-flow program); the
/// verifier's complaint when it refuses one (leaving a step out can cost its state pruning more
/// than the step's own branches).
fn load_variant(fx: &Fixture, skip: u32) -> Result<Ebpf, String> {
    let dir = fx.dp.pin_dir().to_owned();
    let mut loader = EbpfLoader::new();
    loader.override_global(SKIP_STEPS_GLOBAL, &skip, true);
    for name in ALL_MAPS
        .into_iter()
        .filter(|&name| name != NEW_FLOW_XDP_MAP)
    {
        loader.map_pin_path(name, dir.join(name));
    }
    let mut ebpf = loader
        .load(BPF_OBJECT_STEPS)
        .expect("loading the measuring build");
    for name in [PROGRAM_NEW_FLOW_GENERIC, PROGRAM_GENERIC] {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("XDP program");
        match program.load() {
            Ok(()) => {}
            Err(aya::programs::ProgramError::LoadError { io_error, .. }) => {
                return Err(format!("{name}: {io_error}"));
            }
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
    let fd = xdp_named(&ebpf, PROGRAM_NEW_FLOW_GENERIC)
        .fd()
        .expect("program fd")
        .try_clone()
        .expect("program fd");
    let mut array = ProgramArray::try_from(ebpf.map_mut(NEW_FLOW_XDP_MAP).expect("new-flow map"))
        .expect("PROG_ARRAY");
    array
        .set(NEW_FLOW_SLOT_GENERIC, &fd, 0)
        .expect("the variant's new-flow program in its slot");
    Ok(ebpf)
}

fn xdp(ebpf: &Ebpf) -> &Xdp {
    xdp_named(ebpf, PROGRAM_GENERIC)
}

fn xdp_named<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name)
        .expect("program")
        .try_into()
        .expect("XDP program")
}

/// How many instructions the verifier processed for each build of the program: its limit is
/// 1,000,000, and a change that adds paths shows here first.
fn print_verified(fx: &Fixture) {
    let count = |info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>| {
        info.ok()
            .and_then(|i| i.verified_instruction_count())
            .map_or("?".to_owned(), |n| n.to_string())
    };
    let xdp = |name| count(fx.dp.program(name).expect("program").info());
    let tc = |name| count(fx.dp.tc_program(name).expect("TC program").info());
    println!(
        "verifier, instructions processed (limit 1000000), main / new-flow program: native XDP {} / {}, generic XDP {} / {}, TC {} / {}",
        xdp(PROGRAM_NATIVE),
        xdp(PROGRAM_NEW_FLOW_NATIVE),
        xdp(PROGRAM_GENERIC),
        xdp(PROGRAM_NEW_FLOW_GENERIC),
        tc(PROGRAM_TC),
        tc(PROGRAM_NEW_FLOW_TC),
    );
}

/// The CPU model, the kernel, and each CPU vulnerability with its mitigation state: the
/// figures below are only comparable to others taken under the same.
fn print_machine() {
    let model = xlb_tests::measure::cpu_model();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "CPU {model}, {} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    let dir = "/sys/devices/system/cpu/vulnerabilities";
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let state = std::fs::read_to_string(entry.path()).unwrap_or_default();
        println!(
            "  {}: {}",
            entry.file_name().to_string_lossy(),
            state.trim()
        );
    }
}

/// One path of the program: its frame, its repeat count, the counter that must grow by one
/// per repeat (so every repeat took the path), and for a path that changes the tables (new
/// flows, a handshake's later packets) how each round starts.
struct Path<'a> {
    name: &'a str,
    frame: &'a [u8],
    repeat: u32,
    stat: u32,
    start: Option<Start>,
}

/// How a round of a path that changes the tables starts. New flows: each round's first SYN
/// comes from a client port of its own (a round repeating an earlier one's tuples would find
/// their flows), into an emptied half-open table (`Empty`) or into tables a flood has just
/// filled (`Full`, [`fill_tables`]). A handshake's later packets: a chain of half-open flows
/// written afresh ([`write_chain`]), their backends' SYN-ACKs (`Replied`) or their clients'
/// ACKs (`Opened`).
#[derive(Clone, Copy, PartialEq)]
enum Start {
    Empty,
    Full,
    Replied,
    Opened,
}

/// Half-open flows in a chain, for a handshake's later packets: the packet of flow `i`
/// (`keys(i)`, the flow's entry `dir`ection, in `state`) is translated to the packet of flow
/// `i + 1`, so each of `count` repeats takes the path on a flow of its own, as each new-flow
/// repeat does. Each entry's peer (the other direction) points back to it. `route`, when
/// given, is cached in the entries (`(ifindex, smac, dmac)`), as a new flow caches its
/// backend's next hop; otherwise the first packet looks the route up.
fn write_chain(
    fx: &Fixture,
    count: u32,
    keys: impl Fn(u32) -> FlowKey,
    dir: u8,
    state: u32,
    route: Option<(u32, [u8; 6], [u8; 6])>,
) {
    clear_half_open(fx);
    let mut half = fx.ct_map(CT_HALF_MAP);
    let now = xlb::inspect::monotonic_ns();
    let (ifindex, smac, dmac) = route.unwrap_or_default();
    let peer_dir = if dir == CT_DIR_FORWARD {
        CT_DIR_REVERSE
    } else {
        CT_DIR_FORWARD
    };
    for i in 0..count {
        let (own, next) = (keys(i), keys(i + 1));
        let entry = CtEntry {
            nat_src_ip: next.src_ip,
            nat_dst_ip: next.dst_ip,
            nat_src_port: next.src_port,
            nat_dst_port: next.dst_port,
            state,
            last_seen_ns: now,
            ifindex,
            smac,
            dmac,
            dir,
            ..CtEntry::default()
        };
        let peer = CtEntry {
            nat_src_ip: own.dst_ip,
            nat_dst_ip: own.src_ip,
            nat_src_port: own.dst_port,
            nat_dst_port: own.src_port,
            state,
            last_seen_ns: now,
            dir: peer_dir,
            ..CtEntry::default()
        };
        let peer_key = entry.peer_key(IPPROTO_TCP);
        half.insert(own, entry.with_sums(&own), 0)
            .expect("chain entry");
        half.insert(peer_key, peer.with_sums(&peer_key), 0)
            .expect("chain peer entry");
    }
}

/// The client ports of the chained flows whose ACKs the "handshake: ACK" row times.
const OPENED_PORTS: u16 = 40_000;
/// The SNAT ports of the chained flows whose SYN-ACKs the "handshake: SYN-ACK" row times
/// (below [`SNAT_RANGE_SERVICE_PORT`], so none is a service's port).
const REPLIED_PORTS: u16 = 2_000;

/// The `i`th chained flow of round `round` of the "handshake: ACK" row, as its client's ACK
/// comes in: from a client address of the round's own, so each round's keys land in buckets
/// no earlier round touched, as a new flow's do.
fn opened_key(round: usize, i: u32) -> FlowKey {
    key(
        [198, 18, round as u8, 1],
        OPENED_PORTS + i as u16,
        SELF_VIP,
        80,
    )
}

/// The `i`th chained flow of round `round` of the "handshake: SYN-ACK" row, as its backend's
/// SYN-ACK comes in, from a backend port of the round's own (as [`opened_key`]). `CLIENT`
/// stands for the SNAT address: the route toward it is a neighbour's.
fn replied_key(round: usize, i: u32) -> FlowKey {
    key(
        SELF_VIP,
        100 + round as u16,
        CLIENT,
        REPLIED_PORTS + i as u16,
    )
}

/// Deletes the open flows round `round` of the "handshake: ACK" row opened, so the rows after
/// find the open maps as before.
fn close_opened(fx: &Fixture, round: usize, count: u32) {
    let (mut fwd, mut rev) = (fx.ct_map(CT_FWD_MAP), fx.ct_map(CT_REV_MAP));
    for i in 0..count {
        let _ = fwd.remove(&opened_key(round, i));
        let next = opened_key(round, i + 1);
        let _ = rev.remove(&key(next.dst_ip, next.dst_port, next.src_ip, next.src_port));
    }
}

/// Writes round `round`'s chain of `count` flows for a handshake's later packets (`start`:
/// `Replied` or `Opened`) and returns the chain's first packet: `template` (a TCP frame with
/// the packet's flags and destination MAC) with the first flow's endpoints.
fn start_handshake_round(
    fx: &Fixture,
    start: Start,
    round: usize,
    count: u32,
    template: &[u8],
) -> Vec<u8> {
    let first = if start == Start::Replied {
        let keys = |i| replied_key(round, i);
        write_chain(fx, count, keys, CT_DIR_REVERSE, CT_STATE_HALF_OPEN, None);
        keys(0)
    } else {
        let keys = |i| opened_key(round, i);
        let state = CT_STATE_HALF_OPEN_REPLIED;
        write_chain(
            fx,
            count,
            keys,
            CT_DIR_FORWARD,
            state,
            Some(backend_route(fx)),
        );
        keys(0)
    };
    let (src, dst) = (
        sa(first.src_ip, first.src_port),
        sa(first.dst_ip, first.dst_port),
    );
    pkt::translated(template, src, dst)
}

/// A TCP frame with `flags` to `mac`, as a handshake round's template (its endpoints are
/// each round's own, [`start_handshake_round`]).
fn handshake_template(flags: u8, mac: [u8; 6]) -> Vec<u8> {
    let mut frame = pkt::tcp(sa(CLIENT, 1), sa(SELF_VIP, 80), flags, &[]);
    frame[0..6].copy_from_slice(&mac);
    frame
}

/// `frame` (a TCP or UDP frame) from client port `port`, checksums fixed.
fn from_port(frame: &[u8], port: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[34..36].copy_from_slice(&port.to_be_bytes());
    pkt::fix_checksums(&mut frame);
    frame
}

/// Measures `path` in [`ROUNDS`] rounds, each timing the no-op on the same frame, the floor
/// program on its established frame, and xlb; prints the medians and their ratios.
fn row(fx: &Fixture, path: &Path, floor_frame: &[u8]) {
    let (noop, floor, xlb) = (
        fx.dp.program(PROGRAM_NOOP).expect("noop"),
        fx.dp.program(PROGRAM_FLOOR).expect("floor"),
        fx.dp.program(PROGRAM_GENERIC).expect("xlb"),
    );
    let (mut noop_ns, mut floor_ns, mut xlb_ns) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = match path.start {
        Some(Start::Empty | Start::Replied | Start::Opened) => NEW_FLOW_ROUNDS,
        Some(Start::Full) => FULL_TABLE_ROUNDS,
        None => ROUNDS,
    };
    for round in 0..rounds {
        let frame = match path.start {
            None => path.frame.to_vec(),
            Some(start @ (Start::Empty | Start::Full)) => {
                if start == Start::Empty {
                    clear_half_open(fx);
                } else {
                    fill_tables(fx);
                }
                confirm_next_hop(fx);
                from_port(path.frame, 50_000 + round as u16)
            }
            Some(start) => start_handshake_round(fx, start, round, path.repeat, path.frame),
        };
        noop_ns.push(time(fx, noop, &frame, path.repeat).0);
        let (ns, verdict) = time(fx, floor, floor_frame, 1_000_000);
        assert_eq!(verdict, XDP_TX, "the floor program did not translate");
        floor_ns.push(ns);
        let before = stats(fx);
        xlb_ns.push(time(fx, xlb, &frame, path.repeat).0);
        let grew = fx.stat(path.stat) - before[path.stat as usize];
        assert_eq!(
            grew,
            path.repeat as u64,
            "{}: counter {} grew by {grew}, not {}: the repeats did not all take the path (counters that grew: {})",
            path.name,
            STAT_NAMES[path.stat as usize],
            path.repeat,
            grown(fx, &before)
        );
        if path.start == Some(Start::Opened) {
            close_opened(fx, round, path.repeat);
        }
    }
    let (noop, floor, xlb) = (
        min_median(noop_ns),
        min_median(floor_ns),
        min_median(xlb_ns),
    );
    println!(
        "{:<24} {:>10} {:>9} {:>9} {:>9.2} {:>8.2}  repeat {}",
        path.name,
        cell(xlb),
        cell(floor),
        cell(noop),
        xlb.0 / floor.0,
        xlb.0 / noop.0,
        path.repeat
    );
}

/// Every global counter.
fn stats(fx: &Fixture) -> Vec<u64> {
    (0..STAT_NAMES.len() as u32).map(|i| fx.stat(i)).collect()
}

/// The counters that grew since `before`, as `name +n`.
fn grown(fx: &Fixture, before: &[u64]) -> String {
    let now = stats(fx);
    let grew: Vec<String> = STAT_NAMES
        .iter()
        .zip(now.iter().zip(before))
        .filter(|(_, (now, before))| now > before)
        .map(|(name, (now, before))| format!("{name} +{}", now - before))
        .collect();
    grew.join(", ")
}

/// The verdict of a translated packet when `step` is left out: a redirect out of the
/// backend's device, or `XDP_TX` when the route or the redirect is left out (back out of the
/// ingress device).
fn transmitted(step: u32) -> u32 {
    if step & (STEP_ROUTE | STEP_REDIRECT) != 0 {
        XDP_TX
    } else {
        XDP_REDIRECT
    }
}

/// Issue 15, item 3: the tracked paths as generic XDP (`xlb_skb`), native XDP (`xlb`, with the
/// egress devices in the xmit devmap, as xlb lists devices whose drivers take XDP frames) and
/// the TC program (`xlb_tc`, the same code on an skb) run them, on the same maps and frames, in
/// interleaved rounds. `test_run` hands each a linear frame, so this is the per-packet cost
/// alone; what TC saves on GSO packets (generic XDP copies each into one buffer first) shows in
/// `bench_e2e`.
fn by_hook(
    fx: &mut Fixture,
    data: &[u8],
    data_mac: [u8; 6],
    reply: &[u8],
    reply_mac: [u8; 6],
    repeat: u32,
) {
    /// `TC_ACT_REDIRECT`.
    const TC_ACT_REDIRECT: u32 = 7;
    for device in ["fxb", "fxc"] {
        fx.ns.enter(|| {
            let ifindex = xlb::dataplane::devices::ifindex(device).expect("ifindex");
            fx.pins.list_xmit_device(ifindex);
        });
    }
    println!(
        "\nBy hook, same maps and frames: ns/packet min/median of {ROUNDS} interleaved rounds"
    );
    println!(
        "{:<24} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "path", "generic XDP", "native XDP", "TC", "native/g", "TC/g"
    );
    for (name, frame, mac, stat) in [
        ("established (fwd hit)", data, data_mac, STAT_CT_HIT),
        ("reply (rev hit)", reply, reply_mac, STAT_CT_REPLY),
    ] {
        fx.dp.set_device_mac(LO_IFINDEX, mac).expect("lo MAC");
        let fx = &*fx;
        let skb = fx.dp.program(PROGRAM_GENERIC).expect("xlb_skb");
        let native = fx.dp.program(PROGRAM_NATIVE).expect("xlb");
        let tc = fx.dp.tc_program(PROGRAM_TC).expect("xlb_tc");
        let (mut skb_ns, mut native_ns, mut tc_ns) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            skb_ns.push(time(fx, skb, frame, repeat).0);
            native_ns.push(time_hook(fx, native, frame, repeat, stat, XDP_REDIRECT));
            tc_ns.push(time_hook(fx, tc, frame, repeat, stat, TC_ACT_REDIRECT));
        }
        let (skb_ns, native_ns, tc_ns) =
            (min_median(skb_ns), min_median(native_ns), min_median(tc_ns));
        println!(
            "{name:<24} {:>12} {:>12} {:>12} {:>8.2} {:>8.2}",
            cell(skb_ns),
            cell(native_ns),
            cell(tc_ns),
            native_ns.0 / skb_ns.0,
            tc_ns.0 / skb_ns.0
        );
    }
}

/// [`time`] for [`by_hook`], checking that `program` answered `verdict` and that every repeat
/// took the path (`stat` grew by `repeat`).
fn time_hook<P>(
    fx: &Fixture,
    program: &P,
    frame: &[u8],
    repeat: u32,
    stat: u32,
    verdict: u32,
) -> f64
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult> + Sync,
{
    let before = fx.stat(stat);
    let (ns, answered) = time(fx, program, frame, repeat);
    assert_eq!(
        answered, verdict,
        "{}: verdict {answered}, not {verdict}",
        STAT_NAMES[stat as usize]
    );
    assert_eq!(
        fx.stat(stat) - before,
        repeat as u64,
        "{}: not every repeat took the path",
        STAT_NAMES[stat as usize]
    );
    ns
}

/// Issue 15: where the time goes. Each step left out in turn (a variant of the program loaded
/// with that step removed by the verifier), timed in interleaved rounds beside the whole
/// program, on the new-flow path and (for the steps it has) the established path.
fn step_breakdown(fx: &Fixture, syn: &[u8], data: &[u8]) {
    let whole = load_variant(fx, 0).expect("the whole program loads");
    // And every step of the established path at once: what is left is xlb's lookup, rewrite
    // and parse, the part the floor program does too.
    let variants: Vec<(u32, &str, Ebpf)> = STEPS
        .iter()
        .chain(&[(ESTABLISHED_STEPS, "all established steps")])
        .filter_map(|&(step, name)| match load_variant(fx, step) {
            Ok(ebpf) => Some((step, name, ebpf)),
            Err(error) => {
                println!("(without {name}: refused by the verifier, not timed: {error})");
                None
            }
        })
        .collect();
    let mut new_flow: Vec<Vec<f64>> = vec![Vec::new(); variants.len() + 2];
    let mut established: Vec<Vec<f64>> = vec![Vec::new(); variants.len() + 2];
    // Last, the program as xlb attaches it, which has no step switches to read.
    let attached = fx.dp.program(PROGRAM_GENERIC).expect("xlb");
    let programs: Vec<(u32, &Xdp)> = std::iter::once((0, xdp(&whole)))
        .chain(variants.iter().map(|(step, _, e)| (*step, xdp(e))))
        .chain(std::iter::once((0, attached)))
        .collect();
    for _ in 0..NEW_FLOW_ROUNDS {
        confirm_next_hop(fx);
        for (i, &(step, program)) in programs.iter().enumerate() {
            clear_half_open(fx);
            let (ns, verdict) = time(fx, program, syn, NEW_FLOW_REPEAT);
            assert_eq!(
                verdict,
                transmitted(step),
                "new flow without step {step:#x}"
            );
            // Every repeat a new flow, of two half-open entries.
            assert_eq!(
                half_open_entries(fx),
                2 * NEW_FLOW_REPEAT as usize,
                "new flow without step {step:#x}: not every repeat opened a flow"
            );
            new_flow[i].push(ns);
            // Every round: a step of a few ns needs the steadier minimum of many rounds.
            if step == 0 || step & ESTABLISHED_STEPS != 0 {
                let (ns, verdict) = time(fx, program, data, 1_000_000);
                assert_eq!(
                    verdict,
                    transmitted(step),
                    "established without step {step:#x}"
                );
                established[i].push(ns);
            }
        }
    }
    let whole_new = min_median(new_flow[0].clone());
    let whole_est = min_median(established[0].clone());
    println!(
        "\nWhere the time goes: each step left out in turn, ns/packet min/median of {NEW_FLOW_ROUNDS} interleaved rounds (new flow and established); saved = whole minus variant, of minima"
    );
    println!(
        "{:<26} {:>10} {:>6} {:>12} {:>6}",
        "left out", "new flow", "saved", "established", "saved"
    );
    println!(
        "{:<26} {:>10} {:>6} {:>12} {:>6}",
        "nothing (whole program)",
        cell(whole_new),
        "",
        cell(whole_est),
        ""
    );
    let (attached_new, attached_est) = (
        min_median(new_flow[variants.len() + 1].clone()),
        min_median(established[variants.len() + 1].clone()),
    );
    println!(
        "{:<26} {:>10} {:>6.0} {:>12} {:>6.0}",
        "step switches (attached)",
        cell(attached_new),
        whole_new.0 - attached_new.0,
        cell(attached_est),
        whole_est.0 - attached_est.0
    );
    for (i, (_, name, _)) in variants.iter().enumerate() {
        let ns = min_median(new_flow[i + 1].clone());
        let est = if established[i + 1].is_empty() {
            format!("{:>12} {:>6}", "-", "")
        } else {
            let e = min_median(established[i + 1].clone());
            format!("{:>12} {:>6.0}", cell(e), whole_est.0 - e.0)
        };
        println!(
            "{name:<26} {:>10} {:>6.0} {est}",
            cell(ns),
            whole_new.0 - ns.0
        );
    }
}

/// Fills the conntrack tables as a SYN flood does: distinct spoofed SYNs toward an 8-backend
/// service until the half-open table has been filled twice over (its LRU evicting), and
/// toward the measured service until every SNAT port toward its backend is held; then waits
/// until those flows may be dropped early (idle for `CT_HALF_OPEN_MIN_RECLAIM_NS`), as a new
/// flow under a sustained flood finds them.
fn fill_tables(fx: &Fixture) {
    clear_half_open(fx);
    let flood = |vip: [u8; 4], count: u64, salt: u8| {
        fx.run_many(PROGRAM_GENERIC, count, |i, frame| {
            let src = [10, salt | (i >> 16) as u8, (i >> 8) as u8, i as u8];
            *frame = pkt::tcp(sa(src, 1024 + (i % 50_000) as u16), sa(vip, 80), SYN, &[]);
            frame[0..6].copy_from_slice(&host_mac(SELF_VIP.into()));
        })
    };
    flood(FLOOD_VIP, 2 * MAX_HALF_OPEN_ENTRIES as u64, 0);
    flood(SELF_VIP, SNAT_PORTS_DEFAULT.count as u64 * 2, 0x80);
    std::thread::sleep(std::time::Duration::from_nanos(
        2 * CT_HALF_OPEN_MIN_RECLAIM_NS,
    ));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("capacity") {
        capacity_main(&args[2..]);
        return;
    }
    let profile_secs = (args.get(1).map(String::as_str) == Some("profile"))
        .then(|| args.get(2).and_then(|a| a.parse().ok()).unwrap_or(15));
    let profile_what = args.get(3).map(String::as_str);
    let repeat: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let flood_backends: Vec<(Ipv4Addr, u16)> = (2..10)
        .map(|h| (Ipv4Addr::new(203, 0, 113, h), 8080))
        .collect();
    let mut fx = Fixture::new(
        "bench",
        &[
            service(
                VIP.into(),
                80,
                Protocol::Tcp,
                &[(Ipv4Addr::from(BACKEND), 8080)],
            ),
            service(
                SELF_VIP.into(),
                80,
                Protocol::Tcp,
                &[(Ipv4Addr::from(SELF_VIP), 80)],
            ),
            service(FLOOD_VIP.into(), 80, Protocol::Tcp, &flood_backends),
            // A service port inside the SNAT range, as many are (8080, 5432, 6379, ...).
            service(
                SELF_VIP.into(),
                SNAT_RANGE_SERVICE_PORT,
                Protocol::Tcp,
                &[(Ipv4Addr::from(SELF_VIP), SNAT_RANGE_SERVICE_PORT)],
            ),
        ],
    );
    // Identity flows (both entries, so each is whole): routable destinations (permanent
    // neighbours), so the route is cached.
    let fwd_key = key(CLIENT, 40000, SELF_VIP, 80);
    let in_range_key = key(CLIENT, 40000, SELF_VIP, SNAT_RANGE_SERVICE_PORT);
    let rev_key = key(BACKEND, 8080, CLIENT, REPLY_PORT);
    for (k, own, other) in [
        (fwd_key, CT_FWD_MAP, CT_REV_MAP),
        (in_range_key, CT_FWD_MAP, CT_REV_MAP),
        (rev_key, CT_REV_MAP, CT_FWD_MAP),
    ] {
        let peer = identity(&k).peer_key(IPPROTO_TCP);
        fx.ct_map(own)
            .insert(k, identity(&k), 0)
            .expect("insert entry");
        fx.ct_map(other)
            .insert(peer, identity(&peer), 0)
            .expect("insert peer entry");
    }
    // The program rewrites the destination MAC to the next hop's, and a frame is translated
    // only when addressed to the receiving device (`lo` here): each repeated path registers
    // the MAC its own output carries.
    let to_self = host_mac(SELF_VIP.into());
    let to_client = host_mac(CLIENT.into());
    // A client's data segment of an identity flow to SELF_VIP:`port`.
    let established = |port| {
        let mut frame = pkt::tcp(sa(CLIENT, 40000), sa(SELF_VIP, port), ACK | PSH, &[0u8; 64]);
        frame[0..6].copy_from_slice(&to_self);
        frame
    };
    let data = established(80);
    let in_range = established(SNAT_RANGE_SERVICE_PORT);
    let mut reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(CLIENT, REPLY_PORT),
        ACK | PSH,
        &[0u8; 64],
    );
    reply[0..6].copy_from_slice(&to_client);
    let not_ours = pkt::tcp(
        sa(CLIENT, 40000),
        sa([198, 51, 100, 99], 80),
        ACK,
        &[0u8; 64],
    );
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 0xcc, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 46]);
    // New flows: each repeat's output is the next repeat's untracked SYN (see the module doc).
    let mut syn = pkt::tcp(sa(CLIENT, 40001), sa(SELF_VIP, 80), SYN, &[]);
    syn[0..6].copy_from_slice(&to_self);
    // Warm the route caches of both entries.
    fx.dp.set_device_mac(LO_IFINDEX, to_client).expect("lo MAC");
    fx.run(PROGRAM_GENERIC, &reply);
    fx.dp.set_device_mac(LO_IFINDEX, to_self).expect("lo MAC");
    fx.run(PROGRAM_GENERIC, &data);
    fx.run(PROGRAM_GENERIC, &in_range);

    if let Some(secs) = profile_secs {
        if profile_what == Some("full") {
            profile_full_tables(&fx, &syn, secs);
        } else if profile_what == Some("ack") {
            profile_opening_acks(&fx, to_self, secs);
        } else {
            profile_new_flows(&fx, &syn, secs);
        }
        return;
    }
    print_machine();
    print_verified(&fx);
    println!(
        "\nBPF_PROG_TEST_RUN, kernel-measured mean ns/packet, min/median of {ROUNDS} interleaved rounds ({NEW_FLOW_ROUNDS} for new flows into an empty table, {FULL_TABLE_ROUNDS} into full tables), ratios of minima: xlb_skb beside the floor program (one conntrack lookup, DNAT rewrite, XDP_TX, on the established frame) and the no-op (same frame)"
    );
    println!(
        "{:<24} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "path", "xlb", "floor", "noop", "xlb/floor", "xlb/noop"
    );
    let path = |name, frame, repeat, stat, start| Path {
        name,
        frame,
        repeat,
        stat,
        start,
    };
    row(
        &fx,
        &path("established (fwd hit)", &data, repeat, STAT_CT_HIT, None),
        &data,
    );
    row(
        &fx,
        &path(
            "established, port 8080",
            &in_range,
            repeat,
            STAT_CT_HIT,
            None,
        ),
        &data,
    );
    fx.dp.set_device_mac(LO_IFINDEX, to_client).expect("lo MAC");
    row(
        &fx,
        &path("reply (rev hit)", &reply, repeat, STAT_CT_REPLY, None),
        &data,
    );
    fx.dp.set_device_mac(LO_IFINDEX, to_self).expect("lo MAC");
    row(
        &fx,
        &path("not for us (TCP)", &not_ours, repeat, STAT_NOT_OURS, None),
        &data,
    );
    row(
        &fx,
        &path("not IPv4 (ARP)", &arp, repeat, STAT_NOT_IPV4, None),
        &data,
    );
    forget_next_hop(&fx);
    row(
        &fx,
        &path(
            "new flow, FIB lookup",
            &syn,
            NEW_FLOW_REPEAT,
            STAT_NEW_FLOW,
            Some(Start::Empty),
        ),
        &data,
    );
    confirm_next_hop(&fx);
    row(
        &fx,
        &path(
            "new flow (SYN)",
            &syn,
            NEW_FLOW_REPEAT,
            STAT_NEW_FLOW,
            Some(Start::Empty),
        ),
        &data,
    );
    // A handshake's later packets, each of a half-open flow of its own (`write_chain`).
    let syn_ack = handshake_template(SYN | ACK, to_client);
    let ack = handshake_template(ACK, to_self);
    fx.dp.set_device_mac(LO_IFINDEX, to_client).expect("lo MAC");
    row(
        &fx,
        &path(
            "handshake: SYN-ACK",
            &syn_ack,
            NEW_FLOW_REPEAT,
            STAT_HALF_OPEN_HIT,
            Some(Start::Replied),
        ),
        &data,
    );
    fx.dp.set_device_mac(LO_IFINDEX, to_self).expect("lo MAC");
    row(
        &fx,
        &path(
            "handshake: ACK (opens)",
            &ack,
            NEW_FLOW_REPEAT,
            STAT_FLOW_OPENED,
            Some(Start::Opened),
        ),
        &data,
    );
    step_breakdown(&fx, &syn, &data);
    by_hook(&mut fx, &data, to_self, &reply, to_client, repeat);
    fx.dp.set_device_mac(LO_IFINDEX, to_self).expect("lo MAC");

    // New flows with full tables (issue 15, item 2).
    let early_drops = fx.stat(STAT_EARLY_DROP);
    println!();
    row(
        &fx,
        &path(
            "new flow, tables full",
            &syn,
            FULL_TABLE_REPEAT,
            STAT_NEW_FLOW,
            Some(Start::Full),
        ),
        &data,
    );
    println!(
        "  (each round after {} flood SYNs; early drops in all rounds: {})",
        2 * MAX_HALF_OPEN_ENTRIES + 2 * SNAT_PORTS_DEFAULT.count,
        fx.stat(STAT_EARLY_DROP) - early_drops
    );
    drop(fx);

    for flood_rate in [50_000u64, 100_000] {
        flood_share(flood_rate, 1_000, 3);
    }
}

/// `bench_xdp profile SECS ack`: opening ACKs through `xlb_skb`, as the "handshake: ACK" row
/// times them (a chain of replied half-open flows per round), until the rounds add up to
/// `SECS` seconds. Writing the chains (syscalls) takes longer than the rounds: a profile is
/// read for the samples under `bpf_test_run`. `to_self` is the MAC `lo` is registered with.
fn profile_opening_acks(fx: &Fixture, to_self: [u8; 6], secs: u64) {
    let xlb = fx.dp.program(PROGRAM_GENERIC).expect("xlb");
    let template = handshake_template(ACK, to_self);
    let (mut ns, mut spent) = (Vec::new(), 0.0);
    while spent < secs as f64 * 1e9 {
        let round = ns.len() % NEW_FLOW_ROUNDS;
        let frame = start_handshake_round(fx, Start::Opened, round, NEW_FLOW_REPEAT, &template);
        let opened = fx.stat(STAT_FLOW_OPENED);
        let (round_ns, _) = time(fx, xlb, &frame, NEW_FLOW_REPEAT);
        assert_eq!(
            fx.stat(STAT_FLOW_OPENED) - opened,
            NEW_FLOW_REPEAT as u64,
            "not every repeat opened a flow"
        );
        close_opened(fx, round, NEW_FLOW_REPEAT);
        spent += round_ns * NEW_FLOW_REPEAT as f64;
        ns.push(round_ns);
    }
    println!(
        "opening ACK, {} rounds of {NEW_FLOW_REPEAT}: ns/packet min/median {}",
        ns.len(),
        cell(min_median(ns))
    );
}

/// `bench_xdp profile [SECS]`: new flows through `xlb_skb` into an emptied half-open table
/// for `SECS` seconds (15 by default), as the "new flow (SYN)" row times them, so that a
/// sampling profiler sees where a new flow's time goes inside the kernel (map code, helpers),
/// which leaving steps out cannot show. See the README for the `perf` command.
fn profile_new_flows(fx: &Fixture, syn: &[u8], secs: u64) {
    let xlb = fx.dp.program(PROGRAM_GENERIC).expect("xlb");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut ns = Vec::new();
    while std::time::Instant::now() < end {
        clear_half_open(fx);
        confirm_next_hop(fx);
        let frame = from_port(syn, 50_000 + (ns.len() % 10_000) as u16);
        ns.push(time(fx, xlb, &frame, NEW_FLOW_REPEAT).0);
    }
    println!(
        "new flow, {} rounds of {NEW_FLOW_REPEAT}: ns/packet min/median {}",
        ns.len(),
        cell(min_median(ns))
    );
}

/// `bench_xdp profile SECS full`: new flows into full tables, one round after each fill as the
/// "new flow, tables full" row times them, until the rounds add up to `SECS` seconds. Filling
/// the tables takes far longer than a round and runs the same kernel code, so a profiler must
/// see only the rounds: when `XLB_PERF_CONTROL` names `perf record --control=fifo:PATH`'s fifo
/// (perf started with `-D -1`, disabled), sampling is enabled for each round and disabled
/// before the next fill.
fn profile_full_tables(fx: &Fixture, syn: &[u8], secs: u64) {
    use std::io::Write as _;
    let mut control = std::env::var_os("XLB_PERF_CONTROL").map(|path| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("perf control fifo {path:?}: {e}"))
    });
    let mut sample = |command: &str| {
        if let Some(fifo) = control.as_mut() {
            fifo.write_all(format!("{command}\n").as_bytes())
                .expect("write to the perf control fifo");
        }
    };
    let xlb = fx.dp.program(PROGRAM_GENERIC).expect("xlb");
    let mut ns = Vec::new();
    let mut measured = std::time::Duration::ZERO;
    for round in 0u16.. {
        if measured.as_secs() >= secs {
            break;
        }
        fill_tables(fx);
        confirm_next_hop(fx);
        let frame = from_port(syn, 50_000 + round % 10_000);
        let new_flows = fx.stat(STAT_NEW_FLOW);
        sample("enable");
        let start = std::time::Instant::now();
        let (round_ns, _) = time(fx, xlb, &frame, FULL_TABLE_REPEAT);
        measured += start.elapsed();
        sample("disable");
        // Only rounds in which every repeat opened a flow (see FULL_TABLE_REPEAT).
        if fx.stat(STAT_NEW_FLOW) - new_flows == FULL_TABLE_REPEAT as u64 {
            ns.push(round_ns);
        }
    }
    println!(
        "new flow into full tables, {} whole rounds of {FULL_TABLE_REPEAT}: ns/packet min/median {}",
        ns.len(),
        cell(min_median(ns))
    );
}

/// Issue 14, item 3: spoofed SYNs at `flood_rate` per second (distinct sources, paced by the
/// wall clock) toward a service with 3 backends, while legitimate clients open `legit_rate`
/// connections per second (SYN, the backend's SYN-ACK, the client's ACK, then a RST so each
/// holds its port for the closing timeout only), for `secs` seconds; prints the share of
/// legitimate SYNs that took the XDP path (translated, not passed to the kernel for the
/// proxy), and the mean kernel-measured cost of a flood SYN beside a legitimate SYN.
fn flood_share(flood_rate: u64, legit_rate: u64, secs: u64) {
    let backends: Vec<(Ipv4Addr, u16)> = (2..5)
        .map(|h| (Ipv4Addr::new(203, 0, 113, h), 8080))
        .collect();
    let fx = Fixture::new(
        "bench-flood",
        &[service(VIP.into(), 80, Protocol::Tcp, &backends)],
    );
    let program = fx.dp.program(PROGRAM_GENERIC).expect("program");
    let run = |frame: &[u8], out: &mut Vec<u8>| -> (u32, u64) {
        out.resize(frame.len() + 512, 0);
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out[..]),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, result.duration.as_nanos() as u64)
    };
    let (flood_sent, flood_ns, legit_sent, legit_xdp, legit_ns, elapsed) = fx.ns.enter(|| {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        let (mut flood_sent, mut flood_ns, mut legit_sent, mut legit_xdp, mut legit_ns) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        loop {
            let t = start.elapsed().as_secs_f64();
            if t >= secs as f64 {
                break;
            }
            while (flood_sent as f64) < t * flood_rate as f64 {
                let i = flood_sent;
                let src = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
                let port = 1024 + ((i >> 24) as u16);
                let syn = pkt::tcp(sa(src, port), sa(VIP, 80), SYN, &[]);
                flood_ns += run(&syn, &mut out).1;
                flood_sent += 1;
            }
            if (legit_sent as f64) < t * legit_rate as f64 {
                let client = [192, 0, 2, 1 + (legit_sent % 3) as u8];
                let cport = 10_000 + (legit_sent / 3) as u16;
                let syn = pkt::tcp(sa(client, cport), sa(VIP, 80), SYN, &[]);
                let (verdict, ns) = run(&syn, &mut out);
                legit_ns += ns;
                legit_sent += 1;
                if verdict == XDP_REDIRECT {
                    legit_xdp += 1;
                    let (snat, backend) = pkt::endpoints(&out);
                    run(&pkt::tcp(backend, snat, SYN | ACK, &[]), &mut out);
                    run(
                        &pkt::tcp(sa(client, cport), sa(VIP, 80), ACK, &[]),
                        &mut out,
                    );
                    run(
                        &pkt::tcp(sa(client, cport), sa(VIP, 80), RST, &[]),
                        &mut out,
                    );
                }
            }
        }
        (
            flood_sent,
            flood_ns,
            legit_sent,
            legit_xdp,
            legit_ns,
            start.elapsed(),
        )
    });
    let rate = flood_sent as f64 / elapsed.as_secs_f64();
    println!(
        "SYN flood {rate:.0}/s for {secs} s, 3 backends: legitimate SYNs on the XDP path {legit_xdp}/{legit_sent} ({:.1}%); flood SYN {:.0} ns, legitimate SYN {:.0} ns (mean single runs); early_drop {}, snat_exhausted {}, new_flow {}",
        100.0 * legit_xdp as f64 / legit_sent.max(1) as f64,
        flood_ns as f64 / flood_sent.max(1) as f64,
        legit_ns as f64 / legit_sent.max(1) as f64,
        fx.stat(STAT_EARLY_DROP),
        fx.stat(STAT_SNAT_EXHAUSTED),
        fx.stat(STAT_NEW_FLOW),
    );
}

/// What one flow of the capacity bench does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// SYN, SYN-ACK, ACK, the client's FIN, the backend's FIN, the client's last ACK.
    TcpClientCloses,
    /// SYN, SYN-ACK, ACK, the backend's FIN, the client's FIN, the backend's last ACK: the
    /// backend keeps TIME_WAIT, so the flow holds its port 60 s.
    TcpBackendCloses,
    /// A query and its answer (a DNS exchange): half-open, held 30 s.
    UdpExchange,
}

impl Kind {
    /// Issue 14's target rate (new flows per second per backend per LB node) and how long a
    /// flow holds its port, in seconds (a TCP flow closed client first holds it until its
    /// last ACK; 10 s, the closing timeout, stands for a lost one).
    fn target(self) -> (u64, u64) {
        match self {
            Kind::TcpClientCloses => (16_000, 10),
            Kind::TcpBackendCloses => (1_400, 60),
            Kind::UdpExchange => (2_700, 30),
        }
    }
}

/// `bench_xdp capacity [tcp-client|tcp-backend|udp [RATE [SECS [EXTRA_ADDRS [FIRST-LAST]]]]]`:
/// one kind (default: each in turn) at its issue-14 target rate for three hold times, with
/// `EXTRA_ADDRS` extra SNAT addresses (default 3) and the SNAT port range (default
/// 1024-32767).
fn capacity_main(args: &[String]) {
    let kinds = match args.first().map(String::as_str) {
        None => vec![
            Kind::TcpClientCloses,
            Kind::UdpExchange,
            Kind::TcpBackendCloses,
        ],
        Some("tcp-client") => vec![Kind::TcpClientCloses],
        Some("tcp-backend") => vec![Kind::TcpBackendCloses],
        Some("udp") => vec![Kind::UdpExchange],
        Some(other) => panic!("unknown kind {other:?}: tcp-client, tcp-backend or udp"),
    };
    let number = |i: usize| args.get(i).map(|a| a.parse::<u64>().expect("a number"));
    let extra = number(3).unwrap_or(3) as usize;
    let ports = match args.get(4) {
        Some(range) => {
            let (first, last) = range.split_once('-').expect("FIRST-LAST");
            lb_common::SnatPorts::new(
                first.parse().expect("first port"),
                last.parse().expect("last port"),
            )
            .expect("a SNAT range of at least 1024 ports")
        }
        None => lb_common::SNAT_PORTS_DEFAULT,
    };
    for kind in kinds {
        let (rate, hold) = kind.target();
        let rate = number(1).unwrap_or(rate);
        let secs = number(2).unwrap_or(3 * hold);
        capacity(kind, rate, secs, extra, ports);
    }
}

/// Issue 14, item 4: whole flows through the program at `rate` new flows per second toward
/// one backend (so per backend and per LB node), paced by the wall clock for `secs` seconds,
/// with `extra` SNAT addresses besides the route's source and the SNAT range `ports`; prints
/// how many new flows were refused (passed to the kernel for the proxy: `snat_exhausted` and
/// the other refusal counters) in the last third, when the ports held by earlier flows have
/// reached their steady state, and the rate the generator reached.
fn capacity(kind: Kind, rate: u64, secs: u64, extra: usize, ports: lb_common::SnatPorts) {
    let proto = match kind {
        Kind::TcpClientCloses | Kind::TcpBackendCloses => Protocol::Tcp,
        Kind::UdpExchange => Protocol::Udp,
    };
    let mut fx = Fixture::with_ports(
        "bench-cap",
        &[service(
            VIP.into(),
            80,
            proto,
            &[(Ipv4Addr::from(BACKEND), 8080)],
        )],
        ports,
    );
    // Extra SNAT addresses on the backends' subnet (no address needs to be on a device for
    // test runs: replies are handed to the program directly).
    let extras: Vec<Ipv4Addr> = (0..extra as u8)
        .map(|i| Ipv4Addr::new(203, 0, 113, 101 + i))
        .collect();
    fx.dp
        .set_snat_addresses(&[(xlb_tests::fixture::LB_BACKEND_IP, extras)].into())
        .expect("SNAT addresses");
    let program = fx.dp.program(PROGRAM_GENERIC).expect("program");
    let run = |frame: &[u8], out: &mut Vec<u8>| -> u32 {
        out.resize(frame.len() + 512, 0);
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out[..]),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        result.return_value
    };
    let (sent, refused_late, sent_late, behind, elapsed) = fx.ns.enter(|| {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        let (mut sent, mut refused_late, mut sent_late) = (0u64, 0u64, 0u64);
        // Flows the generator was behind the wall clock by, at worst (it is the limit when
        // this grows).
        let mut behind = 0f64;
        loop {
            let t = start.elapsed().as_secs_f64();
            if t >= secs as f64 {
                break;
            }
            let due = t * rate as f64;
            if (sent as f64) >= due {
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            behind = f64::max(behind, due - sent as f64);
            // Distinct client tuples: 3 client addresses × 60,000 ports.
            let client = [192, 0, 2, 1 + (sent % 3) as u8];
            let cport = 1024 + ((sent / 3) % 60_000) as u16;
            let (c, v) = (sa(client, cport), sa(VIP, 80));
            let late = t >= (secs as f64) * 2.0 / 3.0;
            let first = match kind {
                Kind::UdpExchange => pkt::udp(c, v, b"query"),
                _ => pkt::tcp(c, v, SYN, &[]),
            };
            let verdict = run(&first, &mut out);
            sent += 1;
            if late {
                sent_late += 1;
            }
            if verdict != XDP_REDIRECT {
                if late {
                    refused_late += 1;
                }
                continue;
            }
            let (snat, backend) = pkt::endpoints(&out);
            match kind {
                Kind::TcpClientCloses => {
                    run(&pkt::tcp(backend, snat, SYN | ACK, &[]), &mut out);
                    run(&pkt::tcp(c, v, ACK, &[]), &mut out);
                    run(&pkt::tcp(c, v, FIN | ACK, &[]), &mut out);
                    run(&pkt::tcp(backend, snat, FIN | ACK, &[]), &mut out);
                    run(&pkt::tcp(c, v, ACK, &[]), &mut out);
                }
                Kind::TcpBackendCloses => {
                    run(&pkt::tcp(backend, snat, SYN | ACK, &[]), &mut out);
                    run(&pkt::tcp(c, v, ACK, &[]), &mut out);
                    run(&pkt::tcp(backend, snat, FIN | ACK, &[]), &mut out);
                    run(&pkt::tcp(c, v, FIN | ACK, &[]), &mut out);
                    run(&pkt::tcp(backend, snat, ACK, &[]), &mut out);
                }
                Kind::UdpExchange => {
                    run(&pkt::udp(backend, snat, b"answer"), &mut out);
                }
            }
        }
        (sent, refused_late, sent_late, behind, start.elapsed())
    });
    println!(
        "capacity {kind:?}: {rate} new flows/s to one backend for {secs} s, {} SNAT addresses x {} ports: {sent} flows ({:.0}/s reached, at worst {behind:.0} flows behind the clock); refused in the last third {refused_late} of {sent_late} ({:.2}%); snat_exhausted {}, ct_insert_failed {}, closed_reused {}, ct_expired {}, half_open_timeout {}, ct_orphan {}",
        1 + extra,
        ports.count,
        sent as f64 / elapsed.as_secs_f64(),
        100.0 * refused_late as f64 / sent_late.max(1) as f64,
        fx.stat(STAT_SNAT_EXHAUSTED),
        fx.stat(lb_common::STAT_CT_INSERT_FAILED),
        fx.stat(lb_common::STAT_CLOSED_REUSED),
        fx.stat(lb_common::STAT_CT_EXPIRED),
        fx.stat(lb_common::STAT_HALF_OPEN_TIMEOUT),
        fx.stat(lb_common::STAT_CT_ORPHAN),
    );
}
