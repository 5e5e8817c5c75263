//! Packet fixtures through `BPF_PROG_TEST_RUN`: the program is loaded (not attached), its maps
//! filled through `XdpDataplane::apply`, and crafted frames run through it inside a namespace
//! with deterministic routes (see `xlb_tests::fixture`). Expected output frames are built with
//! checksums recomputed from scratch by `xlb_tests::pkt`.
//!
//! Verdicts: the generic program (`xlb_skb`) redirects translated packets (`XDP_REDIRECT`, MACs
//! from the FIB); the native program (`xlb`) passes them (`XDP_PASS`, MACs untouched) because
//! the fixture's devices are veths, which xlb never lists in the xmit devmap (one test lists
//! one to see the native redirect).

use std::net::Ipv4Addr;

use lb_common::*;
use xlb::dataplane::Dataplane as _;
use xlb::model::Protocol;
use xlb_tests::fixture::{
    Fixture, LB_BACKEND_IP, LB_BACKEND_MAC, LB_CLIENT_MAC, LB_TEST_RUN_MAC, LO_IFINDEX, host_mac,
    sa, service,
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
    Fixture::new(tag, &fixture_services())
}

fn fixture_services() -> Vec<xlb::model::VirtualService> {
    let b = Ipv4Addr::from(BACKEND);
    vec![
        service(VIP.into(), 80, Protocol::Tcp, &[(b, 8080)]),
        service(VIP.into(), 53, Protocol::Udp, &[(b, 5353)]),
        service(VIP2.into(), 80, Protocol::Tcp, &[(b, 8080)]),
    ]
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
        SNAT_PORTS_DEFAULT.contains(port),
        "port {port} is outside the SNAT range"
    );
    port
}

/// Writes `hop` as the next hop toward `BACKEND`, or deletes it (`None`).
fn set_next_hop(fx: &Fixture, hop: Option<NextHop>) {
    let mut hops = fx.pins.hash_map::<[u8; 4], NextHop>(NEXT_HOPS_MAP);
    match hop {
        Some(hop) => hops.insert(BACKEND, hop, 0).expect("next hop"),
        None => hops.remove(&BACKEND).expect("remove next hop"),
    }
}

#[test]
fn new_flows_take_the_next_hop_while_it_is_confirmed() {
    let fx = fixture("fx-hop");
    let ifindex = fx
        .ns
        .enter(|| xlb::dataplane::devices::ifindex("fxb"))
        .expect("fxb");
    // A MAC the FIB would never give (the neighbour's is host_mac(BACKEND)), so the output
    // shows which way the route came.
    let hop_mac = [2, 0, 0, 0, 0xee, 0xee];
    let hop = |confirmed_ns| NextHop {
        confirmed_ns,
        ifindex,
        src: LB_BACKEND_IP.octets(),
        smac: LB_BACKEND_MAC,
        dmac: hop_mac,
        _pad: [0; 4],
    };
    let syn = |port| pkt::tcp(sa(CLIENT, port), sa(VIP, 80), SYN, &[]);
    let dmac_of = |out: &[u8]| <[u8; 6]>::try_from(&out[0..6]).expect("MAC");

    set_next_hop(&fx, Some(hop(xlb::inspect::monotonic_ns())));
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn(41700));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(dmac_of(&out), hop_mac, "the confirmed next hop is used");
    snat_port_of(&out);
    assert_eq!(fx.stat(STAT_NEXT_HOP_MISS), 0);

    // Not confirmed for longer than NEXT_HOP_MAX_AGE_NS: stale, the FIB decides.
    let stale = xlb::inspect::monotonic_ns() - NEXT_HOP_MAX_AGE_NS - 1_000_000_000;
    set_next_hop(&fx, Some(hop(stale)));
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn(41701));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(
        dmac_of(&out),
        host_mac(BACKEND.into()),
        "the FIB's neighbour"
    );
    assert_eq!(fx.stat(STAT_NEXT_HOP_MISS), 1);

    // No next hop at all: the FIB too.
    set_next_hop(&fx, None);
    let (_, out) = fx.run(PROGRAM_GENERIC, &syn(41702));
    assert_eq!(dmac_of(&out), host_mac(BACKEND.into()));
    assert_eq!(fx.stat(STAT_NEXT_HOP_MISS), 2);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 3);
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
        snat_port(
            SNAT_PORTS_DEFAULT,
            flow_hash(CLIENT, VIP, 40000, 80, IPPROTO_TCP),
            0
        )
    );
    let to_backend = Some((LB_BACKEND_MAC, host_mac(BACKEND.into())));
    let (snat, backend) = (sa(LB_BACKEND_IP.octets(), port), sa(BACKEND, 8080));
    assert_translated(&syn, &out, snat, backend, to_backend);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 1);
    assert_eq!(fx.stat(STAT_CT_MISS_SYN), 1);

    assert_eq!(fx.stat(STAT_NEW_FLOW), 1);
    assert_eq!(fx.stat(STAT_CT_MISS_SYN), 1);
    assert_eq!(half_open_states(&fx), vec![CT_STATE_HALF_OPEN; 2]);

    // The backend's SYN-ACK comes back to the SNAT address and goes out as VIP → client.
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
    assert_eq!(fx.stat(STAT_HALF_OPEN_HIT), 1);
    assert_eq!(half_open_states(&fx), vec![CT_STATE_HALF_OPEN_REPLIED; 2]);

    // The client's ACK (with data) completes the handshake: the flow moves to the open maps
    // and the packet takes the same translation.
    let data = pkt::tcp(
        sa(CLIENT, 40000),
        sa(VIP, 80),
        ACK | PSH,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_translated(&data, &out, snat, backend, to_backend);
    assert_eq!(fx.stat(STAT_FLOW_OPENED), 1);
    assert_eq!(fx.stat(STAT_CT_HIT), 1);
    assert!(
        half_open_states(&fx).is_empty(),
        "the half-open entries are gone"
    );
    assert_eq!(fx.ct_map(CT_FWD_MAP).keys().count(), 1);
    assert_eq!(fx.ct_map(CT_REV_MAP).keys().count(), 1);
    let (verdict, _) = fx.run(PROGRAM_GENERIC, &reply);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(fx.stat(STAT_CT_REPLY), 1);

    // The native program passes translated packets for veth egress, with MACs untouched.
    let (verdict, out) = fx.run(PROGRAM_NATIVE, &data);
    assert_eq!(verdict, XDP_PASS);
    assert_translated(&data, &out, snat, backend, None);
    assert!(fx.stat(STAT_XMIT_PASS) >= 1);
    // Once the backend's device is in the xmit devmap, the native program redirects into it,
    // with the next hop's MACs.
    let fxb = fx
        .ns
        .enter(|| xlb::dataplane::devices::ifindex("fxb"))
        .expect("fxb's ifindex");
    fx.ns.enter(|| fx.pins.list_xmit_device(fxb));
    let passed = fx.stat(STAT_XMIT_PASS);
    let (verdict, out) = fx.run(PROGRAM_NATIVE, &data);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_translated(&data, &out, snat, backend, to_backend);
    assert_eq!(fx.stat(STAT_XMIT_PASS), passed);
    let svc = fx.dp.installed()[&xlb::model::Frontend {
        vip: VIP.into(),
        port: 80,
        protocol: Protocol::Tcp,
    }]
        .id;
    let stats = fx.dp.service_stats(svc).expect("service stats");
    assert_eq!((stats.packets, stats.new_flows), (6, 1));
}

/// The states of the entries in the half-open map.
fn half_open_states(fx: &Fixture) -> Vec<u32> {
    fx.ct_map(CT_HALF_MAP)
        .iter()
        .map(|item| item.expect("half-open entry").1.state)
        .collect()
}

/// Opens a TCP flow from `CLIENT:client_port` to `VIP:80` (SYN, the backend's SYN-ACK, the
/// client's ACK) and returns its SNAT port.
fn open_flow(fx: &Fixture, client_port: u16) -> u16 {
    let (verdict, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, client_port), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(verdict, XDP_REDIRECT, "SYN from port {client_port}");
    let port = snat_port_of(&out);
    let (verdict, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(
            sa(BACKEND, 8080),
            sa(LB_BACKEND_IP.octets(), port),
            SYN | ACK,
            &[],
        ),
    );
    assert_eq!(verdict, XDP_REDIRECT, "SYN-ACK to port {port}");
    assert_eq!(pkt::endpoints(&out), (sa(VIP, 80), sa(CLIENT, client_port)));
    let opened = fx.stat(STAT_FLOW_OPENED);
    let (verdict, _) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, client_port), sa(VIP, 80), ACK, &[]),
    );
    assert_eq!(verdict, XDP_REDIRECT, "ACK from port {client_port}");
    assert_eq!(
        fx.stat(STAT_FLOW_OPENED),
        opened + 1,
        "the handshake opens the flow"
    );
    port
}

