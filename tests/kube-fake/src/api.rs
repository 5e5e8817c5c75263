//! The REST verbs on resources: get, list, create, update, patch (merge, JSON,
//! strategic, apply), delete, with the real server's bookkeeping (uids,
//! resourceVersions, managedFields, status subresource, finalizers).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use crate::events;
use crate::fieldset::{self, Entry};
use crate::meta;
use crate::patch::{self, PatchError};
use crate::resources::Resource;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::server::Shared;
use crate::services;
use crate::status::{ApiError, Cause, success_status};
use crate::store::{Key, State};
use crate::table::{self, Format};

/// Parsed query parameters.
#[derive(Debug, Default, Clone)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    /// The first value of a parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean parameter (`true`/`1`).
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

/// A request on a resource, after routing.
#[derive(Debug)]
pub struct Request<'a> {
    /// The resource.
    pub res: &'static Resource,
    /// Namespace from the path.
    pub namespace: Option<String>,
    /// Object name from the path.
    pub name: Option<String>,
    /// `status`, if addressed.
    pub subresource: Option<String>,
    /// Query parameters.
    pub query: &'a Query,
    /// Request body.
    pub body: &'a [u8],
    /// Request Content-Type.
    pub content_type: &'a str,
    /// Requested representation.
    pub format: Format,
    /// The User-Agent, for the default field manager.
    pub user_agent: Option<&'a str>,
}

/// What to answer.
#[derive(Debug)]
pub enum Reply {
    /// A JSON document with this status code.
    Json(u16, Value),
}

impl Request<'_> {
    fn key(&self, name: &str) -> Key {
        Key {
            storage: self.res.storage,
            namespace: self.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        }
    }

    fn status_subresource(&self) -> bool {
        self.subresource.as_deref() == Some("status")
    }

    fn field_manager(&self) -> String {
        if let Some(m) = self.query.get("fieldManager") {
            return m.to_string();
        }
        match self.user_agent {
            Some(ua) if !ua.is_empty() => ua
                .split('/')
                .next()
                .unwrap_or(ua)
                .chars()
                .take(128)
                .collect(),
            _ => "unknown".to_string(),
        }
    }

    fn entry(&self, operation: &str) -> Entry {
        Entry {
            manager: self.field_manager(),
            operation: operation.to_string(),
            api_version: self.res.api_version(),
            time: meta::rfc3339(meta::now_secs()),
            subresource: self.subresource.clone().unwrap_or_default(),
            set: fieldset::FieldSet::default(),
        }
    }
}

/// The object as the resource's version shows it, with kind and apiVersion.
pub fn external(res: &Resource, stored: &Value) -> Value {
    let mut obj = if res.group == "events.k8s.io" {
        events::to_v1(stored, &res.zero_object())
    } else {
        stored.clone()
    };
    if let Some(map) = obj.as_object_mut() {
        map.insert("kind".into(), json!(res.kind));
        map.insert("apiVersion".into(), json!(res.api_version()));
    }
    obj
}

/// The stored form of an object written through `res` (with the stored kind and
/// apiVersion).
fn internal(res: &'static Resource, obj: &Value) -> Value {
    let stored_res = stored_resource(res);
    let mut stored = if res.group == "events.k8s.io" {
        events::to_core(obj, &stored_res.zero_object())
    } else {
        obj.clone()
    };
    if let Some(map) = stored.as_object_mut() {
        map.insert("kind".into(), json!(stored_res.kind));
        map.insert("apiVersion".into(), json!(stored_res.api_version()));
    }
    stored
}

/// Fills in the fields Go always serializes, from the zero object.
fn fill_zero(res: &Resource, obj: &mut Value) {
    fn fill(obj: &mut Value, zero: &Value) {
        if let (Some(map), Some(zero)) = (obj.as_object_mut(), zero.as_object()) {
            for (key, z) in zero {
                match map.get_mut(key) {
                    Some(existing) if !existing.is_null() => fill(existing, z),
                    _ => {
                        map.insert(key.clone(), z.clone());
                    }
                }
            }
        }
    }
    fill(obj, &res.zero_object());
    if res.storage == "events" && res.group.is_empty() {
        events::normalize_core(obj, &res.zero_object());
    }
}

