//! Outbound calls: accept a client (a plain-mode listener or an intercepted connection),
//! resolve and balance the destination, set up the stream (ECH, Noise XK) with retries
//! before any payload, then hand it to the pump; plus the path-trace probe.

use super::decide::{self, Answer, Candidates, Sealing};
use super::setup_counts::{CohortNote, lost_with_direct_path, path_setup};
use super::*;
use crate::admin::metrics::Call;
use crate::crypto::ech::config_digest;
use crate::federation::ech_cohorts::Cohort;
use crate::serving::{Admitted, BoundedListener, ServerLimits};

impl HomeNode {
    pub(super) async fn accept_clients(self: Arc<Self>, listener: TcpListener, import: Arc<Import>) {
        let listener = BoundedListener::new(listener, ServerLimits::DATA, "import");
        loop {
            let Admitted { tcp, remote: client, permit } = listener.accept().await;
            let node = self.clone();
            let import = import.clone();
            let span = info_span!("outbound", %client, service = %import.service, dest = ?import.node);
            tokio::spawn(
                async move {
                    let _permit = permit;
                    node.outbound(tcp, &import).await
                }
                .instrument(span),
            );
        }
    }

    /// Connections redirected by iptables: find the import by original destination, then take
    /// the same path as a plain-mode listener; otherwise pass through or refuse.
    pub(super) async fn accept_intercepted(
        self: Arc<Self>,
        listener: TcpListener,
        by_dst: Arc<HashMap<SocketAddr, Arc<Import>>>,
        unmatched: Unmatched,
    ) {
        let listener = BoundedListener::new(listener, ServerLimits::DATA, "outbound");
        loop {
            let Admitted { tcp, remote: client, permit } = listener.accept().await;
            let node = self.clone();
            let by_dst = by_dst.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let local = tcp.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                let Some(dst) = original_dst(&tcp, local) else {
                    warn!(%client, "connection to the outbound port was not redirected: refused");
                    node.metrics.intercepted("none".into(), "", "not_redirected");
                    return reset(tcp);
                };
                if let Some(import) = by_dst.get(&dst) {
                    node.metrics.intercepted(dst.to_string(), &import.service, "federated");
                    let span = info_span!("outbound", %client, original_dst = %dst, service = %import.service, dest = ?import.node);
                    return node.outbound(tcp, import).instrument(span).await;
                }
                match unmatched {
                    Unmatched::Refuse => {
                        info!(%client, original_dst = %dst, "not an imported service: refused");
                        node.metrics.intercepted("other".into(), "", "refused");
                        reset(tcp);
                    }
                    Unmatched::Passthrough => {
                        debug!(%client, original_dst = %dst, "not an imported service: passthrough");
                        node.metrics.intercepted("other".into(), "", "passthrough");
                        match TcpStream::connect(dst).await {
                            Ok(mut upstream) => {
                                let mut tcp = tcp;
                                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
                            }
                            Err(_) => reset(tcp),
                        }
                    }
                }
            });
        }
    }

    async fn outbound(self: &Arc<Self>, tcp: TcpStream, import: &Import) {
        let started = Instant::now();
        // One stream uses one version of the live settings from setup to close.
        let live = self.live();
        let est = match tokio::time::timeout(live.call_timeout, self.establish(import, &live)).await {
            Ok(r) => r,
            Err(_) => Err((
                ErrorCode::Timeout,
                "stream setup (with retries) did not finish within the call timeout".to_owned(),
            )),
        };
        let record = |ech, source: Option<&str>, destination: Option<&str>, code| {
            self.metrics.call(Call {
                side: "origin",
                service: &import.service,
                source_main: live.main_label(source),
                destination_main: live.main_label(destination),
                ech,
                code,
            })
        };
        match est {
            Ok(e) => {
                let setup = started.elapsed().as_secs_f64();
                self.metrics.call_setup(&import.service, live.main_label(Some(&e.main)), e.ech, setup);
                debug!(ech = e.ech, "session established");
                let (via, main, sealed, direct) = (e.via, e.main, e.ech, e.direct);
                let ended = self.pump(tcp, e.send, e.recv, (e.tx, e.rx), "outbound", live.stream_idle).await;
                if let Some(conn) = direct
                    && lost_with_direct_path(&ended, conn.close_reason().is_some())
                {
                    // Set up on a direct path that then died under it: the call failed, and
                    // the direct-path rollout counts it against the path.
                    self.direct_cohorts.record(&main, true, false, 0.0);
                }
                record(sealed, Some(&via), Some(&main), ended.err());
            }
            Err((code, message)) => {
                warn!(code = code.label(), message, hint = code.hint(), "outbound stream failed");
                self.metrics.proxy_stream_error(code);
                let via = self.path(&[]).map(|(m, _)| m);
                record(false, via.as_deref(), None, Some(code));
                reset(tcp);
            }
        }
    }

    fn ech_config_for(
        &self,
        main: &str,
    ) -> Option<(crate::protocol::EchConfig, crate::protocol::ech_config::CipherSuite)> {
        // The snapshot's config first; another cluster's relay only by its CA-signed config.
        if let Some(found) = self.ech_configs.read().ok()?.get(main) {
            return found.first_usable().map(|(c, s)| (c.clone(), s));
        }
        let signed = self.signed_ech.read().ok()?;
        signed.get(main)?.1.first_usable().map(|(c, s)| (c.clone(), s))
    }

    /// The destination of a stream for `import`: fixed in config, or picked from the view.
    fn resolve(
        &self,
        import: &Import,
        my_main: &str,
        exclude: &[Key],
        live: &HomeLive,
    ) -> Result<(Entry, bool), StreamError> {
        let planned = match self.view.read() {
            Ok(v) => decide::plan_call(import, &v.1, exclude),
            Err(_) => decide::plan_call(import, &[], exclude),
        };
        let candidates = match planned {
            Ok(Candidates::Fixed(e)) => return Ok((e, false)),
            Ok(Candidates::Pick(c)) => c,
            Err(e) => {
                if e.0 == ErrorCode::ServiceNotFound {
                    self.metrics.proxy.routes.get_or_create(&[("result", "service_not_found")]).inc();
                }
                return Err(e);
            }
        };
        let algorithm = live.lb.per_service.get(&import.service).copied().unwrap_or(live.lb.default);
        let picked = self.balancers.lock().ok().and_then(|mut b| {
            let bal = b
                .entry((import.service.clone(), import.port))
                .or_insert_with(|| Balancer::new(algorithm, live.lb.prefer_local, live.breaker));
            let now = Instant::now();
            let e = bal.pick(&candidates, my_main, now, &mut rand::rng())?;
            bal.started(&e.key(), now);
            Some(e)
        });
        let Some(e) = picked else {
            self.metrics.proxy.routes.get_or_create(&[("result", "no_healthy_instance")]).inc();
            return Err(decide::no_healthy_instance(&import.service));
        };
        self.metrics.proxy.routes.get_or_create(&[("result", "resolved")]).inc();
        self.metrics.proxy.lb_picks.get_or_create(&[("service", e.service.clone()), ("node", e.node.clone())]).inc();
        Ok((e, true))
    }

    fn balanced_done(&self, import: &Import, key: &Key, latency: Option<Duration>) {
        if let Ok(mut b) = self.balancers.lock()
            && let Some(bal) = b.get_mut(&(import.service.clone(), import.port))
        {
            let now = Instant::now();
            bal.finished(key, now, latency);
            for (k, state) in bal.states(now) {
                self.metrics
                    .proxy
                    .circuit_state
                    .get_or_create(&crate::admin::metrics::instance_breaker(&k.service, &k.node, &k.main))
                    .set(state.as_i64());
            }
        }
    }

    /// Ends a stream to `key` without judging the instance.
    fn release(&self, import: &Import, key: &Key) {
        if let Ok(mut b) = self.balancers.lock()
            && let Some(bal) = b.get_mut(&(import.service.clone(), import.port))
        {
            bal.release(key);
        }
    }

    /// Sets up the stream for one call. A registry-resolved call whose setup fails before any
    /// payload byte is read from the client (the client's bytes are only read once the session
    /// is up) is retried on another instance, with full-jitter backoff, up to `maxAttempts`.
    async fn establish(self: &Arc<Self>, import: &Import, live: &HomeLive) -> Result<Established, StreamError> {
        let retry = &live.retry;
        let backoff = crate::resilience::backoff::Backoff {
            initial: Duration::from_millis(retry.initial_backoff_ms),
            max: Duration::from_millis(retry.max_backoff_ms),
        };
        let mut tried: Vec<Key> = Vec::new();
        // Links that died under an attempt: the next attempt takes another path.
        let mut lost_paths: Vec<usize> = Vec::new();
        let mut attempt = 0u32;
        loop {
            let (main_id, conn) =
                self.path(&lost_paths).ok_or((ErrorCode::PeerUnreachable, "no main relay connection".to_owned()))?;
            let (dest, balanced) = self.resolve(import, &main_id, &tried, live)?;
            // While the rollout selects this home for the destination's relay, a direct
            // connection to the destination home carries the stream while it is up (§12), and
            // the call starts an attempt toward one; a rollback moves new streams back to the
            // relays at once.
            let direct = if live.direct_paths.attempts(&self.identity.node_id, &dest.main) {
                self.want_direct(&dest);
                self.direct_conn(&dest.node).filter(|c| !lost_paths.contains(&c.stable_id()))
            } else {
                None
            };
            let is_direct = direct.is_some();
            let conn = direct.unwrap_or(conn);
            let started = Instant::now();
            let mut cohort = CohortNote::default();
            // One attempt gets the handshake timeout; the call timeout bounds them all.
            let result = match tokio::time::timeout(
                live.handshake_timeout,
                self.establish_to(
                    Via { conn: &conn, main: &main_id, direct: is_direct },
                    &dest,
                    balanced,
                    live,
                    &mut cohort,
                ),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err((ErrorCode::Timeout, format!("no Noise handshake with {} in time", dest.node))),
            };
            // A failure on our own link (the main relay connection, or the direct one, closed
            // meanwhile) says nothing about the instance: it is released unjudged, like a
            // refusal. A direct path that did not answer is given up the same way.
            let link_closed = conn.close_reason().is_some();
            let unanswered = matches!(&result, Err((ErrorCode::Timeout | ErrorCode::PeerUnreachable, _)));
            let direct_failed = is_direct && (link_closed || unanswered);
            if direct_failed {
                self.direct_lost(&dest.node, conn.stable_id());
            }
            let own_link_lost = link_closed || direct_failed;
            if let Some(setup) = cohort.setup(&result, own_link_lost, started.elapsed()) {
                self.ech_cohorts.record(&dest.main, setup);
            }
            if live.direct_paths.enabled
                && let Some(ok) = path_setup(&result, is_direct, direct_failed, link_closed)
            {
                self.direct_cohorts.record(&dest.main, is_direct, ok, started.elapsed().as_secs_f64());
            }
            if balanced {
                match &result {
                    Ok(_) => self.balanced_done(import, &dest.key(), Some(started.elapsed())),
                    Err((code, _)) if against_instance(*code) && !own_link_lost => {
                        self.balanced_done(import, &dest.key(), None)
                    }
                    // Refusals about the caller (rate limit, permissions, ECH policy) say
                    // nothing about the instance's health.
                    Err(_) => self.release(import, &dest.key()),
                }
            }
            if own_link_lost && result.is_err() {
                // Nothing reached the instance's app: the same call goes out on another link
                // at once, without using up an attempt.
                self.metrics.proxy.retries.get_or_create(&[("code", "link_lost")]).inc();
                info!(main = %main_id, instance = %dest.node, "our main relay link died under the stream setup: retrying on another link");
                lost_paths.push(conn.stable_id());
                continue;
            }
            attempt += 1;
            match result {
                Err((code, message)) if balanced && retryable(code) && attempt < retry.max_attempts.max(1) => {
                    self.metrics.proxy.retries.get_or_create(&[("code", code.label())]).inc();
                    info!(code = code.label(), %message, instance = %dest.node, attempt, "stream setup failed before any payload: retrying on another instance");
                    tried.push(dest.key());
                    let wait = backoff.wait(attempt - 1, &mut rand::rng());
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn establish_to(
        &self,
        via: Via<'_>,
        dest: &Entry,
        from_registry: bool,
        live: &HomeLive,
        cohort: &mut CohortNote,
    ) -> Result<Established, StreamError> {
        let Via { conn, main: main_id, direct } = via;
        let remote =
            decode_key32(&dest.noise_key).ok_or((ErrorCode::Internal, format!("bad Noise key for {}", dest.node)))?;
        let inner = InnerRoute {
            dest_node: dest.node.clone(),
            dest_main: dest.main.clone(),
            service: dest.service.clone(),
            port: dest.port,
            origin: format!("{}@{}", self.identity.node_id, main_id),
        };
        // A direct stream has no relay to hide the route from: it goes plain, and says
        // nothing about ECH to the rollout analysis.
        let decision =
            if dest.ech && !direct { live.policy.decide(&dest.node, &dest.main) } else { EchDecision::Plain };
        if !direct {
            cohort.cohort = Some(if decision == EchDecision::Plain { Cohort::Plain } else { Cohort::Ech });
        }
        let mut retried = false;
        loop {
            let config = self.ech_config_for(&dest.main);
            let how = decide::sealing(decision, config.is_some(), &dest.main).inspect_err(|_| {
                self.metrics.proxy.ech.get_or_create(&[("outcome", "failed")]).inc();
            })?;
            let sealed = match (how, config) {
                (Sealing::Seal, Some((config, suite))) => {
                    let ech_err = |e: crate::crypto::ech::EchError| (e.code(), e.to_string());
                    let s = seal(&config, suite, &dest.main, &inner).map_err(ech_err)?;
                    let b = crate::crypto::ech::binding(&config, &s).map_err(ech_err)?;
                    self.metrics.proxy.ech.get_or_create(&[("outcome", "attempted")]).inc();
                    Some((s, b))
                }
                (Sealing::Fallback, _) => {
                    // The authenticated snapshot says this relay has no ECH keys: ECH is
                    // securely off for it, not stripped by a relay.
                    self.metrics.proxy.ech.get_or_create(&[("outcome", "fallback")]).inc();
                    cohort.fallback = true;
                    None
                }
                _ => None,
            };
            let binding = sealed.as_ref().map(|(_, b)| b.clone());
            let (body, grease) = match sealed {
                Some((s, _)) => (RouteBody::Sealed(s), None),
                None if decision == EchDecision::Plain && !direct => {
                    (RouteBody::Plain(inner.clone()), self.grease(live, dest, &inner))
                }
                None => (RouteBody::Plain(inner.clone()), None),
            };
            let header = RouteHeader {
                hop_limit: MAX_HOPS,
                probe: false,
                trace_context: String::new(),
                path: vec![],
                body,
                grease,
            };
            let prologue = prologue(binding.as_ref(), &inner).map_err(|e| (e.code(), e.to_string()))?;
            let hs_started = Instant::now();
            let (init, msg1) =
                Initiator::start(&self.noise, &remote, &prologue).map_err(|e| (e.code(), e.to_string()))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| (ErrorCode::PeerUnreachable, e.to_string()))?;
            write_frames(&mut send, &[Frame::Route(header), Frame::Noise(msg1)]).await.map_err(io_err)?;
            let frame = read_frame(&mut recv).await.map_err(io_err)?;
            let snapshot_digest = || self.ech_config_for(&dest.main).and_then(|(c, _)| config_digest(&c).ok());
            let digest = if matches!(frame, Some(Frame::RetryConfigs(_))) { snapshot_digest() } else { None };
            match decide::answer(frame, &dest.main, binding.as_ref(), digest, retried) {
                Answer::Noise(msg2) => {
                    // Message 3 carries our certificate (and our CA's, for a destination of
                    // another trust domain): the destination learns who calls (§6.1).
                    let me = self.current_identity();
                    let ours =
                        if live.partner_behind(&dest.main).is_some() { me.chain_der() } else { me.leaf_der().to_vec() };
                    let (session, msg3, cert) = match init.finish(&msg2, &ours) {
                        Ok(x) => x,
                        Err(e) => {
                            self.handshake_failed(binding.is_some());
                            return Err((e.code(), e.to_string()));
                        }
                    };
                    // A key from the registry came through relays: the destination must show
                    // a CA-issued certificate binding it (a key from the snapshot is trusted).
                    let partner = live.partner_behind(&dest.main);
                    if (from_registry || partner.is_some())
                        && let Err(reason) =
                            super::node_binds_key(&self.current_identity(), partner, &dest.node, &remote, &cert)
                    {
                        self.metrics.proxy.e2e_handshakes.get_or_create(&[("result", "key_unverified")]).inc();
                        return Err((
                            ErrorCode::HandshakeFailed,
                            format!("the Noise key the registry gave for {} is not the node's: {reason}", dest.node),
                        ));
                    }
                    write_frames(&mut send, &[Frame::Noise(msg3)]).await.map_err(io_err)?;
                    self.metrics.proxy.e2e_handshakes.get_or_create(&[("result", "ok")]).inc();
                    self.metrics.proxy.e2e_handshake_seconds.observe(hs_started.elapsed().as_secs_f64());
                    if binding.is_some() {
                        self.metrics.proxy.ech.get_or_create(&[("outcome", "accepted")]).inc();
                    }
                    let (tx, rx) = session.split();
                    return Ok(Established {
                        send,
                        recv,
                        tx,
                        rx,
                        ech: binding.is_some(),
                        via: main_id.to_owned(),
                        main: dest.main.clone(),
                        direct: direct.then(|| conn.clone()),
                    });
                }
                Answer::RetryWithNewerConfig => {
                    info!(main = %dest.main, "ECH config was stale: retrying with the config snapshot's newer config");
                    self.metrics.proxy.ech.get_or_create(&[("outcome", "retried")]).inc();
                    retried = true;
                    cohort.retried = true;
                    continue;
                }
                Answer::Failed((code, message)) => {
                    if code == ErrorCode::EchUnknownConfig {
                        self.metrics.proxy.ech.get_or_create(&[("outcome", "retry_refused")]).inc();
                    } else if code == ErrorCode::HandshakeFailed {
                        self.handshake_failed(binding.is_some());
                    } else if binding.is_some() {
                        self.metrics.proxy.ech.get_or_create(&[("outcome", "failed")]).inc();
                    }
                    return Err((code, message));
                }
            }
        }
    }

    /// A GREASE envelope for a plain stream in opportunistic mode, toward a relay that has
    /// ECH keys: a real sealing of the route (the same work as an ECH stream) gives the shape,
    /// random bytes the content, so the first frame is exactly as long as a sealed one.
    fn grease(&self, live: &HomeLive, dest: &Entry, inner: &InnerRoute) -> Option<crate::protocol::route::Grease> {
        let p = &live.policy;
        if !p.enabled || p.mode != crate::federation::ech_policy::EchMode::Opportunistic || !dest.ech {
            return None;
        }
        let (config, suite) = self.ech_config_for(&dest.main)?;
        let shape = seal(&config, suite, &dest.main, inner).ok()?;
        let g = crate::protocol::route::Grease::imitating(&shape, inner, rand::random(), |b| rand::fill(b)).ok()?;
        self.metrics.proxy.ech.get_or_create(&[("outcome", "grease")]).inc();
        Some(g)
    }

    /// Counts a failed end-to-end handshake; for an ECH stream that is a downgrade or
    /// substitution on the path (the prologue binds the ECH key and sealing), or a wrong key.
    fn handshake_failed(&self, ech: bool) {
        self.metrics.proxy.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
        if ech {
            self.metrics.proxy.ech.get_or_create(&[("outcome", "downgrade")]).inc();
        }
    }

    /// Path-trace probe to one instance of `service:port`: the route taken, with the time
    /// each relay forwarded it and the destination received it.
    pub async fn trace(&self, service: &str, port: u16) -> serde_json::Value {
        use serde_json::json;
        let Some((main_id, conn)) = self.path(&[]) else {
            return json!({"error": "PEER_UNREACHABLE", "message": "no main relay connection"});
        };
        let import = Import::resolved(service, port, SocketAddr::from(([127, 0, 0, 1], 0)));
        let live = self.live();
        let dest = match self.resolve(&import, &main_id, &[], &live) {
            Ok((d, balanced)) => {
                if balanced {
                    // A probe says nothing about the instance's latency: release it neutrally.
                    self.release(&import, &d.key());
                }
                d
            }
            Err((code, message)) => return json!({"error": code.label(), "message": message, "hint": code.hint()}),
        };
        let inner = InnerRoute {
            dest_node: dest.node.clone(),
            dest_main: dest.main.clone(),
            service: service.to_owned(),
            port,
            origin: format!("{}@{}", self.identity.node_id, main_id),
        };
        let sent = crate::relay::now_ms();
        let started = Instant::now();
        let header = RouteHeader {
            hop_limit: MAX_HOPS,
            probe: true,
            trace_context: String::new(),
            path: vec![],
            body: RouteBody::Plain(inner),
            grease: None,
        };
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| (ErrorCode::PeerUnreachable, e.to_string()))?;
            write_frames(&mut send, &[Frame::Route(header)]).await.map_err(io_err)?;
            match read_frame(&mut recv).await.map_err(io_err)? {
                Some(Frame::Control(Control::TraceResult { hops })) => Ok(hops),
                Some(Frame::Error(e)) => Err((e.code, e.message)),
                other => Err((ErrorCode::MalformedFrame, format!("unexpected answer {other:?}"))),
            }
        };
        match tokio::time::timeout(live.call_timeout, result).await {
            Ok(Ok(hops)) => {
                let mut prev = sent;
                let hops: Vec<_> = std::iter::once(json!({"node": self.identity.node_id, "atMs": sent, "deltaMs": 0}))
                    .chain(hops.iter().map(|h| {
                        let d = h.at_ms.saturating_sub(prev);
                        prev = h.at_ms;
                        json!({"node": h.node, "atMs": h.at_ms, "deltaMs": d})
                    }))
                    .collect();
                json!({
                    "service": service, "port": port, "destination": format!("{}@{}", dest.node, dest.main),
                    "relayHops": hops.len().saturating_sub(2), "hops": hops,
                    "roundTripMillis": started.elapsed().as_secs_f64() * 1e3,
                })
            }
            Ok(Err((code, message))) => json!({"error": code.label(), "message": message}),
            Err(_) => json!({"error": "TIMEOUT"}),
        }
    }
}

