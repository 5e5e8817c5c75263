//! xlb's address manager against a real kernel, in network namespaces.
//!
//! Topology of every test: namespace `lb` with device `xlb0` (198.51.100.1/24, default route
//! via 198.51.100.254) joined by a veth to namespace `peer` with `peer0` (198.51.100.254/24),
//! the neighbour that should learn VIPs. Clients are 192.0.2.0/24, beyond the gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use xlb::addr::route::{Route, RouteLookup};
use xlb::addr::{AddrConfig, AddrError, AddrManager, DesiredVips};
use xlb::config::Announce;
use xlb_tests::netns::{ChildGuard, Netns, require_root, veth};
use xlb_tests::topology::Pair;
use xlb_tests::wait::{Lines, eventually};

const LB_DEV: &str = "xlb0";
const PEER_DEV: &str = "peer0";
const LB_ADDR: &str = "198.51.100.1";
const GATEWAY: &str = "198.51.100.254";
const CLIENT: &str = "192.0.2.50";

/// The `lb` and `peer` namespaces, joined by a veth.
struct Lan {
    lb: Netns,
    peer: Netns,
}

/// Builds the topology with the LB's address `lb_cidr` and the peer's `peer_cidr`, the peer
/// being the LB's default gateway `gateway`.
fn lan_with(tag: &str, lb_cidr: &str, peer_cidr: &str, gateway: &str) -> Lan {
    require_root("this address-manager test");
    let Pair {
        near: lb,
        far: peer,
    } = Pair::new(tag, (LB_DEV, lb_cidr), (PEER_DEV, peer_cidr));
    lb.run(&[
        "ip", "route", "add", "default", "via", gateway, "dev", LB_DEV,
    ]);
    Lan { lb, peer }
}

fn lan(tag: &str) -> Lan {
    lan_with(tag, "198.51.100.1/24", "198.51.100.254/24", GATEWAY)
}

