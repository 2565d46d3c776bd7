//! The model pair (index and sidecar) under kills: whatever moment `train` is killed at, the
//! model at `-o` is usable, the previous one or the new one; temporary files that killed
//! runs leave are removed by a later run, only once their process is gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::stderr;
use patchcore::util::synthetic::Defect;

/// `patchcore train` of a small resnet18 model (random weights) from `train` to `index`.
fn train(train: &Path, index: &Path, seed: &str) -> Command {
    let mut c = common::bin();
    c.args(["train", "-i", train.to_str().unwrap(), "-o"])
        .arg(index)
        .args(["--backbone", "resnet18", "--weights", "random:0"])
        .args(["--resize", "64", "-s", "0.5", "--seed", seed, "-q"]);
    c
}

fn trained(t: &Path, index: &Path, seed: &str) {
    let o = train(t, index, seed).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Image scores of predict with `index` on `test`, in file order.
fn scores(test: &Path, index: &Path, out: &Path) -> Vec<f64> {
    let o = common::predict(test, out, index);
    assert!(o.status.success(), "predict: {}", stderr(&o));
    csv::Reader::from_path(out.join("results.csv"))
        .unwrap()
        .records()
        .map(|r| r.unwrap()[1].parse().unwrap())
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

fn side(index: &Path) -> PathBuf {
    patchcore::model::bank::sidecar_path(index)
}

/// A folder of training images, one of test images, and an old and a new model trained
/// elsewhere from them (training is deterministic): what a kill may leave is one of these.
struct Setup {
    root: tempfile::TempDir,
    train: PathBuf,
    test: PathBuf,
    old: (Vec<u8>, Vec<u8>),
    old_scores: Vec<f64>,
    new_index: Vec<u8>,
    new_scores: Vec<f64>,
}

fn setup(images: usize) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let train = root.path().join("train");
    common::write_images(&train, images, 0, (64, 64), Defect::None);
    let test = root.path().join("test");
    common::write_images(&test, 2, 500, (64, 64), Defect::Spot);
    let (old, new) = (root.path().join("old.faiss"), root.path().join("new.faiss"));
    trained(&train, &old, "1");
    trained(&train, &new, "2");
    let old_scores = scores(&test, &old, &root.path().join("out_old"));
    let new_scores = scores(&test, &new, &root.path().join("out_new"));
    assert_ne!(old_scores, new_scores, "the two models must tell apart");
    Setup {
        old: (
            std::fs::read(&old).unwrap(),
            std::fs::read(side(&old)).unwrap(),
        ),
        new_index: std::fs::read(&new).unwrap(),
        train,
        test,
        old_scores,
        new_scores,
        root,
    }
}

impl Setup {
    /// A model folder holding the old model.
    fn model_folder(&self, name: &str) -> PathBuf {
        let index = self.root.path().join(name).join("index.faiss");
        std::fs::create_dir_all(index.parent().unwrap()).unwrap();
        std::fs::write(&index, &self.old.0).unwrap();
        std::fs::write(side(&index), &self.old.1).unwrap();
        index
    }

    /// Which model `index` is now ("old" or "new"), checked to be whole and usable: predict
    /// works with it and scores as that model does.
    fn usable(&self, index: &Path, when: &str) -> &'static str {
        let now = std::fs::read(index).unwrap();
        let (which, want) = if now == self.old.0 {
            ("old", &self.old_scores)
        } else if now == self.new_index {
            ("new", &self.new_scores)
        } else {
            panic!("{when}: the index is neither the old nor the new one")
        };
        let out = index.with_file_name(format!("out {when}"));
        assert_eq!(&scores(&self.test, index, &out), want, "{when}: {which}");
        which
    }
}

