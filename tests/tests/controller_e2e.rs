//! The controller end to end (GitHub issue 5): the real `xlb` binary against the in-memory API
//! server, driven with the real `kubectl`, carrying real traffic between network namespaces.
//! Each test builds its own cluster (`xlb_tests::cluster`), API server, pin directory and
//! metrics listener (on its own lb namespace's loopback), so they run in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use xlb_tests::bpf::PinDir;
use xlb_tests::cluster::{Api, Cluster, Xlb, node_yaml, service_yaml, wait_for, xlb_binary};
use xlb_tests::servers::{LongLived, spawn_in};

/// How long xlb gets to react to a change.
const REACT: Duration = Duration::from_secs(20);

/// A cluster of `nodes` Ready worker nodes (NodePorts 30080 and 30081) known to the API
/// server, and xlb watching it. Fields drop in order: xlb first, the namespaces last.
struct Env {
    xlb: Xlb,
    api: Api,
    pins: PinDir,
    cluster: Cluster,
}

impl Env {
    fn new(tag: &str, nodes: usize, xlb_args: &[&str]) -> Env {
        let cluster = Cluster::new(tag, nodes, &[30080, 30081]);
        let api = Api::start(&cluster.lb);
        for n in 1..=nodes {
            api.apply(&node_yaml(n, true, true));
        }
        let pins = PinDir::new();
        let xlb = start_kube_xlb(&cluster, &api, &pins, xlb_args);
        Env {
            xlb,
            api,
            pins,
            cluster,
        }
    }

    /// Waits for the Service's ingress IP.
    fn ingress(&self, name: &str) -> Ipv4Addr {
        wait_for(&format!("Service {name} gets an ingress IP"), REACT, || {
            self.api
                .ingress_ip(name)
                .ok_or_else(|| "no ingress IP".to_owned())
        })
    }

    /// Waits until `ip` is (or is not) on the lb's eth0.
    fn wait_on_link(&self, ip: Ipv4Addr, present: bool) {
        wait_for(
            &format!("{ip} {} eth0", if present { "on" } else { "gone from" }),
            REACT,
            || {
                let addrs = self.cluster.link_addresses();
                if addrs.contains(&ip) == present {
                    Ok(())
                } else {
                    Err(format!("eth0 has {addrs:?}"))
                }
            },
        );
    }

