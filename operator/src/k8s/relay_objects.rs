//! The desired objects of one main `Relay`, as pure functions of the relay, its snapshot and
//! settings: Deployment, Service, PodDisruptionBudget, and the Secrets/ConfigMap its pods mount.
//!
//! Pod layout: `/var/run/relayfed/keys` (the plan's key directory) is a projected volume of
//! the identity Secret (`ca.pem`, `<node>.pem`, `<node>.key`) and the ECH Secret
//! (`<node>-ech.json`); `/etc/relayfed/snapshot.json` is the config ConfigMap (the first
//! version; later ones stream from the config server).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, Secret, SecretProjection,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use relayfed_crds::Relay;
use relayfed_crds::relay::{ResourceAmounts, ServiceType};

use super::{FIELD_MANAGER, LABEL_FEDERATION, LABEL_MANAGED_BY, LABEL_RELAY, Settings};

/// Admin/metrics port of relay pods.
pub const ADMIN_PORT: i32 = crate::plan::placement::CLUSTER_ADMIN_PORT as i32;
/// Where the config ConfigMap is mounted.
pub const CONFIG_PATH: &str = "/etc/relayfed/snapshot.json";

/// Name of a relay's identity Secret (certificate, key, CA).
pub fn identity_secret_name(relay: &str) -> String {
    format!("{relay}-identity")
}

/// Name of a relay's ECH key Secret.
pub fn ech_secret_name(relay: &str) -> String {
    format!("{relay}-ech")
}

/// Name of a relay's config ConfigMap.
pub fn config_map_name(relay: &str) -> String {
    format!("{relay}-config")
}

/// Selector labels of a relay's pods.
pub fn selector(relay: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "relayfed-relay".to_owned()),
        (LABEL_RELAY.to_owned(), relay.to_owned()),
    ])
}

fn labels(r: &Relay, name: &str) -> BTreeMap<String, String> {
    let mut l = selector(name);
    l.insert(LABEL_FEDERATION.to_owned(), r.spec.federation.clone());
    l.insert(LABEL_MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned());
    l
}

