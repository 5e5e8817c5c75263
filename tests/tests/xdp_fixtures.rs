//! Packet fixtures through `BPF_PROG_TEST_RUN`: the program is loaded (not attached), its maps
//! filled through `XdpDataplane::apply`, and crafted frames run through it inside a namespace
//! with deterministic routes (see `xlb_tests::fixture`). Expected output frames are built with
//! checksums recomputed from scratch by `xlb_tests::pkt`.
//!
//! Verdicts: the generic program (`xlb_skb`) redirects translated packets (`XDP_REDIRECT`, MACs
//! from the FIB); the native program (`xlb`) passes them (`XDP_PASS`, MACs untouched) because
//! the fixture's devices are veths, which are never in the xmit devmap.

use std::net::Ipv4Addr;

use lb_common::*;
use xlb::dataplane::Dataplane as _;
use xlb::model::Protocol;
use xlb_tests::fixture::{
    Fixture, LB_BACKEND_IP, LB_BACKEND_MAC, LB_CLIENT_MAC, host_mac, sa, service,
};
use xlb_tests::pkt::{self, ACK, FIN, PSH, RST, SYN};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const VIP: [u8; 4] = [198, 51, 100, 10];
const VIP2: [u8; 4] = [198, 51, 100, 11];
const BACKEND: [u8; 4] = [203, 0, 113, 2];
const CLIENT: [u8; 4] = [192, 0, 2, 1];

fn fixture(tag: &str) -> Fixture {
    let b = Ipv4Addr::from(BACKEND);
    Fixture::new(
        tag,
        &[
            service(VIP.into(), 80, Protocol::Tcp, &[(b, 8080)]),
            service(VIP.into(), 53, Protocol::Udp, &[(b, 5353)]),
            service(VIP2.into(), 80, Protocol::Tcp, &[(b, 8080)]),
        ],
    )
}

/// Checks `out` is `input` translated to `src → dst` with MACs `smac → dmac`, checksums valid.
fn assert_translated(
    input: &[u8],
    out: &[u8],
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    macs: Option<([u8; 6], [u8; 6])>,
) {
    let mut expected = pkt::translated(input, src, dst);
    if let Some((smac, dmac)) = macs {
        expected[0..6].copy_from_slice(&dmac);
        expected[6..12].copy_from_slice(&smac);
    }
    assert!(
        pkt::checksums_ok(out),
        "output checksums are invalid: {out:02x?}"
    );
    assert_eq!(
        out,
        &expected[..],
        "output frame differs from the expected translation"
    );
}

/// The SNAT port the program chose, read from a translated frame.
fn snat_port_of(out: &[u8]) -> u16 {
    let (src, _) = pkt::endpoints(out);
    assert_eq!(
        *src.ip(),
        LB_BACKEND_IP,
        "source must be the LB's address toward the backend"
    );
    let port = src.port();
    assert!(
        (SNAT_PORT_MIN as u32..SNAT_PORT_MIN as u32 + SNAT_PORT_COUNT).contains(&(port as u32))
    );
    port
}

