//! Wires the reconcilers into kube-runtime controllers (one per CRD, owned objects watched),
//! behind Lease leader election, and serves config distribution for one federation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use relayfed_crds::{Peer, Relay, RelayFederation, RolloutPolicy};
use tracing::{info, warn};

use super::context::{error_policy, object_key};
use super::leader::{Elector, PodLabel};
use super::probes::Role;
use super::services::{ServiceExport, ServiceImport};
use super::{Context, FIELD_MANAGER, LABEL_MANAGED_BY, ReconcileError, Settings, Stores};
use crate::distribution::Distributor;
use crate::metrics::OperatorMetrics;

/// What `relayfed operator run` needs beyond [`Settings`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Namespace of the leader Lease (the operator's own).
    pub namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// The federation (`namespace/name`) whose nodes the distribution server serves.
    pub federation: String,
    /// Distribution server address.
    pub distribution_listen: SocketAddr,
    /// Workload certificate (CSR) server address.
    pub identity_listen: SocketAddr,
}

/// What a controller stream yields per reconcile.
type Outcome<K> = Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<ReconcileError, watcher::Error>>;

fn report<K: kube::Resource>(kind: &'static str) -> impl FnMut(Outcome<K>) -> std::future::Ready<()> {
    move |res| {
        match res {
            Ok((obj, _)) => tracing::debug!(kind, object = %obj, "reconciled"),
            Err(e) => tracing::debug!(kind, error = %e, "reconcile error (requeued with backoff)"),
        }
        std::future::ready(())
    }
}