/// Runs the future made by `f` to completion on a thread inside `ns`.
fn block_in<R: Send, F: Future<Output = R>>(ns: &Netns, f: impl FnOnce() -> F + Send) -> R {
    ns.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

fn config(announce: Announce) -> AddrConfig {
    AddrConfig {
        link_device: Some(LB_DEV.to_owned()),
        announce,
    }
}

async fn manager(announce: Announce) -> AddrManager {
    AddrManager::new(config(announce))
        .await
        .unwrap_or_else(|err| panic!("starting the address manager: {err}"))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

/// `[(vip, [owner, ...]), ...]` as the controller would pass it.
fn desired(vips: &[(&str, &[&str])]) -> DesiredVips {
    vips.iter()
        .map(|(vip, owners)| (ip(vip), names(owners)))
        .collect()
}

/// Syncs and fails the test on any error.
async fn sync_ok(manager: &mut AddrManager, vips: &DesiredVips) -> xlb::addr::SyncReport {
    let report = manager
        .sync(vips)
        .await
        .unwrap_or_else(|err| panic!("sync: {err}"));
    assert!(report.failed.is_empty(), "sync failed: {:?}", report.failed);
    report
}

/// An IPv4 address of a device, as `ip -j addr` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inet {
    cidr: String,
    secondary: bool,
    noprefixroute: bool,
}

fn json(ns: &Netns, argv: &[&str]) -> Value {
    let out = ns.run(argv);
    serde_json::from_str(&out)
        .unwrap_or_else(|err| panic!("{argv:?} printed no JSON ({err}): {out}"))
}

fn inet_addrs(ns: &Netns, dev: &str) -> Vec<Inet> {
    let links = json(ns, &["ip", "-j", "addr", "show", "dev", dev]);
    let mut found = Vec::new();
    for info in links[0]["addr_info"].as_array().into_iter().flatten() {
        if info["family"] != "inet" {
            continue;
        }
        found.push(Inet {
            cidr: format!(
                "{}/{}",
                info["local"].as_str().unwrap_or("?"),
                info["prefixlen"]
            ),
            secondary: info["secondary"] == true,
            noprefixroute: info["noprefixroute"] == true,
        });
    }
    found
}

fn cidrs(ns: &Netns, dev: &str) -> Vec<String> {
    let mut list: Vec<String> = inet_addrs(ns, dev).into_iter().map(|a| a.cidr).collect();
    list.sort();
    list
}

fn sorted(list: &[&str]) -> Vec<String> {
    let mut list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
    list.sort();
    list
}

/// The source address the kernel picks for traffic to `dst`.
fn route_src(ns: &Netns, dst: &str) -> String {
    let route = json(ns, &["ip", "-j", "route", "get", dst]);
    route[0]["prefsrc"]
        .as_str()
        .unwrap_or_else(|| panic!("no source address for {dst}: {route}"))
        .to_owned()
}

fn mac_of(ns: &Netns, dev: &str) -> String {
    let link = json(ns, &["ip", "-j", "link", "show", "dev", dev]);
    link[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{dev} has no MAC: {link}"))
        .to_owned()
}

/// The MAC the peer's neighbour table holds for `ip`, if any.
fn peer_neighbour(lan: &Lan, ip: &str) -> Option<String> {
    let neigh = json(
        &lan.peer,
        &["ip", "-j", "neigh", "show", ip, "dev", PEER_DEV],
    );
    neigh[0]["lladdr"].as_str().map(str::to_owned)
}

/// Gives the peer a stale neighbour entry for `ip` pointing at a MAC nobody has, as after a
/// failover from another node.
fn seed_wrong_neighbour(lan: &Lan, ip: &str) {
    lan.peer.run(&[
        "ip", "neigh", "replace", ip, "lladdr", WRONG_MAC, "dev", PEER_DEV, "nud", "stale",
    ]);
}
const WRONG_MAC: &str = "02:00:00:00:00:99";

/// A child whose stdout lines are read as they come; killed on drop.
struct Child {
    guard: ChildGuard,
    lines: Lines,
}

impl Child {
    fn spawn(ns: &Netns, argv: &[&str]) -> Child {
        let mut child = ns
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {argv:?}: {err}"));
        let lines = Lines::read(child.stdout.take().expect("piped stdout"));
        Child {
            guard: ChildGuard(child),
            lines,
        }
    }

    /// Waits up to `limit` for a line containing `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        self.lines.wait_for(needle, limit)
    }

    /// Every line read so far.
    fn seen(&self) -> &[String] {
        self.lines.seen()
    }

    fn child(&mut self) -> &mut std::process::Child {
        &mut self.guard.0
    }
}

#[test]
fn shared_vip_is_added_once_and_removed_with_its_last_owner() {
    let lan = lan("share");
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;

        let report = sync_ok(
            &mut m,
            &desired(&[
                ("198.51.100.10", &["default/a", "default/b"]),
                ("198.51.100.11", &["default/c"]),
            ]),
        )
        .await;
        assert_eq!(report.added, vec![ip("198.51.100.10"), ip("198.51.100.11")]);
        assert_eq!(
            cidrs(&lan.lb, LB_DEV),
            sorted(&["198.51.100.1/24", "198.51.100.10/24", "198.51.100.11/24"])
        );

        // default/a leaves: .10 still has default/b; default/c leaves: .11 goes.
        let report = sync_ok(&mut m, &desired(&[("198.51.100.10", &["default/b"])])).await;
        assert_eq!(report.kept, vec![ip("198.51.100.10")]);
        assert!(report.added.is_empty(), "nothing re-added: {report:?}");
        assert_eq!(report.removed, vec![ip("198.51.100.11")]);
        assert_eq!(
            cidrs(&lan.lb, LB_DEV),
            sorted(&["198.51.100.1/24", "198.51.100.10/24"])
        );

        // An empty owner set is a reference count of zero.
        let report = sync_ok(&mut m, &desired(&[("198.51.100.10", &[])])).await;
        assert_eq!(report.removed, vec![ip("198.51.100.10")]);
        assert_eq!(cidrs(&lan.lb, LB_DEV), sorted(&["198.51.100.1/24"]));

        // Syncing the same state again changes nothing.
        let report = sync_ok(&mut m, &DesiredVips::new()).await;
        assert!(
            report.added.is_empty() && report.removed.is_empty(),
            "{report:?}"
        );
    });
}

