//! The object store: every object as JSON, one resourceVersion counter shared by
//! all of them, and a bounded history of changes that watches and old-version lists
//! are served from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

/// Where an object lives: store name (`services`, `events`, …), namespace (empty
/// for cluster-scoped objects) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The store of the resource (shared by all versions of a kind).
    pub storage: &'static str,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

/// The kind of a change, as watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted.
    Deleted,
}

/// One committed change.
#[derive(Debug)]
pub struct Change {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// Which object.
    pub key: Key,
    /// Created, updated or deleted.
    pub kind: ChangeType,
    /// The object after the change (for a delete, the last state with the delete's
    /// resourceVersion).
    pub object: Value,
    /// The object before the change.
    pub prev: Option<Value>,
}

/// A receiver of the changes to come.
pub type Subscription = broadcast::Receiver<Arc<Change>>;

/// The resourceVersion asked for is older than the history kept.
#[derive(Debug, thiserror::Error)]
#[error("too old resource version: {requested} ({oldest})")]
pub struct TooOld {
    /// What was asked for.
    pub requested: u64,
    /// The oldest version still served.
    pub oldest: u64,
}

/// The mutable state, reached through [`Store::lock`].
#[derive(Debug)]
pub struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// Changes after this version are all in `history`.
    oldest: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

/// The store, shared by all requests.
#[derive(Debug)]
pub struct Store {
    state: Mutex<State>,
}

impl Store {
    /// An empty store keeping at most `history_limit` changes.
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Store {
            state: Mutex::new(State {
                rv: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: history_limit.max(1),
                oldest: 0,
                tx,
            }),
        }
    }

    /// Locks the store. Everything a request does to the store happens under one
    /// lock, so a request sees and writes a consistent state.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion watches and lists can still start from.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// One object.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The objects of a store, in one namespace or all, sorted by namespace and name.
    pub fn list(&self, storage: &str, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.storage == storage && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The objects as they were at `rv`, rebuilt from the history.
    pub fn list_at(
        &self,
        rv: u64,
        storage: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<Value>, TooOld> {
        if rv >= self.rv {
            return Ok(self.list(storage, namespace));
        }
        if rv < self.oldest {
            return Err(TooOld {
                requested: rv,
                oldest: self.oldest,
            });
        }
        let mut objects: BTreeMap<Key, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.storage == storage)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if change.key.storage != storage {
                continue;
            }
            match &change.prev {
                Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects
            .into_iter()
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
            .collect())
    }

    /// The changes after `rv`, and a receiver for the ones to come.
    pub fn watch_from(&self, rv: u64) -> Result<(Vec<Arc<Change>>, Subscription), TooOld> {
        if rv < self.oldest {
            return Err(TooOld {
                requested: rv,
                oldest: self.oldest,
            });
        }
        let past = self.history.iter().filter(|c| c.rv > rv).cloned().collect();
        Ok((past, self.tx.subscribe()))
    }

    /// A receiver for the changes to come.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Writes (`Some`) or deletes (`None`) an object with a new resourceVersion and
    /// tells the watchers. Returns the object as written (or as last seen, for a
    /// delete), with its new resourceVersion.
    pub fn commit(&mut self, key: Key, new: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let prev = self.objects.get(&key).cloned();
        let (kind, mut object) = match (new, &prev) {
            (Some(obj), None) => (ChangeType::Added, obj),
            (Some(obj), Some(_)) => (ChangeType::Modified, obj),
            (None, Some(prev)) => (ChangeType::Deleted, prev.clone()),
            (None, None) => (ChangeType::Deleted, Value::Null),
        };
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        match kind {
            ChangeType::Deleted => self.objects.remove(&key),
            _ => self.objects.insert(key.clone(), object.clone()),
        };
        let change = Arc::new(Change {
            rv,
            key,
            kind,
            object: object.clone(),
            prev,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.rv;
            }
        }
        // Nobody listening is fine.
        let _ = self.tx.send(change);
        object
    }

    /// Forgets the whole history: watches from any version up to now, and lists at
    /// any earlier version, get `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv + 1;
    }

    /// Changes how many changes are kept.
    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(1);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.rv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> Key {
        Key {
            storage: "services",
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn list_at_rebuilds_old_state_and_expires() {
        let store = Store::new(2);
        let mut s = store.lock();
        s.commit(key("a"), Some(json!({"metadata": {"name": "a"}, "v": 1})));
        let rv1 = s.rv();
        s.commit(key("a"), Some(json!({"metadata": {"name": "a"}, "v": 2})));
        s.commit(key("b"), Some(json!({"metadata": {"name": "b"}})));
        let old = s
            .list_at(rv1, "services", Some("default"))
            .expect("in window");
        assert_eq!(old.len(), 1);
        assert_eq!(old[0]["v"], 1);
        assert!(s.list_at(0, "services", None).is_err());
        assert!(s.watch_from(0).is_err());
        s.compact();
        assert!(s.watch_from(rv1).is_err());
    }
}
