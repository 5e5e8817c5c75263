//! The XDP program loads, counts every frame by what it parsed and by verdict, and lets real
//! traffic through, in both generic and native mode.

use lb_common::*;
use xlb::config::XdpMode;
use xlb::dataplane::xdp::{AttachMode, XdpConfig, XdpDataplane};
use xlb_tests::bpf::PinDir;
use xlb_tests::fixture::Fixture;
use xlb_tests::topology::Pair;

const XDP_PASS: u32 = 2;

fn eth(ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut frame = eth(0x0800);
    let total = (20 + l4.len()) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    frame.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 10]);
    // A valid header checksum: a wrong one makes the packet malformed (counted apart).
    let check = xlb_tests::pkt::inet_checksum(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(l4);
    frame
}

fn ipv6_tcp() -> Vec<u8> {
    let mut frame = eth(0x86dd);
    frame.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    frame.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8].repeat(4));
    frame.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8].repeat(4));
    frame.extend_from_slice(&tcp_syn());
    frame
}

fn tcp_syn() -> Vec<u8> {
    let mut seg = vec![
        0xc3, 0x50, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff,
    ];
    seg.extend_from_slice(&[0, 0, 0, 0]);
    seg
}

fn udp() -> Vec<u8> {
    vec![0xc3, 0x50, 0, 53, 0, 12, 0, 0, b'p', b'i', b'n', b'g']
}

fn arp() -> Vec<u8> {
    let mut frame = eth(0x0806);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 192, 0, 2, 1]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 2]);
    frame
}

fn delta(before: &[u64], after: &[u64], index: u32) -> u64 {
    after[index as usize] - before[index as usize]
}

#[test]
fn test_run_counts_frames_by_kind_and_passes_what_is_not_ours() {
    // No services: nothing is a VIP, so every frame must pass unchanged.
    let fixture = Fixture::new("fnd-tr", &[]);
    let before = fixture.dp.stats().expect("read counters");
    let mut truncated = ipv4(6, &tcp_syn());
    truncated.truncate(14 + 10);
    let frames = [
        ipv4(6, &tcp_syn()),
        ipv4(17, &udp()),
        ipv6_tcp(),
        arp(),
        truncated,
    ];
    for frame in &frames {
        let (verdict, out) = fixture.run(PROGRAM_NATIVE, frame);
        assert_eq!(verdict, XDP_PASS, "verdict for frame {frame:02x?}");
        assert_eq!(out, *frame, "a frame that is not ours must pass unchanged");
    }
    let after = fixture.dp.stats().expect("read counters");
    let expect = [
        (STAT_TOTAL, 5),
        (STAT_PASS, 5),
        (STAT_DROP, 0),
        (STAT_NOT_IPV4, 2),
        (STAT_NOT_OURS, 2),
        (STAT_TRUNCATED_IP, 1),
    ];
    for (index, want) in expect {
        assert_eq!(
            delta(&before, &after, index),
            want,
            "counter {}",
            STAT_NAMES[index as usize]
        );
    }
}

/// Pings across a veth pair with the program on the receiving end; the IPv4 counter moves by
/// exactly the number of echo requests.
fn ping_through(choice: XdpMode, expected_mode: AttachMode) {
    const PINGS: u64 = 10;
    let Pair {
        near: client,
        far: server,
    } = Pair::new("fnd", ("eth0", "192.0.2.1/24"), ("eth0", "192.0.2.2/24"));
    // Resolve the neighbour first so ARP is not counted against the pings below.
    client.run(&["ping", "-c", "1", "-W", "2", "192.0.2.2"]);
    let pins = PinDir::new();
    let program = server.enter(|| {
        XdpDataplane::open(XdpConfig {
            pin_dir: pins.path().to_owned(),
            mode: choice,
            set_sysctls: false,
            ..XdpConfig::new("eth0")
        })
        .expect("load the data plane and attach it to eth0")
    });
    assert_eq!(
        program.devices().get("eth0"),
        Some(&expected_mode),
        "attach mode"
    );
    let before = program.stats().expect("read counters");
    let out = client.run(&[
        "ping",
        "-c",
        &PINGS.to_string(),
        "-i",
        "0.01",
        "-W",
        "2",
        "-w",
        "10",
        "192.0.2.2",
    ]);
    assert!(
        out.contains(&format!("{PINGS} received")),
        "pings must cross the XDP program: {out}"
    );
    let after = program.stats().expect("read counters");
    assert_eq!(
        delta(&before, &after, STAT_NOT_L4),
        PINGS,
        "ICMP echo requests counted as IPv4 that is neither TCP nor UDP"
    );
    assert!(delta(&before, &after, STAT_PASS) >= PINGS, "pass counter");
}

#[test]
fn traffic_crosses_generic_xdp_on_veth() {
    ping_through(XdpMode::Skb, AttachMode::Generic);
}

#[test]
fn traffic_crosses_native_xdp_on_veth() {
    ping_through(XdpMode::Native, AttachMode::Native);
}

#[test]
fn traffic_crosses_tc_on_veth() {
    ping_through(XdpMode::Tc, AttachMode::Tc);
}

#[test]
fn auto_mode_attaches_at_tc_to_a_veth() {
    ping_through(XdpMode::Auto, AttachMode::Tc);
}
