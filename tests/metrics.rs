//! Evaluation metrics against independent references computed in this run: scikit-learn
//! (`roc_auc_score`, `precision_recall_curve`), `scipy.ndimage.label`, and a straightforward
//! per-threshold AUPRO (tests/reference/metrics_reference.py).
//!
//! Needs the Python environment made by scripts/setup.sh; the tests fail (not skip) without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ndarray::{Array1, Array2, Array3, Axis};
use ndarray_npy::{read_npy, write_npy};
use patchcore::commands::mvtec::metrics::{auroc, best_f1, BestF1, PixelMetrics};
use patchcore::outputs::regions::{self, Region};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

const MAX_FPRS: [f64; 4] = [0.3, 0.05, 0.5, 1.0];

/// One test set: score maps and masks (images x rows x columns), and image-level scores with
/// their labels.
struct Case {
    name: &'static str,
    scores: Array3<f32>,
    masks: Array3<bool>,
    image_scores: Array1<f32>,
    image_labels: Array1<bool>,
}

/// A mask drawn with `#` for anomalous pixels.
fn draw(rows: &[&str]) -> Array2<bool> {
    Array2::from_shape_fn((rows.len(), rows[0].len()), |(r, c)| {
        rows[r].as_bytes()[c] == b'#'
    })
}

fn stack(masks: &[Array2<bool>]) -> Array3<bool> {
    let views: Vec<_> = masks.iter().map(|m| m.view()).collect();
    ndarray::stack(Axis(0), &views).unwrap()
}

/// Six 17x23 masks: two good images, rectangles, blocks touching diagonally, a ring with a
/// region in its hole, single pixels, regions on the border, random blobs.
fn hand_masks(rng: &mut ChaCha8Rng) -> Array3<bool> {
    let (h, w) = (17, 23);
    let empty = Array2::from_elem((h, w), false);
    let mut a = empty.clone();
    a.slice_mut(ndarray::s![2..6, 3..8]).fill(true);
    // Two blocks touching only at a corner: one region.
    a.slice_mut(ndarray::s![8..11, 10..13]).fill(true);
    a.slice_mut(ndarray::s![11..14, 13..16]).fill(true);
    a[[15, 1]] = true;
    a[[0, 22]] = true;
    let mut b = empty.clone();
    // A ring with one pixel in its hole (two regions), and an L touching the border.
    b.slice_mut(ndarray::s![3..10, 5..12]).fill(true);
    b.slice_mut(ndarray::s![4..9, 6..11]).fill(false);
    b[[6, 8]] = true;
    b.slice_mut(ndarray::s![12..17, 0..2]).fill(true);
    b.slice_mut(ndarray::s![15..17, 0..9]).fill(true);
    // A diagonal line of single pixels: one region.
    for k in 0..6 {
        b[[k, 16 + k]] = true;
    }
    let random = Array2::from_shape_fn((h, w), |_| rng.gen_bool(0.15));
    let mut big = empty.clone();
    big.slice_mut(ndarray::s![0..9, 0..12]).fill(true);
    big[[16, 22]] = true;
    stack(&[empty.clone(), a, b, empty, random, big])
}

/// Scores for `masks`: normal pixels lower on average than anomalous ones, overlapping;
/// quantized to `levels` values when given (exact ties).
fn scores_for(masks: &Array3<bool>, levels: Option<u32>, rng: &mut ChaCha8Rng) -> Array3<f32> {
    masks.mapv(|m| {
        let s: f32 = if m {
            rng.gen_range(0.3..1.0)
        } else {
            rng.gen_range(0.0..0.7)
        };
        match levels {
            Some(l) => (s * (l - 1) as f32).round() / (l - 1) as f32,
            None => s,
        }
    })
}

fn image_level(n: usize, levels: Option<u32>, rng: &mut ChaCha8Rng) -> (Array1<f32>, Array1<bool>) {
    let labels = Array1::from_shape_fn(n, |_| rng.gen_bool(0.4));
    let scores = labels.mapv(|l| {
        let s: f32 = rng.gen_range(0.0..1.0) + if l { 0.4 } else { 0.0 };
        match levels {
            Some(l) => (s * l as f32).round() / l as f32,
            None => s,
        }
    });
    (scores, labels)
}

