//! Main relay mode: accept home nodes over mutual-TLS QUIC and route streams between them.
//!
//! Per stream: read the ROUTE frame, enforce the hop limit and loop check, open ECH when the
//! header is sealed to our key (answering an unknown config id with retry configs), check
//! the origin claimed in the route is the authenticated peer, then open a stream to the
//! destination home node, send it the (opened) header and copy bytes both ways. Relays never
//! see plaintext after the header: the rest is Noise ciphertext.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::metrics::Metrics;
use crate::config::Snapshot;
use crate::config::keys::EchKeyFile;
use crate::crypto::ech::{EchError, EchKeySet};
use crate::protocol::route::{PathEntry, RouteBody, RouteHeader};
use crate::protocol::{ErrorCode, Frame};
use crate::transport::io::{read_frame, send_error, write_frames};
use crate::transport::tls::{HopIdentity, failure_reason};

/// Fault injection for tests: what a misbehaving relay does to sealed headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Behave.
    None,
    /// Flip a bit of the sealed payload before opening it (an on-path attacker).
    FlipSealed,
    /// Forward an opened header as plain, hiding that ECH was used (a downgrade).
    StripEch,
}

/// Shared state of a running main relay.
pub struct MainRelay {
    identity: HopIdentity,
    keys: Option<EchKeySet>,
    homes: RwLock<HashMap<String, quinn::Connection>>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    tamper: Tamper,
}

