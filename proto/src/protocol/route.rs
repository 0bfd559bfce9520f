//! The route header: the first frame of every stream, saying where it goes.
//!
//! Exact layout in docs/protocol.md §3. The header is either *plain* (the inner route in
//! clear) or *sealed* (the inner route HPKE-sealed to the destination main relay's ECH key,
//! with an outer part naming only that relay, the config id, suite and encapsulated key).
//! A relay that opens a sealed header forwards it *opened*: plain, plus the [`EchBinding`]
//! (config id, digest of the config that opened it, encapsulated key), so the destination
//! binds exactly that key and that encapsulation into the Noise prologue: a route sealed to
//! any other key, or re-sealed on the way, fails the end-to-end handshake.
//!
//! A plain header may carry a [`Grease`] envelope (RFC 9849 §6.2 in spirit): random bytes in
//! the shape of a sealing, sized so the header is exactly as long as a sealed one would be,
//! so the size of a stream's first frame does not tell an observer whether it is sealed.

use super::wire::{DecodeError, Reader, Writer};

/// Route header version spoken here.
pub const ROUTE_VERSION: u8 = 1;
/// Most relay hops a stream may take (home -> main -> main -> home).
pub const MAX_HOPS: u8 = 3;
/// Most entries in the path record.
pub const MAX_PATH: usize = 4;
/// Longest node id (a DNS label).
pub const MAX_NODE_ID: usize = 63;
/// Longest service name or origin identity.
pub const MAX_NAME: usize = 127;
/// Longest trace context (W3C `traceparent` is 55 bytes; `tracestate` may follow).
pub const MAX_TRACE: usize = 255;
/// Longest sealed payload.
pub const MAX_SEALED: usize = 2048;
/// Sealed plaintext is padded to a multiple of this, hiding name lengths.
pub const PAD_TO: usize = 64;

const FLAG_SEALED: u8 = 0x01;
const FLAG_OPENED: u8 = 0x02;
const FLAG_PROBE: u8 = 0x04;
const FLAG_GREASE: u8 = 0x08;
/// Bytes HPKE's AEAD adds to a sealed payload (AES-128-GCM and ChaCha20-Poly1305 alike).
const AEAD_TAG: usize = 16;

/// The sensitive part of a route: who is called, and by whom.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InnerRoute {
    /// Destination home node id.
    pub dest_node: String,
    /// Main relay the destination home node is attached to.
    pub dest_main: String,
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Origin identity (`node@main`).
    pub origin: String,
}

/// The outer part of a sealed route: all an intermediate relay may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedRoute {
    /// Main relay that owns the ECH key and can open the inner route.
    pub main: String,
    /// ECH config id of the key used.
    pub config_id: u8,
    /// HPKE KDF id.
    pub kdf_id: u16,
    /// HPKE AEAD id.
    pub aead_id: u16,
    /// HPKE encapsulated key.
    pub enc: Vec<u8>,
    /// HPKE ciphertext of the padded inner route.
    pub payload: Vec<u8>,
}

/// A GREASE envelope after a plain route: the fields of a sealing with random content. Nobody
/// opens it; relays pass it on unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grease {
    /// A random config id.
    pub config_id: u8,
    /// The KDF a real sealing to the destination relay would use.
    pub kdf_id: u16,
    /// The AEAD a real sealing would use.
    pub aead_id: u16,
    /// An encapsulated key (1..255 bytes; a real encapsulation to no purpose).
    pub enc: Vec<u8>,
    /// Random bytes (1..[`MAX_SEALED`]).
    pub payload: Vec<u8>,
}

impl Grease {
    /// An envelope for `route` in the shape of `sealed` (a sealing of the same route, which
    /// is then thrown away): the plain header with it is exactly as long as the sealed one.
    pub fn imitating(
        sealed: &SealedRoute,
        route: &InnerRoute,
        config_id: u8,
        mut random: impl FnMut(&mut [u8]),
    ) -> Result<Self, DecodeError> {
        let plain = route.encode()?.len();
        // sealed body: vec8(main) + 5 + vec16(enc) + vec16(payload); greased: route + 5 +
        // vec16(enc) + vec16(grease payload): equal when the grease payload makes up the rest.
        let len = (1 + sealed.main.len() + sealed.payload.len())
            .checked_sub(plain)
            .filter(|l| (1..=MAX_SEALED).contains(l))
            .ok_or_else(|| DecodeError::invalid("grease payload", "the sealed route is shorter than the plain one"))?;
        let mut payload = vec![0u8; len];
        random(&mut payload);
        Ok(Self { config_id, kdf_id: sealed.kdf_id, aead_id: sealed.aead_id, enc: sealed.enc.clone(), payload })
    }

