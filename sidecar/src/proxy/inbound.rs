//! Inbound streams: deliver an opened route to the exported target as the Noise responder,
//! or answer a probe with the path it took.

use super::decide::{self, Inbound};
use super::*;

impl HomeNode {
    /// Serves one stream delivered by a main relay, or (`direct_peer`) one opened by that home
    /// over a direct connection, whose route must then name it as the origin.
    pub(super) async fn inbound(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        direct_peer: Option<&str>,
    ) {
        // One stream uses one version of the live settings from setup to close.
        let live = self.live();
        let read = tokio::time::timeout(live.handshake_timeout, read_frame(&mut recv)).await.ok();
        let Inbound { binding, route, probe_path, export } =
            match decide::inbound_route(read, &self.identity.node_id, &self.exports) {
                Ok(i) => i,
                Err(None) => return,
                Err(Some((code, message))) => return self.refuse(&mut send, code, &message).await,
            };
        if let Some(peer) = direct_peer
            && route.origin.split_once('@').map_or(route.origin.as_str(), |(n, _)| n) != peer
        {
            let message = format!("a direct stream from {peer} must name it as the origin");
            return self.refuse(&mut send, ErrorCode::PermissionDenied, &message).await;
        }
        if let Some(peer) = direct_peer
            && let Some(wait) = self.direct_rate_limited(peer, &live)
        {
            warn!(code = ErrorCode::RateLimited.label(), %peer, "direct stream refused: rate limit");
            self.metrics.proxy_stream_error(ErrorCode::RateLimited);
            let message = "too many new streams from this sender";
            crate::transport::io::send_error_retry_after(&mut send, ErrorCode::RateLimited, wait, message).await;
            let _ = send.finish();
            return;
        }
        let span = info_span!("inbound", service = %route.service, origin = %route.origin, ech = binding.is_some());
        async {
            if let Some(path) = probe_path {
                let mut hops: Vec<TraceHop> =
                    path.into_iter().map(|p| TraceHop { node: p.node, at_ms: p.at_ms }).collect();
                hops.push(TraceHop { node: self.identity.node_id.clone(), at_ms: crate::relay::now_ms() });
                let _ = write_frames(&mut send, &[Frame::Control(Control::TraceResult { hops })]).await;
                let _ = send.finish();
                return;
            }
            // The initiator gets the handshake timeout for messages 1 and 3 together: a stalled
            // stream holds the exported target's connection no longer than that.
            let deadline = tokio::time::Instant::now() + live.handshake_timeout;
            let msg1 = match tokio::time::timeout_at(deadline, read_frame(&mut recv)).await {
                Ok(Ok(Some(Frame::Noise(m)))) => m,
                Err(_) => return self.refuse(&mut send, ErrorCode::Timeout, "no Noise message 1 in time").await,
                _ => return self.refuse(&mut send, ErrorCode::MalformedFrame, "expected Noise message 1").await,
            };
            // Message 2 carries this node's certificate, which binds its Noise key: the origin
            // checks that the key it took from the registry is really this node's. An origin
            // of another trust domain gets our CA's certificate after it (it pins the CA's key).
            let identity = self.current_identity();
            let from_partner =
                route.origin.split_once('@').is_some_and(|(_, main)| live.partner_behind(main).is_some());
            let cert = if from_partner { identity.chain_der() } else { identity.leaf_der().to_vec() };
            let responder =
                prologue(binding.as_ref(), &route).and_then(|p| Responder::accept(&self.noise, &p, &msg1, &cert));
            let (responder, msg2) = match responder {
                Ok(x) => x,
                Err(e) => {
                    self.metrics.proxy.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                    return self.refuse(&mut send, ErrorCode::HandshakeFailed, &e.to_string()).await;
                }
            };
            let tcp = match tokio::time::timeout(live.connect_timeout, TcpStream::connect(export.target)).await {
                Ok(Ok(t)) => t,
                _ => {
                    return self
                        .refuse(&mut send, ErrorCode::TargetUnreachable, "local target refused or timed out")
                        .await;
                }
            };
            let _ = tcp.set_nodelay(true);
            if write_frames(&mut send, &[Frame::Noise(msg2)]).await.is_err() {
                return;
            }
            let session = match tokio::time::timeout_at(deadline, read_frame(&mut recv)).await {
                Ok(Ok(Some(Frame::Noise(msg3)))) => responder.finish(&msg3),
                Err(_) => return self.refuse(&mut send, ErrorCode::Timeout, "no Noise message 3 in time").await,
                _ => return self.refuse(&mut send, ErrorCode::MalformedFrame, "expected Noise message 3").await,
            };
            match session {
                Ok((session, initiator, origin_cert)) => {
                    let (origin_node, origin_main) =
                        route.origin.split_once('@').unwrap_or((route.origin.as_str(), ""));
                    let mut tcp = tcp;
                    // An export that asked for it gets the caller's identity, verified here,
                    // in a PROXY v2 header before any byte (docs/protocol.md §6.1).
                    if export.proxy_protocol {
                        let partner = live.partner_behind(origin_main);
                        // No certificate: an older origin, anonymous to the app.
                        let caller = match (!origin_cert.is_empty())
                            .then(|| super::node_binds_key(&identity, partner, origin_node, &initiator, &origin_cert))
                            .transpose()
                        {
                            Ok(td) => td.map(|td| relayfed_proto::crypto::ca::identity_uri(origin_node, &td)),
                            Err(reason) => {
                                self.metrics.proxy.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                                let message =
                                    format!("the caller's certificate does not match its route and key: {reason}");
                                return self.refuse(&mut send, ErrorCode::HandshakeFailed, &message).await;
                            }
                        };
                        let header = crate::protocol::proxy_header::encode(&crate::protocol::proxy_header::Caller {
                            identity: caller,
                            origin_main: origin_main.to_owned(),
                            service: route.service.clone(),
                        });
                        if tokio::io::AsyncWriteExt::write_all(&mut tcp, &header).await.is_err() {
                            let message = "the local target closed before the PROXY header";
                            return self.refuse(&mut send, ErrorCode::TargetUnreachable, message).await;
                        }
                    }
                    let ended = self.pump(tcp, send, recv, session.split(), "inbound", live.stream_idle).await;
                    let source = route.origin.split_once('@').map(|(_, main)| main);
                    self.metrics.call(crate::admin::metrics::Call {
                        side: "destination",
                        service: &route.service,
                        source_main: live.main_label(source),
                        destination_main: live.main_label(Some(&route.dest_main)),
                        ech: binding.is_some(),
                        code: ended.err(),
                    });
                }
                Err(e) => {
                    self.metrics.proxy.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                    self.refuse(&mut send, ErrorCode::HandshakeFailed, &e.to_string()).await;
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn refuse(&self, send: &mut quinn::SendStream, code: ErrorCode, message: &str) {
        warn!(code = code.label(), message, "inbound stream refused");
        self.metrics.proxy_stream_error(code);
        send_error(send, code, message).await;
        let _ = send.finish();
    }
}
