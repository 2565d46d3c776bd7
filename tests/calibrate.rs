//! `patchcore calibrate`: new thresholds for a trained model from new good images, by the
//! quantile or the sigma rule, scored as predict scores; the sidecar's other fields and the
//! index untouched; bad input refused before any scoring. Also `train --calibration-rule`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails_naming, json, run, s, stderr, write_images};
use patchcore::util::synthetic::Defect;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A model trained on 16 good 96x96 images (5 held out to calibrate), with `extra` options.
fn trained(root: &Path, extra: &[&str]) -> PathBuf {
    common::train_small_with(root, 16, extra)
}

/// Every file of `dir`: name, SHA-256 and modification time.
fn folder_state(dir: &Path) -> Vec<(String, String, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                patchcore::util::fsutil::sha256_file(&e.path()).unwrap(),
                e.metadata().unwrap().modified().unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Good images after a lighting change: lower contrast, brighter.
fn write_drifted(dir: &Path, n: usize, seed: u64, size: (u32, u32)) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let (mut img, _) =
            patchcore::util::synthetic::render(seed + i as u64, size.0, size.1, Defect::None);
        for p in img.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = (*c as f32 * 0.6 + 90.0).min(255.0) as u8;
            }
        }
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

/// `patchcore calibrate -i INPUT --index INDEX` followed by `extra`.
fn calibrate(input: &Path, index: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["calibrate", "-i", s(input), "--index", s(index)];
    args.extend_from_slice(extra);
    run(&args)
}

/// Predicts with `--format json`; returns results.json.
fn predict_json(input: &Path, out: &Path, index: &Path) -> Value {
    let o = common::predict_with(
        input,
        out,
        index,
        &["-q", "--format", "json", "--no-report"],
    );
    assert!(o.status.success(), "predict: {}", stderr(&o));
    json(&out.join("results.json"))
}

/// The image scores of predict's results.json, ascending.
fn sorted_scores(results: &Value) -> Vec<f64> {
    let mut scores: Vec<f64> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["score"].as_f64().unwrap())
        .collect();
    scores.sort_by(f64::total_cmp);
    scores
}

/// mean + k * std of `v`, std the population one (ddof = 0) or the sample one (ddof = 1).
fn mean_k_std(v: &[f64], k: f64, ddof: usize) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - ddof as f64);
    mean + k * var.sqrt()
}

/// The sidecar text without its calibration object: (what comes before it, what comes after).
/// Top-level keys are indented by two spaces in the pretty-printed sidecar.
fn around_calibration(text: &str) -> (String, String) {
    let start = text.find("\n  \"calibration\": ").expect("a calibration");
    let rest = &text[start + 1..];
    let end = rest
        .find("\n  \"")
        .or_else(|| rest.find("\n}"))
        .expect("the sidecar goes on");
    (text[..start].to_string(), rest[end..].to_string())
}

