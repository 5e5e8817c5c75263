//! The resource types the server stores, and what the real server knows about each.

use serde_json::{Value, json};

/// One served resource (a group/version/plural).
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group, empty for core.
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural resource name in URLs.
    pub plural: &'static str,
    /// The Kind.
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether the resource has a `status` subresource (spec and status written separately).
    pub status: bool,
    /// Whether `metadata.generation` is maintained.
    pub generation: bool,
    /// Name of the store shared by all versions of the same objects (core and
    /// events.k8s.io Events share one).
    pub storage: &'static str,
}

/// Everything the server serves.
pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status: true,
        generation: false,
        storage: "services",
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status: true,
        generation: false,
        storage: "nodes",
    },
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: true,
        generation: false,
        storage: "namespaces",
    },
    Resource {
        group: "",
        version: "v1",
        plural: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        status: false,
        generation: false,
        storage: "endpoints",
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        generation: false,
        storage: "events",
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status: false,
        generation: true,
        storage: "endpointslices",
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
        generation: false,
        storage: "leases",
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        generation: false,
        storage: "events",
    },
];

impl Resource {
    /// Finds a served resource.
    pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// The core/v1 Namespaces resource.
    pub fn namespaces() -> &'static Resource {
        &RESOURCES[2]
    }

    /// `apiVersion` of objects of this resource.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` or `plural.group`, as error messages name the resource.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The Kind of lists of this resource.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The zero value of the Go type, as the real server serializes it: the fields
    /// without `omitempty`. Stored objects are filled with these, bookmarks carry
    /// them, and managedFields are computed against them on create.
    pub fn zero_object(&self) -> Value {
        let mut zero = match (self.group, self.kind) {
            ("", "Service") => json!({ "spec": {}, "status": { "loadBalancer": {} } }),
            ("", "Node") => json!({
                "spec": {},
                "status": {
                    "daemonEndpoints": { "kubeletEndpoint": { "Port": 0 } },
                    "nodeInfo": {
                        "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                        "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                        "kubeProxyVersion": "", "operatingSystem": "", "architecture": ""
                    }
                }
            }),
            ("", "Namespace") => json!({ "spec": {}, "status": {} }),
            ("", "Event") => json!({
                "involvedObject": {}, "source": {}, "firstTimestamp": null,
                "lastTimestamp": null, "eventTime": null, "reportingComponent": "",
                "reportingInstance": ""
            }),
            ("events.k8s.io", "Event") => json!({
                "eventTime": null, "regarding": {}, "deprecatedSource": {},
                "deprecatedFirstTimestamp": null, "deprecatedLastTimestamp": null
            }),
            ("discovery.k8s.io", "EndpointSlice") => {
                json!({ "addressType": "", "endpoints": null, "ports": null })
            }
            ("coordination.k8s.io", "Lease") => json!({ "spec": {} }),
            _ => json!({}),
        };
        zero["metadata"] = json!({});
        zero
    }
}