/// The part of an object whose fields managedFields track, for a write to the
/// main resource or to `status`.
fn tracked(res: &Resource, obj: &Value, status: bool) -> Value {
    let mut out = Map::new();
    for (key, value) in obj.as_object().into_iter().flatten() {
        let keep = match key.as_str() {
            "apiVersion" | "kind" => false,
            "metadata" => true,
            "status" => !res.status || status,
            _ => !(res.status && status),
        };
        if keep {
            out.insert(key.clone(), value.clone());
        }
    }
    if let Some(Value::Object(m)) = out.get_mut("metadata") {
        m.retain(|k, _| {
            matches!(
                k.as_str(),
                "labels" | "annotations" | "finalizers" | "ownerReferences" | "generateName"
            )
        });
    }
    Value::Object(out)
}

/// Replaces the tracked part of `obj` by `merged` (the result of an apply).
fn untrack(res: &Resource, obj: &mut Value, merged: &Value, status: bool) {
    let before = tracked(res, obj, status);
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    for (key, _) in before.as_object().into_iter().flatten() {
        if key != "metadata" {
            map.remove(key);
        }
    }
    for (key, value) in merged.as_object().into_iter().flatten() {
        if key != "metadata" {
            map.insert(key.clone(), value.clone());
        }
    }
    let meta = map.entry("metadata").or_insert(json!({}));
    if let Some(meta) = meta.as_object_mut() {
        for field in [
            "labels",
            "annotations",
            "finalizers",
            "ownerReferences",
            "generateName",
        ] {
            match merged.pointer(&format!("/metadata/{field}")) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the object provided is unrecognized or invalid: {e}"
        ))
    })
}

fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn meta_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::BadRequest(
            "the object provided is not a JSON object".into(),
        ));
    }
    let meta = obj
        .as_object_mut()
        .map(|m| m.entry("metadata").or_insert(json!({})));
    match meta {
        Some(Value::Object(m)) => Ok(m),
        _ => Err(ApiError::BadRequest("metadata must be an object".into())),
    }
}

/// Checks `kind`/`apiVersion` of a written object, when present.
fn check_type(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    let kind = text(obj, "/kind");
    let version = text(obj, "/apiVersion");
    if (!kind.is_empty() && kind != res.kind)
        || (!version.is_empty() && version != res.api_version())
    {
        return Err(ApiError::BadRequest(format!(
            "the API version in the data ({version}) does not match the expected API version ({})",
            res.api_version()
        )));
    }
    Ok(())
}

fn require_namespace(state: &State, req: &Request) -> Result<(), ApiError> {
    let Some(ns) = req.namespace.as_deref() else {
        return Ok(());
    };
    let key = Key {
        storage: "namespaces",
        namespace: String::new(),
        name: ns.to_string(),
    };
    if state.get(&key).is_none() {
        return Err(ApiError::not_found(Resource::namespaces(), ns));
    }
    Ok(())
}

/// Kind-specific defaulting at decode time (shows in managedFields).
fn apply_defaults(res: &Resource, obj: &mut Value) {
    if res.kind == "Service" {
        services::apply_defaults(obj);
    }
}

