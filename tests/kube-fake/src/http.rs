//! HTTP: routing of Kubernetes API paths, content negotiation, the fault hooks,
//! and the `/__fake/…` control endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::Value;

use crate::api::{self, Query, Reply, Request};
use crate::discovery::AGGREGATED_CONTENT_TYPE;
use crate::faults::RequestRecord;
use crate::resources::Resource;
use crate::server::Shared;
use crate::status::{ApiError, success_status};
use crate::table::Format;
use crate::watch;

/// The router: every request goes through [`handle`].
pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a raw query string; empty pairs (kube-rs's `?&…`) are ignored.
pub fn parse_query(raw: Option<&str>) -> Query {
    Query(
        raw.unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect(),
    )
}

fn json_response(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    raw_response(code, "application/json", Bytes::from(bytes))
}

fn raw_response(code: u16, content_type: &str, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn error_response(err: &ApiError) -> Response {
    json_response(err.code(), &err.status())
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Handles one request.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    let query = parse_query(uri.query());
    if let Some(control) = path.strip_prefix("/__fake/") {
        return fault_control(&shared, control, &query);
    }
    let refused = shared.faults.refusing();
    shared.faults.record(RequestRecord {
        at: std::time::Instant::now(),
        method: method.to_string(),
        uri: uri.to_string(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        refused,
    });
    if refused {
        return error_response(&ApiError::Unavailable(
            "the kube-fake server is refusing requests (fault injection)".into(),
        ));
    }
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let accept = header_str(&headers, header::ACCEPT);
    if let Some(response) = serve_document(&shared, &path, accept) {
        return response;
    }
    let Some((res, namespace, name, subresource)) = route(&path) else {
        return error_response(&ApiError::NoRoute);
    };
    let req = Request {
        res,
        namespace,
        name,
        subresource,
        query: &query,
        body: &body,
        content_type: header_str(&headers, header::CONTENT_TYPE),
        format: Format::from_accept(accept),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    };
    if method == Method::GET && req.name.is_none() && query.flag("watch") {
        return match watch::start(shared.clone(), &req) {
            Ok(rx) => {
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
                });
                let mut response = Response::new(Body::from_stream(stream));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(err) => error_response(&err),
        };
    }
    match dispatch(&shared, &method, &req) {
        Ok(Reply::Json(code, body)) => json_response(code, &body),
        Err(err) => error_response(&err),
    }
}

fn dispatch(shared: &Shared, method: &Method, req: &Request) -> Result<Reply, ApiError> {
    let subresource_ok = match req.subresource.as_deref() {
        None => true,
        Some("status") => req.res.status,
        Some(_) => false,
    };
    if !subresource_ok {
        return Err(ApiError::NoRoute);
    }
    match (method.clone(), req.name.as_deref()) {
        (Method::GET, Some(name)) => api::get(shared, req, name),
        (Method::GET, None) => api::list(shared, req),
        (Method::POST, None) => api::create(shared, req),
        (Method::PUT, Some(name)) => api::replace(shared, req, name),
        (Method::PATCH, Some(name)) => api::patch(shared, req, name),
        (Method::DELETE, Some(name)) if req.subresource.is_none() => api::delete(shared, req, name),
        (Method::DELETE, None) => api::delete_collection(shared, req),
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// A routed resource path: resource, namespace, name, subresource.
type Route = (
    &'static Resource,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Splits a resource path into (resource, namespace, name, subresource).
fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let owned = |s: &&str| Some((*s).to_string());
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if *plural != "status" && *plural != "finalize" => (
            owned(ns),
            *plural,
            tail.first().and_then(owned),
            tail.get(1).and_then(owned),
        ),
        [plural, tail @ ..] => (
            None,
            *plural,
            tail.first().and_then(owned),
            tail.get(1).and_then(owned),
        ),
        [] => return None,
    };
    let res = Resource::find(group, version, plural)?;
    if res.namespaced != namespace.is_some()
        && !(res.namespaced && namespace.is_none() && name.is_none())
    {
        return None;
    }
    Some((res, namespace, name, sub))
}

/// Discovery and OpenAPI documents.
fn serve_document(shared: &Shared, path: &str, accept: &str) -> Option<Response> {
    let aggregated = accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=APIGroupDiscoveryList"));
    let doc = shared.docs.get(path, aggregated)?;
    let content_type = if aggregated && (path == "/api" || path == "/apis") {
        AGGREGATED_CONTENT_TYPE
    } else {
        doc.content_type.as_str()
    };
    Some(raw_response(200, content_type, doc.body.clone()))
}

/// `/__fake/drop-watches`, `/__fake/refuse?seconds=N` (no `seconds`: until cleared),
/// `/__fake/latency?ms=N`, `/__fake/clear`, `/__fake/compact`.
fn fault_control(shared: &Shared, control: &str, query: &Query) -> Response {
    let number = |name: &str| query.get(name).and_then(|v| v.parse::<u64>().ok());
    match control {
        "drop-watches" => shared.faults.drop_watches(),
        "refuse" => match number("seconds") {
            Some(s) => shared.faults.refuse_for(Duration::from_secs(s)),
            None => shared.faults.refuse(),
        },
        "latency" => shared
            .faults
            .set_latency(Duration::from_millis(number("ms").unwrap_or(0))),
        "clear" => shared.faults.clear(),
        "compact" => shared.store.lock().compact(),
        _ => return error_response(&ApiError::NoRoute),
    }
    json_response(200, &success_status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_ignores_empty_pairs_and_decodes() {
        let q = parse_query(Some("&labelSelector=app%3Dweb&watch=true"));
        assert_eq!(q.get("labelSelector"), Some("app=web"));
        assert!(q.flag("watch"));
    }

    #[test]
    fn routes() {
        let (res, ns, name, sub) =
            route("/api/v1/namespaces/default/services/x/status").expect("routes");
        assert_eq!(
            (res.plural, ns.as_deref(), name.as_deref(), sub.as_deref()),
            ("services", Some("default"), Some("x"), Some("status"))
        );
        let (res, ns, name, _) = route("/api/v1/namespaces/default").expect("routes");
        assert_eq!(
            (res.plural, ns, name.as_deref()),
            ("namespaces", None, Some("default"))
        );
        assert!(route("/api/v1/nodes").is_some());
        assert!(route("/api/v1/services").is_some());
        assert!(route("/api/v1/pods").is_none());
    }
}
