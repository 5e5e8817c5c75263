//! The namespaces cluster the demo, the controller tests and the apply benchmark share, the
//! real `xlb` binary run on it, and the in-memory API server driven with the real `kubectl`.
//!
//! Topology: client ns (192.0.2.1, route to 198.51.100.0/24 via 192.0.2.254) — lb ns (eth0:
//! 192.0.2.254/24 and 198.51.100.1/24; br0: 203.0.113.1/24 bridging the node veths) —
//! node1..N ns (203.0.113.1n, default via .1), each serving TCP and UDP with its name on the
//! given NodePorts. The API server listens on the lb namespace's loopback, where xlb and
//! `kubectl` (run with `nsenter`) reach it.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::bpf::PinDir;
use crate::netns::{ChildGuard, Netns, veth};
use crate::servers::{Backend, spawn_in, tcp_name, udp_names};
/// Re-exported for the controller tests, which wait on the cluster this module builds.
pub use crate::wait::wait_for;

/// The address pool the tests and the demo give xlb (`--restricted-cidr`).
pub const POOL: &str = "198.51.100.10-198.51.100.200";

/// Where xlb serves /metrics, /healthz and /readyz: the lb namespace's own loopback, so every
/// cluster has its own and parallel tests never clash.
pub const METRICS_ADDR: &str = "127.0.0.1:9464";

/// Node `n`'s (1-based) InternalIP.
pub fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 10 + n as u8)
}

/// The client, lb and node namespaces with their backends; everything is removed on drop.
pub struct Cluster {
    /// Backends stop before the namespaces go.
    _backends: Vec<Backend>,
    /// The client namespace (192.0.2.1).
    pub client: Netns,
    /// The load balancer's namespace, where xlb runs.
    pub lb: Netns,
    /// node1..N.
    pub nodes: Vec<Netns>,
}

impl Cluster {
    /// Builds the topology with `nodes` nodes, each serving TCP and UDP on every port of
    /// `node_ports` and answering with its name (`node1`, …). `tag` names the test.
    pub fn new(tag: &str, nodes: usize, node_ports: &[u16]) -> Cluster {
        assert!((1..=9).contains(&nodes), "1 to 9 nodes");
        let client = Netns::new(&format!("{tag}-c"));
        let lb = Netns::new(&format!("{tag}-lb"));
        veth(&client, "eth0", &lb, "eth0");
        client.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "eth0"]);
        client.run(&[
            "ip",
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "192.0.2.254",
        ]);
        lb.run(&["ip", "addr", "add", "192.0.2.254/24", "dev", "eth0"]);
        lb.run(&["ip", "addr", "add", "198.51.100.1/24", "dev", "eth0"]);
        lb.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        lb.run(&["ip", "addr", "add", "203.0.113.1/24", "dev", "br0"]);
        lb.run(&["ip", "link", "set", "br0", "up"]);
        let mut node_nss = Vec::new();
        let mut backends = Vec::new();
        for n in 1..=nodes {
            let node = Netns::new(&format!("{tag}-n{n}"));
            let port = format!("n{n}");
            veth(&node, "eth0", &lb, &port);
            lb.run(&["ip", "link", "set", &port, "master", "br0"]);
            node.run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", node_ip(n)),
                "dev",
                "eth0",
            ]);
            node.run(&["ip", "route", "add", "default", "via", "203.0.113.1"]);
            for port in node_ports {
                let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
                backends.push(Backend::start(&node, addr, &format!("node{n}")));
            }
            node_nss.push(node);
        }
        Cluster {
            _backends: backends,
            client,
            lb,
            nodes: node_nss,
        }
    }

    /// One TCP connection from the client namespace: the answering backend's name.
    pub fn tcp_name(&self, addr: SocketAddr) -> Result<String, String> {
        spawn_in(&self.client, move || tcp_name(addr))
            .join()
            .expect("client thread")
    }

    /// `count` TCP connections from the client namespace.
    pub fn tcp_names(&self, addr: SocketAddr, count: usize) -> Vec<Result<String, String>> {
        spawn_in(&self.client, move || {
            (0..count).map(|_| tcp_name(addr)).collect()
        })
        .join()
        .expect("client thread")
    }

    /// `count` UDP queries (new flows) from the client namespace, one after the other.
    pub fn udp_names(&self, addr: SocketAddr, count: usize) -> Vec<Result<String, String>> {
        spawn_in(&self.client, move || udp_names(addr, count))
            .join()
            .expect("client thread")
    }

    /// The IPv4 addresses on the lb namespace's eth0.
    pub fn link_addresses(&self) -> Vec<Ipv4Addr> {
        let out = self
            .lb
            .run(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.position(|w| w == "inet")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }

    /// `GET path` on xlb's metrics listener in the lb namespace: the status code, or the error.
    pub fn http_get(&self, path: &str) -> Result<u16, String> {
        self.http_body(path).map(|(code, _)| code)
    }

    /// `GET path` on xlb's metrics listener: the status code and body, or the error.
    pub fn http_body(&self, path: &str) -> Result<(u16, String), String> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n\r\n");
        spawn_in(&self.lb, move || {
            let addr: SocketAddr = METRICS_ADDR.parse().expect("metrics address");
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            stream
                .write_all(request.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
            let mut answer = String::new();
            stream
                .read_to_string(&mut answer)
                .map_err(|e| format!("read: {e}"))?;
            let code = answer
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
            let body = answer
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_owned())
                .unwrap_or_default();
            Ok((code, body))
        })
        .join()
        .expect("http thread")
    }

    /// Starts the real xlb in the lb namespace on eth0 with the test pool, `pins` and `args`.
    pub fn start_xlb(&self, xlb: &Path, pins: &PinDir, args: &[&str]) -> Xlb {
        Xlb::start(&self.lb, xlb, pins, args)
    }
}

