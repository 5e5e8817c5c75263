//! Several LB nodes (GitHub issue 13): three real `xlb` instances, one in-memory API server,
//! in network namespaces (`xlb_tests::lb_group`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use xlb_tests::lb_group::Group;
use xlb_tests::servers::{LongLived, spawn_in};

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
    // `xlb inspect vips` on each node lists exactly the VIPs it answers for.
    for (index, lb) in group.lbs.iter().enumerate() {
        let binary = xlb_tests::cluster::xlb_binary();
        let listed = lb.run(&[binary.to_str().expect("utf-8 path"), "inspect", "vips"]);
        for (vip, owner) in &owners {
            assert_eq!(
                listed.contains(&format!("{vip}/24")),
                *owner == index,
                "lb{}: {listed}",
                index + 1
            );
        }
    }
    let spread: BTreeSet<usize> = owners.values().copied().collect();
    assert!(spread.len() >= 2, "6 VIPs all on one node: {owners:?}");
    // Every status and Event write came from one instance.
    let writers: BTreeSet<String> = group
        .api
        .faults()
        .requests()
        .into_iter()
        .filter(|request| {
            (request.method == "PATCH" && request.uri.contains("/status"))
                || (request.method != "GET" && request.uri.contains("/events"))
        })
        .filter_map(|request| request.user_agent)
        .collect();
    assert_eq!(writers.len(), 1, "status and Events written by {writers:?}");
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

    // The writer goes: another takes the writer Lease, moves no IP, and serves new Services.
    let holder = group.api.kubectl(&[
        "get",
        "lease",
        "xlb",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    let writer: usize = holder
        .trim()
        .strip_prefix("lb")
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n - 1)
        .unwrap_or_else(|| panic!("writer Lease held by {holder:?}"));
    let status = group.xlb(writer).stop(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let ips_before: Vec<_> = (0..6)
        .map(|n| group.api.ingress_ip(&format!("s{n}")))
        .collect();
    let extra = group.services_from(6, 1)[0];
    let ips_after: Vec<_> = (0..6)
        .map(|n| group.api.ingress_ip(&format!("s{n}")))
        .collect();
    assert_eq!(ips_before, ips_after, "a new writer moved an IP");
    group.single_answer(extra, Some(writer));
    group.start(writer);
    for vip in &vips {
        group.single_answer(*vip, None);
    }
    let mut owners = BTreeMap::new();
    for vip in &vips {
        owners.insert(*vip, group.single_answer(*vip, None).0);
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

/// `kubectl apply -k deploy/` installs everything: the kustomization builds, with the RBAC
/// for Leases and the downward-API variables the LB nodes coordinate with.
#[test]
fn the_deploy_kustomization_holds_everything() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", deploy])
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "kind: ServiceAccount",
        "kind: ClusterRole\n",
        "kind: ClusterRoleBinding",
        "kind: Role\n",
        "kind: RoleBinding",
        "kind: ConfigMap",
        "kind: DaemonSet",
        "- leases",
        "name: POD_NAMESPACE",
        "name: NODE_NAME",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}
