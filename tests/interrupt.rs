//! Interrupted training: Ctrl-C stops cleanly; a kill at any moment leaves the previous model
//! or a complete new one at `-o`, never a partial file.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use patchcore::util::synthetic::Defect;

fn spawn_train(train: &Path, index: &Path, seed: &str) -> Child {
    spawn_train_with(train, index, seed, None)
}

/// `train`, paused after its first batch of features when `pause` names a file (the test-only
/// hook `train::PAUSE_FOR_TESTS`, which writes a line there per batch kept).
fn spawn_train_with(train: &Path, index: &Path, seed: &str, pause: Option<&Path>) -> Child {
    let mut c = common::bin();
    if let Some(p) = pause {
        c.env(patchcore::commands::train::PAUSE_FOR_TESTS, p);
    }
    c.args([
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
        "-b",
        "2",
        "-q",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// Waits (at most a minute) for the paused run to write its first line to `pause`.
fn wait_until_paused(pause: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(pause).is_ok_and(|t| t.contains('\n')) {
        assert!(
            Instant::now() < deadline,
            "train never reached its first batch"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
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
    // 8 images in batches of 2: the run pauses after the first batch (a test-only hook), with
    // three more to extract, and the coreset to select, when Ctrl-C arrives.
    common::write_images(&train, 8, 0, (96, 96), Defect::None);
    let index = root.path().join("index.faiss");
    let o = spawn_train(&train, &index, "1").wait_with_output().unwrap();
    assert!(o.status.success());
    let old = std::fs::read(&index).unwrap();
    let old_side = std::fs::read(index.with_extension("faiss.json")).unwrap();

    let pause = root.path().join("batches.txt");
    let child = spawn_train_with(&train, &index, "2", Some(&pause));
    wait_until_paused(&pause);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("error: interrupted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Stopped at the next safe point: no batch kept after the one Ctrl-C interrupted.
    assert_eq!(
        std::fs::read_to_string(&pause).unwrap(),
        "batch 1\n",
        "batches kept"
    );
    assert_eq!(std::fs::read(&index).unwrap(), old, "old model untouched");
    assert_eq!(
        std::fs::read(index.with_extension("faiss.json")).unwrap(),
        old_side,
        "old sidecar untouched"
    );
    assert!(
        temp_files(root.path()).is_empty(),
        "{:?}",
        temp_files(root.path())
    );
}

/// The SHA-256 the model's sidecar records for its index (as the loader reads it: after a kill
/// between the two renames, the new sidecar under its temporary name), and the index's own.
fn recorded_and_actual_sha256(index: &Path) -> (String, String) {
    let recorded = patchcore::model::bank::read_info(index)
        .unwrap()
        .index_sha256;
    (
        recorded,
        patchcore::util::fsutil::sha256_file(index).unwrap(),
    )
}

#[test]
fn kill_at_any_moment_leaves_old_or_complete_model() {
    let root = tempfile::tempdir().unwrap();
    let train = root.path().join("train");
    common::write_images(&train, 12, 0, (96, 96), Defect::None);
    let test = root.path().join("test");
    common::write_images(&test, 1, 500, (96, 96), Defect::Spot);
    // The complete result (training is deterministic), how long it takes, and an older model
    // to replace.
    let fresh = root.path().join("fresh.faiss");
    let t = Instant::now();
    assert!(spawn_train(&train, &fresh, "3").wait().unwrap().success());
    let full_run = t.elapsed();
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
    // A kill mid-extraction (paused there by the test-only hook) leaves the old model.
    std::fs::write(&target, &old).unwrap();
    std::fs::write(target.with_extension("faiss.json"), &old_side).unwrap();
    let pause = root.path().join("batches.txt");
    let mut child = spawn_train_with(&train, &target, "3", Some(&pause));
    wait_until_paused(&pause);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    assert_eq!(std::fs::read(&target).unwrap(), old, "kill mid-extraction");
    assert_eq!(
        std::fs::read(target.with_extension("faiss.json")).unwrap(),
        old_side,
        "kill mid-extraction"
    );
    let mut outcomes = Vec::new();
    // Kills spread over the whole run, from start-up to the writing of the model, and one
    // (0) at the first sign of the new model on disk.
    for percent in [5u32, 25, 45, 65, 85, 95, 102, 0] {
        let delay = full_run * percent / 100;
        std::fs::write(&target, &old).unwrap();
        std::fs::write(target.with_extension("faiss.json"), &old_side).unwrap();
        let mut child = spawn_train(&train, &target, "3");
        if percent == 0 {
            // The moment the model on disk changes: between the writes of index and sidecar.
            let side = target.with_extension("faiss.json");
            let deadline = Instant::now() + full_run * 3;
            while std::fs::read(&target).is_ok_and(|b| b == old)
                && std::fs::read(&side).is_ok_and(|b| b == old_side)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            std::thread::sleep(delay);
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let now = std::fs::read(&target).unwrap();
        let which = if now == old {
            "old"
        } else if now == new {
            "new"
        } else {
            panic!("partial model after a kill at {delay:?}")
        };
        // The sidecar beside it is the index's own, and the model works.
        let (recorded, actual) = recorded_and_actual_sha256(&target);
        assert_eq!(
            recorded, actual,
            "{which} index with another model's sidecar after a kill at {delay:?}"
        );
        let out = root.path().join(format!("out{percent}"));
        let o = common::predict(&test, &out, &target);
        assert!(
            o.status.success(),
            "predict after a kill at {delay:?}: {}",
            common::stderr(&o)
        );
        outcomes.push(which);
    }
    // Where the kills landed varies with the machine's load: reported, not checked.
    eprintln!("full run {full_run:?}: {outcomes:?}");
}