#[test]
fn vip_prefix_is_the_longest_device_prefix_that_covers_it() {
    let lan = lan("prefix");
    lan.lb
        .run(&["ip", "addr", "add", "198.51.100.129/25", "dev", LB_DEV]);
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        sync_ok(
            &mut m,
            &desired(&[
                ("198.51.100.10", &["default/a"]),
                ("198.51.100.200", &["default/b"]),
            ]),
        )
        .await;
    });
    let addrs = inet_addrs(&lan.lb, LB_DEV);
    for vip in ["198.51.100.10/24", "198.51.100.200/25"] {
        let found = addrs.iter().find(|a| a.cidr == vip);
        assert!(
            found.is_some_and(|a| a.secondary && a.noprefixroute),
            "{vip} should be a secondary noprefixroute address: {addrs:?}"
        );
    }
}

#[test]
fn host_network_describes_the_link_device_without_xlb_addresses() {
    let lan = lan("hostnet");
    lan.lb
        .run(&["ip", "addr", "add", "198.51.100.129/25", "dev", LB_DEV]);
    let host = block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        sync_ok(&mut m, &desired(&[("198.51.100.10", &["default/a"])])).await;
        m.host_network()
            .await
            .unwrap_or_else(|err| panic!("host_network: {err}"))
    });
    assert_eq!(host.device, LB_DEV);
    assert!(host.ifindex > 0);
    assert_eq!(
        host.prefixes,
        vec![(ip("198.51.100.0"), 24), (ip("198.51.100.128"), 25)]
    );
    assert_eq!(
        host.own_addresses,
        vec![ip(LB_ADDR), ip("198.51.100.129")],
        "the VIP is xlb's"
    );
    assert_eq!(host.gateways, vec![ip(GATEWAY)]);
    assert!(host.vip_prefix_required);
}

#[test]
fn link_device_comes_from_the_flag_or_the_default_route() {
    let lan = lan("linkdev");
    block_in(&lan.lb, || async {
        let auto = AddrManager::new(AddrConfig::default())
            .await
            .unwrap_or_else(|err| panic!("auto-detecting the device: {err}"));
        assert_eq!(auto.device(), LB_DEV);

        let missing = AddrManager::new(AddrConfig {
            link_device: Some("nosuchdev0".to_owned()),
            ..AddrConfig::default()
        })
        .await;
        match missing {
            Err(err @ AddrError::NoSuchDevice { .. }) => {
                assert!(err.to_string().contains("nosuchdev0"), "{err}");
            }
            other => panic!("expected NoSuchDevice, got {:?}", other.err()),
        }
    });
    lan.lb.run(&["ip", "route", "del", "default"]);
    block_in(&lan.lb, || async {
        let err = AddrManager::new(AddrConfig::default()).await.err();
        assert!(
            matches!(err, Some(AddrError::NoDefaultRoute)),
            "expected NoDefaultRoute, got {err:?}"
        );
    });
}

#[test]
fn vip_outside_the_device_prefixes_is_refused_naming_device_and_prefixes() {
    let lan = lan("outside");
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        let report = m
            .sync(&desired(&[
                ("203.0.113.7", &["default/a"]),
                ("198.51.100.10", &["default/b"]),
            ]))
            .await
            .unwrap_or_else(|err| panic!("sync: {err}"));
        assert_eq!(
            report.added,
            vec![ip("198.51.100.10")],
            "the valid VIP still goes on"
        );
        let [err] = report.failed.as_slice() else {
            panic!("expected one refusal, got {:?}", report.failed);
        };
        let msg = err.to_string();
        assert!(matches!(err, AddrError::Refused { .. }), "{msg}");
        for needle in ["203.0.113.7", LB_DEV, "198.51.100.0/24"] {
            assert!(msg.contains(needle), "message should name {needle}: {msg}");
        }
    });
    assert_eq!(
        cidrs(&lan.lb, LB_DEV),
        sorted(&["198.51.100.1/24", "198.51.100.10/24"])
    );
}