/// Kind-specific work after managedFields: allocation, admission, validation.
fn prepare(
    state: &State,
    res: &Resource,
    old: Option<&Value>,
    obj: &mut Value,
) -> Result<(), ApiError> {
    let name = text(obj, "/metadata/name").to_string();
    match (res.group, res.kind) {
        ("", "Service") => {
            if old.is_none() {
                obj["status"] = json!({ "loadBalancer": {} });
            }
            services::allocate(state, old, obj).map_err(|c| ApiError::invalid(res, &name, c))?;
            let mut causes = services::validate(obj);
            causes.extend(services::validate_status(obj));
            if !causes.is_empty() {
                return Err(ApiError::invalid(res, &name, causes));
            }
        }
        ("", "Node") if old.is_none() => {
            let taint = json!({ "key": "node.kubernetes.io/not-ready", "effect": "NoSchedule" });
            let spec = obj
                .as_object_mut()
                .map(|o| o.entry("spec").or_insert(json!({})));
            if let Some(Value::Object(spec)) = spec {
                let taints = spec.entry("taints").or_insert(json!([]));
                if let Value::Array(list) = taints
                    && list.is_empty()
                {
                    list.push(taint);
                }
            }
        }
        ("", "Namespace") if old.is_none() => {
            obj["spec"] = json!({ "finalizers": ["kubernetes"] });
            obj["status"] = json!({ "phase": "Active" });
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut)
                && let Some(labels) = meta.entry("labels").or_insert(json!({})).as_object_mut()
            {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        _ => {}
    }
    if name.is_empty() {
        return Err(ApiError::invalid(
            res,
            &name,
            vec![Cause::required(
                "metadata.name",
                "name or generateName is required",
            )],
        ));
    }
    Ok(())
}

/// GET of one object.
pub fn get(shared: &Shared, req: &Request, name: &str) -> Result<Reply, ApiError> {
    let state = shared.store.lock();
    let obj = state
        .get(&req.key(name))
        .ok_or_else(|| ApiError::not_found(req.res, name))?;
    let obj = external(req.res, obj);
    Ok(Reply::Json(200, render_one(shared, req, obj)))
}

fn render_one(shared: &Shared, req: &Request, obj: Value) -> Value {
    match req.format {
        Format::Object => obj,
        Format::Metadata => table::partial_metadata(&obj),
        Format::Table => {
            let meta = json!({ "resourceVersion": text(&obj, "/metadata/resourceVersion") });
            let meta = meta.as_object().cloned().unwrap_or_default();
            table::table(&shared.docs, req.res, &[obj], meta, true)
        }
    }
}

/// A continue token: where the next page starts, at which resourceVersion.
fn encode_continue(rv: i64, start: &str) -> String {
    let doc = format!(
        "{{\"v\":\"meta.k8s.io/v1\",\"rv\":{rv},\"start\":{}}}",
        Value::String(start.to_string())
    );
    URL_SAFE_NO_PAD.encode(doc)
}

fn decode_continue(token: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::BadRequest(format!("continue key is not valid: {token}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = doc.get("rv").and_then(Value::as_i64).ok_or_else(bad)?;
    let start = doc.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.to_string()))
}

/// The selectors of a list or watch.
pub struct Selectors {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Selectors {
    /// Parses the selectors of a request.
    pub fn parse(req: &Request) -> Result<Selectors, ApiError> {
        let labels = LabelSelector::parse(req.query.get("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::BadRequest(format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(
            req.res.kind,
            req.query.get("fieldSelector").unwrap_or_default(),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok(Selectors { labels, fields })
    }

    /// Whether an object (stored form) matches.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

fn sort_key(req: &Request, obj: &Value) -> String {
    if req.namespace.is_some() || !req.res.namespaced {
        text(obj, "/metadata/name").to_string()
    } else {
        format!(
            "{}/{}",
            text(obj, "/metadata/namespace"),
            text(obj, "/metadata/name")
        )
    }
}

/// LIST.
pub fn list(shared: &Shared, req: &Request) -> Result<Reply, ApiError> {
    let selectors = Selectors::parse(req)?;
    let state = shared.store.lock();
    let ns = req.namespace.as_deref();
    let (list_rv, start, objects) = if let Some(token) =
        req.query.get("continue").filter(|t| !t.is_empty())
    {
        let (rv, start) = decode_continue(token)?;
        let at = u64::try_from(rv).unwrap_or(0);
        match state.list_at(at, req.res.storage, ns) {
            Ok(objects) if rv >= 0 => (at, start, objects),
            _ => {
                return Err(ApiError::Expired {
                    message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into(),
                    continue_token: Some(encode_continue(-1, &start)),
                });
            }
        }
    } else if req.query.get("resourceVersionMatch") == Some("Exact") {
        let rv = req
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::BadRequest("resourceVersionMatch=Exact requires a resourceVersion".into())
            })?;
        let objects = state
            .list_at(rv, req.res.storage, ns)
            .map_err(|_| ApiError::Expired {
                message: "The resourceVersion for the provided list is too old.".into(),
                continue_token: None,
            })?;
        (rv, String::new(), objects)
    } else {
        (state.rv(), String::new(), state.list(req.res.storage, ns))
    };
    drop(state);

    let matching: Vec<Value> = objects
        .into_iter()
        .filter(|o| selectors.matches(o))
        .filter(|o| start.is_empty() || sort_key(req, o) >= start)
        .collect();
    let limit = req
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut list_meta = Map::new();
    list_meta.insert("resourceVersion".into(), json!(list_rv.to_string()));
    let page: Vec<Value> = match limit {
        Some(limit) if matching.len() > limit => {
            let last = sort_key(req, &matching[limit - 1]);
            list_meta.insert(
                "continue".into(),
                json!(encode_continue(list_rv as i64, &format!("{last}\u{0}"))),
            );
            if selectors.is_empty() {
                list_meta.insert("remainingItemCount".into(), json!(matching.len() - limit));
            }
            matching.into_iter().take(limit).collect()
        }
        _ => matching,
    };
    let items: Vec<Value> = page.iter().map(|o| external(req.res, o)).collect();
    let body = match req.format {
        Format::Table => table::table(&shared.docs, req.res, &items, list_meta, true),
        Format::Metadata => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": list_meta,
            "items": items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
        }),
        Format::Object => {
            let items: Vec<Value> = items
                .into_iter()
                .map(|mut o| {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    o
                })
                .collect();
            json!({
                "kind": req.res.list_kind(),
                "apiVersion": req.res.api_version(),
                "metadata": list_meta,
                "items": items,
            })
        }
    };
    Ok(Reply::Json(200, body))
}

/// POST.
pub fn create(shared: &Shared, req: &Request) -> Result<Reply, ApiError> {
    let obj = parse_json(req.body)?;
    check_type(req.res, &obj)?;
    let mut state = shared.store.lock();
    let entry = req.entry("Update");
    let created = insert(&mut state, req, obj, Managed::Update(entry))?;
    Ok(Reply::Json(201, render_one(shared, req, created)))
}

/// How a write records field ownership.
enum Managed {
    /// An update by this manager: it owns what it changed.
    Update(Entry),
    /// Already computed (server-side apply).
    Entries(Vec<Entry>),
}

/// Creates an object (from a POST, or an apply on a missing object).
fn insert(
    state: &mut State,
    req: &Request,
    mut obj: Value,
    managed: Managed,
) -> Result<Value, ApiError> {
    let res = req.res;
    let meta = meta_mut(&mut obj)?;
    if res.namespaced {
        let ns = req.namespace.clone().unwrap_or_default();
        match meta.get("namespace").and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            _ => {
                meta.insert("namespace".into(), json!(ns));
            }
        }
    } else {
        meta.remove("namespace");
    }
    if meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
        && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
    {
        let name = format!("{prefix}{}", meta::name_suffix());
        meta.insert("name".into(), json!(name));
    }
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    for field in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(field);
    }
    require_namespace(state, req)?;
    if !name.is_empty() && state.get(&req.key(&name)).is_some() {
        return Err(ApiError::already_exists(res, &name));
    }

    apply_defaults(res, &mut obj);
    let mut filled = obj.clone();
    fill_zero(res, &mut filled);
    let entries = match managed {
        Managed::Update(me) => {
            let mut entries = Vec::new();
            let cmp = fieldset::compare(
                res.kind,
                &tracked(res, &res.zero_object(), false),
                &tracked(res, &filled, false),
            );
            fieldset::record_update(&mut entries, me, &cmp);
            entries
        }
        Managed::Entries(entries) => entries,
    };
    let mut obj = internal(res, &filled);
    fill_zero(stored_resource(res), &mut obj);
    let now = meta::rfc3339(meta::now_secs());
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("uid".into(), json!(meta::uid()));
        meta.insert("creationTimestamp".into(), json!(now));
        if res.generation {
            meta.insert("generation".into(), json!(1));
        }
    }
    fieldset::write_entries(&mut obj, entries);
    prepare(state, res, None, &mut obj)?;
    let stored = state.commit(req.key(&name), Some(obj));
    Ok(external(res, &stored))
}

