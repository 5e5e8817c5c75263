//! `cargo xtask demo`: builds a small cluster of network namespaces from the manifests in
//! `demo/manifests`, runs the real `xlb` on them and sends real traffic through it.
//!
//! `xlb_demo XLB_BINARY MANIFEST_DIR`. Topology (`xlb_tests::cluster`):
//! client ns (192.0.2.1) — lb ns (eth0: 192.0.2.254/24 and 198.51.100.1/24; br0: 203.0.113.1/24)
//! — node1..3 ns (203.0.113.11-13), each serving TCP 30080 and UDP 30053 with its name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use xlb_tests::bpf::PinDir;
use xlb_tests::cluster::Cluster;

const WEB_VIP: &str = "198.51.100.10:80";
const DNS_VIP: &str = "198.51.100.20:53";
const CONNECTIONS: usize = 30;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, xlb, manifests] = &args[..] else {
        eprintln!("usage: xlb_demo XLB_BINARY MANIFEST_DIR");
        std::process::exit(2);
    };
    // Everything the demo built is dropped (namespaces, pins, processes) before exiting.
    let ok = demo(xlb, manifests);
    std::process::exit(if ok { 0 } else { 1 });
}

/// Runs the demo; whether the traffic reached all three backends.
fn demo(xlb: &str, manifests: &str) -> bool {
    println!("== building the cluster: client, lb and three node namespaces");
    let cluster = Cluster::new("demo", 3, &[30080, 30053]);

    println!("== starting xlb on the lb namespace, reading {manifests}");
    let pins = PinDir::new();
    let pin_dir = pins.path().display().to_string();
    let mut xlb_process = cluster.start_xlb(Path::new(xlb), &pins, &["--manifests", manifests]);

    let web: SocketAddr = WEB_VIP.parse().expect("address");
    let dns: SocketAddr = DNS_VIP.parse().expect("address");
    let started = Instant::now();
    let first = loop {
        match cluster.tcp_name(web) {
            Ok(name) => break name,
            Err(error) if started.elapsed() > Duration::from_secs(20) => {
                eprintln!("xlb did not serve {WEB_VIP} within 20 s: {error}");
                eprintln!("{}", xlb_process.log());
                return false;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    println!(
        "== {WEB_VIP} answered after {:.1}s (first backend: {first})",
        started.elapsed().as_secs_f64()
    );

    let tcp = cluster.tcp_names(web, CONNECTIONS);
    let udp = cluster.udp_names(dns, 6);
    let spread = |answers: Vec<Result<String, String>>| {
        let mut by_backend = BTreeMap::<String, usize>::new();
        for answer in answers {
            *by_backend
                .entry(answer.unwrap_or_else(|e| format!("error: {e}")))
                .or_default() += 1;
        }
        by_backend
    };
    println!("== {CONNECTIONS} TCP connections to web at {WEB_VIP}, by backend:");
    let tcp = spread(tcp);
    for (backend, count) in &tcp {
        println!("   {backend:<10} {count}");
    }
    println!("== 6 UDP queries to dns at {DNS_VIP}, by backend:");
    let udp = spread(udp);
    for (backend, count) in &udp {
        println!("   {backend:<10} {count}");
    }
    for table in ["services", "next-hops", "stats"] {
        println!("== xlb inspect {table}");
        let inspect = Command::new(xlb)
            .args(["inspect", table, "--pin-dir", &pin_dir])
            .output()
            .expect("running xlb inspect");
        if inspect.status.success() {
            print!("{}", String::from_utf8_lossy(&inspect.stdout));
        } else {
            // No pinned maps: xlb runs without XDP (`--dataplane proxy`, or XDP failed).
            let stderr = String::from_utf8_lossy(&inspect.stderr);
            println!(
                "   {}",
                stderr.lines().next().unwrap_or("xlb inspect failed")
            );
        }
    }
    println!("== VIPs on the lb's eth0");
    print!(
        "{}",
        cluster
            .lb
            .run(&["ip", "-br", "addr", "show", "dev", "eth0"])
    );

    let ok = tcp.keys().all(|name| name.starts_with("node"))
        && tcp.len() == 3
        && udp.keys().all(|name| name.starts_with("node"));
    // Stop xlb with SIGTERM so it removes its addresses, then everything else is dropped.
    xlb_process.terminate();
    if ok {
        println!("== done: traffic spread over node1, node2 and node3 through xlb");
    } else {
        eprintln!("== the demo's traffic did not reach all three backends");
    }
    ok
}
