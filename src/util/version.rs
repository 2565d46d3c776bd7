//! Versions of the program and of the two libraries it is built on, for `patchcore --version`
//! and the report's footer.

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

extern "C" {
    // FAISS's C API (linked statically through the faiss crate): the `VERSION_STRING` of the
    // FAISS build in this binary, e.g. "1.12.0".
    fn faiss_get_version() -> *const c_char;
}

/// This program's version (from Cargo.toml).
pub const PROGRAM: &str = env!("CARGO_PKG_VERSION");

/// The version of the libtorch this binary was linked against, as recorded by `build.rs`
/// (e.g. "2.13.0+cpu"; "unknown" if it could not be read). libtorch has no run-time version
/// call; the binary's rpath pins it to that same libtorch.
pub fn libtorch() -> &'static str {
    option_env!("PATCHCORE_LIBTORCH_VERSION").unwrap_or("unknown")
}

/// The version of the FAISS library in this binary, asked of the library itself.
pub fn faiss() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        // SAFETY: returns a pointer to a static NUL-terminated string (or null, handled).
        let p = unsafe { faiss_get_version() };
        if p.is_null() {
            return "unknown".to_string();
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    })
}

/// `0.1.0 (libtorch 2.13.0+cpu, FAISS 1.12.0; kNN faiss (exact float32; CPU without
/// amx_bf16/avx512_bf16))`: what `patchcore --version` prints after the program's name; the
/// kNN part is the search a flat model gets on this CPU (`knn::Choice`).
pub fn long_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        format!(
            "{PROGRAM} (libtorch {}, FAISS {}; kNN {})",
            libtorch(),
            faiss(),
            crate::model::knn::describe_default()
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_look_like_versions() {
        let v = super::long_version();
        assert!(v.starts_with(super::PROGRAM), "{v}");
        for lib in [super::libtorch(), super::faiss()] {
            let mut parts = lib.split(['.', '+']);
            assert!(
                parts.next().unwrap().parse::<u32>().is_ok()
                    && parts.next().unwrap_or("").parse::<u32>().is_ok(),
                "not a version: {lib} (in {v})"
            );
        }
    }
}