/// Whether `port`'s bit is set in the pinned `XLB_SERVICE_PORTS`.
fn marked_service_port(fx: &Fixture, port: u16) -> bool {
    let path = fx.pins.path().join(SERVICE_PORTS_MAP);
    let data = aya::maps::MapData::from_pin(&path).expect("service ports map");
    let words: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(data).expect("map"))
            .expect("array");
    let word = words.get(&u32::from(port / 64), 0).expect("word");
    (word >> (port % 64)) & 1 != 0
}

/// A packet to a SNAT-range port that is also a service's port tries the forward map first:
/// a backend's reply to such a SNAT port misses there and still finds its flow in the reverse
/// map, and the client's packets still go forward. Userspace marks and unmarks the port.
#[test]
fn a_reply_to_a_snat_port_that_is_also_a_service_port_finds_its_flow() {
    let mut fx = fixture("fx-svcport");
    let port = open_flow(&fx, 40000);
    assert!(marked_service_port(&fx, 80) && !marked_service_port(&fx, port));
    let mut services = fixture_services();
    services.push(service(
        VIP2.into(),
        port,
        Protocol::Tcp,
        &[(Ipv4Addr::from(BACKEND), 8080)],
    ));
    fx.dp.apply(&services).expect("apply");
    assert!(
        marked_service_port(&fx, port),
        "port {port} is a service's now"
    );

    let reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        ACK | PSH,
        b"hello",
    );
    let replies = fx.stat(STAT_CT_REPLY);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &reply);
    assert_eq!(verdict, XDP_REDIRECT, "the reply to SNAT port {port}");
    let to_client = Some((LB_CLIENT_MAC, host_mac(CLIENT.into())));
    assert_translated(&reply, &out, sa(VIP, 80), sa(CLIENT, 40000), to_client);
    assert_eq!(fx.stat(STAT_CT_REPLY), replies + 1);
    let data = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), ACK | PSH, b"more");
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(verdict, XDP_REDIRECT);
    let to_backend = Some((LB_BACKEND_MAC, host_mac(BACKEND.into())));
    let snat = sa(LB_BACKEND_IP.octets(), port);
    assert_translated(&data, &out, snat, sa(BACKEND, 8080), to_backend);

    fx.dp.apply(&fixture_services()).expect("apply");
    assert!(
        !marked_service_port(&fx, port),
        "port {port} is no service's any more"
    );
    assert!(marked_service_port(&fx, 80));
}

/// Flows to a service on a SNAT-range port go on after the service is removed. The port is
/// then no service's, so a client's packet to it is looked up as a backend's reply would be
/// (reverse map, then half-open map) before the forward map: a flow opened before the removal
/// still finds its forward entry, and one whose handshake was under way still opens.
#[test]
fn flows_to_a_removed_service_on_a_snat_range_port_drain() {
    const PORT: u16 = 3306;
    let backend = sa(BACKEND, 8080);
    let mut fx = Fixture::new(
        "fx-rmport",
        &[service(
            VIP.into(),
            PORT,
            Protocol::Tcp,
            &[(Ipv4Addr::from(BACKEND), 8080)],
        )],
    );
    let from_client = |client_port, flags, payload: &[u8]| {
        pkt::tcp(sa(CLIENT, client_port), sa(VIP, PORT), flags, payload)
    };
    let from_backend =
        |snat_port, flags| pkt::tcp(backend, sa(LB_BACKEND_IP.octets(), snat_port), flags, &[]);
    let send = |fx: &Fixture, frame: &[u8], what: &str| {
        let (verdict, out) = fx.run(PROGRAM_GENERIC, frame);
        assert_eq!(verdict, XDP_REDIRECT, "{what}");
        out
    };
    let opened_port = snat_port_of(&send(&fx, &from_client(41000, SYN, &[]), "first SYN"));
    send(&fx, &from_backend(opened_port, SYN | ACK), "first SYN-ACK");
    send(&fx, &from_client(41000, ACK, &[]), "first ACK");
    let half_open_port = snat_port_of(&send(&fx, &from_client(41001, SYN, &[]), "second SYN"));
    assert_eq!(fx.stat(STAT_FLOW_OPENED), 1);

    fx.dp.apply(&[]).expect("apply");
    assert!(
        !marked_service_port(&fx, PORT),
        "port {PORT} is no service's"
    );
    let data = from_client(41000, ACK | PSH, b"more");
    let out = send(&fx, &data, "the open flow's data");
    let to_backend = Some((LB_BACKEND_MAC, host_mac(BACKEND.into())));
    let snat = sa(LB_BACKEND_IP.octets(), opened_port);
    assert_translated(&data, &out, snat, backend, to_backend);
    let syn_ack = from_backend(half_open_port, SYN | ACK);
    let out = send(&fx, &syn_ack, "the second flow's SYN-ACK");
    let to_client = Some((LB_CLIENT_MAC, host_mac(CLIENT.into())));
    assert_translated(&syn_ack, &out, sa(VIP, PORT), sa(CLIENT, 41001), to_client);
    send(&fx, &from_client(41001, ACK, &[]), "the second flow's ACK");
    assert_eq!(fx.stat(STAT_FLOW_OPENED), 2, "the second flow opened");
    let hits = fx.stat(STAT_CT_HIT);
    send(
        &fx,
        &from_client(41001, ACK | PSH, b"data"),
        "the second flow's data",
    );
    assert_eq!(fx.stat(STAT_CT_HIT), hits + 1);
    let syn = from_client(41002, SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!((verdict, out), (XDP_PASS, syn), "a new flow is not ours");
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
        assert_partial_translated(&full, &mut out, sa(BACKEND, bport));
    }
}

/// A packet that starts a flow goes on to the new-flow program of its hook (a tail call);
/// with that program missing from its slot, the SYN passes to the kernel untouched, counted,
/// and no flow is created.
#[test]
fn without_its_new_flow_program_a_syn_passes_untouched() {
    let fx = fixture("fx-nf");
    let data = aya::maps::MapData::from_pin(fx.pins.path().join(NEW_FLOW_XDP_MAP))
        .expect("the pinned new-flow map");
    let mut slots = aya::maps::ProgramArray::try_from(aya::maps::Map::ProgramArray(data))
        .expect("a PROG_ARRAY");
    slots
        .clear_index(&NEW_FLOW_SLOT_GENERIC)
        .expect("empty the generic slot");
    let syn = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn, "passed untouched");
    assert_eq!(fx.stat(STAT_NEW_FLOW_UNREACHABLE), 1);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);
    assert!(half_open_states(&fx).is_empty(), "no flow created");
    // The native slot still holds its program: the same SYN opens a flow there.
    let (_, out) = fx.run(PROGRAM_NATIVE, &syn);
    assert_ne!(out, syn, "translated by the native new-flow program");
    assert_eq!(fx.stat(STAT_NEW_FLOW), 1);
}