    /// Waits until `count` connections to `addr` all succeed and answer from exactly `nodes`.
    fn wait_backends(&self, addr: SocketAddr, nodes: &[&str]) {
        let want: BTreeSet<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        wait_for(&format!("{addr} served by {want:?}"), REACT, || {
            let answers = self.cluster.tcp_names(addr, 4 * want.len() + 2);
            let got: Result<BTreeSet<String>, String> = answers.into_iter().collect();
            match got {
                Ok(got) if got == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }

    /// The data plane's frontends (`ip:port/proto`) with their backends, read with
    /// `xlb inspect`.
    fn frontends(&self) -> BTreeMap<String, Vec<String>> {
        frontends(&self.pins).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn start_kube_xlb(cluster: &Cluster, api: &Api, pins: &PinDir, args: &[&str]) -> Xlb {
    let kubeconfig = api.kubeconfig().display().to_string();
    let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
    all.extend_from_slice(args);
    cluster.start_xlb(&xlb_binary(), pins, &all)
}

/// `xlb inspect services` and `backends`: frontend → sorted backends, or why not (the data
/// plane is not pinned yet).
fn frontends(pins: &PinDir) -> Result<BTreeMap<String, Vec<String>>, String> {
    let inspect = |table: &str| {
        let out = Command::new(xlb_binary())
            .args(["inspect", table, "--pin-dir"])
            .arg(pins.path())
            .output()
            .expect("running xlb inspect");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let mut backends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in inspect("backends")?.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [id, _slot, backend] = words[..] {
            backends
                .entry(id.to_owned())
                .or_default()
                .push(backend.to_owned());
        }
    }
    let mut out = BTreeMap::new();
    for line in inspect("services")?.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [id, frontend, count, _rr] = words[..] {
            let count: usize = count.parse().expect("backend count");
            let mut list: Vec<String> = backends
                .get(id)
                .map(|b| b.iter().take(count).cloned().collect())
                .unwrap_or_default();
            list.sort();
            out.insert(frontend.to_owned(), list);
        }
    }
    Ok(out)
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Create → status, address, traffic; delete → address and data plane entry gone.
#[test]
fn create_serves_and_delete_withdraws() {
    let env = Env::new("ce-create", 3, &[]);
    env.api.apply(&service_yaml("web", 80, 30080));
    let ip = env.ingress("web");
    assert_eq!(
        ip,
        Ipv4Addr::new(198, 51, 100, 10),
        "first address of the pool"
    );
    env.wait_on_link(ip, true);
    env.wait_backends(sock(ip, 80), &["node1", "node2", "node3"]);
    let table = env.frontends();
    assert_eq!(
        table.get(&format!("{ip}:80/TCP")),
        Some(&vec![
            "203.0.113.11:30080".to_owned(),
            "203.0.113.12:30080".to_owned(),
            "203.0.113.13:30080".to_owned()
        ]),
        "{table:?}"
    );

    env.api.kubectl(&["delete", "svc", "web"]);
    env.wait_on_link(ip, false);
    wait_for("web leaves the data plane", REACT, || {
        let table = env.frontends();
        if table.is_empty() {
            Ok(())
        } else {
            Err(format!("{table:?}"))
        }
    });
}

/// `--update-external-ips` writes the address into `spec.externalIPs` as the original balancer
/// did, `--ip-mode proxy` sets the ingress `ipMode`; both go when the Service stops being
/// xlb's.
#[test]
fn external_ips_and_ip_mode_follow_the_flags() {
    let env = Env::new(
        "ce-extip",
        1,
        &["--update-external-ips", "--ip-mode", "proxy"],
    );
    env.api.apply(&service_yaml("web", 80, 30080));
    let ip = env.ingress("web");
    let fields = || {
        env.api.kubectl(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.externalIPs} {.status.loadBalancer.ingress[0].ipMode}",
        ])
    };
    wait_for("externalIPs and ipMode written", REACT, || {
        let got = fields();
        if got.trim() == format!("[\"{ip}\"] Proxy") {
            Ok(())
        } else {
            Err(got)
        }
    });
    env.wait_backends(sock(ip, 80), &["node1"]);

    env.api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  \
         type: ClusterIP\n  ports: [{name: p80, port: 80, protocol: TCP, targetPort: 8080}]\n",
    );
    wait_for("externalIPs and ingress withdrawn", REACT, || {
        let got = fields();
        if got.trim().is_empty() {
            Ok(())
        } else {
            Err(got)
        }
    });
}

/// A node that turns NotReady or loses the worker label stops getting new connections, and
/// comes back when it is fixed.
#[test]
fn backends_follow_node_readiness_and_labels() {
    let env = Env::new("ce-nodes", 3, &[]);
    env.api.apply(&service_yaml("web", 80, 30080));
    let vip = sock(env.ingress("web"), 80);
    env.wait_backends(vip, &["node1", "node2", "node3"]);

    env.api.kubectl(&[
        "patch",
        "node",
        "node3",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
    ]);
    env.wait_backends(vip, &["node1", "node2"]);

    env.api
        .kubectl(&["label", "node", "node2", "node-role.kubernetes.io/worker-"]);
    env.wait_backends(vip, &["node1"]);

    env.api
        .kubectl(&["label", "node", "node2", "node-role.kubernetes.io/worker="]);
    env.api.kubectl(&[
        "patch",
        "node",
        "node3",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    env.wait_backends(vip, &["node1", "node2", "node3"]);
}

/// Changing a Service's port, type or class removes what it had: the old data plane entry,
/// the VIP (when its last user leaves) and the status; other Services are untouched.
#[test]
fn port_type_and_class_changes_remove_old_entries() {
    let env = Env::new("ce-change", 2, &[]);
    env.api.apply(&service_yaml("a", 80, 30080));
    env.api.apply(&service_yaml("b", 80, 30081));
    let a = env.ingress("a");
    let b = env.ingress("b");
    assert_ne!(a, b);
    env.wait_backends(sock(a, 80), &["node1", "node2"]);

    // Port 80 → 8080: the old frontend goes, the new one serves.
    env.api.apply(&service_yaml("a", 8080, 30080));
    env.wait_backends(sock(a, 8080), &["node1", "node2"]);
    wait_for("a:80 leaves the data plane", REACT, || {
        let table = env.frontends();
        match (
            table.contains_key(&format!("{a}:80/TCP")),
            table.contains_key(&format!("{a}:8080/TCP")),
        ) {
            (false, true) => Ok(()),
            _ => Err(format!("{table:?}")),
        }
    });
    assert_eq!(
        env.api.ingress_ip("a"),
        Some(a),
        "same IP after a port change"
    );

    // type: ClusterIP: status cleared, VIP and frontend gone; b untouched.
    env.api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec:\n  \
         type: ClusterIP\n  ports: [{name: p8080, port: 8080, protocol: TCP, targetPort: 8080}]\n",
    );
    env.wait_on_link(a, false);
    wait_for("a's status is cleared", REACT, || {
        match env.api.ingress_ip("a") {
            None => Ok(()),
            Some(ip) => Err(format!("still {ip}")),
        }
    });
    let table = env.frontends();
    assert!(
        !table.keys().any(|f| f.starts_with(&format!("{a}:"))),
        "{table:?}"
    );
    assert!(table.contains_key(&format!("{b}:80/TCP")), "{table:?}");
    assert_eq!(env.api.ingress_ip("b"), Some(b));
    env.wait_on_link(b, true);

    // Back to LoadBalancer but with another class: still not xlb's.
    env.api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec:\n  \
         type: LoadBalancer\n  loadBalancerClass: example.com/other\n  \
         ports: [{name: p8080, port: 8080, protocol: TCP, targetPort: 8080, nodePort: 30080}]\n",
    );
    // Give xlb a change to look at (a new Service) and wait until it has acted on it, so a
    // wrongly served `a` would have shown by then.
    env.api.apply(&service_yaml("c", 81, 30090));
    let c = env.ingress("c");
    env.wait_on_link(c, true);
    assert_eq!(env.api.ingress_ip("a"), None, "another class is not xlb's");
    let table = env.frontends();
    assert!(
        !table.keys().any(|f| f.contains(":8080/")),
        "a with another class is not served: {table:?}"
    );
    env.wait_backends(sock(b, 80), &["node1", "node2"]);
}

/// SIGKILL and start again: the same IPs, and an established connection keeps working
/// throughout (the pinned data plane and its conntrack outlive the process).
#[test]
fn restart_keeps_ips_and_established_flows() {
    let mut env = Env::new("ce-restart", 2, &[]);
    env.api.apply(&service_yaml("web", 80, 30080));
    env.api.apply(&service_yaml("web2", 80, 30081));
    let web = env.ingress("web");
    let web2 = env.ingress("web2");
    env.wait_backends(sock(web, 80), &["node1", "node2"]);
    let mut conn = spawn_in(&env.cluster.client, move || {
        LongLived::connect(sock(web, 80))
    })
    .join()
    .expect("client")
    .expect("long-lived connection");
    let mut n = 0;
    let mut ping = |conn: &mut LongLived, when: &str| {
        n += 1;
        conn.ping(n)
            .unwrap_or_else(|e| panic!("ping {n} {when}: {e}"));
    };
    ping(&mut conn, "before the kill");

    env.xlb.kill();
    for _ in 0..5 {
        ping(&mut conn, "while xlb is down");
    }
    assert!(env.cluster.link_addresses().contains(&web));

    env.xlb = start_kube_xlb(&env.cluster, &env.api, &env.pins, &[]);
    let deadline = Instant::now() + REACT;
    while env.cluster.http_get("/readyz") != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "restarted xlb not ready within {REACT:?}"
        );
        ping(&mut conn, "while xlb starts");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..10 {
        ping(&mut conn, "after the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(env.api.ingress_ip("web"), Some(web));
    assert_eq!(env.api.ingress_ip("web2"), Some(web2));
    let addrs = env.cluster.link_addresses();
    assert!(addrs.contains(&web) && addrs.contains(&web2), "{addrs:?}");
    env.wait_backends(sock(web2, 80), &["node1", "node2"]);
    ping(&mut conn, "at the end");
    assert!(env.xlb.running(), "xlb exited");
}

/// The API server refuses everything: traffic keeps flowing, /readyz says 503, and xlb
/// catches up after the outage. Dropped watches are survived too.
#[test]
fn api_outage_keeps_traffic_and_readyz_reports_it() {
    let env = Env::new("ce-outage", 2, &[]);
    env.api.apply(&service_yaml("web", 80, 30080));
    let vip = sock(env.ingress("web"), 80);
    env.wait_backends(vip, &["node1", "node2"]);
    wait_for("ready", REACT, || match env.cluster.http_get("/readyz") {
        Ok(200) => Ok(()),
        other => Err(format!("{other:?}")),
    });

    env.api.faults().refuse();
    wait_for("/readyz turns 503 during the outage", REACT, || {
        match env.cluster.http_get("/readyz") {
            Ok(503) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(
        env.cluster.http_get("/healthz"),
        Ok(200),
        "alive though not ready"
    );
    for answer in env.cluster.tcp_names(vip, 10) {
        let name = answer.unwrap_or_else(|e| panic!("traffic during the outage: {e}"));
        assert!(name.starts_with("node"), "{name}");
    }

    env.api.faults().clear();
    wait_for("/readyz recovers", REACT, || {
        match env.cluster.http_get("/readyz") {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    env.api.apply(&service_yaml("after", 80, 30081));
    let after = env.ingress("after");
    env.wait_backends(sock(after, 80), &["node1", "node2"]);

    env.api.faults().drop_watches();
    env.api.kubectl(&["delete", "svc", "after"]);
    env.wait_on_link(after, false);
    env.wait_backends(vip, &["node1", "node2"]);
}

/// Whether a Warning Event was recorded for the Service `name`.
fn warning_for(api: &Api, name: &str) -> Result<String, String> {
    let selector = format!("involvedObject.name={name},type=Warning");
    let out = api.kubectl(&[
        "get",
        "events",
        "--field-selector",
        &selector,
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ]);
    if out.trim().is_empty() {
        Err(format!("no Warning Event for {name}"))
    } else {
        Ok(out)
    }
}

/// Malformed Services get a Warning Event and no IP; the others are unaffected.
#[test]
fn malformed_services_get_warnings_and_the_others_are_served() {
    let env = Env::new("ce-bad", 2, &[]);
    env.api.apply(&service_yaml("good", 80, 30080));
    let good = env.ingress("good");

    let with_ip = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
             type: LoadBalancer\n  loadBalancerIP: \"{ip}\"\n  ports: [{{port: 80, targetPort: 8080}}]\n"
        )
    };
    // The API server itself may refuse a bad loadBalancerIP; the annotation it cannot check.
    let bad_ip = env
        .api
        .kubectl_output(&["apply", "-f", "-"], &with_ip("bad-ip", "not-an-ip"));
    if !bad_ip.status.success() {
        env.api.apply(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad-ip\n  namespace: default\n  \
             annotations: {xlb.io/loadBalancerIPs: not-an-ip}\nspec:\n  type: LoadBalancer\n  \
             ports: [{port: 80, targetPort: 8080}]\n",
        );
    }
    env.api.apply(&with_ip("outside", "10.1.2.3"));
    let ports: String = (0..1000)
        .map(|i| format!("  - {{name: p{i}, port: {}, targetPort: 8080}}\n", 1000 + i))
        .collect();
    env.api.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: many-ports, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  ports:\n{ports}"
    ));
    // Duplicate ports never reach xlb: the API server refuses them (422).
    let dup = env.api.kubectl_output(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: dup, namespace: default}\nspec:\n  \
         type: LoadBalancer\n  ports: [{name: a, port: 80}, {name: b, port: 80}]\n",
    );
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert!(
        !dup.status.success() && stderr.contains("Duplicate value"),
        "duplicate ports must be refused by the API server: {stderr}"
    );

    for name in ["bad-ip", "outside", "many-ports"] {
        let warning = wait_for(&format!("Warning Event for {name}"), REACT, || {
            warning_for(&env.api, name)
        });
        eprintln!("{name}: {}", warning.trim());
        assert_eq!(env.api.ingress_ip(name), None, "{name} must get no IP");
    }
    assert_eq!(env.api.ingress_ip("good"), Some(good));
    env.wait_backends(sock(good, 80), &["node1", "node2"]);
    let table = env.frontends();
    assert_eq!(table.len(), 1, "only good is programmed: {table:?}");
}

/// The file source and the Kubernetes source reach the same data plane from the same
/// manifests; a Service with duplicate ports (which the API server refuses) is refused by
/// xlb from a file without disturbing the others.
#[test]
fn file_source_matches_kube_source() {
    let cluster = Cluster::new("ce-file", 3, &[30080, 30053]);
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/manifests");
    let dir = std::env::temp_dir().join(format!("{}-manifests", cluster.lb.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("manifest dir");
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = RemoveDir(dir.clone());
    std::fs::copy(manifests.join("nodes.yaml"), dir.join("nodes.yaml")).expect("copy nodes");
    // The demo's Services without their creationTimestamps, which the API server would
    // overwrite (allocation order follows creation time).
    let services = std::fs::read_to_string(manifests.join("services.yaml")).expect("services");
    let services: String = services
        .lines()
        .map(|line| match line.find(", creationTimestamp") {
            Some(at) => format!("{}}}\n", &line[..at]),
            None if line.contains("creationTimestamp:") => String::new(),
            None => format!("{line}\n"),
        })
        .collect();
    std::fs::write(dir.join("services.yaml"), services).expect("write services");
    std::fs::write(
        dir.join("zz-dup.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dup\n  namespace: default\n  \
         annotations: {xlb.io/loadBalancerIPs: 198.51.100.30}\nspec:\n  \
         type: LoadBalancer\n  ports:\n  - {name: a, port: 80, targetPort: 8080, nodePort: 30081}\n  \
         - {name: b, port: 80, targetPort: 8080, nodePort: 30082}\n",
    )
    .expect("write dup");
    // A field the API server would have filled in (the NodePort) missing.
    std::fs::write(
        dir.join("zz-missing.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: missing, namespace: default}\nspec:\n  \
         type: LoadBalancer\n  ports: [{name: a, port: 80, targetPort: 8080}]\n",
    )
    .expect("write missing");

    // From files.
    let file_table = {
        let pins = PinDir::new();
        let dir = dir.display().to_string();
        let mut xlb = cluster.start_xlb(&xlb_binary(), &pins, &["--manifests", &dir]);
        // dup is served on its first port 80 only (with a Warning); its IP is fixed so that
        // it does not change what the others get.
        // Frontends and backends are written one after the other: wait for both.
        let table = wait_for("file source programs web, dns and dup", REACT, || {
            let table = frontends(&pins)?;
            if table.len() == 3 && table.values().all(|backends| !backends.is_empty()) {
                Ok(table)
            } else {
                Err(format!("{table:?}"))
            }
        });
        // Visited by name, dns takes its 198.51.100.20 first and web shares it.
        let web = sock(Ipv4Addr::new(198, 51, 100, 20), 80);
        assert_eq!(
            cluster
                .tcp_names(web, 9)
                .into_iter()
                .collect::<Result<BTreeSet<_>, _>>(),
            Ok(["node1", "node2", "node3"].map(String::from).into()),
        );
        for name in ["default/dup", "default/missing"] {
            wait_for(&format!("a warning about {name}"), REACT, || {
                let log = xlb.log();
                if log.lines().any(|l| l.contains("WARN") && l.contains(name)) {
                    Ok(())
                } else {
                    Err("no warning yet".to_owned())
                }
            });
        }
        xlb.terminate();
        let mut table = table;
        assert_eq!(
            table.remove("198.51.100.30:80/TCP"),
            Some(vec![
                "203.0.113.11:30081".to_owned(),
                "203.0.113.12:30081".to_owned(),
                "203.0.113.13:30081".to_owned()
            ]),
            "dup's first port 80 is served"
        );
        table
    };

    // From the API server, after `kubectl apply -f` of the same directory.
    let api = Api::start(&cluster.lb);
    for file in ["nodes.yaml", "services.yaml"] {
        let path = dir.join(file).display().to_string();
        api.kubectl(&["apply", "-f", &path]);
    }
    let path = dir.join("zz-dup.yaml").display().to_string();
    let applied = api.kubectl_output(&["apply", "-f", &path], "");
    let stderr = String::from_utf8_lossy(&applied.stderr);
    assert!(
        !applied.status.success() && stderr.contains("Duplicate value"),
        "the API server refuses dup and only dup: {stderr}"
    );
    let pins = PinDir::new();
    let _xlb = start_kube_xlb(&cluster, &api, &pins, &[]);
    let kube_table = wait_for("kube source programs web and dns", REACT, || {
        let table = frontends(&pins)?;
        if table == file_table {
            Ok(table)
        } else {
            Err(format!("{table:?} != {file_table:?}"))
        }
    });
    assert_eq!(kube_table.len(), 2);
    assert_eq!(api.ingress_ip("web"), Some(Ipv4Addr::new(198, 51, 100, 20)));
    assert_eq!(api.ingress_ip("dns"), Some(Ipv4Addr::new(198, 51, 100, 20)));
}

/// `--tag-worker-nodes` labels every node that is neither a worker nor control plane.
#[test]
fn tag_worker_nodes_labels_plain_nodes() {
    let cluster = Cluster::new("ce-tag", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    api.apply(
        "apiVersion: v1\nkind: Node\nmetadata: {name: plain}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: cp\n  \
         labels: {node-role.kubernetes.io/control-plane: \"\"}\n",
    );
    let pins = PinDir::new();
    let _xlb = start_kube_xlb(&cluster, &api, &pins, &["--tag-worker-nodes"]);
    let labelled = |node: &str| {
        api.kubectl(&["get", "node", node, "-o", "jsonpath={.metadata.labels}"])
            .contains("node-role.kubernetes.io/worker")
    };
    wait_for("plain is labelled a worker", REACT, || {
        labelled("plain")
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    });
    api.apply(&node_yaml(1, true, false));
    wait_for("a new node is labelled a worker", REACT, || {
        labelled("node1")
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    });
    assert!(!labelled("cp"), "control-plane nodes are left alone");
    // And node1 becomes a backend.
    api.apply(&service_yaml("web", 80, 30080));
    let ip = wait_for("web gets an IP", REACT, || {
        api.ingress_ip("web").ok_or_else(|| "none".to_owned())
    });
    wait_for("node1 serves web", REACT, || cluster.tcp_name(sock(ip, 80)));
}

/// An EndpointSlice manifest for Service `web`: `ready` says, per node address, whether the
/// endpoint is ready. Port `p80` maps to 30080, where the nodes' backends listen.
fn slice_yaml(ready: &[(usize, bool)]) -> String {
    let endpoints: String = ready
        .iter()
        .map(|(n, ready)| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {ready}}}\n",
                xlb_tests::cluster::node_ip(*n)
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
         ports: [{{name: p80, port: 30080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

/// In cluster (`--kubernetes`), the backends are the Service's ready endpoints: scaling the
/// EndpointSlice up and down, or an endpoint turning not ready, is followed.
#[test]
fn backends_follow_endpoint_slices_in_cluster() {
    let env = Env::new("ce-slices", 3, &["--kubernetes"]);
    env.api.apply(&slice_yaml(&[(1, true)]));
    env.api.apply(&service_yaml("web", 80, 30080));
    let vip = sock(env.ingress("web"), 80);
    env.wait_backends(vip, &["node1"]);
    env.api
        .apply(&slice_yaml(&[(1, true), (2, true), (3, true)]));
    env.wait_backends(vip, &["node1", "node2", "node3"]);
    env.api
        .apply(&slice_yaml(&[(1, true), (2, false), (3, true)]));
    env.wait_backends(vip, &["node1", "node3"]);
    env.api.apply(&slice_yaml(&[(3, true)]));
    env.wait_backends(vip, &["node3"]);
}
