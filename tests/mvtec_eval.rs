//! `patchcore mvtec runall` / `summarize` on a small MVTec AD-style dataset the test makes,
//! and the ground-truth mask protocol against torchvision.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_fails_naming, json, run, s, stderr, write_images};
use ndarray::Array2;
use patchcore::features::images::Preprocess;
use patchcore::util::synthetic::Defect;
use serde_json::Value;

/// `<root>/data/widget`: 12 good training images, 3 good and 3 spotted test images with
/// their masks (the defect's box), all 96x80.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    let cat = data.join("widget");
    let size = (96, 80);
    write_images(&cat.join("train/good"), 12, 0, size, Defect::None);
    write_images(&cat.join("test/good"), 3, 500, size, Defect::None);
    let boxes = write_images(&cat.join("test/spot"), 3, 700, size, Defect::Spot);
    let gt = cat.join("ground_truth/spot");
    std::fs::create_dir_all(&gt).unwrap();
    for (i, b) in boxes.iter().enumerate() {
        let (x0, y0, x1, y1) = b.unwrap();
        let mask = image::GrayImage::from_fn(size.0, size.1, |x, y| {
            image::Luma([if x >= x0 && x < x1 && y >= y0 && y < y1 {
                255
            } else {
                0
            }])
        });
        mask.save(gt.join(format!("{i:03}_mask.png"))).unwrap();
    }
    data
}

