//! A main relay's decisions, as pure functions: who may connect, what a stream's first frame
//! means, the ordered admission checks (rate limit, hop limit, loop), ECH opening, the origin
//! and permission checks, and where the stream goes next. No I/O and no locks: the relay
//! (`relay/mod.rs`) reads its state, calls these, and carries out the [`Decision`] with QUIC
//! writes and metrics. Every refusal code a relay answers with is decided here and tested
//! here, without a process.

use std::time::{Duration, SystemTime};

use super::live::MainLive;
use crate::config::{Permissions, TrustLevel};
use crate::crypto::ech::{EchError, EchKeySet};
use crate::protocol::control::Control;
use crate::protocol::route::{PathEntry, RouteBody, RouteHeader};
use crate::protocol::{DecodeError, ErrorCode, Frame};
use crate::resilience::rate_limit::Limit;
use crate::transport::io::FrameIoError;

/// Who sent a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Sender {
    /// One of our home nodes.
    Home(String),
    /// A peer main relay.
    Peer(String),
}

/// Why a stream is refused: the code and message of the ERROR frame, and the trust rule that
/// refused it (for the denial counter), if one did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) rule: Option<&'static str>,
    /// When the sender may try again (rate limiting).
    pub(crate) retry_after: Option<Duration>,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), rule: None, retry_after: None }
    }
}

/// Path-trace probes a sender may start, per second and in a burst (its own bucket).
pub const PROBE_LIMIT: Limit = Limit { rate: 5.0, burst: 10.0 };

/// The rules that refuse a connection from `node` before any stream: a blocked peer, or an
/// unknown node while unknown nodes are rejected.
pub(crate) fn refuse_connection(live: &MainLive, node: &str) -> Option<&'static str> {
    match live.peers.get(node) {
        Some(p) if p.trust_level == TrustLevel::Blocked => Some("blocked"),
        Some(p) if p.trust_level == TrustLevel::Unknown && live.trust.reject_unknown => Some("reject_unknown"),
        Some(_) => None,
        None if live.trust.reject_unknown && !live.trust.known_nodes.iter().any(|k| k == node) => {
            Some("reject_unknown")
        }
        None => None,
    }
}

/// Whether a registry entry from `peer` names one of this federation's nodes (its home or
/// its main relay) although `peer` is a relay of another trust domain: node ids are chosen
/// by each organisation, so two may pick the same one, and such an entry would make calls
/// meant for our node go to the partner's, or the reverse. Such entries are dropped at the
/// boundary (`trust_denials{rule="node_id_collision"}`).
pub(crate) fn collides(live: &MainLive, peer: &str, entry: &crate::federation::registry::Entry) -> bool {
    let ours = |n: &str| live.trust.known_nodes.iter().any(|k| k == n);
    live.peers.get(peer).is_some_and(|p| p.pin.is_some()) && (ours(&entry.node) || ours(&entry.main))
}

/// The permissions peer `peer` has by its trust level.
pub(crate) fn permissions_of(live: &MainLive, peer: &str) -> Permissions {
    let all = || Permissions { call: vec!["*".into()], export: vec!["*".into()] };
    match live.peers.get(peer) {
        Some(p) => match p.trust_level {
            TrustLevel::Trusted => p.permissions.clone().unwrap_or_else(all),
            TrustLevel::Verified => p.permissions.clone().unwrap_or_else(|| live.trust.default_permissions.clone()),
            TrustLevel::Unknown => live.trust.default_permissions.clone(),
            TrustLevel::Blocked => Permissions::default(),
        },
        None => Permissions::default(),
    }
}

/// What a stream's first frame asks for.
#[derive(Debug)]
pub(crate) enum FirstFrame {
    /// A route: run [`route`].
    Route(RouteHeader),
    /// The sender's control stream.
    Control(Control),
    /// The sender closed the stream without a frame: nothing to answer.
    Closed,
    /// Answer with an error.
    Refuse(Refusal),
}

/// Classifies the result of reading a stream's first frame (`None`: not in time).
pub(crate) fn first_frame(read: Option<Result<Option<Frame>, FrameIoError>>) -> FirstFrame {
    match read {
        None => FirstFrame::Refuse(Refusal::new(ErrorCode::Timeout, "no route header in time")),
        Some(Ok(Some(Frame::Route(h)))) => FirstFrame::Route(h),
        Some(Ok(Some(Frame::Control(c)))) => FirstFrame::Control(c),
        Some(Ok(Some(_))) => {
            FirstFrame::Refuse(Refusal::new(ErrorCode::MalformedFrame, "first frame must be ROUTE or CONTROL"))
        }
        Some(Ok(None)) => FirstFrame::Closed,
        Some(Err(FrameIoError::Decode(DecodeError::UnsupportedVersion { field, version }))) => {
            FirstFrame::Refuse(Refusal::new(
                ErrorCode::UnsupportedVersion,
                format!("{field} version {version} is not supported (this relay speaks 1)"),
            ))
        }
        Some(Err(e)) => FirstFrame::Refuse(Refusal::new(ErrorCode::MalformedFrame, e.to_string())),
    }
}

