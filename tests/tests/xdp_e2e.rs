//! End to end through network namespaces with real sockets: client ns — lb ns — 3 backend ns.
//! The data plane runs as a separate process (`xlb_loader`, the library code the controller
//! uses) entered into the lb namespace with `nsenter --net` (which keeps the host's bpffs
//! mount, unlike `ip netns exec`).
//!
//! Topologies:
//! - separate devices: the client behind `l0`, each backend behind its own veth `lb1..lb3`
//!   (xlb finds and attaches those from the routing table);
//! - same device: client, LB and backends on one bridge (in a `sw` namespace); the LB has a
//!   single device `l0` carrying both subnets.
//!
//! Generic XDP transmits with XDP_TX/redirect; native XDP on veth passes translated packets
//! to the kernel, which forwards them (see `xlb::dataplane::xdp`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use xlb_tests::bpf::PinDir;
use xlb_tests::netns::{ChildGuard, Netns, veth};
use xlb_tests::servers::{Backend, LongLived, tcp_name, udp_name};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

/// The loader process; SIGKILLed on drop.
struct Loader {
    child: ChildGuard,
    lines: Receiver<String>,
}

impl Loader {
    fn start(
        lb: &Netns,
        pins: &PinDir,
        device: &str,
        mode: &str,
        services: &std::path::Path,
    ) -> Loader {
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", lb.name()))
            .arg(env!("CARGO_BIN_EXE_xlb_loader"))
            .arg(pins.path())
            .args([device, mode])
            .arg(services)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start xlb_loader");
        let mut child = ChildGuard(child);
        let stdout = child.0.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut loader = Loader { child, lines };
        let ready = loader.wait_for("ready");
        eprintln!("loader: {ready}");
        loader
    }

    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200))
                && line.starts_with(prefix)
            {
                return line;
            }
            if let Ok(Some(status)) = self.child.0.try_wait() {
                panic!("xlb_loader exited with {status} before printing {prefix:?}");
            }
        }
        panic!("xlb_loader did not print {prefix:?} within 30 s");
    }

    fn kill(self) {
        drop(self);
    }
}

/// Namespaces of one topology; dropped (and removed) at the end of the test.
struct Topology {
    client: Netns,
    lb: Netns,
    backends: Vec<(Netns, Ipv4Addr)>,
    _switch: Option<Netns>,
}

impl Topology {
    /// Client behind `l0`, backend i behind its own device `lb<i>` (203.0.113.4i+1/30).
    fn separate(tag: &str) -> Topology {
        let client = Netns::new(&format!("{tag}c"));
        let lb = Netns::new(&format!("{tag}l"));
        veth(&client, "c0", &lb, "l0");
        client.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "c0"]);
        client.run(&["ip", "route", "add", "default", "via", "192.0.2.254"]);
        lb.run(&["ip", "addr", "add", "192.0.2.254/24", "dev", "l0"]);
        lb.run(&["ip", "addr", "add", "198.51.100.1/24", "dev", "l0"]);
        lb.run(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "l0"]);
        let mut backends = Vec::new();
        for i in 1..=3u8 {
            let ns = Netns::new(&format!("{tag}b{i}"));
            let dev = format!("lb{i}");
            veth(&ns, "b0", &lb, &dev);
            let (lb_ip, b_ip) = (
                Ipv4Addr::new(203, 0, 113, 4 * i + 1),
                Ipv4Addr::new(203, 0, 113, 4 * i + 2),
            );
            lb.run(&["ip", "addr", "add", &format!("{lb_ip}/30"), "dev", &dev]);
            ns.run(&["ip", "addr", "add", &format!("{b_ip}/30"), "dev", "b0"]);
            ns.run(&["ip", "route", "add", "default", "via", &lb_ip.to_string()]);
            backends.push((ns, b_ip));
        }
        Topology {
            client,
            lb,
            backends,
            _switch: None,
        }
    }

    /// Client, LB and backends on one bridge; the LB has the single device `l0`.
    fn same_device(tag: &str) -> Topology {
        let sw = Netns::new(&format!("{tag}s"));
        sw.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        sw.run(&["ip", "link", "set", "br0", "up"]);
        let client = Netns::new(&format!("{tag}c"));
        let lb = Netns::new(&format!("{tag}l"));
        veth(&client, "c0", &sw, "pc");
        veth(&lb, "l0", &sw, "pl");
        client.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "c0"]);
        client.run(&["ip", "route", "add", "default", "via", "192.0.2.254"]);
        for addr in ["192.0.2.254/24", "203.0.113.1/24", "198.51.100.10/32"] {
            lb.run(&["ip", "addr", "add", addr, "dev", "l0"]);
        }
        let mut backends = Vec::new();
        for i in 1..=3u8 {
            let ns = Netns::new(&format!("{tag}b{i}"));
            let port = format!("pb{i}");
            veth(&ns, "b0", &sw, &port);
            let b_ip = Ipv4Addr::new(203, 0, 113, 10 + i);
            ns.run(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", "b0"]);
            ns.run(&["ip", "route", "add", "default", "via", "203.0.113.1"]);
            backends.push((ns, b_ip));
        }
        for port in ["pc", "pl", "pb1", "pb2", "pb3"] {
            sw.run(&["ip", "link", "set", port, "master", "br0"]);
        }
        Topology {
            client,
            lb,
            backends,
            _switch: Some(sw),
        }
    }

    /// Starts a backend named `b<i>` in each backend namespace.
    fn start_backends(&self) -> Vec<Backend> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, (ns, ip))| {
                Backend::start(
                    ns,
                    SocketAddr::V4(SocketAddrV4::new(*ip, BACKEND_PORT)),
                    &format!("b{}", i + 1),
                )
            })
            .collect()
    }

    /// `VIP:80/tcp` and `VIP:80/udp` over the given backends (indices into `backends`).
    fn services(&self, which: &[usize]) -> String {
        let list: Vec<String> = which
            .iter()
            .map(|&i| format!("{}:{BACKEND_PORT}", self.backends[i].1))
            .collect();
        format!(
            "{VIP}:{PORT}/tcp={}\n{VIP}:{PORT}/udp={}\n",
            list.join(","),
            list.join(",")
        )
    }
}