#[test]
fn calibrate_then_predict_uses_the_new_thresholds() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = trained(r, &[]);
    let side = index.with_extension("faiss.json");
    let (side_before, index_before) = (
        std::fs::read_to_string(&side).unwrap(),
        std::fs::read(&index).unwrap(),
    );
    let figure = index.with_extension("faiss.calibration.svg");
    let figure_before = std::fs::read_to_string(&figure).unwrap();
    let old = json(&side)["calibration"].clone();
    assert_eq!(old["images"], 5);
    let old_threshold = old["image_threshold"].as_f64().unwrap();

    // After the drift, the training thresholds flag good images.
    let drift = r.join("drift");
    write_drifted(&drift, 8, 100, (96, 96));
    let before = predict_json(&drift, &r.join("before"), &index);
    assert!(
        before["anomalous"].as_u64().unwrap() > 0,
        "drift raises scores over the old threshold {old_threshold}: {before}"
    );

    let o = calibrate(&drift, &index, &["--rule", "sigma", "--coef", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("calibrated") && err.contains(&format!("{old_threshold} -> ")),
        "old and new thresholds printed: {err}"
    );

    // The sidecar: rule, parameter, count, folder, scores; thresholds by the sigma rule.
    let side_after = std::fs::read_to_string(&side).unwrap();
    let cal = serde_json::from_str::<Value>(&side_after).unwrap()["calibration"].clone();
    assert_eq!(
        cal["method"],
        serde_json::json!({"name": "sigma", "coef": 3.0})
    );
    assert_eq!(cal["images"], 8);
    assert_eq!(cal["folder"], s(&drift));
    assert!(cal["rule"].as_str().unwrap().contains("ddof=0"), "{cal}");
    let scores = floats(&cal["image_scores"]);
    let maxima = floats(&cal["heatmap_maxima"]);
    assert_eq!((scores.len(), maxima.len()), (8, 8));
    assert!(
        scores.windows(2).all(|w| w[0] <= w[1]),
        "sorted: {scores:?}"
    );
    for (field, values) in [("image_threshold", &scores), ("pixel_threshold", &maxima)] {
        let stored = cal[field].as_f64().unwrap();
        let population = mean_k_std(values, 3.0, 0);
        let sample = mean_k_std(values, 3.0, 1);
        let tol = 1e-6 * population.abs();
        assert!(
            (stored - population).abs() <= tol,
            "{field}: {stored} vs {population}"
        );
        assert!(
            (stored - sample).abs() > tol,
            "{field}: tells ddof=0 from ddof=1"
        );
    }
    let threshold = cal["image_threshold"].as_f64().unwrap();
    assert_ne!(threshold, old_threshold);
    let c = scores.iter().filter(|&&v| v >= threshold).count();
    let bound = cal["false_alarm_bound"].as_f64().unwrap();
    assert!((bound - (c + 1) as f64 / 9.0).abs() < 1e-12, "{bound}");

    // Index untouched; every other field of the sidecar byte for byte.
    assert_eq!(
        std::fs::read(&index).unwrap(),
        index_before,
        "index untouched"
    );
    assert_eq!(
        around_calibration(&side_after),
        around_calibration(&side_before)
    );
    // Index, sidecar and the calibration figure, redrawn for the new thresholds; nothing else.
    let leftovers = std::fs::read_dir(index.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 3, "no temporary files");
    assert_ne!(
        std::fs::read_to_string(&figure).unwrap(),
        figure_before,
        "the calibration figure shows the new thresholds"
    );

    // Predict: the same scores as calibrate stored, verdicts from the new thresholds (K = 3
    // exceeds any of 8 scores' distance from their mean in population standard deviations,
    // at most sqrt(7), so every calibration image is good).
    let after = predict_json(&drift, &r.join("after"), &index);
    assert_eq!(after["thresholds"]["source"], "calibration");
    assert_eq!(after["thresholds"]["image"].as_f64().unwrap(), threshold);
    assert_eq!(
        after["thresholds"]["pixel"].as_f64().unwrap(),
        cal["pixel_threshold"].as_f64().unwrap()
    );
    assert_eq!(
        sorted_scores(&after),
        scores,
        "calibrate scores exactly as predict"
    );
    for res in after["results"].as_array().unwrap() {
        let anomalous = res["score"].as_f64().unwrap() > threshold;
        assert_eq!(
            res["verdict"],
            if anomalous { "anomalous" } else { "good" },
            "{res}"
        );
    }
    assert_eq!(after["anomalous"], 0, "{after}");

    // Defects are still found above the new threshold.
    write_images(&r.join("spots"), 3, 700, (96, 96), Defect::Spot);
    let spots = predict_json(&r.join("spots"), &r.join("spots_out"), &index);
    for res in spots["results"].as_array().unwrap() {
        let anomalous = res["score"].as_f64().unwrap() > threshold;
        assert_eq!(
            res["verdict"],
            if anomalous { "anomalous" } else { "good" },
            "{res}"
        );
    }
}

