//! xlb under faults (GitHub issue 11): SIGTERM racing watch events, API outages, running out
//! of file descriptors, a metrics address already taken, a Service without endpoints. The real
//! `xlb` binary against the in-memory API server, in network namespaces.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kube_fake::RequestRecord;
use xlb_tests::bpf::PinDir;
use xlb_tests::cluster::{
    Api, Cluster, METRICS_ADDR, Xlb, node_yaml, service_yaml, wait_for, xlb_binary,
};
use xlb_tests::rbac::{granted_by_rbac, verb_and_resource};
use xlb_tests::servers::spawn_in;

/// How long xlb gets to react to a change.
const REACT: Duration = Duration::from_secs(20);

/// xlb's own bound on a shutdown (`controller::SHUTDOWN_HARD_LIMIT`) plus slack for a busy
/// machine.
const EXIT_LIMIT: Duration = Duration::from_secs(20);

fn start(cluster: &Cluster, api: &Api, pins: &PinDir, args: &[&str]) -> Xlb {
    let kubeconfig = api.kubeconfig().display().to_string();
    let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
    all.extend_from_slice(args);
    cluster.start_xlb(&xlb_binary(), pins, &all)
}

/// Creates the Services `svc-0..count`, each on its own port and NodePort (no backend serves
/// those NodePorts: these tests look at the control plane); returns their names.
fn services(api: &Api, count: usize) -> Vec<String> {
    let mut yaml = String::new();
    for n in 0..count {
        yaml.push_str(&service_yaml(
            &format!("svc-{n}"),
            1000 + n as u16,
            30100 + n as u16,
        ));
        yaml.push_str("\n---\n");
    }
    api.apply(&yaml);
    (0..count).map(|n| format!("svc-{n}")).collect()
}

fn with_ingress(api: &Api, names: &[String]) -> usize {
    names
        .iter()
        .filter(|name| api.ingress_ip(name).is_some())
        .count()
}

