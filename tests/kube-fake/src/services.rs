//! What the real API server does to Services: defaulting, ClusterIP and NodePort
//! allocation, and validation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use crate::status::Cause;
use crate::store::State;

/// The Service CIDR, 10.96.0.0/16.
const SERVICE_NET: u32 = 0x0A60_0000;
const SERVICE_PREFIX_LEN: u32 = 16;
/// The NodePort range.
pub const NODE_PORTS: std::ops::RangeInclusive<i64> = 30000..=32767;

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn service_type(svc: &Value) -> &str {
    match text(svc, "/spec/type") {
        "" => "ClusterIP",
        t => t,
    }
}

/// Whether each port needs a node port.
fn needs_node_ports(svc: &Value) -> bool {
    match service_type(svc) {
        "NodePort" => true,
        "LoadBalancer" => svc.pointer("/spec/allocateLoadBalancerNodePorts") != Some(&json!(false)),
        _ => false,
    }
}

fn needs_health_check_port(svc: &Value) -> bool {
    service_type(svc) == "LoadBalancer" && text(svc, "/spec/externalTrafficPolicy") == "Local"
}

/// The defaulting the real server applies when it decodes a Service (these fields
/// show up in the writer's managedFields).
pub fn apply_defaults(svc: &mut Value) {
    let ty = service_type(svc).to_string();
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("type").or_insert(json!(ty));
    spec.entry("sessionAffinity").or_insert(json!("None"));
    if spec.get("sessionAffinity") == Some(&json!("ClientIP")) {
        let config = spec.entry("sessionAffinityConfig").or_insert(json!({}));
        if let Some(config) = config.as_object_mut() {
            let client = config.entry("clientIP").or_insert(json!({}));
            if let Some(client) = client.as_object_mut() {
                client.entry("timeoutSeconds").or_insert(json!(10800));
            }
        }
    }
    if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
        spec.entry("externalTrafficPolicy")
            .or_insert(json!("Cluster"));
    }
    if ty != "ExternalName" {
        spec.entry("internalTrafficPolicy")
            .or_insert(json!("Cluster"));
    }
    if ty == "LoadBalancer" {
        spec.entry("allocateLoadBalancerNodePorts")
            .or_insert(json!(true));
    }
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert(json!("TCP"));
            let unset = match port.get("targetPort") {
                None | Some(Value::Null) => true,
                Some(v) => v == &json!(0) || v == &json!(""),
            };
            if unset && let Some(p) = port.get("port").cloned() {
                port.insert("targetPort".into(), p);
            }
        }
    }
    apply_status_defaults(svc);
}

/// Status defaulting: `ipMode: VIP` for ingress points with an IP.
pub fn apply_status_defaults(svc: &mut Value) {
    if let Some(Value::Array(ingress)) = svc.pointer_mut("/status/loadBalancer/ingress") {
        for point in ingress.iter_mut().filter_map(Value::as_object_mut) {
            if point
                .get("ip")
                .and_then(Value::as_str)
                .is_some_and(|ip| !ip.is_empty())
            {
                point.entry("ipMode").or_insert(json!("VIP"));
            }
        }
    }
}

/// The ClusterIPs and node ports other Services hold.
struct InUse {
    cluster_ips: BTreeSet<String>,
    node_ports: BTreeSet<i64>,
}

fn in_use(state: &State, namespace: &str, name: &str) -> InUse {
    let mut used = InUse {
        cluster_ips: BTreeSet::new(),
        node_ports: BTreeSet::new(),
    };
    for svc in state.list("services", None) {
        if text(&svc, "/metadata/namespace") == namespace && text(&svc, "/metadata/name") == name {
            continue;
        }
        if let Some(Value::Array(ips)) = svc.pointer("/spec/clusterIPs") {
            used.cluster_ips
                .extend(ips.iter().filter_map(Value::as_str).map(str::to_string));
        }
        if let Some(Value::Array(ports)) = svc.pointer("/spec/ports") {
            used.node_ports
                .extend(ports.iter().filter_map(|p| p.get("nodePort")?.as_i64()));
        }
        if let Some(port) = svc
            .pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_i64)
        {
            used.node_ports.insert(port);
        }
    }
    used
}

