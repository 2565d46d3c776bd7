//! Command-line options each checked for their effect: `--pixel-threshold` alone,
//! `--timings`, `--threads`, `--layers`, `--device cuda` without a GPU, `predict --weights`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails_naming, json, s, stderr, write_images, RESNET18_64};
use ndarray::Array2;
use patchcore::util::synthetic::Defect;
use serde_json::Value;

/// A resnet18 model (random weights, 64 px) on 10 good images (5 held out: calibrated) and a
/// test folder with good images and spots. Returns (root, index).
fn calibrated(extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 10, 0, (80, 64), Defect::None);
    common::write_test_images(r, (80, 64), 2, 0, 2);
    let index = r.join("index.faiss");
    common::train_ok(
        &r.join("train"),
        &index,
        &[RESNET18_64, &["-q"], extra].concat(),
    );
    (root, index)
}

/// Predicts `test` into `out` as JSON; returns results.json.
fn predict_json(r: &Path, index: &Path, out: &str, extra: &[&str]) -> Value {
    let mut args = vec!["-q", "--format", "json"];
    args.extend_from_slice(extra);
    let o = common::predict_with(&r.join("test"), &r.join(out), index, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    json(&r.join(out).join("results.json"))
}

fn npy(path: &Path) -> Array2<f32> {
    ndarray_npy::read_npy(path).unwrap()
}

#[test]
fn pixel_threshold_alone_moves_masks_not_verdicts() {
    let (root, index) = calibrated(&[]);
    let r = root.path();
    let base = predict_json(r, &index, "base", &[]);
    // A pixel threshold inside the spot image's heatmap range: a mask neither empty nor full.
    let heat = npy(&r.join("base/spot/000.npy"));
    let mut values: Vec<f32> = heat.iter().copied().collect();
    values.sort_by(f32::total_cmp);
    let p = values[values.len() * 9 / 10];
    assert!(
        (p - base["thresholds"]["pixel"].as_f64().unwrap() as f32).abs() > 1e-3 * p,
        "the test needs a threshold other than the calibrated one"
    );
    let run = predict_json(r, &index, "p", &["--pixel-threshold", &p.to_string()]);
    assert_eq!(run["thresholds"]["pixel"].as_f64().unwrap() as f32, p);
    assert_eq!(
        run["thresholds"]["image"], base["thresholds"]["image"],
        "the image threshold stays the model's"
    );
    for (a, b) in run["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(base["results"].as_array().unwrap())
    {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(
            a["verdict"], b["verdict"],
            "verdicts follow the image threshold"
        );
        assert_eq!(a["score"], b["score"]);
        let stem = a["path"].as_str().unwrap().trim_end_matches(".png");
        let heat = npy(&r.join(format!("p/{stem}.npy")));
        let mask = image::open(r.join(format!("p/{stem}_mask.png")))
            .unwrap()
            .to_luma8();
        let mut set = 0u64;
        for ((y, x), &v) in heat.indexed_iter() {
            let m = mask.get_pixel(x as u32, y as u32)[0];
            assert_eq!(m == 255, v > p, "{stem} ({x}, {y}): {v} vs {p}");
            set += (m == 255) as u64;
        }
        let area: u64 = a["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["area"].as_u64().unwrap())
            .sum();
        assert_eq!(area, set, "{stem}: regions cover the mask");
    }
    let spot_mask = image::open(r.join("p/spot/000_mask.png"))
        .unwrap()
        .to_luma8();
    let on = spot_mask.pixels().filter(|px| px[0] == 255).count();
    assert!(
        on > 0 && on < (80 * 64) / 5,
        "{on} pixels above the 90th percentile"
    );

    // Without a calibrated image threshold it is refused, saying what is missing.
    let (root, index) = calibrated(&["--calibration-ratio", "0"]);
    let o = common::predict_with(
        &root.path().join("test"),
        &root.path().join("x"),
        &index,
        &["-q", "--pixel-threshold", "1"],
    );
    assert_fails_naming(&o, &["--pixel-threshold", "--threshold"]);
}

#[test]
fn timings_and_threads() {
    let (root, index) = calibrated(&[]);
    let r = root.path();
    let mut scores = Vec::new();
    // Two thread counts that cannot both be the default, whatever the machine.
    for threads in [1u64, 3] {
        let out = format!("t{threads}");
        let timings = r.join(format!("timings{threads}.json"));
        let run = predict_json(
            r,
            &index,
            &out,
            &["--threads", &threads.to_string(), "--timings", s(&timings)],
        );
        let t = json(&timings);
        assert_eq!(t["images"], 4, "{t}");
        assert_eq!(t["threads"], threads, "libtorch runs with --threads: {t}");
        let stages: f64 = ["features_s", "knn_s", "heatmap_and_write_s"]
            .iter()
            .map(|k| {
                let v = t[k].as_f64().unwrap();
                assert!(v > 0.0, "{k}: {t}");
                v
            })
            .sum();
        let total = t["total_s"].as_f64().unwrap();
        assert!(stages <= total && total < 120.0, "{t}");
        scores.push(
            run["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["score"].as_f64().unwrap())
                .collect::<Vec<_>>(),
        );
    }
    for (a, b) in scores[0].iter().zip(&scores[1]) {
        assert!((a - b).abs() <= 1e-4 * a, "the same scores: {a} vs {b}");
    }
    let o = common::predict_with(&r.join("test"), &r.join("z"), &index, &["--threads", "0"]);
    assert_fails_naming(&o, &["--threads"]);
}

#[test]
fn layers_from_the_command_line() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 3, 0, (64, 64), Defect::None);
    write_images(&r.join("test"), 1, 700, (80, 64), Defect::Spot);
    let index = r.join("l.faiss");
    common::train_ok(
        &r.join("train"),
        &index,
        &[RESNET18_64, &["--layers", "layer1, layer3", "-q"]].concat(),
    );
    let side = json(&r.join("l.faiss.json"));
    assert_eq!(side["layers"], serde_json::json!(["layer1", "layer3"]));
    assert_eq!(side["layer_channels"], serde_json::json!([64, 256]));
    // layer1 sets the grid: stride 4, 16 x 16 patches per 64 x 64 image.
    assert_eq!(side["training"]["patches"], 3 * 16 * 16);
    let o = common::predict(&r.join("test"), &r.join("out"), &index);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(npy(&r.join("out/000.npy")).dim(), (64, 80));

    let o = common::train(
        &r.join("train"),
        &r.join("bad.faiss"),
        &["--weights", "random:0", "--layers", "layer2,layer9"],
    );
    assert_fails_naming(&o, &["layer9"]);
}

#[test]
fn device_cuda_without_a_gpu_is_one_clear_line() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 2, 0, (64, 64), Defect::None);
    let o = common::train(
        &r.join("train"),
        &r.join("c.faiss"),
        &[RESNET18_64, &["--device", "cuda", "-q"]].concat(),
    );
    if patchcore::util::runtime::cuda_is_available() {
        // A machine with a GPU: the option works.
        assert!(o.status.success(), "{}", stderr(&o));
        return;
    }
    assert_fails_naming(&o, &["--device cuda", "no CUDA device"]);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(!r.join("c.faiss").exists());
}

