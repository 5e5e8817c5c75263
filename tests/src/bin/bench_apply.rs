//! `cargo xtask bench`: the time from `kubectl apply` of a Service to the first successful TCP
//! connection through its IP, over 50 Services, with the real xlb (release build beside this
//! binary) watching the in-memory API server, on the namespaces cluster of the tests.
//!
//! Each Service asks for its IP (`xlb.io/loadBalancerIPs`) so the client can start knocking
//! before the status is written; the client retries a connection every 5 ms. The clock starts
//! just before `kubectl` is spawned, so the figures include kubectl's own start-up, reported
//! beside them. Target: p99 < 200 ms.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use xlb_tests::bpf::PinDir;
use xlb_tests::cluster::{Api, Cluster, node_yaml, wait_for, xlb_binary};
use xlb_tests::servers::spawn_in;

const SERVICES: usize = 50;
const FIRST_NODE_PORT: u16 = 30100;
/// How long one Service may take before the bench gives up on it.
const GIVE_UP: Duration = Duration::from_secs(10);
/// How often the client knocks on a Service's IP: the resolution of the figures.
const KNOCK_EVERY: Duration = Duration::from_millis(5);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q` quantile of sorted `v`.
fn p(v: &[Duration], q: f64) -> Duration {
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// POSTs a Service to the API server at `addr`; the HTTP status.
fn post(addr: SocketAddr, body: &str) -> u16 {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let request = format!(
        "POST /api/v1/namespaces/default/services HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn main() {
    xlb_tests::netns::require_root("the apply-to-traffic benchmark");
    let node_ports: Vec<u16> = (0..2 * SERVICES as u16)
        .map(|i| FIRST_NODE_PORT + i)
        .collect();
    let cluster = Cluster::new("bench-apply", 2, &node_ports);
    let api = Api::start(&cluster.lb);
    for n in 1..=2 {
        api.apply(&node_yaml(n, true, true));
    }
    let pins = PinDir::new();
    let kubeconfig = api.kubeconfig().display().to_string();
    let xlb = cluster.start_xlb(&xlb_binary(), &pins, &["--kubeconfig", &kubeconfig]);
    wait_for("xlb ready", Duration::from_secs(20), || {
        match cluster.http_get("/readyz") {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let series = |name: &str, mut v: Vec<Duration>| {
        v.sort();
        println!(
            "  {name:<44} median {:7.1} ms   p99 {:7.1} ms",
            ms(p(&v, 0.5)),
            ms(p(&v, 0.99))
        );
    };
    // The same without kubectl: one HTTP POST to the API server creates the Service, so what
    // is measured is xlb's own reaction (watch event → reconcile → VIP, data plane, status).
    let api_url = api.addr();
    let mut direct = Vec::new();
    for i in 0..SERVICES {
        let ip = Ipv4Addr::new(198, 51, 100, 100 + i as u8);
        let vip = SocketAddr::from((ip, 80));
        let knock = spawn_in(&cluster.client, move || first_connection(vip));
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"d{i}","namespace":"default","annotations":{{"xlb.io/loadBalancerIPs":"{ip}"}}}},"spec":{{"type":"LoadBalancer","ports":[{{"name":"http","port":80,"protocol":"TCP","targetPort":8080,"nodePort":{}}}]}}}}"#,
            FIRST_NODE_PORT + SERVICES as u16 + i as u16
        );
        let start = Instant::now();
        let status = spawn_in(&cluster.lb, move || post(api_url, &body))
            .join()
            .expect("post thread");
        assert_eq!(status, 201, "creating d{i}");
        match knock.join().expect("client thread") {
            Some(at) => direct.push(at.saturating_duration_since(start)),
            None => panic!("Service d{i} ({vip}) not reachable within {GIVE_UP:?}"),
        }
    }

    let mut total = Vec::new();
    let mut kubectl = Vec::new();
    let mut after = Vec::new();
    for i in 0..SERVICES {
        let ip = Ipv4Addr::new(198, 51, 100, 10 + i as u8);
        let vip = SocketAddr::from((ip, 80));
        let knock = spawn_in(&cluster.client, move || first_connection(vip));
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\n  namespace: default\n  \
             annotations: {{xlb.io/loadBalancerIPs: \"{ip}\"}}\nspec:\n  type: LoadBalancer\n  \
             ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: {}}}]\n",
            FIRST_NODE_PORT + i as u16
        );
        let start = Instant::now();
        api.apply(&yaml);
        let applied = Instant::now();
        kubectl.push(applied - start);
        match knock.join().expect("client thread") {
            Some(at) => {
                total.push(at.saturating_duration_since(start));
                after.push(at.saturating_duration_since(applied));
            }
            None => {
                eprintln!("{}", xlb.log());
                panic!("Service s{i} ({vip}) not reachable within {GIVE_UP:?}");
            }
        }
    }
    total.sort();
    kubectl.sort();
    after.sort();
    println!("API create (one HTTP POST) → first TCP connection, {SERVICES} Services:");
    series("xlb's reaction", direct);
    println!("kubectl apply → first TCP connection through the Service's IP, {SERVICES} Services:");
    println!(
        "  median {:7.1} ms   p99 {:7.1} ms   max {:7.1} ms",
        ms(p(&total, 0.5)),
        ms(p(&total, 0.99)),
        ms(total[total.len() - 1])
    );
    println!(
        "  of which kubectl itself (start-up to exit): median {:6.1} ms, p99 {:6.1} ms",
        ms(p(&kubectl, 0.5)),
        ms(p(&kubectl, 0.99))
    );
    println!(
        "  after kubectl exited (the Service exists by then): median {:6.1} ms, p99 {:6.1} ms",
        ms(p(&after, 0.5)),
        ms(p(&after, 0.99))
    );
    let met = p(&total, 0.99) < Duration::from_millis(200);
    println!(
        "  target p99 < 200 ms: {}",
        if met { "met" } else { "missed" }
    );
}

/// Knocks on `vip` every [`KNOCK_EVERY`] until a backend answers with its name; when that
/// happened.
fn first_connection(vip: SocketAddr) -> Option<Instant> {
    let deadline = Instant::now() + GIVE_UP;
    while Instant::now() < deadline {
        let attempt = Instant::now();
        if let Ok(stream) = TcpStream::connect_timeout(&vip, KNOCK_EVERY) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("node") {
                return Some(Instant::now());
            }
        }
        if let Some(rest) = KNOCK_EVERY.checked_sub(attempt.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    None
}