fn random_node_port(used: &BTreeSet<i64>) -> Option<i64> {
    (0..1000)
        .map(|_| fastrand::i64(NODE_PORTS))
        .find(|p| !used.contains(p))
        .or_else(|| NODE_PORTS.clone().find(|p| !used.contains(p)))
}

fn random_cluster_ip(used: &BTreeSet<String>) -> Option<String> {
    let size = 1u32 << (32 - SERVICE_PREFIX_LEN);
    let candidate = |offset: u32| Ipv4Addr::from(SERVICE_NET + offset).to_string();
    (0..1000)
        .map(|_| candidate(fastrand::u32(2..size - 1)))
        .find(|ip| !used.contains(ip))
        .or_else(|| (2..size - 1).map(candidate).find(|ip| !used.contains(ip)))
}

fn in_service_net(ip: &str) -> bool {
    match ip.parse::<Ipv4Addr>() {
        Ok(ip) => {
            u32::from(ip) >> (32 - SERVICE_PREFIX_LEN) == SERVICE_NET >> (32 - SERVICE_PREFIX_LEN)
        }
        Err(_) => false,
    }
}

fn node_port_error(field: String, port: i64, detail: &str) -> Cause {
    Cause::invalid(field, &json!(port), detail)
}

/// Allocates the ClusterIP and node ports of a Service being created (`old` is
/// `None`) or updated, keeping what `old` held when the update leaves it out.
pub fn allocate(state: &State, old: Option<&Value>, svc: &mut Value) -> Result<(), Vec<Cause>> {
    let namespace = text(svc, "/metadata/namespace").to_string();
    let name = text(svc, "/metadata/name").to_string();
    let mut used = in_use(state, &namespace, &name);
    let mut errors = Vec::new();
    if let Some(old) = old {
        keep_allocations(old, svc);
    }
    let ty = service_type(svc).to_string();
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };

    // ClusterIP.
    if ty != "ExternalName" {
        let requested = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ip = if requested.is_empty() {
            random_cluster_ip(&used.cluster_ips)
        } else if requested == "None" {
            Some(requested)
        } else if !in_service_net(&requested) {
            errors.push(Cause::invalid(
                "spec.clusterIPs[0]",
                &json!(requested),
                &format!(
                    "failed to allocate IP {requested}: the provided IP ({requested}) is not in the valid range. The range of valid IPs is 10.96.0.0/16"
                ),
            ));
            None
        } else if old.is_none() && used.cluster_ips.contains(&requested) {
            errors.push(Cause::invalid(
                "spec.clusterIPs[0]",
                &json!(requested),
                &format!("failed to allocate IP {requested}: provided IP is already allocated"),
            ));
            None
        } else {
            Some(requested)
        };
        if let Some(ip) = ip {
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
            spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
        }
    }

    // Node ports: ports with the same port number share one node port.
    let wants_node_ports = needs_node_ports(&json!({ "spec": Value::Object(spec.clone()) }));
    let mut by_port: BTreeMap<i64, i64> = BTreeMap::new();
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for (i, port) in ports.iter_mut().enumerate() {
            let field = format!("spec.ports[{i}].nodePort");
            let number = port.get("port").and_then(Value::as_i64).unwrap_or_default();
            let requested = port
                .get("nodePort")
                .and_then(Value::as_i64)
                .unwrap_or_default();
            if requested != 0 {
                if !ty_allows_node_ports(&ty) {
                    errors.push(Cause::forbidden(
                        field,
                        &format!("may not be used when `type` is '{ty}'"),
                    ));
                } else if !NODE_PORTS.contains(&requested) {
                    errors.push(node_port_error(
                        field,
                        requested,
                        "provided port is not in the valid range. The range of valid ports is 30000-32767",
                    ));
                } else if used.node_ports.contains(&requested) {
                    errors.push(node_port_error(
                        field,
                        requested,
                        "provided port is already allocated",
                    ));
                } else {
                    by_port.entry(number).or_insert(requested);
                }
                continue;
            }
            if !wants_node_ports {
                continue;
            }
            let assigned = match by_port.get(&number) {
                Some(p) => Some(*p),
                None => random_node_port(&used.node_ports),
            };
            match assigned {
                Some(p) => {
                    used.node_ports.insert(p);
                    by_port.insert(number, p);
                    port["nodePort"] = json!(p);
                }
                None => errors.push(Cause::invalid(field, &json!(0), "range is full")),
            }
        }
    }
    for p in by_port.values() {
        used.node_ports.insert(*p);
    }

    // Health check node port for externalTrafficPolicy: Local.
    let wants_hc = needs_health_check_port(&json!({ "spec": Value::Object(spec.clone()) }));
    let hc = spec
        .get("healthCheckNodePort")
        .and_then(Value::as_i64)
        .unwrap_or_default();
    if wants_hc && hc == 0 {
        match random_node_port(&used.node_ports) {
            Some(p) => {
                spec.insert("healthCheckNodePort".into(), json!(p));
            }
            None => errors.push(Cause::invalid(
                "spec.healthCheckNodePort",
                &json!(0),
                "range is full",
            )),
        }
    } else if wants_hc && old.is_none() && used.node_ports.contains(&hc) {
        errors.push(node_port_error(
            "spec.healthCheckNodePort".into(),
            hc,
            "provided port is already allocated",
        ));
    } else if !wants_hc {
        spec.remove("healthCheckNodePort");
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn ty_allows_node_ports(ty: &str) -> bool {
    matches!(ty, "NodePort" | "LoadBalancer")
}

/// Copies into an update what the old Service had allocated and the update leaves
/// out: ClusterIP(s), IP families, node ports (matched by port name) and the health
/// check node port.
fn keep_allocations(old: &Value, svc: &mut Value) {
    let type_changed_to_cluster_ip =
        !ty_allows_node_ports(service_type(svc)) && ty_allows_node_ports(service_type(old));
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let unset = |v: Option<&Value>| v.is_none_or(|v| v.is_null() || v == &json!(""));
    for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        if unset(spec.get(field))
            && let Some(value) = old.pointer(&format!("/spec/{field}"))
        {
            spec.insert(field.into(), value.clone());
        }
    }
    let old_ports: BTreeMap<String, i64> = old
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
            Some((name.to_string(), p.get("nodePort")?.as_i64()?))
        })
        .collect();
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        let used: BTreeSet<i64> = ports
            .iter()
            .filter_map(|p| p.get("nodePort")?.as_i64())
            .collect();
        for port in ports.iter_mut() {
            if type_changed_to_cluster_ip {
                if let Some(port) = port.as_object_mut()
                    && old_ports
                        .values()
                        .any(|np| Some(np) == port.get("nodePort").and_then(Value::as_i64).as_ref())
                {
                    port.remove("nodePort");
                }
                continue;
            }
            if port
                .get("nodePort")
                .and_then(Value::as_i64)
                .unwrap_or_default()
                != 0
            {
                continue;
            }
            let name = port.get("name").and_then(Value::as_str).unwrap_or_default();
            if let Some(np) = old_ports.get(name)
                && !used.contains(np)
            {
                port["nodePort"] = json!(np);
            }
        }
    }
    if unset(spec.get("healthCheckNodePort"))
        && let Some(hc) = old.pointer("/spec/healthCheckNodePort")
    {
        spec.insert("healthCheckNodePort".into(), hc.clone());
    }
}