/// An established outbound session.
struct Established {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    tx: SendHalf,
    rx: RecvHalf,
    ech: bool,
    /// The main relay the call went out through.
    via: String,
    /// The destination home's main relay.
    main: String,
    /// The direct connection the stream rides on, if it is on one.
    direct: Option<quinn::Connection>,
}

/// Failures that count against the instance (its circuit breaker).
fn against_instance(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TargetUnreachable
            | ErrorCode::NoRoute
            | ErrorCode::PeerUnreachable
            | ErrorCode::Timeout
            | ErrorCode::HandshakeFailed
            | ErrorCode::ServiceNotFound
            | ErrorCode::MalformedFrame
    )
}

/// Failures worth another instance: the destination or the path to it, not the request.
fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::PeerUnreachable
            | ErrorCode::NoRoute
            | ErrorCode::TargetUnreachable
            | ErrorCode::CircuitOpen
            | ErrorCode::Timeout
    )
}

/// The connection a stream is opened on: a main relay link (`main`), or a direct connection
/// to the destination home (`direct`; `main` is then our active relay, named in the origin).
#[derive(Clone, Copy)]
struct Via<'a> {
    conn: &'a quinn::Connection,
    main: &'a str,
    direct: bool,
}

fn io_err(e: FrameIoError) -> StreamError {
    match e {
        FrameIoError::Io(e) => (ErrorCode::PeerUnreachable, e.to_string()),
        FrameIoError::Decode(e) => (ErrorCode::MalformedFrame, e.to_string()),
    }
}

/// Closes a client socket with a reset, so the app sees the failure at once.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}
