//! A loaded (not attached) data plane inside a namespace whose routes and permanent neighbours
//! make FIB lookups deterministic, for `BPF_PROG_TEST_RUN` fixtures and benchmarks.
//!
//! `bpf_fib_lookup` in a test run works in the caller's namespace with `lo` as the ingress
//! device, so runs happen inside the namespace: backends `203.0.113.0/24` sit behind `fxb`
//! (LB address 203.0.113.1, MAC 02:00:00:00:01:0b), clients `192.0.2.0/24` behind `fxc`
//! (192.0.2.254, 02:00:00:00:01:0c); each host address used has a permanent neighbour entry
//! `02:00:00:00:<3rd octet low byte>:<4th octet>`. Egress is never `lo`, so the generic
//! program redirects (`XDP_REDIRECT`) and the native program, whose xmit devmap is empty,
//! passes the translated packet to the kernel (`XDP_PASS`, original MACs).

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{HashMap, MapData};
use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use lb_common::{CtEntry, FlowKey, PROGRAM_TC};
use xlb::dataplane::Dataplane as _;
use xlb::dataplane::xdp::{XdpConfig, XdpDataplane};
use xlb::model::{Backend, Frontend, Protocol, VirtualService};

use crate::bpf::PinDir;
use crate::netns::Netns;

/// The LB's address toward the backends (the SNAT source).
pub const LB_BACKEND_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// MAC of the LB's backend-facing device.
pub const LB_BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x0b];
/// MAC of the LB's client-facing device.
pub const LB_CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x0c];

/// The destination MAC of crafted frames (`pkt::frame`): registered as the own MAC of `lo`,
/// the device test runs arrive on, so the program takes them as addressed to the LB.
pub const LB_TEST_RUN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];
/// `lo`'s ifindex in every network namespace.
pub const LO_IFINDEX: u32 = 1;

/// The permanent neighbour MAC of a host address in the fixture.
pub fn host_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [2, 0, 0, 0, o[2], o[3]]
}

/// Namespace + pin directory + loaded data plane.
pub struct Fixture {
    // Field order: the data plane closes its fds before the pins and the namespace go.
    pub dp: XdpDataplane,
    pub pins: PinDir,
    pub ns: Netns,
}

impl Fixture {
    /// Sets up the namespace and loads the data plane with `services`.
    pub fn new(tag: &str, services: &[VirtualService]) -> Fixture {
        Fixture::with_ports(tag, services, lb_common::SNAT_PORTS_DEFAULT)
    }

