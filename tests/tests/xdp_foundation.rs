//! The XDP program loads, counts every frame by what it parsed and by verdict, and lets real
//! traffic through, in both generic and native mode.

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::*;
use xlb::dataplane::xdp::{AttachMode, ModeChoice, XdpProgram};
use xlb_tests::netns::{Netns, require_root, veth};

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
fn test_run_counts_frames_by_kind_and_passes_them() {
    require_root("loading the XDP program");
    let program = XdpProgram::load().expect("load the XDP program");
    let before = program.stats().expect("read counters");
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
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .program()
            .expect("program")
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            result.return_value, XDP_PASS,
            "verdict for frame {frame:02x?}"
        );
        assert_eq!(
            &out[..result.data_size_out as usize],
            &frame[..],
            "the pass-through program must not change the frame"
        );
    }
    let after = program.stats().expect("read counters");
    let expect = [
        (STAT_TOTAL, 5),
        (STAT_PASS, 5),
        (STAT_DROP, 0),
        (STAT_IPV4, 3),
        (STAT_IPV6, 1),
        (STAT_TCP, 2),
        (STAT_UDP, 1),
        (STAT_NOT_IP, 1),
        (STAT_TRUNCATED_L3L4, 1),
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
fn ping_through(choice: ModeChoice, expected_mode: AttachMode) {
    const PINGS: u64 = 10;
    let client = Netns::new("fnd-c");
    let server = Netns::new("fnd-s");
    veth(&client, "eth0", &server, "eth0");
    client.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    server.run(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    // Resolve the neighbour first so ARP is not counted against the pings below.
    client.run(&["ping", "-c", "1", "-W", "2", "192.0.2.2"]);
    let program = server.enter(|| {
        let mut program = XdpProgram::load().expect("load the XDP program");
        let mode = program.attach("eth0", choice).expect("attach XDP to eth0");
        assert_eq!(mode, expected_mode, "attach mode");
        program
    });
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
    assert_eq!(delta(&before, &after, STAT_IPV4), PINGS, "IPv4 counter");
    assert_eq!(
        delta(&before, &after, STAT_OTHER_L4),
        PINGS,
        "ICMP counted as other L4"
    );
    assert!(delta(&before, &after, STAT_PASS) >= PINGS, "pass counter");
}

#[test]
fn traffic_crosses_generic_xdp_on_veth() {
    ping_through(ModeChoice::Generic, AttachMode::Generic);
}

#[test]
fn traffic_crosses_native_xdp_on_veth() {
    ping_through(ModeChoice::Native, AttachMode::Native);
}