    /// The length of the sealed payload of `route` (padded, plus the AEAD tag).
    pub fn sealed_payload_len(route: &InnerRoute) -> Result<usize, DecodeError> {
        Ok(route.padded()?.len() + AEAD_TAG)
    }
}

/// Length of an ECH config digest (SHA-256).
pub const CONFIG_DIGEST_LEN: usize = 32;

/// What ties an end-to-end session to one ECH sealing: the key it was sealed to and the
/// encapsulation used. The origin computes it when sealing; the key owner reports it when
/// opening; both go into the Noise prologue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EchBinding {
    /// Config id of the key.
    pub config_id: u8,
    /// SHA-256 of the encoded ECHConfig (version, length and contents) of the key.
    pub config_digest: [u8; CONFIG_DIGEST_LEN],
    /// HPKE encapsulated key of this sealing (1..255 bytes).
    pub enc: Vec<u8>,
}

impl EchBinding {
    fn write(&self, w: &mut Writer) {
        w.u8(self.config_id).bytes(&self.config_digest).vec8(&self.enc);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let config_id = r.u8("config_id")?;
        let digest = r.take(CONFIG_DIGEST_LEN, "config_digest")?;
        let mut config_digest = [0u8; CONFIG_DIGEST_LEN];
        config_digest.copy_from_slice(digest);
        let enc = r.vec8("enc", 1, 255)?.to_vec();
        Ok(Self { config_id, config_digest, enc })
    }

    /// The bytes the Noise prologue carries for this binding.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        self.check()?;
        let mut w = Writer::new();
        self.write(&mut w);
        Ok(w.into_bytes())
    }

    fn check(&self) -> Result<(), DecodeError> {
        if self.enc.is_empty() || self.enc.len() > 255 {
            return Err(DecodeError::invalid("enc", "must be 1..255 bytes"));
        }
        Ok(())
    }
}

/// What the header carries after the common fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteBody {
    /// Inner route in clear (ECH not used).
    Plain(InnerRoute),
    /// Inner route sealed with ECH.
    Sealed(SealedRoute),
    /// Inner route opened by the relay owning the key; `binding` names that key and sealing.
    Opened {
        /// The key and encapsulation the route was sealed with.
        binding: EchBinding,
        /// The opened inner route.
        route: InnerRoute,
    },
}

/// One relay traversed, for tracing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathEntry {
    /// Relay node id.
    pub node: String,
    /// Milliseconds since the Unix epoch when the relay forwarded the stream.
    pub at_ms: u64,
}

/// The first frame of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteHeader {
    /// Remaining relay hops; a relay refuses the stream when it is 0 on arrival.
    pub hop_limit: u8,
    /// A path-trace probe: the destination answers with the hops instead of delivering.
    pub probe: bool,
    /// W3C trace context (may be empty).
    pub trace_context: String,
    /// Relays traversed so far.
    pub path: Vec<PathEntry>,
    /// The route itself.
    pub body: RouteBody,
    /// A GREASE envelope (plain bodies only).
    pub grease: Option<Grease>,
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
    if s.is_empty() || s.len() > max {
        return Err(DecodeError::invalid(field, format!("must be 1..{max} bytes, is {}", s.len())));
    }
    Ok(())
}

impl InnerRoute {
    /// Checks the bounds a peer will enforce, so what encodes also decodes.
    pub fn check(&self) -> Result<(), DecodeError> {
        check_len("dest_node", &self.dest_node, MAX_NODE_ID)?;
        check_len("dest_main", &self.dest_main, MAX_NODE_ID)?;
        check_len("service", &self.service, MAX_NAME)?;
        check_len("origin", &self.origin, MAX_NAME)
    }

    /// Appends the encoding (no bounds check: call [`InnerRoute::check`] first).
    pub fn write(&self, w: &mut Writer) {
        w.vec8(self.dest_node.as_bytes())
            .vec8(self.dest_main.as_bytes())
            .vec8(self.service.as_bytes())
            .u16(self.port)
            .vec8(self.origin.as_bytes());
    }