/// The resource whose form objects are stored in.
fn stored_resource(res: &'static Resource) -> &'static Resource {
    if res.group == "events.k8s.io" {
        Resource::find("", "v1", "events").unwrap_or(res)
    } else {
        res
    }
}

/// PUT.
pub fn replace(shared: &Shared, req: &Request, name: &str) -> Result<Reply, ApiError> {
    let mut obj = parse_json(req.body)?;
    check_type(req.res, &obj)?;
    let given = meta_mut(&mut obj)?
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !given.is_empty() && given != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let mut state = shared.store.lock();
    let old = state
        .get(&req.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(req.res, name))?;
    let entry = req.entry("Update");
    let (code, obj) = update(&mut state, req, name, &old, obj, Managed::Update(entry))?;
    Ok(Reply::Json(code, render_one(shared, req, obj)))
}

/// Writes a new version of an existing object (PUT, PATCH, apply).
fn update(
    state: &mut State,
    req: &Request,
    name: &str,
    old_stored: &Value,
    mut new: Value,
    managed: Managed,
) -> Result<(u16, Value), ApiError> {
    let res = req.res;
    let status = req.status_subresource();
    let old = external(res, old_stored);
    let old_rv = text(&old, "/metadata/resourceVersion").to_string();
    let given_rv = text(&new, "/metadata/resourceVersion").to_string();
    if !given_rv.is_empty() && given_rv != old_rv {
        return Err(ApiError::conflict(res, name));
    }
    apply_defaults(res, &mut new);

    // The status subresource writes status (and labels/annotations); the main
    // resource writes everything else.
    if res.status {
        let new_map = new
            .as_object_mut()
            .ok_or_else(|| ApiError::BadRequest("not an object".into()))?;
        if status {
            let keep_meta = new_map.get("metadata").cloned().unwrap_or(json!({}));
            new_map.retain(|k, _| k == "status");
            for (k, v) in old.as_object().into_iter().flatten() {
                if k != "status" {
                    new_map.insert(k.clone(), v.clone());
                }
            }
            let mut metadata = old.get("metadata").cloned().unwrap_or(json!({}));
            for field in ["labels", "annotations"] {
                match keep_meta.get(field) {
                    Some(v) => metadata[field] = v.clone(),
                    None => {
                        if let Some(m) = metadata.as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
            new_map.insert("metadata".into(), metadata);
        } else {
            match old.get("status") {
                Some(s) => new_map.insert("status".into(), s.clone()),
                None => new_map.remove("status"),
            };
        }
    }
    // Metadata the client cannot change.
    {
        let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
        let meta = meta_mut(&mut new)?;
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "resourceVersion",
        ] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
    }
    fill_zero(res, &mut new);
    let entries = match managed {
        Managed::Update(me) => {
            let mut entries = fieldset::read_entries(&old);
            let cmp = fieldset::compare(
                res.kind,
                &tracked(res, &old, status),
                &tracked(res, &new, status),
            );
            fieldset::record_update(&mut entries, me, &cmp);
            entries
        }
        Managed::Entries(entries) => entries,
    };
    let mut obj = internal(res, &new);
    fieldset::write_entries(&mut obj, entries);
    prepare(state, res, Some(old_stored), &mut obj)?;

    if res.generation && changed_beyond_metadata(old_stored, &obj) {
        let generation = old_stored
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        obj["metadata"]["generation"] = json!(generation + 1);
    }
    if obj == *old_stored {
        return Ok((200, old));
    }
    let key = req.key(name);
    let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
    let finalizers_left = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if deleting && !finalizers_left {
        // The last finalizer is gone: the object goes, and the answer is the object
        // as written, with its previous resourceVersion.
        state.commit(key, None);
        return Ok((200, external(res, &obj)));
    }
    let stored = state.commit(key, Some(obj));
    Ok((200, external(res, &stored)))
}

fn changed_beyond_metadata(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
        }
        v
    };
    strip(old) != strip(new)
}

/// PATCH.
pub fn patch(shared: &Shared, req: &Request, name: &str) -> Result<Reply, ApiError> {
    let content_type = req
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    if content_type == "application/apply-patch+yaml"
        || content_type == "application/apply-patch+cbor"
    {
        return apply(shared, req, name);
    }
    if req.query.get("force").is_some() {
        return Err(ApiError::BadRequest(
            "force is only allowed for apply patches".into(),
        ));
    }
    let body = parse_json(req.body)?;
    let mut state = shared.store.lock();
    let old = state
        .get(&req.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(req.res, name))?;
    let mut patched = external(req.res, &old);
    let patch_error = |e: PatchError| match e {
        PatchError::TestFailed => ApiError::Invalid {
            kind: req.res.kind.to_string(),
            group: req.res.group.to_string(),
            name: name.to_string(),
            causes: vec![],
        },
        PatchError::Malformed(m) => ApiError::BadRequest(m),
    };
    match content_type {
        "application/merge-patch+json" => patch::merge_patch(&mut patched, &body),
        "application/json-patch+json" => {
            patch::json_patch(&mut patched, &body).map_err(patch_error)?
        }
        "application/strategic-merge-patch+json" => {
            patch::strategic_merge(req.res.kind, &mut patched, &body).map_err(patch_error)?
        }
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "{other}: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
            )));
        }
    }
    check_type(req.res, &patched)?;
    let entry = req.entry("Update");
    let (code, obj) = update(&mut state, req, name, &old, patched, Managed::Update(entry))?;
    Ok(Reply::Json(code, render_one(shared, req, obj)))
}

