//! End to end on generated images: train, predict, and check what a user gets.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::{stderr, write_images};
use ndarray::Array2;
use ndarray_npy::read_npy;
use patchcore::util::synthetic::Defect;

fn read_scores(path: &Path) -> HashMap<String, f32> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("path,score,"));
    lines
        .map(|l| {
            let mut fields = l.split(',');
            let p = fields.next().unwrap();
            (p.to_string(), fields.next().unwrap().parse().unwrap())
        })
        .collect()
}

#[test]
fn train_then_predict_finds_the_defects() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Non-square originals: heatmaps must come back at this resolution.
    let size = (160, 128);
    write_images(&r.join("train/good"), 10, 0, size, Defect::None);
    let defects = common::write_test_images(r, size, 3, 3, 2);
    std::fs::write(r.join("train/good/notes.txt"), "not an image").unwrap();

    let index = r.join("index.faiss");
    let o = common::train(
        &r.join("train"),
        &index,
        &["--weights", "random:0", "--resize", "128", "-s", "0.1"],
    );
    assert!(o.status.success(), "train: {}", stderr(&o));
    assert!(o.stdout.is_empty(), "stdout stays clean");
    assert!(stderr(&o).contains("notes.txt"), "skipped file is noted");
    // The calibration figure beside the model, named in train's summary.
    let svg = std::fs::read_to_string(r.join("index.faiss.calibration.svg")).unwrap();
    assert!(svg.contains("held-out good (5)") && svg.contains("Image threshold"));
    assert!(
        stderr(&o).contains("plotted in ") && stderr(&o).contains("index.faiss.calibration.svg"),
        "{}",
        stderr(&o)
    );

    // The sidecar describes the model.
    let side = common::json(&r.join("index.faiss.json"));
    assert_eq!(side["backbone"], "wide_resnet50_2");
    assert_eq!(side["feature_dim"], 1024);
    // 5 of the 10 images are held out to calibrate the threshold.
    assert_eq!(side["training"]["images"], 5);
    assert_eq!(side["calibration"]["images"], 5);
    // 128x160 input -> 16x20 grid of layer2 -> 320 patches per image.
    assert_eq!(side["training"]["patches"], 1600);
    assert_eq!(side["bank_size"], 160);

    let out = r.join("out");
    let o = common::predict_with(&r.join("test"), &out, &index, &["-b", "3"]);
    assert!(o.status.success(), "predict: {}", stderr(&o));
    assert!(o.stdout.is_empty(), "stdout stays clean");

    let scores = read_scores(&out.join("results.csv"));
    assert_eq!(scores.len(), 8);
    // The report opens with the run's scores beside the model's held-out ones.
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("id=\"score-plot\"><svg") && html.contains("This run: 8 images"));
    assert!(html.contains("held-out good (5)"));
    let max_good = (0..3)
        .map(|i| scores[&format!("good/{i:03}.png")])
        .fold(f32::MIN, f32::max);
    assert_eq!(defects.len(), 5);
    for (name, bbox) in &defects {
        let s = scores[&format!("{name}.png")];
        assert!(s > max_good, "{name} scores {s}, a good image {max_good}");

        let heat: Array2<f32> = read_npy(out.join(format!("{name}.npy"))).unwrap();
        assert_eq!(heat.dim(), (128, 160), "heatmap at original resolution");
        // About one feature cell of slack.
        common::assert_peak_on(&heat, *bbox, 12, name);
        let jpg = image::open(out.join(format!("{name}.jpg"))).unwrap();
        assert_eq!((jpg.width(), jpg.height()), (160, 128));
    }
    // Good images get outputs too, mirrored by folder.
    assert!(out.join("good/000.npy").exists() && out.join("good/000.jpg").exists());
}

/// Searches the features in `FEATS/{0..n}.npy` with FAISS from Python in the index, k nearest;
/// writes the mean of the k squared distances per patch to `FEATS/py{i}.npy`.
const PY_SEARCH: &str = r#"
import json, sys, faiss, numpy as np
path, feats, k, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
index = faiss.read_index(path)
side = json.load(open(path + ".json"))
assert isinstance(index, faiss.IndexFlatL2), type(index)
assert index.ntotal == side["bank_size"], (index.ntotal, side["bank_size"])
assert index.d == side["feature_dim"], (index.d, side["feature_dim"])
assert side["n_neighbors"] == k, side["n_neighbors"]
for i in range(n):
    x = np.ascontiguousarray(np.load(f"{feats}/{i}.npy"), dtype=np.float32)
    d, _ = index.search(x, k)
    np.save(f"{feats}/py{i}.npy", d.mean(axis=1).astype(np.float32))
