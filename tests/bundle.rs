//! The relocatable bundle (`scripts/bundle.sh`) on a bare system: a Debian bookworm minbase
//! made by debootstrap (cached in `$PATCHCORE_CACHE/debootstrap`), nothing else installed. The
//! bundle and an exported model (`patchcore export`) are copied in and run under `chroot` with
//! `env -i`: `--version`, `predict` (the same scores and heatmaps as on this machine) and
//! `serve` answering /health. A bundle missing one of its libraries must fail there, which
//! shows the chroot sees none of this machine's libraries.
//!
//! Needs root (chroot, mounting /proc), debootstrap and patchelf (scripts/setup.sh installs
//! them) and, the first time, Debian's package mirror.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{s, stderr, write_images};
use patchcore::util::synthetic::Defect;

fn cache() -> PathBuf {
    std::env::var_os("PATCHCORE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/patchcore")
        })
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The cached bookworm minbase, made on first use (about 30 s and 60 MB of downloads).
fn minbase() -> PathBuf {
    let dir = cache().join("debootstrap");
    let root = dir.join("bookworm-minbase");
    if root.join("usr/bin/env").exists() {
        return root;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!("bookworm-minbase.tmp-{}", std::process::id()));
    let o = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian")
        .output()
        .unwrap();
    assert!(o.status.success(), "debootstrap: {}", stderr(&o));
    std::fs::rename(&tmp, &root).unwrap();
    root
}

/// /proc mounted in the chroot and our folder in its /tmp, both undone on drop.
struct Chroot {
    root: PathBuf,
    /// Our folder, as seen inside the chroot.
    inner: PathBuf,
}

impl Chroot {
    fn new(root: PathBuf) -> Option<Chroot> {
        let inner = PathBuf::from(format!("/tmp/patchcore-bundle-test-{}", std::process::id()));
        let ok = Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(root.join("proc"))
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let c = Chroot { root, inner };
        std::fs::create_dir_all(c.host(&c.inner)).unwrap();
        Some(c)
    }

    /// Where a path inside the chroot lies on this machine.
    fn host(&self, inside: &Path) -> PathBuf {
        self.root.join(inside.strip_prefix("/").unwrap())
    }

    /// `chroot ROOT env -i PROGRAM ARGS`.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.root).args(["/usr/bin/env", "-i"]).arg(program);
        c.args(args);
        c
    }

    fn run(&self, program: &Path, args: &[&str]) -> Output {
        self.command(program, args).output().unwrap()
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.host(&self.inner));
        let _ = Command::new("umount").arg(self.root.join("proc")).status();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "cp: {}", stderr(&o));
}

/// Starts `serve` in the chroot, waits for its address, asks /health, stops it with SIGTERM.
fn serve_answers_health(c: &Chroot, binary: &Path, index: &Path) {
    let mut child = c
        .command(
            binary,
            &["serve", "--index", s(index), "--listen", "127.0.0.1:0"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("on http://").nth(1) {
                let _ = tx.send(Ok(rest.split_whitespace().next().unwrap().to_string()));
            }
            lines.push(line);
        }
        let _ = tx.send(Err(lines));
    });
    let address = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(a)) => a,
        other => {
            let _ = child.kill();
            panic!("serve did not start in the chroot: {other:?}");
        }
    };
    let text = ureq::get(&format!("http://{address}/health"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let health: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "serve exited with {status}; /health: {health}"
    );
    assert!(health.is_object(), "{health}");
}

#[test]
fn bundle_and_exported_model_run_on_a_bare_debian() {
    let missing: Vec<&str> = ["debootstrap", "patchelf", "chroot", "mount"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() || unsafe { libc::geteuid() } != 0 {
        common::skip(&format!(
            "the bare-system bundle test needs root and {} (scripts/setup.sh installs them)",
            if missing.is_empty() {
                "chroot".to_string()
            } else {
                missing.join(", ")
            }
        ));
        return;
    }
    let Some(chroot) = Chroot::new(minbase()) else {
        common::skip("cannot mount /proc in the debootstrap chroot (no CAP_SYS_ADMIN?)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // A model trained on this machine from a weights file, exported, scored here.
    write_images(&t.join("train"), 4, 0, (64, 64), Defect::None);
    write_images(&t.join("test"), 2, 900, (64, 64), Defect::Spot);
    let weights = t.join("w.safetensors");
    common::resnet18_weights(&weights, 7);
    let index = t.join("model/index.faiss");
    std::fs::create_dir_all(index.parent().unwrap()).unwrap();
    common::train_ok(
        &t.join("train"),
        &index,
        &[
            "--backbone",
            "resnet18",
            "--weights",
            s(&weights),
            "--resize",
            "64",
            "-q",
        ],
    );
    let exported = t.join("exported");
    let o = common::run(&["export", "--index", s(&index), "-o", s(&exported)]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    std::fs::remove_file(&weights).unwrap();
    let here = t.join("out-here");
    let o = common::predict(&t.join("test"), &here, &exported.join("index.faiss"));
    assert!(o.status.success(), "predict here: {}", stderr(&o));

    // The bundle of the binary under test.
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_patchcore"));
    let target = binary.parent().unwrap().parent().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("bash")
        .arg(repo.join("scripts/bundle.sh"))
        .args(["--no-build", "--out", s(&t.join("dist"))])
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(o.status.success(), "bundle.sh: {}", stderr(&o));
    let tarball = std::fs::read_dir(t.join("dist"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-linux-x86_64.tar.gz"))
        .expect("bundle.sh wrote a tarball");
    let mb = std::fs::metadata(&tarball).unwrap().len() / 1_000_000;
    assert!(mb <= 200, "the bundle is {mb} MB");

    // Into the bare system: the bundle, the exported model and the images.
    let inner = chroot.inner.clone();
    let o = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(chroot.host(&inner))
        .output()
        .unwrap();
    assert!(o.status.success(), "tar: {}", stderr(&o));
    let dir_name = tarball
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(".tar.gz", "");
    let bundle = inner.join(&dir_name);
    let bin = bundle.join("bin/patchcore");
    copy_dir(&exported, &chroot.host(&inner.join("model")));
    copy_dir(&t.join("test"), &chroot.host(&inner.join("images")));

    let o = chroot.run(&bin, &["--version"]);
    assert!(
        o.status.success(),
        "--version in the chroot: {}",
        stderr(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("patchcore "));

    let model = inner.join("model/index.faiss");
    let out = inner.join("out");
    let o = chroot.run(
        &bin,
        &[
            "predict",
            "--index",
            s(&model),
            "-i",
            s(&inner.join("images")),
            "-o",
            s(&out),
            "-q",
        ],
    );
    assert!(o.status.success(), "predict in the chroot: {}", stderr(&o));
    common::assert_same_outputs(&here, &chroot.host(&out), 1e-5, "bare system vs here");

    serve_answers_health(&chroot, &bin, &model);

    // The control: without one of its libraries the bundle cannot start there.
    let lib = chroot.host(&bundle.join("lib/libgfortran.so.5"));
    let aside = lib.with_extension("5.aside");
    std::fs::rename(&lib, &aside).unwrap();
    let o = chroot.run(&bin, &["--version"]);
    std::fs::rename(&aside, &lib).unwrap();
    assert!(!o.status.success(), "ran without libgfortran.so.5");
    assert!(stderr(&o).contains("libgfortran.so.5"), "{}", stderr(&o));
}
