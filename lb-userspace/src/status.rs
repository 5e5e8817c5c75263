//! Writes what xlb decided back to the API: `status.loadBalancer.ingress` (and, with
//! `--update-external-ips`, `spec.externalIPs`) by server-side apply under one field manager,
//! and Events on the Service. Clearing applies an empty configuration, which removes exactly the
//! fields xlb owns and nothing another manager wrote.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use serde_json::json;

/// The field manager every xlb write uses.
pub const FIELD_MANAGER: &str = "xlb";

/// How the ingress entry tells kube-proxy to treat the address (`status.loadBalancer.ingress[].ipMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpMode {
    /// kube-proxy also captures traffic to the VIP inside the cluster (the default).
    #[default]
    Vip,
    /// Traffic is always sent to the load balancer.
    Proxy,
}

impl IpMode {
    fn as_str(self) -> &'static str {
        match self {
            IpMode::Vip => "VIP",
            IpMode::Proxy => "Proxy",
        }
    }
}

/// Normal or Warning, as Events carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// Writes Service status, externalIPs and Events.
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    recorder: Recorder,
    ip_mode: IpMode,
    update_external_ips: bool,
}

impl StatusWriter {
    /// `instance` names this xlb (the node name) in the Events it reports.
    pub fn new(
        client: Client,
        instance: Option<String>,
        ip_mode: IpMode,
        update_external_ips: bool,
    ) -> Self {
        let reporter = Reporter {
            controller: "xlb".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            ip_mode,
            update_external_ips,
        }
    }

    /// Makes the Service's ingress exactly `ips` (empty: xlb's entry removed). A Service that is
    /// gone is not an error.
    pub async fn set_ingress(
        &self,
        namespace: &str,
        name: &str,
        ips: &[Ipv4Addr],
    ) -> Result<(), kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let status = if ips.is_empty() {
            json!({})
        } else {
            let ingress: Vec<_> = ips
                .iter()
                .map(|ip| json!({"ip": ip.to_string(), "ipMode": self.ip_mode.as_str()}))
                .collect();
            json!({"loadBalancer": {"ingress": ingress}})
        };
        let patch = json!({"apiVersion": "v1", "kind": "Service", "status": status});
        let params = PatchParams::apply(FIELD_MANAGER).force();
        ignore_not_found(api.patch_status(name, &params, &Patch::Apply(patch)).await)?;
        if self.update_external_ips {
            let spec = if ips.is_empty() {
                json!({})
            } else {
                json!({"externalIPs": ips.iter().map(ToString::to_string).collect::<Vec<_>>()})
            };
            let patch = json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace},
                "spec": spec,
            });
            ignore_not_found(api.patch(name, &params, &Patch::Apply(patch)).await)?;
        }
        Ok(())
    }

    /// Records an Event on the Service; repeats are folded into a series by the recorder.
    pub async fn event(
        &self,
        service: ObjectReference,
        kind: EventKind,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let event = Event {
            type_: match kind {
                EventKind::Normal => EventType::Normal,
                EventKind::Warning => EventType::Warning,
            },
            reason: reason.into(),
            note: Some(note.into()),
            action: reason.into(),
            secondary: None,
        };
        self.recorder.publish(&event, &service).await
    }
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}
