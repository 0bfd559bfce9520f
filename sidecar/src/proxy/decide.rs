//! A home's decisions, as pure functions: which instances a call may go to, whether a route
//! is sealed, what the answer to a setup means, and whether an inbound stream is for us. The
//! I/O around them (`outbound.rs`, `inbound.rs`) reads state, calls these and carries out the
//! result; every refusal code a home decides on is tested here, without a process.

use crate::config::{Export, Import};
use crate::federation::ech_policy::EchDecision;
use crate::federation::registry::{Entry, Key, current_registrations};
use crate::protocol::route::{CONFIG_DIGEST_LEN, EchBinding, InnerRoute, PathEntry, RouteBody, RouteHeader};
use crate::protocol::{ErrorCode, Frame};
use crate::transport::io::FrameIoError;

use super::StreamError;

/// Where a call for an import may go.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Candidates {
    /// The import names its destination (node, relay and Noise key from the snapshot).
    Fixed(Entry),
    /// The current registrations of the service not yet tried in this call, for the balancer.
    Pick(Vec<Entry>),
}

/// The destinations a call for `import` may use, given the view's entries and the instances
/// `tried` (and failed) in this call.
pub(super) fn plan_call(import: &Import, view: &[Entry], tried: &[Key]) -> Result<Candidates, StreamError> {
    if let (Some(node), Some(main), Some(key)) = (&import.node, &import.main, &import.noise_public_key) {
        return Ok(Candidates::Fixed(Entry {
            service: import.service.clone(),
            port: import.port,
            node: node.clone(),
            main: main.clone(),
            noise_key: key.clone(),
            ech: true,
            standby: false,
            attached: 0,
        }));
    }
    let offered: Vec<Entry> = view
        .iter()
        .filter(|e| e.service == import.service && e.port == import.port && !tried.contains(&e.key()))
        .cloned()
        .collect();
    // One registration per home: where it is active now (or its standby, while the active
    // one's relay is out of reach or the instance there failed this call).
    let candidates = current_registrations(offered);
    match (candidates.is_empty(), tried.is_empty()) {
        (true, false) => Err((
            ErrorCode::NoRoute,
            format!("every instance of {}:{} failed for this call", import.service, import.port),
        )),
        (true, true) => Err((
            ErrorCode::ServiceNotFound,
            format!("no instance of {}:{} is registered", import.service, import.port),
        )),
        (false, _) => Ok(Candidates::Pick(candidates)),
    }
}

/// The refusal when the balancer finds every candidate's circuit open.
pub(super) fn no_healthy_instance(service: &str) -> StreamError {
    (ErrorCode::CircuitOpen, format!("every instance of {service} failed recently"))
}

/// How a route header goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sealing {
    /// Sealed with the relay's ECH config.
    Seal,
    /// Plain by policy (with a GREASE envelope where the policy's mode asks for one).
    Plain,
    /// Plain because the relay publishes no ECH config (opportunistic mode only).
    Fallback,
}

/// How to send a route under `decision` when the destination relay `has_config` or not.
pub(super) fn sealing(decision: EchDecision, has_config: bool, main: &str) -> Result<Sealing, StreamError> {
    match (decision, has_config) {
        (EchDecision::Plain, _) => Ok(Sealing::Plain),
        (_, true) => Ok(Sealing::Seal),
        (EchDecision::Opportunistic, false) => Ok(Sealing::Fallback),
        (EchDecision::Required, false) => Err((ErrorCode::EchRequired, format!("no usable ECH config for {main}"))),
    }
}

/// What the answer to a stream setup means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// Noise message 2: finish the handshake.
    Noise(Vec<u8>),
    /// The relay did not know the sealing's config, and the snapshot has a newer one: seal
    /// again with it (once).
    RetryWithNewerConfig,
    /// The setup failed.
    Failed(StreamError),
}

/// Reads the first frame answering a setup. `sealed_with`: the binding of the sealing used
/// (none: plain); `snapshot_digest`: the digest of the relay's config in the snapshot now;
/// `retried`: this call already retried once. Retry configs come through relays, which could
/// put a key of their own in them: they are never used, only taken as word that the config
/// was stale.
pub(super) fn answer(
    frame: Option<Frame>,
    main: &str,
    sealed_with: Option<&EchBinding>,
    snapshot_digest: Option<[u8; CONFIG_DIGEST_LEN]>,
    retried: bool,
) -> Answer {
    match frame {
        Some(Frame::Noise(msg2)) => Answer::Noise(msg2),
        Some(Frame::RetryConfigs(_)) if let Some(used) = sealed_with => {
            if !retried && snapshot_digest.is_some_and(|d| d != used.config_digest) {
                return Answer::RetryWithNewerConfig;
            }
            Answer::Failed((
                ErrorCode::EchUnknownConfig,
                format!(
                    "{main} does not accept ECH config {} and the config snapshot has no other; retry configs from the path are not trusted",
                    used.config_id
                ),
            ))
        }
        Some(Frame::Error(e)) => Answer::Failed((e.code, e.message)),
        Some(other) => Answer::Failed((ErrorCode::MalformedFrame, format!("unexpected frame {other:?}"))),
        None => Answer::Failed((ErrorCode::PeerUnreachable, "stream closed before the handshake".to_owned())),
    }
}

/// An inbound stream this home accepts.
#[derive(Debug)]
pub(super) struct Inbound {
    /// The ECH sealing the origin used (opened by our relay), if any.
    pub(super) binding: Option<EchBinding>,
    /// The route.
    pub(super) route: InnerRoute,
    /// For a path-trace probe, the relays it passed.
    pub(super) probe_path: Option<Vec<PathEntry>>,
    /// The export it is for.
    pub(super) export: Export,
}

/// Whether an inbound stream (its first frame as read; `None`: not in time) is for this home
/// `me` and one of its `exports`. `Err(None)`: closed without a frame, nothing to answer.
pub(super) fn inbound_route(
    read: Option<Result<Option<Frame>, FrameIoError>>,
    me: &str,
    exports: &[Export],
) -> Result<Inbound, Option<StreamError>> {
    let refuse = |code, msg: &str| Err(Some((code, msg.to_owned())));
    let (binding, route, probe_path) = match read {
        None => return refuse(ErrorCode::Timeout, "no route header in time"),
        Some(Ok(None)) => return Err(None),
        Some(Err(e)) => return Err(Some((ErrorCode::MalformedFrame, e.to_string()))),
        Some(Ok(Some(Frame::Route(RouteHeader { body, probe, path, .. })))) => match body {
            RouteBody::Plain(r) => (None, r, probe.then_some(path)),
            RouteBody::Opened { binding, route } => (Some(binding), route, probe.then_some(path)),
            RouteBody::Sealed(_) => return refuse(ErrorCode::MalformedFrame, "expected an opened ROUTE"),
        },
        Some(Ok(Some(_))) => return refuse(ErrorCode::MalformedFrame, "expected an opened ROUTE"),
    };
    if route.dest_node != me {
        return refuse(ErrorCode::NoRoute, "stream is for another node");
    }
    let Some(export) = exports.iter().find(|e| e.service == route.service && e.port == route.port) else {
        return refuse(ErrorCode::ServiceNotFound, "service not exported here");
    };
    Ok(Inbound { binding, route, probe_path, export: export.clone() })
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