    /// Encodes the inner route alone (used in the HPKE plaintext and the Noise prologue).
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        self.check()?;
        let mut w = Writer::new();
        self.write(&mut w);
        Ok(w.into_bytes())
    }

    /// Reads an inner route.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            dest_node: r.str8("dest_node", MAX_NODE_ID)?.to_owned(),
            dest_main: r.str8("dest_main", MAX_NODE_ID)?.to_owned(),
            service: r.str8("service", MAX_NAME)?.to_owned(),
            port: r.u16("port")?,
            origin: r.str8("origin", MAX_NAME)?.to_owned(),
        })
    }

    /// The padded plaintext sealed with ECH.
    pub fn padded(&self) -> Result<Vec<u8>, DecodeError> {
        let mut v = self.encode()?;
        let target = v.len().div_ceil(PAD_TO) * PAD_TO;
        v.resize(target.max(PAD_TO), 0);
        Ok(v)
    }

    /// Decodes a padded plaintext; padding must be zeros.
    pub fn from_padded(plain: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(plain);
        let route = Self::read(&mut r)?;
        if r.rest().iter().any(|&b| b != 0) {
            return Err(DecodeError::invalid("padding", "non-zero byte"));
        }
        Ok(route)
    }
}

impl SealedRoute {
    /// The HPKE additional data: binds the outer fields a relay must not change.
    pub fn aad(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(b"relayfed route v1")
            .u8(ROUTE_VERSION)
            .vec8(self.main.as_bytes())
            .u8(self.config_id)
            .u16(self.kdf_id)
            .u16(self.aead_id)
            .vec16(&self.enc);
        w.into_bytes()
    }
}

