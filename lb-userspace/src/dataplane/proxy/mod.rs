//! The userspace TCP/UDP proxy: the fallback path for whatever the BPF path cannot take.
//!
//! For every virtual service the proxy listens on `VIP:port` itself. The XDP program passes to
//! the kernel every TCP segment that misses conntrack and is not a SYN, and every flow it
//! cannot take (SNAT ports exhausted, conntrack insert failed, no FIB result); those packets
//! reach the kernel addressed to `VIP:port`, where this proxy's socket serves them. With XDP
//! detached or unloadable (`--dataplane proxy`, or XDP failing under `--dataplane both`) the
//! proxy carries all the traffic.
//!
//! - TCP: a listener per frontend (`SO_REUSEADDR`, `IP_FREEBIND` so it can bind before the VIP
//!   is on the device). Each accepted connection goes to the next backend in round-robin
//!   order; a backend that does not answer within [`CONNECT_TIMEOUT`] is skipped for the next
//!   one, each at most once per connection ([`Timeouts`] changes both timeouts). Data is
//!   relayed with [`tokio::io::copy_bidirectional`], which carries half-closes: when one side
//!   shuts down its write half, the proxy shuts down its write half toward the other side and
//!   keeps relaying the other direction until it ends too.
//! - UDP: a socket per frontend; each client address gets its own connected upstream socket to
//!   a round-robin backend, and answers from it go back from `VIP:port`. A flow ends after
//!   [`UDP_IDLE_TIMEOUT`] without a datagram either way (the XDP UDP timeout).
//!
//! Backends see connections from the LB's own address, as with the XDP path's full NAT; the
//! client's address is not passed on.
//!
//! [`Dataplane::apply`] diffs: new frontends start listening, removed frontends stop taking
//! new connections at once (the TCP listener is shut down before `apply` returns) while
//! established TCP connections keep running until they end, and a changed backend list applies
//! to new connections and flows only. UDP has no connection to drain: a removed UDP
//! frontend's flows end with it.
//!
//! # Runtime
//!
//! The proxy runs on a tokio runtime; `apply` is synchronous (it is the [`Dataplane`] trait),
//! binds the sockets on the calling thread and spawns the relaying tasks on the runtime whose
//! handle it holds ([`ProxyDataplane::new`] takes the current one). Sockets belong to the
//! network namespace of the thread that creates them: listeners are created by the thread that
//! calls `apply`, upstream sockets by the runtime's worker threads, so both must be in the
//! namespace the VIPs live in (they are in xlb; tests build the runtime inside the namespace).

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use super::{Dataplane, DataplaneError};
use crate::model::{Backend, Frontend, Protocol, VirtualService};

mod tcp;
mod udp;

use tcp::accept_loop;
use udp::{Flows, udp_loop};

/// How long a TCP connect to one backend may take before the next backend is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A UDP flow without a datagram either way for this long ends (between the XDP data
/// plane's 30 s for an exchange and 120 s for a stream).
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many UDP flows per frontend; datagrams of further new clients are dropped
/// (and counted), so a flood of source addresses cannot exhaust file descriptors.
pub const MAX_UDP_FLOWS: usize = 16_384;

/// Listen backlog of each TCP frontend.
const BACKLOG: i32 = 1024;

/// Largest UDP datagram.
const DATAGRAM: usize = 65_535;

/// The proxy's timeouts; [`Timeouts::default`] is [`CONNECT_TIMEOUT`] and
/// [`UDP_IDLE_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a TCP connect to one backend may take before the next is tried.
    pub connect: Duration,
    /// A UDP flow without a datagram either way for this long ends.
    pub udp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: CONNECT_TIMEOUT,
            udp_idle: UDP_IDLE_TIMEOUT,
        }
    }
}