#[test]
fn host_address_inside_the_pool_survives_start_run_and_stop() {
    let lan = lan("foreign");
    lan.lb
        .run(&["ip", "addr", "add", "198.51.100.20/24", "dev", LB_DEV]);
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        sync_ok(&mut m, &desired(&[("198.51.100.10", &["default/a"])])).await;

        // Even asked for, the host's address is refused and left alone.
        let report = m
            .sync(&desired(&[
                ("198.51.100.10", &["default/a"]),
                ("198.51.100.20", &["default/b"]),
            ]))
            .await
            .unwrap_or_else(|err| panic!("sync: {err}"));
        assert!(
            matches!(report.failed.as_slice(), [AddrError::Refused { vip, .. }] if *vip == ip("198.51.100.20")),
            "{:?}",
            report.failed
        );

        sync_ok(&mut m, &DesiredVips::new()).await;
        assert!(
            cidrs(&lan.lb, LB_DEV).contains(&"198.51.100.20/24".to_owned()),
            "host address removed by sync"
        );

        sync_ok(&mut m, &desired(&[("198.51.100.11", &["default/a"])])).await;
        let removed = m
            .cleanup()
            .await
            .unwrap_or_else(|err| panic!("cleanup: {err}"));
        assert_eq!(removed, 1, "cleanup removes exactly xlb's one VIP");
    });
    assert_eq!(
        cidrs(&lan.lb, LB_DEV),
        sorted(&["198.51.100.1/24", "198.51.100.20/24"])
    );
}

#[test]
fn restart_after_sigkill_adopts_wanted_vips_without_flap_and_removes_the_rest() {
    let lan = lan("adopt");
    let mut held = Child::spawn(
        &lan.lb,
        &[
            env!("CARGO_BIN_EXE_xlb-addr-hold"),
            LB_DEV,
            "198.51.100.10",
            "198.51.100.11",
        ],
    );
    assert!(
        held.wait_for("ready", Duration::from_secs(10)),
        "the helper did not place its VIPs within 10 s: {:?}",
        held.seen()
    );
    held.child().kill().expect("SIGKILL the helper");
    held.child().wait().expect("reap the helper");
    assert_eq!(
        cidrs(&lan.lb, LB_DEV),
        sorted(&["198.51.100.1/24", "198.51.100.10/24", "198.51.100.11/24"]),
        "a killed xlb leaves its VIPs"
    );

    let mut monitor = Child::spawn(&lan.lb, &["ip", "monitor", "address"]);
    // Make sure the monitor listens before the adoption starts.
    assert!(
        eventually(Duration::from_secs(5), || {
            lan.lb
                .run(&["ip", "addr", "add", "192.0.2.99/32", "dev", "lo"]);
            lan.lb
                .run(&["ip", "addr", "del", "192.0.2.99/32", "dev", "lo"]);
            monitor.wait_for("192.0.2.99", Duration::from_millis(200))
        }),
        "ip monitor printed nothing"
    );

    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        let report = sync_ok(&mut m, &desired(&[("198.51.100.10", &["default/a"])])).await;
        assert_eq!(report.kept, vec![ip("198.51.100.10")]);
        assert!(report.added.is_empty(), "{report:?}");
        assert_eq!(report.removed, vec![ip("198.51.100.11")]);
    });
    assert!(
        monitor.wait_for("Deleted", Duration::from_secs(5)),
        "the monitor should see the unwanted VIP go: {:?}",
        monitor.seen()
    );
    monitor.wait_for("never printed", Duration::from_millis(300));
    let flaps: Vec<&String> = monitor
        .seen()
        .iter()
        .filter(|line| line.contains("198.51.100.10/"))
        .collect();
    assert!(flaps.is_empty(), "the wanted VIP flapped: {flaps:?}");
    assert!(
        monitor
            .seen()
            .iter()
            .any(|l| l.starts_with("Deleted") && l.contains("198.51.100.11/24")),
        "{:?}",
        monitor.seen()
    );
    assert_eq!(
        cidrs(&lan.lb, LB_DEV),
        sorted(&["198.51.100.1/24", "198.51.100.10/24"])
    );
}