/// Validation of the spec, after allocation (duplicates show up with the allocated
/// node ports, as on the real server).
pub fn validate(svc: &Value) -> Vec<Cause> {
    let mut errors = Vec::new();
    let ty = service_type(svc);
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        errors.push(Cause::not_supported(
            "spec.type",
            &json!(ty),
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() && ty != "ExternalName" && text(svc, "/spec/clusterIP") != "None" {
        errors.push(Cause::required("spec.ports", ""));
    }
    let mut node_ports = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let number = port.get("port").and_then(Value::as_i64).unwrap_or_default();
        let protocol = port
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !(1..=65535).contains(&number) {
            errors.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &json!(number),
                "must be between 1 and 65535, inclusive",
            ));
        }
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            errors.push(Cause::not_supported(
                format!("spec.ports[{i}].protocol"),
                &json!(protocol),
                &["SCTP", "TCP", "UDP"],
            ));
        }
        if ports.len() > 1
            && port
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .is_empty()
        {
            errors.push(Cause::required(format!("spec.ports[{i}].name"), ""));
        }
        if let Some(np) = port.get("nodePort").and_then(Value::as_i64)
            && !node_ports.insert((np, protocol.to_string()))
        {
            errors.push(Cause::duplicate(format!("spec.ports[{i}].nodePort"), np));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let number = port.get("port").and_then(Value::as_i64).unwrap_or_default();
        let protocol = port
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !seen.insert((number, protocol.to_string())) {
            errors.push(Cause::duplicate(
                format!("spec.ports[{i}]"),
                format!(
                    r#"{{"Name":"","Protocol":"{protocol}","AppProtocol":null,"Port":{number},"TargetPort":0,"NodePort":0}}"#
                ),
            ));
        }
    }
    for (field, allowed) in [
        ("sessionAffinity", &["ClientIP", "None"][..]),
        ("externalTrafficPolicy", &["Cluster", "Local"][..]),
        ("internalTrafficPolicy", &["Cluster", "Local"][..]),
    ] {
        if let Some(value) = svc.pointer(&format!("/spec/{field}"))
            && !value.as_str().is_some_and(|v| allowed.contains(&v))
        {
            errors.push(Cause::not_supported(
                format!("spec.{field}"),
                value,
                allowed,
            ));
        }
    }
    errors
}

