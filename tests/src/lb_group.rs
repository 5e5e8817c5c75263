//! Several LB nodes in network namespaces: three xlb instances, one API server, a client and
//! two backend nodes (the multi-node test and `bench_failover` share it).
//!
//! Topology: a switch namespace holds two bridges. `front` (198.51.100.0/24) joins the client
//! (.250) and the LB nodes' `eth0` (lb1 .1, lb2 .2, lb3 .3): the shared L2 segment the VIPs
//! are announced on. `back` (203.0.113.0/24) joins the LB nodes' `eth1` (.1-.3), the backend
//! nodes (.11-.12, serving their names on NodePorts 30080-30086) and the API server (.100).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::arp::who_has;
use crate::bpf::PinDir;
use crate::cluster::{Api, Xlb, node_yaml, service_yaml, xlb_binary};
use crate::netns::{Netns, veth};
use crate::servers::{Backend, spawn_in, tcp_name};
use crate::wait::wait_for;

/// How long the group gets to react.
pub const REACT: Duration = Duration::from_secs(20);
/// How long an instance gets to start and join: its data plane first waits for the verifier
/// to check its BPF programs (CPU-bound), and the groups of the tests running at once start
/// six instances together; on a shared 2-CPU machine that took them 19-21 s, past [`REACT`].
const STARTUP: Duration = Duration::from_secs(90);
/// The client's address on the front bridge.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);
/// The API server's address on the back bridge.
pub const API: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The NodePorts the backends serve: one per Service.
pub const NODE_PORTS: std::ops::Range<u16> = 30080..30087;

/// The namespaces, the API server and the three instances; all removed on drop.
pub struct Group {
    pub xlbs: Vec<Option<Xlb>>,
    pins: Vec<PinDir>,
    pub api: Api,
    _backends: Vec<Backend>,
    pub client: Netns,
    pub lbs: Vec<Netns>,
    pub switch: Netns,
    _nodes: Vec<Netns>,
}

impl Group {
    pub fn new(tag: &str) -> Group {
        let switch = Netns::new(&format!("{tag}-sw"));
        for bridge in ["front", "back"] {
            switch.run(&["ip", "link", "add", bridge, "type", "bridge"]);
            switch.run(&["ip", "link", "set", bridge, "up"]);
        }
        switch.run(&["ip", "addr", "add", &format!("{API}/24"), "dev", "back"]);
        let client = Netns::new(&format!("{tag}-c"));
        veth(&client, "eth0", &switch, "c");
        switch.run(&["ip", "link", "set", "c", "master", "front"]);
        client.run(&["ip", "addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        let mut lbs = Vec::new();
        for n in 1..=3 {
            let lb = Netns::new(&format!("{tag}-lb{n}"));
            for (device, port, bridge, subnet) in [
                ("eth0", format!("f{n}"), "front", "198.51.100"),
                ("eth1", format!("b{n}"), "back", "203.0.113"),
            ] {
                veth(&lb, device, &switch, &port);
                switch.run(&["ip", "link", "set", &port, "master", bridge]);
                lb.run(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{subnet}.{n}/24"),
                    "dev",
                    device,
                ]);
            }
            lbs.push(lb);
        }
        let mut nodes = Vec::new();
        let mut backends = Vec::new();
        for n in 1..=2 {
            let node = Netns::new(&format!("{tag}-n{n}"));
            veth(&node, "eth0", &switch, &format!("n{n}"));
            switch.run(&["ip", "link", "set", &format!("n{n}"), "master", "back"]);
            node.run(&[
                "ip",
                "addr",
                "add",
                &format!("203.0.113.1{n}/24"),
                "dev",
                "eth0",
            ]);
            for port in NODE_PORTS {
                backends.push(Backend::start(
                    &node,
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                    &format!("node{n}"),
                ));
            }
            nodes.push(node);
        }
        let api = Api::start_at(&switch, API);
        for n in 1..=2 {
            api.apply(&node_yaml(n, true, true));
        }
        let pins = (0..3).map(|_| PinDir::new()).collect();
        let mut group = Group {
            xlbs: vec![None, None, None],
            pins,
            api,
            _backends: backends,
            client,
            lbs,
            switch,
            _nodes: nodes,
        };
        for index in 0..3 {
            group.start(index);
        }
        wait_for("every instance joins the LB nodes", STARTUP, || {
            group.pending("joining the LB nodes")
        });
        // Owners are only settled once every instance sees all three: before that an early
        // starter holds VIPs a later one takes on joining.
        wait_for("every instance sees the three LB nodes", REACT, || {
            group.pending(r#"members=["lb1", "lb2", "lb3"]"#)
        });
        group
    }

    /// `Ok` when every instance has logged `line`; else the indices of those that have not.
    fn pending(&self, line: &str) -> Result<(), String> {
        let pending: Vec<usize> = (0..3)
            .filter(|index| {
                !self.xlbs[*index]
                    .as_ref()
                    .is_some_and(|xlb| xlb.log().contains(line))
            })
            .collect();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("not yet: {pending:?}"))
        }
    }