/// Opens `n` TCP connections one after the other; counts answers by backend name.
fn spread(client: &Netns, n: usize) -> BTreeMap<String, usize> {
    client.enter(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut counts = BTreeMap::new();
        for i in 0..n {
            assert!(
                Instant::now() < deadline,
                "{n} connections took more than 60 s"
            );
            let name =
                tcp_name(vip()).unwrap_or_else(|e| panic!("connection {i} through the VIP: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
}

fn udp_spread(client: &Netns, n: usize) -> BTreeMap<String, usize> {
    client.enter(|| {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let name =
                udp_name(vip()).unwrap_or_else(|e| panic!("UDP query {i} through the VIP: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
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

fn counter(pins: &PinDir, name: &str) -> u64 {
    stats(pins)
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name))
                .then(|| words.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
        .unwrap_or_else(|| panic!("counter {name} missing"))
}

fn even_spread(topology: Topology, mode: &str, tcp: usize, udp: usize) {
    let backends = topology.start_backends();
    let pins = PinDir::new();
    let dir = tempdir();
    let file = dir.join("services");
    std::fs::write(&file, topology.services(&[0, 1, 2])).expect("services file");
    let loader = Loader::start(&topology.lb, &pins, "l0", mode, &file);
    assert_even(&spread(&topology.client, tcp), tcp, 3);
    assert_even(&udp_spread(&topology.client, udp), udp, 3);
    let text = stats(&pins);
    eprintln!("{text}");
    assert!(counter(&pins, "new_flow") >= (tcp + udp) as u64);
    assert_eq!(counter(&pins, "aborted"), 0);
    if mode == "generic" {
        assert!(
            counter(&pins, "tx") + counter(&pins, "redirect") > 0,
            "generic mode must transmit from XDP"
        );
    }
    loader.kill();
    drop(backends);
}

fn tempdir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xlb-e2e-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
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
fn same_device_generic_spreads_connections_evenly() {
    even_spread(Topology::same_device("dg"), "generic", 300, 30);
}

#[test]
fn same_device_native_spreads_connections_evenly() {
    even_spread(Topology::same_device("dn"), "native", 300, 30);
}

/// A long-lived connection keeps working while its backend is removed (drain), while the
/// loader is SIGKILLed and while a new loader adopts the pinned data plane.
fn long_lived(mode: &str, tag: &str) {
    let topology = Topology::separate(tag);
    let backends = topology.start_backends();
    let pins = PinDir::new();
    let dir = tempdir();
    let file = dir.join("services");
    std::fs::write(&file, topology.services(&[0, 1, 2])).expect("services file");
    let mut loader = Loader::start(&topology.lb, &pins, "l0", mode, &file);

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
    let counts = spread(&topology.client, 10);
    assert!(
        !counts.contains_key("b1"),
        "removed backend got new flows: {counts:?}"
    );

    // SIGKILL the loader: pinned program, links and maps keep forwarding.
    loader.kill();
    step("loader-killed");
    assert_eq!(spread(&topology.client, 4).values().sum::<usize>(), 4);

    // A new loader adopts the pinned data plane; b1 comes back.
    std::fs::write(&file, topology.services(&[0, 1, 2])).expect("services file");
    let loader = Loader::start(&topology.lb, &pins, "l0", mode, &file);
    step("loader-restarted");
    step("bulk");
    assert_eq!(spread(&topology.client, 6).len(), 3);
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