"#;

/// Largest absolute difference relative to the largest magnitude of `want`.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    diff / want.iter().map(|v| v.abs()).fold(0f32, f32::max)
}

/// predict's patch scores on unseen images, through its image scores (the largest patch
/// score) and heatmaps (the patch map upsampled and smoothed), against FAISS in Python
/// searching the same index with the same features, for k = 1 and 3, fp32 and bf16 (whose
/// backbone alone runs in bfloat16: its kNN must agree with FAISS as closely as fp32's).
#[test]
fn python_faiss_reads_the_index_and_agrees_on_distances() {
    use patchcore::features::images;
    use patchcore::model::{bank, scoring, single::SingleModel};
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 4, 0, (64, 64), Defect::None);
    common::write_test_images(r, (80, 64), 2, 0, 1);
    for (k, precision, bound) in [
        (1usize, "fp32", 1e-4f32),
        (3, "fp32", 1e-4),
        (1, "bf16", 1e-4),
        (3, "bf16", 1e-4),
    ] {
        let case = format!("k={k} {precision}");
        let index = r.join(format!("k{k}{precision}.faiss"));
        let o = common::train(
            &r.join("train"),
            &index,
            &[
                common::RESNET18_64,
                &[
                    "-s",
                    "0.5",
                    "-k",
                    &k.to_string(),
                    "--precision",
                    precision,
                    "-q",
                ],
            ]
            .concat(),
        );
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let out = r.join(format!("out{k}{precision}"));
        let o = common::predict(&r.join("test"), &out, &index);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let scores = read_scores(&out.join("results.csv"));

        // The same images' features, by the code predict runs, and its kNN in this process.
        let info = bank::read_info(&index).unwrap();
        let SingleModel {
            mut knn, extractor, ..
        } = SingleModel::load(&index, info, None, tch::Device::Cpu, true).unwrap();
        let files = images::find_images(&r.join("test")).unwrap().images;
        let feats = r.join(format!("feats{k}{precision}"));
        std::fs::create_dir(&feats).unwrap();
        let mut seen = Vec::new();
        extractor
            .extract(&files, 8, |batch| {
                for e in batch {
                    let i = seen.len();
                    ndarray_npy::write_npy(feats.join(format!("{i}.npy")), &e.features).unwrap();
                    let ours = knn.patch_scores(e.features.view(), k).unwrap();
                    seen.push((e, ours));
                }
                Ok(())
            })
            .unwrap();
        let py = Command::new(common::python())
            .args([
                "-c",
                PY_SEARCH,
                index.to_str().unwrap(),
                feats.to_str().unwrap(),
            ])
            .args([k.to_string(), seen.len().to_string()])
            .output()
            .expect("python runs (scripts/setup.sh installs it)");
        assert!(
            py.status.success(),
            "{case}: python faiss: {}",
            String::from_utf8_lossy(&py.stderr)
        );
        for (i, (e, ours)) in seen.iter().enumerate() {
            let name = e.file.relative.to_string_lossy().into_owned();
            let theirs: ndarray::Array1<f32> = read_npy(feats.join(format!("py{i}.npy"))).unwrap();
            let theirs = theirs.to_vec();
            let err = relative_error(ours, &theirs);
            eprintln!("{case} {name}: patch scores, relative error {err:.2e}");
            assert!(err <= bound, "{case} {name}: patch scores differ by {err}");
            // The binary's image score is the largest of them ...
            let top = scoring::image_score(&theirs);
            let err = (scores[&name] - top).abs() / top;
            eprintln!("{case} {name}: image score, relative error {err:.2e}");
            assert!(
                err <= bound,
                "{case} {name}: score {} vs {top}",
                scores[&name]
            );
            // ... and its heatmap is theirs upsampled and smoothed.
            let want = scoring::to_original(
                scoring::window_heatmap(&theirs, e.grid, &e.geometry)
                    .unwrap()
                    .view(),
                &e.geometry,
            );
            let stem = name.trim_end_matches(".png");
            let heat: Array2<f32> = read_npy(out.join(format!("{stem}.npy"))).unwrap();
            let err = relative_error(heat.as_slice().unwrap(), want.as_slice().unwrap());
            eprintln!("{case} {name}: heatmap, relative error {err:.2e}");
            assert!(err <= bound, "{case} {name}: heatmap differs by {err}");
        }
    }
}