/// The TC program is the same code on an skb: a TCP handshake with data, its reply, a UDP
/// exchange and a partial checksum come out as generic XDP translates them, redirected.
#[test]
fn tc_translates_as_generic_xdp_does() {
    const TC_ACT_REDIRECT: u32 = 7;
    let fx = fixture("fx-tc");
    let to_backend = Some((LB_BACKEND_MAC, host_mac(BACKEND.into())));
    let to_client = Some((LB_CLIENT_MAC, host_mac(CLIENT.into())));
    let syn = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), SYN, &[]);
    let (verdict, out) = fx.run_tc(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let port = snat_port_of(&out);
    let snat = sa(LB_BACKEND_IP.octets(), port);
    assert_translated(&syn, &out, snat, sa(BACKEND, 8080), to_backend);
    let reply = pkt::tcp(sa(BACKEND, 8080), snat, SYN | ACK, &[]);
    let (verdict, out) = fx.run_tc(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_translated(&reply, &out, sa(VIP, 80), sa(CLIENT, 40000), to_client);
    let data = pkt::tcp(sa(CLIENT, 40000), sa(VIP, 80), ACK | PSH, b"GET /\r\n\r\n");
    let (verdict, out) = fx.run_tc(&data);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_translated(&data, &out, snat, sa(BACKEND, 8080), to_backend);
    assert_eq!(fx.stat(STAT_FLOW_OPENED), 1);
    assert_eq!(fx.stat(STAT_CT_HIT), 1);
    // The same open flow through generic XDP: the same frame.
    let (verdict, xdp_out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, xdp_out, "TC and generic XDP translate the flow alike");

    let query = pkt::udp(sa(CLIENT, 41000), sa(VIP, 53), b"q");
    let (verdict, out) = fx.run_tc(&query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let udp_snat = sa(LB_BACKEND_IP.octets(), snat_port_of(&out));
    assert_translated(&query, &out, udp_snat, sa(BACKEND, 5353), to_backend);

    let full = pkt::tcp(sa(CLIENT, 40001), sa(VIP, 80), SYN, b"");
    let mut partial = full.clone();
    pkt::make_partial(&mut partial);
    let (verdict, mut out) = fx.run_tc(&partial);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_partial_translated(&full, &mut out, sa(BACKEND, 8080));
}

/// Checks `out`, the translation toward `backend` of `full` sent with a partial checksum, still
/// carries a partial checksum, now of the new addresses, which the kernel's completion turns
/// into the correct full checksum.
fn assert_partial_translated(full: &[u8], out: &mut [u8], backend: std::net::SocketAddrV4) {
    let snat = sa(LB_BACKEND_IP.octets(), snat_port_of(out));
    let mut expected = pkt::translated(full, snat, backend);
    pkt::make_partial(&mut expected);
    assert_eq!(
        out[14..],
        expected[14..],
        "partial checksum of the new pseudo-header"
    );
    pkt::complete_partial(out);
    assert!(
        pkt::checksums_ok(out),
        "completed checksum invalid: {out:02x?}"
    );
}

#[test]
fn same_client_port_through_two_vips_to_one_backend_gets_distinct_snat_ports() {
    let fx = fixture("fx-collide");
    // Occupy the first-choice port of the second flow with a live reverse entry, as if another
    // flow to the same backend held it.
    let second_hash = flow_hash(CLIENT, VIP2, 45000, 80, IPPROTO_TCP);
    let taken = snat_port(SNAT_PORTS_DEFAULT, second_hash, 0);
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
    assert_eq!(p2, snat_port(SNAT_PORTS_DEFAULT, second_hash, 1));
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
    let first_choice = snat_port(SNAT_PORTS_DEFAULT, hash, 0);
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

/// Makes SNAT `port` toward `BACKEND:8080` held by another client's open flow (both entries).
fn hold_snat_port(fx: &Fixture, port: u16, state: u32, last_seen_ns: u64) {
    put_flow(fx, port, state, last_seen_ns, CT_REV_MAP, CT_FWD_MAP);
}

/// Puts a flow from `[192, 0, 2, 9]:50000` on SNAT `port` toward `BACKEND:8080`, last seen at
/// `last_seen_ns`: its reverse entry in `reverse_map`, its forward entry in `forward_map`.
fn put_flow(
    fx: &Fixture,
    port: u16,
    state: u32,
    last_seen_ns: u64,
    reverse_map: &str,
    forward_map: &str,
) {
    put_flow_of(
        fx,
        (IPPROTO_TCP, 80, 8080),
        port,
        state,
        last_seen_ns,
        reverse_map,
        forward_map,
    );
}

/// [`put_flow`] for the service `(proto, VIP port, backend port)`.
fn put_flow_of(
    fx: &Fixture,
    (proto, vip_port, backend_port): (u8, u16, u16),
    port: u16,
    state: u32,
    last_seen_ns: u64,
    reverse_map: &str,
    forward_map: &str,
) {
    let other = [192, 0, 2, 9];
    let key = FlowKey {
        proto,
        src_port: backend_port,
        ..reverse_key(port)
    };
    let reverse = CtEntry {
        nat_src_ip: VIP,
        nat_dst_ip: other,
        nat_src_port: vip_port,
        nat_dst_port: 50000,
        state,
        last_seen_ns,
        dir: CT_DIR_REVERSE,
        ..CtEntry::default()
    };
    let forward = CtEntry {
        nat_src_ip: LB_BACKEND_IP.octets(),
        nat_dst_ip: BACKEND,
        nat_src_port: port,
        nat_dst_port: backend_port,
        state,
        last_seen_ns,
        dir: CT_DIR_FORWARD,
        ..CtEntry::default()
    };
    let forward_key = reverse.peer_key(proto);
    fx.ct_map(reverse_map)
        .insert(key, reverse.with_sums(&key), 0)
        .expect("insert reverse entry");
    fx.ct_map(forward_map)
        .insert(forward_key, forward.with_sums(&forward_key), 0)
        .expect("insert forward entry");
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
    let port = open_flow(fx, client_port);
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
    hold_snat_port(
        &fx,
        snat_port(SNAT_PORTS_DEFAULT, hash, 0),
        CT_STATE_TIME_WAIT,
        past_closing,
    );
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 45200), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(
        snat_port_of(&out),
        snat_port(SNAT_PORTS_DEFAULT, hash, 1),
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

/// The forward conntrack key of `CLIENT:client_port → VIP:80`.
fn forward_key(client_port: u16) -> FlowKey {
    FlowKey {
        src_ip: CLIENT,
        dst_ip: VIP,
        src_port: client_port,
        dst_port: 80,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

#[test]
fn syn_with_fin_or_rst_creates_no_flow() {
    let fx = fixture("fx-flags");
    for (i, flags) in [SYN | FIN, SYN | RST, SYN | FIN | RST]
        .into_iter()
        .enumerate()
    {
        let frame = pkt::tcp(sa(CLIENT, 41000 + i as u16), sa(VIP, 80), flags, &[]);
        let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
        assert_eq!((verdict, out), (XDP_PASS, frame), "flags {flags:#x}");
    }
    assert_eq!(fx.stat(STAT_BAD_TCP_FLAGS), 3);
    // A SYN-ACK to a VIP is a segment of a flow we do not track.
    let frame = pkt::tcp(sa(CLIENT, 41010), sa(VIP, 80), SYN | ACK, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
    assert_eq!((verdict, out), (XDP_PASS, frame));
    assert_eq!(fx.stat(STAT_CT_MISS_NON_SYN), 1);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);
    assert_eq!(fx.ct_map(CT_HALF_MAP).keys().count(), 0);
}

#[test]
fn bad_headers_and_ip_checksums_are_dropped_never_forwarded() {
    let fx = fixture("fx-badhdr");
    let syn = pkt::tcp(sa(CLIENT, 41100), sa(VIP, 80), SYN, &[]);
    let mut cases = Vec::new();
    let mut short_doff = syn.clone();
    short_doff[pkt::L4 + 12] = 0x40; // data offset 4 words
    pkt::fix_checksums(&mut short_doff);
    cases.push(("data offset 4", short_doff, STAT_DROP_BAD_L4_HDR));
    let mut long_doff = syn.clone();
    long_doff[pkt::L4 + 12] = 0x60; // 24 bytes, past the 20-byte segment
    pkt::fix_checksums(&mut long_doff);
    cases.push((
        "data offset past the segment",
        long_doff,
        STAT_DROP_BAD_L4_HDR,
    ));
    let query = pkt::udp(sa(CLIENT, 5001), sa(VIP, 53), b"query");
    for (what, len) in [("UDP length 7", 7u16), ("UDP length past the payload", 14)] {
        let mut bad = query.clone();
        bad[pkt::L4 + 4..pkt::L4 + 6].copy_from_slice(&len.to_be_bytes());
        pkt::fix_checksums(&mut bad);
        cases.push((what, bad, STAT_DROP_BAD_L4_HDR));
    }
    let mut bad_csum = syn.clone();
    bad_csum[pkt::IP + 10] ^= 0x01;
    cases.push(("IP checksum", bad_csum, STAT_DROP_BAD_IP_CSUM));
    for (what, frame, counter) in &cases {
        let before = fx.stat(*counter);
        let (verdict, _) = fx.run(PROGRAM_GENERIC, frame);
        assert_eq!(verdict, XDP_DROP, "{what}");
        assert_eq!(fx.stat(*counter), before + 1, "{what} counted");
    }
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);

    // A packet of an open flow whose IP checksum is wrong is not forwarded either way.
    let port = open_flow(&fx, 41101);
    let mut data = pkt::tcp(sa(CLIENT, 41101), sa(VIP, 80), ACK, b"x");
    data[pkt::IP + 10] ^= 0x01;
    let (verdict, _) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(verdict, XDP_DROP, "to the VIP: dropped");
    let mut reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        ACK,
        b"y",
    );
    reply[pkt::IP + 10] ^= 0x01;
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &reply);
    assert_eq!(
        (verdict, out),
        (XDP_PASS, reply),
        "to the SNAT address: passed untouched (the kernel drops it)"
    );
}

#[test]
fn martian_sources_and_ttl_1_create_no_flow() {
    let fx = fixture("fx-martian");
    for src in [
        [0, 0, 0, 0],
        [127, 0, 0, 1],
        [224, 0, 0, 1],
        [240, 0, 0, 1],
        [255, 255, 255, 255],
    ] {
        let frame = pkt::tcp(sa(src, 41200), sa(VIP, 80), SYN, &[]);
        let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
        assert_eq!((verdict, out), (XDP_PASS, frame), "source {src:?}");
        let frame = pkt::udp(sa(src, 41200), sa(VIP, 53), b"q");
        let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
        assert_eq!((verdict, out), (XDP_PASS, frame), "UDP source {src:?}");
    }
    assert_eq!(fx.stat(STAT_MARTIAN_SRC), 10);
    for ttl in [0u8, 1] {
        let mut frame = pkt::tcp(sa(CLIENT, 41201), sa(VIP, 80), SYN, &[]);
        frame[pkt::IP + 8] = ttl;
        pkt::fix_checksums(&mut frame);
        let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
        assert_eq!((verdict, out), (XDP_PASS, frame), "TTL {ttl}");
    }
    assert_eq!(fx.stat(STAT_TTL_EXPIRED), 2);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);
    // TTL 2 is fine.
    let mut frame = pkt::tcp(sa(CLIENT, 41202), sa(VIP, 80), SYN, &[]);
    frame[pkt::IP + 8] = 2;
    pkt::fix_checksums(&mut frame);
    let (verdict, _) = fx.run(PROGRAM_GENERIC, &frame);
    assert_eq!(verdict, XDP_REDIRECT);
}

#[test]
fn frames_not_addressed_to_the_device_are_never_translated() {
    let mut fx = fixture("fx-mac");
    let other_host = [2, 0, 0, 0, 0, 0xbb];
    let broadcast = [0xff; 6];
    for mac in [other_host, broadcast] {
        let mut syn = pkt::tcp(sa(CLIENT, 41300), sa(VIP, 80), SYN, &[]);
        syn[0..6].copy_from_slice(&mac);
        let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
        assert_eq!((verdict, out), (XDP_PASS, syn), "SYN to {mac:02x?}");
    }
    assert_eq!(fx.stat(STAT_NOT_OUR_MAC), 2);
    assert_eq!(fx.stat(STAT_NEW_FLOW), 0);
    // Packets of an open flow, both ways, addressed to another host.
    let port = open_flow(&fx, 41301);
    let mut data = pkt::tcp(sa(CLIENT, 41301), sa(VIP, 80), ACK, b"x");
    data[0..6].copy_from_slice(&other_host);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!((verdict, out), (XDP_PASS, data));
    let mut reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        ACK,
        b"y",
    );
    reply[0..6].copy_from_slice(&other_host);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &reply);
    assert_eq!((verdict, out), (XDP_PASS, reply));
    // A FIN addressed to another host does not close the flow.
    let mut fin = pkt::tcp(sa(CLIENT, 41301), sa(VIP, 80), FIN | ACK, &[]);
    fin[0..6].copy_from_slice(&other_host);
    fx.run(PROGRAM_GENERIC, &fin);
    let entry = fx
        .ct_map(CT_FWD_MAP)
        .get(&forward_key(41301), 0)
        .expect("open entry");
    assert_eq!(entry.state, CT_STATE_OPEN);
    assert_eq!(fx.stat(STAT_NOT_OUR_MAC), 5);
    // A device whose MAC is not registered translates nothing.
    fx.dp
        .set_device_mac(LO_IFINDEX + 1024, LB_TEST_RUN_MAC)
        .expect("register");
    let data = pkt::tcp(sa(CLIENT, 41301), sa(VIP, 80), ACK, b"x");
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(
        (verdict, out),
        (XDP_PASS, data),
        "slot taken by another ifindex"
    );
}