    /// [`Fixture::new`] with the SNAT port range `snat_ports`.
    pub fn with_ports(
        tag: &str,
        services: &[VirtualService],
        snat_ports: lb_common::SnatPorts,
    ) -> Fixture {
        let ns = Netns::new(tag);
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (dev, mac, addr, hosts) in [
            (
                "fxb",
                "02:00:00:00:01:0b",
                "203.0.113.1/24",
                ["203.0.113.2", "203.0.113.3", "203.0.113.4"],
            ),
            (
                "fxc",
                "02:00:00:00:01:0c",
                "192.0.2.254/24",
                ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
            ),
        ] {
            let peer = format!("{dev}-p");
            ns.run(&[
                "ip", "link", "add", dev, "address", mac, "type", "veth", "peer", "name", &peer,
            ]);
            ns.run(&["ip", "link", "set", dev, "up"]);
            ns.run(&["ip", "link", "set", &peer, "up"]);
            ns.run(&["ip", "addr", "add", addr, "dev", dev]);
            for host in hosts {
                let ip: Ipv4Addr = host.parse().expect("address");
                let m = host_mac(ip);
                let mac = format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                );
                ns.run(&[
                    "ip",
                    "neigh",
                    "replace",
                    host,
                    "lladdr",
                    &mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
        let pins = PinDir::new();
        let config = XdpConfig {
            pin_dir: pins.path().to_owned(),
            devices: Vec::new(),
            set_sysctls: false,
            snat_ports,
            ..XdpConfig::default()
        };
        let mut dp =
            XdpDataplane::open(config).unwrap_or_else(|e| panic!("loading the data plane: {e}"));
        dp.apply(services)
            .unwrap_or_else(|e| panic!("applying services: {e}"));
        dp.set_device_mac(LO_IFINDEX, LB_TEST_RUN_MAC)
            .unwrap_or_else(|e| panic!("registering lo's MAC: {e}"));
        Fixture { dp, pins, ns }
    }

    /// Runs program `name` once on `frame` inside the namespace: (verdict, output frame).
    pub fn run(&self, name: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
        let program = self.dp.program(name).unwrap_or_else(|e| panic!("{e}"));
        self.run_once(program, name, frame)
    }

    /// Runs the TC program once on `frame` (an skb arriving on `lo`) inside the namespace:
    /// (TC verdict, output frame).
    pub fn run_tc(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program = self
            .dp
            .tc_program(PROGRAM_TC)
            .unwrap_or_else(|e| panic!("{e}"));
        self.run_once(program, PROGRAM_TC, frame)
    }

    fn run_once<P>(&self, program: &P, name: &str, frame: &[u8]) -> (u32, Vec<u8>)
    where
        P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult> + Sync,
    {
        let mut out = vec![0u8; frame.len() + 512];
        let result = self.ns.enter(|| {
            program.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
        });
        let result = result.unwrap_or_else(|e| panic!("test run of {name}: {e}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs program `name` once on each of `count` frames that `make(i, frame)` writes (the
    /// buffer holds the previous frame), inside the namespace entered once; returns how many
    /// runs ended with each verdict (indexed by XDP action, 0..=4).
    pub fn run_many(
        &self,
        name: &'static str,
        count: u64,
        mut make: impl FnMut(u64, &mut Vec<u8>) + Send,
    ) -> [u64; 5] {
        let program = self.dp.program(name).unwrap_or_else(|e| panic!("{e}"));
        let mut verdicts = [0u64; 5];
        let mut frame = Vec::new();
        let mut out = vec![0u8; 2048];
        self.ns.enter(|| {
            for i in 0..count {
                make(i, &mut frame);
                let result = program
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut out),
                        repeat: 1,
                        ..TestRunOptions::default()
                    })
                    .unwrap_or_else(|e| panic!("test run {i} of {name}: {e}"));
                verdicts[(result.return_value as usize).min(4)] += 1;
            }
        });
        verdicts
    }

    /// Runs program `name` `repeat` times on `frame`; returns the kernel's mean ns per run.
    pub fn bench(&self, name: &'static str, frame: &[u8], repeat: u32) -> f64 {
        let program = self.dp.program(name).unwrap_or_else(|e| panic!("{e}"));
        let mut out = vec![0u8; frame.len() + 512];
        let result = self.ns.enter(|| {
            program.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
        });
        result
            .unwrap_or_else(|e| panic!("test run of {name}: {e}"))
            .duration
            .as_nanos() as f64
    }

    /// A conntrack map (`lb_common::CT_FWD_MAP` or `CT_REV_MAP`) opened from its pin.
    pub fn ct_map(&self, name: &str) -> HashMap<MapData, FlowKey, CtEntry> {
        self.pins.ct_map(name)
    }

    /// The global counter `index`.
    pub fn stat(&self, index: u32) -> u64 {
        self.dp.stats().unwrap_or_else(|e| panic!("{e}"))[index as usize]
    }
}

/// A virtual service.
pub fn service(
    vip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    backends: &[(Ipv4Addr, u16)],
) -> VirtualService {
    VirtualService {
        frontend: Frontend {
            vip,
            port,
            protocol,
        },
        backends: backends
            .iter()
            .map(|&(ip, port)| Backend { ip, port })
            .collect(),
        owner: "default/test".into(),
    }
}

/// Shorthand for a socket address.
pub fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}