#[test]
fn dry_run_json_logs_quiet_and_the_default_rule() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = trained(r, &[]);
    let side = index.with_extension("faiss.json");
    let old = json(&side)["calibration"].clone();
    let good = r.join("good");
    write_images(&good, 6, 300, (96, 96), Defect::None);
    std::fs::write(good.join("notes.txt"), "not an image").unwrap();
    let model_folder = index.parent().unwrap();
    let before = folder_state(model_folder);
    assert!(
        before.iter().any(|(n, _, _)| n.ends_with(".svg")),
        "the figure is there to be left alone: {before:?}"
    );

    // --dry-run: the summary as JSON, nothing written: the model's folder (sidecar, figure,
    // no temporary file) as it was, to the byte and the modification time.
    let o = calibrate(&good, &index, &["--dry-run", "--json-logs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(folder_state(model_folder), before, "dry run writes nothing");
    let lines: Vec<Value> = stderr(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["message"].as_str().unwrap().contains("notes.txt")));
    let done = lines
        .iter()
        .find(|l| l["event"] == "calibrated")
        .expect("summary event");
    assert_eq!(done["dry_run"], true);
    assert!(done["message"]
        .as_str()
        .unwrap()
        .contains("nothing written"));
    assert_eq!(done["previous"], old);
    let new = &done["calibration"];
    assert_eq!(new["images"], 6);
    assert_eq!(new["method"]["name"], "quantile");
    // The quantile rule on the new scores: q99 + 0.1 (q99 - median), numpy-style.
    let scores = floats(&new["image_scores"]);
    let q = |p: f64| {
        let pos = p * (scores.len() - 1) as f64;
        let (lo, t) = (pos.floor() as usize, pos.fract());
        scores[lo] + t * (scores[(lo + 1).min(scores.len() - 1)] - scores[lo])
    };
    let expected = q(0.99) + 0.1 * (q(0.99) - q(0.5));
    let t = new["image_threshold"].as_f64().unwrap();
    assert!((t - expected).abs() <= 1e-6 * expected, "{t} vs {expected}");

    // --quiet: nothing on stderr, the sidecar written; a quiet dry run still reports.
    let o = calibrate(&good, &index, &["-q", "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("would calibrate"), "{}", stderr(&o));
    let o = calibrate(&good, &index, &["-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "--quiet: {}", stderr(&o));
    let written = json(&side)["calibration"].clone();
    assert_eq!(
        &written, new,
        "what the dry run showed is what gets written"
    );
}

#[test]
fn train_with_the_sigma_rule() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = trained(
        r,
        &["--calibration-rule", "sigma", "--calibration-coef", "2"],
    );
    let cal = json(&index.with_extension("faiss.json"))["calibration"].clone();
    assert_eq!(
        cal["method"],
        serde_json::json!({"name": "sigma", "coef": 2.0})
    );
    assert!(cal.get("folder").is_none(), "held out of training: {cal}");
    let scores = floats(&cal["image_scores"]);
    assert_eq!(scores.len(), 5);
    let stored = cal["image_threshold"].as_f64().unwrap();
    let expected = mean_k_std(&scores, 2.0, 0);
    assert!(
        (stored - expected).abs() <= 1e-6 * expected,
        "{stored} vs {expected}"
    );

    // K defaults to 5; a coefficient belongs to the sigma rule only.
    let o = common::train(
        &r.join("train"),
        &r.join("x.faiss"),
        &["--weights", "random:0", "--calibration-coef", "3"],
    );
    assert_fails_naming(&o, &["--calibration-coef"]);
    let o = calibrate(&r.join("train"), &index, &["--coef", "3"]);
    assert_fails_naming(&o, &["--coef"]);
    let o = calibrate(
        &r.join("train"),
        &index,
        &["--rule", "sigma", "--coef=-1", "-q"],
    );
    assert_fails_naming(&o, &["--coef"]);
}

#[test]
fn bad_input_is_refused_before_scoring() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = trained(r, &[]);
    let side = index.with_extension("faiss.json");
    let side_before = std::fs::read_to_string(&side).unwrap();
    let unchanged = || {
        assert_eq!(
            std::fs::read_to_string(&side).unwrap(),
            side_before,
            "sidecar kept"
        )
    };

    // An empty folder, and fewer than 5 images.
    let empty = r.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails_naming(
        &calibrate(&empty, &index, &["-q"]),
        &["contains no images", "empty"],
    );
    let few = r.join("few");
    write_images(&few, 4, 300, (96, 96), Defect::None);
    assert_fails_naming(
        &calibrate(&few, &index, &["-q"]),
        &["few", "4 images", "at least 5"],
    );
    unchanged();

    // An index that does not match its sidecar: refused before scoring (a corrupt image in
    // the folder would otherwise be the error).
    let good = r.join("good");
    write_images(&good, 5, 300, (96, 96), Defect::None);
    std::fs::write(good.join("zzz.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let index_bytes = std::fs::read(&index).unwrap();
    let mut damaged = index_bytes.clone();
    damaged.truncate(damaged.len() - 8);
    std::fs::write(&index, &damaged).unwrap();
    assert_fails_naming(
        &calibrate(&good, &index, &["-q"]),
        &["does not match its sidecar"],
    );
    unchanged();
    std::fs::write(&index, &index_bytes).unwrap();
    assert_fails_naming(&calibrate(&good, &index, &["-q"]), &["zzz.png"]);
    unchanged();
    std::fs::remove_file(good.join("zzz.png")).unwrap();

    // A sidecar with a field this version does not know is not rewritten without it.
    let future = side_before.replacen('{', "{\n  \"future_field\": 1,", 1);
    std::fs::write(&side, &future).unwrap();
    assert_fails_naming(
        &calibrate(&good, &index, &["-q"]),
        &["future_field", "nothing written"],
    );
    assert_eq!(std::fs::read_to_string(&side).unwrap(), future);
    std::fs::write(&side, &side_before).unwrap();

    // Images of another size than the training's (non-square, larger): scored as predict
    // scores them, with a note.
    let other = r.join("other");
    write_images(&other, 5, 400, (150, 110), Defect::None);
    let o = calibrate(&other, &index, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("differ in size"), "{}", stderr(&o));
    let cal = json(&side)["calibration"].clone();
    let results = predict_json(&other, &r.join("other_out"), &index);
    assert_eq!(sorted_scores(&results), floats(&cal["image_scores"]));
}

#[test]
fn tiled_model_calibrates_over_its_tiles() {
    // A model with --tile scores each image as the largest of its tiles' scores, as predict.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 10, 0, (200, 150), Defect::None);
    let index = r.join("tiled.faiss");
    let o = common::train(
        &r.join("train"),
        &index,
        &[
            "--weights",
            "random:0",
            "--resize",
            "64",
            "--tile",
            "100",
            "-s",
            "0.25",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let good = r.join("good");
    write_images(&good, 5, 300, (260, 150), Defect::None);
    let o = calibrate(&good, &index, &["-q", "-b", "3", "--rule", "sigma"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cal = json(&r.join("tiled.faiss.json"))["calibration"].clone();
    assert_eq!(
        cal["method"],
        serde_json::json!({"name": "sigma", "coef": 5.0})
    );
    let predicted = sorted_scores(&predict_json(&good, &r.join("out"), &index));
    let stored = floats(&cal["image_scores"]);
    // Batches of 3 tiles here, of 8 in predict: the same scores up to float rounding.
    for (p, s) in predicted.iter().zip(&stored) {
        assert!(
            (p - s).abs() <= 1e-5 * s.abs(),
            "{predicted:?} vs {stored:?}"
        );
    }
}

#[test]
fn calibration_images_are_named_highest_first_and_a_loose_bound_is_warned() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 16, 0, (96, 96), Defect::None);
    let index = r.join("model/index.faiss");
    let fast: Vec<&str> = common::FAST_TRAIN
        .iter()
        .copied()
        .filter(|a| *a != "-q")
        .collect();
    let o = common::train(&r.join("train"), &index, &fast);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    let c = json(&r.join("model/index.faiss.json"))["calibration"].clone();
    let named = c["scored_images"].as_array().unwrap();
    assert_eq!(named.len(), 5);
    let scores: Vec<f64> = named.iter().map(|s| s["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(scores[0], *floats(&c["image_scores"]).last().unwrap());
    let highest = format!(
        "the highest {} (score {})",
        named[0]["file"].as_str().unwrap(),
        named[0]["score"]
    );
    assert!(said.contains(&highest), "{highest} not in {said}");
    // 5 images: a bound of at least 1/6, loose.
    assert!(
        said.contains("warning") && said.contains("false-alarm bound is loose"),
        "{said}"
    );
    let svg = std::fs::read_to_string(r.join("model/index.faiss.calibration.svg")).unwrap();
    assert!(svg.contains("Highest first: "), "{svg}");

    // calibrate names its highest image too, and its figure does not say held-out.
    write_images(&r.join("more"), 12, 300, (96, 96), Defect::None);
    let o = calibrate(&r.join("more"), &index, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = json(&r.join("model/index.faiss.json"))["calibration"].clone();
    let top = &c["scored_images"][0];
    let highest = format!(
        "(the highest {} (score {}))",
        top["file"].as_str().unwrap(),
        top["score"]
    );
    assert!(
        stderr(&o).contains(&highest),
        "{highest} not in {}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("loose"), "{}", stderr(&o));
    let svg = std::fs::read_to_string(r.join("model/index.faiss.calibration.svg")).unwrap();
    assert!(!svg.contains("held-out"), "{svg}");
    assert!(svg.contains("calibration good (12)"), "{svg}");
}
