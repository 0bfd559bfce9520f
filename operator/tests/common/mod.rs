//! Shared by the distribution test and benchmark: an in-memory CA, node identities and
//! minimal home snapshots.
#![allow(dead_code, clippy::unwrap_used)]

use relayfed_sidecar::config::Snapshot;
use relayfed_sidecar::crypto::ca::FederationCa;
use relayfed_sidecar::transport::tls::HopIdentity;

pub const TD: &str = "bench.example";

pub struct Pki {
    ca: FederationCa,
}

impl Pki {
    pub fn new() -> Self {
        Self { ca: FederationCa::generate(TD).unwrap() }
    }

    /// The CA as PEM (certificate, key), for another process to issue from.
    #[allow(dead_code)]
    pub fn ca_pem(&self) -> (String, String) {
        (self.ca.certified_key().cert_pem.clone(), self.ca.certified_key().key_pem.clone())
    }

    /// A PKI issuing from the CA `ca_pem` gave.
    #[allow(dead_code)]
    pub fn from_pem(cert: &str, key: &str) -> Self {
        Self { ca: FederationCa::from_pem(TD, cert, key).unwrap() }
    }

    pub fn identity(&self, node: &str) -> HopIdentity {
        let c = self.ca.issue(node, std::time::Duration::from_secs(3600)).unwrap();
        HopIdentity::from_pem(TD, node, &self.ca.certified_key().cert_pem, &c.cert_pem, &c.key_pem).unwrap()
    }
}

/// A valid home snapshot for `node` with ECH at `percentage`.
pub fn home(node: &str, percentage: u8) -> Snapshot {
    let mut s = Snapshot::parse(&format!(
        "schema: 1
node: {{id: {node}, role: home, trustDomain: {TD}}}
tls: {{caFile: /nonexistent/ca.pem, certFile: /nonexistent/n.pem, keyFile: /nonexistent/n.key}}
mainRelays: [{{nodeId: hub, endpoint: \"127.0.0.1:7401\"}}]"
    ))
    .unwrap();
    s.ech_policy.enabled = true;
    s.ech_policy.percentage = percentage;
    s
}