/// Validation of `status.loadBalancer.ingress`.
pub fn validate_status(svc: &Value) -> Vec<Cause> {
    let mut errors = Vec::new();
    let ingress = svc
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, point) in ingress.iter().enumerate() {
        let ip = point.get("ip").and_then(Value::as_str).unwrap_or_default();
        if !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            errors.push(Cause::invalid(
                format!("status.loadBalancer.ingress[{i}].ip"),
                &json!(ip),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
        if let Some(mode) = point.get("ipMode") {
            let field = format!("status.loadBalancer.ingress[{i}].ipMode");
            if ip.is_empty() {
                errors.push(Cause::forbidden(
                    field,
                    "must not be specified when `ip` is not",
                ));
            } else if !mode.as_str().is_some_and(|m| m == "VIP" || m == "Proxy") {
                errors.push(Cause::not_supported(field, mode, &["Proxy", "VIP"]));
            }
        }
    }
    errors
}

/// The `kubernetes` Service the real server creates in `default`.
pub fn kubernetes_service(uid: &str, time: &str) -> Value {
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "uid": uid,
            "creationTimestamp": time,
            "labels": { "component": "apiserver", "provider": "kubernetes" },
            "managedFields": [{
                "manager": "kube-apiserver",
                "operation": "Update",
                "apiVersion": "v1",
                "time": time,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": { "f:labels": { ".": {}, "f:component": {}, "f:provider": {} } },
                    "f:spec": {
                        "f:clusterIP": {}, "f:internalTrafficPolicy": {}, "f:ipFamilyPolicy": {},
                        "f:ports": { ".": {}, "k:{\"port\":443,\"protocol\":\"TCP\"}": {
                            ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}
                        } },
                        "f:sessionAffinity": {}, "f:type": {}
                    }
                }
            }]
        },
        "spec": {
            "ports": [{ "name": "https", "protocol": "TCP", "port": 443, "targetPort": 6443 }],
            "clusterIP": "10.96.0.1",
            "clusterIPs": ["10.96.0.1"],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"
        },
        "status": { "loadBalancer": {} }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_real_server() {
        let mut svc = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        apply_defaults(&mut svc);
        assert_eq!(
            svc["spec"],
            json!({
                "type": "LoadBalancer", "sessionAffinity": "None", "externalTrafficPolicy": "Cluster",
                "internalTrafficPolicy": "Cluster", "allocateLoadBalancerNodePorts": true,
                "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}]
            })
        );
    }

    #[test]
    fn invalid_ingress_ip_is_refused() {
        let svc = json!({"status": {"loadBalancer": {"ingress": [{"ip": "not-an-ip"}]}}});
        assert_eq!(validate_status(&svc).len(), 1);
    }
}
