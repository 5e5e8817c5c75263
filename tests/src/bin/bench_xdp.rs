//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN` (kernel-measured mean over a
//! large repeat count), beside the do-nothing `xlb_noop` program measured in the same run.
//!
//! `bench_xdp [REPEAT]` (root). Paths: established flow (forward conntrack hit with cached
//! route), reply (reverse conntrack hit), not-for-us (TCP to a non-VIP), each with `REPEAT`
//! runs of one frame; new flow (a SYN with a fresh client port per run, single runs, see
//! below). Prints ns/packet and the ratio to the noop program.

use std::net::Ipv4Addr;

use lb_common::{PROGRAM_GENERIC, PROGRAM_NOOP};
use xlb::model::Protocol;
use xlb_tests::fixture::{Fixture, LB_BACKEND_IP, sa, service};
use xlb_tests::pkt::{self, ACK, PSH, SYN};

const VIP: [u8; 4] = [198, 51, 100, 10];
const CLIENT: [u8; 4] = [192, 0, 2, 1];
const BACKEND: [u8; 4] = [203, 0, 113, 2];

fn main() {
    let repeat: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000_000);
    let fx = Fixture::new(
        "bench",
        &[service(
            VIP.into(),
            80,
            Protocol::Tcp,
            &[(Ipv4Addr::from(BACKEND), 8080)],
        )],
    );
    let syn = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), SYN, &[]);
    let data = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), ACK | PSH, &[0u8; 64]);
    let (_, out) = fx.run(PROGRAM_GENERIC, &syn);
    let (snat, _) = pkt::endpoints(&out);
    assert_eq!(*snat.ip(), LB_BACKEND_IP);
    let reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), snat.port()),
        ACK | PSH,
        &[0u8; 64],
    );
    let not_ours = pkt::tcp(
        sa(CLIENT, 40000),
        sa([198, 51, 100, 99], 80),
        ACK,
        &[0u8; 64],
    );
    // Warm the route caches of both entries.
    fx.run(PROGRAM_GENERIC, &data);
    fx.run(PROGRAM_GENERIC, &reply);

    println!("BPF_PROG_TEST_RUN, repeat {repeat}, kernel-measured mean ns/packet");
    println!(
        "{:<22} {:>10} {:>10} {:>8}",
        "path", "xlb_skb", "noop", "ratio"
    );
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 0xcc, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 46]);
    for (name, frame) in [
        ("established (fwd hit)", &data),
        ("reply (rev hit)", &reply),
        ("not for us (TCP)", &not_ours),
        ("not IPv4 (ARP)", &arp),
    ] {
        let noop = fx.bench(PROGRAM_NOOP, frame, repeat);
        let xlb = fx.bench(PROGRAM_GENERIC, frame, repeat);
        println!("{name:<22} {xlb:>10.1} {noop:>10.1} {:>8.2}", xlb / noop);
    }
    // New flows: a repeated run resends the same frame, which only misses conntrack once, so
    // each new flow is its own single run with a fresh client port; the noop program is run the
    // same way and the per-call overhead cancels in the difference.
    let runs = 2000u16;
    let (mut xlb_total, mut noop_total) = (0.0, 0.0);
    for i in 0..runs {
        let syn = pkt::tcp(sa(CLIENT, 20000 + i), sa(VIP, 80), SYN, &[]);
        noop_total += fx.bench(PROGRAM_NOOP, &syn, 1);
        xlb_total += fx.bench(PROGRAM_GENERIC, &syn, 1);
    }
    let (xlb, noop) = (xlb_total / runs as f64, noop_total / runs as f64);
    println!(
        "{:<22} {xlb:>10.1} {noop:>10.1} {:>8.2}   (mean of {runs} single runs; new-flow cost over noop: {:.0} ns)",
        "new flow (SYN)",
        xlb / noop,
        xlb - noop
    );
}
