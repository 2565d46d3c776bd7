//! A small integration run on the real MVTec AD "screw" category, read in place from
//! ../shared/data/mvtec_ad/screw (or $PATCHCORE_MVTEC/screw). Skipped, with a message, when the
//! data is absent (a failure in CI). The full-category run is a benchmark, not a test.

mod common;

use std::path::{Path, PathBuf};

use ndarray::Array2;
use ndarray_npy::read_npy;

fn screw() -> Option<PathBuf> {
    let base = std::env::var_os("PATCHCORE_MVTEC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mvtec_ad"));
    let dir = base.join("screw");
    dir.join("train/good").is_dir().then_some(dir)
}

/// Links (not copies: the data's licence keeps it out of this repo) `n` files of `from`.
fn link_subset(from: &Path, to: &Path, n: usize) {
    std::fs::create_dir_all(to).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files.into_iter().take(n) {
        std::os::unix::fs::symlink(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

#[test]
fn screw_subset_paper_protocol() {
    let Some(dir) = screw() else {
        common::skip(
            "MVTec AD screw not found (../shared/data/mvtec_ad/screw or $PATCHCORE_MVTEC)",
        );
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    link_subset(&dir.join("train/good"), &r.join("train"), 8);
    link_subset(&dir.join("test/good"), &r.join("test/good"), 4);
    link_subset(
        &dir.join("test/scratch_head"),
        &r.join("test/scratch_head"),
        4,
    );
    let index = r.join("index.faiss");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = common::run(&[
        "train",
        "-i",
        &s(&r.join("train")),
        "-o",
        &s(&index),
        "--weights",
        "random:0",
        "--resize",
        "256",
        "--crop",
        "224",
        "-q",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("index.faiss.json")).unwrap())
            .unwrap();
    assert_eq!(side["training"]["patches"], 8 * 28 * 28);
    assert_eq!(side["bank_size"], 8 * 28 * 28 / 10);
    assert_eq!(
        side["training"]["image_sizes"][0],
        serde_json::json!([1024, 1024, 8])
    );

    let out = r.join("out");
    let o = common::run(&[
        "predict",
        "-i",
        &s(&r.join("test")),
        "-o",
        &s(&out),
        "--index",
        &s(&index),
        "-q",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for name in ["good/000", "scratch_head/001"] {
        let heat: Array2<f32> = read_npy(out.join(format!("{name}.npy"))).unwrap();
        assert_eq!(heat.dim(), (1024, 1024));
        assert!(heat.iter().all(|v| v.is_finite() && *v >= 0.0));
        // The crop covers the centre (64..960 of 1024 after 256/224): the border is 0.
        assert_eq!(heat[[0, 0]], 0.0);
        assert!(heat[[512, 512]] > 0.0);
        assert!(out.join(format!("{name}.jpg")).exists());
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 9);

    // The heatmaps lean towards the scratches (random weights, 8 training images: far from
    // the paper's numbers, yet above chance): pixel AUROC over the eight test images against
    // the ground-truth masks (good images: every pixel good). Constant heatmaps give 0.5,
    // inverted ones 1 - AUROC.
    let outputs = common::predict_outputs(&out);
    let mut pixels: Vec<(f32, bool)> = Vec::with_capacity(4 << 20);
    for (name, _, heat) in &outputs {
        let mask: Vec<bool> = match name.strip_prefix("scratch_head/") {
            Some(file) => {
                let m = dir
                    .join("ground_truth/scratch_head")
                    .join(file.replace(".png", "_mask.png"));
                image::open(m)
                    .unwrap()
                    .into_luma8()
                    .iter()
                    .map(|&v| v > 0)
                    .collect()
            }
            None => vec![false; heat.len()],
        };
        assert_eq!(mask.len(), heat.len(), "{name}");
        // Inside the crop only (64..960): outside, every pixel is 0.
        let inside = |k: &usize| (64..960).contains(&(k / 1024)) && (64..960).contains(&(k % 1024));
        pixels.extend(
            heat.iter()
                .copied()
                .zip(mask)
                .enumerate()
                .filter(|(k, _)| inside(k))
                .map(|(_, p)| p),
        );
    }
    let pixel_auroc = auroc(&mut pixels);
    eprintln!(
        "pixel AUROC {pixel_auroc:.4}; image scores {:?}",
        outputs.iter().map(|(n, s, _)| (n, s)).collect::<Vec<_>>()
    );
    assert!(
        pixel_auroc >= PIXEL_AUROC_BOUND,
        "pixel AUROC {pixel_auroc}"
    );
    // And every scratched screw scores above every good one (measured: 47.2 to 56.9 against
    // 39.6 to 43.9; constant scores tie, inverted ones order the other way).
    let (good, bad): (Vec<_>, Vec<_>) =
        outputs.iter().partition(|(n, _, _)| n.starts_with("good/"));
    let top_good = good.iter().map(|g| g.1).fold(f32::MIN, f32::max);
    for (name, score, _) in bad {
        assert!(
            *score > top_good,
            "{name}: {score}, a good image scores {top_good}"
        );
    }

    // The default kNN (auto: here the pruned search) against FAISS's on real features:
    // scores and heatmaps within 5e-4 (relative to the image score / heatmap maximum).
    let faiss_out = r.join("out-faiss");
    let o = common::bin()
        .env(patchcore::knn::METHOD_ENV, "faiss")
        .args(["predict", "-i", &s(&r.join("test")), "-o", &s(&faiss_out)])
        .args(["--index", &s(&index), "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(common::predict_outputs(&out).len(), 8);
    common::assert_same_outputs(&out, &faiss_out, 5e-4, "auto vs faiss");
}

/// Measured 0.553 on this subset inside the crop (random:0 weights, 8 training images: the
/// heatmaps barely localise the scratches); the bound leaves room for libtorch's and FAISS's
/// rounding across machines, and is above chance (0.5, constant heatmaps) and inversion
/// (0.447). Outside the crop every pixel is 0, which alone would lift an inverted map above it.
const PIXEL_AUROC_BOUND: f64 = 0.53;

/// The area under the ROC curve of `(score, positive)` pairs (ties count half).
fn auroc(v: &mut [(f32, bool)]) -> f64 {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = v.iter().filter(|p| p.1).count() as f64;
    let negatives = v.len() as f64 - positives;
    // Sum of the positives' ranks (1-based, ties averaged).
    let (mut rank_sum, mut i) = (0f64, 0);
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            j += 1;
        }
        let mid = (i + j + 1) as f64 / 2.0;
        rank_sum += mid * v[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}
