//! The plan: one pure function from the admitted CRs of a federation, and where they run
//! ([`Placement`]), to a config snapshot per node. The Kubernetes applier and local mode both
//! call [`compile`]; neither rewrites what it returns.
//!
//! Mapping (docs/protocol.md §8 for the snapshot fields):
//! - `RelayFederation`: trust domain, registry TTL, the main relays' endpoints, the default
//!   `RolloutPolicy`.
//! - `Relay` type main -> a main snapshot: the homes assigned to it with the exports each may
//!   register (`trust.homes`: every home whose snapshot lists it); listen where the
//!   [`Placement`] says (its federation endpoint on one machine, `0.0.0.0:listenPort` in a
//!   cluster); peers = every other main relay of
//!   the federation (trusted) plus `Peer` resources for it (or for all mains when
//!   `localRelay` is unset), a `Peer` for one of our own mains overriding its trust settings.
//! - `Relay` type main with `replicaEndpoints` -> one main snapshot per replica, each a mesh
//!   member `<nodeId>-<i>` sharing the relay's ECH keys; homes listing the relay list every
//!   replica ([`replicas`]).
//! - `Relay` type home -> a home snapshot: its main relays with priorities, exports, imports
//!   (resolved through the registry at run time), and the ECH configs of every main relay
//!   (`Relay.status.echConfigList`; local mode fills them from its key files).
//! - the default `RolloutPolicy` -> ECH policy, trust defaults (`knownNodes` = every relay of
//!   the federation), resilience and timeouts for every node.
//!
//! - injected pods ([`workloads`], in a cluster only) -> a home snapshot each: the
//!   federation's main relays at their observed endpoints, the pod's exported Services, every
//!   imported service at its ClusterIP, interception; their node ids join `knownNodes`.
//!
//! Key material is referenced by path in a `KeyLayout`; generating it is the applier's job.

pub mod placement;
pub mod replicas;
pub mod workloads;

pub use placement::{Placement, Site};

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::rollout::driver::Subject;
use relayfed_crds::{AnyResource, EchMode, Peer, Relay, RelayFederation, RelayType, RolloutPolicy, TrustLevel};
use relayfed_proto::config::{
    CircuitBreakerConfig, EchServerConfig, Export, Import, MainRelay, NodeConfig, PeerRelay, Permissions, RateLimit,
    RegistryConfig, Resilience, RetryConfig, Role, Snapshot, Timeouts, TlsFiles, Trust,
};
use relayfed_proto::federation::ech_policy::{self, EchPolicy};

/// A problem that keeps the plan from being compiled, naming the object and field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object} {field}: {reason}")]
pub struct PlanError {
    /// `Kind/name` of the offending object.
    pub object: String,
    /// Field path.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn err(object: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError { object: object.into(), field: field.into(), reason: reason.into() }
}

/// Where each node's key material lives.
#[derive(Clone, Debug)]
pub struct KeyLayout {
    /// Directory holding `ca.pem`, `<node>.pem`, `<node>.key`, `<node>-noise.key`, `<node>-ech.json`.
    pub dir: PathBuf,
}

impl KeyLayout {
    fn tls(&self, node: &str) -> TlsFiles {
        TlsFiles {
            ca_file: self.dir.join("ca.pem"),
            cert_file: self.dir.join(format!("{node}.pem")),
            key_file: self.dir.join(format!("{node}.key")),
        }
    }
}

/// The compiled federation: one snapshot per node id, and warnings about what was left out.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Snapshots by node id.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Things the plan could not express (e.g. peers named by DNS name in local mode).
    pub warnings: Vec<String>,
}

/// The RolloutPolicy a federation names as its default, if it exists.
fn policy_of<'a>(resources: &'a [AnyResource], fed: &RelayFederation) -> Option<&'a RolloutPolicy> {
    resources.iter().find_map(|r| match r {
        AnyResource::RolloutPolicy(p)
            if p.metadata.name.as_deref() == Some(fed.spec.default_rollout_policy.as_str()) =>
        {
            Some(p.as_ref())
        }
        _ => None,
    })
}

