//! End to end through network namespaces (TESTING.md "Measuring"): Gb/s (iperf3, one TCP
//! stream, 3 s) with the machine's busy CPU time per GB moved (what the path costs even when
//! one stream is bound by its ends), and connections/s (a 2 s loop of connect, read the backend's one-line greeting,
//! close; Rust std sockets, one connection at a time) from the client namespace, side by side:
//!
//! - direct: to a backend's address, routed by the lb namespace's kernel (no LB);
//! - xlb XDP generic, xlb XDP native and xlb TC (`xlb_loader`, next to this binary);
//! - nftables DNAT + SNAT (masquerade) in the lb namespace;
//! - HAProxy in TCP mode in the lb namespace.
//!
//! Topology `xlb_tests::topology::Topology::separate`: client — lb — 3 backends. The
//! connection loop goes round robin over the 3 backends (`VIP:80` → `:8080`); iperf3 goes to
//! one backend (`VIP:5201`; iperf3 needs its control and data connections on one server).
//! All traffic stays inside the namespaces this creates; they go when it ends.
//!
//! `bench_e2e` (root; needs iperf3, nft, haproxy).

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xlb_tests::bpf::PinDir;
use xlb_tests::netns::{ChildGuard, Netns};
use xlb_tests::topology::{BACKEND_PORT, Loader, PORT, Topology, VIP, tempdir};

/// iperf3's port, on the VIP and on the backend.
const IPERF_PORT: u16 = 5201;
/// Length of the connection loop.
const CONN_SECONDS: Duration = Duration::from_secs(2);
/// Upper bound on connections per loop (client ports and TIME_WAIT stay far from exhaustion).
const CONN_MAX: u32 = 20_000;
/// iperf3 run length in seconds.
const IPERF_SECONDS: u32 = 3;

struct Row {
    name: &'static str,
    gbps: Option<f64>,
    /// Busy CPU ms of the whole machine per GB of the iperf3 run.
    cpu_ms_per_gb: Option<f64>,
    conns: Option<f64>,
}

/// Connect + read one line + close, in a loop for `CONN_SECONDS` (at most `CONN_MAX`), in
/// `client`. Returns connections/s, or `None` when one failed (printed).
fn conn_rate(client: &Netns, addr: SocketAddr) -> Option<f64> {
    client.enter(|| {
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed() < CONN_SECONDS && n < CONN_MAX {
            let result = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line)
            });
            match result {
                Ok(line) if !line.is_empty() => n += 1,
                Ok(_) => {
                    eprintln!("  connection {n} to {addr}: closed without a greeting");
                    return None;
                }
                Err(e) => {
                    eprintln!("  connection {n} to {addr}: {e}");
                    return None;
                }
            }
        }
        Some(n as f64 / start.elapsed().as_secs_f64())
    })
}

/// Busy CPU time of the whole machine so far, in clock ticks (`/proc/stat`: user, nice,
/// system, irq and softirq of all CPUs; idle, iowait and steal left out).
fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("the cpu line");
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
}

/// One iperf3 run from `client` to `addr` (bounded by `timeout`): Gb/s received, and the busy
/// CPU time of the whole machine per GB moved, in ms. Both ends cost the same on every path,
/// so the difference between paths in CPU per GB is what the path between them costs, even
/// when one stream's Gb/s is bound by the ends.
fn iperf(client: &Netns, addr: SocketAddrV4) -> Option<(f64, f64)> {
    let ticks = busy_ticks();
    let json = xlb_tests::measure::iperf3(client, addr, IPERF_SECONDS);
    let busy_s = (busy_ticks() - ticks) as f64 / ticks_per_second();
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64();
    let bytes = json["end"]["sum_received"]["bytes"].as_f64();
    match (bps, bytes) {
        (Some(bps), Some(bytes)) if bytes > 0.0 => Some((bps / 1e9, busy_s * 1e3 / (bytes / 1e9))),
        _ => {
            eprintln!(
                "  iperf3 to {addr} failed: {}",
                json["error"].as_str().unwrap_or("no result")
            );
            None
        }
    }
}

/// Clock ticks per second of `/proc/stat`.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Waits (at most 10 s) until `addr` accepts connections from `client`.
fn wait_listening(client: &Netns, addr: SocketAddr) -> bool {
    client.enter(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })
}