/// The token bucket a new stream from `sender` draws on: its key, its kind (metric label)
/// and its limit; `None` when no limit applies. Path-trace probes have buckets of their own
/// ([`PROBE_LIMIT`]), so a probe flood never uses up a sender's real quota.
pub(crate) fn rate_bucket(live: &MainLive, sender: &Sender, probe: bool) -> Option<(String, &'static str, Limit)> {
    let (key, kind, lim) = match sender {
        Sender::Home(h) if probe => (format!("probe:{h}"), "probe", Some(PROBE_LIMIT)),
        Sender::Peer(p) if probe => (format!("probe:peer:{p}"), "probe", Some(PROBE_LIMIT)),
        Sender::Home(h) => (h.clone(), "home", live.default_rate),
        Sender::Peer(p) => (
            format!("peer:{p}"),
            "peer",
            live.peers.get(p).and_then(|c| c.rate_limit.as_ref()).map(super::limit).or(live.default_rate),
        ),
    };
    Some((key, kind, lim?))
}

/// The refusal of a rate-limited stream.
pub(crate) fn rate_limited(retry_after: Duration) -> Refusal {
    Refusal {
        retry_after: Some(retry_after.max(Duration::from_millis(1))),
        ..Refusal::new(ErrorCode::RateLimited, "too many new streams from this sender")
    }
}

/// What the relay does with a routed stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Answer with an ERROR frame.
    Refuse(Refusal),
    /// Answer with this relay's ECHConfigList (the sealing used an unknown config id).
    RetryConfigs(Vec<u8>),
    /// Open a stream to peer main relay `peer` with `header`, and splice.
    Forward { peer: String, header: RouteHeader },
    /// Open a stream to our home node `home` with `header`, and splice.
    Deliver { home: String, header: RouteHeader },
}

/// What happened to an ECH-sealed route here (`relayfed_relay_ech_streams_total` outcome label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EchOutcome {
    /// Opened with one of our keys.
    Opened,
    /// Unknown config id: retry configs sent.
    RetrySent,
    /// Did not open.
    DecryptFailed,
}

impl EchOutcome {
    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            EchOutcome::Opened => "opened",
            EchOutcome::RetrySent => "retry_sent",
            EchOutcome::DecryptFailed => "decrypt_failed",
        }
    }
}

/// What a routing decision reads besides the header.
pub(crate) struct RouteContext<'a> {
    /// This relay's node id.
    pub(crate) me: &'a str,
    /// Live settings (peers, trust, permissions).
    pub(crate) live: &'a MainLive,
    /// This relay's ECH keys, if it has any.
    pub(crate) keys: Option<&'a EchKeySet>,
    /// Whether home node `id` is connected here now.
    pub(crate) home_connected: &'a dyn Fn(&str) -> bool,
    /// Wall clock (ECH key validity, the path entry's timestamp).
    pub(crate) now: SystemTime,
}

/// Admission after the rate limit, in order: hop limit, then loop.
pub(crate) fn admit(header: &RouteHeader, me: &str) -> Result<(), Refusal> {
    if header.hop_limit == 0 {
        return Err(Refusal::new(ErrorCode::HopLimitExceeded, "hop limit reached"));
    }
    if header.path.iter().any(|p| p.node == me) {
        return Err(Refusal::new(ErrorCode::LoopDetected, "stream already passed this relay"));
    }
    Ok(())
}

