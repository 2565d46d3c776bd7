//! Backbone ensembles (`train --backbone A --backbone B`): training, the ensemble sidecar,
//! predict's combination of the members' scores, calibrate, `mvtec runall --ensemble`, and
//! bad input. Small random-weight ResNets on 64-pixel images the tests make.

mod common;

use std::path::Path;

use common::{assert_fails_naming, json, run, s, stderr, train, write_images};
use patchcore::util::synthetic::Defect;
use serde_json::Value;

/// Two small ResNets with random weights on 64-pixel images, 5 of 12 images held out.
const ENSEMBLE: &[&str] = &[
    "--backbone",
    "resnet18",
    "--backbone",
    "resnet34:layer2,layer3",
    "--weights",
    "random:0",
    "--resize",
    "64",
    "--calibration-ratio",
    "0.3",
    "-q",
];

/// `predict --format json` of `index` over `input` into `out`; its results.
fn predict_json(input: &Path, out: &Path, index: &Path) -> Value {
    let o = common::predict_with(input, out, index, &["-q", "--format", "json"]);
    assert!(o.status.success(), "predict: {}", stderr(&o));
    json(&out.join("results.json"))
}

#[test]
fn ensemble_trains_records_every_backbone_and_predicts_the_mean_of_normalized_scores() {
    let root = tempfile::tempdir().unwrap();
    let (train_dir, test_dir) = (root.path().join("train"), root.path().join("test"));
    write_images(&train_dir, 12, 0, (64, 64), Defect::None);
    common::write_test_images(root.path(), (64, 64), 2, 2, 0);
    let index = root.path().join("model/index.faiss");
    common::train_ok(&train_dir, &index, ENSEMBLE);

    let side = json(&root.path().join("model/index.faiss.json"));
    assert_eq!(side["format"], "patchcore-ensemble");
    assert_eq!(side["calibration"]["image_threshold"], 1.0);
    let members = side["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    for (m, (name, file)) in members.iter().zip([
        ("resnet18", "index.0-resnet18.faiss"),
        ("resnet34", "index.1-resnet34.faiss"),
    ]) {
        assert_eq!(m["backbone"], name);
        assert_eq!(m["index"], file);
        assert_eq!(m["layers"], serde_json::json!(["layer2", "layer3"]));
        assert_eq!(m["weights"]["spec"], "random:0");
        assert!(m["bank_size"].as_u64().unwrap() > 0);
        assert!(m["image_threshold"].as_f64().unwrap() > 0.0);
        assert!(m["pixel_threshold"].as_f64().unwrap() > 0.0);
        // Each member is a complete model with its own sidecar, agreeing with the ensemble's.
        let own = json(&root.path().join(format!("model/{file}.json")));
        assert_eq!(own["format"], "patchcore-model");
        assert_eq!(own["bank_size"], m["bank_size"]);
        assert_eq!(own["calibration"]["image_threshold"], m["image_threshold"]);
    }
    assert!(
        !index.exists(),
        "no single-model index beside the ensemble sidecar"
    );

    // The ensemble's score is the mean of each member's score over its threshold.
    let ens = predict_json(&test_dir, &root.path().join("p"), &index);
    assert_eq!(ens["thresholds"]["image"], 1.0);
    let per_member: Vec<Value> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let member = root.path().join("model").join(m["index"].as_str().unwrap());
            predict_json(&test_dir, &root.path().join(format!("p{i}")), &member)
        })
        .collect();
    let results = ens["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (k, r) in results.iter().enumerate() {
        let want: f64 = members
            .iter()
            .zip(&per_member)
            .map(|(m, p)| {
                p["results"][k]["score"].as_f64().unwrap() / m["image_threshold"].as_f64().unwrap()
            })
            .sum::<f64>()
            / 2.0;
        let got = r["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-5 * want.max(1.0),
            "{k}: {got} vs {want}"
        );
        let anomalous = r["verdict"] == "anomalous";
        assert_eq!(anomalous, got > 1.0, "{r}");
    }
    // Heatmaps likewise, over each member's pixel threshold.
    let heat = |dir: &str| -> ndarray::Array2<f32> {
        ndarray_npy::read_npy(root.path().join(dir).join("scratch/000.npy")).unwrap()
    };
    let want = (heat("p0") / members[0]["pixel_threshold"].as_f64().unwrap() as f32
        + heat("p1") / members[1]["pixel_threshold"].as_f64().unwrap() as f32)
        / 2.0;
    let got = heat("p");
    let err = (&got - &want).mapv(f32::abs).fold(0f32, |a, &b| a.max(b));
    assert!(err < 1e-4, "heatmap differs by {err}");

    // calibrate gives every member new thresholds and the ensemble's sidecar records them.
    let o = run(&["calibrate", "-q", "-i", s(&train_dir), "--index", s(&index)]);
    assert!(o.status.success(), "calibrate: {}", stderr(&o));
    let after = json(&root.path().join("model/index.faiss.json"));
    for (i, m) in after["members"].as_array().unwrap().iter().enumerate() {
        let own = json(
            &root
                .path()
                .join(format!("model/{}.json", m["index"].as_str().unwrap())),
        );
        assert_eq!(own["calibration"]["images"], 12);
        assert_eq!(own["calibration"]["image_threshold"], m["image_threshold"]);
        assert_ne!(m["image_threshold"], members[i]["image_threshold"]);
    }
    assert_eq!(after["calibration"]["image_threshold"], 1.0);

    // Commands of one bank refuse the ensemble in one line.
    let merged = root.path().join("merged.faiss");
    let o = run(&["merge", "-o", s(&merged), "--base", s(&index), s(&index)]);
    assert_fails_naming(&o, &["index.faiss.json", "ensemble of several backbones"]);
    // predict with --weights (each member records its own) is refused.
    let o = common::predict_with(
        &test_dir,
        &root.path().join("pw"),
        &index,
        &["--weights", "random:0"],
    );
    assert_fails_naming(&o, &["--weights", "ensemble"]);
}

