//! The process around the stages: libtorch's CUDA half loaded only when a command asks for a
//! GPU, how long the process took to reach `main`, and a quick exit.
//!
//! A CUDA build of libtorch is two libraries: `libtorch_cpu` and `libtorch_cuda` (with cuDNN,
//! cuBLAS, NCCL, ... behind it). Linked into the binary, `libtorch_cuda` and its dependencies
//! are mapped and initialized at every start, which costs a CPU-only run about 0.2-0.4 s of
//! CPU before `main`. `build.rs` therefore leaves it out of the link and records its path;
//! [`load_cuda`] opens it (`dlopen`, global symbols) before anything asks libtorch about CUDA,
//! which registers the CUDA backend exactly as linking would have: libtorch looks its CUDA
//! hooks up once, on the first CUDA query, so the library must be open by then.

use std::sync::OnceLock;

use anyhow::{anyhow, Result};

/// The `libtorch_cuda` library of the libtorch this binary was built with, if it has one.
pub fn cuda_library() -> Option<&'static str> {
    option_env!("PATCHCORE_LIBTORCH_CUDA")
}

/// Opens libtorch's CUDA library once per process (later calls return the first outcome).
/// An error when this libtorch has no CUDA library or it cannot be opened; CPU work never
/// needs it.
pub fn load_cuda() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = cuda_library().ok_or("this build of libtorch has no CUDA support")?;
            let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
            // SAFETY: a NUL-terminated path; the handle is kept open for the process's life
            // (never dlclose'd), as a linked library would be.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a NUL-terminated message or null.
                let why = unsafe {
                    let e = libc::dlerror();
                    if e.is_null() {
                        "unknown error".to_string()
                    } else {
                        std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                    }
                };
                return Err(format!("cannot load {path}: {why}"));
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Whether a CUDA device can be used (loading libtorch's CUDA library first if needed).
pub fn cuda_is_available() -> bool {
    load_cuda().is_ok() && tch::Cuda::is_available()
}

/// Ends the process with `status` once stdout and stderr are flushed, without running the
/// libraries' exit-time destructors: libtorch takes its operator registry apart for about
/// 0.1 s of every run otherwise. Only for the very end of `main`, when every file is written
/// and closed (nothing patchcore writes waits for exit).
pub fn exit_now(status: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; nothing runs after it.
    unsafe { libc::_exit(i32::from(status)) }
}

/// Records how long the process took to reach `main`; call first thing in `main`.
pub fn record_start_up() {
    let _ = START_UP.set(since_process_start());
}

/// What [`record_start_up`] recorded: seconds from the process's creation to `main`.
pub fn start_up_s() -> Option<f64> {
    START_UP.get().copied().flatten()
}

static START_UP: OnceLock<Option<f64>> = OnceLock::new();

/// Seconds from the process's creation to now (Linux: from `/proc/self/stat`, to 1/100 s),
/// for the start-up figure of `--timings`: the dynamic loader and the libraries'
/// initializers, libtorch's above all. `None` where it cannot be read.
pub fn since_process_start() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), in parentheses; the start time
    // is field 22 of the line, the 20th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: plain queries; `ts` is written by the call.
    let (hz, now) = unsafe {
        let hz = libc::sysconf(libc::_SC_CLK_TCK);
        let mut ts = std::mem::zeroed::<libc::timespec>();
        if hz <= 0 || libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) != 0 {
            return None;
        }
        (hz as f64, ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
    };
    Some((now - ticks as f64 / hz).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_started_a_little_while_ago() {
        let s = since_process_start().expect("readable on Linux");
        assert!(s > 0.0 && s < 24.0 * 3600.0, "{s}");
    }

    #[test]
    fn loading_cuda_registers_libtorchs_cuda_backend() {
        let Some(path) = cuda_library() else {
            // A CPU-only libtorch: nothing to load, and it says so.
            assert!(load_cuda().is_err());
            return;
        };
        load_cuda().unwrap_or_else(|e| panic!("{path}: {e:#}"));
        // Without the CUDA backend, libtorch has no CUDA kernel at all ("Could not run ...
        // with arguments from the 'CUDA' backend"); with it, a machine without a GPU fails
        // in the CUDA runtime instead (no driver, no device).
        let made = tch::Tensor::f_zeros([2], (tch::Kind::Float, tch::Device::Cuda(0)));
        match made {
            Ok(t) => assert!(cuda_is_available(), "{t:?}"),
            Err(e) => {
                let e = e.to_string();
                assert!(!cuda_is_available());
                assert!(!e.contains("'CUDA' backend"), "CUDA backend missing: {e}");
            }
        }
    }
}
