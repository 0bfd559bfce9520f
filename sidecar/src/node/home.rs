//! Home node mode: dial the main relay, expose a local listener per imported service, and
//! deliver inbound federation streams to local targets.
//!
//! Outbound (origin, Noise initiator): accept a TCP client, decide ECH for the destination,
//! send ROUTE + Noise message 1, read message 2 (or an ERROR / RETRY_CONFIGS frame), send
//! message 3, then carry the TCP bytes as Noise transport messages. Inbound (destination,
//! Noise responder): read the delivered ROUTE and message 1, connect to the export's target,
//! answer message 2, read message 3, then carry bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::metrics::Metrics;
use crate::config::keys::load_noise_key;
use crate::config::{
    Export, Import, LoadBalancing, MainRelay, Snapshot, Unmatched, base64_decode, base64_encode, decode_key32,
};
use crate::crypto::ech::seal;
use crate::crypto::noise::{Initiator, MAX_PLAINTEXT, RecvHalf, Responder, SendHalf, StaticKeypair, prologue};
use crate::federation::balancer::Balancer;
use crate::federation::ech_policy::{EchDecision, EchPolicy};
use crate::federation::registry::{Entry, Key};
use crate::intercept::original_dst::original_dst;
use crate::protocol::control::{Control, MainInfo, Service, TraceHop};
use crate::protocol::route::{InnerRoute, MAX_HOPS, RouteBody, RouteHeader};
use crate::protocol::{EchConfigList, ErrorCode, Frame};
use crate::transport::io::{FrameIoError, read_frame, send_error, write_frames};
use crate::transport::tls::{HopIdentity, failure_reason};

/// A failed stream: the code that goes on the wire, in logs and in metrics.
type StreamError = (ErrorCode, String);

/// Shared state of a running home node.
pub struct HomeNode {
    identity: HopIdentity,
    noise: StaticKeypair,
    mains: Vec<MainRelay>,
    exports: Vec<Export>,
    imports: Vec<(String, u16)>,
    policy: EchPolicy,
    ech_configs: RwLock<HashMap<String, EchConfigList>>,
    conn: watch::Sender<Option<(String, quinn::Connection)>>,
    endpoint: std::sync::OnceLock<quinn::Endpoint>,
    view: RwLock<(std::collections::BTreeMap<String, MainInfo>, Vec<Entry>)>,
    balancers: std::sync::Mutex<HashMap<(String, u16), Balancer>>,
    lb: LoadBalancing,
    breaker: crate::resilience::breaker::BreakerConfig,
    retry: crate::config::RetryConfig,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    stream_idle: Duration,
}

/// Where a started home node listens.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Each import (in snapshot order) and its bound local listener.
    pub imports: Vec<(Import, SocketAddr)>,
    /// Outbound listeners for intercepted connections (empty without `intercept`).
    pub outbound: Vec<SocketAddr>,
}

