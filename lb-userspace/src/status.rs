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

use crate::config::IpMode;
use crate::plan::EventKind;

/// The field manager every xlb write uses.
pub const FIELD_MANAGER: &str = "xlb";

/// Writes Service status, externalIPs and Events.
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    recorder: Recorder,
    update_external_ips: bool,
}

impl StatusWriter {
    /// `instance` names this xlb (the node name) in the Events it reports.
    pub fn new(client: Client, instance: Option<String>, update_external_ips: bool) -> Self {
        let reporter = Reporter {
            controller: "xlb".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            update_external_ips,
        }
    }

    /// Makes xlb's ingress entry of the Service `ingress` (`None`: xlb's entry removed). A
    /// Service that is gone is not an error.
    pub async fn set_ingress(
        &self,
        namespace: &str,
        name: &str,
        ingress: Option<(Ipv4Addr, IpMode)>,
    ) -> Result<(), kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let status = match ingress {
            None => json!({}),
            Some((ip, mode)) => json!({"loadBalancer": {"ingress": [
                {"ip": ip.to_string(), "ipMode": mode.as_api_str()}
            ]}}),
        };
        // The API server refuses an apply whose body does not name the object (400 "the name
        // of the object () does not match the name on the URL").
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        ignore_not_found(api.patch_status(name, &params, &Patch::Apply(patch)).await)?;
        if self.update_external_ips {
            let spec = match ingress {
                None => json!({}),
                Some((ip, _)) => json!({"externalIPs": [ip.to_string()]}),
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
        service: &ObjectReference,
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
        self.recorder.publish(&event, service).await
    }
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}
