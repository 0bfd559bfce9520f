//! Reconciler scenarios against a mock API server (tower-test), one scenario per test, as
//! kube-rs/controller-rs does: each asserts the exact requests sent (created/patched objects,
//! status patches, events, finalizer handling).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod fake_api;
mod federation;
mod identity;
mod leader;
mod policy;
mod relay;
mod services;
mod workload;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use relayfed_crds::{AnyResource, Peer, Relay, RelayFederation, RolloutPolicy};
use relayfed_operator::distribution::Distributor;
use relayfed_operator::k8s::{Context, Settings, Stores};
use relayfed_operator::metrics::OperatorMetrics;

pub use fake_api::FakeApi;

/// The namespace every scenario uses.
pub const NS: &str = "relayfed-system";
/// 2026-11-22T00:00:00Z: the scenarios' "now".
pub fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_305_600)
}

fn store<K>(objs: impl IntoIterator<Item = K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store::<K>();
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    reader
}

/// The example federation's CRs (examples/federation), with uids and generations as the API
/// server would have set them.
pub fn example() -> Vec<AnyResource> {
    let dir = std::path::Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../examples/federation");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        out.extend(
            relayfed_crds::parse_documents(&f.display().to_string(), &std::fs::read_to_string(f).unwrap()).unwrap(),
        );
    }
    for (i, r) in out.iter_mut().enumerate() {
        let meta = match r {
            AnyResource::Federation(x) => &mut x.metadata,
            AnyResource::Relay(x) => &mut x.metadata,
            AnyResource::Peer(x) => &mut x.metadata,
            AnyResource::RolloutPolicy(x) => &mut x.metadata,
        };
        meta.namespace = Some(NS.into());
        meta.uid = Some(format!("uid-crd-{i}"));
        meta.generation = Some(1);
    }
    out
}

/// Cluster objects the informers hold besides the CRs.
#[derive(Default)]
pub struct Cluster {
    pub pods: Vec<k8s_openapi::api::core::v1::Pod>,
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
    pub exports: Vec<relayfed_operator::k8s::services::ServiceExport>,
    pub imports: Vec<relayfed_operator::k8s::services::ServiceImport>,
}

/// A scenario: the fake API, the reconcilers' context over it, and the CRs in the stores.
pub struct Scenario {
    pub api: FakeApi,
    pub ctx: Arc<Context>,
}

impl Scenario {
    /// A context whose stores hold `resources` and whose clock reads `now`.
    pub fn new(resources: &[AnyResource], now: SystemTime) -> Self {
        Self::with_cluster(resources, now, Cluster::default())
    }

    /// [`Scenario::new`] with pods, Services, exports and imports in the informer caches.
    pub fn with_cluster(resources: &[AnyResource], now: SystemTime, cluster: Cluster) -> Self {
        let (client, api) = FakeApi::client();
        let pick = |f: &dyn Fn(&AnyResource) -> bool| resources.iter().filter(|r| f(r)).cloned().collect::<Vec<_>>();
        let feds: Vec<RelayFederation> = pick(&|r| matches!(r, AnyResource::Federation(_)))
            .into_iter()
            .filter_map(|r| if let AnyResource::Federation(x) = r { Some(*x) } else { None })
            .collect();
        let relays: Vec<Relay> = resources
            .iter()
            .filter_map(|r| if let AnyResource::Relay(x) = r { Some((**x).clone()) } else { None })
            .collect();
        let peers: Vec<Peer> = resources
            .iter()
            .filter_map(|r| if let AnyResource::Peer(x) = r { Some((**x).clone()) } else { None })
            .collect();
        let policies: Vec<RolloutPolicy> = resources
            .iter()
            .filter_map(|r| if let AnyResource::RolloutPolicy(x) = r { Some((**x).clone()) } else { None })
            .collect();
        let stores = Stores {
            federations: store(feds),
            relays: store(relays),
            peers: store(peers),
            policies: store(policies),
            pods: store(cluster.pods),
            services: store(cluster.services),
            exports: store(cluster.exports),
            imports: store(cluster.imports),
        };
        let metrics = Arc::new(OperatorMetrics::new());
        let distributor = Distributor::new(metrics.clone(), 0);
        // The operator serves the example federation (`--federation relayfed-system/acme`).
        let mut settings = Settings::default();
        settings.workloads.federation = "relayfed-system/acme".into();
        let ctx = Context::new(client, settings, metrics, stores, distributor, Arc::new(move || now));
        // The API server holds the same CRs the informers saw.
        for r in resources {
            let (plural, value) = match r {
                AnyResource::Federation(x) => ("relayfederations", serde_json::to_value(x).unwrap()),
                AnyResource::Relay(x) => ("relays", serde_json::to_value(x).unwrap()),
                AnyResource::Peer(x) => ("peers", serde_json::to_value(x).unwrap()),
                AnyResource::RolloutPolicy(x) => ("rolloutpolicies", serde_json::to_value(x).unwrap()),
            };
            api.seed(&format!("/apis/relayfed.io/v1alpha1/namespaces/{NS}/{plural}/{}", r.name()), value);
        }
        Self { api, ctx }
    }
}

/// Finds the `Relay` named `name` in `resources`.
pub fn relay(resources: &[AnyResource], name: &str) -> Relay {
    resources
        .iter()
        .find_map(|r| match r {
            AnyResource::Relay(x) if x.metadata.name.as_deref() == Some(name) => Some((**x).clone()),
            _ => None,
        })
        .unwrap()
}

/// The example's federation object.
pub fn federation(resources: &[AnyResource]) -> RelayFederation {
    resources.iter().find_map(|r| if let AnyResource::Federation(x) = r { Some((**x).clone()) } else { None }).unwrap()
}