/// The RolloutPolicy in force: the default policy of the (one) federation among `resources`.
pub fn rollout_policy(resources: &[AnyResource]) -> Option<&RolloutPolicy> {
    let fed =
        resources.iter().find_map(|r| if let AnyResource::Federation(f) = r { Some(f.as_ref()) } else { None })?;
    policy_of(resources, fed)
}

/// Compiles the CRs of one federation into per-node snapshots for where they run
/// (`placement`: one machine or a cluster, how endpoints resolve, injected pods).
pub fn compile(resources: &[AnyResource], placement: &Placement<'_>) -> Result<Plan, Vec<PlanError>> {
    let (keys, version, workloads) = (&placement.keys, placement.version, placement.workloads);
    let resolve = placement.resolve;
    let mut errors = Vec::new();
    let feds: Vec<&RelayFederation> = resources
        .iter()
        .filter_map(|r| if let AnyResource::Federation(f) = r { Some(f.as_ref()) } else { None })
        .collect();
    let [fed] = feds.as_slice() else {
        return Err(vec![err(
            "RelayFederation",
            "",
            format!("exactly one RelayFederation is needed, found {}", feds.len()),
        )]);
    };
    let fed_name = fed.metadata.name.clone().unwrap_or_default();
    let fed_obj = format!("RelayFederation/{fed_name}");
    let relays: Vec<&Relay> = resources
        .iter()
        .filter_map(|r| if let AnyResource::Relay(x) = r { Some(x.as_ref()) } else { None })
        .filter(|r| r.spec.federation == fed_name)
        .collect();
    let peers: Vec<&Peer> =
        resources.iter().filter_map(|r| if let AnyResource::Peer(x) = r { Some(x.as_ref()) } else { None }).collect();
    let Some(policy) = policy_of(resources, fed) else {
        return Err(vec![err(
            &fed_obj,
            "spec.defaultRolloutPolicy",
            format!("RolloutPolicy {:?} does not exist", fed.spec.default_rollout_policy),
        )]);
    };
    let mut warnings = Vec::new();
    let endpoint_of =
        |node: &str| fed.spec.main_relays.iter().find(|m| m.node_id == node).and_then(|m| m.endpoint.clone());
    let mains: Vec<&Relay> = relays.iter().copied().filter(|r| r.spec.relay_type == RelayType::Main).collect();
    let mut seen = BTreeMap::new();
    for r in &relays {
        let obj = format!("Relay/{}", r.metadata.name.clone().unwrap_or_default());
        if let Some(other) = seen.insert(r.spec.node_id.clone(), obj.clone()) {
            errors.push(err(&obj, "spec.nodeId", format!("{:?} is also the node id of {other}", r.spec.node_id)));
        }
        if r.spec.relay_type == RelayType::Main && r.spec.replicas > 1 && !replicas::is_replicated(r) {
            warnings.push(format!(
                "{obj}: {} replicas of one main relay share its identity but not its registry or peerings; \
                 give spec.replicaEndpoints (one address per replica) to run them as mesh members \
                 (docs/architecture.md \"Main relays with several replicas\")",
                r.spec.replicas
            ));
        }
    }
    // The mesh: every main relay, or each of its replicas, as a member (by relay node id).
    let members: BTreeMap<&str, Vec<replicas::Member>> =
        mains.iter().map(|m| (m.spec.node_id.as_str(), replicas::members(m, endpoint_of(&m.spec.node_id)))).collect();
    for (relay, ms) in &members {
        for m in ms.iter().filter(|m| m.node_id != *relay) {
            if let Some(other) = seen.insert(m.node_id.clone(), format!("a replica of Relay {relay}")) {
                errors.push(err(
                    format!("Relay/{}", relay_name(&mains, relay)),
                    "spec.replicaEndpoints",
                    format!("replica node id {:?} is also the node id of {other}", m.node_id),
                ));
            }
        }
    }
    // A main relay of another trust domain is known by its node id in registries, routes and
    // trust rules: it must not be one of ours.
    for p in peers.iter().filter(|p| p.spec.trust_domain.as_ref().is_some_and(|t| *t != fed.spec.trust_domain)) {
        if let Some(ours) = seen.get(&p.spec.node_id) {
            errors.push(err(
                format!("Peer/{}", p.metadata.name.clone().unwrap_or_default()),
                "spec.nodeId",
                format!(
                    "{:?} is also the node id of {ours} in this federation; a peer of another trust domain needs a node id none of ours has",
                    p.spec.node_id
                ),
            ));
        }
    }
    let (ech, mut trust, resilience, timeouts) = policy_parts(policy, &relays);
    trust.known_nodes.extend(members.values().flatten().map(|m| m.node_id.clone()));
    trust.known_nodes.sort();
    trust.known_nodes.dedup();
    // Injected pods hold CA-issued certificates naming them: relays know them.
    trust.known_nodes.extend(workloads.iter().flat_map(|f| f.workloads.iter().map(|w| w.node_id.clone())));
    // Homes verify other federations' homes by the pins of the Peers that trust them.
    let partners: Vec<relayfed_proto::config::PartnerFederation> = peers
        .iter()
        .filter(|p| matches!(p.spec.trust_level, TrustLevel::Trusted | TrustLevel::Verified))
        .filter_map(|p| {
            let td = p.spec.trust_domain.as_deref().filter(|td| *td != fed.spec.trust_domain)?;
            let identity = p.spec.identity.clone()?;
            Some(relayfed_proto::config::PartnerFederation {
                relays: vec![p.spec.node_id.clone()],
                pin: relayfed_proto::config::PeerPin {
                    trust_domain: td.to_owned(),
                    ca_bundle: identity.ca_bundle,
                    fingerprints: identity.fingerprint.into_iter().chain(identity.next_fingerprint).collect(),
                },
            })
        })
        .collect();
    let base = |node: &str, role: Role| Snapshot {
        schema: relayfed_proto::config::SNAPSHOT_SCHEMA,
        version,
        node: NodeConfig { id: node.to_owned(), role, trust_domain: fed.spec.trust_domain.clone() },
        tls: keys.tls(node),
        listen: None,
        admin: None,
        ech: None,
        main_relays: vec![],
        noise_key_file: None,
        exports: vec![],
        imports: vec![],
        ech_policy: ech.clone(),
        ech_configs: BTreeMap::new(),
        ech_announcement: None,
        intercept: None,
        peers: vec![],
        partners: if role == Role::Home { partners.clone() } else { vec![] },
        registry: RegistryConfig { ttl_seconds: fed.spec.registry_ttl.get().as_secs(), refresh_seconds: None },
        health_check_seconds: 30,
        load_balancing: load_balancing(&policy.spec.load_balancing),
        trust: trust.clone(),
        resilience: resilience.clone(),
        timeouts: timeouts.clone(),
        key_passphrase_file: None,
        direct_paths: relayfed_proto::config::direct::DirectPaths {
            enabled: policy.spec.direct_paths.enabled,
            // With steps, the rollout starts at the first; the rollout driver moves it on.
            percentage: crate::rollout::driver::progression(policy, Subject::DirectPaths).start(),
            percentage_by_main: BTreeMap::new(),
        },
    };
    let mut snapshots = BTreeMap::new();
    for (m, member) in mains.iter().flat_map(|m| members[m.spec.node_id.as_str()].iter().map(move |x| (m, x))) {
        let obj = format!("Relay/{}", m.metadata.name.clone().unwrap_or_default());
        let (relay, node) = (&m.spec.node_id, &member.node_id);
        if endpoint_of(relay).is_none() {
            errors.push(err(&obj, "spec.nodeId", format!("{relay:?} is not listed in {fed_obj} spec.mainRelays")));
            continue;
        }
        let mut s = base(node, Role::Main);
        s.listen = Some(placement.main_listen(member.endpoint.as_deref(), m.spec.listen_port));
        // Replicas share their relay's ECH key set.
        s.ech = Some(EchServerConfig {
            key_file: keys.dir.join(format!("{relay}-ech.json")),
            grace_seconds: m.spec.ech_keys.grace_period.get().as_secs(),
        });
        let mut node_peers: BTreeMap<String, PeerRelay> = BTreeMap::new();
        for other in members.values().flatten().filter(|o| o.node_id != *node) {
            if let Some(addr) = other.endpoint.as_deref().and_then(resolve) {
                node_peers.insert(
                    other.node_id.clone(),
                    PeerRelay {
                        node_id: other.node_id.clone(),
                        endpoint: addr.to_string(),
                        fallback_endpoints: vec![],
                        pin: None,
                        trust_level: relayfed_proto::config::TrustLevel::Trusted,
                        permissions: None,
                        rate_limit: None,
                    },
                );
            } else {
                warnings.push(format!(
                    "{obj}: main relay {}'s endpoint {:?} does not resolve here; not peered",
                    other.node_id,
                    other.endpoint.as_deref().unwrap_or("")
                ));
            }
        }
        for p in peers.iter().filter(|p| p.spec.local_relay.as_deref().is_none_or(|l| l == relay)) {
            let pobj = format!("Peer/{}", p.metadata.name.clone().unwrap_or_default());
            if p.spec.node_id == *relay || p.spec.node_id == *node {
                continue;
            }
            let pin = match p.spec.trust_domain.as_deref().filter(|td| *td != fed.spec.trust_domain) {
                None => None,
                Some(td) => {
                    if members.values().flatten().any(|m| m.node_id == p.spec.node_id) {
                        errors.push(err(
                            &pobj,
                            "spec.nodeId",
                            format!(
                                "{:?} is a node of this federation; a peer of another trust domain needs its own id",
                                p.spec.node_id
                            ),
                        ));
                        continue;
                    }
                    let identity = p.spec.identity.clone().unwrap_or_default();
                    Some(relayfed_proto::config::PeerPin {
                        trust_domain: td.to_owned(),
                        ca_bundle: identity.ca_bundle,
                        fingerprints: identity.fingerprint.into_iter().chain(identity.next_fingerprint).collect(),
                    })
                }
            };
            // A Peer naming one of our own replicated relays sets the terms for each replica,
            // dialed at its own address.
            let targets: Vec<(String, Option<String>)> = match members.get(p.spec.node_id.as_str()) {
                Some(ms) if pin.is_none() && ms.iter().all(|m| m.node_id != p.spec.node_id) => ms
                    .iter()
                    .filter(|m| m.node_id != *node)
                    .map(|m| (m.node_id.clone(), m.endpoint.as_deref().and_then(resolve).map(|a| a.to_string())))
                    .collect(),
                // As written: the relay looks a name up at every dial, so a peer whose address
                // changes is followed on the next reconnect.
                _ => vec![(p.spec.node_id.clone(), p.spec.endpoints.first().cloned())],
            };
            // The rest of a Peer's endpoints are its fallbacks (none for our own replicas,
            // each dialed at its own address).
            let fallbacks: Vec<String> = match members.get(p.spec.node_id.as_str()) {
                Some(ms) if pin.is_none() && ms.iter().all(|m| m.node_id != p.spec.node_id) => vec![],
                _ => p.spec.endpoints.iter().skip(1).cloned().collect(),
            };
            for (peer, addr) in targets {
                let Some(endpoint) = addr else {
                    warnings.push(format!(
                        "{pobj}: no endpoint for {peer} (spec.endpoints {:?}); skipped",
                        p.spec.endpoints
                    ));
                    continue;
                };
                node_peers.insert(
                    peer.clone(),
                    PeerRelay {
                        node_id: peer,
                        endpoint,
                        fallback_endpoints: fallbacks.clone(),
                        pin: pin.clone(),
                        trust_level: trust_level(p.spec.trust_level),
                        permissions: p.spec.permissions.as_ref().map(permissions),
                        rate_limit: p.spec.rate_limit.as_ref().map(rate_limit),
                    },
                );
            }
        }
        s.peers = node_peers.into_values().collect();
        snapshots.insert(node.clone(), s);
    }
    for h in relays.iter().filter(|r| r.spec.relay_type == RelayType::Home) {
        let obj = format!("Relay/{}", h.metadata.name.clone().unwrap_or_default());
        let node = &h.spec.node_id;
        let mut s = base(node, Role::Home);
        s.noise_key_file = Some(keys.dir.join(format!("{node}-noise.key")));
        for (i, m) in h.spec.main_relays.iter().enumerate() {
            if let Some(ms) = members.get(m.node_id.as_str()).filter(|ms| ms.len() > 1 || ms[0].node_id != m.node_id) {
                if m.endpoint.is_some() {
                    warnings.push(format!(
                        "{obj}: spec.mainRelays[{i}].endpoint is ignored: {} has replicas, each at its own address",
                        m.node_id
                    ));
                }
                for k in replicas::rotation(node, ms.len()) {
                    if let Some(addr) = ms[k].endpoint.as_deref().and_then(resolve) {
                        s.main_relays.push(MainRelay {
                            node_id: ms[k].node_id.clone(),
                            endpoint: addr,
                            priority: m.priority,
                        });
                    }
                }
                continue;
            }
            let endpoint = m.endpoint.clone().or_else(|| endpoint_of(&m.node_id));
            match endpoint.as_deref().map(|e| (e, resolve(e))) {
                Some((_, Some(addr))) => {
                    s.main_relays.push(MainRelay { node_id: m.node_id.clone(), endpoint: addr, priority: m.priority })
                }
                Some((e, None)) => {
                    warnings.push(format!("{obj}: spec.mainRelays[{i}] endpoint {e:?} does not resolve here; skipped"))
                }
                None => errors.push(err(
                    &obj,
                    format!("spec.mainRelays[{i}].nodeId"),
                    format!("{:?} is not a main relay of {fed_obj} and has no endpoint", m.node_id),
                )),
            }
        }
        for (i, e) in h.spec.exports.iter().enumerate() {
            match e.target.parse() {
                Ok(target) => s.exports.push(Export {
                    service: e.name.clone(),
                    port: e.port,
                    target,
                    proxy_protocol: e.proxy_protocol,
                }),
                Err(_) => {
                    errors.push(err(&obj, format!("spec.exports[{i}].target"), "must be ip:port for a home relay"))
                }
            }
        }
        for (i, imp) in h.spec.imports.iter().enumerate() {
            match imp.listen.parse() {
                Ok(listen) => s.imports.push(Import::resolved(&imp.name, imp.port, listen)),
                Err(_) => errors.push(err(&obj, format!("spec.imports[{i}].listen"), "must be ip:port")),
            }
        }
        snapshots.insert(node.clone(), s);
    }
    if let Some(facts) = workloads {
        let mains = workloads::main_relays_for_workloads(fed, &relays, resolve, &mut warnings);
        for w in &facts.workloads {
            if snapshots.contains_key(&w.node_id) {
                warnings.push(format!("Pod/{}: node id {:?} is taken by a Relay; not planned", w.pod, w.node_id));
                continue;
            }
            if let Some(s) = workloads::workload_snapshot(base(&w.node_id, Role::Home), w, facts, &mains, &mut warnings)
            {
                snapshots.insert(w.node_id.clone(), s);
            }
        }
    }
    set_ech_configs(&mut snapshots, &published_ech_configs(&mains, &members));
    set_ech_announcements(&mut snapshots, &mains);
    assign_homes(&mut snapshots);
    for s in snapshots.values_mut() {
        placement.finish(s);
    }
    for (node, s) in &snapshots {
        if let Err(e) = s.validate() {
            errors.push(err(format!("node {node}"), "", format!("compiled snapshot is invalid: {e}")));
        }
    }
    // Every main relay sees the same Peer objects: report each problem once.
    warnings.sort();
    warnings.dedup();
    if errors.is_empty() { Ok(Plan { snapshots, warnings }) } else { Err(errors) }
}

