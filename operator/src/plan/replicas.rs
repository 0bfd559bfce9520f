//! Main relays with several replicas as members of the relay mesh: replica `i` of main relay
//! `m` (given `spec.replicaEndpoints`) is node `m-<i>`, with its own certificate, registry
//! epoch and peerings, sharing `m`'s ECH keys. Homes that list `m` list every replica, rotated
//! by a stable hash of their node id so they spread evenly; the others are their standbys.
//! Pure functions; the plan calls them.

use relayfed_crds::{AnyResource, Relay};

use super::PlanError;

/// One member of the relay mesh that a main `Relay` runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member's node id: the relay's own, or `<nodeId>-<i>` for replica `i`.
    pub node_id: String,
    /// The relay it belongs to (its ECH keys, Peer objects and home references).
    pub relay: String,
    /// Where it listens and is dialed (`host:port`), if known.
    pub endpoint: Option<String>,
}

/// The node id of replica `i` of main relay `node`.
pub fn replica_id(node: &str, i: usize) -> String {
    format!("{node}-{i}")
}

/// Whether main relay `r` runs its replicas as separate mesh members.
pub fn is_replicated(r: &Relay) -> bool {
    !r.spec.replica_endpoints.is_empty()
}

/// The mesh members of main relay `r`; `endpoint` is the federation's address for it.
pub fn members(r: &Relay, endpoint: Option<String>) -> Vec<Member> {
    let node = &r.spec.node_id;
    if !is_replicated(r) {
        return vec![Member { node_id: node.clone(), relay: node.clone(), endpoint }];
    }
    r.spec
        .replica_endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| Member { node_id: replica_id(node, i), relay: node.clone(), endpoint: Some(e.clone()) })
        .collect()
}

/// The order in which `home` lists `n` replicas: starting at a stable hash of its node id
/// (FNV-1a), so that across homes each replica comes first equally often.
pub fn rotation(home: &str, n: usize) -> Vec<usize> {
    if n == 0 {
        return vec![];
    }
    let hash = home.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let first = (hash % n as u64) as usize;
    (0..n).map(|k| (first + k) % n).collect()
}

/// What the cluster applier cannot run yet: replicas as mesh members need one Deployment (or
/// StatefulSet ordinal) and one certificate per replica, which the operator does not create.
pub fn cluster_refusals(resources: &[AnyResource]) -> Vec<PlanError> {
    resources
        .iter()
        .filter_map(|r| match r {
            AnyResource::Relay(r) if is_replicated(r) => Some(super::err(
                format!("Relay/{}", r.metadata.name.clone().unwrap_or_default()),
                "spec.replicaEndpoints",
                "replicas as mesh members run in local mode only; in a cluster, leave it empty and run several \
                 main relays (docs/architecture.md \"Main relays with several replicas\")",
            )),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn relay(node: &str, endpoints: &[&str]) -> Relay {
        let mut r: Relay = serde_json::from_value(serde_json::json!({
            "apiVersion": "relayfed.io/v1alpha1", "kind": "Relay", "metadata": {"name": node},
            "spec": {"type": "main", "nodeId": node, "federation": "acme", "replicas": endpoints.len().max(1)}
        }))
        .unwrap();
        r.spec.replica_endpoints = endpoints.iter().map(|e| (*e).to_owned()).collect();
        r
    }

    #[test]
    fn a_relay_without_replica_endpoints_is_one_member_under_its_own_id() {
        let m = members(&relay("hub", &[]), Some("127.0.0.1:1".into()));
        assert_eq!(m, [Member { node_id: "hub".into(), relay: "hub".into(), endpoint: Some("127.0.0.1:1".into()) }]);
    }

    #[test]
    fn replicas_are_members_at_their_own_addresses() {
        let m = members(&relay("hub", &["127.0.0.1:1", "127.0.0.1:2"]), Some("127.0.0.1:9".into()));
        let ids: Vec<(&str, &str, Option<&str>)> =
            m.iter().map(|m| (m.node_id.as_str(), m.relay.as_str(), m.endpoint.as_deref())).collect();
        assert_eq!(ids, [("hub-0", "hub", Some("127.0.0.1:1")), ("hub-1", "hub", Some("127.0.0.1:2"))]);
    }

    #[test]
    fn homes_spread_over_the_replicas() {
        let firsts: Vec<usize> = (0..300).map(|i| rotation(&format!("home-{i}"), 3)[0]).collect();
        for r in 0..3 {
            let share = firsts.iter().filter(|f| **f == r).count();
            assert!((70..=130).contains(&share), "replica {r} first for {share} of 300 homes");
        }
    }

    #[test]
    fn the_cluster_applier_refuses_replica_endpoints_naming_the_field() {
        let all = [
            AnyResource::Relay(Box::new(relay("hub", &["127.0.0.1:1", "127.0.0.1:2"]))),
            AnyResource::Relay(Box::new(relay("solo", &[]))),
        ];
        let errs = cluster_refusals(&all);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].object.as_str(), errs[0].field.as_str()), ("Relay/hub", "spec.replicaEndpoints"));
    }

    proptest! {
        /// Every replica is listed exactly once, and a home always gets the same order.
        #[test]
        fn the_rotation_is_a_stable_permutation(home in "[a-z0-9-]{1,20}", n in 0usize..17) {
            let order = rotation(&home, n);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            prop_assert_eq!(order, rotation(&home, n));
        }
    }
}