/// SIGTERM while clearing statuses makes watch events xlb's own source must publish: 50 runs,
/// with API latency so the status writes and the watch events overlap. Every run must exit in
/// time, successfully, with every status cleared. Every request xlb made must be one the
/// ClusterRole in `deploy/` grants, and name xlb in its User-Agent.
#[test]
fn sigterm_always_exits_and_clears_every_status() {
    let cluster = Cluster::new("rs-term", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    api.apply(&node_yaml(1, true, true));
    let names = services(&api, 12);
    api.faults().set_latency(Duration::from_millis(3));
    let pins = PinDir::new();
    for run in 1..=50 {
        let mut xlb = start(&cluster, &api, &pins, &["--dataplane", "proxy"]);
        wait_for(
            &format!("run {run}: every Service served"),
            REACT,
            || match with_ingress(&api, &names) {
                n if n == names.len() => Ok(()),
                n => Err(format!("{n} of {} have an ingress IP", names.len())),
            },
        );
        let started = Instant::now();
        let status = xlb.stop(EXIT_LIMIT).unwrap_or_else(|| {
            panic!(
                "run {run}: xlb did not exit within {EXIT_LIMIT:?} of SIGTERM\n{}",
                xlb.log()
            )
        });
        assert!(
            status.success(),
            "run {run}: exit {status} after {:?}\n{}",
            started.elapsed(),
            xlb.log()
        );
        let left = with_ingress(&api, &names);
        assert_eq!(left, 0, "run {run}: statuses left set\n{}", xlb.log());
        let log = xlb.log();
        assert!(
            !log.contains("Kubernetes API lost"),
            "run {run}: a clean exit must not report an API failure\n{log}"
        );
    }
    let granted = granted_by_rbac();
    let used: std::collections::BTreeSet<(String, String)> = api
        .faults()
        .requests()
        .iter()
        .filter(|request| {
            request
                .user_agent
                .as_deref()
                .is_some_and(|agent| agent.starts_with("xlb/"))
        })
        .map(verb_and_resource)
        .collect();
    assert!(
        used.contains(&("patch".to_owned(), "services/status".to_owned())),
        "{used:?}"
    );
    for pair in &used {
        assert!(
            granted.contains(pair),
            "xlb used {pair:?}, which deploy/rbac.yaml does not grant ({granted:?})"
        );
    }
}

/// A second signal during a shutdown that waits on an unanswering API server ends xlb at
/// once; a shutdown nobody interrupts still ends within its bound.
#[test]
fn a_second_signal_exits_at_once_and_a_stuck_shutdown_is_bounded() {
    let cluster = Cluster::new("rs-sig2", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    api.apply(&node_yaml(1, true, true));
    let names = services(&api, 3);
    let pins = PinDir::new();
    for second_signal in [true, false] {
        let mut xlb = start(&cluster, &api, &pins, &["--dataplane", "proxy"]);
        wait_for("every Service served", REACT, || {
            match with_ingress(&api, &names) {
                n if n == names.len() => Ok(()),
                n => Err(format!("{n} served")),
            }
        });
        // Every answer now takes a minute: clearing the statuses cannot finish.
        api.faults().set_latency(Duration::from_secs(60));
        let signalled = Instant::now();
        let status = if second_signal {
            assert!(
                xlb.stop(Duration::from_secs(1)).is_none(),
                "still cleaning up"
            );
            xlb.stop(Duration::from_secs(3))
        } else {
            xlb.stop(EXIT_LIMIT)
        };
        let elapsed = signalled.elapsed();
        api.faults().clear();
        let status = status.unwrap_or_else(|| {
            panic!(
                "xlb still running {elapsed:?} after SIGTERM (second: {second_signal})\n{}",
                xlb.log()
            )
        });
        println!("second signal {second_signal}: exit {status} after {elapsed:?}");
        if !second_signal {
            assert!(
                xlb.log().contains("gave up clearing Service statuses"),
                "{}",
                xlb.log()
            );
        }
        // Statuses were left set: the next run adopts them.
    }
}

/// xlb's requests during `window`.
fn xlb_requests(api: &Api, from: Instant, to: Instant) -> Vec<RequestRecord> {
    api.faults()
        .requests()
        .into_iter()
        .filter(|request| request.at >= from && request.at <= to)
        .filter(|request| {
            request
                .user_agent
                .as_deref()
                .is_some_and(|agent| agent.starts_with("xlb/"))
        })
        .collect()
}

/// The most requests in any one-second window.
fn busiest_second(requests: &[RequestRecord]) -> usize {
    requests
        .iter()
        .map(|first| {
            requests
                .iter()
                .filter(|other| {
                    other.at >= first.at && other.at < first.at + Duration::from_secs(1)
                })
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Outages of 10 s and 60 s: the requests xlb sends meanwhile are few and never a burst, the
/// log says once that the API is lost and once that it is back, `/readyz` follows, and a
/// Service created 1 s after the API returns is served within 5 s (the figures are printed).
#[test]
fn api_outages_are_calm_and_short() {
    let cluster = Cluster::new("rs-out", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    api.apply(&node_yaml(1, true, true));
    services(&api, 1);
    let pins = PinDir::new();
    let xlb = start(&cluster, &api, &pins, &["--dataplane", "proxy"]);
    wait_for("svc-0 served", REACT, || {
        api.ingress_ip("svc-0").ok_or_else(|| "no IP".to_owned())
    });
    wait_for("ready", REACT, || match cluster.http_get("/readyz") {
        Ok(200) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    for (round, outage) in [Duration::from_secs(10), Duration::from_secs(60)]
        .into_iter()
        .enumerate()
    {
        let began = Instant::now();
        api.faults().refuse();
        wait_for(
            "/readyz turns 503 during the outage",
            REACT,
            || match cluster.http_get("/readyz") {
                Ok(503) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        std::thread::sleep(outage.saturating_sub(began.elapsed()));
        api.faults().clear();
        let returned = Instant::now();
        let during = xlb_requests(&api, began, returned);
        std::thread::sleep(Duration::from_secs(1));
        let name = format!("after-{round}");
        api.apply(&service_yaml(
            &name,
            2000 + round as u16,
            30090 + round as u16,
        ));
        let changed = Instant::now();
        wait_for(&format!("{name} served after the outage"), REACT, || {
            api.ingress_ip(&name).ok_or_else(|| "no IP".to_owned())
        });
        let applied = changed.elapsed();
        wait_for("/readyz recovers", REACT, || {
            match cluster.http_get("/readyz") {
                Ok(200) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        let seconds = outage.as_secs_f64();
        let busiest = busiest_second(&during);
        println!(
            "outage {seconds:.0} s: {} requests from xlb ({:.2}/s), at most {busiest} in one second; change applied {applied:?} after it was made",
            during.len(),
            during.len() as f64 / seconds
        );
        assert!(
            busiest <= 15,
            "a burst of {busiest} requests in one second during the outage"
        );
        assert!(
            (during.len() as f64) <= 3.0 * seconds + 15.0,
            "{} requests in a {seconds:.0} s outage",
            during.len()
        );
        // The target is 5 s; the bound leaves room for a busy machine and still fails the
        // 27-58 s the old backoff took.
        assert!(
            applied < Duration::from_secs(12),
            "the change took {applied:?} to apply"
        );
    }
    let log = xlb.log();
    assert_eq!(
        log.matches("Kubernetes API lost").count(),
        2,
        "one WARN per outage:\n{log}"
    );
    assert_eq!(
        log.matches("Kubernetes API answers again").count(),
        2,
        "one INFO per return:\n{log}"
    );
    assert!(
        !log.contains("ERROR"),
        "no ERROR line for an outage xlb rides out:\n{log}"
    );
}

/// With a low open-file limit, frontends that cannot listen are counted and reported once;
/// the probes keep working (or come back) and every frontend listens once descriptors free up.
#[test]
fn running_out_of_descriptors_degrades_and_recovers() {
    let cluster = Cluster::new("rs-fd", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    api.apply(&node_yaml(1, true, true));
    let pins = PinDir::new();
    let kubeconfig = api.kubeconfig().display().to_string();
    let xlb = Xlb::start_wrapped(
        &cluster.lb,
        &["prlimit", "--nofile=160:160", "--"],
        &xlb_binary(),
        &pins,
        &["--kubeconfig", &kubeconfig, "--dataplane", "proxy"],
    );
    wait_for("ready", REACT, || match cluster.http_get("/readyz") {
        Ok(200) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let names = services(&api, 120);
    let not_listening = |body: &str| -> Option<u64> {
        body.lines()
            .find_map(|line| line.strip_prefix("xlb_proxy_frontends_not_listening "))
            .and_then(|value| value.trim().parse().ok())
    };
    // While descriptors are short, the listener may itself fail to accept: it must come back.
    let short = wait_for(
        "frontends refused for want of descriptors",
        REACT,
        || match cluster.http_body("/metrics") {
            Ok((200, body)) => match not_listening(&body) {
                Some(n) if n > 0 => Ok(body),
                other => Err(format!("not listening: {other:?}")),
            },
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        short.contains("xlb_proxy_listen_failures_total{reason=\"descriptors\"}"),
        "{short}"
    );
    let yaml_names: Vec<&str> = names[20..].iter().map(String::as_str).collect();
    let mut delete = vec!["delete", "svc"];
    delete.extend(yaml_names);
    api.kubectl(&delete);
    wait_for("every frontend listens again", REACT, || {
        match cluster.http_body("/metrics") {
            Ok((200, body)) if not_listening(&body) == Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(cluster.http_get("/healthz"), Ok(200));
    let log = xlb.log();
    assert!(
        log.contains("raised the open-file limit") || log.contains("open-file limit"),
        "xlb says what its limit is:\n{log}"
    );
    let reports = log.matches("out of file descriptors").count();
    assert!(
        (1..=20).contains(&reports),
        "{reports} lines about descriptors: one per change, not one per frontend or retry\n{log}"
    );
}

/// A metrics address in use stops xlb at start, saying so.
#[test]
fn a_metrics_address_in_use_stops_xlb_at_start() {
    let cluster = Cluster::new("rs-busy", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    let holder = cluster
        .lb
        .enter(|| std::net::TcpListener::bind(METRICS_ADDR).expect("hold the metrics address"));
    let pins = PinDir::new();
    let mut xlb = start(&cluster, &api, &pins, &["--dataplane", "proxy"]);
    wait_for("xlb exits", REACT, || {
        if xlb.running() {
            Err("still running".to_owned())
        } else {
            Ok(())
        }
    });
    let log = xlb.log();
    assert!(
        log.contains(METRICS_ADDR) && log.contains("another program"),
        "the message names the address and the cause:\n{log}"
    );
    drop(holder);
}

/// A Service whose nodes are all unready gets an address, refuses connections (as
/// kube-proxy does) and a Warning Event saying it has no endpoints; `/metrics` counts the
/// refused SYNs in the XDP program as they happen.
#[test]
fn a_service_without_endpoints_refuses_and_is_warned_about() {
    let cluster = Cluster::new("rs-noep", 1, &[30080]);
    let api = Api::start(&cluster.lb);
    api.apply(&node_yaml(1, false, true));
    api.apply(&service_yaml("lonely", 80, 30080));
    let pins = PinDir::new();
    let _xlb = start(&cluster, &api, &pins, &[]);
    let ip = wait_for("lonely gets an address", REACT, || {
        api.ingress_ip("lonely").ok_or_else(|| "no IP".to_owned())
    });
    wait_for("a NoEndpoints Warning", REACT, || {
        let out = api.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=lonely,type=Warning",
            "-o",
            "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
        ]);
        if out.contains("NoEndpoints") {
            Ok(())
        } else {
            Err(out)
        }
    });
    let addr = SocketAddr::from((ip, 80));
    wait_for("connections are refused", REACT, || {
        let result = spawn_in(&cluster.client, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ())
        })
        .join()
        .expect("client thread");
        match result {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The XDP program passed that SYN to the kernel (no backend); `/metrics` reads the
    // per-CPU counters when scraped, so it shows at once, with no reconcile in between.
    let (_, metrics) = cluster.http_body("/metrics").expect("/metrics");
    let no_backend = metrics
        .lines()
        .find_map(|line| line.strip_prefix("xlb_dataplane_packets_total{counter=\"no_backend\"} "))
        .and_then(|value| value.trim().parse::<u64>().ok());
    assert!(
        no_backend.is_some_and(|count| count >= 1),
        "no_backend counter: {no_backend:?}\n{metrics}"
    );
    // `xlb inspect … | head`: the reader goes away; xlb ends quietly and successfully.
    let mut inspect = std::process::Command::new(xlb_binary())
        .args(["inspect", "stats", "--pin-dir"])
        .arg(pins.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("xlb inspect");
    drop(inspect.stdout.take());
    let out = inspect.wait_with_output().expect("xlb inspect ends");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "inspect into a closed pipe: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