/// The ECHConfigList each main relay published in its status (in a cluster: the operator
/// wrote it there from the relay's ECH key Secret), by node id.
fn published_ech_configs(
    mains: &[&Relay],
    members: &BTreeMap<&str, Vec<replicas::Member>>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for m in mains {
        if let Some(list) = m.status.as_ref().and_then(|s| s.ech_config_list.clone()) {
            for member in members.get(m.spec.node_id.as_str()).into_iter().flatten() {
                out.insert(member.node_id.clone(), list.clone());
            }
        }
    }
    out
}

/// Gives each main relay its CA-signed ECH config from its status (the operator signs what it
/// publishes), which it announces to its peers (§5.6). Replicas running as their own mesh
/// members (`<nodeId>-<i>`) announce none: the signature names the relay's node id.
fn set_ech_announcements(snapshots: &mut BTreeMap<String, Snapshot>, mains: &[&Relay]) {
    for m in mains {
        let status = m.status.as_ref();
        let list = status.and_then(|s| s.ech_config_list.clone());
        let signature = status.and_then(|s| s.ech_config_signature.clone());
        if let (Some(ech_config_list), Some(signature), Some(s)) = (list, signature, snapshots.get_mut(&m.spec.node_id))
        {
            s.ech_announcement = Some(relayfed_proto::config::SignedEchConfig { ech_config_list, signature });
        }
    }
}

