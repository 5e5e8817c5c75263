//! The kube-rs client (kube 5, k8s-openapi 0.29) against kube-fake: list, watch
//! (bookmarks, resume, relist after 410), server-side apply of Service status, and
//! the fault hooks.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use serde_json::json;

const STEP: Duration = Duration::from_secs(10);

async fn start(config: kube_fake::Config) -> (kube_fake::Server, kube::Client) {
    let server = kube_fake::Server::start_with(config)
        .await
        .expect("kube-fake starts");
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    let client = kube::Client::try_from(config).expect("kube-rs client builds");
    (server, client)
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": { "type": "LoadBalancer", "selector": { "app": name }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] }
    }))
    .expect("valid Service")
}

/// The next event of a watcher stream that satisfies `pick`, within [`STEP`].
async fn next_matching<S, T>(
    stream: &mut S,
    what: &str,
    mut pick: impl FnMut(&Event<Service>) -> Option<T>,
) -> T
where
    S: futures::Stream<Item = Result<Event<Service>, watcher::Error>> + Unpin,
{
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {STEP:?}"))
            .unwrap_or_else(|| panic!("watcher ended before {what}"));
        if let Ok(event) = item
            && let Some(found) = pick(&event)
        {
            return found;
        }
    }
}

fn applied(name: &'static str) -> impl FnMut(&Event<Service>) -> Option<Service> {
    move |e| match e {
        Event::Apply(s) | Event::InitApply(s) if s.metadata.name.as_deref() == Some(name) => {
            Some(s.clone())
        }
        _ => None,
    }
}