#[test]
fn tcp_flow_syn_next_packet_and_reply_are_translated() {
    let fx = fixture("fx-tcp");
    let syn = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(verdict, XDP_REDIRECT);
    let port = snat_port_of(&out);
    assert_eq!(
        port,
        snat_port(flow_hash(CLIENT, VIP, 40000, 80, IPPROTO_TCP), 0)
    );
    let to_backend = Some((LB_BACKEND_MAC, host_mac(BACKEND.into())));
    assert_translated(
        &syn,
        &out,
        sa(LB_BACKEND_IP.octets(), port),
        sa(BACKEND, 8080),
        to_backend,
    );
    assert_eq!(fx.stat(STAT_NEW_FLOW), 1);
    assert_eq!(fx.stat(STAT_CT_MISS_SYN), 1);

    // The next packet of the flow hits conntrack and takes the same translation.
    let data = pkt::tcp(
        sa(CLIENT, 40000),
        sa(VIP, 80),
        ACK | PSH,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_translated(
        &data,
        &out,
        sa(LB_BACKEND_IP.octets(), port),
        sa(BACKEND, 8080),
        to_backend,
    );
    assert_eq!(fx.stat(STAT_CT_HIT), 1);

    // The backend's reply comes back to the SNAT address and goes out as VIP → client.
    let reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        SYN | ACK,
        &[],
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &reply);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_translated(
        &reply,
        &out,
        sa(VIP, 80),
        sa(CLIENT, 40000),
        Some((LB_CLIENT_MAC, host_mac(CLIENT.into()))),
    );
    assert_eq!(fx.stat(STAT_CT_REPLY), 1);

    // The native program passes translated packets for veth egress, with MACs untouched.
    let (verdict, out) = fx.run(PROGRAM_NATIVE, &data);
    assert_eq!(verdict, XDP_PASS);
    assert_translated(
        &data,
        &out,
        sa(LB_BACKEND_IP.octets(), port),
        sa(BACKEND, 8080),
        None,
    );
    assert!(fx.stat(STAT_XMIT_PASS) >= 1);
    let svc = fx.dp.installed()[&xlb::model::Frontend {
        vip: VIP.into(),
        port: 80,
        protocol: Protocol::Tcp,
    }]
        .id;
    let stats = fx.dp.service_stats(svc).expect("service stats");
    assert_eq!((stats.packets, stats.new_flows), (4, 1));
}

#[test]
fn tcp_non_syn_miss_passes_untouched() {
    let fx = fixture("fx-miss");
    let ack = pkt::tcp(sa(CLIENT, 40001), sa(VIP, 80), ACK, b"x");
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &ack);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, ack);
    assert_eq!(fx.stat(STAT_CT_MISS_NON_SYN), 1);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);
}

#[test]
fn udp_first_datagram_creates_a_flow_and_replies_return() {
    let fx = fixture("fx-udp");
    let query = pkt::udp(sa(CLIENT, 5000), sa(VIP, 53), b"query");
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &query);
    assert_eq!(verdict, XDP_REDIRECT);
    let port = snat_port_of(&out);
    assert_translated(
        &query,
        &out,
        sa(LB_BACKEND_IP.octets(), port),
        sa(BACKEND, 5353),
        Some((LB_BACKEND_MAC, host_mac(BACKEND.into()))),
    );
    let answer = pkt::udp(
        sa(BACKEND, 5353),
        sa(LB_BACKEND_IP.octets(), port),
        b"answer",
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &answer);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_translated(
        &answer,
        &out,
        sa(VIP, 53),
        sa(CLIENT, 5000),
        Some((LB_CLIENT_MAC, host_mac(CLIENT.into()))),
    );
    assert_eq!(fx.stat(STAT_NEW_FLOW), 1);
}

#[test]
fn traffic_not_for_a_vip_and_arp_pass_untouched() {
    let fx = fixture("fx-notours");
    let other = pkt::tcp(sa(CLIENT, 40000), sa([198, 51, 100, 99], 80), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_NATIVE, &other);
    assert_eq!((verdict, out), (XDP_PASS, other));
    assert_eq!(fx.stat(STAT_NOT_OURS), 1);
    // VIP, but a port without a service.
    let other_port = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 443), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_NATIVE, &other_port);
    assert_eq!((verdict, out), (XDP_PASS, other_port));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 0xcc, 0x08, 0x06]);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 0xcc, 192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 198, 51, 100,
        10,
    ]);
    let (verdict, out) = fx.run(PROGRAM_NATIVE, &arp);
    assert_eq!((verdict, out), (XDP_PASS, arp));
    assert_eq!(fx.stat(STAT_NOT_IPV4), 1);
    let icmp = {
        let mut f = pkt::udp(sa(CLIENT, 0), sa(VIP, 0), b"ping");
        f[pkt::IP + 9] = 1;
        f
    };
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &icmp);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(fx.stat(STAT_NOT_L4), 1);
    assert_eq!(fx.stat(STAT_TOTAL), 4);
    assert_eq!(fx.stat(STAT_PASS), 4);
}