fn cases() -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let masks = hand_masks(&mut rng);
    let mut out = Vec::new();
    for (name, levels) in [
        ("quantized", Some(5)),
        ("continuous", None),
        ("coarse", Some(3)),
    ] {
        let (image_scores, image_labels) = image_level(37, levels, &mut rng);
        out.push(Case {
            name,
            scores: scores_for(&masks, levels, &mut rng),
            masks: masks.clone(),
            image_scores,
            image_labels,
        });
    }
    // Many regions on larger random masks, 60 score levels.
    let many = Array3::from_shape_fn((3, 32, 40), |_| rng.gen_bool(0.2));
    let (image_scores, image_labels) = image_level(50, Some(60), &mut rng);
    out.push(Case {
        name: "many_regions",
        scores: scores_for(&many, Some(60), &mut rng),
        masks: many,
        image_scores,
        image_labels,
    });
    out.push(Case {
        name: "all_equal",
        scores: Array3::from_elem(masks.dim(), 0.25),
        masks: masks.clone(),
        image_scores: Array1::from_elem(9, 0.25),
        image_labels: Array1::from_shape_fn(9, |i| i % 3 == 0),
    });
    let single = draw(&[
        ".......", ".......", "..###..", "..##...", "...#...", ".......", ".......", ".......",
        ".......",
    ])
    .insert_axis(Axis(0));
    out.push(Case {
        name: "single_region",
        scores: scores_for(&single, None, &mut rng),
        masks: single,
        // Equal best F1 (2/3) at thresholds 4 and 1: argmax takes the lowest.
        image_scores: Array1::from(vec![4.0, 3.0, 2.0, 1.0]),
        image_labels: Array1::from(vec![true, false, false, true]),
    });
    let good = Array3::from_elem((3, 5, 6), false);
    out.push(Case {
        name: "no_regions",
        scores: scores_for(&good, Some(4), &mut rng),
        masks: good,
        image_scores: Array1::from(vec![0.2, 0.5, 0.2]),
        image_labels: Array1::from_elem(3, false),
    });
    let full = Array3::from_elem((2, 4, 3), true);
    out.push(Case {
        name: "all_anomalous",
        scores: scores_for(&full, Some(4), &mut rng),
        masks: full,
        image_scores: Array1::from(vec![0.2, 0.5, 0.2]),
        image_labels: Array1::from_elem(3, true),
    });
    // 80 normal pixels with distinct scores, so FPR passes through every k/80: 0.05 (k = 4),
    // 0.3 (k = 24) and 0.5 (k = 40) are curve points.
    let exact = Array2::from_shape_fn((10, 10), |(r, c)| r < 2 && c < 10).insert_axis(Axis(0));
    let mut levels: Vec<u32> = (0..100).collect();
    for i in (1..levels.len()).rev() {
        levels.swap(i, rng.gen_range(0..=i));
    }
    let mut it = levels.into_iter();
    let (image_scores, image_labels) = image_level(20, None, &mut rng);
    out.push(Case {
        name: "exact_fpr",
        scores: exact.mapv(|_| it.next().unwrap() as f32 / 100.0),
        masks: exact,
        image_scores,
        image_labels,
    });
    out
}

/// Masks for the labelling check: the hand-made ones and random ones of several densities
/// and shapes.
fn label_masks() -> Vec<Array2<bool>> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut out: Vec<Array2<bool>> = hand_masks(&mut rng)
        .outer_iter()
        .map(|m| m.to_owned())
        .collect();
    for (h, w, p) in [
        (40, 50, 0.3),
        (40, 50, 0.5),
        (33, 21, 0.6),
        (1, 30, 0.5),
        (30, 1, 0.5),
    ] {
        out.push(Array2::from_shape_fn((h, w), |_| rng.gen_bool(p)));
    }
    out.push(Array2::from_elem((5, 5), true));
    out
}

/// Writes the inputs, runs the reference once, returns (folder, results).
fn reference() -> &'static (PathBuf, Value) {
    static REF: OnceLock<(PathBuf, Value)> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("metrics-ref-")
            .tempdir()
            .unwrap()
            .keep();
        let cases = cases();
        for c in &cases {
            let d = dir.join(c.name);
            std::fs::create_dir_all(&d).unwrap();
            write_npy(d.join("scores.npy"), &c.scores).unwrap();
            write_npy(d.join("masks.npy"), &c.masks).unwrap();
            write_npy(d.join("image_scores.npy"), &c.image_scores).unwrap();
            write_npy(d.join("image_labels.npy"), &c.image_labels).unwrap();
        }
        let masks = label_masks();
        for (k, m) in masks.iter().enumerate() {
            write_npy(dir.join(format!("label_{k}.npy")), m).unwrap();
        }
        let spec = serde_json::json!({
            "max_fprs": MAX_FPRS,
            "cases": cases.iter().map(|c| c.name).collect::<Vec<_>>(),
            "label_masks": masks.len(),
        });
        std::fs::write(dir.join("cases.json"), spec.to_string()).unwrap();
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/metrics_reference.py");
        let py = common::python();
        let out = Command::new(&py)
            .arg(&script)
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
        assert!(
            out.status.success(),
            "metrics_reference.py failed (needs numpy, scipy, scikit-learn; run scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results = std::fs::read_to_string(dir.join("results.json")).unwrap();
        (dir, serde_json::from_str(&results).unwrap())
    })
}

