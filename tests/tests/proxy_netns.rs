//! The userspace proxy data plane through network namespaces with real sockets:
//! client ns — lb ns — 3 backend ns (each backend behind its own veth `lb1..lb3`).
//!
//! The proxy runs on a tokio runtime built on a thread inside the lb namespace, so its worker
//! threads (which open the upstream sockets) live there; `apply` is called inside it too, so
//! the listeners do. The XDP tests open [`XdpDataplane`] in the same namespace and process,
//! on a private pin directory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::time::{Duration, Instant};

use lb_common::{
    CT_DIR_REVERSE, CT_FWD_MAP, CT_REV_MAP, CtEntry, FlowKey, IPPROTO_TCP, SNAT_PORTS_DEFAULT,
    SNAT_PROBES, STAT_CT_MISS_NON_SYN, STAT_NEW_FLOW, STAT_SNAT_EXHAUSTED, flow_hash, snat_port,
};
use xlb::config::XdpMode;
use xlb::dataplane::Dataplane as _;
use xlb::dataplane::proxy::{ProxyDataplane, ProxyStats, Timeouts};
use xlb::dataplane::xdp::{XdpConfig, XdpDataplane};
use xlb::model::{Backend as Upstream, Frontend, Protocol, VirtualService};
use xlb_tests::bpf::PinDir;
use xlb_tests::netns::{Netns, require_root};
use xlb_tests::servers::{Backend, LongLived, tcp_name, tcp_name_from};
use xlb_tests::topology::{self, BACKEND_PORT, PORT, VIP, tcp_spread, udp_spread, vip};

/// The shared separate-devices topology with a backend server in each backend namespace and
/// a tokio runtime whose threads live in the lb namespace; removed on drop.
struct Topology {
    net: topology::Topology,
    _servers: Vec<Backend>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Deref for Topology {
    type Target = topology::Topology;

    fn deref(&self) -> &topology::Topology {
        &self.net
    }
}

impl Topology {
    fn new(tag: &str) -> Topology {
        require_root("the proxy namespace tests");
        let net = topology::Topology::separate(tag);
        let servers = net.start_backends();
        let runtime = net.lb.enter(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("build a tokio runtime in the lb namespace")
        });
        Topology {
            net,
            _servers: servers,
            runtime: Some(runtime),
        }
    }

    /// A proxy spawning on the lb namespace's runtime.
    fn proxy(&self) -> ProxyDataplane {
        let runtime = self.runtime.as_ref().expect("runtime runs until drop");
        ProxyDataplane::with_handle(runtime.handle().clone())
    }

    /// Backend `i` (0-based) on the backend port.
    fn backend(&self, i: usize) -> Upstream {
        Upstream {
            ip: self.backends[i].1,
            port: BACKEND_PORT,
        }
    }