#[test]
fn single_backbone_models_are_unchanged_by_the_layer_syntax() {
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_images(&train_dir, 6, 0, (64, 64), Defect::None);
    let base = ["--weights", "random:0", "--resize", "64", "-q"];
    let a = root.path().join("a/index.faiss");
    let b = root.path().join("b/index.faiss");
    let with_layers = [
        &base[..],
        &["--backbone", "resnet18", "--layers", "layer2,layer3"],
    ]
    .concat();
    let with_colon = [&base[..], &["--backbone", "resnet18:layer2,layer3"]].concat();
    common::train_ok(&train_dir, &a, &with_layers);
    common::train_ok(&train_dir, &b, &with_colon);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let side = json(&root.path().join("a/index.faiss.json"));
    assert_eq!(side["format"], "patchcore-model");
    assert_eq!(side["pretrain_embed_dim"], 1024);
    assert_eq!(side["feature_dim"], 1024);
    assert!(side.get("members").is_none());
}

#[test]
fn target_dimension_is_recorded_and_used() {
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_images(&train_dir, 6, 0, (64, 64), Defect::None);
    let index = root.path().join("m/index.faiss");
    let args = [
        "--backbone",
        "resnet18",
        "--weights",
        "random:0",
        "--resize",
        "64",
        "--embed-dim",
        "512",
        "--target-dim",
        "96",
        "-q",
    ];
    common::train_ok(&train_dir, &index, &args);
    let side = json(&root.path().join("m/index.faiss.json"));
    assert_eq!(side["pretrain_embed_dim"], 512);
    assert_eq!(side["feature_dim"], 96);
    let res = predict_json(&train_dir, &root.path().join("p"), &index);
    assert_eq!(res["results"].as_array().unwrap().len(), 6);
}

#[test]
fn bad_backbone_lists_are_refused_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_images(&train_dir, 3, 0, (64, 64), Defect::None);
    let index = root.path().join("m/index.faiss");
    let o = train(
        &train_dir,
        &index,
        &[
            "--backbone",
            "resnet18",
            "--backbone",
            "resnet19",
            "--weights",
            "random:0",
        ],
    );
    assert_fails_naming(&o, &["--backbone resnet19", "unknown backbone"]);
    let o = train(
        &train_dir,
        &index,
        &[
            "--backbone",
            "resnet18",
            "--backbone",
            "densenet121:layer2",
            "--weights",
            "random:0",
        ],
    );
    assert_fails_naming(
        &o,
        &["--backbone densenet121:layer2", "unknown layer 'layer2'"],
    );
    let o = train(
        &train_dir,
        &index,
        &[
            "--backbone",
            "resnet18",
            "--backbone",
            "resnet34",
            "--layers",
            "layer2",
        ],
    );
    assert_fails_naming(&o, &["--layers", "NAME:LAYER,LAYER"]);
    let o = train(
        &train_dir,
        &index,
        &[
            "--backbone",
            "resnet18",
            "--backbone",
            "resnet34",
            "--weights",
            "random:0",
            "--weights",
            "random:1",
            "--weights",
            "random:2",
        ],
    );
    assert_fails_naming(&o, &["--weights", "3 times for 2 backbones"]);
    assert!(!index.exists() && !root.path().join("m/index.faiss.json").exists());
}

