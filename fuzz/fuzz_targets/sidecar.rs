//! The sidecar parser must turn any text into a model description or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = patchcore::model::bank::parse_info(text);
    }
});