/// Addresses a started relay is bound to.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// QUIC (UDP).
    pub quic: SocketAddr,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MainRelay {
    /// Loads identity and keys from `snap` (validated), binds, and starts accepting.
    pub async fn start(snap: &Snapshot, metrics: Arc<Metrics>, tamper: Tamper) -> anyhow::Result<(Arc<Self>, Bound)> {
        let identity = HopIdentity::load(snap)?;
        let keys = match &snap.ech {
            Some(e) => Some(EchKeyFile::load(&e.key_file)?.key_set(&e.key_file, Duration::from_secs(e.grace_seconds))?),
            None => None,
        };
        let listen = snap.listen.ok_or_else(|| anyhow::anyhow!("listen: required for a main relay"))?;
        let endpoint = quinn::Endpoint::server(identity.server_config(&snap.timeouts)?, listen)
            .map_err(|e| anyhow::anyhow!("cannot bind QUIC on {listen}: {e} (is the port in use?)"))?;
        let bound = Bound { quic: endpoint.local_addr()? };
        let relay = Arc::new(Self {
            identity,
            keys,
            homes: RwLock::new(HashMap::new()),
            metrics,
            handshake_timeout: Duration::from_millis(snap.timeouts.handshake_ms),
            tamper,
        });
        let r = relay.clone();
        tokio::spawn(async move { r.accept_loop(endpoint).await });
        Ok((relay, bound))
    }

    /// The ECHConfigList this relay publishes, if it has ECH keys.
    pub fn ech_config_list(&self) -> Option<Vec<u8>> {
        self.keys.as_ref().and_then(|k| k.config_list().ok())
    }

    async fn accept_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let relay = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => relay.serve_connection(conn).await,
                    Err(e) => {
                        let reason = failure_reason(&e);
                        relay.metrics.hop_handshakes.get_or_create(&[("role", "server"), ("result", reason)]).inc();
                        warn!(%remote, reason, error = %e, "hop handshake refused");
                    }
                }
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let peer = match self.identity.peer_node_id(&conn) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.hop_handshakes.get_or_create(&[("role", "server"), ("result", "no_identity")]).inc();
                warn!(error = %e, "peer certificate carries no node identity");
                conn.close(1u32.into(), b"no identity");
                return;
            }
        };
        self.metrics.hop_handshakes.get_or_create(&[("role", "server"), ("result", "ok")]).inc();
        self.metrics.open_connections.inc();
        let span = info_span!("connection", peer = %peer, remote = %conn.remote_address());
        async {
            info!("home node connected");
            if let Ok(mut homes) = self.homes.write() {
                homes.insert(peer.clone(), conn.clone());
            }
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let relay = self.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move { relay.route_stream(&peer, send, recv).await }.in_current_span());
                    }
                    Err(e) => {
                        info!(reason = %e, "connection closed");
                        break;
                    }
                }
            }
            if let Ok(mut homes) = self.homes.write() {
                // Only forget the entry if it is still this connection (not a reconnect).
                if homes.get(&peer).is_some_and(|c| c.stable_id() == conn.stable_id()) {
                    homes.remove(&peer);
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics.open_connections.dec();
    }

    async fn route_stream(&self, peer: &str, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let header = match tokio::time::timeout(self.handshake_timeout, read_frame(&mut recv)).await {
            Ok(Ok(Some(Frame::Route(h)))) => h,
            Ok(Ok(Some(_))) => {
                return self.fail(&mut send, ErrorCode::MalformedFrame, "first frame must be ROUTE").await;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return self.fail(&mut send, ErrorCode::MalformedFrame, &e.to_string()).await,
            Err(_) => return self.fail(&mut send, ErrorCode::Timeout, "no route header in time").await,
        };
        let me = self.identity.node_id.clone();
        if header.hop_limit == 0 {
            return self.fail(&mut send, ErrorCode::HopLimitExceeded, "hop limit reached").await;
        }
        if header.path.iter().any(|p| p.node == me) {
            return self.fail(&mut send, ErrorCode::LoopDetected, "stream already passed this relay").await;
        }
        let (config_id, route) = match header.body {
            RouteBody::Plain(r) => (None, r),
            RouteBody::Opened { .. } => {
                return self.fail(&mut send, ErrorCode::MalformedFrame, "only relays send opened headers").await;
            }
            RouteBody::Sealed(mut sealed) => {
                if sealed.main != me {
                    return self.fail(&mut send, ErrorCode::NoRoute, "sealed for another main relay").await;
                }
                let Some(keys) = &self.keys else {
                    return self.fail(&mut send, ErrorCode::EchDecryptFailed, "this relay has no ECH keys").await;
                };
                if self.tamper == Tamper::FlipSealed
                    && let Some(b) = sealed.payload.get_mut(0)
                {
                    *b ^= 0x01;
                }
                match keys.open(&sealed, SystemTime::now()) {
                    Ok(r) => {
                        self.metrics.ech.get_or_create(&[("outcome", "opened")]).inc();
                        (Some(sealed.config_id), r)
                    }
                    Err(EchError::UnknownConfig(id)) => {
                        self.metrics.ech.get_or_create(&[("outcome", "retry_sent")]).inc();
                        debug!(config_id = id, "unknown ECH config id: sending retry configs");
                        let list = keys.config_list().unwrap_or_default();
                        let _ = write_frames(&mut send, &[Frame::RetryConfigs(list)]).await;
                        let _ = send.finish();
                        return;
                    }
                    Err(e) => {
                        self.metrics.ech.get_or_create(&[("outcome", "decrypt_failed")]).inc();
                        return self.fail(&mut send, e.code(), &e.to_string()).await;
                    }
                }
            }
        };
        let span = info_span!("stream", service = %route.service, dest = %route.dest_node, ech = config_id.is_some());
        async {
            let claimed = route.origin.split('@').next().unwrap_or_default();
            if claimed != peer {
                return self
                    .fail(&mut send, ErrorCode::PermissionDenied, "origin does not match the authenticated peer")
                    .await;
            }
            if route.dest_main != me {
                return self.fail(&mut send, ErrorCode::NoRoute, "destination is attached to another main relay").await;
            }
            let dest = self.homes.read().ok().and_then(|h| h.get(&route.dest_node).cloned());
            let Some(dest) = dest else {
                return self.fail(&mut send, ErrorCode::NoRoute, "destination home node is not connected").await;
            };
            let mut path = header.path.clone();
            path.push(PathEntry { node: me.clone(), at_ms: now_ms() });
            let body = match (config_id, self.tamper) {
                (Some(_), Tamper::StripEch) | (None, _) => RouteBody::Plain(route),
                (Some(config_id), _) => RouteBody::Opened { config_id, route },
            };
            let forward =
                RouteHeader { hop_limit: header.hop_limit - 1, trace_context: header.trace_context, path, body };
            let (mut dsend, mut drecv) = match dest.open_bi().await {
                Ok(s) => s,
                Err(e) => return self.fail(&mut send, ErrorCode::PeerUnreachable, &e.to_string()).await,
            };
            if let Err(e) = write_frames(&mut dsend, &[Frame::Route(forward)]).await {
                return self.fail(&mut send, ErrorCode::PeerUnreachable, &e.to_string()).await;
            }
            let up = async {
                let n = tokio::io::copy(&mut recv, &mut dsend).await.unwrap_or(0);
                let _ = dsend.shutdown().await;
                n
            };
            let down = async {
                let n = tokio::io::copy(&mut drecv, &mut send).await.unwrap_or(0);
                let _ = send.shutdown().await;
                n
            };
            let (a, b) = tokio::join!(up, down);
            self.metrics.bytes.get_or_create(&[("direction", "relayed")]).inc_by(a + b);
            self.metrics.streams.get_or_create(&[("direction", "relayed"), ("result", "ok")]).inc();
        }
        .instrument(span)
        .await
    }

    async fn fail(&self, send: &mut quinn::SendStream, code: ErrorCode, message: &str) {
        warn!(code = code.label(), message, "stream refused");
        self.metrics.stream_error("relayed", code);
        send_error(send, code, message).await;
        let _ = send.finish();
    }
}
