//! The network-namespace topologies of the tests (the controller's cluster is in
//! [`crate::cluster`]), and the data plane run as a separate process (`xlb_loader`).
//!
//! Topologies:
//! - [`Pair`]: two namespaces joined by one veth, an address on each end (address manager
//!   and XDP attach tests);
//! - separate devices: the client behind `l0`, each backend behind its own veth `lb1..lb3`
//!   (xlb finds and attaches those from the routing table);
//! - same device: client, LB and backends on one bridge (in a `sw` namespace); the LB has a
//!   single device `l0` carrying both subnets.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bpf::PinDir;
use crate::netns::{ChildGuard, Netns, veth};
use crate::servers::{Backend, tcp_name, udp_names};
use crate::wait::Lines;

/// The service address the topology's services use.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The service port.
pub const PORT: u16 = 80;
/// The port backends listen on.
pub const BACKEND_PORT: u16 = 8080;

/// `VIP:PORT`.
pub fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

/// Opens `n` TCP connections to [`vip`] from `client`, one after the other (60 s at most);
/// counts the answers by backend name.
pub fn tcp_spread(client: &Netns, n: usize) -> BTreeMap<String, usize> {
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

/// Sends `n` datagrams to [`vip`] from `client`, each from its own socket (a new flow); counts
/// the answers by backend name.
pub fn udp_spread(client: &Netns, n: usize) -> BTreeMap<String, usize> {
    client.enter(|| {
        let mut counts = BTreeMap::new();
        for (i, answer) in udp_names(vip(), n).into_iter().enumerate() {
            let name = answer.unwrap_or_else(|e| panic!("UDP query {i} through the VIP: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
}

/// A fresh temporary directory (for services files and configs).
pub fn tempdir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xlb-e2e-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The loader process; SIGKILLed on drop.
pub struct Loader {
    child: ChildGuard,
    lines: Lines,
}

impl Loader {
    /// Starts `loader` (the `xlb_loader` binary) on `device` in `lb`, in `mode`
    /// (`native`, `generic` or `auto`), with the services file `services`; waits for `ready`.
    pub fn start(
        loader: &Path,
        lb: &Netns,
        pins: &PinDir,
        device: &str,
        mode: &str,
        services: &std::path::Path,
    ) -> Loader {
        Loader::start_with_env(loader, lb, pins, device, mode, services, &[])
    }

    /// [`Loader::start`] with extra environment variables (`XLB_SNAT_PORTS`,
    /// `XLB_SNAT_ADDRESSES`: see the `xlb_loader` binary).
    pub fn start_with_env(
        loader: &Path,
        lb: &Netns,
        pins: &PinDir,
        device: &str,
        mode: &str,
        services: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Loader {
        let child = Command::new("nsenter")
            .envs(env.iter().copied())
            .arg(format!("--net=/var/run/netns/{}", lb.name()))
            .arg(loader)
            .arg(pins.path())
            .args([device, mode])
            .arg(services)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start xlb_loader");
        let mut child = ChildGuard(child);
        let stdout = child.0.stdout.take().expect("stdout");
        let lines = Lines::read(stdout);
        let mut loader = Loader { child, lines };
        let ready = loader.wait_for("ready");
        eprintln!("loader: {ready}");
        loader
    }

    /// Waits (at most 30 s) for an output line starting with `prefix`; returns it.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(line) = self.lines.next_within(Duration::from_millis(200))
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

    /// SIGKILLs the loader (pinned objects stay).
    pub fn kill(self) {
        drop(self);
    }
}

/// Two namespaces joined by one veth with an address on each end: the smallest topology.
#[derive(Debug)]
pub struct Pair {
    /// The first namespace, with device `near_dev`.
    pub near: Netns,
    /// The second namespace, with device `far_dev`.
    pub far: Netns,
}

impl Pair {
    /// Namespaces `<tag>-n` and `<tag>-f`, joined by a veth `near_dev` — `far_dev`, both up,
    /// with `near_cidr` and `far_cidr` (`198.51.100.1/24`).
    pub fn new(
        tag: &str,
        (near_dev, near_cidr): (&str, &str),
        (far_dev, far_cidr): (&str, &str),
    ) -> Pair {
        let near = Netns::new(&format!("{tag}-n"));
        let far = Netns::new(&format!("{tag}-f"));
        veth(&near, near_dev, &far, far_dev);
        near.run(&["ip", "addr", "add", near_cidr, "dev", near_dev]);
        far.run(&["ip", "addr", "add", far_cidr, "dev", far_dev]);
        Pair { near, far }
    }
}

/// Namespaces of one topology; dropped (and removed) at the end of the test.
pub struct Topology {
    /// The client namespace (192.0.2.1, default route via the LB).
    pub client: Netns,
    /// The LB namespace (`l0` toward the client; the VIP is on `l0`).
    pub lb: Netns,
    /// Backend namespaces and their addresses.
    pub backends: Vec<(Netns, Ipv4Addr)>,
    _switch: Option<Netns>,
}

impl Topology {
    /// Client behind `l0`, backend i behind its own device `lb<i>` (203.0.113.4i+1/30).
    pub fn separate(tag: &str) -> Topology {
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
    pub fn same_device(tag: &str) -> Topology {
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
    pub fn start_backends(&self) -> Vec<Backend> {
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
    pub fn services(&self, which: &[usize]) -> String {
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