/// Puts a half-open flow from `[192, 0, 2, 9]:50000` on SNAT `port` toward `BACKEND:8080`,
/// last seen at `last_seen_ns`.
fn hold_half_open(fx: &Fixture, port: u16, state: u32, last_seen_ns: u64) {
    put_flow(fx, port, state, last_seen_ns, CT_HALF_MAP, CT_HALF_MAP);
}

#[test]
fn half_open_flows_time_out_and_stale_ones_give_up_their_port() {
    let fx = fixture("fx-halfopen");
    let now = xlb::inspect::monotonic_ns();
    let cases = [
        // (client port, idle, state, taken over?, counter)
        (
            41400,
            CT_TIMEOUT_HALF_OPEN_NS + 1_000_000_000,
            CT_STATE_HALF_OPEN_REPLIED,
            true,
            STAT_HALF_OPEN_TIMEOUT,
        ),
        (
            41401,
            CT_HALF_OPEN_RECLAIM_NS + 500_000_000,
            CT_STATE_HALF_OPEN,
            true,
            STAT_EARLY_DROP,
        ),
        (
            41402,
            CT_HALF_OPEN_RECLAIM_NS + 500_000_000,
            CT_STATE_HALF_OPEN_REPLIED,
            true,
            STAT_EARLY_DROP,
        ),
        (41403, 0, CT_STATE_HALF_OPEN, false, STAT_EARLY_DROP),
    ];
    for (client_port, idle, state, taken, counter) in cases {
        let hash = flow_hash(CLIENT, VIP, client_port, 80, IPPROTO_TCP);
        let first = snat_port(SNAT_PORTS_DEFAULT, hash, 0);
        hold_half_open(&fx, first, state, now.saturating_sub(idle));
        let before = fx.stat(counter);
        let (_, out) = fx.run(
            PROGRAM_GENERIC,
            &pkt::tcp(sa(CLIENT, client_port), sa(VIP, 80), SYN, &[]),
        );
        let port = snat_port_of(&out);
        if taken {
            assert_eq!(port, first, "port {client_port}: taken over");
            assert_eq!(fx.stat(counter), before + 1);
            // The old flow is gone whole: its forward entry too.
            let old_fwd = reverse_entry_peer(first);
            assert!(
                fx.ct_map(CT_HALF_MAP).get(&old_fwd, 0).is_err(),
                "old forward entry deleted"
            );
        } else {
            assert_eq!(
                port,
                snat_port(SNAT_PORTS_DEFAULT, hash, 1),
                "a fresh half-open flow keeps its port"
            );
            assert_eq!(fx.stat(counter), before);
        }
        // The backend's answer on the port reaches the new client.
        let back = backend_answer(&fx, port);
        assert_eq!(
            pkt::endpoints(&back),
            (sa(VIP, 80), sa(CLIENT, client_port))
        );
    }
}

/// The forward key of the flow `hold_half_open` / `hold_snat_port` put on SNAT `port`.
fn reverse_entry_peer(_port: u16) -> FlowKey {
    FlowKey {
        src_ip: [192, 0, 2, 9],
        dst_ip: VIP,
        src_port: 50000,
        dst_port: 80,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

#[test]
fn a_new_syn_on_a_closing_flow_replaces_it_whole() {
    let fx = fixture("fx-replace");
    let old_port = open_flow(&fx, 41500);
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41500), sa(VIP, 80), FIN | ACK, &[]),
    );
    let (verdict, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41500), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(fx.stat(STAT_CT_REPLACED), 1);
    assert!(
        fx.ct_map(CT_FWD_MAP).get(&forward_key(41500), 0).is_err(),
        "old forward entry gone"
    );
    assert!(
        fx.ct_map(CT_REV_MAP)
            .get(&reverse_key(old_port), 0)
            .is_err(),
        "old reverse entry gone"
    );
    let new_port = snat_port_of(&out);
    // The new attempt completes and both directions translate.
    let back = backend_answer(&fx, new_port);
    assert_eq!(pkt::endpoints(&back), (sa(VIP, 80), sa(CLIENT, 41500)));
    // A SYN on an *open* flow does not replace it (a retransmission or a stray).
    open_flow(&fx, 41501);
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41501), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(fx.stat(STAT_CT_REPLACED), 1);
}

