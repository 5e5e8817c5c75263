//! Several LB nodes (GitHub issue 13): three real `xlb` instances, one in-memory API server,
//! in network namespaces.
//!
//! Topology: a switch namespace holds two bridges. `front` (198.51.100.0/24) joins the client
//! (.250) and the LB nodes' `eth0` (lb1 .1, lb2 .2, lb3 .3): the shared L2 segment the VIPs
//! are announced on. `back` (203.0.113.0/24) joins the LB nodes' `eth1` (.1-.3), the backend
//! nodes (.11-.12, serving their names on NodePorts 30080-30085) and the API server (.100).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use xlb_tests::arp::who_has;
use xlb_tests::bpf::PinDir;
use xlb_tests::cluster::{Api, Xlb, node_yaml, service_yaml, xlb_binary};
use xlb_tests::netns::{Netns, veth};
use xlb_tests::servers::{Backend, LongLived, spawn_in, tcp_name};
use xlb_tests::wait::wait_for;

const REACT: Duration = Duration::from_secs(20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);
const API: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The NodePorts the backends serve: one per Service.
const NODE_PORTS: std::ops::Range<u16> = 30080..30086;

struct Group {
    xlbs: Vec<Option<Xlb>>,
    pins: Vec<PinDir>,
    api: Api,
    _backends: Vec<Backend>,
    client: Netns,
    lbs: Vec<Netns>,
    switch: Netns,
    _nodes: Vec<Netns>,
}

impl Group {
    fn new(tag: &str) -> Group {
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
        group
    }

    /// Starts xlb on LB node `index` (0-based) as node `lb{index+1}`.
    fn start(&mut self, index: usize) {
        let kubeconfig = self.api.kubeconfig().display().to_string();
        let node = format!("lb{}", index + 1);
        self.xlbs[index] = Some(Xlb::start(
            &self.lbs[index],
            &xlb_binary(),
            &self.pins[index],
            &["--kubeconfig", &kubeconfig, "--node-name", &node],
        ));
    }

    fn xlb(&mut self, index: usize) -> &mut Xlb {
        self.xlbs[index].as_mut().expect("xlb running")
    }

