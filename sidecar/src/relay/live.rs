//! A main relay's live settings: the part of its configuration a new config version replaces
//! in place (peers, trust defaults, rate limits, breaker settings), and how it is applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::{MainRelay, limit};
use crate::config::Snapshot;
use crate::protocol::ErrorCode;

/// The part of a main relay's configuration that changes without a restart.
#[derive(Clone, Debug)]
pub(crate) struct MainLive {
    /// Peer main relays by node id.
    pub(crate) peers: HashMap<String, crate::config::PeerRelay>,
    pub(crate) trust: crate::config::Trust,
    pub(crate) default_rate: Option<crate::resilience::rate_limit::Limit>,
    pub(crate) breaker: crate::resilience::breaker::BreakerConfig,
    /// This relay's CA-signed ECH config, announced to peers (docs/protocol.md §5.7).
    pub(crate) announcement: Option<crate::config::SignedEchConfig>,
    /// Whether this relay coordinates direct paths between its homes.
    pub(crate) direct_paths: crate::config::direct::DirectPaths,
}

impl MainLive {
    pub(crate) fn from_snapshot(snap: &Snapshot) -> Self {
        Self {
            peers: snap.peers.iter().map(|p| (p.node_id.clone(), p.clone())).collect(),
            trust: snap.trust.clone(),
            default_rate: snap.resilience.rate_limit.as_ref().map(limit),
            breaker: (&snap.resilience.circuit_breaker).into(),
            announcement: snap.ech_announcement.clone(),
            direct_paths: snap.direct_paths.clone(),
        }
    }
}

/// The peers of other trust domains in `peers`, recognised by their pins (a pin that does
/// not parse is logged and leaves its peer unaccepted).
pub(crate) fn partners(peers: &[crate::config::PeerRelay]) -> Vec<crate::transport::tls::Partner> {
    peers
        .iter()
        .filter_map(|p| {
            let pin = p.pin.as_ref()?;
            crate::transport::tls::Partner::from_pin(&p.node_id, pin)
                .map_err(|e| tracing::warn!(peer = %p.node_id, error = %e, "unusable pin: the peer is not accepted"))
                .ok()
        })
        .collect()
}

impl MainRelay {
    /// The live settings in force now.
    pub(crate) fn live(&self) -> Arc<MainLive> {
        match self.live.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies a new config version: peers added are dialed, peers removed or now refused by
    /// the trust rules are disconnected, and trust defaults, permissions, rate limits and
    /// breaker settings apply to new streams at once. Fields that need a restart are not
    /// looked at ([`Snapshot::restart_fields`] names them).
    pub fn apply(self: &Arc<Self>, snap: &Snapshot) {
        let next = MainLive::from_snapshot(snap);
        let old = self.live();
        if next.breaker != old.breaker
            && let Ok(mut b) = self.peer_breakers.lock()
        {
            b.clear();
        }
        match self.live.write() {
            Ok(mut l) => *l = Arc::new(next.clone()),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next.clone()),
        }
        self.identity.get().set_partners(partners(&snap.peers));
        if let Ok(mut h) = self.peer_health.write() {
            h.retain(|p, _| next.peers.contains_key(p));
            for p in next.peers.keys() {
                h.entry(p.clone()).or_default();
            }
        }
        // Drop links that the new rules no longer allow (removed, blocked, unknown).
        let links: Vec<String> = self.peers.read().map(|p| p.keys().cloned().collect()).unwrap_or_default();
        for peer in links {
            let gone = !next.peers.contains_key(&peer);
            if let Some(rule) = self.refuse_connection(&peer).or(gone.then_some("removed")) {
                info!(%peer, rule, "peer no longer allowed: disconnecting");
                if let Some(link) = self.peers.write().ok().and_then(|mut p| p.remove(&peer)) {
                    link.conn.close(ErrorCode::UnknownPeer.to_u16().into(), rule.as_bytes());
                }
            }
        }
        // And homes the new plan no longer assigns here (they fail over to another relay).
        let homes: Vec<String> = self.homes.read().map(|h| h.keys().cloned().collect()).unwrap_or_default();
        for home in homes {
            if let Err(refusal) = crate::federation::registration::admit_home(next.trust.homes.as_ref(), &home) {
                info!(%home, rule = refusal.rule(), "home no longer planned here: disconnecting");
                let link = self.homes.read().ok().and_then(|h| h.get(&home).map(|l| l.conn.clone()));
                if let Some(conn) = link {
                    conn.close(ErrorCode::PermissionDenied.to_u16().into(), refusal.rule().as_bytes());
                }
            }
        }
        // A new signed ECH config (a key rotation) goes to every peer at once: their homes
        // seal to it.
        if next.announcement != old.announcement {
            let hello = self.hello();
            if let Ok(peers) = self.peers.read() {
                for (peer, link) in peers.iter() {
                    if let Some(tx) = &link.control {
                        info!(%peer, "announcing the new signed ECH config");
                        let _ = tx.send(hello.clone());
                    }
                }
            }
            self.push_views();
        }
        if let Some(endpoint) = self.endpoint.get() {
            let me = self.node_id.clone();
            for (peer, cfg) in &next.peers {
                let new = old.peers.get(peer).is_none_or(|o| o.endpoint != cfg.endpoint);
                if new && me < *peer && self.refuse_connection(peer).is_none() {
                    info!(%peer, endpoint = %cfg.endpoint, "new peer main relay: dialing");
                    let relay = self.clone();
                    let (endpoint, peer, addr) = (endpoint.clone(), peer.clone(), cfg.endpoint.clone());
                    tokio::spawn(async move { relay.dial_peer(endpoint, peer, addr).await });
                }
            }
        }
        self.metrics.transport.config_version.set(snap.version as i64);
    }
}

/// How often a main relay looks at its ECH key file for a staged or promoted key (a read and
/// a byte comparison; the file is decrypted only when it changed).
const ECH_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

impl MainRelay {
    /// The ECH keys in force.
    pub(crate) fn ech_keys(&self) -> Option<Arc<crate::crypto::ech::EchKeySet>> {
        self.keys.read().ok().and_then(|k| k.clone())
    }

    /// Re-reads the ECH key file when its contents change (the operator staged or promoted a
    /// key and the kubelet updated the mounted Secret) and swaps the key set: a staged key opens
    /// routes from then on, routes sealed to the previous key still open during the grace
    /// period. (Homes seal only to configs from their snapshot, published after staging.)
    pub(crate) fn watch_ech_keys(
        self: Arc<Self>,
        path: std::path::PathBuf,
        loaded_from: Option<Vec<u8>>,
        grace: Duration,
        passphrase: Option<Vec<u8>>,
    ) {
        tokio::spawn(async move {
            let read = |p: &std::path::Path| std::fs::read(p).ok();
            let mut last = loaded_from;
            loop {
                tokio::time::sleep(ECH_RELOAD_INTERVAL).await;
                let now = read(&path);
                if now.is_none() || now == last {
                    continue;
                }
                last = now;
                let loaded = crate::config::keys::EchKeyFile::load(&path, passphrase.as_deref())
                    .and_then(|f| f.key_set(&path, grace));
                match loaded {
                    Ok(set) => {
                        let id = set.current().config().config_id;
                        let staged = set.staged().map(|k| k.config().config_id);
                        if let Ok(mut k) = self.keys.write() {
                            *k = Some(Arc::new(set));
                        }
                        tracing::info!(config_id = id, staged, "ECH keys reloaded from their file");
                        self.push_views();
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ECH key file changed but cannot be read; keeping the keys in force")
                    }
                }
            }
        });
    }
}
