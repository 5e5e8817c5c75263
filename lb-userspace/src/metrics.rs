//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` on a small HTTP listener.
//!
//! The controller updates [`Metrics`] after every reconcile; the listener only reads it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::dataplane::proxy::ProxyStats;
use crate::model::Frontend;

/// A proxy counter family: name, help text, and how to read it from [`ProxyStats`].
type ProxyFamily = (&'static str, &'static str, fn(&ProxyStats) -> u64);

/// What the controller reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The source is connected and the last plan was applied: `/readyz` answers 200.
    pub ready: AtomicBool,
    /// Reconciles run since start.
    pub reconciles: AtomicU64,
    /// Reconciles whose plan could not be fully applied.
    pub apply_errors: AtomicU64,
    /// Virtual services (`VIP:port/proto`) programmed.
    pub virtual_services: AtomicU64,
    /// VIPs placed on the device.
    pub vips: AtomicU64,
    /// Data plane counters (name, value), refreshed after each reconcile and on scrape.
    pub dataplane: Mutex<Vec<(String, u64)>>,
    /// Userspace proxy counters per frontend, refreshed after each reconcile.
    pub proxy: Mutex<Vec<(Frontend, ProxyStats)>>,
}

impl Metrics {
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
            "1 when the source is connected and the last plan applied",
            "gauge",
            self.ready.load(Ordering::Relaxed).into(),
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
        if let Ok(counters) = self.dataplane.lock() {
            for (name, value) in counters.iter() {
                out.push_str(&format!(
                    "xlb_dataplane_packets_total{{counter=\"{name}\"}} {value}\n"
                ));
            }
        }
        if let Ok(frontends) = self.proxy.lock() {
            let families: [ProxyFamily; 5] = [
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

/// Serves the endpoints on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(Ok(read)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut request))
                    .await
            else {
                return;
            };
            let path = std::str::from_utf8(&request[..read])
                .ok()
                .and_then(|text| text.split_whitespace().nth(1))
                .unwrap_or("");
            let (code, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "ready\n".to_owned())
                }
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
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

    #[test]
    fn render_lists_every_metric_with_its_value() {
        let metrics = Metrics::default();
        metrics.ready.store(true, Ordering::Relaxed);
        metrics.vips.store(3, Ordering::Relaxed);
        *metrics.dataplane.lock().expect("lock") = vec![("tx".into(), 42)];
        *metrics.proxy.lock().expect("lock") = vec![(
            Frontend {
                vip: "198.51.100.10".parse().expect("literal"),
                port: 80,
                protocol: crate::model::Protocol::Tcp,
            },
            ProxyStats {
                connections: 7,
                ..ProxyStats::default()
            },
        )];
        let text = metrics.render();
        assert!(text.contains("\nxlb_ready 1\n"), "{text}");
        assert!(text.contains("\nxlb_vips 3\n"), "{text}");
        assert!(
            text.contains("xlb_dataplane_packets_total{counter=\"tx\"} 42\n"),
            "{text}"
        );
        assert!(
            text.contains("xlb_proxy_connections_total{frontend=\"198.51.100.10:80/TCP\"} 7\n"),
            "{text}"
        );
    }
}