fn relay_name(mains: &[&Relay], node: &str) -> String {
    mains.iter().find(|m| m.spec.node_id == node).and_then(|m| m.metadata.name.clone()).unwrap_or_default()
}

/// Tells every main relay which homes the plan assigns to it (the homes whose snapshot lists
/// it) and the exports each may register (`trust.homes`); relays refuse everything else.
fn assign_homes(snapshots: &mut BTreeMap<String, Snapshot>) {
    let mut by_main: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for s in snapshots.values().filter(|s| s.node.role == Role::Home) {
        let exports: Vec<String> = s.exports.iter().map(|e| format!("{}:{}", e.service, e.port)).collect();
        for m in &s.main_relays {
            by_main.entry(m.node_id.clone()).or_default().insert(s.node.id.clone(), exports.clone());
        }
    }
    for s in snapshots.values_mut().filter(|s| s.node.role == Role::Main) {
        s.trust.homes = Some(by_main.remove(&s.node.id).unwrap_or_default());
    }
}

/// The planned ECH anonymity set of a main relay's snapshot: the distinct services its
/// homes may register (`trust.homes` values are `service:port`).
pub fn planned_anonymity_set(main: &Snapshot) -> usize {
    let services: std::collections::BTreeSet<&str> = main
        .trust
        .homes
        .iter()
        .flat_map(|h| h.values().flatten())
        .map(|e| e.rsplit_once(':').map_or(e.as_str(), |(s, _)| s))
        .collect();
    services.len()
}