/// `got` equals the reference `want` (a JSON number or null) to 1e-9 relative.
fn check(what: &str, got: Option<f64>, want: &Value) {
    match (got, want.as_f64()) {
        (None, None) => assert!(want.is_null(), "{what}: reference gave {want}"),
        (Some(g), Some(w)) => assert!(
            (g - w).abs() <= 1e-9 * w.abs() + 1e-15,
            "{what}: got {g}, reference {w} (difference {:.2e})",
            g - w
        ),
        _ => panic!("{what}: got {got:?}, reference {want}"),
    }
}

fn check_f1(what: &str, got: Option<BestF1>, want: &Value) {
    match got {
        None => assert!(want.is_null(), "{what}: got None, reference {want}"),
        Some(b) => {
            assert!(!want.is_null(), "{what}: got {b:?}, reference null");
            check(&format!("{what} f1"), Some(b.f1), &want["f1"]);
            check(
                &format!("{what} precision"),
                Some(b.precision),
                &want["precision"],
            );
            check(&format!("{what} recall"), Some(b.recall), &want["recall"]);
            let t = want["threshold"].as_f64().unwrap() as f32;
            assert_eq!(b.threshold, t, "{what} threshold");
        }
    }
}

#[test]
fn metrics_match_sklearn_and_reference_aupro() {
    let (_, results) = reference();
    for c in cases() {
        let want = &results["cases"][c.name];
        let name = c.name;
        let (s, l) = (c.image_scores.to_vec(), c.image_labels.to_vec());
        check(
            &format!("{name} image AUROC"),
            auroc(&s, &l),
            &want["image_auroc"],
        );
        check_f1(
            &format!("{name} image best F1"),
            best_f1(&s, &l),
            &want["image_best_f1"],
        );

        let mut pixels = PixelMetrics::new();
        for (sm, m) in c.scores.outer_iter().zip(c.masks.outer_iter()) {
            pixels.add(sm, m).unwrap();
        }
        assert_eq!(pixels.pixels(), c.scores.len());
        check(
            &format!("{name} pixel AUROC"),
            pixels.auroc(),
            &want["pixel_auroc"],
        );
        let flat_s: Vec<f32> = c.scores.iter().copied().collect();
        let flat_l: Vec<bool> = c.masks.iter().copied().collect();
        check_f1(
            &format!("{name} pixel best F1"),
            best_f1(&flat_s, &flat_l),
            &want["pixel_best_f1"],
        );
        for (k, &max_fpr) in MAX_FPRS.iter().enumerate() {
            let got = pixels.aupro(max_fpr);
            check(&format!("{name} AUPRO@{max_fpr}"), got, &want["aupro"][k]);
            eprintln!("{name}: AUPRO@{max_fpr} = {got:?}");
        }
    }
    // The degenerate cases are what they claim to be.
    let r = &results["cases"];
    assert!(r["no_regions"]["aupro"][0].is_null() && r["no_regions"]["pixel_auroc"].is_null());
    assert!(r["no_regions"]["image_best_f1"].is_null());
    assert!(
        r["all_anomalous"]["aupro"][0].is_null() && r["all_anomalous"]["image_auroc"].is_null()
    );
    assert_eq!(r["all_equal"]["pixel_auroc"].as_f64(), Some(0.5));
    assert_eq!(
        r["single_region"]["image_best_f1"]["threshold"].as_f64(),
        Some(1.0)
    );
    assert!((r["all_equal"]["aupro"][0].as_f64().unwrap() - 0.15).abs() < 1e-12);
    // max_fpr lands exactly on curve points in exact_fpr (no interpolation there) and between
    // points in continuous (interpolation).
    assert_eq!(
        r["exact_fpr"]["exact_hit"],
        serde_json::json!([true, true, true, true])
    );
    assert_eq!(r["continuous"]["exact_hit"][0], Value::Bool(false));
}

#[test]
fn regions_match_scipy_label() {
    let (dir, results) = reference();
    for (k, mask) in label_masks().iter().enumerate() {
        let want: Array2<i32> = read_npy(dir.join(format!("label_{k}_labels.npy"))).unwrap();
        let (labels, n) = regions::label(mask.view());
        assert_eq!(
            n as u64,
            results["labels"][k]["n"].as_u64().unwrap(),
            "mask {k}"
        );
        assert_eq!(labels, want.mapv(|v| v as u32), "mask {k}: labels differ");
        let want_regions: Vec<Region> = results["labels"][k]["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let v: Vec<u64> = r
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect();
                Region {
                    x: v[0] as u32,
                    y: v[1] as u32,
                    width: v[2] as u32,
                    height: v[3] as u32,
                    area: v[4],
                }
            })
            .collect();
        assert_eq!(regions::regions(mask.view()), want_regions, "mask {k}");
    }
}
