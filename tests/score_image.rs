//! The library's front door (`patchcore::api`) against the binary: `examples/score_image`
//! prints the score predict writes for the same image, and `Detector` gives predict's
//! scores, verdicts and heatmaps, for a single model and an ensemble; `api::train` trains
//! the model `patchcore train` trains from the same images. Exactly equal, batch for batch:
//! one image scored alone is compared with `predict --batch-size 1`, a batch with predict's
//! batch of the same images (the backbone's convolutions round differently by batch size,
//! as tests/serve.rs notes).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use patchcore::api::{self, Detector, TrainSettings};
use patchcore::util::synthetic::Defect;

/// The example's binary, built if `cargo test` was asked for other targets only.
fn example() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_patchcore"));
    let dir = bin.parent().unwrap();
    let path = dir.join("examples").join("score_image");
    if !path.is_file() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--locked", "--example", "score_image"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "cannot build examples/score_image");
    }
    path
}

/// `(path, score, verdict)` of every row of predict's results.csv.
fn results(out: &Path) -> Vec<(String, String, String)> {
    let mut r = csv::Reader::from_path(out.join("results.csv")).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            (rec[0].to_string(), rec[1].to_string(), rec[3].to_string())
        })
        .collect()
}

/// Test images ROOT/test/{good,scratch}/NNN.png.
fn test_images(root: &Path) -> PathBuf {
    let test = root.join("test");
    write_images(&test.join("good"), 2, 500, (64, 64), Defect::None);
    write_images(&test.join("scratch"), 2, 600, (64, 64), Defect::Scratch);
    test
}

/// Every test image's predict score, verdict and heatmap against `Detector`'s.
fn assert_detector_matches_predict(index: &Path, test: &Path, out: &Path) {
    let o = predict(test, out, index);
    assert!(o.status.success(), "predict: {}", stderr(&o));
    let rows = results(out);
    assert_eq!(rows.len(), 4);
    let mut detector = Detector::load(index).unwrap();
    let images: Vec<image::DynamicImage> = rows
        .iter()
        .map(|(p, _, _)| image::open(test.join(p)).unwrap())
        .collect();
    let batch = detector.score_batch(&images).unwrap();
    for ((path, score, verdict), scored) in rows.iter().zip(&batch) {
        assert_eq!(&scored.score.to_string(), score, "{path}");
        let said = scored
            .anomalous
            .map(|a| if a { "anomalous" } else { "good" });
        assert_eq!(said.unwrap_or(""), verdict, "{path}");
        let npy = out.join(path).with_extension("npy");
        let heat: ndarray::Array2<f32> = ndarray_npy::read_npy(&npy).unwrap();
        assert_eq!(heat, scored.heatmap, "{path}");
    }
    // One at a time: predict's numbers with batches of one image.
    let alone = out.with_extension("b1");
    let o = predict_with(test, &alone, index, &["-q", "-b", "1"]);
    assert!(o.status.success(), "predict -b 1: {}", stderr(&o));
    for (path, score, verdict) in results(&alone) {
        let one = detector
            .score(&image::open(test.join(&path)).unwrap())
            .unwrap();
        assert_eq!(one.score.to_string(), score, "{path} alone");
        let said = one.anomalous.map(|a| if a { "anomalous" } else { "good" });
        assert_eq!(said.unwrap_or(""), verdict, "{path} alone");
        let npy = alone.join(&path).with_extension("npy");
        let heat: ndarray::Array2<f32> = ndarray_npy::read_npy(&npy).unwrap();
        assert_eq!(heat, one.heatmap, "{path} alone");
    }
}

#[test]
fn example_prints_predicts_score() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let test = test_images(root.path());
    let out = root.path().join("out");
    let o = predict_with(&test, &out, &index, &["-q", "-b", "1"]);
    assert!(o.status.success(), "predict: {}", stderr(&o));
    let example = example();
    for (path, score, _) in results(&out) {
        let o = Command::new(&example)
            .args([s(&index), s(&test.join(&path))])
            .output()
            .unwrap();
        assert!(o.status.success(), "score_image: {}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), score, "{path}");
    }
}

#[test]
fn detector_gives_predicts_numbers_for_a_model_and_an_ensemble() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let test = test_images(root.path());
    assert_detector_matches_predict(&index, &test, &root.path().join("single"));

    let ens = root.path().join("ensemble/index.faiss");
    std::fs::create_dir_all(ens.parent().unwrap()).unwrap();
    let backbones = ["--backbone", "resnet18", "--backbone", "resnet34"];
    let extra = [
        "--weights",
        "random:0",
        "--resize",
        "64",
        "-s",
        "0.25",
        "-q",
    ];
    train_ok(
        &root.path().join("train"),
        &ens,
        &[&backbones[..], &extra].concat(),
    );
    assert_detector_matches_predict(&ens, &test, &root.path().join("ens"));
}

#[test]
fn api_train_matches_the_command() {
    let root = tempfile::tempdir().unwrap();
    let by_command = train_resnet18_small(root.path(), &[]);
    let train_dir = root.path().join("train");
    let mut images: Vec<PathBuf> = std::fs::read_dir(&train_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    let by_api = root.path().join("api/index.faiss");
    let settings = TrainSettings {
        backbones: vec!["resnet18".into()],
        weights: Some("random:0".into()),
        sampling_ratio: 0.25,
        resize: Some(64),
        ..Default::default()
    };
    api::train(&images, &by_api, &settings).unwrap();
    assert_eq!(
        std::fs::read(&by_command).unwrap(),
        std::fs::read(&by_api).unwrap(),
        "the index trained through the library differs from train's"
    );
}