/// Gives every home snapshot the ECH configs of the federation's main relays (`configs`, by
/// node id, base64 ECHConfigList): the only configs homes seal to. Local mode calls this with
/// the configs of the key files it keeps; the plan calls it with `Relay.status`.
pub fn set_ech_configs(snapshots: &mut BTreeMap<String, Snapshot>, configs: &BTreeMap<String, String>) {
    for s in snapshots.values_mut().filter(|s| s.node.role == Role::Home) {
        s.ech_configs = configs.clone();
    }
}

fn trust_level(t: TrustLevel) -> relayfed_proto::config::TrustLevel {
    use relayfed_proto::config::TrustLevel as T;
    match t {
        TrustLevel::Trusted => T::Trusted,
        TrustLevel::Verified => T::Verified,
        TrustLevel::Unknown => T::Unknown,
        TrustLevel::Blocked => T::Blocked,
    }
}

fn permissions(p: &relayfed_crds::Permissions) -> Permissions {
    Permissions { call: p.call.clone(), export: p.export.clone() }
}

fn rate_limit(r: &relayfed_crds::RateLimit) -> RateLimit {
    RateLimit { streams_per_second: f64::from(r.streams_per_second), burst: f64::from(r.burst) }
}

/// ECH policy, trust defaults, resilience and timeouts from the `RolloutPolicy`.
/// The snapshot's load balancing from the policy's.
fn load_balancing(lb: &relayfed_crds::rollout::LoadBalancing) -> relayfed_proto::config::LoadBalancing {
    use relayfed_crds::rollout::LbAlgorithm as A;
    use relayfed_proto::config::Algorithm;
    let algorithm = |a: A| match a {
        A::RoundRobin => Algorithm::RoundRobin,
        A::LeastConnections => Algorithm::LeastConnections,
        A::Random => Algorithm::Random,
        A::PeakEwma => Algorithm::PeakEwma,
    };
    relayfed_proto::config::LoadBalancing {
        default: algorithm(lb.algorithm),
        per_service: lb.per_service.iter().map(|(s, a)| (s.clone(), algorithm(*a))).collect(),
        prefer_local: lb.prefer_local,
    }
}