/// The path of the `xlb` binary built beside the running executable (`target/<profile>/xlb`:
/// the test or bench binary lives in `target/<profile>/deps` or `target/<profile>`). Panics
/// with what to build when it is missing.
pub fn xlb_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("xlb"))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the xlb binary is missing (looked at {candidates:?}); build it with \
                 `cargo build -p lb-userspace` (cargo test --workspace builds it)"
            )
        })
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running xlb, killed (SIGKILL) on drop; its log is printed when the test panics.
pub struct Xlb {
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl Xlb {
    /// Starts `xlb` inside `ns` with `--linkdevice eth0 --restricted-cidr POOL --pin-dir …
    /// --metrics-addr METRICS_ADDR` and `args`.
    pub fn start(ns: &Netns, xlb: &Path, pins: &PinDir, args: &[&str]) -> Xlb {
        Xlb::start_wrapped(ns, &[], xlb, pins, args)
    }

    /// [`Xlb::start`] with xlb run by `wrapper` (e.g. `["prlimit", "--nofile=256:256", "--"]`).
    pub fn start_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        xlb: &Path,
        pins: &PinDir,
        args: &[&str],
    ) -> Xlb {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{}-xlb-{n}.log", ns.name()));
        let file = std::fs::File::create(&log).expect("xlb log file");
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding bpffs from xlb.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name()))
            .args(wrapper)
            .arg(xlb)
            .args(["--linkdevice", "eth0", "--restricted-cidr", POOL])
            .arg("--pin-dir")
            .arg(pins.path())
            .args(["--metrics-addr", METRICS_ADDR])
            .args(args)
            .env_remove("KUBECONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", xlb.display()));
        Xlb {
            child: Some(ChildGuard(child)),
            log,
        }
    }

    /// Kills xlb with SIGKILL: no cleanup runs, as after a crash.
    pub fn kill(&mut self) {
        self.child.take();
    }

    /// Stops xlb with SIGTERM and waits (at most 10 s) for its cleanup to finish.
    pub fn terminate(&mut self) {
        if let Some(mut guard) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we have not reaped.
            unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = guard.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Sends SIGTERM and waits at most `limit` for xlb to exit: its exit status, or `None`
    /// if it is still running then (it is killed when dropped).
    pub fn stop(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let guard = self.child.as_mut()?;
        // SAFETY: kill(2) on the pid of a child we have not reaped.
        unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = guard.0.try_wait() {
                self.child.take();
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Whether xlb is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|guard| matches!(guard.0.try_wait(), Ok(None)))
    }

    /// xlb's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Xlb {
    fn drop(&mut self) {
        self.child.take();
        if std::thread::panicking() {
            eprintln!("---- xlb log ({}) ----\n{}", self.log.display(), self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The in-memory API server listening on a namespace's loopback, with `kubectl` run there.
pub struct Api {
    server: Option<kube_fake::Server>,
    runtime: Option<tokio::runtime::Runtime>,
    ns: String,
    kubeconfig: PathBuf,
}

impl Api {
    /// Starts a fresh server on `ns`'s loopback.
    pub fn start(ns: &Netns) -> Api {
        Api::start_at(ns, Ipv4Addr::LOCALHOST)
    }

    /// Starts a fresh server in `ns` listening on `addr` (an address of one of its devices,
    /// so other namespaces can reach it).
    pub fn start_at(ns: &Netns, addr: Ipv4Addr) -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // The listening socket is created by this thread, inside the namespace.
        let server = ns.enter(|| {
            runtime
                .block_on(kube_fake::Server::start_with(kube_fake::Config {
                    addr: addr.into(),
                    ..kube_fake::Config::default()
                }))
                .unwrap_or_else(|e| panic!("starting the in-memory API server: {e}"))
        });
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", ns.name()));
        server
            .write_kubeconfig(&kubeconfig)
            .expect("write kubeconfig");
        Api {
            server: Some(server),
            runtime: Some(runtime),
            ns: ns.name().to_owned(),
            kubeconfig,
        }
    }

    /// The kubeconfig file (valid inside the namespace).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's address (on the namespace's loopback).
    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().expect("server").addr()
    }

    /// The server's fault hooks.
    pub fn faults(&self) -> kube_fake::Faults {
        self.server.as_ref().expect("server").faults()
    }

    /// Runs `kubectl --request-timeout=5s args…` in the namespace, `stdin` fed to it.
    pub fn kubectl_output(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg("kubectl")
            .arg("--request-timeout=5s")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl");
        let mut input = child.stdin.take().expect("kubectl stdin");
        input.write_all(stdin.as_bytes()).expect("kubectl stdin");
        drop(input);
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl; panics with its stderr unless it succeeds. Returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_stdin(args, "")
    }

    /// Runs kubectl with `stdin`; panics with its stderr unless it succeeds. Returns stdout.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_output(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> String {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// The first ingress IP in the Service's status, if any.
    pub fn ingress_ip(&self, name: &str) -> Option<Ipv4Addr> {
        let out = self.kubectl_output(
            &[
                "get",
                "svc",
                name,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ],
            "",
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A Node manifest: `node{n}` with its InternalIP, Ready (or not), with the worker label or not.
pub fn node_yaml(n: usize, ready: bool, worker: bool) -> String {
    let labels = if worker {
        "{node-role.kubernetes.io/worker: \"\"}"
    } else {
        "{}"
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\n  labels: {labels}\nstatus:\n  \
         conditions: [{{type: Ready, status: \"{}\"}}]\n  addresses: [{{type: InternalIP, address: {}}}]\n",
        if ready { "True" } else { "False" },
        node_ip(n)
    )
}

/// A `type: LoadBalancer` Service `name` with one TCP port `port` on NodePort `node_port`.
pub fn service_yaml(name: &str, port: u16, node_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  ports: [{{name: p{port}, port: {port}, protocol: TCP, targetPort: 8080, nodePort: {node_port}}}]\n"
    )
}