#[tokio::test]
async fn list_create_and_apply_status_with_kube_rs() {
    let (_server, client) = start(kube_fake::Config::default()).await;
    let services: Api<Service> = Api::namespaced(client, "default");
    let list = services.list(&ListParams::default()).await.expect("list");
    assert_eq!(
        list.items.len(),
        1,
        "a fresh server has only the kubernetes Service"
    );

    let created = services
        .create(&PostParams::default(), &service("web"))
        .await
        .expect("create");
    let spec = created.spec.expect("spec");
    let node_port = spec
        .ports
        .as_ref()
        .and_then(|p| p[0].node_port)
        .expect("a node port is allocated");
    assert!((30000..=32767).contains(&node_port));
    assert!(
        spec.cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.96."))
    );

    let status = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" },
        "status": { "loadBalancer": { "ingress": [{ "ip": "198.51.100.10" }] } }
    });
    let params = PatchParams::apply("xlb").force();
    let patched = services
        .patch_status("web", &params, &Patch::Apply(&status))
        .await
        .expect("apply status");
    let ingress = patched
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .expect("ingress set");
    assert_eq!(ingress[0].ip.as_deref(), Some("198.51.100.10"));
    assert_eq!(
        ingress[0].ip_mode.as_deref(),
        Some("VIP"),
        "ipMode is defaulted"
    );
    let managers = patched.metadata.managed_fields.expect("managedFields");
    assert!(
        managers
            .iter()
            .any(|m| m.manager.as_deref() == Some("xlb")
                && m.subresource.as_deref() == Some("status")),
        "xlb owns the status: {managers:?}"
    );

    let other = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" },
        "status": { "loadBalancer": { "ingress": [{ "ip": "198.51.100.99" }] } }
    });
    let err = services
        .patch_status("web", &PatchParams::apply("other"), &Patch::Apply(&other))
        .await
        .expect_err("a second applier without force conflicts");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("expected a 409, got {other}"),
    }

    let spec_change =
        json!({"spec": {"sessionAffinity": "ClientIP"}, "status": {"loadBalancer": {}}});
    let after = services
        .patch("web", &PatchParams::default(), &Patch::Merge(&spec_change))
        .await
        .expect("spec patch");
    let lb = after
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress);
    assert!(
        lb.is_some_and(|i| i.len() == 1),
        "a spec write leaves the status alone"
    );
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn watch_resumes_from_a_bookmark() {
    let config = kube_fake::Config {
        bookmark_interval: Duration::from_millis(200),
        ..kube_fake::Config::default()
    };
    let (_server, client) = start(config).await;
    let services: Api<Service> = Api::namespaced(client, "default");
    services
        .create(&PostParams::default(), &service("before"))
        .await
        .expect("create");

    let params = WatchParams::default().timeout(5);
    let mut stream = services.watch(&params, "0").await.expect("watch").boxed();
    let bookmark_rv = tokio::time::timeout(STEP, async {
        while let Some(event) = stream.try_next().await.expect("watch event") {
            if let WatchEvent::Bookmark(b) = event {
                return b.metadata.resource_version;
            }
        }
        panic!("watch ended without a bookmark")
    })
    .await
    .expect("a bookmark within 10 s");
    drop(stream);

    services
        .create(&PostParams::default(), &service("after"))
        .await
        .expect("create");
    let mut resumed = services
        .watch(&params, &bookmark_rv)
        .await
        .expect("resumed watch")
        .boxed();
    let first = tokio::time::timeout(STEP, resumed.try_next())
        .await
        .expect("an event within 10 s")
        .expect("watch event")
        .expect("the resumed watch delivers");
    match first {
        WatchEvent::Added(s) => assert_eq!(
            s.metadata.name.as_deref(),
            Some("after"),
            "only what came after the bookmark"
        ),
        other => panic!("expected ADDED of `after`, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_recovers_after_dropped_watches_and_relists_after_410() {
    let (server, client) = start(kube_fake::Config::default()).await;
    let services: Api<Service> = Api::namespaced(client, "default");
    let mut stream = watcher::watcher(services.clone(), watcher::Config::default()).boxed();
    next_matching(&mut stream, "InitDone", |e| {
        matches!(e, Event::InitDone).then_some(())
    })
    .await;

    services
        .create(&PostParams::default(), &service("one"))
        .await
        .expect("create");
    next_matching(&mut stream, "Apply of one", applied("one")).await;

    // Connections break: the watcher re-watches from where it was.
    server.faults().drop_watches();
    services
        .create(&PostParams::default(), &service("two"))
        .await
        .expect("create");
    next_matching(&mut stream, "Apply of two after the drop", applied("two")).await;

    // The history moves past the watcher's version: the re-watch gets 410 and the
    // watcher lists again.
    server.compact();
    server.faults().drop_watches();
    next_matching(&mut stream, "a relist (Init) after 410", |e| {
        matches!(e, Event::Init).then_some(())
    })
    .await;
    let relisted = next_matching(&mut stream, "InitApply of two", applied("two")).await;
    assert_eq!(relisted.metadata.name.as_deref(), Some("two"));
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events() {
    let (_server, client) = start(kube_fake::Config::default()).await;
    let services: Api<Service> = Api::namespaced(client, "default");
    services
        .create(&PostParams::default(), &service("early"))
        .await
        .expect("create");
    let mut stream = watcher::watcher(
        services.clone(),
        watcher::Config::default().streaming_lists(),
    )
    .boxed();
    next_matching(&mut stream, "InitApply of early", |e| match e {
        Event::InitApply(s) if s.metadata.name.as_deref() == Some("early") => Some(()),
        _ => None,
    })
    .await;
    next_matching(&mut stream, "InitDone", |e| {
        matches!(e, Event::InitDone).then_some(())
    })
    .await;
    services
        .create(&PostParams::default(), &service("late"))
        .await
        .expect("create");
    next_matching(&mut stream, "Apply of late", applied("late")).await;
}

#[tokio::test]
async fn refused_and_slow_requests() {
    let (server, client) = start(kube_fake::Config::default()).await;
    let services: Api<Service> = Api::namespaced(client, "default");
    let faults = server.faults();

    // kube-rs retries 503s, so a short refusal only shows as a delay.
    faults.refuse_for(Duration::from_millis(300));
    let started = Instant::now();
    services
        .list(&ListParams::default())
        .await
        .expect("served once the refusal is over");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the refusal delayed the answer"
    );

    faults.refuse();
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        services.list(&ListParams::default()),
    )
    .await;
    assert!(!matches!(refused, Ok(Ok(_))), "refused until cleared");
    faults.clear();
    services
        .list(&ListParams::default())
        .await
        .expect("served after clear");

    faults.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    services
        .list(&ListParams::default())
        .await
        .expect("slow but served");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "latency applies"
    );
    faults.clear();
}
