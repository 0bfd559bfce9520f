//! A dishonest first relay for the hostile-input tests: it terminates a home's hop connection
//! with the main relay's own certificate and key (so to the home it *is* that relay), dials the
//! real relay with the home's identity, and passes everything through except what its
//! [`Attack`] changes. The honest relay behind it routes as usual, so together they behave as
//! a main relay whose operator is hostile. It records every inner route it could read.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use relayfed_sidecar::config::{Snapshot, Timeouts};
use relayfed_sidecar::crypto::ech::{EchKeyPair, config_digest, seal};
use relayfed_sidecar::crypto::noise::{Responder, StaticKeypair, prologue};
use relayfed_sidecar::protocol::control::Control;
use relayfed_sidecar::protocol::ech_config::{CipherSuite, ListEntry};
use relayfed_sidecar::protocol::route::EchBinding;
use relayfed_sidecar::protocol::{EchConfig, EchConfigList, Frame, InnerRoute, RouteBody};
use relayfed_sidecar::transport::io::{read_frame, write_frames};
use relayfed_sidecar::transport::tls::HopIdentity;
use relayfed_sidecar::transport::tls::QuicIdentity;

/// What the dishonest relay does to the home's streams.
#[derive(Clone, Debug)]
pub enum Attack {
    /// Nothing: passes every stream on and records what it sees (route kinds and lengths).
    Observe,
    /// Answers the first sealed stream with RETRY_CONFIGS naming a key of its own under the
    /// destination relay's config id; opens every later route sealed to that key, reads it,
    /// re-seals it to the real key and forwards it (the attack of issue 17).
    ForgeRetryConfigs,
    /// Removes every ECHConfigList from the views it passes to the home.
    OmitConfigs,
    /// Replaces the ECH config of main relay `main` in every view with `list` and `signature`
    /// (base64): a key of its own with whatever signature it can find (§5.7).
    SubstituteSignedConfig {
        /// The main relay whose config it replaces.
        main: String,
        /// Its own ECHConfigList.
        list: String,
        /// The signature it shows.
        signature: String,
    },
    /// Rewrites the config id of every sealed route.
    ReplaceConfigId,
    /// Replaces every sealed route with `route` sealed afresh to the destination relay's key
    /// (what it forwards after reading a route it should not have read).
    Reseal(InnerRoute),
    /// Flips a bit of every sealed payload it forwards (an on-path attacker before the key
    /// owner).
    FlipSealed,
    /// In front of a destination home: delivers every opened route as plain, hiding that ECH
    /// was used (a downgrade by the key owner's side).
    StripOpened,
    /// Puts a Noise key of its own in every view entry and answers every stream as the
    /// destination: Noise responder for `route` (which it guesses from the registry), showing
    /// `cert` (the destination's real certificate, which is not secret) in message 2.
    SubstituteNoiseKey {
        /// The route it expects streams to carry.
        route: InnerRoute,
        /// The certificate it shows.
        cert: Vec<u8>,
    },
}

/// What the dishonest relay learnt and did.
#[derive(Debug, Default)]
pub struct Seen {
    /// Inner routes it read: plain ones, and sealed ones it could open.
    pub routes_read: AtomicU32,
    /// Sealed routes it could not open.
    pub sealed_unread: AtomicU32,
    /// Forged RETRY_CONFIGS frames sent.
    pub forged_retries: AtomicU32,
    /// Routes it re-sealed or rewrote before forwarding.
    pub rewritten: AtomicU32,
    /// End-to-end handshakes it completed as a fake destination.
    pub handshakes: AtomicU32,
    /// Payload messages it decrypted.
    pub payload_read: AtomicU32,
    /// Each route header it passed: its kind (`plain`, `grease`, `sealed`, `opened`) and
    /// encoded length.
    pub routes: std::sync::Mutex<Vec<(&'static str, usize)>>,
}

impl Seen {
    /// Reads a counter.
    pub fn get(c: &AtomicU32) -> u32 {
        c.load(Ordering::SeqCst)
    }
}

/// A running dishonest relay.
pub struct Mitm {
    /// Where the home should dial (its snapshot's main relay endpoint).
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ctx {
    attack: Attack,
    seen: Arc<Seen>,
    /// Its own ECH key (forged into retry configs).
    own: EchKeyPair,
    /// The destination relay's real config and a suite of it (for re-sealing), if it has one.
    real: Option<(EchConfig, CipherSuite)>,
    /// Main relay the destination relay is (the sealed routes' outer `main`).
    dest_main: String,
    /// Its own Noise key (substituted into views).
    noise: StaticKeypair,
}

impl Mitm {
    /// Starts in front of the main relay `relay` (its snapshot: certificate and key), relaying
    /// to `upstream` as the home `home` (its snapshot); `dest_list` is the destination relay
    /// `dest_main`'s real ECHConfigList, if it has ECH keys.
    pub async fn start(
        relay: &Snapshot,
        home: &Snapshot,
        upstream: SocketAddr,
        dest_main: &str,
        dest_list: Option<&[u8]>,
        attack: Attack,
    ) -> Mitm {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let as_relay = HopIdentity::load(relay).unwrap();
        let as_home = HopIdentity::load(home).unwrap();
        let timeouts = Timeouts::default();
        let server =
            quinn::Endpoint::server(as_relay.server_config(&timeouts).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(as_home.client_config(&timeouts).unwrap());
        let real = dest_list.map(|l| {
            let list = EchConfigList::decode(l).unwrap();
            let (config, suite) = list.first_usable().unwrap();
            (config.clone(), suite)
        });
        let (id, name) =
            real.as_ref().map_or((1, "relay.test.example".to_owned()), |(c, _)| (c.config_id, c.public_name.clone()));
        let own = EchKeyPair::generate(id, &name).unwrap();
        let seen = Arc::new(Seen::default());
        let noise = StaticKeypair::generate().unwrap();
        let ctx = Arc::new(Ctx { attack, seen: seen.clone(), own, real, dest_main: dest_main.to_owned(), noise });
        let addr = server.local_addr().unwrap();
        let name = as_home.server_name(&relay.node.id);
        let task = tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let Ok(down) = incoming.await else { continue };
                let Ok(up) = client.connect(upstream, &name).unwrap().await else { continue };
                relayfed_sidecar::transport::tls::raise_stream_limit(&down);
                tokio::spawn(serve(ctx.clone(), down, up));
            }
        });
        Mitm { addr, seen, task }
    }
}