/// Counters of one frontend since it started listening.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// TCP connections accepted, UDP flows started.
    pub connections: u64,
    /// TCP connections and UDP flows open now.
    pub active: u64,
    /// Payload bytes relayed from clients to backends.
    pub bytes_to_backends: u64,
    /// Payload bytes relayed from backends to clients.
    pub bytes_to_clients: u64,
    /// Backend connect attempts that failed or timed out, and upstream send/receive errors.
    pub backend_failures: u64,
    /// Connections closed and datagrams dropped because no backend took them (none listed,
    /// all failed, or the UDP flow table full).
    pub dropped: u64,
    /// Accepts that failed (out of descriptors or memory); the connection waits and is retried.
    pub accept_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    active: AtomicU64,
    bytes_to_backends: AtomicU64,
    bytes_to_clients: AtomicU64,
    backend_failures: AtomicU64,
    dropped: AtomicU64,
    accept_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProxyStats {
        ProxyStats {
            connections: self.connections.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            bytes_to_backends: self.bytes_to_backends.load(Ordering::Relaxed),
            bytes_to_clients: self.bytes_to_clients.load(Ordering::Relaxed),
            backend_failures: self.backend_failures.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts one open connection or flow while it lives.
struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        Counters::bump(&shared.counters.connections);
        Counters::bump(&shared.counters.active);
        ActiveGuard(shared.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the tasks of one frontend share with [`ProxyDataplane`].
#[derive(Debug)]
struct Shared {
    frontend: Frontend,
    /// The backends new connections go to; replaced whole by `apply`.
    backends: Mutex<Arc<[Backend]>>,
    /// Round-robin position.
    next: AtomicUsize,
    counters: Counters,
    timeouts: Timeouts,
}

impl Shared {
    /// The backends in the order a new connection tries them: round robin, then the rest.
    fn pick(&self) -> Vec<SocketAddr> {
        let backends = lock(&self.backends).clone();
        if backends.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % backends.len();
        (0..backends.len())
            .map(|i| {
                let backend = backends[(start + i) % backends.len()];
                SocketAddr::V4(SocketAddrV4::new(backend.ip, backend.port))
            })
            .collect()
    }
}

/// Locks `mutex`, taking the data even if a task panicked while holding it (the data is a
/// plain list or map that every writer leaves consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A listening frontend and how to stop it.
struct Running {
    shared: Arc<Shared>,
    stop: Stop,
}

enum Stop {
    Tcp {
        /// A duplicate of the listener's descriptor, to shut it down synchronously.
        listener: Socket,
        accept: AbortHandle,
    },
    Udp {
        receive: AbortHandle,
        flows: Flows,
    },
}

impl Running {
    /// Stops taking new connections. TCP connections already accepted keep running.
    fn stop(self) {
        match self.stop {
            Stop::Tcp { listener, accept } => {
                // shutdown(2) on a listening socket stops listening at once (new SYNs are
                // answered with RST) and wakes the accept with EINVAL; the descriptor closes
                // when the aborted task is dropped.
                if let Err(error) = listener.shutdown(Shutdown::Both) {
                    tracing::debug!(%error, "shutting down a proxy listener");
                }
                accept.abort();
            }
            Stop::Udp { receive, flows } => {
                receive.abort();
                for (_, flow) in lock(&flows).drain() {
                    flow.replies.abort();
                }
            }
        }
    }
}

/// The userspace proxy data plane. See the module docs; create it inside a tokio runtime.
pub struct ProxyDataplane {
    handle: Handle,
    timeouts: Timeouts,
    running: BTreeMap<Frontend, Running>,
    /// Frontends that should listen but could not, and why.
    failing: BTreeMap<Frontend, ListenFailure>,
    /// Failed attempts to listen since start, by reason.
    listen_failures: BTreeMap<ListenFailure, u64>,
    /// How many frontends were short of descriptors at the last `apply`.
    short_of_descriptors: usize,
    /// The counters of the listening frontends, shared with `/metrics`.
    counters: ProxyCounters,
}

/// The counters of every listening frontend, readable from another task at any time (for
/// `/metrics` at scrape time). Cheap to clone; clones see the same frontends.
#[derive(Debug, Clone, Default)]
pub struct ProxyCounters(Arc<Mutex<BTreeMap<Frontend, Arc<Shared>>>>);

impl ProxyCounters {
    /// Each listening frontend's counters now.
    pub fn snapshot(&self) -> Vec<(Frontend, ProxyStats)> {
        lock(&self.0)
            .iter()
            .map(|(frontend, shared)| (*frontend, shared.counters.snapshot()))
            .collect()
    }
}

impl std::fmt::Debug for ProxyDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDataplane")
            .field("frontends", &self.running.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `VIP:port/PROTO`, for logs and errors.
fn describe(frontend: &Frontend) -> String {
    format!("{}:{}/{}", frontend.vip, frontend.port, frontend.protocol)
}

impl ProxyDataplane {
    /// A proxy that spawns its tasks on the current tokio runtime. Fails outside one.
    pub fn new() -> Result<Self, DataplaneError> {
        let handle = Handle::try_current().map_err(|_| DataplaneError::NoRuntime)?;
        Ok(Self::with_handle(handle))
    }

    /// A proxy that spawns its tasks on the runtime of `handle`; `apply` may then be called
    /// from any thread.
    pub fn with_handle(handle: Handle) -> Self {
        ProxyDataplane {
            handle,
            timeouts: Timeouts::default(),
            running: BTreeMap::new(),
            failing: BTreeMap::new(),
            listen_failures: BTreeMap::new(),
            short_of_descriptors: 0,
            counters: ProxyCounters::default(),
        }
    }

    /// The same proxy with other timeouts, for frontends started from now on.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The frontends listening now.
    pub fn frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.running.keys()
    }

    /// Counters of every listening frontend.
    pub fn stats(&self) -> BTreeMap<Frontend, ProxyStats> {
        self.counters.snapshot().into_iter().collect()
    }

    /// A handle on the counters that follows the frontends as they change.
    pub fn counters(&self) -> ProxyCounters {
        self.counters.clone()
    }

    /// Failed attempts to listen on a frontend since start, by reason.
    pub fn listen_failures(&self) -> &BTreeMap<ListenFailure, u64> {
        &self.listen_failures
    }

    /// Frontends that should listen and do not (the bind failed), by reason.
    pub fn failing(&self) -> &BTreeMap<Frontend, ListenFailure> {
        &self.failing
    }

    /// Binds `service`'s frontend and spawns its tasks.
    fn start(&self, service: &VirtualService) -> io::Result<Running> {
        let frontend = service.frontend;
        let shared = Arc::new(Shared {
            frontend,
            backends: Mutex::new(service.backends.clone().into()),
            next: AtomicUsize::new(0),
            counters: Counters::default(),
            timeouts: self.timeouts,
        });
        let addr = SocketAddr::V4(SocketAddrV4::new(frontend.vip, frontend.port));
        let (kind, protocol) = match frontend.protocol {
            Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
            Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
        };
        let socket = Socket::new(Domain::IPV4, kind, Some(protocol))?;
        if in_reserve(socket.as_raw_fd()) {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        socket.set_reuse_address(true)?;
        // Bind even before the VIP is on the device (the address manager may add it later).
        socket.set_freebind_v4(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let _runtime = self.handle.enter();
        let stop = match frontend.protocol {
            Protocol::Tcp => {
                socket.listen(BACKLOG)?;
                let control = socket.try_clone()?;
                let listener = TcpListener::from_std(socket.into())?;
                let accept = self
                    .handle
                    .spawn(accept_loop(listener, shared.clone()))
                    .abort_handle();
                Stop::Tcp {
                    listener: control,
                    accept,
                }
            }
            Protocol::Udp => {
                let socket = Arc::new(UdpSocket::from_std(socket.into())?);
                let flows = Flows::default();
                let receive = self
                    .handle
                    .spawn(udp_loop(socket, shared.clone(), flows.clone()))
                    .abort_handle();
                Stop::Udp { receive, flows }
            }
        };
        Ok(Running { shared, stop })
    }
}

impl Dataplane for ProxyDataplane {
    /// Listens on every frontend of `services` that has backends and stops listening on the
    /// others: a frontend without backends is not listened on, so the kernel refuses its
    /// connections (RST, or ICMP port unreachable for UDP) as kube-proxy does. A frontend that
    /// cannot be bound is reported once while the reason lasts (out of descriptors: one line
    /// for all of them), counted, and retried on the next `apply`; the first such error is
    /// returned and the other frontends are applied regardless.
    fn apply(&mut self, services: &[VirtualService]) -> Result<(), DataplaneError> {
        let desired: BTreeMap<Frontend, &VirtualService> = services
            .iter()
            .filter(|service| !service.backends.is_empty())
            .map(|service| (service.frontend, service))
            .collect();
        let removed: Vec<Frontend> = self
            .running
            .keys()
            .filter(|frontend| !desired.contains_key(frontend))
            .copied()
            .collect();
        for frontend in removed {
            lock(&self.counters.0).remove(&frontend);
            if let Some(running) = self.running.remove(&frontend) {
                running.stop();
                tracing::info!(frontend = %describe(&frontend), "proxy stopped listening");
            }
        }
        self.failing
            .retain(|frontend, _| desired.contains_key(frontend));
        let mut first_error = None;
        for (frontend, service) in desired {
            if let Some(running) = self.running.get(&frontend) {
                let mut backends = lock(&running.shared.backends);
                if **backends != *service.backends {
                    *backends = service.backends.clone().into();
                    tracing::info!(frontend = %describe(&frontend), backends = service.backends.len(), "proxy backends changed");
                }
                continue;
            }
            match self.start(service) {
                Ok(running) => {
                    tracing::info!(frontend = %describe(&frontend), service = %service.owner, "proxy listening");
                    self.failing.remove(&frontend);
                    lock(&self.counters.0).insert(frontend, running.shared.clone());
                    self.running.insert(frontend, running);
                }
                Err(source) => {
                    let reason = ListenFailure::of(&source);
                    *self.listen_failures.entry(reason).or_default() += 1;
                    let new = self.failing.insert(frontend, reason) != Some(reason);
                    if new && reason != ListenFailure::Descriptors {
                        tracing::error!(frontend = %describe(&frontend), %source, "proxy cannot listen");
                    }
                    first_error.get_or_insert(if reason == ListenFailure::Descriptors {
                        DataplaneError::ProxyOutOfDescriptors
                    } else {
                        DataplaneError::ProxyListen {
                            frontend: describe(&frontend),
                            source,
                        }
                    });
                }
            }
        }
        let short = self
            .failing
            .values()
            .filter(|reason| **reason == ListenFailure::Descriptors)
            .count();
        // Said when the shortage starts and when it ends; its size is in the metrics.
        if (short > 0) != (self.short_of_descriptors > 0) {
            if short > 0 {
                tracing::error!(
                    frontends = short,
                    limit = open_file_limit(),
                    "the proxy is out of file descriptors: these frontends do not listen and are retried; raise the open-file limit (LimitNOFILE, ulimit -n)"
                );
            } else {
                tracing::info!("every proxy frontend listens again");
            }
        }
        self.short_of_descriptors = short;
        first_error.map_or(Ok(()), Err)
    }
}

/// Why a frontend could not be listened on, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ListenFailure {
    /// Out of file descriptors (EMFILE, ENFILE).
    Descriptors,
    /// Another socket holds the address.
    AddressInUse,
    /// Anything else.
    Other,
}

impl ListenFailure {
    fn of(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => ListenFailure::Descriptors,
            Some(libc::EADDRINUSE) => ListenFailure::AddressInUse,
            _ => ListenFailure::Other,
        }
    }

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            ListenFailure::Descriptors => "descriptors",
            ListenFailure::AddressInUse => "address_in_use",
            ListenFailure::Other => "other",
        }
    }
}

/// Descriptors the proxy leaves to the rest of xlb (`/metrics` and the probes, the API
/// client, netlink, BPF maps): it takes no new frontend or connection past the limit minus
/// these, so running out of descriptors in the proxy never silences the probes.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The soft open-file limit.
fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur
}