/// PATCH with `application/apply-patch+yaml`: server-side apply.
fn apply(shared: &Shared, req: &Request, name: &str) -> Result<Reply, ApiError> {
    if req.query.get("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::BadRequest(
            "PATCH, PUT, and POST requests to the apply endpoint require a fieldManager".into(),
        ));
    }
    let text_body = std::str::from_utf8(req.body)
        .map_err(|_| ApiError::BadRequest("the apply configuration is not UTF-8".into()))?;
    let mut config: Value = serde_yaml::from_str(text_body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?;
    if text(&config, "/apiVersion").is_empty() || text(&config, "/kind").is_empty() {
        return Err(ApiError::BadRequest(
            "apiVersion and kind must be set in an apply configuration".into(),
        ));
    }
    check_type(req.res, &config)?;
    let config_name = text(&config, "/metadata/name").to_string();
    if config_name != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({config_name}) does not match the name on the URL ({name})"
        )));
    }
    let force = req.query.flag("force");
    let status = req.status_subresource();
    let res = req.res;
    let me = req.entry("Apply");
    let mut state = shared.store.lock();
    let conflict = |c: fieldset::Conflicts| {
        let (message, causes) = c.describe();
        ApiError::ApplyConflict { message, causes }
    };
    let Some(old) = state.get(&req.key(name)).cloned() else {
        if status {
            return Err(ApiError::not_found(res, name));
        }
        // Apply creates what is missing.
        let mut entries = Vec::new();
        let zero = tracked(res, &res.zero_object(), false);
        let merged = fieldset::apply(
            res.kind,
            &mut entries,
            me,
            &zero,
            &tracked(res, &config, false),
            force,
        )
        .map_err(conflict)?;
        let mut obj = res.zero_object();
        untrack(res, &mut obj, &merged, false);
        obj["metadata"]["name"] = json!(name);
        if let Some(ns) = config.pointer("/metadata/namespace") {
            obj["metadata"]["namespace"] = ns.clone();
        }
        let created = insert(&mut state, req, obj, Managed::Entries(entries))?;
        return Ok(Reply::Json(201, render_one(shared, req, created)));
    };
    let live = external(res, &old);
    let mut entries = fieldset::read_entries(&live);
    apply_defaults_to_config(res, &mut config);
    let merged = fieldset::apply(
        res.kind,
        &mut entries,
        me,
        &tracked(res, &live, status),
        &tracked(res, &config, status),
        force,
    )
    .map_err(conflict)?;
    let mut new = live.clone();
    untrack(res, &mut new, &merged, status);
    if let Some(m) = new.pointer_mut("/metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    let (code, obj) = update(&mut state, req, name, &old, new, Managed::Entries(entries))?;
    Ok(Reply::Json(code, render_one(shared, req, obj)))
}

