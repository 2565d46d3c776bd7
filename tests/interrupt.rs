//! Interrupted training: Ctrl-C stops cleanly; a kill at any moment leaves the previous model
//! or a complete new one at `-o`, never a partial file.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use patchcore::synthetic::Defect;

fn spawn_train(train: &Path, index: &Path, seed: &str) -> Child {
    common::bin()
        .args([
            "train",
            "-i",
            train.to_str().unwrap(),
            "-o",
            index.to_str().unwrap(),
            "--weights",
            "random:0",
            "--resize",
            "96",
            "-s",
            "0.5",
            "--seed",
            seed,
            "-q",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

#[test]
fn ctrl_c_stops_cleanly_and_keeps_the_old_model() {
    let root = tempfile::tempdir().unwrap();
    let train = root.path().join("train");
    common::write_images(&train, 24, 0, (96, 96), Defect::None);
    let index = root.path().join("index.faiss");
    let o = spawn_train(&train, &index, "1").wait_with_output().unwrap();
    assert!(o.status.success());
    let old = std::fs::read(&index).unwrap();

    let child = spawn_train(&train, &index, "2");
    // Wait until the process catches SIGINT (bit 1 of SigCgt), then a little into the work.
    let status = format!("/proc/{}/status", child.id());
    let catches_sigint = || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("SigCgt:"))?.to_string();
                u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
            })
            .is_some_and(|mask| mask & 0x2 != 0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !catches_sigint() {
        assert!(
            std::time::Instant::now() < deadline,
            "train never installed its handler"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        // Finished before the signal arrived: the new model is complete.
        eprintln!("training finished before Ctrl-C; nothing to check");
        return;
    }
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("error: interrupted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(&index).unwrap(), old, "old model untouched");
    assert!(
        temp_files(root.path()).is_empty(),
        "{:?}",
        temp_files(root.path())
    );
}

#[test]
fn kill_at_any_moment_leaves_old_or_complete_model() {
    let root = tempfile::tempdir().unwrap();
    let train = root.path().join("train");
    common::write_images(&train, 12, 0, (96, 96), Defect::None);
    // The complete result (training is deterministic) and an older model to replace.
    let fresh = root.path().join("fresh.faiss");
    assert!(spawn_train(&train, &fresh, "3").wait().unwrap().success());
    let new = std::fs::read(&fresh).unwrap();
    let old_index = root.path().join("old.faiss");
    assert!(spawn_train(&train, &old_index, "4")
        .wait()
        .unwrap()
        .success());
    let old = std::fs::read(&old_index).unwrap();
    let old_side = std::fs::read(root.path().join("old.faiss.json")).unwrap();

    let target = root.path().join("model/index.faiss");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    for delay_ms in [50u64, 300, 700, 1200, 1800, 2500] {
        std::fs::write(&target, &old).unwrap();
        std::fs::write(target.with_extension("faiss.json"), &old_side).unwrap();
        let mut child = spawn_train(&train, &target, "3");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let now = std::fs::read(&target).unwrap();
        assert!(
            now == old || now == new,
            "partial model after a kill at {delay_ms} ms"
        );
    }
}
