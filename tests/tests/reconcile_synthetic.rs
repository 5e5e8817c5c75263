//! `reconcile` on synthetic clusters (`xlb_tests::synthetic`).

use xlb::model::{Allocations, ClusterState};
use xlb::reconcile::reconcile;
use xlb::settings::Settings;
use xlb_tests::synthetic::cluster;

/// The same cluster as `state`, built in the opposite order and with every list inside an
/// object reversed: ports of each Service, endpoints and ports of each EndpointSlice,
/// addresses of each Node. The API server gives no order guarantee for any of these.
fn reordered(state: &ClusterState) -> ClusterState {
    let mut out = ClusterState::default();
    for node in state.nodes.values().rev() {
        let mut node = node.clone();
        if let Some(addresses) = node
            .status
            .as_mut()
            .and_then(|status| status.addresses.as_mut())
        {
            addresses.reverse();
        }
        out.upsert_node(node);
    }
    for slice in state.endpoint_slices.values().rev() {
        let mut slice = slice.clone();
        if let Some(endpoints) = slice.endpoints.as_mut() {
            endpoints.reverse();
        }
        if let Some(ports) = slice.ports.as_mut() {
            ports.reverse();
        }
        out.upsert_endpoint_slice(slice);
    }
    for service in state.services.values().rev() {
        let mut service = service.clone();
        if let Some(ports) = service.spec.as_mut().and_then(|spec| spec.ports.as_mut()) {
            ports.reverse();
        }
        out.upsert_service(service);
    }
    out
}

/// The plan depends on the cluster, not on the order its objects and their lists arrived in,
/// nor on the thread (each thread seeds hash maps differently): a restarted or relisting xlb
/// must not move addresses or reshuffle backends.
#[test]
fn reconcile_is_deterministic() {
    let (state, config, host) = cluster(200, 20);
    let config = Settings::from(&config);
    let first = reconcile(&state, &config, &host, &Allocations::default());
    assert!(
        first.virtual_services.len() > 200
            && first
                .virtual_services
                .iter()
                .any(|service| service.backends.len() > 1),
        "the cluster must give a plan with work in it"
    );
    let shuffled = reordered(&state);
    assert!(
        shuffled.endpoint_slices != state.endpoint_slices && shuffled.services != state.services,
        "the second input must really list things in another order"
    );
    let second = std::thread::scope(|scope| {
        scope
            .spawn(|| reconcile(&shuffled, &config, &host, &Allocations::default()))
            .join()
            .expect("reconcile on another thread")
    });
    assert!(
        first == second,
        "the plans differ; first difference in virtual services: {:?}",
        first
            .virtual_services
            .iter()
            .zip(&second.virtual_services)
            .find(|(a, b)| a != b)
    );
}
