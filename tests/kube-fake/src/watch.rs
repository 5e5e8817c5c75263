//! Watch streams: newline-delimited JSON events, replayed from the store's history,
//! with bookmarks, streaming initial lists (`sendInitialEvents`), `410 Gone` as an
//! `ERROR` event, `timeoutSeconds`, and the fault hook that drops connections.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::api::{self, Request, Selectors};
use crate::resources::Resource;
use crate::server::Shared;
use crate::status::{ApiError, expired_watch_status};
use crate::store::{Change, ChangeType};
use crate::table::{self, Format};

/// Without `timeoutSeconds`, the real server closes a watch after a random time
/// between 30 and 60 minutes; this server after 30.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// A bookmark is sent this long before the deadline.
const BOOKMARK_BEFORE_DEADLINE: Duration = Duration::from_secs(2);

/// Everything a watch needs, taken from the request.
struct Watch {
    shared: Arc<Shared>,
    res: &'static Resource,
    namespace: Option<String>,
    selectors: Selectors,
    format: Format,
    bookmarks: bool,
    /// Whether the next Table event still needs column definitions.
    columns_sent: bool,
    tx: mpsc::Sender<Bytes>,
}

/// Starts a watch. Returns the receiving end of the stream of lines.
pub fn start(shared: Arc<Shared>, req: &Request) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let selectors = Selectors::parse(req)?;
    let timeout = match req.query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => DEFAULT_TIMEOUT,
    };
    let rv = req.query.get("resourceVersion").unwrap_or_default();
    let from = match rv {
        "" | "0" => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("invalid resource version: {rv}")))?,
        ),
    };
    let initial_events = req.query.flag("sendInitialEvents") || from.is_none();
    let end_marker = req.query.flag("sendInitialEvents");
    let (tx, rx) = mpsc::channel(256);
    let mut watch = Watch {
        shared: shared.clone(),
        res: req.res,
        namespace: req.namespace.clone(),
        selectors,
        format: req.format,
        bookmarks: req.query.flag("allowWatchBookmarks"),
        columns_sent: false,
        tx,
    };
    let drop_signal = shared.faults.drop_signal();

    // Decide, under the store lock, what comes first and where live events start.
    let state = shared.store.lock();
    let start_rv = state.rv();
    let (first, live): (Vec<Value>, Option<broadcast::Receiver<Arc<Change>>>) = if initial_events {
        let matching: Vec<Value> = state
            .list(req.res.storage, req.namespace.as_deref())
            .into_iter()
            .filter(|o| watch.selectors.matches(o))
            .collect();
        let initial = matching
            .iter()
            .filter_map(|o| watch.event("ADDED", o))
            .collect();
        (initial, Some(state.subscribe()))
    } else {
        match state.watch_from(from.unwrap_or_default()) {
            Ok((past, live)) => (
                past.iter().filter_map(|c| watch.change(c)).collect(),
                Some(live),
            ),
            Err(too_old) => (
                vec![
                    json!({ "type": "ERROR", "object": expired_watch_status(too_old.requested, too_old.oldest) }),
                ],
                None,
            ),
        }
    };
    drop(state);
    let last_rv = if initial_events {
        start_rv
    } else {
        from.unwrap_or(start_rv).max(start_rv)
    };
    tokio::spawn(async move {
        watch
            .run(first, live, last_rv, end_marker, timeout, drop_signal)
            .await;
    });
    Ok(rx)
}

impl Watch {
    fn matches_scope(&self, obj: &Value) -> bool {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        self.namespace.as_deref().is_none_or(|want| want == ns) && self.selectors.matches(obj)
    }

    /// A watch event for a stored object, in the requested representation.
    fn event(&mut self, kind: &str, stored: &Value) -> Option<Value> {
        let obj = api::external(self.res, stored);
        let object = match self.format {
            Format::Object => obj,
            Format::Metadata => table::partial_metadata(&obj),
            Format::Table => {
                let mut meta = Map::new();
                meta.insert(
                    "resourceVersion".into(),
                    obj.pointer("/metadata/resourceVersion")
                        .cloned()
                        .unwrap_or(Value::Null),
                );
                let with_columns = !self.columns_sent;
                self.columns_sent = true;
                table::table(&self.shared.docs, self.res, &[obj], meta, with_columns)
            }
        };
        Some(json!({ "type": kind, "object": object }))
    }

    /// The event a change makes for this watch, if any: objects moving into the
    /// selection are ADDED, out of it DELETED.
    fn change(&mut self, change: &Change) -> Option<Value> {
        if change.key.storage != self.res.storage {
            return None;
        }
        let now = self.matches_scope(&change.object);
        let before = change.prev.as_ref().is_some_and(|p| self.matches_scope(p));
        let kind = match (change.kind, before, now) {
            (ChangeType::Deleted, true, _) => "DELETED",
            (ChangeType::Deleted, false, _) => return None,
            (_, false, true) => "ADDED",
            (_, true, true) => "MODIFIED",
            (_, true, false) => "DELETED",
            (_, false, false) => return None,
        };
        self.event(kind, &change.object)
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Value {
        let mut object = api::external(self.res, &self.res.zero_object());
        let mut meta = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        object["metadata"] = meta;
        json!({ "type": "BOOKMARK", "object": object })
    }

    async fn send(&self, event: &Value) -> bool {
        let latency = self.shared.faults.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    async fn run(
        mut self,
        first: Vec<Value>,
        live: Option<broadcast::Receiver<Arc<Change>>>,
        mut last_rv: u64,
        end_marker: bool,
        timeout: Duration,
        mut drop_signal: tokio::sync::watch::Receiver<u64>,
    ) {
        drop_signal.mark_unchanged();
        for event in &first {
            if !self.send(event).await {
                return;
            }
        }
        let Some(mut live) = live else { return };
        if end_marker && self.bookmarks && !self.send(&self.bookmark(last_rv, true)).await {
            return;
        }
        let deadline = Instant::now() + timeout;
        let interval = self.shared.config.bookmark_interval;
        let mut next_bookmark = next_bookmark_at(Instant::now(), deadline, interval);
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(change) => {
                        if change.rv <= last_rv {
                            continue;
                        }
                        last_rv = change.rv;
                        if let Some(event) = self.change(&change)
                            && !self.send(&event).await
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let oldest = self.shared.store.lock().oldest();
                        let error = json!({ "type": "ERROR", "object": expired_watch_status(last_rv, oldest) });
                        self.send(&error).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(next_bookmark), if self.bookmarks => {
                    if !self.send(&self.bookmark(last_rv, false)).await {
                        return;
                    }
                    next_bookmark = next_bookmark_at(Instant::now(), deadline, interval);
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = drop_signal.changed() => return,
                _ = self.tx.closed() => return,
            }
        }
    }
}

/// When the next bookmark is due: after `interval`, or shortly before the deadline,
/// whichever comes first (never in the past, never twice for the deadline).
fn next_bookmark_at(now: Instant, deadline: Instant, interval: Duration) -> Instant {
    let before_deadline = deadline
        .checked_sub(BOOKMARK_BEFORE_DEADLINE)
        .unwrap_or(deadline);
    let periodic = now + interval;
    if before_deadline > now {
        periodic.min(before_deadline)
    } else {
        // Past the pre-deadline bookmark: only periodic ones, if before the deadline.
        if periodic < deadline {
            periodic
        } else {
            deadline + interval
        }
    }
}