impl RouteHeader {
    /// Encodes the header (the payload of a ROUTE frame).
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        if self.trace_context.len() > MAX_TRACE {
            return Err(DecodeError::TooLong { field: "trace_context", len: self.trace_context.len(), max: MAX_TRACE });
        }
        if self.path.len() > MAX_PATH {
            return Err(DecodeError::TooLong { field: "path", len: self.path.len(), max: MAX_PATH });
        }
        let flags = match self.body {
            RouteBody::Plain(_) => 0,
            RouteBody::Sealed(_) => FLAG_SEALED,
            RouteBody::Opened { .. } => FLAG_OPENED,
        } | if self.probe { FLAG_PROBE } else { 0 }
            | if self.grease.is_some() { FLAG_GREASE } else { 0 };
        if self.grease.is_some() && !matches!(self.body, RouteBody::Plain(_)) {
            return Err(DecodeError::invalid("grease", "only a plain route carries a GREASE envelope"));
        }
        let mut w = Writer::new();
        w.u8(ROUTE_VERSION).u8(self.hop_limit).u8(flags).vec8(self.trace_context.as_bytes());
        w.u8(self.path.len() as u8); // bounded by MAX_PATH above
        for p in &self.path {
            check_len("path node", &p.node, MAX_NODE_ID)?;
            w.vec8(p.node.as_bytes()).u64(p.at_ms);
        }
        match &self.body {
            RouteBody::Plain(route) => {
                route.check()?;
                route.write(&mut w);
                if let Some(g) = &self.grease {
                    if g.enc.is_empty() || g.enc.len() > 255 {
                        return Err(DecodeError::invalid("grease enc", "must be 1..255 bytes"));
                    }
                    if g.payload.is_empty() || g.payload.len() > MAX_SEALED {
                        return Err(DecodeError::invalid("grease payload", format!("must be 1..{MAX_SEALED} bytes")));
                    }
                    w.u8(g.config_id).u16(g.kdf_id).u16(g.aead_id).vec16(&g.enc).vec16(&g.payload);
                }
            }
            RouteBody::Opened { binding, route } => {
                route.check()?;
                binding.check()?;
                binding.write(&mut w);
                route.write(&mut w);
            }
            RouteBody::Sealed(s) => {
                check_len("main", &s.main, MAX_NODE_ID)?;
                if s.enc.is_empty() || s.enc.len() > 255 {
                    return Err(DecodeError::invalid("enc", "must be 1..255 bytes"));
                }
                if s.payload.len() < 17 || s.payload.len() > MAX_SEALED {
                    return Err(DecodeError::invalid("sealed payload", format!("must be 17..{MAX_SEALED} bytes")));
                }
                w.vec8(s.main.as_bytes()).u8(s.config_id).u16(s.kdf_id).u16(s.aead_id).vec16(&s.enc).vec16(&s.payload);
            }
        }
        Ok(w.into_bytes())
    }

    /// Decodes a header; never panics, names the field on error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("route version")?;
        if version != ROUTE_VERSION {
            return Err(DecodeError::UnsupportedVersion { field: "route header", version: version.into() });
        }
        let hop_limit = r.u8("hop_limit")?;
        let flags = r.u8("flags")?;
        if flags & !(FLAG_SEALED | FLAG_OPENED | FLAG_PROBE | FLAG_GREASE) != 0
            || flags & (FLAG_SEALED | FLAG_OPENED) == FLAG_SEALED | FLAG_OPENED
            || (flags & FLAG_GREASE != 0 && flags & (FLAG_SEALED | FLAG_OPENED) != 0)
        {
            return Err(DecodeError::invalid("flags", format!("0x{flags:02x} is not a valid combination")));
        }
        let trace = r.vec8("trace_context", 0, MAX_TRACE)?;
        let trace_context =
            std::str::from_utf8(trace).map_err(|_| DecodeError::invalid("trace_context", "not UTF-8"))?.to_owned();
        let count = usize::from(r.u8("path count")?);
        if count > MAX_PATH {
            return Err(DecodeError::TooLong { field: "path", len: count, max: MAX_PATH });
        }
        let mut path = Vec::with_capacity(count);
        for _ in 0..count {
            path.push(PathEntry { node: r.str8("path node", MAX_NODE_ID)?.to_owned(), at_ms: r.u64("path time")? });
        }
        let body = if flags & FLAG_SEALED != 0 {
            RouteBody::Sealed(SealedRoute {
                main: r.str8("main", MAX_NODE_ID)?.to_owned(),
                config_id: r.u8("config_id")?,
                kdf_id: r.u16("kdf_id")?,
                aead_id: r.u16("aead_id")?,
                enc: r.vec16("enc", 1, 255)?.to_vec(),
                payload: r.vec16("sealed payload", 17, MAX_SEALED)?.to_vec(),
            })
        } else if flags & FLAG_OPENED != 0 {
            let binding = EchBinding::read(&mut r)?;
            RouteBody::Opened { binding, route: InnerRoute::read(&mut r)? }
        } else {
            RouteBody::Plain(InnerRoute::read(&mut r)?)
        };
        let grease = if flags & FLAG_GREASE != 0 {
            Some(Grease {
                config_id: r.u8("grease config_id")?,
                kdf_id: r.u16("grease kdf_id")?,
                aead_id: r.u16("grease aead_id")?,
                enc: r.vec16("grease enc", 1, 255)?.to_vec(),
                payload: r.vec16("grease payload", 1, MAX_SEALED)?.to_vec(),
            })
        } else {
            None
        };
        r.finish("route header")?;
        Ok(Self { hop_limit, probe: flags & FLAG_PROBE != 0, trace_context, path, body, grease })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn inner() -> InnerRoute {
        InnerRoute {
            dest_node: "pay-us".into(),
            dest_main: "hub-us".into(),
            service: "payments".into(),
            port: 9090,
            origin: "shop-eu@hub-eu".into(),
        }
    }

    fn arb_name(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[a-z0-9@.-]{{1,{max}}}")).unwrap()
    }

    fn arb_inner() -> impl Strategy<Value = InnerRoute> {
        (arb_name(63), arb_name(63), arb_name(127), any::<u16>(), arb_name(127)).prop_map(
            |(dest_node, dest_main, service, port, origin)| InnerRoute { dest_node, dest_main, service, port, origin },
        )
    }

    fn arb_header() -> impl Strategy<Value = RouteHeader> {
        let body = prop_oneof![
            arb_inner().prop_map(RouteBody::Plain),
            (any::<u8>(), any::<[u8; 32]>(), prop::collection::vec(any::<u8>(), 1..255), arb_inner()).prop_map(
                |(config_id, config_digest, enc, route)| RouteBody::Opened {
                    binding: EchBinding { config_id, config_digest, enc },
                    route
                }
            ),
            (
                arb_name(63),
                any::<u8>(),
                any::<u16>(),
                any::<u16>(),
                prop::collection::vec(any::<u8>(), 1..255),
                prop::collection::vec(any::<u8>(), 17..300)
            )
                .prop_map(|(main, config_id, kdf_id, aead_id, enc, payload)| RouteBody::Sealed(
                    SealedRoute { main, config_id, kdf_id, aead_id, enc, payload }
                )),
        ];
        (
            any::<u8>(),
            any::<bool>(),
            "[ -~]{0,80}",
            prop::collection::vec((arb_name(63), any::<u64>()), 0..=MAX_PATH),
            body,
            proptest::option::of((
                any::<u8>(),
                prop::collection::vec(any::<u8>(), 1..255),
                prop::collection::vec(any::<u8>(), 1..300),
            )),
        )
            .prop_map(|(hop_limit, probe, trace_context, path, body, grease)| {
                let grease = grease
                    .filter(|_| matches!(body, RouteBody::Plain(_)))
                    .map(|(config_id, enc, payload)| Grease { config_id, kdf_id: 1, aead_id: 3, enc, payload });
                RouteHeader {
                    hop_limit,
                    probe,
                    trace_context,
                    path: path.into_iter().map(|(node, at_ms)| PathEntry { node, at_ms }).collect(),
                    body,
                    grease,
                }
            })
    }

    #[test]
    fn padding_hides_name_length() {
        let mut a = inner();
        a.service = "a".into();
        let mut b = inner();
        b.service = "a-much-longer-service-name".into();
        assert_eq!(a.padded().unwrap().len(), b.padded().unwrap().len());
        assert_eq!(InnerRoute::from_padded(&b.padded().unwrap()).unwrap(), b);
        let mut bad = a.padded().unwrap();
        *bad.last_mut().unwrap() = 1;
        assert!(InnerRoute::from_padded(&bad).is_err());
    }

    #[test]
    fn unknown_version_and_flags_are_refused() {
        let h = RouteHeader {
            hop_limit: 3,
            probe: false,
            trace_context: String::new(),
            path: vec![],
            body: RouteBody::Plain(inner()),
            grease: None,
        };
        let mut bytes = h.encode().unwrap();
        bytes[0] = 2;
        assert_eq!(
            RouteHeader::decode(&bytes),
            Err(DecodeError::UnsupportedVersion { field: "route header", version: 2 })
        );
        bytes[0] = 1;
        bytes[2] = 0x03;
        assert!(matches!(RouteHeader::decode(&bytes), Err(DecodeError::Invalid { field: "flags", .. })));
        bytes[2] = 0x09;
        assert!(
            matches!(RouteHeader::decode(&bytes), Err(DecodeError::Invalid { field: "flags", .. })),
            "GREASE with a sealed body"
        );
        let sealed = SealedRoute {
            main: "m".into(),
            config_id: 1,
            kdf_id: 1,
            aead_id: 1,
            enc: vec![1; 32],
            payload: vec![2; 80],
        };
        let g = Grease::imitating(&sealed, &inner(), 9, |b| b.fill(7)).unwrap();
        let bad = RouteHeader { body: RouteBody::Sealed(sealed), grease: Some(g), ..h };
        assert!(bad.encode().is_err(), "only a plain route carries GREASE");
    }

    /// A sealed header to `route`'s relay, in the exact shape sealing gives (32-byte enc,
    /// padded route plus the AEAD tag), and the greased plain header imitating it.
    fn pair(route: &InnerRoute, trace: &str, path: Vec<PathEntry>) -> (RouteHeader, RouteHeader) {
        let sealed = SealedRoute {
            main: route.dest_main.clone(),
            config_id: 7,
            kdf_id: 1,
            aead_id: 1,
            enc: vec![0x55; 32],
            payload: vec![0xaa; Grease::sealed_payload_len(route).unwrap()],
        };
        let grease = Grease::imitating(&sealed, route, 201, |b| b.fill(0x33)).unwrap();
        let common = RouteHeader {
            hop_limit: 3,
            probe: false,
            trace_context: trace.to_owned(),
            path,
            body: RouteBody::Sealed(sealed),
            grease: None,
        };
        let greased = RouteHeader { body: RouteBody::Plain(route.clone()), grease: Some(grease), ..common.clone() };
        (common, greased)
    }

    #[test]
    fn a_greased_header_is_as_long_as_a_sealed_one_on_every_hop() {
        let (sealed, greased) = pair(&inner(), "", vec![]);
        assert_eq!(sealed.encode().unwrap().len(), greased.encode().unwrap().len());
        // Relays append to the path and pass the envelope on: still equal after a hop.
        let hop = vec![PathEntry { node: "hub-eu".into(), at_ms: 1 }];
        let (sealed, greased) = pair(&inner(), "", hop);
        assert_eq!(sealed.encode().unwrap().len(), greased.encode().unwrap().len());
        let decoded = RouteHeader::decode(&greased.encode().unwrap()).unwrap();
        assert_eq!(decoded, greased);
    }

    proptest! {
        #[test]
        fn headers_round_trip(h in arb_header()) {
            let bytes = h.encode().unwrap();
            prop_assert_eq!(RouteHeader::decode(&bytes).unwrap(), h);
        }

        #[test]
        fn greased_and_sealed_headers_have_equal_lengths(route in arb_inner(), trace in "[ -~]{0,60}") {
            let (sealed, greased) = pair(&route, &trace, vec![]);
            prop_assert_eq!(sealed.encode().unwrap().len(), greased.encode().unwrap().len());
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = RouteHeader::decode(&bytes);
        }

        #[test]
        fn truncation_is_always_an_error(h in arb_header(), cut in any::<prop::sample::Index>()) {
            let bytes = h.encode().unwrap();
            let n = cut.index(bytes.len());
            prop_assert!(RouteHeader::decode(&bytes[..n]).is_err());
        }
    }
}
