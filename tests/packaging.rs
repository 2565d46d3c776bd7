//! Packaging: the Dockerfile passes hadolint (installed by scripts/setup.sh), the deployment
//! examples in deploy/ pass `systemd-analyze verify` and kubernetes-validate (PyPI, in the
//! project's Python environment), and `patchcore --version` names the program, libtorch and
//! FAISS with their real versions.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn hadolint() -> Option<PathBuf> {
    let cache = std::env::var_os("PATCHCORE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/patchcore")));
    let in_cache = cache.map(|c| c.join("hadolint/bin/hadolint"));
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("hadolint"))
            .find(|p| p.is_file())
    });
    in_cache.filter(|p| p.is_file()).or(on_path)
}

/// `out`'s stdout and stderr.
fn report(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// deploy/systemd's unit: restarts on failure, reloads by SIGHUP, and `systemd-analyze
/// verify` (with ExecStart pointing at this build) finds nothing to say.
#[test]
fn systemd_unit_passes_systemd_analyze() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/patchcore-serve.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in ["Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID"] {
        assert!(
            text.lines().any(|l| l == line),
            "no {line} in {}",
            unit.display()
        );
    }
    if !Path::new("/usr/bin/systemd-analyze").is_file() {
        common::skip("systemd-analyze is not installed (scripts/setup.sh installs systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("patchcore-serve.service");
    let here = text.replace("/usr/local/bin/patchcore", env!("CARGO_BIN_EXE_patchcore"));
    std::fs::write(&copy, here).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    // A directive it cannot parse is only a warning, with status 0: any output fails.
    let said = report(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// deploy/kubernetes's manifests validate against the Kubernetes schemas (strict: no unknown
/// fields); the server's Deployment probes /health and is annotated for Prometheus.
#[test]
fn kubernetes_manifests_pass_kubernetes_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let serve = std::fs::read_to_string(dir.join("serve.yaml")).unwrap();
    for want in [
        "readinessProbe",
        "livenessProbe",
        "path: /health",
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/path: /metrics",
    ] {
        assert!(serve.contains(want), "no {want} in serve.yaml");
    }
    let validate = common::python().with_file_name("kubernetes-validate");
    if !validate.is_file() {
        common::skip(&format!(
            "{} is not installed (scripts/setup.sh installs it)",
            validate.display()
        ));
        return;
    }
    let out = Command::new(&validate)
        .arg("--strict")
        .arg(dir.join("serve.yaml"))
        .arg(dir.join("train-sharded.yaml"))
        .output()
        .expect("kubernetes-validate runs");
    let said = report(&out);
    assert!(out.status.success(), "kubernetes-validate: {said}");
    assert_eq!(said.matches(" passed for resource ").count(), 4, "{said}");
}

#[test]
fn dockerfile_passes_hadolint() {
    let Some(hadolint) = hadolint() else {
        common::skip(
            "hadolint not found in $PATCHCORE_CACHE/hadolint/bin or on PATH \
             (scripts/setup.sh installs it)",
        );
        return;
    };
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let out = Command::new(&hadolint)
        .args(["--no-color", "--failure-threshold", "warning"])
        .arg(&dockerfile)
        .output()
        .expect("hadolint runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "hadolint reports warnings or errors:\n{report}"
    );
    if !report.trim().is_empty() {
        eprintln!("hadolint (below the failure threshold):\n{report}");
    }
}

/// `a.b.c` with numbers, optionally followed by `+local`.
fn is_version(v: &str) -> bool {
    let release = v.split('+').next().unwrap();
    let parts: Vec<&str> = release.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok())
}

/// The version of the libtorch the binary was built against, as the outside world sees it:
/// the Python torch that `LIBTORCH` comes from, or a standalone libtorch's `build-version`.
fn expected_libtorch() -> Option<String> {
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from)?;
    let libtorch = libtorch.canonicalize().ok()?;
    if let Ok(v) = std::fs::read_to_string(libtorch.join("build-version")) {
        return Some(v.trim().to_string());
    }
    let out = Command::new(common::python())
        .args([
            "-c",
            "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (version, dir) = (lines.next()?, lines.next()?);
    (Path::new(dir).canonicalize().ok()? == libtorch).then(|| version.to_string())
}

#[test]
fn version_names_program_libtorch_and_faiss() {
    let out = common::run(&["--version"]);
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let line = line.trim_end();
    // patchcore 0.1.0 (libtorch 2.13.0+cpu, FAISS 1.12.0; kNN auto (measured per model among
    // pruned, faiss; CPU no bf16 flags))
    let rest = line
        .strip_prefix(&format!(
            "patchcore {} (libtorch ",
            env!("CARGO_PKG_VERSION")
        ))
        .unwrap_or_else(|| panic!("unexpected --version: {line}"));
    let (torch, rest) = rest.split_once(", FAISS ").expect(line);
    let (faiss, knn) = rest.split_once("; kNN ").expect(line);
    assert!(
        knn.starts_with("auto (measured per model among pruned, faiss"),
        "the kNN path in {line}"
    );
    assert!(is_version(torch), "libtorch version {torch:?} in {line}");
    assert!(is_version(faiss), "FAISS version {faiss:?} in {line}");
    assert!(faiss.starts_with("1."), "FAISS 1.x expected: {line}");
    match expected_libtorch() {
        Some(expected) => assert_eq!(torch, expected, "{line}"),
        None => eprintln!("note: the libtorch version was not compared (no torch found)"),
    }

    // -V stays short.
    let short = common::run(&["-V"]);
    assert_eq!(
        String::from_utf8(short.stdout).unwrap().trim_end(),
        format!("patchcore {}", env!("CARGO_PKG_VERSION"))
    );
}