#[test]
fn malformed_packets_to_a_vip_are_dropped_and_counted() {
    let fx = fixture("fx-malformed");
    let syn = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), SYN, &[]);

    let truncated = &syn[..pkt::L4 + 10];
    let (verdict, _) = fx.run(PROGRAM_NATIVE, truncated);
    assert_eq!(verdict, XDP_DROP, "truncated TCP header");
    assert_eq!(fx.stat(STAT_DROP_TRUNCATED), 1);

    let mut bad_ihl = syn.clone();
    bad_ihl[pkt::IP] = 0x44;
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &bad_ihl);
    assert_eq!(verdict, XDP_DROP, "IHL 4");
    assert_eq!(fx.stat(STAT_DROP_BAD_IHL), 1);

    let mut fragment = syn.clone();
    fragment[pkt::IP + 6] = 0x20; // more fragments
    pkt::fix_checksums(&mut fragment);
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &fragment);
    assert_eq!(verdict, XDP_DROP, "first fragment");
    let mut later = syn.clone();
    later[pkt::IP + 6..pkt::IP + 8].copy_from_slice(&[0x00, 0x10]); // offset 128 bytes
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &later);
    assert_eq!(verdict, XDP_DROP, "later fragment");
    assert_eq!(fx.stat(STAT_DROP_FRAGMENT), 2);

    let mut long = syn.clone();
    long[pkt::IP + 2..pkt::IP + 4].copy_from_slice(&200u16.to_be_bytes()); // total length > frame
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &long);
    assert_eq!(verdict, XDP_DROP, "total length beyond the frame");

    // The same malformations to an address that is not a VIP pass to the kernel.
    let mut not_vip = pkt::tcp(sa(CLIENT, 40000), sa([198, 51, 100, 99], 80), SYN, &[]);
    not_vip[pkt::IP + 6] = 0x20;
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &not_vip);
    assert_eq!(verdict, XDP_PASS);
    // An IPv4 header cut short cannot be read: passed.
    let (verdict, _) = fx.run(PROGRAM_NATIVE, &syn[..pkt::IP + 10]);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(fx.stat(STAT_TRUNCATED_IP), 1);
    assert_eq!(fx.stat(STAT_DROP), 5);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);
}

#[test]
fn ip_options_are_kept_and_checksums_stay_valid() {
    let fx = fixture("fx-options");
    let options = [1, 1, 1, 0]; // NOP NOP NOP EOL
    let syn = pkt::frame(
        IPPROTO_TCP,
        sa(CLIENT, 40002),
        sa(VIP, 80),
        SYN,
        &options,
        b"",
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(verdict, XDP_REDIRECT);
    let port = snat_port_of(&out);
    assert_translated(
        &syn,
        &out,
        sa(LB_BACKEND_IP.octets(), port),
        sa(BACKEND, 8080),
        Some((LB_BACKEND_MAC, host_mac(BACKEND.into()))),
    );
}

#[test]
fn partial_checksums_are_updated_as_partial() {
    let fx = fixture("fx-partial");
    for (proto, payload) in [
        (IPPROTO_TCP, &b""[..]),
        (IPPROTO_TCP, &b"hello"[..]),
        (IPPROTO_UDP, &b"q"[..]),
    ] {
        let dport = if proto == IPPROTO_TCP { 80 } else { 53 };
        let bport = if proto == IPPROTO_TCP { 8080 } else { 5353 };
        let full = pkt::frame(proto, sa(CLIENT, 41000), sa(VIP, dport), SYN, &[], payload);
        let mut partial = full.clone();
        pkt::make_partial(&mut partial);
        let (verdict, mut out) = fx.run(PROGRAM_GENERIC, &partial);
        assert_eq!(verdict, XDP_REDIRECT);
        let port = snat_port_of(&out);
        // The output still carries a partial checksum, now of the new addresses...
        let mut expected_partial =
            pkt::translated(&full, sa(LB_BACKEND_IP.octets(), port), sa(BACKEND, bport));
        pkt::make_partial(&mut expected_partial);
        assert_eq!(
            out[14..],
            expected_partial[14..],
            "partial checksum of the new pseudo-header"
        );
        // ...which the kernel's completion turns into the correct full checksum.
        pkt::complete_partial(&mut out);
        assert!(
            pkt::checksums_ok(&out),
            "completed checksum invalid for proto {proto}"
        );
    }
}

#[test]
fn same_client_port_through_two_vips_to_one_backend_gets_distinct_snat_ports() {
    let fx = fixture("fx-collide");
    // Occupy the first-choice port of the second flow with a live reverse entry, as if another
    // flow to the same backend held it.
    let second_hash = flow_hash(CLIENT, VIP2, 45000, 80, IPPROTO_TCP);
    let taken = snat_port(second_hash, 0);
    hold_snat_port(&fx, taken, CT_STATE_OPEN, xlb::inspect::monotonic_ns());

    let (_, out1) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 45000), sa(VIP, 80), SYN, &[]),
    );
    let (_, out2) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 45000), sa(VIP2, 80), SYN, &[]),
    );
    let (p1, p2) = (snat_port_of(&out1), snat_port_of(&out2));
    assert_ne!(p1, p2);
    assert_ne!(p2, taken, "the occupied port must be skipped");
    assert_eq!(p2, snat_port(second_hash, 1));
    // Both replies find their own client.
    let back1 = backend_answer(&fx, p1);
    let back2 = backend_answer(&fx, p2);
    assert_eq!(pkt::endpoints(&back1), (sa(VIP, 80), sa(CLIENT, 45000)));
    assert_eq!(pkt::endpoints(&back2), (sa(VIP2, 80), sa(CLIENT, 45000)));
}