/// Passes the home's streams (down) to the relay (up) and the relay's to the home.
async fn serve(ctx: Arc<Ctx>, down: quinn::Connection, up: quinn::Connection) {
    let (d, u) = (down.clone(), up.clone());
    let strip = matches!(ctx.attack, Attack::StripOpened);
    let inbound = tokio::spawn(async move {
        while let Ok((send, mut recv)) = u.accept_bi().await {
            let Ok((mut dsend, drecv)) = d.open_bi().await else { break };
            tokio::spawn(async move {
                if strip {
                    // The relay's stream to the home: deliver an opened route as plain.
                    let Ok(Some(frame)) = read_frame(&mut recv).await else { return };
                    let frame = match frame {
                        Frame::Route(mut h) => {
                            if let RouteBody::Opened { route, .. } = h.body {
                                h.body = RouteBody::Plain(route);
                            }
                            Frame::Route(h)
                        }
                        other => other,
                    };
                    if write_frames(&mut dsend, &[frame]).await.is_err() {
                        return;
                    }
                }
                splice(recv, dsend, drecv, send).await;
            });
        }
    });
    let mut forged = false;
    while let Ok((send, recv)) = down.accept_bi().await {
        let Ok((usend, urecv)) = up.open_bi().await else { break };
        let forge_now = matches!(ctx.attack, Attack::ForgeRetryConfigs) && !forged;
        let ctx = ctx.clone();
        // Streams are served one at a time until the first sealed one is seen, so "the
        // first sealed stream" is well defined.
        let outcome = outbound(ctx, send, recv, usend, urecv, forge_now).await;
        forged |= outcome;
    }
    inbound.abort();
}

/// Copies `from_a -> to_b` and `from_b -> to_a` until both ends finish.
async fn splice(
    mut from_a: quinn::RecvStream,
    mut to_b: quinn::SendStream,
    mut from_b: quinn::RecvStream,
    mut to_a: quinn::SendStream,
) {
    let one = async {
        let _ = tokio::io::copy(&mut from_a, &mut to_b).await;
        let _ = to_b.finish();
    };
    let two = async {
        let _ = tokio::io::copy(&mut from_b, &mut to_a).await;
        let _ = to_a.finish();
    };
    tokio::join!(one, two);
}