#[test]
fn predict_weights_points_to_moved_weights_and_refuses_others() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 2, 0, (64, 64), Defect::None);
    write_images(&r.join("test"), 1, 700, (64, 64), Defect::Spot);
    let weights = r.join("w.safetensors");
    common::resnet18_weights(&weights, 1);
    let index = r.join("w.faiss");
    let o = common::train(
        &r.join("train"),
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
    assert!(o.status.success(), "{}", stderr(&o));
    let o = common::predict(&r.join("test"), &r.join("a"), &index);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(r.join("a/000.npy")).unwrap();

    // Moved: predict says so and names --weights; with --weights, the same results.
    let moved = r.join("elsewhere.safetensors");
    std::fs::rename(&weights, &moved).unwrap();
    let o = common::predict(&r.join("test"), &r.join("b"), &index);
    assert_fails_naming(&o, &["w.safetensors", "--weights"]);
    let o = common::predict_with(
        &r.join("test"),
        &r.join("c"),
        &index,
        &["-q", "--weights", s(&moved)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(r.join("c/000.npy")).unwrap(), before);

    // Other weights of the same shape are refused by checksum, named.
    let other = r.join("other.safetensors");
    common::resnet18_weights(&other, 2);
    for spec in [s(&other), "random:0"] {
        let o = common::predict_with(
            &r.join("test"),
            &r.join("d"),
            &index,
            &["-q", "--weights", spec],
        );
        assert_fails_naming(&o, &["differ", spec]);
    }
    assert!(!r.join("d/results.csv").exists());
}
