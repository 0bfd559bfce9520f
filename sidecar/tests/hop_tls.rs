//! Hop TLS refusals on real QUIC over loopback: a wrong CA, an expired certificate, an unknown
//! ALPN and a mismatched node id are each refused and counted with their reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relayfed_e2e::Testbed;
use relayfed_sidecar::admin::metrics::Metrics;
use relayfed_sidecar::config::{Snapshot, Timeouts};
use relayfed_sidecar::relay::MainRelay;
use relayfed_sidecar::transport::tls::QuicIdentity;
use relayfed_sidecar::transport::tls::{HopIdentity, failure_reason};

async fn relay(tb: &Testbed) -> (SocketAddr, Arc<Metrics>, Arc<MainRelay>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let snap = Snapshot::load(&tb.main_relay("hub", 1).unwrap()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (relay, bound) = MainRelay::start(&snap, metrics.clone()).await.unwrap();
    (bound.quic, metrics, relay)
}

fn identity(tb: &Testbed, node: &str, cert: &relayfed_sidecar::crypto::ca::CertifiedKey) -> HopIdentity {
    HopIdentity::from_pem(&tb.trust_domain, node, &tb.ca.certified_key().cert_pem, &cert.cert_pem, &cert.key_pem)
        .unwrap()
}

async fn dial(
    id: &HopIdentity,
    alpn: &[u8],
    addr: SocketAddr,
    server: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(id.client_config_with_alpn(&Timeouts::default(), alpn).unwrap());
    let conn = ep.connect(addr, &id.server_name(server)).unwrap().await?;
    // With TLS 1.3 the server checks the client certificate after the client finished; a
    // refusal then arrives as a close. Open a stream and wait for the outcome either way.
    match conn.open_bi().await {
        Ok((mut send, mut recv)) => {
            // An unknown frame type: a healthy relay answers at once with MALFORMED_FRAME.
            let _ = send.write_all(&[0x7f, 0, 0]).await;
            let _ = recv.read(&mut [0u8; 1]).await;
            match conn.close_reason() {
                Some(reason) => Err(reason),
                None => Ok(conn),
            }
        }
        Err(e) => Err(e),
    }
}

/// Waits (bounded) until the relay has counted `reason`.
async fn counted(metrics: &Metrics, reason: &str) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = common::sample(
            &metrics.encode(),
            "relayfed_transport_hop_handshakes_total",
            &[("role", "server"), ("result", reason)],
        );
        if v > 0.0 || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_certificate_from_the_federation_ca_is_accepted() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, metrics, _relay) = relay(&tb).await;
    let good = tb.ca.issue("shop", Duration::from_secs(600)).unwrap();
    let conn = dial(&identity(&tb, "shop", &good), b"relayfed/1", addr, "hub").await.unwrap();
    assert_eq!(
        conn.handshake_data().unwrap().downcast::<quinn::crypto::rustls::HandshakeData>().unwrap().protocol.unwrap(),
        b"relayfed/1"
    );
    assert_eq!(counted(&metrics, "ok").await, 1.0);
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, metrics, _relay) = relay(&tb).await;
    let other = Testbed::new("test.example").unwrap();
    let cert = other.ca.issue("intruder", Duration::from_secs(600)).unwrap();
    // The intruder trusts our CA (it knows the relay), but its own certificate is from another CA.
    let id = HopIdentity::from_pem(
        &tb.trust_domain,
        "intruder",
        &tb.ca.certified_key().cert_pem,
        &cert.cert_pem,
        &cert.key_pem,
    )
    .unwrap();
    assert!(dial(&id, b"relayfed/1", addr, "hub").await.is_err());
    assert_eq!(counted(&metrics, "unknown_ca").await, 1.0);
}

#[tokio::test]
async fn a_relay_from_another_ca_is_refused_by_the_client() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, _, _relay) = relay(&tb).await;
    let other = Testbed::new("test.example").unwrap();
    let cert = other.ca.issue("shop", Duration::from_secs(600)).unwrap();
    let id = identity(&other, "shop", &cert);
    let err = dial(&id, b"relayfed/1", addr, "hub").await.unwrap_err();
    assert_eq!(failure_reason(&err), "unknown_ca", "{err:?}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, metrics, _relay) = relay(&tb).await;
    let now = SystemTime::now();
    let cert = tb.ca.issue_between("shop", now - Duration::from_secs(7200), now - Duration::from_secs(3600)).unwrap();
    assert!(dial(&identity(&tb, "shop", &cert), b"relayfed/1", addr, "hub").await.is_err());
    assert_eq!(counted(&metrics, "expired").await, 1.0);
}

#[tokio::test]
async fn an_unknown_alpn_is_refused() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, metrics, _relay) = relay(&tb).await;
    let cert = tb.ca.issue("shop", Duration::from_secs(600)).unwrap();
    let err = dial(&identity(&tb, "shop", &cert), b"relayfed/0", addr, "hub").await.unwrap_err();
    assert_eq!(failure_reason(&err), "alpn", "{err:?}");
    assert_eq!(counted(&metrics, "alpn").await, 1.0);
}

#[tokio::test]
async fn a_relay_with_another_node_id_is_refused() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, _, _relay) = relay(&tb).await;
    let cert = tb.ca.issue("shop", Duration::from_secs(600)).unwrap();
    let err = dial(&identity(&tb, "shop", &cert), b"relayfed/1", addr, "hub-us").await.unwrap_err();
    assert_eq!(failure_reason(&err), "node_id_mismatch", "{err:?}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_and_counted_as_such() {
    let tb = Testbed::new("test.example").unwrap();
    let (addr, metrics, _relay) = relay(&tb).await;
    // Trusts the relay, presents nothing.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(relayfed_sidecar::crypto::ca::parse_cert_pem(&tb.ca.certified_key().cert_pem).unwrap()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"relayfed/1".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let name = relayfed_sidecar::crypto::ca::node_dns_name("hub", &tb.trust_domain);
    let refused = match ep.connect(addr, &name).unwrap().await {
        Err(_) => true,
        Ok(conn) => match conn.open_bi().await {
            Ok((mut send, mut recv)) => {
                let _ = send.write_all(&[0x7f, 0, 0]).await;
                let _ = recv.read(&mut [0u8; 1]).await;
                conn.close_reason().is_some()
            }
            Err(_) => true,
        },
    };
    assert!(refused, "a client without a certificate was served");
    assert_eq!(counted(&metrics, "no_client_certificate").await, 1.0, "{}", metrics.encode());
}
