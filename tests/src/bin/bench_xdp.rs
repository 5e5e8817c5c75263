//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN` (kernel-measured mean over a
//! large repeat count), beside the do-nothing `xlb_noop` program measured in the same run.
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
//!   every repeat creates a flow (backend pick, FIB lookup, SNAT port probe, both inserts).
//!
//! Then a SYN flood (issue 14, item 3): spoofed SYNs paced at 50,000 and 100,000 per second
//! toward a 3-backend service while legitimate clients open 1,000 connections per second; it
//! prints the share of legitimate SYNs that took the XDP path and the cost of a flood SYN
//! beside a legitimate one.
//!
//! `bench_xdp capacity` instead drives whole flows (TCP closed by the client first, TCP closed
//! by the backend first, UDP query and answer) at issue 14's target rates toward one backend
//! for three hold times each and prints the share refused (item 4); it takes about 5 minutes,
//! so `cargo xtask bench` does not run it. See [`capacity_main`] for its arguments.
//!
//! The new-flow figure is also given the old way, as the mean of single runs on distinct SYNs:
//! there the kernel's fixed per-call cost (timer, context setup: the noop's single-run figure)
//! and cold caches dominate, so it is printed with that overhead beside it.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    CT_FWD_MAP, CT_REV_MAP, CT_STATE_OPEN, CtEntry, FlowKey, IPPROTO_TCP, PROGRAM_GENERIC,
    PROGRAM_NOOP, STAT_CT_HIT, STAT_CT_REPLY, STAT_EARLY_DROP, STAT_NAMES, STAT_NEW_FLOW,
    STAT_NOT_IPV4, STAT_NOT_OURS, STAT_SNAT_EXHAUSTED,
};
use xlb::model::Protocol;
use xlb_tests::fixture::{Fixture, LO_IFINDEX, host_mac, sa, service};
use xlb_tests::pkt::{self, ACK, FIN, PSH, RST, SYN};

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

/// Runs `frame` `repeat` times through xlb and through noop; checks counter `stat` grew by
/// `repeat` (so every repeat took the path); returns (xlb, noop) ns/packet.
fn measure(fx: &Fixture, frame: &[u8], repeat: u32, stat: u32) -> (f64, f64) {
    let noop = fx.bench(PROGRAM_NOOP, frame, repeat);
    let before = fx.stat(stat);
    let xlb = fx.bench(PROGRAM_GENERIC, frame, repeat);
    let grew = fx.stat(stat) - before;
    assert_eq!(
        grew, repeat as u64,
        "counter {} grew by {grew}, not {repeat}: the repeats did not all take the path",
        STAT_NAMES[stat as usize]
    );
    (xlb, noop)
}

fn row(name: &str, (xlb, noop): (f64, f64), note: &str) {
    println!(
        "{name:<24} {xlb:>9.1} {noop:>9.1} {:>7.2}  {note}",
        xlb / noop
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("capacity") {
        capacity_main(&args[2..]);
        return;
    }
    let repeat: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000_000);
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
        ],
    );
    // Identity flows (both entries, so each is whole): routable destinations (permanent
    // neighbours), so the route is cached.
    let fwd_key = key(CLIENT, 40000, SELF_VIP, 80);
    let rev_key = key(BACKEND, 8080, CLIENT, REPLY_PORT);
    for (k, own, other) in [
        (fwd_key, CT_FWD_MAP, CT_REV_MAP),
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
    let mut data = pkt::tcp(sa(CLIENT, 40000), sa(SELF_VIP, 80), ACK | PSH, &[0u8; 64]);
    data[0..6].copy_from_slice(&to_self);
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
    // Warm the route caches of both entries.
    fx.dp.set_device_mac(LO_IFINDEX, to_client).expect("lo MAC");
    fx.run(PROGRAM_GENERIC, &reply);
    fx.dp.set_device_mac(LO_IFINDEX, to_self).expect("lo MAC");
    fx.run(PROGRAM_GENERIC, &data);

    println!("BPF_PROG_TEST_RUN, kernel-measured mean ns/packet, xlb_skb beside xlb_noop");
    println!(
        "{:<24} {:>9} {:>9} {:>7}",
        "path", "xlb_skb", "noop", "ratio"
    );
    let note = format!("repeat {repeat}");
    row(
        "established (fwd hit)",
        measure(&fx, &data, repeat, STAT_CT_HIT),
        &note,
    );
    fx.dp.set_device_mac(LO_IFINDEX, to_client).expect("lo MAC");
    row(
        "reply (rev hit)",
        measure(&fx, &reply, repeat, STAT_CT_REPLY),
        &note,
    );
    fx.dp.set_device_mac(LO_IFINDEX, to_self).expect("lo MAC");
    row(
        "not for us (TCP)",
        measure(&fx, &not_ours, repeat, STAT_NOT_OURS),
        &note,
    );
    row(
        "not IPv4 (ARP)",
        measure(&fx, &arp, repeat, STAT_NOT_IPV4),
        &note,
    );

    // New flows, warm: each repeat's output is the next repeat's untracked SYN (see the
    // module doc). Bounded well below the SNAT port range so probes rarely collide.
    let flows = 2000;
    let mut syn = pkt::tcp(sa(CLIENT, 40001), sa(SELF_VIP, 80), SYN, &[]);
    syn[0..6].copy_from_slice(&to_self);
    row(
        "new flow (SYN)",
        measure(&fx, &syn, flows, STAT_NEW_FLOW),
        &format!("repeat {flows}, each repeat a new flow"),
    );

    // New flows, cold: single runs on distinct SYNs, the per-call overhead shown.
    let runs = 2000u16;
    let (mut xlb_total, mut noop_total, mut hit_total) = (0.0, 0.0, 0.0);
    for i in 0..runs {
        let mut syn = pkt::tcp(sa(CLIENT, 20000 + i), sa(VIP, 80), SYN, &[]);
        syn[0..6].copy_from_slice(&to_self);
        noop_total += fx.bench(PROGRAM_NOOP, &syn, 1);
        xlb_total += fx.bench(PROGRAM_GENERIC, &syn, 1);
        hit_total += fx.bench(PROGRAM_GENERIC, &data, 1);
    }
    let n = runs as f64;
    let (xlb, noop, hit) = (xlb_total / n, noop_total / n, hit_total / n);
    row(
        "new flow, single runs",
        (xlb, noop),
        &format!(
            "mean of {runs} runs; noop = per-call overhead; over it: {:.0} ns",
            xlb - noop
        ),
    );
    row(
        "established, single runs",
        (hit, noop),
        &format!("same, for comparison; over noop: {:.0} ns", hit - noop),
    );

    for flood_rate in [50_000u64, 100_000] {
        flood_share(flood_rate, 1_000, 3);
    }
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