#[test]
fn an_entry_without_its_peer_is_deleted_never_used() {
    let fx = fixture("fx-orphan");
    let now = xlb::inspect::monotonic_ns();
    // A live reverse entry without forward entry holds the first-choice port of a new flow.
    let hash = flow_hash(CLIENT, VIP, 41600, 80, IPPROTO_TCP);
    let first = snat_port(SNAT_PORTS_DEFAULT, hash, 0);
    hold_snat_port(&fx, first, CT_STATE_OPEN, now);
    fx.ct_map(CT_FWD_MAP)
        .remove(&reverse_entry_peer(first))
        .expect("remove the forward entry");
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41600), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(snat_port_of(&out), first, "the orphan's port is taken over");
    assert_eq!(fx.stat(STAT_CT_ORPHAN), 1);

    // An open forward entry whose reverse entry is gone: the next packet that refreshes it
    // (at most a second later) finds that, deletes it and passes the packet untouched.
    let port = open_flow(&fx, 41601);
    fx.ct_map(CT_REV_MAP)
        .remove(&reverse_key(port))
        .expect("remove the reverse entry");
    let mut fwd = fx.ct_map(CT_FWD_MAP);
    let mut entry = fwd.get(&forward_key(41601), 0).expect("forward entry");
    entry.last_seen_ns = now.saturating_sub(2 * CT_REFRESH_NS);
    fwd.insert(forward_key(41601), entry, 0)
        .expect("age the entry");
    let data = pkt::tcp(sa(CLIENT, 41601), sa(VIP, 80), ACK, b"x");
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!((verdict, out), (XDP_PASS, data));
    assert_eq!(fx.stat(STAT_CT_ORPHAN), 2);
    assert!(fx.ct_map(CT_FWD_MAP).get(&forward_key(41601), 0).is_err());

    // A half-open reverse entry without its forward entry is not used for a SYN-ACK.
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41602), sa(VIP, 80), SYN, &[]),
    );
    let port = snat_port_of(&out);
    fx.ct_map(CT_HALF_MAP)
        .remove(&forward_key(41602))
        .expect("remove half-open forward");
    let syn_ack = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        SYN | ACK,
        &[],
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn_ack);
    assert_eq!((verdict, out), (XDP_PASS, syn_ack));
    assert_eq!(fx.stat(STAT_CT_ORPHAN), 3);
}

#[test]
fn udp_flows_open_once_traffic_went_both_ways() {
    let fx = fixture("fx-udp-open");
    let query = pkt::udp(sa(CLIENT, 5002), sa(VIP, 53), b"q1");
    let (_, out) = fx.run(PROGRAM_GENERIC, &query);
    let port = snat_port_of(&out);
    assert_eq!(half_open_states(&fx), vec![CT_STATE_HALF_OPEN; 2]);
    let answer = pkt::udp(sa(BACKEND, 5353), sa(LB_BACKEND_IP.octets(), port), b"a1");
    let (verdict, _) = fx.run(PROGRAM_GENERIC, &answer);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(half_open_states(&fx), vec![CT_STATE_HALF_OPEN_REPLIED; 2]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &query);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(snat_port_of(&out), port);
    assert_eq!(fx.stat(STAT_FLOW_OPENED), 1);
    assert!(half_open_states(&fx).is_empty());
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &answer);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(pkt::endpoints(&out), (sa(VIP, 53), sa(CLIENT, 5002)));
    assert_eq!(fx.stat(STAT_CT_REPLY), 1);
}

/// Checks that every entry of the open maps has its peer pointing back, and returns how many
/// flows they hold.
fn assert_open_flows_whole(fx: &Fixture) -> usize {
    let fwd = fx.ct_map(CT_FWD_MAP);
    let rev = fx.ct_map(CT_REV_MAP);
    let mut flows = 0;
    for (own, other, what) in [(&fwd, &rev, "forward"), (&rev, &fwd, "reverse")] {
        for item in own.iter() {
            let (key, entry) = item.expect("entry");
            let peer = other
                .get(&entry.peer_key(key.proto), 0)
                .unwrap_or_else(|e| panic!("{what} entry {key:?} has no peer: {e}"));
            assert!(
                CtEntry::is_peer_of(&key, &peer),
                "{what} entry {key:?}: its peer points elsewhere"
            );
            flows += 1;
        }
    }
    flows / 2
}

/// A SYN from a spoofed source `10.x.y.z:port` numbered `i`, written into `frame`.
fn flood_syn(i: u64, frame: &mut Vec<u8>) {
    let src = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let port = 1024 + (i >> 24) as u16 * 7 + (i % 7) as u16;
    *frame = pkt::tcp(sa(src, port), sa(VIP, 80), SYN, &[]);
}

/// Item 1 and 2 of issue 14: an idle established flow survives two million distinct flood
/// SYNs to its own service and keeps translating both ways; the open maps hold only whole
/// flows afterwards, and no half-open entry left without its peer is ever used.
#[test]
fn an_idle_established_flow_survives_two_million_flood_syns() {
    // 32 backends: 32 × 16,384 SNAT ports, far more than the half-open map holds, so the
    // flood fills it and its LRU evicts.
    let mut backends = vec![(Ipv4Addr::from(BACKEND), 8080)];
    backends.extend((10..41).map(|host| (Ipv4Addr::new(203, 0, 113, host), 8080)));
    let fx = Fixture::new(
        "fx-flood",
        &[service(VIP.into(), 80, Protocol::Tcp, &backends)],
    );
    let port = open_flow(&fx, 42000);
    const FLOOD: u64 = 2_000_000;
    let verdicts = fx.run_many(PROGRAM_GENERIC, FLOOD, flood_syn);
    let created = fx.stat(STAT_NEW_FLOW) - 1;
    eprintln!(
        "flood of {FLOOD} SYNs: verdicts {verdicts:?}, new flows {created}, early drops {}, half-open timeouts {}, orphans {}, snat exhausted {}, half-open entries at the end {}",
        fx.stat(STAT_EARLY_DROP),
        fx.stat(STAT_HALF_OPEN_TIMEOUT),
        fx.stat(STAT_CT_ORPHAN),
        fx.stat(STAT_SNAT_EXHAUSTED),
        fx.ct_map(CT_HALF_MAP).keys().count()
    );
    assert!(
        created > MAX_HALF_OPEN_ENTRIES as u64,
        "the flood must overflow the half-open map ({created} flows created)"
    );
    assert_eq!(fx.stat(STAT_FLOW_OPENED), 1, "no flood SYN opened a flow");
    assert_eq!(
        assert_open_flows_whole(&fx),
        1,
        "the open maps hold the idle flow only"
    );

    // The idle flow still translates both ways, on its own SNAT port.
    let data = pkt::tcp(sa(CLIENT, 42000), sa(VIP, 80), ACK | PSH, b"still there?");
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &data);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_translated(
        &data,
        &out,
        sa(LB_BACKEND_IP.octets(), port),
        sa(BACKEND, 8080),
        Some((LB_BACKEND_MAC, host_mac(BACKEND.into()))),
    );
    let reply = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        ACK,
        b"yes",
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &reply);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(pkt::endpoints(&out), (sa(VIP, 80), sa(CLIENT, 42000)));

    // Half-open entries the LRU left without their peer are deleted when hit, never used.
    let half = fx.ct_map(CT_HALF_MAP);
    let mut orphans = Vec::new();
    for item in half.iter() {
        let (key, entry) = item.expect("half-open entry");
        let whole = half
            .get(&entry.peer_key(key.proto), 0)
            .is_ok_and(|peer| CtEntry::is_peer_of(&key, &peer));
        if !whole {
            orphans.push((key, entry));
        }
        if orphans.len() == 200 {
            break;
        }
    }
    eprintln!("checked {} half-open orphans", orphans.len());
    for (key, entry) in orphans {
        let src = sa(key.src_ip, key.src_port);
        let dst = sa(key.dst_ip, key.dst_port);
        // A reverse orphan gets the backend's SYN-ACK, a forward one the client's ACK: both
        // pass untouched.
        let flags = if entry.dir == CT_DIR_REVERSE {
            SYN | ACK
        } else {
            ACK
        };
        let frame = pkt::tcp(src, dst, flags, &[]);
        let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
        assert_eq!(
            (verdict, &out),
            (XDP_PASS, &frame),
            "orphan {key:?} was used"
        );
        assert!(half.get(&key, 0).is_err(), "orphan {key:?} deleted");
    }
}