#[test]
fn gratuitous_arp_repoints_a_neighbour_on_add_and_on_adoption() {
    let lan = lan("garp");
    let lb_mac = mac_of(&lan.lb, LB_DEV);
    let vip = "198.51.100.10";
    let wanted = desired(&[(vip, &["default/a"])]);

    seed_wrong_neighbour(&lan, vip);
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        sync_ok(&mut m, &wanted).await;
    });
    assert!(
        eventually(Duration::from_secs(3), || peer_neighbour(&lan, vip)
            .as_deref()
            == Some(lb_mac.as_str())),
        "peer's neighbour entry for {vip} is {:?}, expected the LB's {lb_mac}",
        peer_neighbour(&lan, vip)
    );

    // A new process adopting the VIP announces it again.
    seed_wrong_neighbour(&lan, vip);
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        let report = sync_ok(&mut m, &wanted).await;
        assert_eq!(report.kept, vec![ip(vip)], "adopted, not re-added");
    });
    assert!(
        eventually(Duration::from_secs(3), || peer_neighbour(&lan, vip)
            .as_deref()
            == Some(lb_mac.as_str())),
        "after adoption the peer's entry for {vip} is {:?}, expected {lb_mac}",
        peer_neighbour(&lan, vip)
    );
}

#[test]
fn default_source_address_is_unchanged_after_vips_are_added() {
    let lan = lan("srcaddr");
    let main_before = lan.lb.run(&["ip", "route", "show", "table", "main"]);
    assert_eq!(route_src(&lan.lb, CLIENT), LB_ADDR);
    assert_eq!(route_src(&lan.lb, "198.51.100.77"), LB_ADDR);

    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        sync_ok(
            &mut m,
            &desired(&[
                ("198.51.100.2", &["default/a"]),
                ("198.51.100.10", &["default/b"]),
                ("198.51.100.11", &["default/c"]),
            ]),
        )
        .await;
    });
    let vips: Vec<Inet> = inet_addrs(&lan.lb, LB_DEV)
        .into_iter()
        .filter(|a| a.cidr != "198.51.100.1/24")
        .collect();
    assert_eq!(vips.len(), 3, "{vips:?}");
    assert!(
        vips.iter().all(|a| a.secondary),
        "VIPs must be secondary: {vips:?}"
    );
    assert_eq!(route_src(&lan.lb, CLIENT), LB_ADDR, "source toward clients");
    assert_eq!(
        route_src(&lan.lb, "198.51.100.77"),
        LB_ADDR,
        "source on the link"
    );
    assert_eq!(
        lan.lb.run(&["ip", "route", "show", "table", "main"]),
        main_before,
        "VIPs must not change the main routing table"
    );
}

/// Link on 198.51.100.0/25; VIPs on `lo` outside it, as on a routed fabric.
fn routed_lan(tag: &str) -> Lan {
    let lan = lan_with(
        tag,
        "198.51.100.1/25",
        "198.51.100.126/25",
        "198.51.100.126",
    );
    // The route the fabric would learn from the node's routing daemon.
    lan.peer
        .run(&["ip", "route", "add", "198.51.100.128/25", "via", LB_ADDR]);
    lan
}