#[test]
fn sampling_ratio_one_keeps_every_patch_and_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 3, 0, (64, 64), Defect::None);
    let train = |out: &str, ratio: &str| {
        let args = ["--weights", "random:1", "--resize", "64", "-s", ratio, "-q"];
        common::train_ok(&r.join("train"), &r.join(out), &args);
        common::json(&r.join(format!("{out}.json")))
    };
    let all = train("all.faiss", "1.0");
    assert_eq!(all["bank_size"], all["training"]["patches"]);
    let a = train("a.faiss", "0.2");
    let b = train("b.faiss", "0.2");
    assert_eq!(a["index_sha256"], b["index_sha256"], "same seed, same bank");
}

/// The features' reserve of the "tight" run of the test below (1.5 GiB, as it was before it
/// was measured).
const TIGHT_RESERVE: u64 = 3 << 29;

#[test]
fn memory_budget_spills_features_and_keeps_the_same_bank() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 4, 0, (64, 64), Defect::None);
    common::write_test_images(r, (64, 64), 1, 1, 1);
    // Trains into ROOT/NAME.faiss (with `ram` bytes of features in RAM at most, through the
    // test-only hook, when given); returns the sidecar and the log.
    let train = |name: &str, extra: &[&str], ram: Option<&str>| {
        let mut args = vec![
            "--backbone",
            "resnet18",
            "--weights",
            "random:2",
            "--resize",
            "64",
        ];
        args.extend_from_slice(extra);
        let index = r.join(format!("{name}.faiss"));
        let mut c = common::bin();
        if let Some(bytes) = ram {
            c.env(patchcore::training::feature_store::RAM_FEATURES_ENV, bytes);
        }
        if name == "tight" {
            // The reserve fixed rather than measured in the child, so that 800 KB above it
            // is a budget that holds exactly that.
            c.env(
                patchcore::training::feature_store::RESERVE_ENV,
                TIGHT_RESERVE.to_string(),
            );
        }
        let o = c
            .args([
                "train",
                "-i",
                common::s(&r.join("train")),
                "-o",
                common::s(&index),
            ])
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "train {name}: {}", stderr(&o));
        (
            common::json(&r.join(format!("{name}.faiss.json"))),
            stderr(&o),
        )
    };
    // predict's outputs of model NAME, in ROOT/NAME-out.
    let predicted = |name: &str| {
        let out = r.join(format!("{name}-out"));
        let o = common::predict(&r.join("test"), &out, &r.join(format!("{name}.faiss")));
        assert!(o.status.success(), "predict {name}: {}", stderr(&o));
        out
    };
    // The same bank, and the same scores and heatmaps to the bit, as without spilling.
    let same = |free: &str, spilled: &str| {
        let (a, b) = (
            common::json(&r.join(format!("{free}.faiss.json"))),
            common::json(&r.join(format!("{spilled}.faiss.json"))),
        );
        assert_eq!(a["index_sha256"], b["index_sha256"], "{spilled}: same bank");
        common::assert_same_outputs(&predicted(free), &predicted(spilled), 0.0, spilled);
    };

    // Over the budget: beyond what is reserved for the network, 800 KB hold the projections
    // and the bank but not the 4 x 64 patches' features (1 MiB).
    let (_, log) = train("free", &["-s", "0.3"], None);
    assert!(!log.contains("kept on disk"), "{log}");
    let budget = (TIGHT_RESERVE + 819_200).to_string();
    let (_, log) = train("tight", &["-s", "0.3", "--max-memory", &budget], None);
    assert!(log.contains("kept on disk"), "{log}");
    same("free", "tight");

    // Within the budget but beyond what is kept in RAM (64 KiB here, 64 MiB in use), as a
    // large training set's features spill: every patch (-s 1), tiles, and shards merged.
    let spill = Some("65536");
    for (name, extra) in [
        ("all", &["-s", "1"][..]),
        ("tiled", &["-s", "0.3", "--tile", "40"]),
    ] {
        let (side, log) = train(name, extra, None);
        assert!(!log.contains("features on disk"), "{log}");
        assert_eq!(side["tile"].as_u64(), (name == "tiled").then_some(40));
        let (_, log) = train(&format!("{name}-spilled"), extra, spill);
        assert!(log.contains("features on disk"), "{name}: {log}");
        same(name, &format!("{name}-spilled"));
    }
    for (name, ram) in [("merged", None), ("merged-spilled", spill)] {
        let mut parts = Vec::new();
        for i in 0..2 {
            let part = format!("{name}-part{i}");
            let shard = format!("{i}/2");
            let (_, log) = train(&part, &["-s", "0.3", "--shard", &shard], ram);
            assert_eq!(log.contains("features on disk"), ram.is_some(), "{log}");
            parts.push(r.join(format!("{part}.faiss")));
        }
        let index = r.join(format!("{name}.faiss"));
        let o = common::run(&[
            "merge",
            "-q",
            "-o",
            common::s(&index),
            common::s(&parts[0]),
            common::s(&parts[1]),
        ]);
        assert!(o.status.success(), "merge {name}: {}", stderr(&o));
    }
    same("merged", "merged-spilled");
    let leftovers: Vec<_> = std::fs::read_dir(r)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary features removed");

    let o = common::train(
        &r.join("train"),
        &r.join("x.faiss"),
        &[
            "--weights",
            "random:2",
            "--resize",
            "64",
            "--max-memory",
            "100M",
        ],
    );
    // Below the runtime and backbone alone (about 300 MiB resident for WRN-50-2): refused
    // before any extraction, saying what would fit. (Until issue 32 a flat 1.5 GiB reserve
    // refused anything under about 1.6 GiB, 1G included.)
    let line = common::assert_fails_naming(&o, &["--max-memory 100M", "at least --max-memory"]);
    assert!(!line.contains('\n'), "{line}");
}

