//! Direct-path input from the network (docs/protocol.md §12): punch probe datagrams, as the
//! home's socket sees them, and the direct-path control messages. Never a panic; a probe that
//! decodes is exactly the encoding of its token; a direct-path message re-encodes to one that
//! decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::protocol::control::Control;
use relayfed_sidecar::protocol::punch;

fuzz_target!(|data: &[u8]| {
    match punch::decode(data) {
        Ok(token) => assert_eq!(punch::encode(&token).as_slice(), data),
        Err(_) => assert!(data.len() != punch::PROBE_LEN || !punch::looks_like_probe(data)),
    }
    if let Ok(
        m @ (Control::Observed { .. }
        | Control::Candidates { .. }
        | Control::PunchRequest { .. }
        | Control::Punch { .. }
        | Control::PunchRefused { .. }
        | Control::PunchForward { .. }
        | Control::PunchAnswer { .. }),
    ) = Control::decode(data)
    {
        assert_eq!(Control::decode(&m.encode()).ok(), Some(m));
    }
});