/// When the candidate SNAT ports of a new flow are held by live half-open flows (the first
/// `SNAT_PROBES_BEFORE_EARLY_DROP`, then one more by a half-open flow: probing ends there), the
/// port of the longest idle one seen is taken over if it has been idle for 100 ms or more;
/// otherwise the new flow is refused (passed to the kernel for the proxy). (Probing may end
/// sooner, see the next test.)
#[test]
fn under_pressure_the_longest_idle_half_open_flow_gives_up_its_port() {
    let fx = fixture("fx-pressure");
    let now = xlb::inspect::monotonic_ns();
    let hash = flow_hash(CLIENT, VIP, 41700, 80, IPPROTO_TCP);
    // All 16 candidates held by fresh half-open flows (each from its own client port).
    for attempt in 0..SNAT_PROBES {
        hold_half_open_from(
            &fx,
            snat_port(SNAT_PORTS_DEFAULT, hash, attempt),
            50000 + attempt as u16,
            now,
        );
    }
    let syn = pkt::tcp(sa(CLIENT, 41700), sa(VIP, 80), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(
        (verdict, out),
        (XDP_PASS, syn.clone()),
        "all held and fresh: refused"
    );
    assert_eq!(fx.stat(STAT_SNAT_EXHAUSTED), 1);
    // One past where probing ends, 300 ms idle (less than the 1 s after which any prober
    // takes it): not seen, so still refused.
    let unseen = snat_port(SNAT_PORTS_DEFAULT, hash, SNAT_PROBES_BEFORE_EARLY_DROP + 1);
    let unseen_client = 50000 + SNAT_PROBES_BEFORE_EARLY_DROP as u16 + 1;
    hold_half_open_from(&fx, unseen, unseen_client, now.saturating_sub(300_000_000));
    let (verdict, _) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(
        verdict, XDP_PASS,
        "the idle flow lies past the probes: refused"
    );
    assert_eq!(fx.stat(STAT_SNAT_EXHAUSTED), 2);
    // One among the probed, 300 ms idle, is the longest idle seen: it gives way.
    let victim = snat_port(SNAT_PORTS_DEFAULT, hash, 2);
    hold_half_open_from(&fx, victim, 50002, now.saturating_sub(300_000_000));
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(snat_port_of(&out), victim);
    assert_eq!(fx.stat(STAT_EARLY_DROP), 1);
    assert_answered(&fx, victim, (sa(VIP, 80), sa(CLIENT, 41700)));
    let mut victim_fwd = reverse_entry_peer(victim);
    victim_fwd.src_port = 50002;
    assert!(
        fx.ct_map(CT_HALF_MAP).get(&victim_fwd, 0).is_err(),
        "the victim's forward entry is gone with it"
    );
}

/// Probing ends sooner when a flow that may give way is seen: after
/// `SNAT_PROBES_BEFORE_IDLE_EARLY_DROP` held candidates, the longest idle of them is taken over
/// if it has been idle for 100 ms, even when a later candidate is held by a flow idle longer.
#[test]
fn under_pressure_an_idle_flow_seen_early_gives_up_its_port_at_once() {
    let fx = fixture("fx-idle-drop");
    let now = xlb::inspect::monotonic_ns();
    let hash = flow_hash(CLIENT, VIP, 41800, 80, IPPROTO_TCP);
    let idle = |ms: u64| now.saturating_sub(ms * 1_000_000);
    // Candidate 0 fresh, 1 idle 200 ms, 2 idle 900 ms (short of the 1 s after which any prober
    // takes it), the rest fresh.
    for attempt in 0..SNAT_PROBES {
        let seen = match attempt {
            1 => idle(200),
            2 => idle(900),
            _ => now,
        };
        hold_half_open_from(
            &fx,
            snat_port(SNAT_PORTS_DEFAULT, hash, attempt),
            50000 + attempt as u16,
            seen,
        );
    }
    assert_eq!(SNAT_PROBES_BEFORE_IDLE_EARLY_DROP, 2);
    let syn = pkt::tcp(sa(CLIENT, 41800), sa(VIP, 80), SYN, &[]);
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &syn);
    assert_eq!(verdict, XDP_REDIRECT);
    let taken = snat_port(SNAT_PORTS_DEFAULT, hash, 1);
    assert_eq!(
        snat_port_of(&out),
        taken,
        "the 200 ms idle flow, seen second, gives way"
    );
    assert_eq!(fx.stat(STAT_EARLY_DROP), 1);
    assert_answered(&fx, taken, (sa(VIP, 80), sa(CLIENT, 41800)));
    // The 900 ms idle flow, never probed, keeps its port and both entries.
    let mut unprobed_fwd = reverse_entry_peer(snat_port(SNAT_PORTS_DEFAULT, hash, 2));
    unprobed_fwd.src_port = 50002;
    assert!(
        fx.ct_map(CT_HALF_MAP).get(&unprobed_fwd, 0).is_ok(),
        "the flow past the probes keeps its forward entry"
    );
}

/// Puts a half-open flow from `[192, 0, 2, 9]:client_port` on SNAT `port` toward
/// `BACKEND:8080`, last seen at `last_seen_ns`, in `CT_STATE_HALF_OPEN`.
fn hold_half_open_from(fx: &Fixture, port: u16, client_port: u16, last_seen_ns: u64) {
    hold_half_open_in(fx, port, client_port, last_seen_ns, CT_STATE_HALF_OPEN);
}

/// [`hold_half_open_from`] in `state`.
fn hold_half_open_in(fx: &Fixture, port: u16, client_port: u16, last_seen_ns: u64, state: u32) {
    let reverse = CtEntry {
        nat_src_ip: VIP,
        nat_dst_ip: [192, 0, 2, 9],
        nat_src_port: 80,
        nat_dst_port: client_port,
        state,
        last_seen_ns,
        dir: CT_DIR_REVERSE,
        ..CtEntry::default()
    };
    let forward = CtEntry {
        nat_src_ip: LB_BACKEND_IP.octets(),
        nat_dst_ip: BACKEND,
        nat_src_port: port,
        nat_dst_port: 8080,
        state,
        last_seen_ns,
        dir: CT_DIR_FORWARD,
        ..CtEntry::default()
    };
    let (key, forward_key) = (reverse_key(port), reverse.peer_key(IPPROTO_TCP));
    let mut map = fx.ct_map(CT_HALF_MAP);
    map.insert(key, reverse.with_sums(&key), 0)
        .expect("insert reverse entry");
    map.insert(forward_key, forward.with_sums(&forward_key), 0)
        .expect("insert forward entry");
}

/// The client closes first, then the backend: the backend's end closes without TIME_WAIT, so
/// the flow's SNAT port serves again 2 s later (not 10 s); a backend that closes first keeps
/// TIME_WAIT whatever the client does after.
#[test]
fn a_flow_both_sides_closed_client_first_frees_its_port_after_2_s() {
    let fx = fixture("fx-closed");
    let port = open_flow(&fx, 41800);
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41800), sa(VIP, 80), FIN | ACK, &[]),
    );
    let backend_fin = pkt::tcp(
        sa(BACKEND, 8080),
        sa(LB_BACKEND_IP.octets(), port),
        FIN | ACK,
        &[],
    );
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &backend_fin);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(pkt::endpoints(&out), (sa(VIP, 80), sa(CLIENT, 41800)));
    let fwd = fx
        .ct_map(CT_FWD_MAP)
        .get(&forward_key(41800), 0)
        .expect("forward");
    let rev = fx
        .ct_map(CT_REV_MAP)
        .get(&reverse_key(port), 0)
        .expect("reverse");
    assert_eq!((fwd.state, rev.state), (CT_STATE_CLOSED, CT_STATE_CLOSED));
    // The last ACK still goes through.
    let (verdict, _) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41800), sa(VIP, 80), ACK, &[]),
    );
    assert_eq!(verdict, XDP_REDIRECT);

    // A closed flow idle past 2 s gives its port to a new flow; one in TIME_WAIT as long does
    // not.
    let now = xlb::inspect::monotonic_ns();
    let past_closed = now.saturating_sub(CT_TIMEOUT_TCP_CLOSED_NS + 500_000_000);
    let hash = flow_hash(CLIENT, VIP, 41801, 80, IPPROTO_TCP);
    hold_snat_port(
        &fx,
        snat_port(SNAT_PORTS_DEFAULT, hash, 0),
        CT_STATE_CLOSED,
        past_closed,
    );
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41801), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(
        snat_port_of(&out),
        snat_port(SNAT_PORTS_DEFAULT, hash, 0),
        "the closed flow's port is reused"
    );
    let hash = flow_hash(CLIENT, VIP, 41802, 80, IPPROTO_TCP);
    hold_snat_port(
        &fx,
        snat_port(SNAT_PORTS_DEFAULT, hash, 0),
        CT_STATE_TIME_WAIT,
        past_closed,
    );
    let (_, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41802), sa(VIP, 80), SYN, &[]),
    );
    assert_eq!(
        snat_port_of(&out),
        snat_port(SNAT_PORTS_DEFAULT, hash, 1),
        "a TIME_WAIT port is kept"
    );
    // Backend first, then the client: TIME_WAIT stays.
    let port = open_flow(&fx, 41803);
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(
            sa(BACKEND, 8080),
            sa(LB_BACKEND_IP.octets(), port),
            FIN | ACK,
            &[],
        ),
    );
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41803), sa(VIP, 80), FIN | ACK, &[]),
    );
    let fwd = fx
        .ct_map(CT_FWD_MAP)
        .get(&forward_key(41803), 0)
        .expect("forward");
    assert_eq!(fwd.state, CT_STATE_TIME_WAIT);
}