/// How far a bf16 model's image scores may be from the fp32 model's on the same images (same
/// seed, same training images), relative: the backbone runs in bfloat16 (the kNN is exact
/// float32 either way), and the coreset is chosen from the bfloat16 features. Measured: up to 0.122 (resnet18, random
/// weights; the test prints each difference).
const BF16_SCORE_BOUND: f32 = 0.2;

#[test]
fn bf16_precision_is_stored_and_still_finds_defects() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 4, 0, (96, 96), Defect::None);
    write_images(&r.join("test/good"), 2, 500, (96, 96), Defect::None);
    write_images(&r.join("test/spot"), 2, 700, (96, 96), Defect::Spot);
    let mut runs = Vec::new();
    for precision in ["fp32", "bf16"] {
        let index = r.join(format!("{precision}.faiss"));
        let o = common::train(
            &r.join("train"),
            &index,
            &[
                "--backbone",
                "resnet18",
                "--weights",
                "random:0",
                "--resize",
                "96",
                "--precision",
                precision,
                "-q",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let side: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(index.with_extension("faiss.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(side["precision"], precision);
        let out = r.join(precision);
        let o = common::predict(&r.join("test"), &out, &index);
        assert!(o.status.success(), "{}", stderr(&o));
        runs.push(read_scores(&out.join("results.csv")));
    }
    let (fp32, bf16) = (&runs[0], &runs[1]);
    let good = bf16["good/000.png"].max(bf16["good/001.png"]);
    assert!(
        bf16["spot/000.png"] > good && bf16["spot/001.png"] > good,
        "{bf16:?}"
    );
    let mut largest = 0f32;
    for (name, &a) in fp32 {
        let rel = (bf16[name] - a).abs() / a;
        eprintln!(
            "{name}: fp32 {a}, bf16 {}, relative difference {rel:.2e}",
            bf16[name]
        );
        assert!(
            rel <= BF16_SCORE_BOUND,
            "{name}: fp32 {a}, bf16 {}",
            bf16[name]
        );
        largest = largest.max(rel);
    }
    assert!(
        largest > 0.0,
        "bf16 gave the fp32 scores exactly: not run in bf16?"
    );
}
