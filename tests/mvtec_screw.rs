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

    // Every scratched screw scores above every good one (measured: 47.2 to 56.9 against 39.6
    // to 43.9; constant scores tie, inverted ones order the other way). The heatmaps are not
    // checked to localise the scratches: with random weights they do not (pixel AUROC 0.553
    // over these images, and an injected per-image inversion of the heatmaps kept it above
    // 0.53, the image scores' spread dominating it).
    let outputs = common::predict_outputs(&out);
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
        .env(patchcore::model::knn::METHOD_ENV, "faiss")
        .args(["predict", "-i", &s(&r.join("test")), "-o", &s(&faiss_out)])
        .args(["--index", &s(&index), "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(common::predict_outputs(&out).len(), 8);
    common::assert_same_outputs(&out, &faiss_out, 5e-4, "auto vs faiss");
}
