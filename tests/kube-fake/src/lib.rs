//! In-memory Kubernetes API server for xlb's tests.
//!
//! It speaks the Kubernetes REST protocol over plain HTTP on loopback, so the real
//! kube-rs client and the real `kubectl` talk to it unchanged. Its behaviour is
//! checked against exchanges recorded from a real kube-apiserver v1.36
//! (`shared/kube-api/`, replayed by `tests/conformance.rs`).
//!
//! ```no_run
//! # async fn demo() {
//! let server = kube_fake::Server::start().await.expect("kube-fake starts");
//! let kubeconfig = server.kubeconfig_yaml(); // server: http://127.0.0.1:PORT
//! server.faults().drop_watches();            // every open watch ends now
//! # }
//! ```
//!
//! # What it serves
//! - Discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`,
//!   aggregated discovery) and OpenAPI (`/openapi/v2`, `/openapi/v3` and the per-group
//!   v3 documents), exactly as recorded. They are read at start from
//!   `shared/kube-api/` beside the repository, or from `$XLB_KUBE_API_FIXTURES`.
//! - core/v1 Services and Nodes (with `status`), Namespaces, Endpoints, Events;
//!   discovery.k8s.io/v1 EndpointSlices; coordination.k8s.io/v1 Leases;
//!   events.k8s.io/v1 Events (the same objects as core Events).
//! - get, list (selectors, `limit`/`continue`, `resourceVersion`/`resourceVersionMatch`),
//!   watch (history replay, bookmarks, `sendInitialEvents`, `410` as an `ERROR` event,
//!   `timeoutSeconds`), create, update, JSON merge / JSON / strategic merge patch,
//!   server-side apply with managedFields and conflicts, delete with finalizers,
//!   delete of a collection; `Table` and `PartialObjectMetadata` representations.
//! - Service allocation, defaulting and validation as the real server does it
//!   (ClusterIP from 10.96.0.0/16, NodePorts from 30000–32767).
//!
//! # Known differences from a real kube-apiserver
//! - Plain HTTP, no authentication or authorization, no admission webhooks, no
//!   audit; every client is a cluster admin. No protobuf and no CBOR: requests for
//!   `application/vnd.kubernetes.protobuf` are answered in JSON (as the real server
//!   does for custom resources). No gzip.
//! - Only the kinds above are stored. Discovery and OpenAPI are the recorded
//!   documents, so they list every built-in resource; requests for any other
//!   resource (pods, configmaps, deployments, …) answer `404 NotFound`.
//! - Only the validation the controller meets is done: Service types, ports (range,
//!   protocol, names, duplicates), node ports (range, taken, duplicates), ClusterIP
//!   (range, taken), `status.loadBalancer.ingress` (IP, `ipMode`), traffic policies,
//!   session affinity, and required names. Other kinds are stored as sent (plus the
//!   zero-valued fields Go serializes). No `fieldValidation=Strict` checking of unknown
//!   fields. `dryRun` is not supported (the write happens).
//! - Field ownership (managedFields) follows structured-merge-diff for the list and map
//!   types the xlb objects use (see `schema.rs`); other lists are treated as atomic.
//!   `managedFields` sent by a client in an update are ignored rather than honoured.
//!   Entries are sorted by operation, time, manager and subresource like the real
//!   server, but with times from this server's clock.
//! - Strategic merge patch knows the merge keys of Service ports, Node addresses and
//!   conditions, finalizers and ownerReferences; `$setElementOrder` and `$retainKeys`
//!   directives are accepted and ignored; other lists are replaced.
//! - ClusterIPs and NodePorts are allocated at random from the whole range (the real
//!   allocator prefers the upper band for dynamic allocation). Only IPv4 single-stack.
//! - Watches: without `timeoutSeconds` a watch ends after 30 minutes (the real server
//!   picks 30–60). A bookmark is sent 2 s before the `timeoutSeconds` deadline and
//!   every [`Config::bookmark_interval`]. A watch from a resourceVersion newer than
//!   the store's starts at the current one instead of waiting. A watch that falls
//!   behind by more than 4096 changes ends with a `410 Expired` `ERROR` event.
//! - The event window is a count of changes across all kinds ([`Config::history_limit`],
//!   [`Server::compact`]), not a per-resource watch cache; lists with
//!   `resourceVersionMatch=Exact` and continue tokens are served from it and answer
//!   `410` once it has moved past them.
//! - `remainingItemCount` is only given for lists without selectors (as the real server
//!   when it can count cheaply).
//! - DELETE: `propagationPolicy`, `gracePeriodSeconds` and `orphan` are ignored (there is
//!   no garbage collector); preconditions are honoured. Deleting a Namespace removes it
//!   at once without deleting its contents. Services and Namespaces answer the deleted
//!   object, others a `Status`, as the real server does.
//! - PUT on a missing object answers `404` for every kind (the real server creates
//!   Events and Endpoints on update).
//! - Table representations exist for Services, Nodes, Events, Namespaces and Leases; other
//!   kinds get Name and Age columns. Column descriptions come from the OpenAPI document.
//! - The fault hooks ([`Faults`]) have no counterpart in a real server.

mod api;
mod discovery;
mod events;
mod faults;
mod fieldset;
mod http;
mod meta;
mod patch;
mod resources;
mod schema;
mod selectors;
mod server;
mod services;
mod status;
mod store;
mod table;
mod watch;

pub use discovery::{DocsError, FIXTURES_ENV};
pub use faults::{Faults, RequestRecord};
pub use server::{Config, Server, StartError, kubeconfig_yaml};