#[test]
fn a_kill_between_the_two_renames_leaves_the_new_model_usable() {
    let s = setup(8);
    let index = s.model_folder("model");
    let o = train(&s.train, &index, "2")
        .env(patchcore::model::bank::KILL_BETWEEN_RENAMES, "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(9), "killed: {}", stderr(&o));
    // The kill landed between the renames: new index, old sidecar, and the new sidecar under
    // its temporary name.
    assert_eq!(std::fs::read(&index).unwrap(), s.new_index);
    assert_eq!(std::fs::read(side(&index)).unwrap(), s.old.1);
    let pending = names(index.parent().unwrap());
    assert!(
        pending
            .iter()
            .any(|n| n.starts_with(".index.faiss.json.tmp-")),
        "{pending:?}"
    );
    // Readers take the new sidecar.
    assert_eq!(s.usable(&index, "after the kill"), "new");
    let info = patchcore::model::bank::read_info(&index).unwrap();
    assert_eq!(info.seed, 2);
    // calibrate takes it too, and writes a sidecar file that matches the index.
    let o = common::run(&[
        "calibrate",
        "-i",
        s.train.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "calibrate: {}", stderr(&o));
    let text = std::fs::read_to_string(side(&index)).unwrap();
    let written: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sha = patchcore::util::fsutil::sha256_file(&index).unwrap();
    assert_eq!(written["index_sha256"].as_str(), Some(sha.as_str()));
    assert_eq!(written["seed"], 2);

    // The next train finishes the pair first and is itself killed between the renames: still
    // usable. A last one completes, and no temporary file is left.
    let o = train(&s.train, &index, "1")
        .env(patchcore::model::bank::KILL_BETWEEN_RENAMES, "1")
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(9), "killed: {}", stderr(&o));
    assert_eq!(s.usable(&index, "after the second kill"), "old");
    trained(&s.train, &index, "2");
    assert_eq!(s.usable(&index, "after a full run"), "new");
    let left: Vec<String> = names(index.parent().unwrap())
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn kills_at_any_moment_of_train_leave_a_usable_model() {
    let s = setup(16);
    let t = Instant::now();
    trained(&s.train, &s.root.path().join("timed.faiss"), "2");
    let full_run = t.elapsed();
    // A kill known to land mid-extraction (train paused after its first batch by the
    // test-only hook) leaves the old model, unchanged.
    let index = s.model_folder("paused");
    let pause = s.root.path().join("batches.txt");
    let mut child = train(&s.train, &index, "2")
        .args(["-b", "2"])
        .env(patchcore::commands::train::PAUSE_FOR_TESTS, &pause)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&pause).is_ok_and(|t| t.contains('\n')) {
        assert!(
            Instant::now() < deadline,
            "train never reached its first batch"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    assert_eq!(s.usable(&index, "kill mid-extraction"), "old");
    assert_eq!(
        std::fs::read(&index).unwrap(),
        s.old.0,
        "old index unchanged"
    );
    assert_eq!(
        std::fs::read(side(&index)).unwrap(),
        s.old.1,
        "old sidecar unchanged"
    );
    // Kills spread over the run: whatever the moment, old or new (`usable` panics otherwise).
    let mut outcomes = Vec::new();
    for percent in [10u32, 30, 50, 70, 80, 90, 95, 100, 105] {
        let when = format!("kill at {percent}%");
        let index = s.model_folder(&format!("m{percent}"));
        let mut child = train(&s.train, &index, "2").spawn().unwrap();
        std::thread::sleep(full_run * percent / 100);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        outcomes.push(s.usable(&index, &when));
    }
    // Where they landed varies with the machine's load: reported, not checked.
    eprintln!("full run {full_run:?}: {outcomes:?}");
}

#[test]
fn stale_temporary_files_of_gone_processes_are_removed_by_the_next_train() {
    let s = setup(8);
    let index = s.model_folder("model");
    let dir = index.parent().unwrap();
    // A process that is gone (reaped), and one that runs: this test's.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let (gone, alive) = (gone.id(), std::process::id());
    let stale = [
        format!(".index.faiss.tmp-{gone}-a1B2c3"),
        format!(".index.faiss.json.tmp-{gone}-a1B2c3"),
        format!(".index.faiss.features.tmp-{gone}-spill"),
    ];
    let kept = [
        format!(".index.faiss.tmp-{alive}-a1B2c3"),
        format!(".index.faiss.json.tmp-{alive}-d4E5f6"),
        // Not ours: another name, or not our pattern.
        format!(".other.faiss.tmp-{gone}-a1B2c3"),
        ".index.faiss.tmpA1b2C3".to_string(),
        format!("index.faiss.tmp-{gone}-a1B2c3"),
    ];
    for name in stale.iter().chain(&kept) {
        std::fs::write(dir.join(name), "partial").unwrap();
    }
    trained(&s.train, &index, "2");
    let mut want: Vec<String> = kept.to_vec();
    want.extend(["index.faiss", "index.faiss.json"].map(String::from));
    want.sort();
    assert_eq!(names(dir), want);
    assert_eq!(s.usable(&index, "after cleaning"), "new");
}

/// A reader that read the sidecar just before another run replaced the model loads the new
/// pair (with its sidecar), instead of refusing a mismatch.
#[test]
fn a_model_replaced_after_its_sidecar_was_read_loads_as_the_new_one() {
    let s = setup(6);
    let index = s.model_folder("model");
    let stale = patchcore::model::bank::read_info(&index).unwrap();
    let new_side = std::fs::read(side(&s.root.path().join("new.faiss"))).unwrap();
    std::fs::write(&index, &s.new_index).unwrap();
    std::fs::write(side(&index), &new_side).unwrap();
    let fresh = patchcore::model::bank::read_info(&index).unwrap();
    assert_ne!(stale.index_sha256, fresh.index_sha256, "a different model");
    let model =
        patchcore::model::single::SingleModel::load(&index, stale, None, tch::Device::Cpu, true)
            .unwrap();
    assert_eq!(model.info.index_sha256, fresh.index_sha256);
    // A damaged index under an unchanged sidecar is still refused.
    let mut bad = s.new_index.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 1;
    std::fs::write(&index, &bad).unwrap();
    let err =
        patchcore::model::single::SingleModel::load(&index, fresh, None, tch::Device::Cpu, true)
            .err()
            .expect("refused");
    assert!(
        format!("{err:#}").contains("does not match its sidecar"),
        "{err:#}"
    );
}
