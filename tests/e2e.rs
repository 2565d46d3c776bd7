//! End to end on generated images: train, predict, and check what a user gets.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::{run, stderr, write_images};
use ndarray::Array2;
use ndarray_npy::read_npy;
use patchcore::synthetic::Defect;

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
    write_images(&r.join("test/good"), 3, 500, size, Defect::None);
    let scratches = write_images(&r.join("test/scratch"), 3, 600, size, Defect::Scratch);
    let spots = write_images(&r.join("test/spot"), 2, 700, size, Defect::Spot);
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
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("index.faiss.json")).unwrap())
            .unwrap();
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
    for (kind, boxes) in [("scratch", &scratches), ("spot", &spots)] {
        for (i, bbox) in boxes.iter().enumerate() {
            let name = format!("{kind}/{i:03}");
            let s = scores[&format!("{name}.png")];
            assert!(s > max_good, "{name} scores {s}, a good image {max_good}");

            let heat: Array2<f32> = read_npy(out.join(format!("{name}.npy"))).unwrap();
            assert_eq!(heat.dim(), (128, 160), "heatmap at original resolution");
            // About one feature cell of slack.
            common::assert_peak_on(&heat, bbox.unwrap(), 12, &name);
            let jpg = image::open(out.join(format!("{name}.jpg"))).unwrap();
            assert_eq!((jpg.width(), jpg.height()), (160, 128));
        }
    }
    // Good images get outputs too, mirrored by folder.
    assert!(out.join("good/000.npy").exists() && out.join("good/000.jpg").exists());
}

#[test]
fn python_faiss_reads_the_index_and_agrees_on_distances() {
    let root = tempfile::tempdir().unwrap();
    let index = common::train_small(root.path(), 4);
    let script = r#"
import json, sys, faiss, numpy as np
index = faiss.read_index(sys.argv[1])
side = json.load(open(sys.argv[1] + ".json"))
assert index.ntotal == side["bank_size"], (index.ntotal, side["bank_size"])
assert index.d == 1024
assert isinstance(index, faiss.IndexFlatL2), type(index)
x = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
d, _ = index.search(np.ascontiguousarray(x[:5]), 1)
assert np.allclose(d, 0, atol=1e-3), d
print(index.ntotal)
"#;
    let out = Command::new(common::python())
        .args(["-c", script, index.to_str().unwrap()])
        .output()
        .expect("python runs (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "python faiss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sampling_ratio_one_keeps_every_patch_and_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 3, 0, (64, 64), Defect::None);
    let train = |out: &str, ratio: &str| {
        let o = run(&[
            "train",
            "-i",
            r.join("train").to_str().unwrap(),
            "-o",
            r.join(out).to_str().unwrap(),
            "--weights",
            "random:1",
            "--resize",
            "64",
            "-s",
            ratio,
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let side: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r.join(format!("{out}.json"))).unwrap())
                .unwrap();
        side
    };
    let all = train("all.faiss", "1.0");
    assert_eq!(all["bank_size"], all["training"]["patches"]);
    let a = train("a.faiss", "0.2");
    let b = train("b.faiss", "0.2");
    assert_eq!(a["index_sha256"], b["index_sha256"], "same seed, same bank");
}

#[test]
fn memory_budget_spills_features_and_keeps_the_same_bank() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 4, 0, (64, 64), Defect::None);
    let train = |out: &str, budget: Option<&str>| {
        let mut args = vec![
            "train".to_string(),
            "-i".into(),
            r.join("train").to_str().unwrap().into(),
            "-o".into(),
            r.join(out).to_str().unwrap().into(),
            "--weights".into(),
            "random:2".into(),
            "--resize".into(),
            "64".into(),
            "-s".into(),
            "0.3".into(),
        ];
        if let Some(b) = budget {
            args.extend(["--max-memory".into(), b.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let side: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r.join(format!("{out}.json"))).unwrap())
                .unwrap();
        (side, stderr(&o))
    };
    let (free, log) = train("free.faiss", None);
    assert!(!log.contains("kept on disk"), "{log}");
    // Beyond what is reserved for the network, 800 KB hold the projections and the bank but
    // not the 4 x 64 patches' features (1 MiB).
    let budget = (patchcore::feature_store::RESERVED_BYTES + 819_200).to_string();
    let (tight, log) = train("tight.faiss", Some(&budget));
    assert!(log.contains("kept on disk"), "{log}");
    assert_eq!(
        free["index_sha256"], tight["index_sha256"],
        "same bank either way"
    );
    let leftovers: Vec<_> = std::fs::read_dir(r)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary features removed");

    let o = run(&[
        "train",
        "-i",
        r.join("train").to_str().unwrap(),
        "-o",
        r.join("x.faiss").to_str().unwrap(),
        "--weights",
        "random:2",
        "--resize",
        "64",
        "--max-memory",
        "1G",
    ]);
    let line = common::error_line(&o);
    assert!(line.contains("--max-memory"), "{line}");
}

#[test]
fn bf16_precision_is_stored_and_still_finds_defects() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 4, 0, (96, 96), Defect::None);
    write_images(&r.join("test/good"), 2, 500, (96, 96), Defect::None);
    write_images(&r.join("test/spot"), 2, 700, (96, 96), Defect::Spot);
    let index = r.join("index.faiss");
    let o = common::train(
        &r.join("train"),
        &index,
        &[
            "--weights",
            "random:0",
            "--resize",
            "96",
            "--precision",
            "bf16",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let side = std::fs::read_to_string(r.join("index.faiss.json")).unwrap();
    assert!(side.contains("\"precision\": \"bf16\""), "{side}");
    let out = r.join("out");
    let o = common::predict(&r.join("test"), &out, &index);
    assert!(o.status.success(), "{}", stderr(&o));
    let scores = read_scores(&out.join("results.csv"));
    let good = scores["good/000.png"].max(scores["good/001.png"]);
    assert!(
        scores["spot/000.png"] > good && scores["spot/001.png"] > good,
        "{scores:?}"
    );
}