impl HomeNode {
    /// Loads keys from `snap` (validated), binds import listeners, and starts dialing.
    /// Returns once the first main relay connection is up.
    pub async fn start(snap: &Snapshot, metrics: Arc<Metrics>) -> anyhow::Result<(Arc<Self>, Bound)> {
        let identity = HopIdentity::load(snap)?;
        let noise = match &snap.noise_key_file {
            Some(p) => load_noise_key(p, snap.passphrase()?.as_deref())?,
            None => StaticKeypair::generate()?,
        };
        let mut mains = snap.main_relays.clone();
        mains.sort_by_key(|m| m.priority);
        let mut ech_configs = HashMap::new();
        for m in &mains {
            if let Some(list) = m.ech_config_list.as_deref().and_then(base64_decode)
                && let Ok(parsed) = EchConfigList::decode(&list)
            {
                ech_configs.insert(m.node_id.clone(), parsed);
            }
        }
        let (conn, _) = watch::channel(None);
        let node = Arc::new(Self {
            identity,
            noise,
            mains,
            exports: snap.exports.clone(),
            imports: snap.imports.iter().map(|i| (i.service.clone(), i.port)).collect(),
            policy: snap.ech_policy.clone(),
            ech_configs: RwLock::new(ech_configs),
            conn,
            endpoint: std::sync::OnceLock::new(),
            view: RwLock::new(Default::default()),
            balancers: std::sync::Mutex::new(HashMap::new()),
            lb: snap.load_balancing.clone(),
            breaker: snap.resilience.circuit_breaker.to_breaker(),
            retry: snap.resilience.retry.clone(),
            metrics,
            handshake_timeout: Duration::from_millis(snap.timeouts.handshake_ms),
            connect_timeout: Duration::from_millis(snap.timeouts.connect_ms),
            stream_idle: Duration::from_millis(snap.timeouts.stream_idle_ms.max(1)),
        });
        let mut bound = Bound { imports: Vec::new(), outbound: Vec::new() };
        for imp in &snap.imports {
            let listener = crate::transport::io::listen(imp.listen)
                .map_err(|e| anyhow::anyhow!("cannot listen on {} for {}: {e}", imp.listen, imp.service))?;
            bound.imports.push((imp.clone(), listener.local_addr()?));
            let import = Arc::new(imp.clone());
            let n = node.clone();
            tokio::spawn(async move { n.accept_clients(listener, import).await });
        }
        if let Some(ic) = &snap.intercept {
            let by_dst: Arc<HashMap<SocketAddr, Arc<Import>>> =
                Arc::new(snap.imports.iter().filter_map(|i| Some((i.cluster_ip?, Arc::new(i.clone())))).collect());
            let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], ic.outbound_port))];
            if ic.ipv6 {
                addrs.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, ic.outbound_port)));
            }
            for addr in addrs {
                let listener = match crate::transport::io::listen(addr) {
                    Ok(l) => l,
                    Err(e) if addr.is_ipv6() => {
                        warn!(%addr, error = %e, "no IPv6 outbound listener (is IPv6 disabled in this namespace?)");
                        continue;
                    }
                    Err(e) => anyhow::bail!("cannot listen on {addr} for intercepted connections: {e}"),
                };
                bound.outbound.push(listener.local_addr()?);
                let n = node.clone();
                let by_dst = by_dst.clone();
                let unmatched = ic.unmatched;
                tokio::spawn(async move { n.accept_intercepted(listener, by_dst, unmatched).await });
            }
        }
        let bind: SocketAddr = snap.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(node.identity.client_config(&snap.timeouts)?);
        let _ = node.endpoint.set(endpoint.clone());
        let mut ready = node.conn.subscribe();
        let n = node.clone();
        tokio::spawn(async move { n.dial_loop(endpoint).await });
        ready.wait_for(Option::is_some).await?;
        Ok((node, bound))
    }

    /// Keeps a connection to the best reachable main relay, serving its inbound streams.
    async fn dial_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            for main in &self.mains {
                let Some(conn) = self.dial(&endpoint, main).await else { continue };
                backoff = Duration::from_millis(100);
                if !first {
                    self.metrics.reconnects.get_or_create(&[("kind", "main")]).inc();
                }
                first = false;
                // Register before announcing the connection, so no call races the view.
                let control = match self.register(&conn).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(main = %main.node_id, error = %e, "registration failed");
                        conn.close(0u32.into(), b"registration failed");
                        continue;
                    }
                };
                self.metrics.open_connections.inc();
                self.conn.send_replace(Some((main.node_id.clone(), conn.clone())));
                info!(main = %main.node_id, "connected to main relay");
                self.clone().serve_inbound(conn).await;
                control.abort();
                self.conn.send_replace(None);
                self.metrics.open_connections.dec();
                warn!(main = %main.node_id, "main relay connection lost; reconnecting");
                break;
            }
            // Exponential backoff with full jitter between rounds of dialing.
            let jitter = rand::random_range(0..=backoff.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn dial(&self, endpoint: &quinn::Endpoint, main: &MainRelay) -> Option<quinn::Connection> {
        let name = self.identity.server_name(&main.node_id);
        let connecting = match endpoint.connect(main.endpoint, &name) {
            Ok(c) => c,
            Err(e) => {
                warn!(main = %main.node_id, error = %e, "cannot dial main relay");
                return None;
            }
        };
        let started = Instant::now();
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(conn)) => {
                crate::transport::tls::raise_stream_limit(&conn);
                self.metrics.hop_handshake_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.hop_handshakes.get_or_create(&[("role", "client"), ("result", "ok")]).inc();
                Some(conn)
            }
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                self.metrics.hop_handshakes.get_or_create(&[("role", "client"), ("result", reason)]).inc();
                warn!(main = %main.node_id, reason, error = %e, "hop handshake failed");
                None
            }
            Err(_) => {
                self.metrics.hop_handshakes.get_or_create(&[("role", "client"), ("result", "timeout")]).inc();
                warn!(main = %main.node_id, "hop handshake timed out");
                None
            }
        }
    }

    /// Clean shutdown: closes the main relay connection, so the relay deregisters this node's
    /// services at once (everywhere), and waits for the close to be sent.
    pub async fn shutdown(&self) {
        if let Some(ep) = self.endpoint.get() {
            ep.close(0u32.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
    }

    /// Opens the control stream, registers the exported services and waits for the first
    /// view; returns the task that keeps applying views.
    async fn register(self: &Arc<Self>, conn: &quinn::Connection) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let services =
            self.exports.iter().map(|e| Service { service: e.service.clone(), port: e.port, ech: true }).collect();
        let imports = self.imports.iter().map(|(s, p)| format!("{s}:{p}")).collect();
        let register =
            Control::Register { services, noise_key: base64_encode(&self.noise.public), imports: Some(imports) };
        write_frames(&mut send, &[Frame::Control(register)]).await?;
        let first = tokio::time::timeout(self.handshake_timeout, read_frame(&mut recv))
            .await
            .map_err(|_| anyhow::anyhow!("no view from the main relay in time"))??;
        let mut parts = Vec::new();
        let mut next = first;
        loop {
            match next {
                Some(Frame::Control(Control::View { mains, entries, more })) => {
                    parts.push((mains, entries));
                    if !more {
                        break;
                    }
                }
                other => anyhow::bail!("expected a view, got {other:?}"),
            }
            next = read_frame(&mut recv).await?;
        }
        self.apply_view(std::mem::take(&mut parts));
        write_frames(&mut send, &[Frame::Control(Control::ViewAck)]).await?;
        let node = self.clone();
        Ok(tokio::spawn(async move {
            while let Ok(Some(Frame::Control(Control::View { mains, entries, more }))) = read_frame(&mut recv).await {
                parts.push((mains, entries));
                if !more {
                    node.apply_view(std::mem::take(&mut parts));
                    if write_frames(&mut send, &[Frame::Control(Control::ViewAck)]).await.is_err() {
                        break;
                    }
                }
            }
        }))
    }

    /// Installs a complete view assembled from its parts.
    fn apply_view(&self, parts: Vec<(std::collections::BTreeMap<String, MainInfo>, Vec<Entry>)>) {
        let mut mains = std::collections::BTreeMap::new();
        let mut entries = Vec::new();
        for (m, e) in parts {
            mains.extend(m);
            entries.extend(e);
        }
        self.metrics.propagation.get_or_create(&[("event", "view_received")]).inc();
        self.metrics.registry_entries.get_or_create(&[("kind", "view")]).set(entries.len() as i64);
        // Lists from the config snapshot stay as given (a stale one is repaired by retry
        // configs); the view adds the lists of main relays the snapshot does not name.
        if let Ok(mut c) = self.ech_configs.write() {
            for (main, info) in &mains {
                if !c.contains_key(main)
                    && let Some(list) = info.ech_config_list.as_deref().and_then(base64_decode)
                    && let Ok(parsed) = EchConfigList::decode(&list)
                {
                    c.insert(main.clone(), parsed);
                }
            }
        }
        if let Ok(mut b) = self.balancers.lock() {
            for bal in b.values_mut() {
                bal.retain(&entries);
            }
        }
        if let Ok(mut v) = self.view.write() {
            *v = (mains, entries);
        }
    }

    /// The destination of a stream for `import`: fixed in config, or picked from the view.
    fn resolve(&self, import: &Import, my_main: &str, exclude: &[Key]) -> Result<(Entry, bool), StreamError> {
        if let (Some(node), Some(main), Some(key)) = (&import.node, &import.main, &import.noise_public_key) {
            let e = Entry {
                service: import.service.clone(),
                port: import.port,
                node: node.clone(),
                main: main.clone(),
                noise_key: key.clone(),
                ech: true,
            };
            return Ok((e, false));
        }
        let candidates: Vec<Entry> = self
            .view
            .read()
            .map(|v| {
                v.1.iter()
                    .filter(|e| e.service == import.service && e.port == import.port && !exclude.contains(&e.key()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if candidates.is_empty() && !exclude.is_empty() {
            return Err((
                ErrorCode::NoRoute,
                format!("every instance of {}:{} failed for this call", import.service, import.port),
            ));
        }
        if candidates.is_empty() {
            self.metrics.routes.get_or_create(&[("result", "service_not_found")]).inc();
            return Err((
                ErrorCode::ServiceNotFound,
                format!("no instance of {}:{} is registered", import.service, import.port),
            ));
        }
        let algorithm = self.lb.per_service.get(&import.service).copied().unwrap_or(self.lb.default);
        let picked = self.balancers.lock().ok().and_then(|mut b| {
            let bal = b
                .entry((import.service.clone(), import.port))
                .or_insert_with(|| Balancer::new(algorithm, self.lb.prefer_local, self.breaker));
            let now = Instant::now();
            let e = bal.pick(&candidates, my_main, now, &mut rand::rng())?;
            bal.started(&e.key(), now);
            Some(e)
        });
        let Some(e) = picked else {
            self.metrics.routes.get_or_create(&[("result", "no_healthy_instance")]).inc();
            return Err((ErrorCode::CircuitOpen, format!("every instance of {} failed recently", import.service)));
        };
        self.metrics.routes.get_or_create(&[("result", "resolved")]).inc();
        self.metrics.lb_picks.get_or_create(&[("service", e.service.clone()), ("node", e.node.clone())]).inc();
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
                    .circuit_state
                    .get_or_create(&[("target", format!("{}/{}@{}", k.service, k.node, k.main))])
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

    /// Circuit breaker states of every instance this home has called, for the admin API.
    fn breaker_states(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        let Ok(mut b) = self.balancers.lock() else { return vec![] };
        b.values_mut()
            .flat_map(|bal| bal.states(now))
            .map(|(k, s)| serde_json::json!({"service": k.service, "port": k.port, "node": k.node, "main": k.main, "state": s.label()}))
            .collect()
    }

    async fn serve_inbound(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let node = self.clone();
            tokio::spawn(async move { node.inbound(send, recv).await });
        }
    }

    async fn accept_clients(self: Arc<Self>, listener: TcpListener, import: Arc<Import>) {
        loop {
            let Ok((tcp, client)) = listener.accept().await else { continue };
            let node = self.clone();
            let import = import.clone();
            let span = info_span!("outbound", %client, service = %import.service, dest = ?import.node);
            tokio::spawn(async move { node.outbound(tcp, &import).await }.instrument(span));
        }
    }

    /// Connections redirected by iptables: find the import by original destination, then take
    /// the same path as a plain-mode listener; otherwise pass through or refuse.
    async fn accept_intercepted(
        self: Arc<Self>,
        listener: TcpListener,
        by_dst: Arc<HashMap<SocketAddr, Arc<Import>>>,
        unmatched: Unmatched,
    ) {
        loop {
            let Ok((tcp, client)) = listener.accept().await else { continue };
            let node = self.clone();
            let by_dst = by_dst.clone();
            tokio::spawn(async move {
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

    async fn outbound(&self, tcp: TcpStream, import: &Import) {
        let started = Instant::now();
        let est = match tokio::time::timeout(self.handshake_timeout, self.establish(import)).await {
            Ok(r) => r,
            Err(_) => Err((ErrorCode::Timeout, "route and handshake did not finish in time".to_owned())),
        };
        match est {
            Ok(e) => {
                let ech = if e.ech { "true" } else { "false" };
                self.metrics
                    .stream_setup_seconds
                    .get_or_create(&[("ech", ech)])
                    .observe(started.elapsed().as_secs_f64());
                debug!(ech = e.ech, "session established");
                self.pump(tcp, e.send, e.recv, e.tx, e.rx, "outbound").await;
            }
            Err((code, message)) => {
                warn!(code = code.label(), message, "outbound stream failed");
                self.metrics.stream_error("outbound", code);
                reset(tcp);
            }
        }
    }

    fn ech_config_for(
        &self,
        main: &str,
    ) -> Option<(crate::protocol::EchConfig, crate::protocol::ech_config::CipherSuite)> {
        let configs = self.ech_configs.read().ok()?;
        configs.get(main)?.first_usable().map(|(c, s)| (c.clone(), s))
    }

    /// Sets up the stream for one call. A registry-resolved call whose setup fails before any
    /// payload byte is read from the client (the client's bytes are only read once the session
    /// is up) is retried on another instance, with full-jitter backoff, up to `maxAttempts`.
    async fn establish(&self, import: &Import) -> Result<Established, StreamError> {
        let backoff = crate::resilience::backoff::Backoff {
            initial: Duration::from_millis(self.retry.initial_backoff_ms),
            max: Duration::from_millis(self.retry.max_backoff_ms),
        };
        let mut tried: Vec<Key> = Vec::new();
        let mut attempt = 0u32;
        loop {
            let (main_id, conn) = self
                .conn
                .borrow()
                .clone()
                .ok_or((ErrorCode::PeerUnreachable, "no main relay connection".to_owned()))?;
            let (dest, balanced) = self.resolve(import, &main_id, &tried)?;
            let started = Instant::now();
            let result = self.establish_to(&conn, &main_id, &dest).await;
            if balanced {
                match &result {
                    Ok(_) => self.balanced_done(import, &dest.key(), Some(started.elapsed())),
                    Err((code, _)) if against_instance(*code) => self.balanced_done(import, &dest.key(), None),
                    // Refusals about the caller (rate limit, permissions, ECH policy) say
                    // nothing about the instance's health.
                    Err(_) => self.release(import, &dest.key()),
                }
            }
            attempt += 1;
            match result {
                Err((code, message)) if balanced && retryable(code) && attempt < self.retry.max_attempts.max(1) => {
                    self.metrics.retries.get_or_create(&[("code", code.label())]).inc();
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
        conn: &quinn::Connection,
        main_id: &str,
        dest: &Entry,
    ) -> Result<Established, StreamError> {
        let remote =
            decode_key32(&dest.noise_key).ok_or((ErrorCode::Internal, format!("bad Noise key for {}", dest.node)))?;
        let inner = InnerRoute {
            dest_node: dest.node.clone(),
            dest_main: dest.main.clone(),
            service: dest.service.clone(),
            port: dest.port,
            origin: format!("{}@{}", self.identity.node_id, main_id),
        };
        let decision = if dest.ech { self.policy.decide(&dest.node, &dest.main) } else { EchDecision::Plain };
        let mut retried = false;
        loop {
            let sealed = match decision {
                EchDecision::Plain => None,
                EchDecision::Opportunistic | EchDecision::Required => match self.ech_config_for(&dest.main) {
                    Some((config, suite)) => {
                        let s = seal(&config, suite, &dest.main, &inner).map_err(|e| (e.code(), e.to_string()))?;
                        self.metrics.ech.get_or_create(&[("outcome", "attempted")]).inc();
                        Some(s)
                    }
                    None if decision == EchDecision::Required => {
                        self.metrics.ech.get_or_create(&[("outcome", "failed")]).inc();
                        return Err((ErrorCode::EchRequired, format!("no usable ECH config for {}", dest.main)));
                    }
                    None => {
                        self.metrics.ech.get_or_create(&[("outcome", "fallback")]).inc();
                        None
                    }
                },
            };
            let config_id = sealed.as_ref().map(|s| s.config_id);
            let body = match sealed {
                Some(s) => RouteBody::Sealed(s),
                None => RouteBody::Plain(inner.clone()),
            };
            let header =
                RouteHeader { hop_limit: MAX_HOPS, probe: false, trace_context: String::new(), path: vec![], body };
            let prologue = prologue(config_id, &inner).map_err(|e| (e.code(), e.to_string()))?;
            let hs_started = Instant::now();
            let (init, msg1) =
                Initiator::start(&self.noise, &remote, &prologue).map_err(|e| (e.code(), e.to_string()))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| (ErrorCode::PeerUnreachable, e.to_string()))?;
            write_frames(&mut send, &[Frame::Route(header), Frame::Noise(msg1)]).await.map_err(io_err)?;
            match read_frame(&mut recv).await.map_err(io_err)? {
                Some(Frame::Noise(msg2)) => {
                    let (session, msg3) = match init.finish(&msg2) {
                        Ok(x) => x,
                        Err(e) => {
                            self.metrics.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                            return Err((e.code(), e.to_string()));
                        }
                    };
                    write_frames(&mut send, &[Frame::Noise(msg3)]).await.map_err(io_err)?;
                    self.metrics.e2e_handshakes.get_or_create(&[("result", "ok")]).inc();
                    self.metrics.e2e_handshake_seconds.observe(hs_started.elapsed().as_secs_f64());
                    if config_id.is_some() {
                        self.metrics.ech.get_or_create(&[("outcome", "accepted")]).inc();
                    }
                    let (tx, rx) = session.split();
                    return Ok(Established { send, recv, tx, rx, ech: config_id.is_some() });
                }
                Some(Frame::RetryConfigs(list)) if config_id.is_some() && !retried => {
                    let parsed =
                        EchConfigList::decode(&list).map_err(|e| (ErrorCode::MalformedFrame, e.to_string()))?;
                    info!(main = %dest.main, "ECH config was stale: retrying once with the relay's retry configs");
                    self.metrics.ech.get_or_create(&[("outcome", "retried")]).inc();
                    if let Ok(mut c) = self.ech_configs.write() {
                        c.insert(dest.main.clone(), parsed);
                    }
                    retried = true;
                }
                Some(Frame::Error(e)) => {
                    if config_id.is_some() {
                        self.metrics.ech.get_or_create(&[("outcome", "failed")]).inc();
                    }
                    if e.code == ErrorCode::HandshakeFailed {
                        self.metrics.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                    }
                    return Err((e.code, e.message));
                }
                Some(other) => {
                    return Err((ErrorCode::MalformedFrame, format!("unexpected frame {other:?}")));
                }
                None => return Err((ErrorCode::PeerUnreachable, "stream closed before the handshake".to_owned())),
            }
        }
    }

    async fn inbound(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let first = tokio::time::timeout(self.handshake_timeout, read_frame(&mut recv)).await;
        let (config_id, route, probe_path) = match first {
            Ok(Ok(Some(Frame::Route(RouteHeader { body: RouteBody::Plain(r), probe, path, .. })))) => {
                (None, r, probe.then_some(path))
            }
            Ok(Ok(Some(Frame::Route(RouteHeader {
                body: RouteBody::Opened { config_id, route },
                probe,
                path,
                ..
            })))) => (Some(config_id), route, probe.then_some(path)),
            Ok(Ok(Some(_))) => {
                return self.refuse(&mut send, ErrorCode::MalformedFrame, "expected an opened ROUTE").await;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return self.refuse(&mut send, ErrorCode::MalformedFrame, &e.to_string()).await,
            Err(_) => return self.refuse(&mut send, ErrorCode::Timeout, "no route header in time").await,
        };
        let span = info_span!("inbound", service = %route.service, origin = %route.origin, ech = config_id.is_some());
        async {
            if route.dest_node != self.identity.node_id {
                return self.refuse(&mut send, ErrorCode::NoRoute, "stream is for another node").await;
            }
            let Some(export) = self.exports.iter().find(|e| e.service == route.service && e.port == route.port) else {
                return self.refuse(&mut send, ErrorCode::ServiceNotFound, "service not exported here").await;
            };
            if let Some(path) = probe_path {
                let mut hops: Vec<TraceHop> =
                    path.into_iter().map(|p| TraceHop { node: p.node, at_ms: p.at_ms }).collect();
                hops.push(TraceHop { node: self.identity.node_id.clone(), at_ms: super::main_relay::now_ms() });
                let _ = write_frames(&mut send, &[Frame::Control(Control::TraceResult { hops })]).await;
                let _ = send.finish();
                return;
            }
            let msg1 = match read_frame(&mut recv).await {
                Ok(Some(Frame::Noise(m))) => m,
                _ => return self.refuse(&mut send, ErrorCode::MalformedFrame, "expected Noise message 1").await,
            };
            let responder = prologue(config_id, &route).and_then(|p| Responder::accept(&self.noise, &p, &msg1));
            let (responder, msg2) = match responder {
                Ok(x) => x,
                Err(e) => {
                    self.metrics.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                    return self.refuse(&mut send, ErrorCode::HandshakeFailed, &e.to_string()).await;
                }
            };
            let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(export.target)).await {
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
            let session = match read_frame(&mut recv).await {
                Ok(Some(Frame::Noise(msg3))) => responder.finish(&msg3),
                _ => return self.refuse(&mut send, ErrorCode::MalformedFrame, "expected Noise message 3").await,
            };
            match session {
                Ok((session, _initiator_static)) => {
                    let (tx, rx) = session.split();
                    self.pump(tcp, send, recv, tx, rx, "inbound").await;
                }
                Err(e) => {
                    self.metrics.e2e_handshakes.get_or_create(&[("result", "failed")]).inc();
                    self.refuse(&mut send, ErrorCode::HandshakeFailed, &e.to_string()).await;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Path-trace probe to one instance of `service:port`: the route taken, with the time
    /// each relay forwarded it and the destination received it.
    pub async fn trace(&self, service: &str, port: u16) -> serde_json::Value {
        use serde_json::json;
        let Some((main_id, conn)) = self.conn.borrow().clone() else {
            return json!({"error": "PEER_UNREACHABLE", "message": "no main relay connection"});
        };
        let import = Import {
            service: service.to_owned(),
            port,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            node: None,
            main: None,
            noise_public_key: None,
            cluster_ip: None,
        };
        let dest = match self.resolve(&import, &main_id, &[]) {
            Ok((d, balanced)) => {
                if balanced {
                    // A probe says nothing about the instance's latency: release it neutrally.
                    self.release(&import, &d.key());
                }
                d
            }
            Err((code, message)) => return json!({"error": code.label(), "message": message}),
        };
        let inner = InnerRoute {
            dest_node: dest.node.clone(),
            dest_main: dest.main.clone(),
            service: service.to_owned(),
            port,
            origin: format!("{}@{}", self.identity.node_id, main_id),
        };
        let sent = super::main_relay::now_ms();
        let started = Instant::now();
        let header = RouteHeader {
            hop_limit: MAX_HOPS,
            probe: true,
            trace_context: String::new(),
            path: vec![],
            body: RouteBody::Plain(inner),
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
        match tokio::time::timeout(self.handshake_timeout, result).await {
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

    /// JSON for the admin API (`/federation/health|peers|registry`).
    pub fn admin_json(&self, path: &str) -> Option<serde_json::Value> {
        use serde_json::json;
        let main = self.conn.borrow().as_ref().map(|(m, c)| (m.clone(), c.rtt()));
        let (mains, entries) = self.view.read().ok()?.clone();
        match path {
            "/federation/health" => {
                let mut services: Vec<String> = entries.iter().map(|e| format!("{}:{}", e.service, e.port)).collect();
                services.sort();
                services.dedup();
                Some(json!({
                    "status": if main.is_some() { "ok" } else { "disconnected" },
                    "node": self.identity.node_id,
                    "role": "home",
                    "mainRelay": main.as_ref().map(|m| m.0.clone()),
                    "connectedPeers": usize::from(main.is_some()),
                    "exports": self.exports.iter().map(|e| format!("{}:{}", e.service, e.port)).collect::<Vec<_>>(),
                    "services": services.len(),
                    "averageLatencyMillis": main.as_ref().map(|m| m.1.as_secs_f64() * 1e3),
                    "circuits": self.breaker_states(),
                    "errors": self.metrics.error_counts(),
                }))
            }
            "/federation/peers" => Some(json!(
                self.mains
                    .iter()
                    .map(|m| json!({
                        "node": m.node_id, "endpoint": m.endpoint.to_string(), "priority": m.priority,
                        "state": if main.as_ref().is_some_and(|c| c.0 == m.node_id) { "up" } else { "standby" },
                        "rttMillis": main.as_ref().filter(|c| c.0 == m.node_id).map(|c| c.1.as_secs_f64() * 1e3),
                    }))
                    .collect::<Vec<_>>()
            )),
            "/federation/registry" => Some(json!({"node": self.identity.node_id, "mains": mains, "entries": entries})),
            _ => None,
        }
    }

    async fn refuse(&self, send: &mut quinn::SendStream, code: ErrorCode, message: &str) {
        warn!(code = code.label(), message, "inbound stream refused");
        self.metrics.stream_error("inbound", code);
        send_error(send, code, message).await;
        let _ = send.finish();
    }

    /// Carries bytes between a TCP socket and a stream of Noise transport messages.
    async fn pump(
        &self,
        tcp: TcpStream,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut tx: SendHalf,
        mut rx: RecvHalf,
        direction: &'static str,
    ) {
        let _ = tcp.set_nodelay(true);
        let (mut tr, mut tw) = tcp.into_split();
        // Last payload in either direction (ms since `epoch`), for the stream idle timeout.
        let epoch = Instant::now();
        let last = std::sync::atomic::AtomicU64::new(0);
        let touch = || last.store(epoch.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        let up = async {
            let mut buf = vec![0u8; MAX_PLAINTEXT];
            let mut total = 0u64;
            loop {
                let n = match tr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                touch();
                let Ok(ct) = tx.encrypt(&buf[..n]) else { return Err(ErrorCode::Internal) };
                if write_frames(&mut send, &[Frame::Noise(ct)]).await.is_err() {
                    return Err(ErrorCode::PeerUnreachable);
                }
                total += n as u64;
            }
            let _ = send.finish();
            Ok(total)
        };
        let down = async {
            let mut total = 0u64;
            loop {
                match read_frame(&mut recv).await {
                    Ok(Some(Frame::Noise(m))) => {
                        touch();
                        let Ok(pt) = rx.decrypt(&m) else { return Err(ErrorCode::HandshakeFailed) };
                        if tw.write_all(&pt).await.is_err() {
                            return Err(ErrorCode::TargetUnreachable);
                        }
                        total += pt.len() as u64;
                    }
                    Ok(Some(Frame::Error(e))) => return Err(e.code),
                    Ok(Some(_)) => return Err(ErrorCode::MalformedFrame),
                    Ok(None) => break,
                    Err(_) => return Err(ErrorCode::PeerUnreachable),
                }
            }
            let _ = tw.shutdown().await;
            Ok(total)
        };
        let idle = self.stream_idle;
        let watchdog = async {
            loop {
                let since = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed)));
                if since >= idle {
                    return;
                }
                tokio::time::sleep(idle - since).await;
            }
        };
        let (u, d) = tokio::select! {
            r = async { tokio::join!(up, down) } => r,
            () = watchdog => {
                warn!(code = ErrorCode::Timeout.label(), idle_ms = idle.as_millis() as u64, "stream idle: closed");
                self.metrics.stream_error(direction, ErrorCode::Timeout);
                return;
            }
        };
        let (tx_dir, rx_dir) = if direction == "outbound" { ("tx", "rx") } else { ("rx", "tx") };
        if let Ok(n) = u {
            self.metrics.bytes.get_or_create(&[("direction", tx_dir)]).inc_by(n);
        }
        if let Ok(n) = d {
            self.metrics.bytes.get_or_create(&[("direction", rx_dir)]).inc_by(n);
        }
        match u.and(d) {
            Ok(_) => {
                self.metrics.streams.get_or_create(&[("direction", direction), ("result", "ok")]).inc();
            }
            Err(code) => {
                warn!(code = code.label(), "stream aborted");
                self.metrics.stream_error(direction, code);
            }
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
        ErrorCode::PeerUnreachable | ErrorCode::NoRoute | ErrorCode::TargetUnreachable | ErrorCode::CircuitOpen
    )
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