/// Builds the four controllers over `client`, returns their shared context and the future
/// that runs them until shutdown.
pub fn controllers(
    client: Client,
    settings: Settings,
    metrics: Arc<OperatorMetrics>,
    distributor: Arc<Distributor>,
) -> (Arc<Context>, impl std::future::Future<Output = ()>) {
    let wc = watcher::Config::default();
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={FIELD_MANAGER}"));
    let feds = Controller::new(Api::<RelayFederation>::all(client.clone()), wc.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone());
    // A federation's plan and status follow its members: a Relay maps to the federation it
    // names, a RolloutPolicy to the federations that use it as default, a Peer to the
    // federations of its namespace. (Without this, a federation applied before its
    // RolloutPolicy stayed PlanInvalid until the 5-minute requeue.)
    let fed_store = feds.store();
    let in_namespace = move |ns: Option<String>, pick: &dyn Fn(&RelayFederation) -> bool| {
        fed_store
            .state()
            .into_iter()
            .filter(|f| f.metadata.namespace == ns && pick(f))
            .map(|f| ObjectRef::from_obj(f.as_ref()))
            .collect::<Vec<_>>()
    };
    let (by_policy, by_peer) = (in_namespace.clone(), in_namespace);
    let feds = feds
        .watches(Api::<Relay>::all(client.clone()), wc.clone(), |r: Relay| {
            Some(ObjectRef::<RelayFederation>::new(&r.spec.federation).within(&r.namespace()?))
        })
        .watches(Api::<RolloutPolicy>::all(client.clone()), wc.clone(), move |p: RolloutPolicy| {
            let name = p.name_any();
            by_policy(p.namespace(), &|f| f.spec.default_rollout_policy == name)
        })
        .watches(Api::<Peer>::all(client.clone()), wc.clone(), move |p: Peer| by_peer(p.namespace(), &|_| true));
    let relays = Controller::new(Api::<Relay>::all(client.clone()), wc.clone())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<Secret>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned.clone());
    // A main relay's status shows the config version it acknowledged: its acks re-reconcile.
    let relays = {
        let trigger = main_relay_acks(distributor.clone(), relays.store());
        relays.reconcile_all_on(trigger)
    };
    // An export's validity follows the Service of the same name: Service events map to it.
    let exports = Controller::new(Api::<ServiceExport>::all(client.clone()), wc.clone()).watches(
        Api::<Service>::all(client.clone()),
        wc.clone(),
        |svc: Service| Some(ObjectRef::<ServiceExport>::new(&svc.name_any()).within(&svc.namespace()?)),
    );
    let imports = Controller::new(Api::<ServiceImport>::all(client.clone()), wc.clone())
        .owns(Api::<Service>::all(client.clone()), owned);
    // Peers and policies are judged against their federation's plan: a federation change
    // (e.g. it became valid once its RolloutPolicy arrived) re-judges them.
    let peers = Controller::new(Api::<Peer>::all(client.clone()), wc.clone());
    let peer_store = peers.store();
    let peers = peers.watches(Api::<RelayFederation>::all(client.clone()), wc.clone(), move |f: RelayFederation| {
        let ns = f.namespace();
        peer_store
            .state()
            .into_iter()
            .filter(|p| p.metadata.namespace == ns)
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    });
    let policies = Controller::new(Api::<RolloutPolicy>::all(client.clone()), wc.clone()).watches(
        Api::<RelayFederation>::all(client.clone()),
        wc.clone(),
        |f: RelayFederation| {
            Some(ObjectRef::<RolloutPolicy>::new(&f.spec.default_rollout_policy).within(&f.namespace()?))
        },
    );
    // Injected pods only (the webhook labels them); a change replans the workloads' federation.
    let injected = watcher::Config::default().labels(&format!("{}=true", crate::webhook::INJECTED_LABEL));
    let pods = Controller::new(Api::<Pod>::all(client.clone()), injected);
    let (services, services_writer) = reflector::store::<Service>();
    let services_watch =
        reflector::reflector(services_writer, watcher(Api::<Service>::all(client.clone()), wc)).applied_objects();
    let stores = Stores {
        federations: feds.store(),
        relays: relays.store(),
        peers: peers.store(),
        policies: policies.store(),
        pods: pods.store(),
        services,
        exports: exports.store(),
        imports: imports.store(),
    };
    let clock: super::Clock = Arc::new(SystemTime::now);
    let ctx = Context::new(client, settings, metrics, stores, distributor, clock);
    let c = ctx.clone();
    let run = async move {
        let f = feds
            .run(
                super::federation::reconcile,
                |o: Arc<RelayFederation>, e, ctx: Arc<Context>| {
                    error_policy("RelayFederation", &object_key(&o.metadata), e, &ctx)
                },
                c.clone(),
            )
            .for_each(report("RelayFederation"));
        let r = relays
            .run(
                super::relay::reconcile,
                |o: Arc<Relay>, e, ctx: Arc<Context>| error_policy("Relay", &object_key(&o.metadata), e, &ctx),
                c.clone(),
            )
            .for_each(report("Relay"));
        let p = peers
            .run(
                super::policy::reconcile_peer,
                |o: Arc<Peer>, e, ctx: Arc<Context>| error_policy("Peer", &object_key(&o.metadata), e, &ctx),
                c.clone(),
            )
            .for_each(report("Peer"));
        let q = policies
            .run(
                super::policy::reconcile_policy,
                |o: Arc<RolloutPolicy>, e, ctx: Arc<Context>| {
                    error_policy("RolloutPolicy", &object_key(&o.metadata), e, &ctx)
                },
                c.clone(),
            )
            .for_each(report("RolloutPolicy"));
        let x = exports
            .run(
                super::services::reconcile_export,
                |o: Arc<ServiceExport>, e, ctx: Arc<Context>| {
                    error_policy("ServiceExport", &object_key(&o.metadata), e, &ctx)
                },
                c.clone(),
            )
            .for_each(report("ServiceExport"));
        let i = imports
            .run(
                super::services::reconcile_import,
                |o: Arc<ServiceImport>, e, ctx: Arc<Context>| {
                    error_policy("ServiceImport", &object_key(&o.metadata), e, &ctx)
                },
                c.clone(),
            )
            .for_each(report("ServiceImport"));
        let w = pods
            .run(
                super::workloads::reconcile_pod,
                |o: Arc<Pod>, e, ctx: Arc<Context>| error_policy("Pod", &object_key(&o.metadata), e, &ctx),
                c.clone(),
            )
            .for_each(report("Pod"));
        // An exported Service's selector or ports changed: the pods that back it change.
        let ctx_s = c.clone();
        let s = services_watch.for_each(move |ev| {
            if let Ok(svc) = ev {
                let exported = ctx_s
                    .stores
                    .exports
                    .get(&ObjectRef::new(&svc.name_any()).within(&svc.namespace().unwrap_or_default()));
                if exported.is_some() {
                    super::workloads::replan_workloads(&ctx_s);
                }
            }
            std::future::ready(())
        });
        let rollouts = super::rollout::run(c.clone());
        futures::join!(f, r, p, q, x, i, w, s, rollouts);
    };
    (ctx, run)
}

/// Yields whenever a main relay acknowledges a new config version (workload acks are many and
/// change no Relay status, so they do not trigger).
fn main_relay_acks(
    distributor: Arc<Distributor>,
    relays: reflector::Store<Relay>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let rx = distributor.ack_changes();
    futures::stream::unfold((rx, std::collections::BTreeMap::new()), move |(mut rx, last)| {
        let (distributor, relays) = (distributor.clone(), relays.clone());
        async move {
            loop {
                rx.changed().await.ok()?;
                // Only main relays' acks (one lookup each), not every workload's.
                let now: std::collections::BTreeMap<String, u64> = relays
                    .state()
                    .iter()
                    .filter(|r| r.spec.relay_type == relayfed_crds::RelayType::Main)
                    .filter_map(|r| Some((r.spec.node_id.clone(), distributor.ack(&r.spec.node_id)?.version)))
                    .collect();
                if now != last {
                    return Some(((), (rx, now)));
                }
            }
        }
    })
}