    /// `VIP:80` for `protocol` over the backends `which` (indices into `backends`).
    fn service(&self, protocol: Protocol, which: &[usize]) -> VirtualService {
        VirtualService {
            frontend: frontend(protocol),
            backends: which.iter().map(|&i| self.backend(i)).collect(),
            owner: "default/web".to_owned(),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

fn frontend(protocol: Protocol) -> Frontend {
    Frontend {
        vip: VIP,
        port: PORT,
        protocol,
    }
}

/// Applies `services` to the proxy from inside the lb namespace, so listeners are bound there.
fn apply_proxy(lb: &Netns, proxy: &mut ProxyDataplane, services: &[VirtualService]) {
    lb.enter(|| proxy.apply(services))
        .unwrap_or_else(|error| panic!("proxy apply: {error}"));
}

fn stats(proxy: &ProxyDataplane, protocol: Protocol) -> ProxyStats {
    proxy
        .stats()
        .get(&frontend(protocol))
        .copied()
        .unwrap_or_else(|| panic!("the proxy has no {protocol} frontend"))
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Pings `connection` `n` times, panicking with `what` on failure.
fn ping(client: &Netns, connection: &mut LongLived, n: u32, what: &str) {
    client.enter(|| {
        for i in 0..n {
            connection
                .ping(i)
                .unwrap_or_else(|e| panic!("{what}: ping {i}: {e}"));
        }
    });
}

#[test]
fn proxy_spreads_tcp_and_udp_round_robin_over_all_backends() {
    let topology = Topology::new("pxrr");
    let mut proxy = topology.proxy();
    apply_proxy(
        &topology.lb,
        &mut proxy,
        &[
            topology.service(Protocol::Tcp, &[0, 1, 2]),
            topology.service(Protocol::Udp, &[0, 1, 2]),
        ],
    );
    assert_eq!(
        tcp_spread(&topology.client, 30),
        counts(&[("b1", 10), ("b2", 10), ("b3", 10)]),
        "30 TCP connections through the proxy must go 10/10/10"
    );
    assert_eq!(
        udp_spread(&topology.client, 30),
        counts(&[("b1", 10), ("b2", 10), ("b3", 10)]),
        "30 UDP flows through the proxy must go 10/10/10"
    );
    // Counters are updated as the relaying tasks finish; give them a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats(&proxy, Protocol::Tcp).active > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let tcp = stats(&proxy, Protocol::Tcp);
    assert_eq!(tcp.connections, 30, "{tcp:?}");
    assert_eq!(tcp.active, 0, "every connection has ended: {tcp:?}");
    assert_eq!((tcp.backend_failures, tcp.dropped), (0, 0), "{tcp:?}");
    assert_eq!(
        tcp.bytes_to_clients,
        30 * 3,
        "each backend sent its name line (3 bytes): {tcp:?}"
    );
    let udp = stats(&proxy, Protocol::Udp);
    assert_eq!(udp.connections, 30, "{udp:?}");
    assert_eq!(udp.bytes_to_backends, 30 * 3, "30 × `who`: {udp:?}");
    assert_eq!(udp.bytes_to_clients, 30 * 2, "30 × `bN`: {udp:?}");
}

#[test]
fn removed_frontend_refuses_new_connections_while_established_ones_keep_working() {
    let topology = Topology::new("pxrm");
    let mut proxy = topology.proxy();
    let services = [topology.service(Protocol::Tcp, &[0, 1, 2])];
    apply_proxy(&topology.lb, &mut proxy, &services);
    let mut established = topology
        .client
        .enter(|| LongLived::connect(vip()))
        .unwrap_or_else(|e| panic!("connecting through the proxy: {e}"));
    ping(&topology.client, &mut established, 3, "before removal");

    apply_proxy(&topology.lb, &mut proxy, &[]);
    assert_eq!(proxy.frontends().count(), 0);
    let refused = topology.client.enter(|| tcp_name(vip()));
    match refused {
        Err(error) => assert!(
            error.contains("refused"),
            "a removed frontend must refuse at once, got {error}"
        ),
        Ok(name) => panic!("a removed frontend accepted a new connection (answered by {name})"),
    }
    ping(
        &topology.client,
        &mut established,
        20,
        "an established connection after its frontend was removed",
    );

    // Adding it back binds again while the drained connection still holds the port.
    apply_proxy(&topology.lb, &mut proxy, &services);
    let name = topology
        .client
        .enter(|| tcp_name(vip()))
        .unwrap_or_else(|e| panic!("a re-added frontend must accept: {e}"));
    assert!(name.starts_with('b'), "unexpected answer {name:?}");
    ping(&topology.client, &mut established, 3, "after re-adding");
}

#[test]
fn changed_backends_apply_to_new_connections_only_and_dead_backends_are_skipped() {
    let topology = Topology::new("pxch");
    let mut proxy = topology.proxy();
    apply_proxy(
        &topology.lb,
        &mut proxy,
        &[topology.service(Protocol::Tcp, &[0])],
    );
    let mut established = topology
        .client
        .enter(|| LongLived::connect(vip()))
        .unwrap_or_else(|e| panic!("connecting through the proxy: {e}"));
    assert_eq!(established.backend, "b1");

    // b1 removed; a backend where nothing listens (b1's address, port 9) comes first.
    let dead = Upstream {
        ip: topology.backends[0].1,
        port: 9,
    };
    let mut service = topology.service(Protocol::Tcp, &[1, 2]);
    service.backends.insert(0, dead);
    apply_proxy(&topology.lb, &mut proxy, &[service]);
    // Round robin starts at dead, b2, b3 in turn; a connection starting at dead goes on to b2.
    assert_eq!(
        tcp_spread(&topology.client, 9),
        counts(&[("b2", 6), ("b3", 3)]),
        "new connections must go only to the new backends, skipping the dead one"
    );
    let tcp = stats(&proxy, Protocol::Tcp);
    assert_eq!(
        tcp.backend_failures, 3,
        "three connects to the dead backend: {tcp:?}"
    );
    assert_eq!(tcp.dropped, 0, "{tcp:?}");
    ping(
        &topology.client,
        &mut established,
        10,
        "the connection to the removed backend b1",
    );
    assert_eq!(established.backend, "b1");
}

#[test]
fn proxy_listens_before_the_vip_is_on_the_device() {
    let topology = Topology::new("pxfb");
    topology
        .lb
        .run(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "l0"]);
    let mut proxy = topology.proxy();
    // IP_FREEBIND: binding VIP:80 works although no device has the VIP yet.
    apply_proxy(
        &topology.lb,
        &mut proxy,
        &[
            topology.service(Protocol::Tcp, &[0, 1, 2]),
            topology.service(Protocol::Udp, &[0, 1, 2]),
        ],
    );
    topology
        .lb
        .run(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "l0"]);
    assert_eq!(
        tcp_spread(&topology.client, 3).len(),
        3,
        "TCP through a listener bound before the VIP existed"
    );
    assert_eq!(
        udp_spread(&topology.client, 3).len(),
        3,
        "UDP through a socket bound before the VIP existed"
    );
}

#[test]
fn a_backend_that_does_not_answer_is_skipped_after_the_connect_timeout() {
    let topology = Topology::new("pxto");
    // 203.0.113.130 is on a veth pair whose other end has no address: ARP for it goes
    // unanswered, so SYNs to it get no answer (the neighbour fails only after ~3 s).
    topology.lb.run(&[
        "ip", "link", "add", "void0", "type", "veth", "peer", "name", "void1",
    ]);
    topology
        .lb
        .run(&["ip", "addr", "add", "203.0.113.129/25", "dev", "void0"]);
    topology.lb.run(&["ip", "link", "set", "void0", "up"]);
    topology.lb.run(&["ip", "link", "set", "void1", "up"]);
    let void = Upstream {
        ip: Ipv4Addr::new(203, 0, 113, 130),
        port: BACKEND_PORT,
    };
    let connect = Duration::from_millis(500);
    let mut proxy = topology.proxy().with_timeouts(Timeouts {
        connect,
        ..Timeouts::default()
    });
    let mut service = topology.service(Protocol::Tcp, &[0]);
    service.backends.insert(0, void);
    apply_proxy(&topology.lb, &mut proxy, &[service]);
    // Round robin starts at void, b1, void, b1: every connection is answered by b1, and
    // those that started at void only after the connect timeout.
    let timings: Vec<(String, Duration)> = topology.client.enter(|| {
        (0..4)
            .map(|i| {
                let started = Instant::now();
                let name = tcp_name(vip())
                    .unwrap_or_else(|e| panic!("connection {i} with a silent backend: {e}"));
                (name, started.elapsed())
            })
            .collect()
    });
    for (i, (name, took)) in timings.iter().enumerate() {
        assert_eq!(name, "b1", "connection {i}");
        if i % 2 == 0 {
            assert!(
                *took >= connect,
                "connection {i} tried the silent backend first, yet took only {took:?}"
            );
        }
    }
    let tcp = stats(&proxy, Protocol::Tcp);
    assert_eq!(
        (tcp.backend_failures, tcp.dropped),
        (2, 0),
        "two connects timed out, no connection was lost: {tcp:?}"
    );
}

#[test]
fn proxied_connection_survives_xdp_attach_and_new_connections_take_xdp() {
    let topology = Topology::new("pxxdp");
    let mut proxy = topology.proxy();
    let services = [topology.service(Protocol::Tcp, &[0, 1, 2])];
    apply_proxy(&topology.lb, &mut proxy, &services);
    let mut established = topology
        .client
        .enter(|| LongLived::connect(vip()))
        .unwrap_or_else(|e| panic!("connecting through the proxy before XDP: {e}"));
    ping(&topology.client, &mut established, 3, "before XDP");

    let pins = PinDir::new();
    let xdp = open_xdp(&topology.lb, &pins, &services);
    let before = xdp.stats().expect("XDP stats");

    // The proxied connection's segments miss conntrack and are not SYNs: XDP passes them to
    // the kernel, where the proxy's socket owns the connection.
    ping(
        &topology.client,
        &mut established,
        20,
        "a connection proxied before XDP was attached",
    );
    topology.client.enter(|| {
        established
            .bulk()
            .unwrap_or_else(|e| panic!("1 MiB over the proxied connection after attach: {e}"));
    });
    let after_pings = xdp.stats().expect("XDP stats");
    assert!(
        delta(&before, &after_pings, STAT_CT_MISS_NON_SYN) > 0,
        "the proxied connection's segments must reach XDP as non-SYN misses"
    );
    assert_eq!(
        delta(&before, &after_pings, STAT_NEW_FLOW),
        0,
        "segments of an established connection must not make XDP flows"
    );

    let proxied = stats(&proxy, Protocol::Tcp).connections;
    let spread = tcp_spread(&topology.client, 9);
    assert_eq!(
        spread.values().sum::<usize>(),
        9,
        "9 new connections answered: {spread:?}"
    );
    let after = xdp.stats().expect("XDP stats");
    assert_eq!(
        delta(&after_pings, &after, STAT_NEW_FLOW),
        9,
        "each new connection after attach must be an XDP flow"
    );
    assert_eq!(
        stats(&proxy, Protocol::Tcp).connections,
        proxied,
        "no new connection may reach the proxy while XDP takes them"
    );
    ping(&topology.client, &mut established, 3, "at the end");
    drop(xdp);
    drop(pins);
}

/// The XDP data plane (generic mode, on `l0` and the devices toward the backends) in `lb`,
/// pinned in `pins`, carrying `services`.
fn open_xdp(lb: &Netns, pins: &PinDir, services: &[VirtualService]) -> XdpDataplane {
    let xdp = lb.enter(|| {
        let mut xdp = XdpDataplane::open(XdpConfig {
            pin_dir: pins.path().to_owned(),
            mode: XdpMode::Skb,
            set_sysctls: true,
            ..XdpConfig::new("l0")
        })
        .unwrap_or_else(|e| panic!("opening the XDP data plane: {e}"));
        xdp.apply(services)
            .unwrap_or_else(|e| panic!("XDP apply: {e}"));
        xdp
    });
    assert!(
        xdp.devices().contains_key("l0"),
        "XDP must be attached to l0: {:?}",
        xdp.devices()
    );
    xdp
}

/// How much counter `index` grew from `before` to `after`.
fn delta(before: &[u64], after: &[u64], index: u32) -> u64 {
    after[index as usize] - before[index as usize]
}

/// A SYN XDP cannot take (every SNAT port its flow could get is held) is passed to the kernel,
/// and the proxy listening on the same `VIP:port` carries the connection.
#[test]
fn a_new_flow_xdp_cannot_take_lands_on_the_proxy() {
    const CLIENT_PORT: u16 = 45321;
    let topology = Topology::new("pxsnat");
    let mut proxy = topology.proxy();
    let services = [topology.service(Protocol::Tcp, &[0, 1, 2])];
    apply_proxy(&topology.lb, &mut proxy, &services);
    let pins = PinDir::new();
    let xdp = open_xdp(&topology.lb, &pins, &services);

    // Hold every candidate port of the flow from CLIENT_PORT toward every backend, with live
    // open flows (both entries: an entry without its peer would be taken over) as if other
    // clients had them.
    let hash = flow_hash([192, 0, 2, 1], VIP.octets(), CLIENT_PORT, PORT, IPPROTO_TCP);
    let mut reverse = pins.ct_map(CT_REV_MAP);
    let mut forward = pins.ct_map(CT_FWD_MAP);
    let mut other_port = 50_000u16;
    for (_, backend) in &topology.backends {
        // The LB's end of the backend's /30: the source address of flows toward it.
        let snat = Ipv4Addr::from(u32::from(*backend) - 1);
        for attempt in 0..SNAT_PROBES {
            let key = FlowKey {
                src_ip: backend.octets(),
                dst_ip: snat.octets(),
                src_port: BACKEND_PORT,
                dst_port: snat_port(SNAT_PORTS_DEFAULT, hash, attempt),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            other_port += 1;
            let now = xlb::inspect::monotonic_ns();
            let held = CtEntry {
                nat_src_ip: VIP.octets(),
                nat_dst_ip: [192, 0, 2, 99],
                nat_src_port: PORT,
                nat_dst_port: other_port,
                last_seen_ns: now,
                dir: CT_DIR_REVERSE,
                ..CtEntry::default()
            };
            let peer = CtEntry {
                nat_src_ip: snat.octets(),
                nat_dst_ip: backend.octets(),
                nat_src_port: key.dst_port,
                nat_dst_port: BACKEND_PORT,
                last_seen_ns: now,
                ..CtEntry::default()
            };
            let peer_key = held.peer_key(IPPROTO_TCP);
            reverse
                .insert(key, held.with_sums(&key), 0)
                .expect("hold a SNAT port");
            forward
                .insert(peer_key, peer.with_sums(&peer_key), 0)
                .expect("hold a SNAT port (forward entry)");
        }
    }

    let before = xdp.stats().expect("XDP stats");
    let proxied = stats(&proxy, Protocol::Tcp).connections;
    let name = topology
        .client
        .enter(|| tcp_name_from(CLIENT_PORT, vip()))
        .unwrap_or_else(|e| panic!("a connection XDP could not take: {e}"));
    assert!(name.starts_with('b'), "a backend answered: {name:?}");
    let after = xdp.stats().expect("XDP stats");
    assert_eq!(
        (
            delta(&before, &after, STAT_SNAT_EXHAUSTED),
            delta(&before, &after, STAT_NEW_FLOW)
        ),
        (1, 0),
        "XDP found no SNAT port and made no flow"
    );
    assert_eq!(
        stats(&proxy, Protocol::Tcp).connections,
        proxied + 1,
        "the proxy carried the connection"
    );
}