/// Status defaults the server applies to an apply configuration before merging
/// (an ingress point's `ipMode`), so applying what was read back is not a change.
fn apply_defaults_to_config(res: &Resource, config: &mut Value) {
    if res.kind == "Service" {
        services::apply_status_defaults(config);
    }
}

/// DELETE of one object.
pub fn delete(shared: &Shared, req: &Request, name: &str) -> Result<Reply, ApiError> {
    let options = if req.body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(req.body)?
    };
    let mut state = shared.store.lock();
    let key = req.key(name);
    let old = state
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(req.res, name))?;
    for (field, pointer) in [
        ("uid", "/metadata/uid"),
        ("resourceVersion", "/metadata/resourceVersion"),
    ] {
        if let Some(expected) = options
            .pointer(&format!("/preconditions/{field}"))
            .and_then(Value::as_str)
            && expected != text(&old, pointer)
        {
            return Err(ApiError::conflict(req.res, name));
        }
    }
    let has_finalizers = old
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let obj = if has_finalizers {
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            old
        } else {
            let mut marked = old;
            marked["metadata"]["deletionTimestamp"] = json!(meta::rfc3339(meta::now_secs()));
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            state.commit(key, Some(marked))
        }
    } else {
        state.commit(key, None)
    };
    let obj = external(req.res, &obj);
    let body = if matches!(req.res.kind, "Service" | "Namespace") {
        obj
    } else {
        let mut status = success_status();
        let mut details =
            json!({ "name": name, "kind": req.res.plural, "uid": text(&obj, "/metadata/uid") });
        if !req.res.group.is_empty() {
            details["group"] = json!(req.res.group);
        }
        status["details"] = details;
        status
    };
    Ok(Reply::Json(200, body))
}