    /// Starts xlb on LB node `index` (0-based) as node `lb{index+1}`.
    pub fn start(&mut self, index: usize) {
        let kubeconfig = self.api.kubeconfig().display().to_string();
        let node = format!("lb{}", index + 1);
        self.xlbs[index] = Some(Xlb::start(
            &self.lbs[index],
            &xlb_binary(),
            &self.pins[index],
            &["--kubeconfig", &kubeconfig, "--node-name", &node],
        ));
    }

    pub fn xlb(&mut self, index: usize) -> &mut Xlb {
        self.xlbs[index].as_mut().expect("xlb running")
    }

    /// The MAC of each LB node's `eth0`, to name who answers.
    pub fn macs(&self) -> BTreeMap<[u8; 6], usize> {
        self.lbs
            .iter()
            .enumerate()
            .map(|(index, lb)| {
                let out = lb.run(&["ip", "-o", "link", "show", "eth0"]);
                let text = out
                    .split("link/ether ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .unwrap_or_else(|| panic!("no MAC in {out}"));
                let mut mac = [0u8; 6];
                for (slot, part) in mac.iter_mut().zip(text.split(':')) {
                    *slot = u8::from_str_radix(part, 16).expect("hex");
                }
                (mac, index)
            })
            .collect()
    }

    /// Which LB nodes (by index) answer ARP for `vip`.
    pub fn answering(&self, vip: Ipv4Addr) -> Vec<usize> {
        let macs = self.macs();
        who_has(
            &self.client,
            "eth0",
            CLIENT,
            vip,
            Duration::from_millis(150),
        )
        .iter()
        .map(|mac| *macs.get(mac).unwrap_or(&usize::MAX))
        .collect()
    }

    /// Waits until exactly one LB node answers for `vip`, other than `not`; returns it and
    /// how long that took.
    pub fn single_answer(&self, vip: Ipv4Addr, not: Option<usize>) -> (usize, Duration) {
        let started = Instant::now();
        let owner = wait_for(
            &format!("one LB node answers for {vip}"),
            REACT,
            || match self.answering(vip)[..] {
                [one] if Some(one) != not => Ok(one),
                ref other => Err(format!("answering: {other:?}")),
            },
        );
        (owner, started.elapsed())
    }

    /// Creates the Services `s0..count`, each asking for its own VIP (198.51.100.10 + n) on
    /// its own NodePort; returns their IPs once given.
    pub fn services(&self, count: usize) -> Vec<Ipv4Addr> {
        self.services_from(0, count)
    }

    /// Creates the Services `s{first}..s{first+count}` as [`Group::services`] does.
    pub fn services_from(&self, first: usize, count: usize) -> Vec<Ipv4Addr> {
        let mut yaml = String::new();
        for n in first..first + count {
            let mut service = service_yaml(&format!("s{n}"), 80, NODE_PORTS.start + n as u16);
            // One VIP each: ask for it.
            service = service.replace(
                "metadata: {name:",
                &format!(
                    "metadata: {{annotations: {{xlb.io/loadBalancerIPs: 198.51.100.{}}}, name:",
                    10 + n
                ),
            );
            yaml.push_str(&service);
            yaml.push_str("\n---\n");
        }
        self.api.apply(&yaml);
        (first..first + count)
            .map(|n| {
                wait_for(&format!("s{n} gets its IP"), REACT, || {
                    self.api
                        .ingress_ip(&format!("s{n}"))
                        .ok_or("no IP".to_owned())
                })
            })
            .collect()
    }

    pub fn connect(&self, vip: Ipv4Addr) -> Result<String, String> {
        let addr = SocketAddr::from((vip, 80));
        spawn_in(&self.client, move || tcp_name(addr))
            .join()
            .expect("client thread")
    }
}