/// The SNAT port a new flow from `CLIENT:client_port` to `VIP:vip_port/proto` gets when its
/// first candidate is held by a flow in `state` idle for `idle_ns` (in `reverse_map` and
/// `forward_map`): `true` when it took that port, `false` when it probed on.
fn takes_held_port(
    fx: &Fixture,
    service: (u8, u16, u16),
    client_port: u16,
    state: u32,
    idle_ns: u64,
    maps: (&str, &str),
) -> bool {
    let (proto, vip_port, _) = service;
    let hash = flow_hash(CLIENT, VIP, client_port, vip_port, proto);
    let first = snat_port(SNAT_PORTS_DEFAULT, hash, 0);
    let last_seen = xlb::inspect::monotonic_ns().saturating_sub(idle_ns);
    put_flow_of(fx, service, first, state, last_seen, maps.0, maps.1);
    let frame = match proto {
        IPPROTO_TCP => pkt::tcp(sa(CLIENT, client_port), sa(VIP, vip_port), SYN, &[]),
        _ => pkt::udp(sa(CLIENT, client_port), sa(VIP, vip_port), b"q"),
    };
    let (verdict, out) = fx.run(PROGRAM_GENERIC, &frame);
    assert_eq!(verdict, XDP_REDIRECT, "new flow from {client_port}");
    let port = snat_port_of(&out);
    assert!(
        port == first || port == snat_port(SNAT_PORTS_DEFAULT, hash, 1),
        "port {port}: neither the first nor the second candidate"
    );
    if service == TCP_SERVICE {
        assert_answered(fx, port, (sa(VIP, vip_port), sa(CLIENT, client_port)));
    }
    port == first
}

/// Checks `BACKEND:8080`'s SYN-ACK to SNAT `port` comes back as `endpoints` with valid
/// checksums: the reverse entry's kept sums are those of the port it was written at.
fn assert_answered(
    fx: &Fixture,
    port: u16,
    endpoints: (std::net::SocketAddrV4, std::net::SocketAddrV4),
) {
    let back = backend_answer(fx, port);
    assert_eq!(
        pkt::endpoints(&back),
        endpoints,
        "the answer on port {port}"
    );
    assert!(
        pkt::checksums_ok(&back),
        "the answer on port {port}: checksums invalid: {back:02x?}"
    );
}

const SECOND: u64 = 1_000_000_000;
const TCP_SERVICE: (u8, u16, u16) = (IPPROTO_TCP, 80, 8080);
const UDP_SERVICE: (u8, u16, u16) = (IPPROTO_UDP, 53, 5353);
const OPEN_MAPS: (&str, &str) = (CT_REV_MAP, CT_FWD_MAP);
const HALF_MAPS: (&str, &str) = (CT_HALF_MAP, CT_HALF_MAP);

/// A flow the backend closed first holds its port as long as the backend's TIME_WAIT (60 s,
/// Linux's TCP_TIMEWAIT_LEN) and no longer.
#[test]
fn a_time_wait_flow_holds_its_port_60_s_and_no_longer() {
    let fx = fixture("fx-tw60");
    assert!(
        !takes_held_port(
            &fx,
            TCP_SERVICE,
            42000,
            CT_STATE_TIME_WAIT,
            59 * SECOND,
            OPEN_MAPS
        ),
        "held at 59 s"
    );
    assert!(
        takes_held_port(
            &fx,
            TCP_SERVICE,
            42001,
            CT_STATE_TIME_WAIT,
            61 * SECOND,
            OPEN_MAPS
        ),
        "free at 61 s"
    );
    assert_eq!(fx.stat(STAT_CT_EXPIRED), 1);
}

/// A UDP flow whose traffic went both ways at most once (a query and its answer) lives 30 s.
#[test]
fn a_udp_exchange_holds_its_port_30_s() {
    let fx = fixture("fx-udp30");
    for (client_port, state, idle, taken) in [
        (5100, CT_STATE_HALF_OPEN, 29, false),
        (5101, CT_STATE_HALF_OPEN, 31, true),
        (5102, CT_STATE_HALF_OPEN_REPLIED, 29, false),
        (5103, CT_STATE_HALF_OPEN_REPLIED, 31, true),
    ] {
        assert_eq!(
            takes_held_port(
                &fx,
                UDP_SERVICE,
                client_port,
                state,
                idle * SECOND,
                HALF_MAPS
            ),
            taken,
            "state {state} idle {idle} s"
        );
    }
    assert_eq!(fx.stat(STAT_HALF_OPEN_TIMEOUT), 2);
}

/// A UDP flow whose traffic went both ways more than once (open: the client sent again after
/// a reply) is a stream and lives 120 s (Linux's udp_timeout_stream).
#[test]
fn a_udp_stream_holds_its_port_120_s() {
    let fx = fixture("fx-udp120");
    assert!(
        !takes_held_port(
            &fx,
            UDP_SERVICE,
            5200,
            CT_STATE_OPEN,
            119 * SECOND,
            OPEN_MAPS
        ),
        "held at 119 s"
    );
    assert!(
        takes_held_port(
            &fx,
            UDP_SERVICE,
            5201,
            CT_STATE_OPEN,
            121 * SECOND,
            OPEN_MAPS
        ),
        "free at 121 s"
    );
}

/// Both sides closed, client first, and the client's last ACK went through: the port serves
/// the next new flow at once, while a flow still waiting for that ACK keeps it.
#[test]
fn a_closed_flow_gives_its_port_up_once_the_last_ack_went_by() {
    let fx = fixture("fx-lastack");
    let port = open_flow(&fx, 41900);
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41900), sa(VIP, 80), FIN | ACK, &[]),
    );
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(
            sa(BACKEND, 8080),
            sa(LB_BACKEND_IP.octets(), port),
            FIN | ACK,
            &[],
        ),
    );
    let states = |fx: &Fixture| {
        let fwd = fx.ct_map(CT_FWD_MAP).get(&forward_key(41900), 0);
        let rev = fx.ct_map(CT_REV_MAP).get(&reverse_key(port), 0);
        (fwd.map(|e| e.state).ok(), rev.map(|e| e.state).ok())
    };
    // The client retransmitting its FIN is not its last ACK.
    fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41900), sa(VIP, 80), FIN | ACK, &[]),
    );
    assert_eq!(states(&fx), (Some(CT_STATE_CLOSED), Some(CT_STATE_CLOSED)));
    let (verdict, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(sa(CLIENT, 41900), sa(VIP, 80), ACK, &[]),
    );
    assert_eq!(verdict, XDP_REDIRECT, "the last ACK is translated");
    assert_eq!(
        pkt::endpoints(&out),
        (sa(LB_BACKEND_IP.octets(), port), sa(BACKEND, 8080))
    );
    assert_eq!(
        states(&fx),
        (Some(CT_STATE_CLOSED_ACKED), Some(CT_STATE_CLOSED_ACKED))
    );
    // A retransmitted FIN of the backend still reaches the client until the port is reused.
    let (verdict, out) = fx.run(
        PROGRAM_GENERIC,
        &pkt::tcp(
            sa(BACKEND, 8080),
            sa(LB_BACKEND_IP.octets(), port),
            FIN | ACK,
            &[],
        ),
    );
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(pkt::endpoints(&out), (sa(VIP, 80), sa(CLIENT, 41900)));
    // Fresh flows in each closing state: only the acknowledged one gives its port up.
    assert!(takes_held_port(
        &fx,
        TCP_SERVICE,
        41901,
        CT_STATE_CLOSED_ACKED,
        0,
        OPEN_MAPS
    ));
    assert_eq!(fx.stat(STAT_CLOSED_REUSED), 1);
    for (client_port, state) in [
        (41902, CT_STATE_CLOSED),
        (41903, CT_STATE_CLOSING),
        (41904, CT_STATE_TIME_WAIT),
    ] {
        assert!(
            !takes_held_port(&fx, TCP_SERVICE, client_port, state, 0, OPEN_MAPS),
            "state {state} keeps its port"
        );
    }
    assert_eq!(fx.stat(STAT_CLOSED_REUSED), 1);
}

/// Two CPUs whose new flows both want one SNAT port held by a half-open flow idle for 2 s:
/// exactly one takes it over and the other probes on, so the half-open map never holds two
/// flows on that port, or an entry whose peer does not point back.
#[test]
fn two_cpus_taking_over_one_stale_port_never_share_it() {
    let fx = fixture("fx-takeover");
    let (syns, contested) = two_syns_wanting_one_port();
    contest(&fx, &syns, 0, |fx| {
        let stale = xlb::inspect::monotonic_ns() - 2 * CT_HALF_OPEN_RECLAIM_NS;
        hold_half_open_from(fx, contested, 50000, stale);
    });
    assert_eq!(
        fx.stat(STAT_EARLY_DROP),
        CONTESTS as u64,
        "one takeover a trial"
    );
}