fn meta(r: &Relay, name: String, owner: &OwnerReference) -> ObjectMeta {
    let relay = r.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name),
        namespace: r.metadata.namespace.clone(),
        labels: Some(labels(r, &relay)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

/// A Secret of `data` owned by the relay.
pub fn secret(r: &Relay, name: String, owner: &OwnerReference, data: BTreeMap<String, Vec<u8>>) -> Secret {
    Secret {
        metadata: meta(r, name, owner),
        type_: Some("Opaque".into()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Default::default()
    }
}

/// The config ConfigMap holding the relay's current snapshot.
pub fn config_map(r: &Relay, owner: &OwnerReference, snapshot_json: String) -> ConfigMap {
    let name = config_map_name(&r.metadata.name.clone().unwrap_or_default());
    ConfigMap {
        metadata: meta(r, name, owner),
        data: Some(BTreeMap::from([("snapshot.json".to_owned(), snapshot_json)])),
        ..Default::default()
    }
}

fn amounts(a: &ResourceAmounts) -> Option<BTreeMap<String, Quantity>> {
    let mut m = BTreeMap::new();
    if let Some(c) = &a.cpu {
        m.insert("cpu".to_owned(), Quantity(c.clone()));
    }
    if let Some(mem) = &a.memory {
        m.insert("memory".to_owned(), Quantity(mem.clone()));
    }
    (!m.is_empty()).then_some(m)
}

/// `Some(v)` unless `v` is empty (so an unset value is absent from the applied object).
fn non_empty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// The relay's Deployment.
pub fn deployment(r: &Relay, owner: &OwnerReference, settings: &Settings) -> Deployment {
    let name = r.metadata.name.clone().unwrap_or_default();
    let node = &r.spec.node_id;
    let port = i32::from(r.spec.listen_port);
    let keys = settings.key_dir.display().to_string();
    let projected = |secret: String| VolumeProjection {
        secret: Some(SecretProjection { name: secret, ..Default::default() }),
        ..Default::default()
    };
    let container = Container {
        name: "relayfed-proxy".into(),
        image: Some(settings.proxy_image.clone()),
        // The image's ENTRYPOINT is relayfed-proxy (docs/operations.md, "Images").
        args: Some(vec![
            "main-relay".into(),
            "--config".into(),
            CONFIG_PATH.into(),
            "--config-server".into(),
            settings.config_server.clone(),
            "--log-format".into(),
            "json".into(),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("quic".into()),
                container_port: port,
                protocol: Some("UDP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            requests: amounts(&r.spec.resources.requests),
            limits: amounts(&r.spec.resources.limits),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(ADMIN_PORT),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount { name: "keys".into(), mount_path: keys, read_only: Some(true), ..Default::default() },
            VolumeMount {
                name: "config".into(),
                mount_path: "/etc/relayfed".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let placement = &settings.relay_pods;
    let pod = PodSpec {
        containers: vec![container],
        node_selector: (!placement.node_selector.is_empty()).then(|| placement.node_selector.clone()),
        tolerations: non_empty(&placement.tolerations),
        affinity: placement.affinity.clone(),
        topology_spread_constraints: non_empty(&placement.topology_spread_constraints),
        priority_class_name: placement.priority_class_name.clone(),
        image_pull_secrets: non_empty(&placement.image_pull_secrets),
        security_context: Some(PodSecurityContext {
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            run_as_non_root: Some(true),
            // The key files are 0400 and the kubelet writes them as root: the group it gives them
            // (and group read) is the only way the relay's uid can open them.
            fs_group: Some(65532),
            ..Default::default()
        }),
        automount_service_account_token: Some(false),
        volumes: Some(vec![
            Volume {
                name: "keys".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![projected(identity_secret_name(&name)), projected(ech_secret_name(&name))]),
                    default_mode: Some(0o400),
                }),
                ..Default::default()
            },
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource { name: config_map_name(&name), ..Default::default() }),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let mut template_labels = placement.pod_labels.clone();
    template_labels.extend(labels(r, &name));
    template_labels.insert("relayfed.io/node".into(), node.clone());
    let annotations = (!placement.pod_annotations.is_empty()).then(|| placement.pod_annotations.clone());
    Deployment {
        metadata: meta(r, name.clone(), owner),
        spec: Some(DeploymentSpec {
            replicas: Some(r.spec.replicas),
            selector: LabelSelector { match_labels: Some(selector(&name)), ..Default::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(template_labels), annotations, ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The relay's Service (QUIC over UDP; the type from `spec.serviceType`).
pub fn service(r: &Relay, owner: &OwnerReference) -> Service {
    let name = r.metadata.name.clone().unwrap_or_default();
    let port = i32::from(r.spec.listen_port);
    let type_ = match r.spec.service_type.unwrap_or_default() {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata: meta(r, name.clone(), owner),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some("quic".into()),
                port,
                target_port: Some(IntOrString::String("quic".into())),
                protocol: Some("UDP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The relay's PodDisruptionBudget: voluntary evictions never take the last ready replica.
pub fn pdb(r: &Relay, owner: &OwnerReference) -> PodDisruptionBudget {
    let name = r.metadata.name.clone().unwrap_or_default();
    let spec = if r.spec.replicas > 1 {
        PodDisruptionBudgetSpec { min_available: Some(IntOrString::Int(1)), ..Default::default() }
    } else {
        // One replica: allow the eviction (node drains must not hang) — rolling updates surge first.
        PodDisruptionBudgetSpec { max_unavailable: Some(IntOrString::Int(1)), ..Default::default() }
    };
    PodDisruptionBudget {
        metadata: meta(r, name.clone(), owner),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector { match_labels: Some(selector(&name)), ..Default::default() }),
            ..spec
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::k8s::RelayPods;

    fn hub() -> Relay {
        let text = include_str!("../../../examples/federation/10-main-relays.yaml");
        let docs = relayfed_crds::parse_documents("10-main-relays.yaml", text).unwrap();
        docs.into_iter()
            .find_map(|d| match d {
                relayfed_crds::AnyResource::Relay(r) => Some(*r),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn relay_pods_get_the_charts_placement_and_metadata() {
        let chart_json = r#"{"nodeSelector":{"relayfed.io/edge":"true"},"tolerations":[{"key":"edge","operator":"Exists","effect":"NoSchedule"}],
            "affinity":{},"topologySpreadConstraints":[],"podAnnotations":{"team":"net"},"podLabels":{"tier":"edge","relayfed.io/node":"spoofed"},
            "priorityClassName":"relayfed-critical","imagePullSecrets":[{"name":"regcred"}]}"#;
        let relay_pods = RelayPods::parse(chart_json).unwrap();
        let settings = Settings { relay_pods, ..Settings::default() };
        let owner = OwnerReference::default();
        let dep = deployment(&hub(), &owner, &settings);
        let template = dep.spec.unwrap().template;
        let pod = template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["relayfed.io/edge"], "true");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("edge"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("relayfed-critical"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
        assert!(pod.topology_spread_constraints.is_none(), "empty values stay absent");
        let meta = template.metadata.unwrap();
        assert_eq!(meta.annotations.unwrap()["team"], "net");
        let labels = meta.labels.unwrap();
        assert_eq!(labels["tier"], "edge");
        assert_eq!(labels["relayfed.io/node"], "hub-eu", "the operator's own labels win");
        // Arguments only: the image's ENTRYPOINT is relayfed-proxy.
        assert!(pod.containers[0].command.is_none());
        assert_eq!(pod.containers[0].args.as_ref().unwrap()[0], "main-relay");
        // The key files are 0400: without the group the kubelet gives them, uid 65532 cannot
        // read them (the two-cluster test found relays crash-looping on exactly that).
        let sc = pod.security_context.unwrap();
        assert_eq!((sc.run_as_user, sc.fs_group), (Some(65532), Some(65532)));
    }

    #[test]
    fn relay_pods_reject_unknown_keys_and_accept_nothing() {
        assert_eq!(RelayPods::parse("").unwrap(), RelayPods::default());
        let err = RelayPods::parse(r#"{"nodeselector":{}}"#).unwrap_err();
        assert!(err.contains("nodeselector"), "{err}");
        let err = RelayPods::parse(r#"{"tolerations":[{"tolerationSeconds":"soon"}]}"#).unwrap_err();
        assert!(err.contains("tolerations"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_parsed_or_refused_with_a_message(text in "\\PC{0,200}") {
            if let Err(e) = RelayPods::parse(&text) {
                proptest::prop_assert!(e.starts_with("--relay-pods"));
            }
        }

        #[test]
        fn placement_maps_survive_the_flag(
            selector in proptest::collection::btree_map("[a-z./-]{1,20}", "[a-z0-9-]{0,20}", 0..5),
            labels in proptest::collection::btree_map("[a-z./-]{1,20}", "[a-z0-9-]{0,20}", 0..5),
            priority in proptest::option::of("[a-z-]{1,20}"),
        ) {
            let json = serde_json::json!({"nodeSelector": selector, "podLabels": labels, "priorityClassName": priority});
            let parsed = RelayPods::parse(&json.to_string()).unwrap();
            proptest::prop_assert_eq!(parsed.node_selector, selector);
            proptest::prop_assert_eq!(parsed.pod_labels, labels);
            proptest::prop_assert_eq!(parsed.priority_class_name, priority);
        }
    }
}