/// `<root>/data/widget`: 12 good training images, 2 good and 2 spotted test images with
/// their masks, 64x64.
fn dataset(root: &Path) -> std::path::PathBuf {
    let cat = root.join("data/widget");
    let size = (64, 64);
    write_images(&cat.join("train/good"), 12, 0, size, Defect::None);
    write_images(&cat.join("test/good"), 2, 500, size, Defect::None);
    let boxes = write_images(&cat.join("test/spot"), 2, 700, size, Defect::Spot);
    let gt = cat.join("ground_truth/spot");
    std::fs::create_dir_all(&gt).unwrap();
    for (i, b) in boxes.iter().enumerate() {
        let (x0, y0, x1, y1) = b.unwrap();
        let mask = image::GrayImage::from_fn(size.0, size.1, |x, y| {
            let inside = x >= x0 && x < x1 && y >= y0 && y < y1;
            image::Luma([if inside { 255 } else { 0 }])
        });
        mask.save(gt.join(format!("{i:03}_mask.png"))).unwrap();
    }
    root.join("data")
}

#[test]
fn mvtec_runall_evaluates_an_ensemble_and_evaluates_it_again_saved() {
    let root = tempfile::tempdir().unwrap();
    let data = dataset(root.path());
    let out = root.path().join("runs");
    let args = [
        "mvtec",
        "runall",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--backbone",
        "resnet18",
        "--backbone",
        "resnet34",
        "--ensemble",
        "--weights",
        "random:0",
        "--resize",
        "64",
        "--crop",
        "56",
        "--target-dim",
        "384",
        "-q",
    ];
    let o = run(&args);
    assert!(o.status.success(), "runall: {}", stderr(&o));
    let dir = out.join("resnet18+resnet34@random-0/widget");
    let result = json(&dir.join("result.json"));
    let config = &result["config"];
    assert_eq!(config["backbone"], "resnet18+resnet34");
    assert_eq!(
        config["layers"],
        serde_json::json!(["0.layer2", "0.layer3", "1.layer2", "1.layer3"])
    );
    assert_eq!(config["target_dim"], 384);
    assert_eq!(result["counts"]["test_images"], 4);
    assert_eq!(result["counts"]["pixels"], 4 * 56 * 56);
    for m in ["image_auroc", "pixel_auroc"] {
        let v = result["metrics"][m].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{m} {v}");
    }
    let side = json(&dir.join("index.faiss.json"));
    assert_eq!(side["members"].as_array().unwrap().len(), 2);
    assert_eq!(side["feature_dim"], 384);

    // The metrics against a direct computation from the members' own outputs (each member
    // is a complete model: predict scores the test images with it): per member, image
    // scores min-max normalised over the test set and maps by one minimum and maximum over
    // all its maps' pixels (the 56x56 crop, at 4..60 of the 64x64 heatmap), then the mean
    // over members; AUROCs of those against the labels and masks.
    let test = data.join("widget/test");
    let members: Vec<Vec<(String, f32, Vec<f32>)>> = ["0-resnet18", "1-resnet34"]
        .iter()
        .map(|m| {
            let out = root.path().join(format!("member-{m}"));
            let index = dir.join(format!("index.{m}.faiss"));
            let o = common::predict_with(&test, &out, &index, &["-q", "--no-report"]);
            assert!(o.status.success(), "predict {m}: {}", stderr(&o));
            common::predict_outputs(&out)
        })
        .collect();
    let names: Vec<&String> = members[0].iter().map(|(n, _, _)| n).collect();
    let mut image_scores = vec![0f64; names.len()];
    let mut pixel_scores = vec![0f64; names.len() * 56 * 56];
    for member in &members {
        let norm = |v: &[f64]| -> Vec<f64> {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            v.iter().map(|x| (x - lo) / (hi - lo)).collect()
        };
        let scores: Vec<f64> = member.iter().map(|(_, s, _)| *s as f64).collect();
        let pixels: Vec<f64> = member
            .iter()
            .flat_map(|(_, _, h)| {
                (4..60).flat_map(move |y| (4..60).map(move |x| h[y * 64 + x] as f64))
            })
            .collect();
        for (acc, v) in image_scores.iter_mut().zip(norm(&scores)) {
            *acc += v / members.len() as f64;
        }
        for (acc, v) in pixel_scores.iter_mut().zip(norm(&pixels)) {
            *acc += v / members.len() as f64;
        }
    }
    let labels: Vec<bool> = names.iter().map(|n| n.starts_with("spot/")).collect();
    let mut masks = Vec::new();
    for (name, &defect) in names.iter().zip(&labels) {
        let mask = defect.then(|| {
            let file = name
                .trim_start_matches("spot/")
                .replace(".png", "_mask.png");
            image::open(data.join("widget/ground_truth/spot").join(file))
                .unwrap()
                .into_luma8()
        });
        for y in 4..60 {
            for x in 4..60 {
                masks.push(mask.as_ref().is_some_and(|m| m.get_pixel(x, y)[0] > 0));
            }
        }
    }
    for (metric, want) in [
        ("image_auroc", auroc(&image_scores, &labels)),
        ("pixel_auroc", auroc(&pixel_scores, &masks)),
    ] {
        let got = result["metrics"][metric].as_f64().unwrap();
        eprintln!("{metric}: runall {got}, direct {want}");
        assert!(
            (got - want).abs() <= 1e-6,
            "{metric}: runall {got}, direct {want}"
        );
    }

    // The saved ensemble evaluated again gives the same metrics.
    let again = root.path().join("again");
    let o = run(&[
        "mvtec",
        "runall",
        "--data",
        s(&data),
        "--out",
        s(&again),
        "--category",
        "widget",
        "--evaluate",
        s(&dir.join("index.faiss")),
        "-q",
    ]);
    assert!(o.status.success(), "runall --evaluate: {}", stderr(&o));
    let second = json(&again.join("resnet18+resnet34@random-0/widget/result.json"));
    assert_eq!(second["metrics"], result["metrics"]);
}

