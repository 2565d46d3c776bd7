//! Links the binary against the libtorch that the setup script installed and records its
//! location as an rpath, so `patchcore` runs without `LD_LIBRARY_PATH`.
//!
//! FAISS (built statically by faiss-sys) asks for `-lgomp`; we point that at libtorch's own
//! `libgomp.so.1` so the process has a single OpenMP runtime.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!(
            "cargo:warning=LIBTORCH is not set: run scripts/setup.sh, or `source scripts/env.sh`"
        );
        return;
    };
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // Keep libtorch_cuda linked even though no symbol of it is referenced directly:
    // without it, CUDA is never registered and `--device cuda` would not find the GPU.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let gomp = lib.join("libgomp.so.1");
    if gomp.exists() {
        let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("omp");
        std::fs::create_dir_all(&out).unwrap();
        link(&gomp, &out.join("libgomp.so"));
        println!("cargo:rustc-link-search=native={}", out.display());
    }
}

fn link(target: &Path, at: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).unwrap();
}
