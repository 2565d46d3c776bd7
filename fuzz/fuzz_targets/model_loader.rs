//! The model loader (sidecar, checksum, then FAISS) on any pair of files: an index and a
//! sidecar made of the input (split at the first 0xFF byte, which JSON text never holds).
//! It must answer with a model or an error, never panic, and FAISS must only ever see an
//! index whose checksum the sidecar vouches for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0xFF).unwrap_or(data.len());
    let (side, index) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
    let path = dir().join("index.faiss");
    std::fs::write(&path, index).unwrap();
    std::fs::write(patchcore::model::bank::sidecar_path(&path), side).unwrap();
    if let Ok(info) = patchcore::model::bank::read_info(&path) {
        let _ = patchcore::model::bank::read_index(&path, &info);
    }
});