#[test]
fn a_combined_score_of_exactly_one_is_good() {
    // Calibrated on five copies of one image, every member's threshold is that image's score
    // exactly; predicting the same images gives each member score / threshold = 1, so a
    // combined score of exactly 1: good (the rule is "above 1", as a single model's).
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_images(&train_dir, 12, 0, (64, 64), Defect::None);
    let index = root.path().join("model/index.faiss");
    common::train_ok(&train_dir, &index, ENSEMBLE);
    let same = root.path().join("same");
    write_images(&same, 1, 42, (64, 64), Defect::None);
    for i in 1..5 {
        std::fs::copy(same.join("000.png"), same.join(format!("{i:03}.png"))).unwrap();
    }
    let o = run(&["calibrate", "-q", "-i", s(&same), "--index", s(&index)]);
    assert!(o.status.success(), "calibrate: {}", stderr(&o));
    let side = json(&index.with_extension("faiss.json"));
    assert!(
        side["rule"].as_str().unwrap().contains("above 1"),
        "{}",
        side["rule"]
    );
    let ens = predict_json(&same, &root.path().join("p"), &index);
    let results = ens["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for r in results {
        assert_eq!(r["score"], 1.0, "{r}");
        assert_eq!(r["verdict"], "good", "{r}");
    }
}

/// The area under the ROC curve of `scores` against `labels` (ties count half).
fn auroc(scores: &[f64], labels: &[bool]) -> f64 {
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for (&s, &l) in scores.iter().zip(labels) {
        if l {
            pos.push(s)
        } else {
            neg.push(s)
        }
    }
    neg.sort_by(f64::total_cmp);
    let mut wins = 0f64;
    for p in &pos {
        let below = neg.partition_point(|n| n < p);
        let equal = neg.partition_point(|n| n <= p) - below;
        wins += below as f64 + 0.5 * equal as f64;
    }
    wins / (pos.len() * neg.len()) as f64
}