fn measure(name: &'static str, t: &Topology, conn: SocketAddr, bulk: SocketAddrV4) -> Row {
    eprintln!("[bench_e2e] {name}");
    if !wait_listening(&t.client, conn) {
        eprintln!("  {conn} never accepted a connection");
        return Row {
            name,
            gbps: None,
            cpu_ms_per_gb: None,
            conns: None,
        };
    }
    let conns = conn_rate(&t.client, conn);
    let bulk = iperf(&t.client, bulk);
    Row {
        name,
        gbps: bulk.map(|b| b.0),
        cpu_ms_per_gb: bulk.map(|b| b.1),
        conns,
    }
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// xlb through `xlb_loader` in `mode`; the pins (and so the attachment) go at the end.
fn xlb(name: &'static str, t: &Topology, loader: &Path, mode: &str) -> Row {
    let pins = PinDir::new();
    let dir = tempdir();
    let file = dir.join("services");
    let services = format!(
        "{}{VIP}:{IPERF_PORT}/tcp={}:{IPERF_PORT}\n",
        t.services(&[0, 1, 2]),
        t.backends[0].1
    );
    std::fs::write(&file, services).expect("services file");
    let ld = Loader::start(loader, &t.lb, &pins, "l0", mode, &file);
    let result = measure(name, t, vip(PORT).into(), vip(IPERF_PORT));
    if result.conns.is_none() || result.gbps.is_none() {
        // The data plane's counters say where the failed flow went.
        let _ = xlb::inspect::print(
            pins.path(),
            xlb::inspect::Table::Stats,
            &mut std::io::stderr(),
        );
    }
    ld.kill();
    drop(pins);
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// nftables DNAT (round robin) + masquerade in the lb namespace; the table goes at the end.
fn nftables(t: &Topology) -> Row {
    let b: Vec<String> = t.backends.iter().map(|(_, ip)| ip.to_string()).collect();
    let rules = format!(
        "table ip xlbbench {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP} tcp dport {PORT} dnat to numgen inc mod 3 map {{ 0 : {b0}, 1 : {b1}, 2 : {b2} }} : {BACKEND_PORT}
    ip daddr {VIP} tcp dport {IPERF_PORT} dnat to {b0}:{IPERF_PORT}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat masquerade
  }}
}}
",
        b0 = b[0],
        b1 = b[1],
        b2 = b[2],
    );
    let dir = tempdir();
    let file = dir.join("rules.nft");
    std::fs::write(&file, rules).expect("nft rules");
    t.lb.run(&["nft", "-f", &file.to_string_lossy()]);
    let result = measure("nftables DNAT+SNAT", t, vip(PORT).into(), vip(IPERF_PORT));
    t.lb.run(&["nft", "delete", "table", "ip", "xlbbench"]);
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// HAProxy in TCP mode in the lb namespace; killed at the end.
fn haproxy(t: &Topology) -> Row {
    let servers: String = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, (_, ip))| format!("  server b{i} {ip}:{BACKEND_PORT}\n"))
        .collect();
    let config = format!(
        "global
  maxconn 4000
defaults
  mode tcp
  timeout connect 3s
  timeout client 30s
  timeout server 30s
frontend conn
  bind {VIP}:{PORT}
  default_backend conn
backend conn
  balance roundrobin
{servers}frontend bulk
  bind {VIP}:{IPERF_PORT}
  default_backend bulk
backend bulk
  server b0 {b0}:{IPERF_PORT}
",
        b0 = t.backends[0].1
    );
    let dir = tempdir();
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, config).expect("haproxy config");
    let proxy: ChildGuard =
        t.lb.spawn(&["haproxy", "-db", "-q", "-f", &file.to_string_lossy()]);
    let result = measure("HAProxy (tcp mode)", t, vip(PORT).into(), vip(IPERF_PORT));
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
    result
}

fn loader_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let path = exe.with_file_name("xlb_loader");
    assert!(
        path.exists(),
        "{} is missing: build it (`cargo build --release --bin xlb_loader`; `cargo xtask bench` does)",
        path.display()
    );
    path
}

fn main() {
    let loader = loader_path();
    let t = Topology::separate("be");
    t.lb.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    t.client.run(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    let backends = t.start_backends();
    let iperf_server: ChildGuard = t.backends[0].0.spawn(&[
        "iperf3",
        "-s",
        "-B",
        &t.backends[0].1.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "--logfile",
        "/dev/null",
    ]);
    let direct_conn = SocketAddr::V4(SocketAddrV4::new(t.backends[0].1, BACKEND_PORT));
    let direct_bulk = SocketAddrV4::new(t.backends[0].1, IPERF_PORT);

    let results = [
        measure("direct (no LB)", &t, direct_conn, direct_bulk),
        xlb("xlb XDP generic", &t, &loader, "generic"),
        xlb("xlb XDP native", &t, &loader, "native"),
        xlb("xlb TC", &t, &loader, "tc"),
        nftables(&t),
        haproxy(&t),
    ];
    drop(iperf_server);
    drop(backends);

    let base = &results[0];
    let nft = results
        .iter()
        .find(|r| r.name.starts_with("nftables"))
        .expect("an nftables row");
    let model = xlb_tests::measure::cpu_model();
    println!(
        "CPU {model}, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "client ns -> lb ns -> backend ns; iperf3 1 stream {IPERF_SECONDS} s; connections: {} s loop, connect+read greeting+close",
        CONN_SECONDS.as_secs()
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>9} {:>6} {:>10} {:>8} {:>8}",
        "path", "Gb/s", "/direct", "/nft", "CPU ms/GB", "/nft", "conn/s", "/direct", "/nft"
    );
    let fmt = |v: Option<f64>, d: usize| v.map_or("failed".to_owned(), |v| format!("{v:.d$}"));
    let ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".to_owned(),
    };
    for r in &results {
        println!(
            "{:<22} {:>8} {:>8} {:>8} {:>9} {:>6} {:>10} {:>8} {:>8}",
            r.name,
            fmt(r.gbps, 2),
            ratio(r.gbps, base.gbps),
            ratio(r.gbps, nft.gbps),
            fmt(r.cpu_ms_per_gb, 0),
            ratio(r.cpu_ms_per_gb, nft.cpu_ms_per_gb),
            fmt(r.conns, 0),
            ratio(r.conns, base.conns),
            ratio(r.conns, nft.conns)
        );
    }
}
