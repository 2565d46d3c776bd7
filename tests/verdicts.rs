//! From scores to decisions: calibrated thresholds in the model, verdicts, masks, regions,
//! results files, exit codes and JSON logs, as a scripted batch job sees them.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails_naming, json, stderr, write_images, FAST_TRAIN};
use patchcore::util::synthetic::{BBox, Defect};
use serde_json::Value;

/// Images of 112x96 (non-square): 16 good to train on, and a test folder with good images and
/// two kinds of defect. Returns (root, index, defect boxes by test image name).
fn trained(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Vec<(String, BBox)>) {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let size = (112, 96);
    write_images(&r.join("train"), 16, 0, size, Defect::None);
    let boxes = common::write_test_images(r, size, 2, 2, 2);
    let index = r.join("index.faiss");
    common::train_ok(&r.join("train"), &index, &[FAST_TRAIN, extra].concat());
    (root, index, boxes)
}

/// Parses results.csv into rows of named fields.
fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            let fields: Vec<&str> = l.split(',').collect();
            assert_eq!(fields.len(), header.len(), "{l}");
            header
                .iter()
                .cloned()
                .zip(fields.iter().map(|f| f.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn calibrated_model_gives_verdicts_masks_and_regions() {
    let (root, index, boxes) = trained(&[]);
    let r = root.path();

    // 16 training images: 5 held out (the minimum), 11 in the bank.
    let side = json(&r.join("index.faiss.json"));
    let cal = &side["calibration"];
    assert_eq!(side["training"]["images"], 11);
    assert_eq!(cal["images"], 5);
    let scores: Vec<f64> = cal["image_scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] <= w[1]),
        "sorted: {scores:?}"
    );
    // The rule: q99 + 0.1 (q99 - median), numpy-style quantiles.
    let q = |p: f64| {
        let pos = p * (scores.len() - 1) as f64;
        let (lo, t) = (pos.floor() as usize, pos.fract());
        scores[lo] + t * (scores[(lo + 1).min(scores.len() - 1)] - scores[lo])
    };
    let expected = q(0.99) + 0.1 * (q(0.99) - q(0.5));
    let threshold = cal["image_threshold"].as_f64().unwrap();
    assert!(
        (threshold - expected).abs() <= 1e-4 * expected,
        "{threshold} vs {expected}"
    );

    // The held-out images were scored as predict scores: predict on the training images
    // finds every stored score, and those images' heatmap maxima are the stored ones.
    let train_out = r.join("train_out");
    let o = common::predict_with(
        &r.join("train"),
        &train_out,
        &index,
        &["-q", "--format", "json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let predicted: Vec<(String, f64)> = json(&train_out.join("results.json"))["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["path"]
                    .as_str()
                    .unwrap()
                    .trim_end_matches(".png")
                    .to_string(),
                x["score"].as_f64().unwrap(),
            )
        })
        .collect();
    let mut held_out = Vec::new();
    for &s in &scores {
        let found = predicted
            .iter()
            .find(|(name, p)| (p - s).abs() <= 1e-4 * s && !held_out.contains(name))
            .unwrap_or_else(|| panic!("stored score {s} is no training image's: {predicted:?}"));
        held_out.push(found.0.clone());
    }
    let mut maxima: Vec<f64> = held_out
        .iter()
        .map(|name| {
            let heat: ndarray::Array2<f32> =
                ndarray_npy::read_npy(train_out.join(format!("{name}.npy"))).unwrap();
            heat.fold(f32::MIN, |a, &b| a.max(b)) as f64
        })
        .collect();
    maxima.sort_by(f64::total_cmp);
    let stored: Vec<f64> = cal["heatmap_maxima"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(stored.len(), maxima.len());
    for (a, b) in stored.iter().zip(&maxima) {
        assert!(
            (a - b).abs() <= 1e-4 * b,
            "heatmap maxima {stored:?} vs predict's {maxima:?}"
        );
    }

    let out = r.join("out");
    let o = common::predict_with(&r.join("test"), &out, &index, &["-q", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "--quiet: {}", stderr(&o));
    let run = json(&out.join("results.json"));
    assert_eq!(run["images"], 6);
    assert_eq!(run["thresholds"]["source"], "calibration");
    assert!((run["thresholds"]["image"].as_f64().unwrap() - threshold).abs() < 1e-3);
    let results = run["results"].as_array().unwrap();
    let mut anomalous = 0;
    for res in results {
        let path = res["path"].as_str().unwrap();
        let name = path.trim_end_matches(".png");
        let score = res["score"].as_f64().unwrap();
        let norm = res["normalized_score"].as_f64().unwrap();
        assert!(
            (norm - score / threshold).abs() < 1e-4 * norm.max(1.0),
            "{res}"
        );
        // The per-image file says the same as the run's file.
        assert_eq!(&json(&out.join(format!("{name}.json"))), res);
        let mask = image::open(out.join(format!("{name}_mask.png")))
            .unwrap()
            .to_luma8();
        assert_eq!(mask.dimensions(), (112, 96), "mask at original resolution");
        assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
        let regions = res["regions"].as_array().unwrap();
        let mask_area = mask.pixels().filter(|p| p[0] == 255).count() as u64;
        let region_area: u64 = regions.iter().map(|g| g["area"].as_u64().unwrap()).sum();
        assert_eq!(mask_area, region_area, "{name}: regions cover the mask");
        if path.starts_with("good/") {
            assert_eq!(res["verdict"], "good", "{res}");
            assert!(norm < 1.0);
            assert!(regions.is_empty(), "{res}");
            continue;
        }
        anomalous += 1;
        assert_eq!(res["verdict"], "anomalous", "{res}");
        assert!(norm > 1.0);
        // A region's box overlaps the defect's box.
        let (x0, y0, x1, y1) = boxes.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(
            regions.iter().any(|g| {
                let (gx, gy) = (
                    g["x"].as_u64().unwrap() as u32,
                    g["y"].as_u64().unwrap() as u32,
                );
                let (gw, gh) = (
                    g["width"].as_u64().unwrap() as u32,
                    g["height"].as_u64().unwrap() as u32,
                );
                gx < x1 && x0 < gx + gw && gy < y1 && y0 < gy + gh
            }),
            "{name}: no region over the defect {:?}: {regions:?}",
            (x0, y0, x1, y1)
        );
    }
    assert_eq!(run["anomalous"], anomalous);

    // The report lists every image, worst first, with its verdict.
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(html.matches("class=\"row\"").count(), 6);
    assert_eq!(
        html.matches("data-verdict=\"anomalous\"").count(),
        anomalous
    );
    let first = html.find("data-name=\"").unwrap();
    let worst = results
        .iter()
        .max_by(|a, b| {
            a["score"]
                .as_f64()
                .partial_cmp(&b["score"].as_f64())
                .unwrap()
        })
        .unwrap();
    assert!(
        html[first..].starts_with(&format!(
            "data-name=\"{}\"",
            worst["path"].as_str().unwrap()
        )),
        "worst image first"
    );

    // The same run as CSV.
    let csv_out = r.join("csv");
    let o = common::predict(&r.join("test"), &csv_out, &index);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv_rows(&csv_out.join("results.csv"));
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let res = results
            .iter()
            .find(|x| x["path"] == row["path"].as_str())
            .unwrap();
        assert_eq!(res["verdict"], row["verdict"].as_str());
        assert_eq!(
            row["regions"].parse::<usize>().unwrap(),
            res["regions"].as_array().unwrap().len()
        );
        let s: f64 = row["score"].parse().unwrap();
        assert!((s - res["score"].as_f64().unwrap()).abs() < 1e-3);
    }
    assert!(!csv_out.join("results.json").exists());
    let o = common::predict_with(
        &r.join("test/good"),
        &r.join("plain"),
        &index,
        &["-q", "--no-report"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!r.join("plain/index.html").exists() && r.join("plain/results.csv").exists());
}

#[test]
fn threshold_override_and_exit_codes() {
    let (root, index, _) = trained(&[]);
    let r = root.path();

    // --fail-on-anomaly: 2 when a defect is found, 0 on good images only.
    let o = common::predict_with(
        &r.join("test"),
        &r.join("a"),
        &index,
        &["-q", "--fail-on-anomaly"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = common::predict_with(
        &r.join("test/good"),
        &r.join("b"),
        &index,
        &["-q", "--fail-on-anomaly"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // A threshold above every score: all good, empty masks; the pixel threshold follows.
    let o = common::predict_with(
        &r.join("test"),
        &r.join("c"),
        &index,
        &["-q", "--threshold", "1e9", "--fail-on-anomaly"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let rows = csv_rows(&r.join("c/results.csv"));
    assert!(
        rows.iter()
            .all(|x| x["verdict"] == "good" && x["regions"] == "0"),
        "{rows:?}"
    );
    // Below every score: all anomalous.
    let o = common::predict_with(
        &r.join("test"),
        &r.join("d"),
        &index,
        &["-q", "--threshold", "0"],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "no gate without --fail-on-anomaly"
    );
    let rows = csv_rows(&r.join("d/results.csv"));
    assert!(rows.iter().all(|x| x["verdict"] == "anomalous"), "{rows:?}");

    // Errors are status 1, usage errors too.
    let o = common::predict_with(&r.join("missing"), &r.join("e"), &index, &["-q"]);
    assert_eq!(o.status.code(), Some(1));
    let o = common::predict_with(&r.join("test"), &r.join("f"), &index, &["--threshold", "x"]);
    assert_eq!(o.status.code(), Some(1));
    let o = common::predict_with(&r.join("test"), &r.join("f"), &index, &["--threshold=-1"]);
    assert_fails_naming(&o, &["--threshold"]);
}

#[test]
fn contour_draws_outlines_instead_of_the_heatmap() {
    let (root, index, _) = trained(&[]);
    let r = root.path();
    let o = common::predict_with(&r.join("test/spot"), &r.join("blend"), &index, &["-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = common::predict_with(
        &r.join("test/spot"),
        &r.join("line"),
        &index,
        &["-q", "--contour"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let original = image::open(r.join("test/spot/000.png")).unwrap().to_rgb8();
    let line = image::open(r.join("line/000.jpg")).unwrap().to_rgb8();
    let blend = image::open(r.join("blend/000.jpg")).unwrap().to_rgb8();
    let mask = image::open(r.join("line/000_mask.png")).unwrap().to_luma8();
    let red = |p: &image::Rgb<u8>| p[0] > 180 && p[1] < 90 && p[2] < 90;
    let reds = line.pixels().filter(|p| red(p)).count();
    assert!(reds > 20, "outline drawn: {reds} red pixels");
    // Far from any region the contour overlay is the original image (up to JPEG), while the
    // blend tints everything.
    let (mut far, mut same, mut tinted) = (0, 0, 0);
    for (x, y, p) in line.enumerate_pixels() {
        let near = (x.saturating_sub(3)..(x + 4).min(112)).any(|xx| {
            (y.saturating_sub(3)..(y + 4).min(96)).any(|yy| mask.get_pixel(xx, yy)[0] > 0)
        });
        if near {
            continue;
        }
        far += 1;
        let o = original.get_pixel(x, y);
        let close = |a: &image::Rgb<u8>| (0..3).all(|i| (a[i] as i32 - o[i] as i32).abs() <= 24);
        same += close(p) as usize;
        tinted += !close(blend.get_pixel(x, y)) as usize;
    }
    assert!(
        far > 1000 && same * 100 >= far * 95,
        "{same} of {far} unchanged"
    );
    assert!(tinted * 2 > far, "the blend tints: {tinted} of {far}");
}

#[test]
fn model_without_calibration_gives_scores_only() {
    let (root, index, _) = trained(&["--calibration-ratio", "0"]);
    let r = root.path();
    let side = json(&r.join("index.faiss.json"));
    assert!(side["calibration"].is_null());
    assert_eq!(side["training"]["images"], 16);

    let out = r.join("out");
    let o = common::predict_with(&r.join("test"), &out, &index, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no calibrated threshold"),
        "{}",
        stderr(&o)
    );
    let rows = csv_rows(&out.join("results.csv"));
    assert!(
        rows.iter()
            .all(|x| x["verdict"].is_empty() && x["mask"].is_empty()),
        "{rows:?}"
    );
    assert!(!out.join("good/000_mask.png").exists());

    for flag in ["--fail-on-anomaly", "--contour"] {
        let o = common::predict_with(&r.join("test"), &r.join("x"), &index, &["-q", flag]);
        assert_fails_naming(&o, &["--threshold"]);
    }
    // A threshold on the command line brings verdicts back.
    let o = common::predict_with(
        &r.join("test"),
        &r.join("y"),
        &index,
        &["-q", "--threshold", "0"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(r.join("y/good/000_mask.png").exists());

    // Too few images to hold any out: noted, no calibration.
    let few = r.join("few");
    write_images(&few, 6, 0, (64, 64), Defect::None);
    let o = common::train(
        &few,
        &r.join("few.faiss"),
        &["--weights", "random:0", "--resize", "64"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("none held out"), "{}", stderr(&o));
    assert!(json(&r.join("few.faiss.json"))["calibration"].is_null());
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (root, index, _) = trained(&[]);
    let r = root.path();
    std::fs::write(r.join("test/readme.txt"), "not an image").unwrap();
    let o = common::predict_with(&r.join("test"), &r.join("out"), &index, &["--json-logs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stderr(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["message"].is_string() && l["time"].is_number()));
    assert!(lines
        .iter()
        .any(|l| l["message"].as_str().unwrap().contains("readme.txt")));
    let done = lines
        .iter()
        .find(|l| l["event"] == "predicted")
        .expect("summary event");
    assert_eq!(done["images"], 6);
    assert!(done["anomalous"].as_u64().unwrap() >= 4);

    // Errors too, and the status stays 1.
    let o = common::predict_with(&r.join("nope"), &r.join("out2"), &index, &["--json-logs"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let v: Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["level"], "error");
    assert!(v["message"].as_str().unwrap().contains("nope"), "{v}");
}

#[test]
fn large_non_square_image_is_scored_at_its_own_resolution() {
    // Trained on what the network sees of 4000x3000 photos: their 128x96 resizes.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let train = r.join("train");
    std::fs::create_dir_all(&train).unwrap();
    for i in 0..6u64 {
        let (img, _) = patchcore::util::synthetic::render(i, 4000, 3000, Defect::None);
        patchcore::features::images::resize_bilinear_pil(&img, 128, 96)
            .save(train.join(format!("{i}.png")))
            .unwrap();
    }
    let index = r.join("index.faiss");
    let o = common::train(
        &train,
        &index,
        &[
            "--backbone",
            "resnet18",
            "--weights",
            "random:0",
            "--resize",
            "96",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let big = r.join("big");
    std::fs::create_dir_all(&big).unwrap();
    // A spot away from the middle, so a heatmap mirrored or shifted on the way back would miss.
    let (img, spot) = (900..)
        .map(|seed| patchcore::util::synthetic::render(seed, 4000, 3000, Defect::Spot))
        .find(|(_, b)| {
            let (x0, y0, x1, y1) = b.unwrap();
            ((x0 + x1) / 2).abs_diff(2000) > 800 && ((y0 + y1) / 2).abs_diff(1500) > 500
        })
        .unwrap();
    img.save(big.join("wide.png")).unwrap();
    let out = r.join("big_out");
    let o = common::predict_with(
        &big,
        &out,
        &index,
        &["-q", "--format", "json", "--threshold", "1e9"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let heat: ndarray::Array2<f32> = ndarray_npy::read_npy(out.join("wide.npy")).unwrap();
    assert_eq!(heat.dim(), (3000, 4000));
    let mask = image::open(out.join("wide_mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (4000, 3000));
    let res = &json(&out.join("results.json"))["results"][0];
    assert_eq!(
        (res["width"].as_u64(), res["height"].as_u64()),
        (Some(4000), Some(3000))
    );
    let score = res["score"].as_f64().unwrap() as f32;
    assert!(
        heat.iter().all(|&v| v <= score * 1.0001),
        "the score bounds the heatmap"
    );
    // A feature cell is 8 network pixels, 250 original ones: that much slack.
    common::assert_peak_on(&heat, spot.unwrap(), 250, "wide.png");
}

#[test]
fn tiles_score_large_images_piece_by_piece() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // 320x240 images in tiles of 128: 3 columns x 2 rows, each tile resized to 96.
    let size = (320, 240);
    write_images(&r.join("train"), 12, 0, size, Defect::None);
    let spots = common::write_test_images(r, size, 2, 0, 2);
    let index = r.join("tiled.faiss");
    common::train_ok(
        &r.join("train"),
        &index,
        &[FAST_TRAIN, &["--tile", "128"]].concat(),
    );
    let side = json(&r.join("tiled.faiss.json"));
    assert_eq!(side["tile"], 128);
    assert_eq!(side["training"]["images"], 7, "12 minus 5 held out");
    // 6 tiles of 12x12 patches per image.
    assert_eq!(side["training"]["patches"], 7 * 6 * 144);
    assert_eq!(
        side["training"]["image_sizes"][0],
        serde_json::json!([320, 240, 7])
    );

    let out = r.join("out");
    let o = common::predict_with(
        &r.join("test"),
        &out,
        &index,
        &["-q", "-b", "4", "--format", "json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let run = json(&out.join("results.json"));
    assert_eq!(run["images"], 4);
    for res in run["results"].as_array().unwrap() {
        let name = res["path"]
            .as_str()
            .unwrap()
            .trim_end_matches(".png")
            .to_string();
        let heat: ndarray::Array2<f32> =
            ndarray_npy::read_npy(out.join(format!("{name}.npy"))).unwrap();
        assert_eq!(
            heat.dim(),
            (240, 320),
            "{name}: heatmap put back at full size"
        );
        assert!(heat.iter().all(|v| v.is_finite() && *v >= 0.0));
        // The image score is the largest tile score, which bounds the heatmap.
        let score = res["score"].as_f64().unwrap() as f32;
        assert!(heat.iter().all(|&v| v <= score * 1.0001), "{name}");
        if name.starts_with("good") {
            continue;
        }
        assert_eq!(res["verdict"], "anomalous", "{res}");
        let spot = spots.iter().find(|(n, _)| *n == name).expect("a spot").1;
        common::assert_peak_on(&heat, spot, 16, &name);
    }
    // Same image count through a batch size that splits images' tiles across batches.
    let o = common::predict_with(&r.join("test"), &r.join("b1"), &index, &["-q", "-b", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(r.join("b1/spot/001.npy")).unwrap(),
        std::fs::read(out.join("spot/001.npy")).unwrap(),
        "the same heatmap however tiles are batched"
    );

    // Against a reference put together here: each tile cut out by the test and scored as an
    // image of its own (one tile: it is no larger than --tile), then the image score the
    // largest tile score, the heatmap each pixel's largest value over the tiles covering it.
    // Tiles by the documented rule (as few as cover a side with an overlap of at least an
    // eighth of a tile, spread evenly): 320 = 3 tiles of 128 at 0, 96, 192 (overlap 32; two
    // would not cover it), 240 = 2 at 0, 112 (overlap 16).
    let (xs, ys) = ([0u32, 96, 192], [0u32, 112]);
    let tiles = r.join("tiles");
    let names = ["good/000", "spot/001"];
    for name in names {
        let img = image::open(r.join("test").join(format!("{name}.png")))
            .unwrap()
            .into_rgb8();
        let dir = tiles.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (j, &y) in ys.iter().enumerate() {
            for (i, &x) in xs.iter().enumerate() {
                let tile = image::imageops::crop_imm(&img, x, y, 128, 128).to_image();
                tile.save(dir.join(format!("{j}{i}.png"))).unwrap();
            }
        }
    }
    let tiles_out = r.join("tiles-out");
    let o = common::predict_with(&tiles, &tiles_out, &index, &["-q", "-b", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let whole: std::collections::HashMap<String, (f32, Vec<f32>)> =
        common::predict_outputs(&r.join("b1"))
            .into_iter()
            .map(|(n, s, h)| (n, (s, h)))
            .collect();
    let by_tile: std::collections::HashMap<String, (f32, Vec<f32>)> =
        common::predict_outputs(&tiles_out)
            .into_iter()
            .map(|(n, s, h)| (n, (s, h)))
            .collect();
    for name in names {
        let mut score = f32::NEG_INFINITY;
        let mut heat = ndarray::Array2::<f32>::from_elem((240, 320), f32::NEG_INFINITY);
        for (j, &y) in ys.iter().enumerate() {
            for (i, &x) in xs.iter().enumerate() {
                let (s, h) = &by_tile[&format!("{name}/{j}{i}.png")];
                score = score.max(*s);
                assert_eq!(h.len(), 128 * 128);
                for (k, &v) in h.iter().enumerate() {
                    let p = &mut heat[[y as usize + k / 128, x as usize + k % 128]];
                    *p = p.max(v);
                }
            }
        }
        let (s, h) = &whole[&format!("{name}.png")];
        assert!(
            (s - score).abs() <= 1e-5 * score,
            "{name}: score {s}, tiles {score}"
        );
        let top = heat.iter().copied().fold(0f32, f32::max);
        let worst = h
            .iter()
            .zip(heat.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5 * top,
            "{name}: heatmap differs from its tiles' by {worst} (max {top})"
        );
    }

    let o = common::train(
        &r.join("train"),
        &r.join("x.faiss"),
        &["--weights", "random:0", "--tile", "128", "--crop", "96"],
    );
    assert_fails_naming(&o, &["--tile and --crop"]);
}

/// Five copies of one good image in `dir`.
fn five_copies(dir: &Path) {
    write_images(dir, 1, 42, (96, 96), Defect::None);
    for i in 1..5 {
        std::fs::copy(dir.join("000.png"), dir.join(format!("{i:03}.png"))).unwrap();
    }
}

#[test]
fn a_score_exactly_at_the_threshold_is_good() {
    // Calibrated on five copies of one image, the threshold is that image's score exactly
    // (every quantile of equal scores is the score); predicting the same images gives
    // scores exactly at the threshold: good (anomalous is strictly above), normalized 1.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = common::train_small(r, 12);
    five_copies(&r.join("same"));
    let o = common::run(&[
        "calibrate",
        "-q",
        "-i",
        common::s(&r.join("same")),
        "--index",
        common::s(&index),
    ]);
    assert!(o.status.success(), "calibrate: {}", stderr(&o));
    let t = json(&r.join("model/index.faiss.json"))["calibration"]["image_threshold"].clone();
    let o = common::predict_with(&r.join("same"), &r.join("p"), &index, &["-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv_rows(&r.join("p/results.csv"));
    assert_eq!(rows.len(), 5);
    for x in &rows {
        assert_eq!(
            x["score"].parse::<f64>().unwrap(),
            t.as_f64().unwrap(),
            "{x:?}"
        );
        assert_eq!(x["normalized_score"], "1", "{x:?}");
        assert_eq!(x["verdict"], "good", "{x:?}");
    }
}

#[test]
fn predict_ends_with_one_short_line_naming_its_files() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = common::train_small(r, 12);
    write_images(&r.join("test"), 3, 500, (96, 96), Defect::None);
    let o = common::predict_with(&r.join("test"), &r.join("p"), &index, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let last = err.lines().last().unwrap();
    assert!(last.len() < 200, "{} characters: {last}", last.len());
    assert!(
        last.contains("scored 3 images")
            && last.contains("results.csv")
            && last.contains("index.html"),
        "{last}"
    );
    assert!(!err.contains("kNN") && !err.contains("per image"), "{err}");
    // The report's thumbnails link the full-size overlays.
    let html = std::fs::read_to_string(r.join("p/index.html")).unwrap();
    assert_eq!(
        html.matches("<a class=\"full\" href=\"001.jpg\"").count(),
        2
    );
    assert!(r.join("p/001.jpg").is_file());
    // The internals under -v (and --timings).
    let o = common::predict_with(
        &r.join("test"),
        &r.join("v"),
        &index,
        &["-v", "--no-report"],
    );
    let err = stderr(&o);
    assert!(err.contains("s per image") && err.contains("kNN"), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("results.csv") && !last.contains("index.html"),
        "{last}"
    );
}