/// One stream from the home: reads its first frame, applies the attack, forwards. Returns
/// whether it answered with forged retry configs.
async fn outbound(
    ctx: Arc<Ctx>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut usend: quinn::SendStream,
    urecv: quinn::RecvStream,
    forge_now: bool,
) -> bool {
    let Ok(Some(first)) = read_frame(&mut recv).await else { return false };
    match first {
        Frame::Control(c) => {
            write_frames(&mut usend, &[Frame::Control(c)]).await.unwrap();
            let omit = matches!(ctx.attack, Attack::OmitConfigs);
            let substitute = match &ctx.attack {
                Attack::SubstituteSignedConfig { main, list, signature } => {
                    Some((main.clone(), list.clone(), signature.clone()))
                }
                _ => None,
            };
            let fake_key = matches!(ctx.attack, Attack::SubstituteNoiseKey { .. })
                .then(|| relayfed_sidecar::config::base64_encode(&ctx.noise.public));
            tokio::spawn(async move {
                let mut urecv = urecv;
                let down = async {
                    while let Ok(Some(frame)) = read_frame(&mut urecv).await {
                        let frame = match frame {
                            Frame::Control(Control::View { mut mains, mut entries, more }) => {
                                if omit {
                                    for info in mains.values_mut() {
                                        info.ech_config_list = None;
                                    }
                                }
                                if let Some((main, list, signature)) = &substitute
                                    && let Some(info) = mains.get_mut(main)
                                {
                                    info.ech_config_list = Some(list.clone());
                                    info.ech_signature = Some(signature.clone());
                                }
                                if let Some(key) = &fake_key {
                                    for e in &mut entries {
                                        e.noise_key = key.clone();
                                    }
                                }
                                Frame::Control(Control::View { mains, entries, more })
                            }
                            other => other,
                        };
                        if write_frames(&mut send, &[frame]).await.is_err() {
                            break;
                        }
                    }
                };
                let up = async {
                    let _ = tokio::io::copy(&mut recv, &mut usend).await;
                };
                tokio::join!(down, up);
            });
            false
        }
        Frame::Route(header) if matches!(ctx.attack, Attack::SubstituteNoiseKey { .. }) => {
            tokio::spawn(fake_destination(ctx, header, send, recv));
            false
        }
        Frame::Route(mut header) => {
            let kind = match (&header.body, header.grease.is_some()) {
                (RouteBody::Plain(_), true) => "grease",
                (RouteBody::Plain(_), false) => "plain",
                (RouteBody::Sealed(_), _) => "sealed",
                (RouteBody::Opened { .. }, _) => "opened",
            };
            if let Ok(bytes) = header.encode() {
                ctx.seen.routes.lock().unwrap().push((kind, bytes.len()));
            }
            let mut forged = false;
            match &mut header.body {
                RouteBody::Plain(_) | RouteBody::Opened { .. } => {
                    ctx.seen.routes_read.fetch_add(1, Ordering::SeqCst);
                }
                RouteBody::Sealed(sealed) => match ctx.own.open(sealed) {
                    Ok(route) => {
                        // Sealed to the forged key: read it, re-seal it to the real one.
                        ctx.seen.routes_read.fetch_add(1, Ordering::SeqCst);
                        let (config, suite) = ctx.real.clone().unwrap();
                        *sealed = seal(&config, suite, &ctx.dest_main, &route).unwrap();
                        ctx.seen.rewritten.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        ctx.seen.sealed_unread.fetch_add(1, Ordering::SeqCst);
                        match &ctx.attack {
                            Attack::ForgeRetryConfigs if forge_now => {
                                let mut config = ctx.own.config().clone();
                                config.config_id = sealed.config_id;
                                let list = EchConfigList { entries: vec![ListEntry::Config(config)] }.encode().unwrap();
                                ctx.seen.forged_retries.fetch_add(1, Ordering::SeqCst);
                                let _ = write_frames(&mut send, &[Frame::RetryConfigs(list)]).await;
                                let _ = send.finish();
                                forged = true;
                            }
                            Attack::ReplaceConfigId => {
                                sealed.config_id = sealed.config_id.wrapping_add(1);
                                ctx.seen.rewritten.fetch_add(1, Ordering::SeqCst);
                            }
                            Attack::Reseal(route) => {
                                let (config, suite) = ctx.real.clone().unwrap();
                                *sealed = seal(&config, suite, &ctx.dest_main, route).unwrap();
                                ctx.seen.rewritten.fetch_add(1, Ordering::SeqCst);
                            }
                            Attack::FlipSealed => {
                                sealed.payload[0] ^= 0x01;
                                ctx.seen.rewritten.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {}
                        }
                    }
                },
            }
            if forged {
                return true;
            }
            if write_frames(&mut usend, &[Frame::Route(header)]).await.is_err() {
                return false;
            }
            tokio::spawn(splice(recv, usend, urecv, send));
            false
        }
        other => {
            let _ = write_frames(&mut usend, &[other]).await;
            tokio::spawn(splice(recv, usend, urecv, send));
            false
        }
    }
}

/// Answers a stream as the destination would, with the substituted Noise key: the prologue
/// from the sealed header's outer fields and the guessed route, the real certificate in
/// message 2, then one payload message read.
async fn fake_destination(
    ctx: Arc<Ctx>,
    header: relayfed_sidecar::protocol::RouteHeader,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Attack::SubstituteNoiseKey { route, cert } = &ctx.attack else { return };
    let binding = match &header.body {
        RouteBody::Sealed(s) => Some(EchBinding {
            config_id: s.config_id,
            config_digest: config_digest(&ctx.real.as_ref().unwrap().0).unwrap(),
            enc: s.enc.clone(),
        }),
        _ => None,
    };
    let Ok(Some(Frame::Noise(msg1))) = read_frame(&mut recv).await else { return };
    let prologue = prologue(binding.as_ref(), route).unwrap();
    let Ok((responder, msg2)) = Responder::accept(&ctx.noise, &prologue, &msg1, cert) else { return };
    if write_frames(&mut send, &[Frame::Noise(msg2)]).await.is_err() {
        return;
    }
    let Ok(Some(Frame::Noise(msg3))) = read_frame(&mut recv).await else { return };
    let Ok((session, _, _)) = responder.finish(&msg3) else { return };
    ctx.seen.handshakes.fetch_add(1, Ordering::SeqCst);
    let (_tx, mut rx) = session.split();
    if let Ok(Some(Frame::Noise(m))) = read_frame(&mut recv).await
        && rx.decrypt(&m).is_ok()
    {
        ctx.seen.payload_read.fetch_add(1, Ordering::SeqCst);
    }
}
