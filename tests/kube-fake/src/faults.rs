//! Fault injection for tests: drop watch connections, refuse requests, add latency; and the
//! log of every request, so tests can count what a client sent during a fault.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug)]
struct State {
    /// `Some(None)`: refuse until cleared; `Some(Some(t))`: refuse until `t`.
    refuse: Option<Option<Instant>>,
    latency: Duration,
    requests: Vec<RequestRecord>,
}

/// One request the server received (fault-control requests excepted).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When it arrived.
    pub at: Instant,
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path and query, e.g. `/api/v1/services?watch=true`.
    pub uri: String,
    /// The `User-Agent` header, if any.
    pub user_agent: Option<String>,
    /// Whether it was answered `503` by the refusal fault.
    pub refused: bool,
}

/// A handle on the faults of one server. Cheap to clone; all clones act on the
/// same server.
#[derive(Debug, Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
    drop_tx: Arc<watch::Sender<u64>>,
}

impl Default for Faults {
    fn default() -> Self {
        let (drop_tx, _) = watch::channel(0);
        Faults {
            state: Arc::new(Mutex::new(State {
                refuse: None,
                latency: Duration::ZERO,
                requests: Vec::new(),
            })),
            drop_tx: Arc::new(drop_tx),
        }
    }
}

impl Faults {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every open watch stream now, as if the connections broke. The stream
    /// ends without a final event; clients reconnect.
    pub fn drop_watches(&self) {
        self.drop_tx.send_modify(|generation| *generation += 1);
    }

    /// Answers every request with `503 Service Unavailable` for `duration`, and
    /// drops the open watches.
    pub fn refuse_for(&self, duration: Duration) {
        self.state().refuse = Some(Some(Instant::now() + duration));
        self.drop_watches();
    }

    /// Answers every request with `503 Service Unavailable` until [`Faults::clear`],
    /// and drops the open watches.
    pub fn refuse(&self) {
        self.state().refuse = Some(None);
        self.drop_watches();
    }

    /// Delays every answer (and every watch event) by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Stops refusing requests and removes the latency.
    pub fn clear(&self) {
        let mut state = self.state();
        state.refuse = None;
        state.latency = Duration::ZERO;
    }

    /// Whether requests are refused right now.
    pub fn refusing(&self) -> bool {
        match self.state().refuse {
            None => false,
            Some(None) => true,
            Some(Some(until)) => Instant::now() < until,
        }
    }

    /// The current added latency.
    pub fn latency(&self) -> Duration {
        self.state().latency
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state().requests.clone()
    }

    pub(crate) fn record(&self, request: RequestRecord) {
        self.state().requests.push(request);
    }

    /// A receiver that changes whenever watches must be dropped.
    pub(crate) fn drop_signal(&self) -> watch::Receiver<u64> {
        self.drop_tx.subscribe()
    }
}
