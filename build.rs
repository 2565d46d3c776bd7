//! Links the binary against the libtorch that the setup script installed and records its
//! location as an rpath, so `patchcore` runs without `LD_LIBRARY_PATH`.
//!
//! FAISS (built statically by faiss-sys) asks for `-lgomp` and `-lblas`. We point `-lgomp` at
//! libtorch's own `libgomp.so.1`, so the process has a single OpenMP runtime, and `-lblas` at
//! `libtorch_cpu.so`, which exports the BLAS of the MKL it contains: FAISS's distance GEMMs then
//! run on MKL (4x faster than Debian's OpenBLAS on our CPUs) in the same thread pool as the
//! backbone. LAPACK routines MKL does not export still come from the system's `-llapack`.
//! Set `PATCHCORE_SYSTEM_BLAS=1` to link the system BLAS instead.
//!
//! It records where libtorch's CUDA library is, `PATCHCORE_LIBTORCH_CUDA`, for
//! `runtime::load_cuda`, which opens it only when a command asks for a GPU.
//!
//! It also records the linked libtorch's version as `PATCHCORE_LIBTORCH_VERSION` for
//! `patchcore --version` (libtorch has no run-time version call).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PATCHCORE_SYSTEM_BLAS");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!(
            "cargo:warning=LIBTORCH is not set: run scripts/setup.sh, or `source scripts/env.sh`"
        );
        return;
    };
    println!(
        "cargo:rustc-env=PATCHCORE_LIBTORCH_VERSION={}",
        libtorch_version(&libtorch)
    );
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // libtorch_cuda is not linked (torch-sys's `-ltorch_cuda` is dropped by `--as-needed`, no
    // symbol of it being referenced): `runtime::load_cuda` opens it from here when a command
    // asks for a GPU, so CPU runs do not pay for mapping and initializing the CUDA libraries.
    let cuda = lib.join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-env=PATCHCORE_LIBTORCH_CUDA={}", cuda.display());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("libs");
    std::fs::create_dir_all(&out).unwrap();
    let _ = std::fs::remove_file(out.join("libblas.so"));
    let gomp = lib.join("libgomp.so.1");
    if gomp.exists() {
        link(&gomp, &out.join("libgomp.so"));
    }
    let torch_cpu = lib.join("libtorch_cpu.so");
    if torch_cpu.exists() && std::env::var_os("PATCHCORE_SYSTEM_BLAS").is_none() {
        // A linker script standing in for libblas.so: libtorch_cpu first (its MKL wins the
        // symbols both define, like sgemm_), then the system BLAS for the few routines MKL
        // does not export (ssyrk_, used by FAISS's PCA).
        if let Some(system_blas) = system_library("libblas.so") {
            let script = format!("INPUT({} {})\n", torch_cpu.display(), system_blas.display());
            std::fs::write(out.join("libblas.so"), script).unwrap();
        }
    }
    println!("cargo:rustc-link-search=native={}", out.display());
}

/// The version of the libtorch at `libtorch`: `build-version` in a standalone libtorch, torch's
/// `version.py` in a Python torch package (`LIBTORCH` is the package folder itself, or the
/// libtorch beside it), else the numbers in the C++ headers; "unknown" when none is there.
fn libtorch_version(libtorch: &Path) -> String {
    let build_version = libtorch.join("build-version");
    let version_py = [
        libtorch.join("version.py"),
        libtorch.join("../torch/version.py"),
    ];
    let headers = [
        libtorch.join("include/torch/headeronly/version.h"),
        libtorch.join("include/torch/csrc/api/include/torch/version.h"),
    ];
    // (Only existing files: cargo reruns the script every time for a missing one.)
    for p in std::iter::once(&build_version)
        .chain(&version_py)
        .chain(&headers)
        .filter(|p| p.exists())
    {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    if let Ok(s) = std::fs::read_to_string(&build_version) {
        if !s.trim().is_empty() {
            return s.trim().to_string();
        }
    }
    for p in &version_py {
        let Ok(s) = std::fs::read_to_string(p) else {
            continue;
        };
        // __version__ = '2.13.0+cpu'
        let found = s.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("__version__")?.trim_start();
            let v = rest
                .strip_prefix('=')?
                .trim()
                .trim_matches(|c| c == '\'' || c == '"');
            (!v.is_empty()).then(|| v.to_string())
        });
        if let Some(v) = found {
            return v;
        }
    }
    for p in &headers {
        let Ok(s) = std::fs::read_to_string(p) else {
            continue;
        };
        // #define TORCH_VERSION_MAJOR 2
        let number = |part: &str| {
            let key = format!("TORCH_VERSION_{part}");
            s.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("#define") && w.next() == Some(key.as_str()))
                    .then(|| w.next()?.parse::<u32>().ok())
                    .flatten()
            })
        };
        if let (Some(a), Some(b), Some(c)) = (number("MAJOR"), number("MINOR"), number("PATCH")) {
            return format!("{a}.{b}.{c}");
        }
    }
    "unknown".to_string()
}

/// Where the C compiler would find `name`, if it would.
fn system_library(name: &str) -> Option<PathBuf> {
    let out = std::process::Command::new("cc")
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // gcc echoes the bare name back when it finds nothing.
    path.is_absolute()
        .then(|| path.canonicalize().ok())
        .flatten()
}

fn link(target: &Path, at: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).unwrap();
}