/// Runs the operator: waits for the Lease, then reconciles and serves distribution until the
/// Lease is lost (returns an error so the pod restarts as a follower) or the process stops.
pub async fn run(
    client: Client,
    settings: Settings,
    opts: RunOptions,
    metrics: Arc<OperatorMetrics>,
    role: Arc<Role>,
) -> Result<(), ReconcileError> {
    use std::sync::atomic::Ordering;
    let elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &opts.namespace),
        "relayfed-operator",
        &opts.identity,
        Duration::from_secs(15),
    );
    let label = PodLabel::new(Api::namespaced(client.clone(), &opts.namespace), &opts.identity);
    metrics.leader.set(0);
    // Ready once the API server answered (the label patch and the first Lease read); a
    // follower stays Ready, it only does not receive config subscribers.
    let mut labelled = false;
    loop {
        if !labelled {
            match label.follow().await {
                Ok(()) => labelled = true,
                Err(e) => warn!(error = %e, "labelling this replica a follower"),
            }
        }
        match elector.try_lead(SystemTime::now()).await {
            Ok(true) => break,
            Ok(false) => role.ready.store(labelled, Ordering::Relaxed),
            Err(e) => warn!(error = %e, "leader election"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    label.lead().await?;
    role.leading.store(true, Ordering::Relaxed);
    role.ready.store(true, Ordering::Relaxed);
    metrics.leader.set(1);
    info!(identity = %opts.identity, "leading: starting controllers");
    // Versions continue from the wall clock in milliseconds, so a new leader hands out higher
    // versions than the previous one did (unless it published more than once per millisecond).
    let start = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let distributor = Distributor::new(metrics.clone(), start);
    let (ctx, controllers) = controllers(client.clone(), settings, metrics, distributor.clone());
    let serve = serve_distribution(ctx.clone(), opts.clone());
    let renew = async {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            match elector.try_lead(SystemTime::now()).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return ReconcileError::Dependency("lost the leader Lease to another replica".into()),
                Err(e) if last_ok.elapsed() > elector.lease_duration => {
                    return ReconcileError::Dependency(format!("could not renew the leader Lease: {e}"));
                }
                Err(e) => warn!(error = %e, "renewing the leader Lease"),
            }
        }
    };
    tokio::select! {
        _ = controllers => Ok(()),
        e = renew => Err(e),
        e = serve => e,
    }
}

/// Once the federation's CA exists, serves config distribution and workload certificates with a server certificate
/// issued from it (node id [`relayfed_proto::distribution::DEFAULT_SERVER_NODE`]).
async fn serve_distribution(ctx: Arc<Context>, opts: RunOptions) -> Result<(), ReconcileError> {
    let (namespace, name) = opts.federation.split_once('/').ok_or_else(|| {
        ReconcileError::Object(format!("--federation {:?}: expected namespace/name", opts.federation))
    })?;
    let (ca, trust_domain) = loop {
        let fed = ctx.stores.federations.get(&ObjectRef::new(name).within(namespace));
        if let Some(fed) = fed
            && let Some(ca) =
                super::federation::load_ca(&ctx, namespace, &fed.name_any(), &fed.spec.trust_domain, false).await?
        {
            break (ca, fed.spec.trust_domain.clone());
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let node = relayfed_proto::distribution::DEFAULT_SERVER_NODE;
    let issued =
        ca.ca.issue(node, Duration::from_secs(365 * 86_400)).map_err(|e| ReconcileError::Keys(e.to_string()))?;
    let identity = relayfed_serving::identity::HopIdentity::from_pem(
        &trust_domain,
        node,
        &ca.ca.certified_key().cert_pem,
        &issued.cert_pem,
        &issued.key_pem,
    )
    .map_err(|e| ReconcileError::Keys(e.to_string()))?;
    let bound =
        ctx.distributor.clone().serve(opts.distribution_listen, &identity).await.map_err(|e| {
            ReconcileError::Dependency(format!("config distribution on {}: {e}", opts.distribution_listen))
        })?;
    info!(%bound, federation = %opts.federation, "serving config distribution");
    let ids = Arc::new(crate::identity::IdentityServer {
        client: ctx.client.clone(),
        ca: Arc::new(ca.ca),
        metrics: ctx.metrics.clone(),
        validity: crate::identity::CERT_VALIDITY,
    });
    let bound = ids
        .serve(opts.identity_listen, &issued.cert_pem, &issued.key_pem)
        .await
        .map_err(|e| ReconcileError::Dependency(format!("certificate server on {}: {e}", opts.identity_listen)))?;
    info!(%bound, "serving workload certificates (POST /v1/certificate)");
    std::future::pending::<()>().await;
    Ok(())
}
