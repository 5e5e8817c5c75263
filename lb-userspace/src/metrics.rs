//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` on a small HTTP listener.
//!
//! The controller updates the control-plane figures of [`Metrics`] after every reconcile; the
//! data plane's counters (XDP's per-CPU maps, the proxy's per-frontend counters) are read when
//! `/metrics` is scraped, so they are current when read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::backoff::Backoff;
use crate::dataplane::proxy::{ProxyCounters, ProxyStats};

/// A proxy counter family: name, help text, and how to read it from [`ProxyStats`].
type ProxyFamily = (&'static str, &'static str, fn(&ProxyStats) -> u64);

/// What the controller reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The last plan was applied: with `synced`, `/readyz` answers 200.
    pub applied: AtomicBool,
    /// Every watch of the source has listed since its last failure.
    pub synced: AtomicBool,
    /// Reconciles run since start.
    pub reconciles: AtomicU64,
    /// Reconciles whose plan could not be fully applied.
    pub apply_errors: AtomicU64,
    /// Virtual services (`VIP:port/proto`) programmed.
    pub virtual_services: AtomicU64,
    /// VIPs placed on the device.
    pub vips: AtomicU64,
    /// Where the XDP data plane's maps are pinned, once it runs: its counters are read from
    /// there at scrape time.
    pub xdp_pins: OnceLock<PathBuf>,
    /// The userspace proxy's counters, read at scrape time.
    pub proxy: OnceLock<ProxyCounters>,
    /// Failed attempts of the proxy to listen on a frontend, by reason label.
    pub proxy_listen_failures: Mutex<Vec<(&'static str, u64)>>,
    /// Frontends the proxy should listen on and does not (the bind failed).
    pub proxy_not_listening: AtomicU64,
    /// How long the last renewal of this node's Lease took, in microseconds.
    pub lease_renew_micros: AtomicU64,
    /// This instance is the one writer (several LB nodes; 1 when alone).
    pub writer: AtomicBool,
    /// The VIPs this node announces (puts on its device).
    pub owned_vips: Mutex<Vec<std::net::Ipv4Addr>>,
    /// Times the announcer of a VIP changed, as seen by this instance.
    pub ownership_changes: AtomicU64,
}

impl Metrics {
    /// Records how long a Lease renewal took.
    pub fn set_lease_renew(&self, took: Duration) {
        self.lease_renew_micros.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Records what `/readyz` reports.
    pub fn set_ready(&self, applied: bool, synced: bool) {
        self.applied.store(applied, Ordering::Relaxed);
        self.synced.store(synced, Ordering::Relaxed);
    }

    /// Ready, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.synced.load(Ordering::Relaxed) {
            Err("the Kubernetes watches are not in sync (API server unreachable or re-listing)")
        } else if !self.applied.load(Ordering::Relaxed) {
            Err("the last plan was not fully applied (see the log)")
        } else {
            Ok(())
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        gauge(
            &mut out,
            "xlb_ready",
            "1 when every watch is in sync and the last plan applied",
            "gauge",
            self.readiness().is_ok().into(),
        );
        gauge(
            &mut out,
            "xlb_reconciles_total",
            "Reconciles run since start",
            "counter",
            self.reconciles.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "xlb_apply_errors_total",
            "Reconciles whose plan could not be fully applied",
            "counter",
            self.apply_errors.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "xlb_virtual_services",
            "VIP:port/protocol entries programmed",
            "gauge",
            self.virtual_services.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "xlb_vips",
            "Addresses placed on the device",
            "gauge",
            self.vips.load(Ordering::Relaxed),
        );
        out.push_str("# HELP xlb_dataplane_packets_total Data plane counters by name\n# TYPE xlb_dataplane_packets_total counter\n");
        if let Some(dir) = self.xdp_pins.get() {
            match crate::inspect::counters(dir) {
                Ok(counters) => {
                    for (name, value) in counters {
                        out.push_str(&format!(
                            "xlb_dataplane_packets_total{{counter=\"{name}\"}} {value}\n"
                        ));
                    }
                }
                Err(error) => tracing::debug!(%error, "reading the data plane counters"),
            }
        }
        gauge(
            &mut out,
            "xlb_writer",
            "1 when this instance is the one that allocates and writes Service status and Events",
            "gauge",
            self.writer.load(Ordering::Relaxed).into(),
        );
        gauge(
            &mut out,
            "xlb_ownership_changes_total",
            "Times the LB node announcing a VIP changed",
            "counter",
            self.ownership_changes.load(Ordering::Relaxed),
        );
        out.push_str(&format!(
            "# HELP xlb_lease_renew_seconds How long the last renewal of this node's Lease took\n# TYPE xlb_lease_renew_seconds gauge\nxlb_lease_renew_seconds {:.6}\n",
            self.lease_renew_micros.load(Ordering::Relaxed) as f64 / 1e6
        ));
        out.push_str(
            "# HELP xlb_vip_owned 1 for each VIP this node announces\n# TYPE xlb_vip_owned gauge\n",
        );
        if let Ok(vips) = self.owned_vips.lock() {
            for vip in vips.iter() {
                out.push_str(&format!("xlb_vip_owned{{vip=\"{vip}\"}} 1\n"));
            }
        }
        gauge(
            &mut out,
            "xlb_proxy_frontends_not_listening",
            "Frontends the userspace proxy should listen on and cannot (retried)",
            "gauge",
            self.proxy_not_listening.load(Ordering::Relaxed),
        );
        out.push_str("# HELP xlb_proxy_listen_failures_total Failed attempts of the userspace proxy to listen on a frontend, by reason\n# TYPE xlb_proxy_listen_failures_total counter\n");
        if let Ok(failures) = self.proxy_listen_failures.lock() {
            for (reason, count) in failures.iter() {
                out.push_str(&format!(
                    "xlb_proxy_listen_failures_total{{reason=\"{reason}\"}} {count}\n"
                ));
            }
        }
        if let Some(counters) = self.proxy.get() {
            let frontends = counters.snapshot();
            let families: [ProxyFamily; 6] = [
                (
                    "xlb_proxy_connections_total",
                    "TCP connections accepted and UDP flows started by the userspace proxy",
                    |s| s.connections,
                ),
                (
                    "xlb_proxy_bytes_to_backends_total",
                    "Bytes the userspace proxy relayed from clients to backends",
                    |s| s.bytes_to_backends,
                ),
                (
                    "xlb_proxy_bytes_to_clients_total",
                    "Bytes the userspace proxy relayed from backends to clients",
                    |s| s.bytes_to_clients,
                ),
                (
                    "xlb_proxy_backend_failures_total",
                    "Backend connects that failed or timed out, and upstream errors, in the userspace proxy",
                    |s| s.backend_failures,
                ),
                (
                    "xlb_proxy_dropped_total",
                    "Connections and datagrams the userspace proxy closed or dropped for want of a backend",
                    |s| s.dropped,
                ),
                (
                    "xlb_proxy_accept_errors_total",
                    "Accepts that failed in the userspace proxy (out of descriptors or memory) and were retried",
                    |s| s.accept_errors,
                ),
            ];
            for (name, help, value) in families {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
                for (frontend, stats) in frontends.iter() {
                    out.push_str(&format!(
                        "{name}{{frontend=\"{}:{}/{}\"}} {}\n",
                        frontend.vip,
                        frontend.port,
                        frontend.protocol,
                        value(stats)
                    ));
                }
            }
            out.push_str("# HELP xlb_proxy_active Connections and UDP flows open in the userspace proxy\n# TYPE xlb_proxy_active gauge\n");
            for (frontend, stats) in frontends.iter() {
                out.push_str(&format!(
                    "xlb_proxy_active{{frontend=\"{}:{}/{}\"}} {}\n",
                    frontend.vip, frontend.port, frontend.protocol, stats.active
                ));
            }
        }
        out
    }
}