#[test]
fn an_expired_reverse_entry_gives_up_its_snat_port() {
    let fx = fixture("fx-expired");
    let hash = flow_hash(CLIENT, VIP, 45100, 80, IPPROTO_TCP);
    let first_choice = snat_port(hash, 0);
    // A flow that closed long ago (the closing timeout is 10 s) still holds the port.
    let long_ago =
        xlb::inspect::monotonic_ns().saturating_sub(CT_TIMEOUT_TCP_CLOSING_NS + 1_000_000_000);
    hold_snat_port(&fx, first_choice, CT_STATE_CLOSING, long_ago);
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 45100), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(
        snat_port_of(&out),
        first_choice,
        "the expired entry is replaced"
    );
    let back = backend_answer(&fx, first_choice);
    assert_eq!(pkt::endpoints(&back), (sa(VIP, 80), sa(CLIENT, 45100)));
}

/// The program's output for `BACKEND:8080`'s SYN-ACK to SNAT `port`.
fn backend_answer(fx: &Fixture, port: u16) -> Vec<u8> {
    let reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        SYN | ACK,
        &[],
    );
    fx.run(PROGRAM_GENERIC, &reply).1
}

/// The reverse conntrack key of `BACKEND:8080`'s packets to SNAT `port`.
fn reverse_key(port: u16) -> FlowKey {
    FlowKey {
        src_ip: BACKEND,
        dst_ip: LB_BACKEND_IP.octets(),
        src_port: 8080,
        dst_port: port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// Makes SNAT `port` toward `BACKEND:8080` held by another client's reverse entry.
fn hold_snat_port(fx: &Fixture, port: u16, state: u32, last_seen_ns: u64) {
    let key = reverse_key(port);
    let entry = CtEntry {
        nat_src_ip: [192, 0, 2, 9],
        nat_dst_ip: VIP,
        state,
        last_seen_ns,
        ..CtEntry::default()
    };
    fx.ct_map(CT_REV_MAP)
        .insert(key, entry, 0)
        .expect("insert reverse entry");
}

/// Opens a flow from `client_port`, lets `first_close` (the flags of the first FIN or RST, sent
/// by the backend when `from_backend`) through, and returns the states of the forward and
/// reverse entries.
fn states_after_close(
    fx: &Fixture,
    client_port: u16,
    first_close: u8,
    from_backend: bool,
) -> (u32, u32) {
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, client_port), sa(VIP, 80), SYN, &[]),
    );
    let port = snat_port_of(&out);
    let close = if from_backend {
        pkt::tcp(
            sa(BACKEND, 8080),
            sa(LB_BACKEND_IP.octets(), port),
            first_close,
            &[],
        )
    } else {
        pkt::tcp(sa(CLIENT, client_port), sa(VIP, 80), first_close, &[])
    };
    fx.run(PROGRAM_GENERIC, &close);
    let fkey = FlowKey {
        src_ip: CLIENT,
        dst_ip: VIP,
        src_port: client_port,
        dst_port: 80,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let rkey = reverse_key(port);
    let fwd = fx.ct_map(CT_FWD_MAP).get(&fkey, 0).expect("forward entry");
    let rev = fx.ct_map(CT_REV_MAP).get(&rkey, 0).expect("reverse entry");
    (fwd.state, rev.state)
}