#[test]
fn lo_mode_places_vips_as_32s_on_lo_without_arp() {
    let lan = routed_lan("lomode");
    let main_before = lan.lb.run(&["ip", "route", "show", "table", "main"]);
    seed_wrong_neighbour(&lan, "198.51.100.200");
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Lo).await;
        sync_ok(
            &mut m,
            &desired(&[
                ("198.51.100.200", &["default/a"]),
                ("198.51.100.201", &["default/b"]),
            ]),
        )
        .await;
        let host = m.host_network().await.unwrap_or_else(|err| panic!("{err}"));
        assert!(
            !host.vip_prefix_required,
            "lo mode takes VIPs outside the link prefixes"
        );
    });
    assert_eq!(
        cidrs(&lan.lb, "lo"),
        sorted(&["127.0.0.1/8", "198.51.100.200/32", "198.51.100.201/32"])
    );
    assert_eq!(cidrs(&lan.lb, LB_DEV), sorted(&["198.51.100.1/25"]));
    let local = lan.lb.run(&["ip", "route", "show", "table", "local"]);
    assert!(local.contains("local 198.51.100.200 dev lo"), "{local}");
    assert_eq!(
        lan.lb.run(&["ip", "route", "show", "table", "main"]),
        main_before
    );
    assert_eq!(route_src(&lan.lb, CLIENT), LB_ADDR, "source toward clients");
    // Gratuitous ARP is sent before sync returns; give the veth a moment anyway.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        peer_neighbour(&lan, "198.51.100.200").as_deref(),
        Some(WRONG_MAC),
        "lo mode sends no ARP"
    );
}

/// The IFA_PROTO mark is what adoption and cleanup go by (the adoption, foreign-address and
/// cleanup tests fail without it); the label is only for people reading `ip addr` with an
/// iproute2 older than 6.3, which does not print `proto`.
#[test]
fn xlb_addresses_are_labelled_for_people_reading_ip_addr() {
    let lan = lan("label");
    block_in(&lan.lb, || async {
        let mut m = manager(Announce::Link).await;
        sync_ok(&mut m, &desired(&[("198.51.100.10", &["default/a"])])).await;
    });
    let links = json(&lan.lb, &["ip", "-j", "addr", "show", "dev", LB_DEV]);
    let label_of = |local: &str| {
        links[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["local"] == local)
            .map(|a| a["label"].clone())
            .unwrap_or_else(|| panic!("{local} missing: {links}"))
    };
    assert_eq!(label_of("198.51.100.10"), format!("{LB_DEV}:xlb"));
    assert_eq!(
        label_of(LB_ADDR),
        LB_DEV,
        "the host's address keeps its label"
    );
}

/// `(device, preferred source, gateway)` of each routable address, as `ip -j route get` prints
/// them; the host's own addresses and unroutable ones are left out, as the data plane wants.
fn ip_route_get(ns: &Netns, ips: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, RouteSummary> {
    let mut found = BTreeMap::new();
    for &addr in ips {
        let out = ns.output(&["ip", "-j", "route", "get", &addr.to_string()]);
        if !out.status.success() {
            continue;
        }
        let routes: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("ip -j route get {addr}: {err}"));
        let route = &routes[0];
        if route["type"] == "local" {
            continue;
        }
        let field = |name: &str| route[name].as_str().map(ip);
        found.insert(
            addr,
            (
                route["dev"].as_str().unwrap_or("?").to_owned(),
                field("prefsrc"),
                field("gateway"),
            ),
        );
    }
    found
}

type RouteSummary = (String, Option<Ipv4Addr>, Option<Ipv4Addr>);

fn summary(routes: &BTreeMap<Ipv4Addr, Route>) -> BTreeMap<Ipv4Addr, RouteSummary> {
    routes
        .iter()
        .map(|(addr, r)| (*addr, (r.device.clone(), r.source, r.gateway)))
        .collect()
}