/// Decides where a routed stream goes (after the rate limit): admission, ECH opening, origin
/// authenticity, the peer's call permission, then forward or deliver.
pub(crate) fn route(sender: &Sender, header: RouteHeader, ctx: &RouteContext<'_>) -> (Decision, Option<EchOutcome>) {
    let me = ctx.me;
    if let Err(r) = admit(&header, me) {
        return (Decision::Refuse(r), None);
    }
    let at_ms = ctx.now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut path = header.path;
    path.push(PathEntry { node: me.to_owned(), at_ms });
    let (hop_limit, probe) = (header.hop_limit - 1, header.probe);
    // The next hop's header takes this one's path and trace context (one decision per stream:
    // built at most once).
    let mut carried = Some((header.trace_context, path));
    let mut next = |body: RouteBody, grease| {
        let (trace_context, path) = carried.take().unwrap_or_default();
        RouteHeader { hop_limit, probe, trace_context, path, body, grease }
    };
    let refuse = |code, msg: &str| Decision::Refuse(Refusal::new(code, msg));
    let (binding, route, ech) = match header.body {
        RouteBody::Plain(r) => (None, r, None),
        RouteBody::Opened { .. } => {
            return (refuse(ErrorCode::MalformedFrame, "only the key owner sends opened headers"), None);
        }
        // Not ours to open: forward by the outer header to the relay that owns the key.
        RouteBody::Sealed(sealed) if sealed.main != me => {
            let peer = sealed.main.clone();
            return (Decision::Forward { peer, header: next(RouteBody::Sealed(sealed), None) }, None);
        }
        RouteBody::Sealed(sealed) => {
            let Some(keys) = ctx.keys else {
                return (refuse(ErrorCode::EchDecryptFailed, "this relay has no ECH keys"), None);
            };
            match keys.open_bound(&sealed, ctx.now) {
                Ok((r, binding)) => (Some(binding), r, Some(EchOutcome::Opened)),
                Err(EchError::UnknownConfig(_)) => {
                    let list = keys.config_list().unwrap_or_default();
                    return (Decision::RetryConfigs(list), Some(EchOutcome::RetrySent));
                }
                Err(e) => {
                    return (Decision::Refuse(Refusal::new(e.code(), e.to_string())), Some(EchOutcome::DecryptFailed));
                }
            }
        }
    };
    if binding.is_none()
        && route.dest_main == me
        && let Some(g) = &header.grease
        && let Some(keys) = ctx.keys
    {
        // The work of an open, so the answer to a greased stream is not faster than to a
        // sealed one (protocol §5.6).
        keys.current().open_grease(me, g);
    }
    let (origin_node, origin_main) = route.origin.split_once('@').unwrap_or((route.origin.as_str(), ""));
    let authentic = match sender {
        Sender::Home(h) => origin_node == h && origin_main == me,
        Sender::Peer(p) => origin_main == p,
    };
    if !authentic {
        return (refuse(ErrorCode::PermissionDenied, "origin does not match the authenticated sender"), ech);
    }
    if let Sender::Peer(p) = sender
        && route.dest_main == me
        && !Permissions::matches(&permissions_of(ctx.live, p).call, &route.service)
    {
        let r = Refusal {
            rule: Some("call_permission"),
            ..Refusal::new(ErrorCode::PermissionDenied, "the peer may not call this service")
        };
        return (Decision::Refuse(r), ech);
    }
    if route.dest_main != me {
        if matches!(sender, Sender::Peer(_)) {
            return (refuse(ErrorCode::NoRoute, "a peer sent a stream for a third relay"), ech);
        }
        let peer = route.dest_main.clone();
        // GREASE is passed on unchanged: the header stays as long as a sealed one.
        return (Decision::Forward { peer, header: next(RouteBody::Plain(route), header.grease) }, ech);
    }
    if !(ctx.home_connected)(&route.dest_node) {
        return (refuse(ErrorCode::NoRoute, "destination home node is not connected"), ech);
    }
    let home = route.dest_node.clone();
    let body = match binding {
        None => RouteBody::Plain(route),
        Some(binding) => RouteBody::Opened { binding, route },
    };
    (Decision::Deliver { home, header: next(body, header.grease) }, ech)
}

/// The link to a peer a stream is forwarded to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerLink {
    /// Connected now.
    Connected,
    /// A configured peer, not connected.
    Down,
    /// Not a peer of this relay.
    NotAPeer,
}

/// Whether a stream may be forwarded to `peer`: its circuit breaker allows it and a link is up.
pub(crate) fn forward_check(peer: &str, circuit_allows: bool, link: PeerLink) -> Result<(), Refusal> {
    if !circuit_allows {
        return Err(Refusal::new(ErrorCode::CircuitOpen, format!("circuit to {peer} is open")));
    }
    match link {
        PeerLink::Connected => Ok(()),
        PeerLink::Down => {
            Err(Refusal::new(ErrorCode::PeerUnreachable, format!("peer main relay {peer} is not connected")))
        }
        PeerLink::NotAPeer => Err(Refusal::new(ErrorCode::NoRoute, format!("{peer} is not a peer of this relay"))),
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
