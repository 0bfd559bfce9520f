//! Fuzz the CR YAML loader: any bytes in, a typed result or a typed error out, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = relayfed_crds::parse_documents("fuzz.yaml", text) {
            // Every rejection carries a code and, when invalid, names at least one field.
            assert!(!e.code().is_empty());
            if let relayfed_crds::CrdError::Invalid { errors, .. } = &e {
                assert!(!errors.is_empty());
            }
        }
    }
});