/// A neighbour on a device that does no ARP (here a veth with ARP off; also point-to-point
/// links) is in `NUD_NOARP` with the device's own address, which `bpf_fib_lookup` forwards to:
/// it is listed as a current neighbour, which `next_hops` makes a backend's next hop as any
/// other (rather than leaving every new flow to a FIB lookup).
#[test]
fn a_neighbour_on_a_device_without_arp_is_resolved() {
    let ns = Netns::new("noarp");
    ns.run(&[
        "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ns.run(&["ip", "link", "set", "d0", "arp", "off"]);
    ns.run(&["ip", "addr", "add", "10.77.0.1/24", "dev", "d0"]);
    ns.run(&["ip", "link", "set", "d1", "up"]);
    ns.run(&["ip", "link", "set", "d0", "up"]);
    let backend = ip("10.77.0.9");
    let (ifindex, neighbours) = ns.enter(|| {
        let ifindex = xlb::dataplane::devices::ifindex("d0").expect("d0's ifindex");
        let lookup = RouteLookup::open().unwrap_or_else(|err| panic!("netlink: {err}"));
        lookup
            .resolve(ifindex, backend)
            .unwrap_or_else(|err| panic!("resolve: {err}"));
        let neighbours = lookup
            .neighbours()
            .unwrap_or_else(|err| panic!("neighbours: {err}"));
        (ifindex, neighbours)
    });
    let shown = ns.run(&[
        "ip",
        "neigh",
        "show",
        "10.77.0.9",
        "dev",
        "d0",
        "nud",
        "all",
    ]);
    assert!(
        shown.contains("NOARP"),
        "the test's own reading of the entry: {shown:?}"
    );
    let mac = mac_of(&ns, "d0");
    let found = neighbours
        .get(&(ifindex, backend))
        .unwrap_or_else(|| panic!("{backend} on d0 not among the neighbours: {neighbours:?}"));
    let found_mac = found
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!((found_mac, found.stale), (mac, false));
}

/// Route lookups over netlink answer as `ip route get` does (device, preferred source,
/// gateway) and leave out the host's own and unroutable addresses; they work from a thread
/// without a runtime, on a current-thread runtime, and inside a multi-threaded runtime, where
/// the controller calls them (the wait runs in `block_in_place` there).
#[test]
fn route_lookups_agree_with_ip_route_get() {
    let lan = lan("route");
    veth(&lan.lb, "xlb1", &lan.peer, "peer1");
    lan.lb
        .run(&["ip", "addr", "add", "203.0.113.1/24", "dev", "xlb1"]);
    lan.lb
        .run(&["ip", "route", "add", "unreachable", "10.9.0.0/16"]);
    let ips = [
        ip("198.51.100.7"), // on the link's prefix
        ip("203.0.113.9"),  // on the second device's prefix
        ip(CLIENT),         // through the default gateway
        ip(LB_ADDR),        // the host's own: left out
        ip("10.9.9.9"),     // unreachable: left out
    ];
    let expected = BTreeMap::from([
        (ips[0], (LB_DEV.to_owned(), Some(ip(LB_ADDR)), None)),
        (ips[1], ("xlb1".to_owned(), Some(ip("203.0.113.1")), None)),
        (
            ips[2],
            (LB_DEV.to_owned(), Some(ip(LB_ADDR)), Some(ip(GATEWAY))),
        ),
    ]);
    assert_eq!(
        ip_route_get(&lan.lb, &ips),
        expected,
        "the test's own reading of `ip route get`"
    );

    let plain = lan.lb.enter(|| {
        let lookup = RouteLookup::open().unwrap_or_else(|err| panic!("netlink: {err}"));
        lookup
            .routes(&ips)
            .unwrap_or_else(|err| panic!("lookup: {err}"))
    });
    assert_eq!(summary(&plain), expected, "from a thread without a runtime");

    let current = block_in(&lan.lb, || async {
        let lookup = RouteLookup::open().unwrap_or_else(|err| panic!("netlink: {err}"));
        lookup
            .routes(&ips)
            .unwrap_or_else(|err| panic!("lookup: {err}"))
    });
    assert_eq!(summary(&current), expected, "on a current-thread runtime");

    let multi = lan.lb.enter(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(async {
                let lookup = RouteLookup::open().unwrap_or_else(|err| panic!("netlink: {err}"));
                // On a worker thread, as in the controller.
                tokio::spawn(async move { lookup.routes(&ips) })
                    .await
                    .expect("the lookup task")
                    .unwrap_or_else(|err| panic!("lookup: {err}"))
            })
    });
    assert_eq!(summary(&multi), expected, "inside a multi-threaded runtime");
}
