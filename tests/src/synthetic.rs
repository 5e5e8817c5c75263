//! Builders for Kubernetes objects and whole synthetic clusters: for tests and benchmarks.
//!
//! Also compiled into `lb-userspace`'s unit tests (`#[cfg(test)] mod synthetic` in its
//! `lib.rs`, where `xlb` names the crate itself), so it is written against `xlb::…` paths.
//!
//! [`cluster`] builds a cluster of any size for `cargo xtask bench` to time [`reconcile`]
//! on; the small builders keep unit tests short and legible.
//!
//! [`reconcile`]: xlb::reconcile::reconcile

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use xlb::config::Config;
use xlb::model::{ClusterState, HostNetwork};
use xlb::reconcile::SERVICE_NAME_LABEL;

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: namespace.map(str::to_owned),
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

/// A service port named `p<port>` (so that EndpointSlice ports built by [`endpoint_slice`]
/// match it), with an optional NodePort.
pub fn port(port: i32, protocol: &str, node_port: Option<i32>) -> ServicePort {
    ServicePort {
        name: Some(format!("p{port}")),
        port,
        protocol: Some(protocol.to_owned()),
        node_port,
        ..ServicePort::default()
    }
}

/// A `type: LoadBalancer` Service with these ports and nothing else set.
pub fn load_balancer(namespace: &str, name: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: meta(Some(namespace), name),
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_owned()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// A Node with an InternalIP, a Ready condition and labels.
pub fn node(name: &str, internal_ip: Ipv4Addr, ready: bool, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
            ),
            ..meta(None, name)
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".to_owned(),
                address: internal_ip.to_string(),
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".to_owned(),
                status: if ready { "True" } else { "False" }.to_owned(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone)]
pub struct EndpointSpec<'a> {
    pub ip: Ipv4Addr,
    pub node: Option<&'a str>,
    pub ready: bool,
    pub terminating: bool,
}

impl<'a> EndpointSpec<'a> {
    /// A ready, not terminating endpoint on `node`.
    pub fn ready(ip: Ipv4Addr, node: &'a str) -> Self {
        Self {
            ip,
            node: Some(node),
            ready: true,
            terminating: false,
        }
    }
}

/// An IPv4 EndpointSlice of `service` with ports named `p<service port>` pointing at
/// `(service port, target port, protocol)`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(i32, i32, &str)],
    endpoints: &[EndpointSpec<'_>],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_owned(),
                service.to_owned(),
            )])),
            ..meta(Some(namespace), name)
        },
        address_type: "IPv4".to_owned(),
        ports: Some(
            ports
                .iter()
                .map(|&(service_port, target, protocol)| EndpointPort {
                    name: Some(format!("p{service_port}")),
                    port: Some(target),
                    protocol: Some(protocol.to_owned()),
                    app_protocol: None,
                })
                .collect(),
        ),
        endpoints: Some(
            endpoints
                .iter()
                .map(|endpoint| Endpoint {
                    addresses: vec![endpoint.ip.to_string()],
                    node_name: endpoint.node.map(str::to_owned),
                    conditions: Some(EndpointConditions {
                        ready: Some(endpoint.ready),
                        serving: Some(endpoint.ready || endpoint.terminating),
                        terminating: Some(endpoint.terminating),
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
    }
}

/// A synthetic cluster of `services` LoadBalancer Services (two TCP ports each, one UDP port
/// on every tenth) over 50 nodes, with `endpoints_per_service` ready endpoints each (in slices
/// of at most 100), a pool large enough for all, and an in-cluster configuration so that the
/// endpoints are what reconcile walks. `cargo xtask bench` times `reconcile` on
/// `cluster(10_000, 10)`: 10,000 Services and 100,000 endpoints.
pub fn cluster(
    services: usize,
    endpoints_per_service: usize,
) -> (ClusterState, Config, HostNetwork) {
    let mut state = ClusterState::default();
    let nodes = 50;
    for index in 0..nodes {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 10)) + index);
        state.upsert_node(node(
            &format!("node{index}"),
            ip,
            true,
            &[("node-role.kubernetes.io/worker", "")],
        ));
    }
    let mut pod = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    for index in 0..services {
        let name = format!("svc{index:06}");
        let namespace = format!("ns{}", index % 100);
        let node_port = 30_000 + (index % 2_700) as i32;
        let mut ports = vec![
            port(80, "TCP", Some(node_port)),
            port(443, "TCP", Some(node_port + 2_700)),
        ];
        if index % 10 == 0 {
            ports.push(port(53, "UDP", Some(node_port)));
        }
        state.upsert_service(load_balancer(&namespace, &name, ports));
        for (chunk, start) in (0..endpoints_per_service).step_by(100).enumerate() {
            let count = (endpoints_per_service - start).min(100);
            let endpoints: Vec<EndpointSpec<'_>> = (0..count)
                .map(|offset| {
                    pod += 1;
                    EndpointSpec {
                        ip: Ipv4Addr::from(pod),
                        node: None,
                        ready: offset % 7 != 0,
                        terminating: false,
                    }
                })
                .collect();
            state.upsert_endpoint_slice(endpoint_slice(
                &namespace,
                &format!("{name}-{chunk}"),
                &name,
                &[(80, 8080, "TCP"), (443, 8443, "TCP"), (53, 5353, "UDP")],
                &endpoints,
            ));
        }
    }
    let config = Config {
        in_cluster: true,
        pool: "100.64.0.0/10"
            .parse()
            .expect("the synthetic pool is a valid CIDR"),
        ..Config::default()
    };
    let host = HostNetwork {
        prefixes: vec![(Ipv4Addr::new(100, 64, 0, 1), 10)],
        own_addresses: vec![Ipv4Addr::new(100, 64, 0, 1)],
        gateways: vec![Ipv4Addr::new(100, 64, 0, 2)],
        ..HostNetwork::default()
    };
    (state, config, host)
}