/// DELETE of a collection: deletes what matches the selectors and answers the list
/// of deleted objects.
pub fn delete_collection(shared: &Shared, req: &Request) -> Result<Reply, ApiError> {
    let selectors = Selectors::parse(req)?;
    let mut state = shared.store.lock();
    let objects = state.list(req.res.storage, req.namespace.as_deref());
    let mut deleted = Vec::new();
    for obj in objects.into_iter().filter(|o| selectors.matches(o)) {
        let key = Key {
            storage: req.res.storage,
            namespace: text(&obj, "/metadata/namespace").to_string(),
            name: text(&obj, "/metadata/name").to_string(),
        };
        let mut gone = state.commit(key, None);
        if let Some(m) = gone.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
        deleted.push(gone);
    }
    Ok(Reply::Json(
        200,
        json!({
            "kind": req.res.list_kind(),
            "apiVersion": req.res.api_version(),
            "metadata": { "resourceVersion": state.rv().to_string() },
            "items": deleted,
        }),
    ))
}

/// Creates the objects a fresh real server has: the four namespaces and the
/// `kubernetes` Service.
pub fn seed(state: &mut State) {
    let now = meta::rfc3339(meta::now_secs());
    for name in ["default", "kube-node-lease", "kube-public", "kube-system"] {
        let ns = json!({
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "uid": meta::uid(),
                "creationTimestamp": now,
                "labels": { "kubernetes.io/metadata.name": name },
                "managedFields": [{
                    "manager": "kube-apiserver", "operation": "Update", "apiVersion": "v1",
                    "time": now, "fieldsType": "FieldsV1",
                    "fieldsV1": { "f:metadata": { "f:labels": { ".": {}, "f:kubernetes.io/metadata.name": {} } } }
                }]
            },
            "spec": { "finalizers": ["kubernetes"] },
            "status": { "phase": "Active" }
        });
        state.commit(
            Key {
                storage: "namespaces",
                namespace: String::new(),
                name: name.into(),
            },
            Some(ns),
        );
    }
    state.commit(
        Key {
            storage: "services",
            namespace: "default".into(),
            name: "kubernetes".into(),
        },
        Some(services::kubernetes_service(&meta::uid(), &now)),
    );
}
