//! The UDP side of the proxy: a flow per client address, each with its own connected
//! upstream socket toward a round-robin backend, ended after the idle timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::{ActiveGuard, Counters, DATAGRAM, MAX_UDP_FLOWS, Shared, describe, lock};

/// The UDP flows of one frontend, by client address.
pub(super) type Flows = Arc<Mutex<HashMap<SocketAddr, UdpFlow>>>;

/// One UDP client and its upstream socket.
pub(super) struct UdpFlow {
    upstream: Arc<UdpSocket>,
    activity: Arc<Activity>,
    pub(super) replies: AbortHandle,
}

/// When a UDP flow last carried a datagram.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// Receives the datagrams of a UDP frontend and forwards each to its flow's upstream socket,
/// starting a flow for a new client.
pub(super) async fn udp_loop(socket: Arc<UdpSocket>, shared: Arc<Shared>, flows: Flows) {
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(frontend = %describe(&shared.frontend), %error, "proxy UDP receive failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let existing = lock(&flows)
            .get(&client)
            .map(|flow| (flow.upstream.clone(), flow.activity.clone()));
        let flow = match existing {
            Some(flow) => Some(flow),
            None => start_flow(&socket, &shared, &flows, client).await,
        };
        let Some((upstream, activity)) = flow else {
            Counters::bump(&shared.counters.dropped);
            continue;
        };
        activity.touch();
        let Some(datagram) = buf.get(..len) else {
            continue;
        };
        // Counted before sending, so the counter is up to date by the time an answer can
        // come back.
        shared
            .counters
            .bytes_to_backends
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        if let Err(error) = upstream.send(datagram).await {
            Counters::bump(&shared.counters.backend_failures);
            tracing::debug!(frontend = %describe(&shared.frontend), %client, %error, "proxy UDP send to backend failed");
        }
    }
}

/// Opens an upstream socket for `client` toward the next backend that can be routed to, and
/// spawns the task relaying its answers.
async fn start_flow(
    frontend: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
    flows: &Flows,
    client: SocketAddr,
) -> Option<(Arc<UdpSocket>, Arc<Activity>)> {
    if lock(flows).len() >= MAX_UDP_FLOWS {
        tracing::debug!(frontend = %describe(&shared.frontend), %client, "proxy UDP flow table full");
        return None;
    }
    for backend in shared.pick() {
        let upstream = match UdpSocket::bind("0.0.0.0:0").await {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::warn!(frontend = %describe(&shared.frontend), %error, "proxy cannot open a UDP socket");
                return None;
            }
        };
        if let Err(error) = upstream.connect(backend).await {
            Counters::bump(&shared.counters.backend_failures);
            tracing::warn!(frontend = %describe(&shared.frontend), %backend, %error, "proxy cannot reach a UDP backend; trying the next");
            continue;
        }
        let upstream = Arc::new(upstream);
        let activity = Arc::new(Activity::new());
        let active = ActiveGuard::new(shared);
        let replies = tokio::spawn(udp_replies(
            frontend.clone(),
            upstream.clone(),
            activity.clone(),
            client,
            shared.clone(),
            flows.clone(),
            active,
        ))
        .abort_handle();
        lock(flows).insert(
            client,
            UdpFlow {
                upstream: upstream.clone(),
                activity: activity.clone(),
                replies,
            },
        );
        return Some((upstream, activity));
    }
    None
}

/// Relays a UDP flow's answers back to its client from `VIP:port` until the flow has been
/// idle for the UDP idle timeout, then removes it.
async fn udp_replies(
    frontend: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    activity: Arc<Activity>,
    client: SocketAddr,
    shared: Arc<Shared>,
    flows: Flows,
    _active: ActiveGuard,
) {
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        let idle = activity.idle();
        let limit = shared.timeouts.udp_idle;
        if idle >= limit {
            let mut flows = lock(&flows);
            if flows
                .get(&client)
                .is_some_and(|flow| Arc::ptr_eq(&flow.upstream, &upstream))
            {
                flows.remove(&client);
            }
            return;
        }
        let received = match tokio::time::timeout(limit - idle, upstream.recv(&mut buf)).await {
            Err(_) => continue,
            Ok(received) => received,
        };
        let len = match received {
            Ok(len) => len,
            Err(error) => {
                // ECONNREFUSED after an ICMP port unreachable: the backend is not listening.
                Counters::bump(&shared.counters.backend_failures);
                tracing::debug!(frontend = %describe(&shared.frontend), %client, %error, "proxy UDP receive from backend failed");
                continue;
            }
        };
        activity.touch();
        let Some(datagram) = buf.get(..len) else {
            continue;
        };
        shared
            .counters
            .bytes_to_clients
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        if let Err(error) = frontend.send_to(datagram, client).await {
            tracing::debug!(frontend = %describe(&shared.frontend), %client, %error, "proxy UDP send to client failed");
        }
    }
}