fn policy_parts(policy: &RolloutPolicy, relays: &[&Relay]) -> (EchPolicy, Trust, Resilience, Timeouts) {
    let e = &policy.spec.ech;
    let ech = EchPolicy {
        enabled: e.enabled,
        mode: match e.mode {
            EchMode::Disabled => ech_policy::EchMode::Disabled,
            EchMode::Opportunistic => ech_policy::EchMode::Opportunistic,
            EchMode::Required => ech_policy::EchMode::Required,
        },
        // With steps, the rollout starts at the first; the rollout driver moves it on.
        percentage: crate::rollout::driver::progression(policy, Subject::Ech).start(),
        whitelist: e.whitelist.clone(),
        blacklist: e.blacklist.clone(),
        percentage_by_main: BTreeMap::new(),
    };
    let t = &policy.spec.trust;
    let trust = Trust {
        reject_unknown: t.reject_unknown,
        known_nodes: relays.iter().map(|r| r.spec.node_id.clone()).collect(),
        default_permissions: permissions(&t.default_permissions),
        homes: None,
    };
    let r = &policy.spec.resilience;
    let ms = |d: relayfed_crds::Duration| d.get().as_millis() as u64;
    let resilience = Resilience {
        rate_limit: r.rate_limit.as_ref().map(rate_limit),
        circuit_breaker: CircuitBreakerConfig {
            consecutive_failures: r.circuit_breaker.consecutive_failures,
            failure_rate: r.circuit_breaker.failure_rate,
            window_ms: ms(r.circuit_breaker.window),
            open_ms: ms(r.circuit_breaker.open_duration),
            half_open_probes: r.circuit_breaker.half_open_probes,
        },
        retry: RetryConfig {
            max_attempts: r.retry.max_attempts,
            initial_backoff_ms: ms(r.retry.initial_backoff),
            max_backoff_ms: ms(r.retry.max_backoff),
        },
    };
    let timeouts = Timeouts {
        connect_ms: ms(r.timeouts.connect),
        handshake_ms: ms(r.timeouts.handshake),
        call_ms: ms(r.timeouts.call),
        idle_ms: ms(r.timeouts.link_idle),
        stream_idle_ms: ms(r.timeouts.idle),
    };
    (ech, trust, resilience, timeouts)
}
