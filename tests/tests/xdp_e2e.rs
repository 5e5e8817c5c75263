//! End to end through network namespaces with real sockets: client ns — lb ns — 3 backend ns.
//! The data plane runs as a separate process (`xlb_loader`, the library code the controller
//! uses) entered into the lb namespace with `nsenter --net` (which keeps the host's bpffs
//! mount, unlike `ip netns exec`).
//!
//! Topologies (`xlb_tests::topology`): separate devices, and same device (one bridge).
//!
//! Generic XDP transmits with XDP_TX/redirect; TC redirects every translated skb, GSO
//! packets included; native XDP on veth passes translated packets to the kernel, which
//! forwards them (see `xlb::dataplane::xdp`), unless a test lists the veths in the xmit devmap
//! as xlb lists a NIC, and runs XDP on their far ends.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::time::Duration;

use xlb_tests::bpf::{PinDir, attach_native_noop};
use xlb_tests::servers::{Backend, LongLived};
use xlb_tests::topology::{Loader, Topology, VIP, tcp_spread, tempdir, udp_spread, vip};

/// The test loader binary.
fn loader_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_xlb_loader"))
}

fn assert_even(counts: &BTreeMap<String, usize>, n: usize, backends: usize) {
    assert_eq!(
        counts.len(),
        backends,
        "every backend must get flows: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), n);
    let per = n / backends;
    for (name, count) in counts {
        assert!(
            count.abs_diff(per) <= 1,
            "{name} got {count} of {n} flows, expected {per}±1: {counts:?}"
        );
    }
}

fn stats(pins: &PinDir) -> String {
    let mut text = Vec::new();
    xlb::inspect::print(pins.path(), xlb::inspect::Table::Stats, &mut text).expect("inspect stats");
    String::from_utf8_lossy(&text).into_owned()
}

/// The destination MAC of each next hop in `XLB_NEXT_HOPS`, by backend.
fn next_hop_macs(pins: &PinDir) -> BTreeMap<Ipv4Addr, [u8; 6]> {
    pins.hash_map::<[u8; 4], lb_common::NextHop>(lb_common::NEXT_HOPS_MAP)
        .iter()
        .map(|entry| {
            let (ip, hop) = entry.expect("next hop entry");
            (Ipv4Addr::from(ip), hop.dmac)
        })
        .collect()
}

/// Waits (10 s at most: an ARP answer takes milliseconds, a loaded machine longer) for
/// `XLB_NEXT_HOPS` to hold `n` next hops.
fn wait_for_next_hops(pins: &PinDir, n: usize) {
    assert!(
        xlb_tests::wait::eventually(Duration::from_secs(10), || next_hop_macs(pins).len() == n),
        "next hops toward the {n} backends before any traffic: {:?}",
        next_hop_macs(pins)
    );
}

/// An LB started on `topology`: its backends serving, the pin dir, the services file (the
/// three backends' services; tests that drain one rewrite it) and the loader on `l0` in `mode`.
struct Lb {
    backends: Vec<Backend>,
    pins: PinDir,
    file: PathBuf,
    loader: Loader,
}

fn start_lb(topology: &Topology, mode: &str) -> Lb {
    let backends = topology.start_backends();
    let pins = PinDir::new();
    let file = tempdir().join("services");
    std::fs::write(&file, topology.services(&[0, 1, 2])).expect("services file");
    let loader = Loader::start(loader_exe(), &topology.lb, &pins, "l0", mode, &file);
    Lb {
        backends,
        pins,
        file,
        loader,
    }
}

fn even_spread(topology: Topology, mode: &str, tcp: usize, udp: usize) {
    let Lb {
        backends,
        pins,
        loader,
        ..
    } = start_lb(&topology, mode);
    // Before any traffic: the loader's next-hop thread has the kernel resolve every backend's
    // neighbour and writes a next hop toward each, so not even the first flows ask the FIB.
    wait_for_next_hops(&pins, 3);
    assert_even(&tcp_spread(&topology.client, tcp), tcp, 3);
    assert_even(&udp_spread(&topology.client, udp), udp, 3);
    let text = stats(&pins);
    eprintln!("{text}");
    assert!(pins.counter("new_flow") >= (tcp + udp) as u64);
    assert_eq!(pins.counter("aborted"), 0);
    if mode != "native" {
        assert!(
            pins.counter("tx") + pins.counter("redirect") > 0,
            "{mode} mode must transmit translated packets itself"
        );
    }
    assert_eq!(
        pins.counter("next_hop_miss"),
        0,
        "new flows asked the FIB although every backend had a next hop"
    );
    loader.kill();
    drop(backends);
}

#[test]
fn separate_devices_generic_spreads_300_tcp_connections_evenly() {
    even_spread(Topology::separate("sg"), "generic", 300, 30);
}

#[test]
fn separate_devices_native_spreads_300_tcp_connections_evenly() {
    even_spread(Topology::separate("sn"), "native", 300, 30);
}

#[test]
fn separate_devices_tc_spreads_300_tcp_connections_evenly() {
    even_spread(Topology::separate("st"), "tc", 300, 30);
}

#[test]
fn same_device_tc_spreads_connections_evenly() {
    even_spread(Topology::same_device("dt"), "tc", 300, 30);
}

#[test]
fn same_device_generic_spreads_connections_evenly() {
    even_spread(Topology::same_device("dg"), "generic", 300, 30);
}

#[test]
fn same_device_native_spreads_connections_evenly() {
    even_spread(Topology::same_device("dn"), "native", 300, 30);
}

/// A backend whose MAC changes without a gratuitous ARP (a replaced NIC, say): the LB's
/// neighbour entry, and the next hop with it, keep the old MAC. The kernel confirms a stale
/// entry before it sends there itself, but packets the program forwards never reach it, so
/// xlb's next-hop thread asks it to: the probe to the old MAC goes unanswered, the entry fails
/// and is resolved afresh, and flows reach the backend again.
#[test]
fn a_backend_whose_mac_changed_is_reached_at_its_new_one() {
    let topology = Topology::separate("mc");
    let Lb {
        backends,
        pins,
        loader,
        ..
    } = start_lb(&topology, "generic");
    // A stale entry is probed 1 s after the kernel is asked to confirm it, not 5 s.
    topology.lb.run(&[
        "sysctl",
        "-qw",
        "net.ipv4.neigh.lb1.delay_first_probe_time=1",
    ]);
    wait_for_next_hops(&pins, 3);
    assert_even(&tcp_spread(&topology.client, 30), 30, 3);
    let (backend, ip) = &topology.backends[0];
    let old_mac = next_hop_macs(&pins)[ip];
    let new_mac = [0x02, 0, 0, 0, 0x5e, 0x01];
    backend.run(&["ip", "link", "set", "b0", "address", "02:00:00:00:5e:01"]);
    // The LB's entry goes stale, as it does once the reachable time (about 30 s) passes with no
    // confirmation from traffic the kernel sees.
    topology.lb.run(&[
        "ip",
        "neigh",
        "change",
        &ip.to_string(),
        "dev",
        "lb1",
        "nud",
        "stale",
    ]);
    assert!(
        xlb_tests::wait::eventually(Duration::from_secs(20), || {
            next_hop_macs(&pins).get(ip) == Some(&new_mac)
        }),
        "the next hop toward {ip} is {:?}, not the backend's new MAC {new_mac:?} (old {old_mac:?}); the LB's neighbours: {}",
        next_hop_macs(&pins).get(ip),
        topology.lb.run(&["ip", "neigh", "show", "dev", "lb1"])
    );
    assert_even(&tcp_spread(&topology.client, 30), 30, 3);
    loader.kill();
    drop(backends);
}

/// Native XDP into devices in the xmit devmap, as xlb lists a NIC whose driver takes XDP
/// frames: every translated packet leaves by redirect, none is passed to the kernel, and each
/// must carry the next hop's MACs, or the receiving end drops it. Veths stand in for NICs: the
/// test lists them itself (xlb never does, see `devices::native_xmit_ok`) and runs an XDP
/// program on their far ends, without which a veth drops the frames redirected into it.
#[test]
fn separate_devices_native_redirects_into_listed_devices() {
    const TCP: usize = 60;
    const UDP: usize = 30;
    let topology = Topology::separate("sx");
    let ends: Vec<_> = std::iter::once((&topology.client, "c0"))
        .chain(topology.backends.iter().map(|(ns, _)| (ns, "b0")))
        .collect();
    // Senders checksum in full, as frames off a wire are: a veth's checksum offload leaves
    // the sum to be finished by whoever takes the skb, which an XDP frame cannot carry, so its
    // receiver would find it wrong.
    for (ns, device) in &ends {
        ns.run(&["ethtool", "-K", device, "tx", "off"]);
    }
    let _receivers: Vec<_> = ends
        .iter()
        .map(|(ns, device)| attach_native_noop(ns, device))
        .collect();
    let Lb {
        backends,
        pins,
        loader,
        ..
    } = start_lb(&topology, "native");
    topology.lb.enter(|| {
        for device in ["l0", "lb1", "lb2", "lb3"] {
            let ifindex = xlb::dataplane::devices::ifindex(device).expect("ifindex");
            pins.list_xmit_device(ifindex);
        }
    });
    assert_even(&tcp_spread(&topology.client, TCP), TCP, 3);
    assert_even(&udp_spread(&topology.client, UDP), UDP, 3);
    let text = stats(&pins);
    eprintln!("{text}");
    assert_eq!(
        pins.counter("xmit_pass"),
        0,
        "native XDP passed translated packets to the kernel although every device is listed"
    );
    // Each connection: at least its SYN, SYN-ACK and ACK; each datagram and its answer.
    let least = (3 * TCP + 2 * UDP) as u64;
    assert!(
        pins.counter("redirect") >= least,
        "{} redirects, fewer than the {least} packets the connections needed",
        pins.counter("redirect")
    );
    assert_eq!(pins.counter("aborted"), 0);
    loader.kill();
    drop(backends);
}

/// A long-lived connection keeps working while its backend is removed (drain), while the
/// loader is SIGKILLed and while a new loader adopts the pinned data plane.
fn long_lived(mode: &str, tag: &str) {
    let topology = Topology::separate(tag);
    let Lb {
        backends,
        pins,
        file,
        mut loader,
    } = start_lb(&topology, mode);

    let (tx, rx) = channel::<&'static str>();
    let (done_tx, done_rx) = channel::<Result<String, String>>();
    let client = xlb_tests::servers::spawn_in(&topology.client, move || {
        let mut conn = LongLived::connect(vip())?;
        let backend = conn.backend.clone();
        let mut n = 0;
        // Ping until told to stop; each phase checks the connection still works.
        while let Ok(cmd) = rx.recv_timeout(Duration::from_secs(60)) {
            match cmd {
                "stop" => break,
                "bulk" => conn.bulk()?,
                _ => {
                    for _ in 0..5 {
                        n += 1;
                        conn.ping(n)
                            .map_err(|e| format!("ping {n} in phase {cmd}: {e}"))?;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            let _ = done_tx.send(Ok(cmd.to_owned()));
        }
        Ok::<String, String>(backend)
    });
    let step = |cmd: &'static str| {
        tx.send(cmd).expect("client alive");
        match done_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("long-lived connection stalled in phase {cmd}"),
        }
    };
    step("start");
    step("bulk");

    // Remove b1 (the long-lived connection's backend: first in round robin) and check new
    // connections avoid it while the old one drains.
    std::fs::write(&file, topology.services(&[1, 2])).expect("services file");
    loader.wait_for("applied");
    step("after-backend-removed");
    let counts = tcp_spread(&topology.client, 10);
    assert!(
        !counts.contains_key("b1"),
        "removed backend got new flows: {counts:?}"
    );

    // SIGKILL the loader: pinned program, links and maps keep forwarding.
    loader.kill();
    step("loader-killed");
    assert_eq!(tcp_spread(&topology.client, 4).values().sum::<usize>(), 4);

    // A new loader adopts the pinned data plane; b1 comes back.
    std::fs::write(&file, topology.services(&[0, 1, 2])).expect("services file");
    let loader = Loader::start(loader_exe(), &topology.lb, &pins, "l0", mode, &file);
    step("loader-restarted");
    step("bulk");
    assert_eq!(tcp_spread(&topology.client, 6).len(), 3);
    tx.send("stop").expect("client alive");
    let backend = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(backend, "b1");
    let text = stats(&pins);
    eprintln!("{text}");
    for (table, expect) in [
        (xlb::inspect::Table::Services, "198.51.100.10:80/TCP"),
        (xlb::inspect::Table::Backends, "203.0.113.6:8080"),
        (xlb::inspect::Table::Conntrack, "192.0.2.1:"),
        (xlb::inspect::Table::NextHops, "203.0.113.6 "),
    ] {
        let mut out = Vec::new();
        xlb::inspect::print(pins.path(), table, &mut out).expect("inspect");
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.contains(expect),
            "inspect {table:?} lacks {expect}: {out}"
        );
    }
    loader.kill();
    drop(backends);
}

#[test]
fn long_lived_connection_survives_drain_and_loader_sigkill_generic() {
    long_lived("generic", "lg");
}

#[test]
fn long_lived_connection_survives_drain_and_loader_sigkill_native() {
    long_lived("native", "ln");
}

#[test]
fn long_lived_connection_survives_drain_and_loader_sigkill_tc() {
    long_lived("tc", "lt");
}

/// At TC a GSO packet (a segmentation super-packet from the client's TCP stack, longer than
/// the MTU) is translated and redirected whole, not passed to the kernel: one iperf3 second
/// through the VIP averages more than a full Ethernet frame per packet, every translated
/// packet redirected, and the transfer arrives.
#[test]
fn tc_redirects_gso_packets_whole() {
    const IPERF_PORT: u16 = 5201;
    let topology = Topology::separate("tg");
    let backends = topology.start_backends();
    let (backend_ns, backend_ip) = &topology.backends[0];
    let _iperf = backend_ns.spawn(&[
        "iperf3",
        "-s",
        "-B",
        &backend_ip.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "--logfile",
        "/dev/null",
    ]);
    let pins = PinDir::new();
    let dir = tempdir();
    let file = dir.join("services");
    let services = format!(
        "{}{}:{IPERF_PORT}/tcp={backend_ip}:{IPERF_PORT}\n",
        topology.services(&[0, 1, 2]),
        vip().ip()
    );
    std::fs::write(&file, services).expect("services file");
    let loader = Loader::start(loader_exe(), &topology.lb, &pins, "l0", "tc", &file);
    // iperf3 retries until its server listens (it starts beside the loader).
    let received = (0..10)
        .find_map(|_| {
            let json =
                xlb_tests::measure::iperf3(&topology.client, SocketAddrV4::new(VIP, IPERF_PORT), 1);
            let bytes = json["end"]["sum_received"]["bytes"].as_f64();
            if bytes.is_none() {
                std::thread::sleep(Duration::from_millis(300));
            }
            bytes
        })
        .expect("iperf3 through the VIP (is iperf3 installed? `cargo xtask demo` installs it)");
    let text = stats(&pins);
    eprintln!("{text}");
    let line = text
        .lines()
        .find(|l| l.contains(&format!(":{IPERF_PORT}/TCP")))
        .unwrap_or_else(|| panic!("no counters for the iperf3 service: {text}"));
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let [_, packets, bytes, _] = fields[..] else {
        panic!("unexpected service counters line {line:?}");
    };
    assert!(received > 1e6, "iperf3 moved only {received} bytes");
    assert!(
        bytes / packets.max(1) > 1514,
        "{packets} packets of {bytes} bytes: GSO packets did not reach the TC program whole"
    );
    assert_eq!(
        pins.counter("xmit_pass"),
        0,
        "TC passed translated packets to the kernel"
    );
    assert!(
        pins.counter("redirect") >= packets / 2,
        "TC redirects what it translates"
    );
    loader.kill();
    drop(backends);
}