#[test]
fn the_first_fin_or_rst_moves_both_entries_out_of_open() {
    let fx = fixture("fx-fin");
    let closing = (CT_STATE_CLOSING, CT_STATE_CLOSING);
    assert_eq!(
        states_after_close(&fx, 40010, FIN | ACK, false),
        closing,
        "client FIN"
    );
    assert_eq!(
        states_after_close(&fx, 40011, RST, true),
        closing,
        "backend RST"
    );
    assert_eq!(
        states_after_close(&fx, 40012, FIN | ACK, true),
        (CT_STATE_TIME_WAIT, CT_STATE_TIME_WAIT),
        "backend FIN: the backend keeps the tuple in TIME_WAIT"
    );
    assert_eq!(fx.stat(STAT_TCP_CLOSE), 3);
    // A new SYN reusing the tuple of a closing flow starts a new flow.
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 40010), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(fx.stat(STAT_NEW_FLOW), 4);
}

#[test]
fn a_time_wait_entry_keeps_its_snat_port_past_the_closing_timeout() {
    let fx = fixture("fx-timewait");
    let hash = flow_hash(CLIENT, VIP, 45200, 80, IPPROTO_TCP);
    let past_closing =
        xlb::inspect::monotonic_ns().saturating_sub(CT_TIMEOUT_TCP_CLOSING_NS + 1_000_000_000);
    hold_snat_port(&fx, snat_port(hash, 0), CT_STATE_TIME_WAIT, past_closing);
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 45200), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(
        snat_port_of(&out),
        snat_port(hash, 1),
        "the held port is skipped"
    );
}

#[test]
fn removed_backend_drains_and_removed_service_stops_new_flows() {
    let (b2, b3) = (Ipv4Addr::new(203, 0, 113, 2), Ipv4Addr::new(203, 0, 113, 3));
    let mut fx = Fixture::new(
        "fx-drain",
        &[service(
            VIP.into(),
            80,
            Protocol::Tcp,
            &[(b2, 8080), (b3, 8080)],
        )],
    );
    // Round robin: first flow to slot 0 (b2), second to slot 1 (b3).
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 40020), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(*pkt::endpoints(&out).1.ip(), b2);
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 40021), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(*pkt::endpoints(&out).1.ip(), b3);
    // Remove b2: its established flow keeps going to b2, new flows go to b3 only.
    fx.dp
        .apply(&[service(VIP.into(), 80, Protocol::Tcp, &[(b3, 8080)])])
        .expect("apply");
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 40020), sa(VIP, 80), ACK, b"more"),
    );
    assert_eq!(
        *pkt::endpoints(&out).1.ip(),
        b2,
        "draining flow keeps its backend"
    );
    for port in 40030..40034 {
        let (_, out) = fx.run(
            PROGRAM_GENERIC,
            &pkt::tcp(sa(CLIENT, port), sa(VIP, 80), SYN, &[]),
        );
        assert_eq!(*pkt::endpoints(&out).1.ip(), b3);
    }
    // Remove the service: a new SYN is not ours any more.
    fx.dp.apply(&[]).expect("apply");
    let syn = pkt::tcp(sa(CLIENT, 40040), sa(VIP, 80), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!((verdict, out), (XDP_PASS, syn));
}
