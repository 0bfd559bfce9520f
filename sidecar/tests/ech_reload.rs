//! A running main relay picks up a rotated ECH key file (as the operator writes it into the
//! mounted Secret): the new config is published, the previous key keeps opening routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relayfed_e2e::Testbed;
use relayfed_sidecar::admin::metrics::Metrics;
use relayfed_sidecar::config::Snapshot;
use relayfed_sidecar::config::keys::{EchKeyFile, StoredEchKey};
use relayfed_sidecar::crypto::ech::EchKeyPair;
use relayfed_sidecar::protocol::ech_config::EchConfigList;
use relayfed_sidecar::relay::MainRelay;

#[tokio::test]
async fn a_rotated_key_file_is_picked_up_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tb = Testbed::new("test.example").unwrap();
    let snap = Snapshot::load(&tb.main_relay("hub", 1).unwrap()).unwrap();
    let (relay, _) = MainRelay::start(&snap, Arc::new(Metrics::new())).await.unwrap();
    let ids = |list: Vec<u8>| -> Vec<u8> {
        let l = EchConfigList::decode(&list).unwrap();
        l.entries
            .iter()
            .filter_map(|e| match e {
                relayfed_sidecar::protocol::ech_config::ListEntry::Config(c) => Some(c.config_id),
                _ => None,
            })
            .collect()
    };
    assert_eq!(ids(relay.ech_config_list().unwrap()), vec![1]);
    // Rotate the file as the operator does: new current key 2, old key 1 as previous.
    let path = snap.ech.as_ref().unwrap().key_file.clone();
    let old = EchKeyFile::load(&path, None).unwrap();
    let next = EchKeyFile::from_key(&EchKeyPair::generate(2, &old.public_name).unwrap());
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let rotated = EchKeyFile { previous: Some(StoredEchKey { rotated_at: Some(now), ..old.current.clone() }), ..next };
    rotated.save(&path, None).unwrap();
    // The relay polls its key file every 10 s; wait for the swap (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    loop {
        interval.tick().await;
        if ids(relay.ech_config_list().unwrap()) == vec![2] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the rotated key was not picked up");
    }
    relay.shutdown().await;
}