/// The same under pressure: the contested port's flow is idle 300 ms, and the next candidates
/// of both new flows are held by fresh half-open flows, so each reaches the early drop with the
/// same port; exactly one gets it, the other is refused.
#[test]
fn two_cpus_dropping_one_half_open_flow_early_never_share_its_port() {
    let fx = fixture("fx-earlydrop");
    let (syns, contested) = two_syns_wanting_one_port();
    let fresh: Vec<u16> = syns
        .iter()
        .flat_map(|syn| {
            let (client, _) = pkt::endpoints(syn);
            let hash = flow_hash(CLIENT, VIP, client.port(), 80, IPPROTO_TCP);
            (1..SNAT_PROBES_BEFORE_EARLY_DROP + 1)
                .map(move |attempt| snat_port(SNAT_PORTS_DEFAULT, hash, attempt))
        })
        .collect();
    contest(&fx, &syns, 0, |fx| {
        let now = xlb::inspect::monotonic_ns();
        hold_half_open_from(fx, contested, 50000, now - 300_000_000);
        // Stamped ahead (a later stamp counts as just seen), so these stay too fresh to drop
        // however long a loaded machine stalls the trial: stamped `now`, one trial in 3,000 of a
        // full test run found them idle past the 100 ms an early drop needs, and the loser
        // dropped one of them instead of being refused.
        for (i, &port) in fresh.iter().enumerate() {
            hold_half_open_from(fx, port, 50001 + i as u16, now + 10_000_000_000);
        }
    });
    assert_eq!(
        fx.stat(STAT_EARLY_DROP),
        CONTESTS as u64,
        "one early drop a trial"
    );
    assert_eq!(
        fx.stat(STAT_SNAT_EXHAUSTED),
        CONTESTS as u64,
        "the other refused"
    );
}

/// On one CPU the client's ACK that completes a half-open flow's handshake, on the other a new
/// flow whose first SNAT candidate is that flow's port, idle 2 s (so any prober may take it):
/// either the flow opens and the new flow probes on, or the new flow takes the port over and
/// the ACK finds no flow, never both. The ACK starts from 0 to 3 µs after the SYN over the
/// trials, so each wins some of them and they meet in between.
#[test]
fn a_completing_handshake_and_a_takeover_of_its_port_never_share_it() {
    let fx = fixture("fx-promote");
    let ([syn, _], contested) = two_syns_wanting_one_port();
    let ack = pkt::tcp(sa([192, 0, 2, 9], 50000), sa(VIP, 80), ACK, &[]);
    contest(&fx, &[ack, syn], 3_000, |fx| {
        let stale = xlb::inspect::monotonic_ns() - 2 * CT_HALF_OPEN_RECLAIM_NS;
        hold_half_open_in(fx, contested, 50000, stale, CT_STATE_HALF_OPEN_REPLIED);
    });
    let (opened, taken) = (fx.stat(STAT_FLOW_OPENED), fx.stat(STAT_EARLY_DROP));
    assert_eq!(
        opened + taken,
        CONTESTS as u64,
        "one winner a trial: {opened} opened, {taken} taken over"
    );
    assert!(
        opened > 0 && taken > 0,
        "each side won some trials: {opened} opened, {taken} taken over"
    );
}

/// Trials of [`contest`].
const CONTESTS: u32 = 3000;

/// Two SYNs from `CLIENT` whose first SNAT candidate is the same port, and that port.
fn two_syns_wanting_one_port() -> ([Vec<u8>; 2], u16) {
    let first = |client_port: u16| {
        let hash = flow_hash(CLIENT, VIP, client_port, 80, IPPROTO_TCP);
        snat_port(SNAT_PORTS_DEFAULT, hash, 0)
    };
    let a = 41000;
    let contested = first(a);
    let b = (a + 1..u16::MAX)
        .find(|&port| first(port) == contested)
        .expect("a second client port with the same first candidate");
    let syns = [a, b].map(|port| pkt::tcp(sa(CLIENT, port), sa(VIP, 80), SYN, &[]));
    (syns, contested)
}

/// Runs the two `packets` on two CPUs, [`CONTESTS`] times, each time from the conntrack maps
/// emptied and then filled by `setup`; panics at the first trial that leaves an entry whose
/// peer does not point back or a port held twice ([`flows_whole`]). The first packet starts
/// after the second by a delay that steps through 0 to `stagger_ns` in 50 ns steps over the
/// trials (0: at the same moment).
fn contest(fx: &Fixture, packets: &[Vec<u8>; 2], stagger_ns: u64, setup: impl Fn(&Fixture)) {
    use aya::programs::TestRun as _;
    use std::sync::atomic::{AtomicU32, Ordering};
    assert!(
        std::thread::available_parallelism().map_or(0, |n| n.get()) >= 2,
        "this test needs two CPUs"
    );
    const STOP: u32 = u32::MAX;
    // The trial both CPUs run now; each counts itself done.
    let go = AtomicU32::new(0);
    let done = AtomicU32::new(0);
    let program = fx.dp.program(PROGRAM_GENERIC).expect("program");
    let mut failure = None;
    std::thread::scope(|scope| {
        for (cpu, packet) in packets.iter().enumerate() {
            let (go, done, joiner) = (&go, &done, fx.ns.joiner());
            scope.spawn(move || {
                joiner();
                pin_to_cpu(cpu);
                let mut out = vec![0u8; 2048];
                let mut last = 0;
                loop {
                    let trial = go.load(Ordering::Acquire);
                    if trial == STOP {
                        break;
                    }
                    if trial == last {
                        std::hint::spin_loop();
                        continue;
                    }
                    last = trial;
                    if cpu == 0 {
                        let delay = trial as u64 * 50 % (stagger_ns + 50);
                        let start = std::time::Instant::now();
                        while start.elapsed().as_nanos() < delay as u128 {
                            std::hint::spin_loop();
                        }
                    }
                    program
                        .test_run(aya::programs::TestRunOptions {
                            data_in: Some(packet),
                            data_out: Some(&mut out),
                            repeat: 1,
                            ..Default::default()
                        })
                        .expect("test run");
                    done.fetch_add(1, Ordering::AcqRel);
                }
            });
        }
        for trial in 1..=CONTESTS {
            clear_conntrack(fx);
            setup(fx);
            go.store(trial, Ordering::Release);
            while done.load(Ordering::Acquire) != 2 * trial {
                std::thread::yield_now();
            }
            if let Err(broken) = flows_whole(fx) {
                failure = Some(format!("trial {trial}: {broken}"));
                break;
            }
        }
        go.store(STOP, Ordering::Release);
    });
    if let Some(failure) = failure {
        panic!("two packets contesting one port: {failure}");
    }
}

/// Binds the calling thread to CPU `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes into it; sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "binding to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// Deletes every conntrack entry, half-open and open.
fn clear_conntrack(fx: &Fixture) {
    for name in [CT_HALF_MAP, CT_FWD_MAP, CT_REV_MAP] {
        let mut map = fx.ct_map(name);
        let keys: Vec<FlowKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
    }
}

/// Whether every conntrack entry has its peer pointing back, in the half-open map or (open) in
/// the other open map, and no SNAT port is held by a half-open and an open flow at once; else
/// which is not so.
fn flows_whole(fx: &Fixture) -> Result<(), String> {
    let half = fx.ct_map(CT_HALF_MAP);
    for (name, peer_name) in [
        (CT_HALF_MAP, CT_HALF_MAP),
        (CT_FWD_MAP, CT_REV_MAP),
        (CT_REV_MAP, CT_FWD_MAP),
    ] {
        let (map, peers) = (fx.ct_map(name), fx.ct_map(peer_name));
        for item in map.iter() {
            let (key, entry) = item.expect("entry");
            match peers.get(&entry.peer_key(key.proto), 0) {
                Ok(peer) if CtEntry::is_peer_of(&key, &peer) => {}
                Ok(peer) => {
                    return Err(format!(
                        "{name} {key:?} ({entry:?}): its peer {peer:?} points elsewhere"
                    ));
                }
                Err(e) => return Err(format!("{name} {key:?} ({entry:?}) has no peer: {e}")),
            }
            if name == CT_REV_MAP && half.get(&key, 0).is_ok() {
                return Err(format!("port {key:?} held by an open and a half-open flow"));
            }
        }
    }
    Ok(())
}