fn runall(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "mvtec",
        "runall",
        "--data",
        s(data),
        "--out",
        s(out),
        "--weights",
        "random:0",
        "--resize",
        "80",
        "--crop",
        "64",
        "-s",
        "0.25",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// `patchcore mvtec summarize --runs RUNS --out OUT`.
fn summarize(runs: &Path, out: &Path) -> std::process::Output {
    run(&["mvtec", "summarize", "--runs", s(runs), "--out", s(out)])
}

#[test]
fn runall_evaluates_resumes_and_summarizes() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let out = root.path().join("runs");
    let o = runall(
        &data,
        &out,
        &["--backbone", "resnet18", "--backbone", "wide_resnet50_2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for backbone in ["resnet18", "wide_resnet50_2"] {
        let r = json(&out.join(format!("{backbone}@random-0/widget/result.json")));
        assert_eq!(r["format"], "patchcore-mvtec-result");
        assert_eq!(r["config"]["backbone"], backbone);
        assert_eq!(r["config"]["category"], "widget");
        assert_eq!(r["config"]["preprocess"]["crop"], 64);
        assert_eq!(
            r["config"]["calibration_ratio"], 0.0,
            "paper protocol: all in the bank"
        );
        assert_eq!(r["counts"]["train_images"], 12);
        assert_eq!(r["counts"]["test_images"], 6);
        assert_eq!(r["counts"]["anomalous_images"], 3);
        assert_eq!(r["counts"]["pixels"], 6 * 64 * 64);
        assert_eq!(r["counts"]["defect_regions"], 3);
        let m = &r["metrics"];
        // Spots on a regular texture: mostly found even with random weights.
        for (k, min) in [("image_auroc", 0.75), ("pixel_auroc", 0.75), ("aupro", 0.5)] {
            let v = m[k].as_f64().unwrap();
            assert!(v > min && v <= 1.0, "{k} {v}: {m}");
        }
        let f1 = &m["best_f1"];
        assert!(f1["f1"].as_f64().unwrap() > 0.6, "{m}");
        assert!(f1["threshold"].as_f64().unwrap() > 0.0);
        let t = &r["timings"];
        for k in ["predict_per_image_s", "total_s", "metrics_s"] {
            assert!(t[k].as_f64().unwrap() > 0.0, "{k}: {t}");
        }
        assert!(t["train"]["coreset_s"].is_number());
        assert!(r["pixel_metrics_bytes"].as_u64().unwrap() >= 6 * 64 * 64 * 8);
        check_curves(&out.join(format!("{backbone}@random-0/widget")), &r);
    }

    // Resumable: nothing recomputed for the same configuration...
    let result = out.join("resnet18@random-0/widget/result.json");
    let before = std::fs::read(&result).unwrap();
    let o = runall(&data, &out, &["--backbone", "resnet18"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("done already"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&result).unwrap(), before);
    // ... recomputed when asked, or when the configuration changed.
    let o = runall(&data, &out, &["--backbone", "resnet18", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("done already"));
    let o = runall(&data, &out, &["--backbone", "resnet18", "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("configuration changed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(json(&result)["config"]["seed"], 3);

    // Tables and plots.
    let summary = root.path().join("summary");
    let o = summarize(&out, &summary);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(summary.join("summary.md")).unwrap();
    assert!(
        md.contains("## Image AUROC (%)") && md.contains("| widget |") && md.contains("**mean**"),
        "{md}"
    );
    assert!(
        md.contains("| category | resnet18@random-0 | wide_resnet50_2@random-0 |"),
        "{md}"
    );
    let csv = std::fs::read_to_string(summary.join("summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("run,backbone,category,weights,image_auroc,pixel_auroc,aupro,best_f1")
    );
    assert_eq!(
        lines.len(),
        1 + 2 + 2,
        "a row per run and a mean per backbone: {csv}"
    );
    assert!(
        lines[1].starts_with("resnet18@random-0,resnet18,widget,random:0,"),
        "{csv}"
    );
    for stem in ["image_auroc", "pixel_auroc", "aupro", "best_f1"] {
        let svg = std::fs::read_to_string(summary.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{stem}"
        );
        for word in ["widget", "mean", "resnet18", "wide_resnet50_2"] {
            assert!(svg.contains(word), "{stem}.svg lacks {word}");
        }
        assert!(svg.matches("<rect").count() >= 4, "bars drawn");
    }
    assert!(summary
        .join("results/resnet18@random-0/widget.json")
        .is_file());
    // The curves of both backbones overlaid per category, linked from summary.md.
    for stem in ["image_roc", "pixel_roc", "pro"] {
        let svg = std::fs::read_to_string(summary.join(format!("curves/widget/{stem}.svg")))
            .unwrap_or_else(|e| panic!("curves/widget/{stem}.svg: {e}"));
        for label in ["resnet18@random-0: AU", "wide_resnet50_2@random-0: AU"] {
            assert!(svg.contains(label), "{stem}.svg lacks {label}");
        }
        assert!(md.contains(&format!("(curves/widget/{stem}.svg)")), "{md}");
    }
    // Runs without curves.json (older versions) are summarized without their curves, saying so.
    std::fs::remove_file(out.join("wide_resnet50_2@random-0/widget/curves.json")).unwrap();
    let summary2 = root.path().join("summary2");
    let o = summarize(&out, &summary2);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no curves.json"), "{}", stderr(&o));
    let svg = std::fs::read_to_string(summary2.join("curves/widget/pro.svg")).unwrap();
    assert!(svg.contains("resnet18@random-0") && !svg.contains("wide_resnet50_2"));

    // A category and a weights path with a comma and quotes: summary.csv quotes them.
    let odd_runs = root.path().join("odd_runs");
    let mut r = json(&result);
    r["config"]["category"] = "wid,get".into();
    r["config"]["weights"] = "/w/a,b \"c\".safetensors".into();
    let dest = odd_runs.join("x/wid,get/result.json");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, serde_json::to_string(&r).unwrap()).unwrap();
    let odd_summary = root.path().join("odd_summary");
    let o = run(&[
        "mvtec",
        "summarize",
        "--runs",
        odd_runs.to_str().unwrap(),
        "--out",
        odd_summary.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut reader = csv::Reader::from_path(odd_summary.join("summary.csv")).unwrap();
    let header = reader.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2, "the run and its mean");
    for row in &rows {
        assert_eq!(row.len(), header.len(), "{row:?}");
    }
    assert_eq!(&rows[0][2], "wid,get");
    assert_eq!(&rows[0][3], "/w/a,b \"c\".safetensors");
    assert_eq!(
        &rows[0][4],
        &format!("{:.6}", r["metrics"]["image_auroc"].as_f64().unwrap())
    );
    assert_eq!(&rows[1][2], "mean");

    // A defect image without its mask is an error naming the mask.
    std::fs::remove_file(data.join("widget/ground_truth/spot/001_mask.png")).unwrap();
    let o = runall(&data, &out, &["--backbone", "resnet18", "--force"]);
    assert_fails_naming(&o, &["001_mask.png", "missing"]);
    let o = runall(&data, &out, &["--category", "gadget"]);
    assert_fails_naming(&o, &["gadget"]);
}

/// A run's `curves.json` holds the curves its metrics are the areas of, and its SVGs draw
/// them with the metrics in the legends.
fn check_curves(dir: &Path, result: &Value) {
    use patchcore::commands::mvtec::metrics::{trapezoid, CURVE_RESOLUTION};
    let c = json(&dir.join("curves.json"));
    assert_eq!(c["format"], "patchcore-mvtec-curves");
    assert_eq!(c["config"], result["config"]);
    assert_eq!(c["aupro_max_fpr"], 0.3);
    let m = &result["metrics"];
    for (curve, metric, width) in [
        ("image_roc", "image_auroc", 1.0),
        ("pixel_roc", "pixel_auroc", 1.0),
        ("pro", "aupro", 0.3),
    ] {
        let want = m[metric].as_f64().unwrap();
        let points: Vec<[f64; 2]> = serde_json::from_value(c[curve]["points"].clone()).unwrap();
        // The metric is the area of every point of the curve ...
        let area = c[curve]["area"].as_f64().unwrap() / width;
        assert!(
            (area - want).abs() < 1e-12,
            "{curve}: area {area}, {metric} {want}"
        );
        // ... and the drawn points, thinned to a bounded number, are as close as stated.
        let drawn = trapezoid(&points) / width;
        let off = (drawn - want).abs();
        eprintln!(
            "{}: {curve}: {} points drawn, their area is {metric} {want:.6} {off:+.2e}",
            dir.display(),
            points.len()
        );
        assert!(
            off <= CURVE_RESOLUTION / 2.0,
            "{curve}: drawn area {drawn}, {metric} {want}"
        );
        assert!(points.len() <= (4.0 / CURVE_RESOLUTION) as usize + 2);
        assert_eq!(points[0], [0.0, 0.0]);
        let end = points.last().unwrap();
        assert_eq!(end[0], width, "{curve} ends at the FPR limit");
        if curve != "pro" {
            assert_eq!(end[1], 1.0, "{curve} ends at (1, 1)");
        }
        if curve == "image_roc" {
            // 6 test images: nothing to thin, the drawn curve is the curve.
            assert!(off < 1e-6, "image ROC drawn exactly");
        }
        let svg = std::fs::read_to_string(dir.join(format!("{curve}.svg"))).unwrap();
        let name = if curve == "pro" { "AUPRO" } else { "AUROC" };
        let legend = format!("{name} {:.2}%", 100.0 * want);
        assert!(svg.contains(&legend), "{curve}.svg lacks {legend:?}");
        assert!(svg.contains("<polyline"), "{curve}.svg has no curve");
    }
}

/// The masks go through the images' resize and crop as torchvision does it on a PIL mask
/// (`Resize`, `CenterCrop`, `ToTensor`), and a pixel is a defect where the result is exactly
/// 1, as the official `mask.astype(int)` counts.
#[test]
fn mask_protocol_matches_torchvision() {
    let dir = tempfile::tempdir().unwrap();
    // A blob with soft edges after resizing, on a non-square canvas.
    let mask = image::GrayImage::from_fn(150, 110, |x, y| {
        let (dx, dy) = (x as f32 - 70.0, y as f32 - 50.0);
        image::Luma([
            if dx * dx / 900.0 + dy * dy / 400.0 < 1.0 || (x > 120 && y < 20) {
                255
            } else {
                0
            },
        ])
    });
    let path = dir.path().join("m_mask.png");
    mask.save(&path).unwrap();
    let script = r#"
import sys, numpy as np, torchvision.transforms as T
from PIL import Image
m = Image.open(sys.argv[1])
t = T.Compose([T.Resize(48), T.CenterCrop(40), T.ToTensor()])(m)
np.save(sys.argv[2], t.numpy()[0].astype(int).astype(np.uint8))
"#;
    let out = dir.path().join("ref.npy");
    let o = Command::new(common::python())
        .args(["-c", script])
        .arg(&path)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference: Array2<u8> = ndarray_npy::read_npy(&out).unwrap();
    let ours = patchcore::commands::mvtec::evaluate::load_mask(
        &path,
        &Preprocess {
            resize: 48,
            crop: Some(40),
        },
        (150, 110),
    )
    .unwrap();
    assert_eq!(ours.dim(), reference.dim());
    let ours = ours.mapv(|b| b as u8);
    let defects = ours.iter().filter(|&&v| v == 1).count();
    assert!(defects > 50, "{defects}");
    assert_eq!(ours, reference);
}

#[test]
fn runall_evaluate_scores_a_given_model_as_runall_does() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let out = root.path().join("runs");
    let o = runall(&data, &out, &["--backbone", "resnet18", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let index = out.join("resnet18@random-0/widget/index.faiss");
    let again = root.path().join("again");
    let args = ["--evaluate", s(&index), "--category", "widget", "-q"];
    let o = runall(&data, &again, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        json(&out.join("resnet18@random-0/widget/result.json")),
        json(&again.join("resnet18@random-0/widget/result.json")),
    );
    assert_eq!(a["metrics"], b["metrics"]);
    assert_eq!(a["config"], b["config"]);
    assert_eq!(a["counts"], b["counts"]);
    // One model, one category.
    let o = run(&[
        "mvtec",
        "runall",
        "--data",
        s(&data),
        "--evaluate",
        s(&index),
    ]);
    assert!(!o.status.success());
}