/// Whether a new descriptor ate into the reserve. The kernel hands out the lowest free
/// number, so a descriptor numbered past the limit minus the reserve means at least that
/// many are open.
fn in_reserve(fd: std::os::fd::RawFd) -> bool {
    u64::try_from(fd).unwrap_or(0) + RESERVED_DESCRIPTORS >= open_file_limit()
}

impl Drop for ProxyDataplane {
    fn drop(&mut self) {
        lock(&self.counters.0).clear();
        for (_, running) in std::mem::take(&mut self.running) {
            running.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    //! On loopback, without privileges: 127.0.0.1 is the VIP, 127.0.0.2 and 127.0.0.3 the
    //! backends. The namespace tests (`tests/tests/proxy_netns.rs`) cover real topologies.

    use std::net::Ipv4Addr;

    use std::time::Instant;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use tokio::net::TcpStream;

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// A port free on 127.0.0.1 for `protocol` right now.
    fn free_port(protocol: Protocol) -> u16 {
        match protocol {
            Protocol::Tcp => std::net::TcpListener::bind((VIP, 0))
                .and_then(|listener| listener.local_addr())
                .expect("an ephemeral TCP port")
                .port(),
            Protocol::Udp => std::net::UdpSocket::bind((VIP, 0))
                .and_then(|socket| socket.local_addr())
                .expect("an ephemeral UDP port")
                .port(),
        }
    }

    fn service(protocol: Protocol, port: u16, backends: &[Backend]) -> VirtualService {
        VirtualService {
            frontend: Frontend {
                vip: VIP,
                port,
                protocol,
            },
            backends: backends.to_vec(),
            owner: "default/test".to_owned(),
        }
    }

    /// A TCP backend on `ip` that reads until the client half-closes, then answers
    /// `<name>:<bytes read>` and closes.
    async fn half_close_backend(ip: Ipv4Addr, name: &'static str) -> Backend {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind a backend");
        let port = listener.local_addr().expect("backend address").port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    if stream.read_to_end(&mut request).await.is_ok() {
                        let answer = format!("{name}:{}", request.len());
                        let _ = stream.write_all(answer.as_bytes()).await;
                    }
                });
            }
        });
        Backend { ip, port }
    }

    /// A UDP backend on `ip` answering every datagram with `name`.
    async fn udp_backend(ip: Ipv4Addr, name: &'static str) -> Backend {
        let socket = UdpSocket::bind((ip, 0)).await.expect("bind a UDP backend");
        let port = socket.local_addr().expect("backend address").port();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(name.as_bytes(), peer).await;
            }
        });
        Backend { ip, port }
    }

    /// Sends `request`, half-closes, and reads the answer to its end.
    async fn exchange(port: u16, request: &[u8]) -> io::Result<String> {
        let mut stream = TcpStream::connect((VIP, port)).await?;
        stream.write_all(request).await?;
        stream.shutdown().await?;
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .map_err(|_| io::Error::other("no answer within 5 s"))??;
        Ok(answer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_relays_half_close_round_robin() {
        let backends = [
            half_close_backend(Ipv4Addr::new(127, 0, 0, 2), "b1").await,
            half_close_backend(Ipv4Addr::new(127, 0, 0, 3), "b2").await,
        ];
        let port = free_port(Protocol::Tcp);
        let mut proxy = ProxyDataplane::new().expect("inside a runtime");
        proxy
            .apply(&[service(Protocol::Tcp, port, &backends)])
            .expect("apply");
        let mut answers = Vec::new();
        for _ in 0..4 {
            // The backend answers only after the client's half-close has reached it.
            answers.push(exchange(port, b"hello").await.expect("exchange"));
        }
        assert_eq!(answers, ["b1:5", "b2:5", "b1:5", "b2:5"]);
        let stats = proxy.stats()[&service(Protocol::Tcp, port, &[]).frontend];
        assert_eq!(stats.connections, 4, "{stats:?}");
        assert_eq!(stats.bytes_to_backends, 20, "{stats:?}");
        assert_eq!(stats.bytes_to_clients, 16, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frontend_without_backends_refuses_until_one_is_ready() {
        let port = free_port(Protocol::Tcp);
        let mut proxy = ProxyDataplane::new().expect("inside a runtime");
        proxy
            .apply(&[service(Protocol::Tcp, port, &[])])
            .expect("a frontend without backends is no error");
        assert_eq!(proxy.frontends().count(), 0, "nothing listens");
        let error = TcpStream::connect((VIP, port))
            .await
            .expect_err("no backends: the kernel refuses the connection");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
        let backend = half_close_backend(Ipv4Addr::new(127, 0, 0, 2), "b1").await;
        proxy
            .apply(&[service(Protocol::Tcp, port, &[backend])])
            .expect("a backend is ready");
        assert_eq!(exchange(port, b"x").await.expect("exchange"), "b1:1");
        proxy
            .apply(&[service(Protocol::Tcp, port, &[])])
            .expect("the backend goes");
        let error = TcpStream::connect((VIP, port))
            .await
            .expect_err("refused again once the last backend is gone");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_diffs_frontends_and_backends() {
        let b1 = half_close_backend(Ipv4Addr::new(127, 0, 0, 2), "b1").await;
        let b2 = half_close_backend(Ipv4Addr::new(127, 0, 0, 3), "b2").await;
        let port = free_port(Protocol::Tcp);
        let mut proxy = ProxyDataplane::new().expect("inside a runtime");
        proxy
            .apply(&[service(Protocol::Tcp, port, &[b1])])
            .expect("apply");
        // Applying the same set again changes nothing (no rebind, which would fail).
        proxy
            .apply(&[service(Protocol::Tcp, port, &[b1])])
            .expect("apply again");
        assert_eq!(exchange(port, b"x").await.expect("exchange"), "b1:1");
        proxy
            .apply(&[service(Protocol::Tcp, port, &[b2])])
            .expect("change backends");
        assert_eq!(exchange(port, b"x").await.expect("exchange"), "b2:1");
        proxy.apply(&[]).expect("remove");
        assert_eq!(proxy.frontends().count(), 0);
        let error = exchange(port, b"x")
            .await
            .expect_err("a removed frontend must refuse");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frontend_that_cannot_bind_is_reported_and_the_others_still_apply() {
        let b1 = half_close_backend(Ipv4Addr::new(127, 0, 0, 2), "b1").await;
        let taken = std::net::TcpListener::bind((VIP, 0)).expect("bind a listener");
        let taken_port = taken.local_addr().expect("address").port();
        let free = free_port(Protocol::Tcp);
        let mut proxy = ProxyDataplane::new().expect("inside a runtime");
        let error = proxy
            .apply(&[
                service(Protocol::Tcp, taken_port, &[b1]),
                service(Protocol::Tcp, free, &[b1]),
            ])
            .expect_err("a port another program listens on cannot be taken");
        let message = error.to_string();
        assert!(
            message.contains(&format!("127.0.0.1:{taken_port}/TCP")) && message.contains("ss -"),
            "{message}"
        );
        assert_eq!(exchange(free, b"ok").await.expect("exchange"), "b1:2");
        drop(taken);
        // Another test's ephemeral socket may briefly take the freed port: a later apply
        // retries, which is the behaviour under test.
        let mut retried = Err(DataplaneError::NoRuntime);
        for _ in 0..50 {
            retried = proxy.apply(&[
                service(Protocol::Tcp, taken_port, &[b1]),
                service(Protocol::Tcp, free, &[b1]),
            ]);
            if retried.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        retried.expect("a later apply retries the frontend");
        assert_eq!(proxy.frontends().count(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn udp_flows_round_robin_and_end_when_idle() {
        let backends = [
            udp_backend(Ipv4Addr::new(127, 0, 0, 2), "b1").await,
            udp_backend(Ipv4Addr::new(127, 0, 0, 3), "b2").await,
        ];
        let port = free_port(Protocol::Udp);
        let mut proxy = ProxyDataplane::new()
            .expect("inside a runtime")
            .with_timeouts(Timeouts {
                udp_idle: Duration::from_millis(300),
                ..Timeouts::default()
            });
        let service = service(Protocol::Udp, port, &backends);
        proxy.apply(std::slice::from_ref(&service)).expect("apply");
        let ask = |socket: Arc<UdpSocket>| async move {
            socket.send_to(b"who", (VIP, port)).await.expect("send");
            let mut buf = [0u8; 64];
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
                    .await
                    .expect("an answer within 5 s")
                    .expect("receive");
            assert_eq!(
                from,
                SocketAddr::from((VIP, port)),
                "answers come from VIP:port"
            );
            String::from_utf8_lossy(&buf[..len]).into_owned()
        };
        let one = Arc::new(UdpSocket::bind((VIP, 0)).await.expect("client"));
        let two = Arc::new(UdpSocket::bind((VIP, 0)).await.expect("client"));
        assert_eq!(ask(one.clone()).await, "b1");
        assert_eq!(ask(two.clone()).await, "b2");
        assert_eq!(ask(one.clone()).await, "b1", "a flow keeps its backend");
        assert_eq!(proxy.stats()[&service.frontend].active, 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.stats()[&service.frontend].active > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = proxy.stats()[&service.frontend];
        assert_eq!(stats.active, 0, "idle flows must end: {stats:?}");
        // The same client starts a new flow, on the next backend in turn.
        assert_eq!(ask(one).await, "b1");
        assert_eq!(proxy.stats()[&service.frontend].connections, 3);
    }

    #[test]
    fn new_outside_a_runtime_is_an_error() {
        assert!(matches!(
            ProxyDataplane::new(),
            Err(DataplaneError::NoRuntime)
        ));
    }
}