/// Errors opening the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen on {addr} for /metrics, /healthz and /readyz: {source}; another program (or another xlb) holds that address: stop it or choose another --metrics-addr"
    )]
    InUse {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot listen on {addr} for /metrics, /healthz and /readyz: {source}; check --metrics-addr"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the listener at start, so an address that is taken stops xlb with a clear message
/// instead of leaving it without probes.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            MetricsError::InUse { addr, source }
        } else {
            MetricsError::Bind { addr, source }
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(listener)
}

/// Serves the endpoints until the task is dropped. A failed accept (out of descriptors, out of
/// memory) is logged once per streak and retried with backoff: the DaemonSet's probes depend
/// on this listener, so no error ends it.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    let addr = listener.local_addr().ok();
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "cannot serve /metrics, /healthz and /readyz");
            return;
        }
    };
    tracing::info!(addr = ?addr, "serving /metrics, /healthz and /readyz");
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut failing = false;
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => {
                if failing {
                    tracing::info!("the metrics listener accepts connections again");
                    failing = false;
                    backoff.reset();
                }
                stream
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "the metrics listener cannot accept; retrying");
                    failing = true;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(Ok(read)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await
            else {
                return;
            };
            let path = std::str::from_utf8(&request[..read])
                .ok()
                .and_then(|text| text.split_whitespace().nth(1))
                .unwrap_or("");
            let (code, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" => match metrics.readiness() {
                    Ok(()) => ("200 OK", "ready\n".to_owned()),
                    Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
                },
                "/metrics" => ("200 OK", metrics.render()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Dataplane as _;
    use crate::dataplane::proxy::ProxyDataplane;
    use crate::model::{Frontend, VirtualService};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port")
    }

    /// The proxy's counters are read when `/metrics` is rendered: a connection accepted after
    /// the metrics were set up shows without any refresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn render_lists_every_metric_with_its_value() {
        let metrics = Metrics::default();
        metrics.set_ready(true, true);
        metrics.vips.store(3, Ordering::Relaxed);
        let mut proxy = ProxyDataplane::new().expect("inside a runtime");
        let frontend = Frontend {
            vip: "127.0.0.1".parse().expect("literal"),
            port: free_port(),
            protocol: crate::model::Protocol::Tcp,
        };
        proxy
            .apply(&[VirtualService {
                frontend,
                backends: vec![crate::model::Backend {
                    ip: frontend.vip,
                    port: 9,
                }],
                owner: "default/web".to_owned(),
            }])
            .expect("listen");
        metrics.proxy.set(proxy.counters()).expect("set once");
        let client = std::net::TcpStream::connect((frontend.vip, frontend.port)).expect("connect");
        let label = format!("frontend=\"127.0.0.1:{}/TCP\"", frontend.port);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !metrics
            .render()
            .contains(&format!("xlb_proxy_connections_total{{{label}}} 1\n"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the accepted connection never showed: {}",
                metrics.render()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        let text = metrics.render();
        assert!(text.contains("\nxlb_ready 1\n"), "{text}");
        assert!(text.contains("\nxlb_vips 3\n"), "{text}");
        assert!(
            !text.contains("xlb_dataplane_packets_total{"),
            "no XDP, no counters: {text}"
        );
    }
}
