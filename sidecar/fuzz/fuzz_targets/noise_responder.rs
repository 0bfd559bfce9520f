//! The destination sidecar as Noise XK responder: arbitrary message 1 (and prologue), then
//! arbitrary message 3 when message 1 was accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::crypto::noise::{Responder, StaticKeypair};

fuzz_target!(|data: &[u8]| {
    let Ok(me) = StaticKeypair::from_private(&[0x11; 32]) else { return };
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = (split as usize).min(rest.len());
    let (prologue, msgs) = rest.split_at(cut);
    let half = msgs.len() / 2;
    let (msg1, msg3) = msgs.split_at(half);
    if let Ok((responder, msg2)) = Responder::accept(&me, prologue, msg1, b"certificate") {
        assert!(!msg2.is_empty());
        let _ = responder.finish(msg3);
    }
});