    /// The MAC of each LB node's `eth0`, to name who answers.
    fn macs(&self) -> BTreeMap<[u8; 6], usize> {
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
    fn answering(&self, vip: Ipv4Addr) -> Vec<usize> {
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
    fn single_answer(&self, vip: Ipv4Addr, not: Option<usize>) -> (usize, Duration) {
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

    fn services(&self, count: usize) -> Vec<Ipv4Addr> {
        let mut yaml = String::new();
        for n in 0..count {
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
        (0..count)
            .map(|n| {
                wait_for(&format!("s{n} gets its IP"), REACT, || {
                    self.api
                        .ingress_ip(&format!("s{n}"))
                        .ok_or("no IP".to_owned())
                })
            })
            .collect()
    }

    fn connect(&self, vip: Ipv4Addr) -> Result<String, String> {
        let addr = SocketAddr::from((vip, 80));
        spawn_in(&self.client, move || tcp_name(addr))
            .join()
            .expect("client thread")
    }
}

/// Every VIP is answered by exactly one LB node, the VIPs spread over the nodes, one
/// instance writes, and SIGTERM or a link going down on an owner moves its VIPs over.
#[test]
fn one_announcer_per_vip_one_writer_and_failover() {
    let mut group = Group::new("ln-one");
    let vips = group.services(6);
    let mut owners = BTreeMap::new();
    for vip in &vips {
        let (owner, _) = group.single_answer(*vip, None);
        owners.insert(*vip, owner);
        let name = group.connect(*vip).unwrap_or_else(|e| panic!("{vip}: {e}"));
        assert!(name.starts_with("node"), "{name}");
    }
    let spread: BTreeSet<usize> = owners.values().copied().collect();
    assert!(spread.len() >= 2, "6 VIPs all on one node: {owners:?}");
    // Every status write came from one instance.
    let writers: BTreeSet<String> = group
        .api
        .faults()
        .requests()
        .into_iter()
        .filter(|request| request.method == "PATCH" && request.uri.contains("/status"))
        .filter_map(|request| request.user_agent)
        .collect();
    assert_eq!(writers.len(), 1, "status written by {writers:?}");
    // Every request, Leases included, is one deploy/rbac.yaml grants.
    let granted = xlb_tests::rbac::granted_by_rbac();
    for request in group.api.faults().requests() {
        if request
            .user_agent
            .as_deref()
            .is_some_and(|agent| agent.starts_with("xlb/"))
        {
            let pair = xlb_tests::rbac::verb_and_resource(&request);
            assert!(
                granted.contains(&pair),
                "{pair:?} is not granted ({})",
                request.uri
            );
        }
    }
    let leases = group.api.kubectl(&["get", "lease", "-n", "kube-system"]);
    for node in ["lb1", "lb2", "lb3"] {
        assert!(leases.contains(&format!("xlb-node-{node}")), "{leases}");
    }

    // SIGTERM: the owner hands its VIPs over before it exits.
    let (vip, owner) = owners.iter().next().map(|(v, o)| (*v, *o)).expect("a VIP");
    let signalled = Instant::now();
    let status = group.xlb(owner).stop(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let (taker, _) = group.single_answer(vip, Some(owner));
    println!(
        "SIGTERM of lb{}: {vip} answered by lb{} after {:?}",
        owner + 1,
        taker + 1,
        signalled.elapsed()
    );
    assert_eq!(group.connect(vip).map(|n| n.starts_with("node")), Ok(true));

    // Link down: the bridge port of the new owner goes down.
    let port = format!("f{}", taker + 1);
    let cut = Instant::now();
    group.switch.run(&["ip", "link", "set", &port, "down"]);
    let (third, _) = group.single_answer(vip, Some(taker));
    println!(
        "link down on lb{}: {vip} answered by lb{} after {:?}",
        taker + 1,
        third + 1,
        cut.elapsed()
    );
    assert_ne!(third, owner, "lb{} was stopped", owner + 1);
    assert_eq!(group.connect(vip).map(|n| n.starts_with("node")), Ok(true));
}

/// SIGKILL of an owner's xlb leaves its node answering: nothing moves, its connections
/// survive, and the restarted instance goes on as owner. An API outage moves nothing either.
#[test]
fn a_killed_xlb_or_an_api_outage_moves_nothing() {
    let mut group = Group::new("ln-kill");
    let vips = group.services(3);
    let owners: Vec<usize> = vips
        .iter()
        .map(|vip| group.single_answer(*vip, None).0)
        .collect();
    let (vip, owner) = (vips[0], owners[0]);
    let addr = SocketAddr::from((vip, 80));
    let mut connection = spawn_in(&group.client, move || LongLived::connect(addr))
        .join()
        .expect("client thread")
        .expect("a long-lived connection");
    group.xlb(owner).kill();
    // Twice the Lease duration: the others see the Lease expire and must still not move.
    std::thread::sleep(Duration::from_secs(4));
    for (vip, owner) in vips.iter().zip(&owners) {
        assert_eq!(
            group.answering(*vip),
            vec![*owner],
            "{vip} moved after SIGKILL"
        );
    }
    connection
        .ping(1)
        .expect("the connection survives the kill");
    group.start(owner);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        group.answering(vip),
        vec![owner],
        "{vip} moved after the restart"
    );
    connection
        .ping(2)
        .expect("the connection survives the restart");

    group.api.faults().refuse();
    std::thread::sleep(Duration::from_secs(4));
    for (vip, owner) in vips.iter().zip(&owners) {
        assert_eq!(
            group.answering(*vip),
            vec![*owner],
            "{vip} moved during the outage"
        );
    }
    connection
        .ping(3)
        .expect("the connection survives the outage");
    group.api.faults().clear();
}
