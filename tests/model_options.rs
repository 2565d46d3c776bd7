//! Options recorded in the model that change how images are scored: the official code's
//! BatchNorm probe (on by default, `--no-batchnorm-probe`) and the paper's Eq. 7 image-score
//! re-weighting (`--score-reweighting B`). Their numerics are checked elsewhere (against the
//! official code's outputs in official_screw.rs, against a direct computation in
//! `scoring::tests`); here: that the commands apply them, record them and follow the record.

mod common;

use std::collections::HashMap;
use std::path::Path;

use ndarray::Array2;
use ndarray_npy::read_npy;
use patchcore::util::synthetic::Defect;

const TRAIN: &[&str] = &[
    "--weights",
    "random:0",
    "--backbone",
    "resnet18",
    "--resize",
    "64",
    "-s",
    "0.5",
    "--calibration-ratio",
    "0",
    "-q",
];

fn scores(out: &Path) -> HashMap<String, f64> {
    std::fs::read_to_string(out.join("results.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let mut c = l.split(',');
            (
                c.next().unwrap().to_string(),
                c.next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

fn sidecar(index: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(index.with_extension("faiss.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Trains with `extra`, predicts `test`; returns the scores.
fn train_predict(
    root: &Path,
    name: &str,
    train: &Path,
    test: &Path,
    extra: &[&str],
) -> HashMap<String, f64> {
    let index = root.join(name).join("index.faiss");
    let mut args = TRAIN.to_vec();
    args.extend_from_slice(extra);
    let o = common::train(train, &index, &args);
    assert!(o.status.success(), "train {name}: {}", common::stderr(&o));
    let out = root.join(name).join("out");
    let o = common::predict_with(test, &out, &index, &["-q", "--no-report"]);
    assert!(o.status.success(), "predict {name}: {}", common::stderr(&o));
    scores(&out)
}

#[test]
fn batchnorm_probe_is_the_default_recorded_and_followed_by_old_models() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (dir.path().join("train"), dir.path().join("test"));
    common::write_images(&train, 6, 0, (80, 64), Defect::None);
    common::write_images(&test.join("spot"), 2, 50, (80, 64), Defect::Spot);

    let probed = train_predict(dir.path(), "probed", &train, &test, &[]);
    let plain = train_predict(
        dir.path(),
        "plain",
        &train,
        &test,
        &["--no-batchnorm-probe"],
    );
    let probed_index = dir.path().join("probed/index.faiss");
    let plain_index = dir.path().join("plain/index.faiss");
    // No crop: the probe input is the resize side.
    assert_eq!(sidecar(&probed_index)["batchnorm_probe"], 64);
    assert!(sidecar(&plain_index)["batchnorm_probe"].is_null());
    for (name, s) in &probed {
        let p = plain[name];
        assert!(
            (s - p).abs() > 1e-3 * p.abs(),
            "{name}: the probe changed nothing ({s} vs {p})"
        );
    }

    // A model written before the field existed: without it, predict runs without the probe.
    let mut old = sidecar(&plain_index);
    old.as_object_mut().unwrap().remove("batchnorm_probe");
    std::fs::write(
        plain_index.with_extension("faiss.json"),
        serde_json::to_string_pretty(&old).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("old-out");
    let o = common::predict_with(&test, &out, &plain_index, &["-q", "--no-report"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(scores(&out), plain);
}

#[test]
fn score_reweighting_lowers_image_scores_only_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (dir.path().join("train"), dir.path().join("test"));
    common::write_images(&train, 6, 0, (64, 64), Defect::None);
    common::write_images(&test.join("spot"), 2, 50, (64, 64), Defect::Spot);
    common::write_images(&test.join("good"), 2, 70, (64, 64), Defect::None);

    let plain = train_predict(dir.path(), "plain", &train, &test, &[]);
    let weighted = train_predict(
        dir.path(),
        "eq7",
        &train,
        &test,
        &["--score-reweighting", "3"],
    );
    assert_eq!(
        sidecar(&dir.path().join("eq7/index.faiss"))["score_reweighting"],
        3
    );
    assert!(sidecar(&dir.path().join("plain/index.faiss"))["score_reweighting"].is_null());
    assert_eq!(plain.len(), 4);
    for (name, p) in &plain {
        // The weight 1 - e^d* / sum e^d_m is in (0, 1) when m* has other neighbours.
        let w = weighted[name];
        assert!(w > 0.0 && w < *p, "{name}: weighted {w}, plain {p}");
        // Heatmaps are the patch scores', untouched.
        let a: Array2<f32> = read_npy(
            dir.path()
                .join("plain/out")
                .join(name)
                .with_extension("npy"),
        )
        .unwrap();
        let b: Array2<f32> =
            read_npy(dir.path().join("eq7/out").join(name).with_extension("npy")).unwrap();
        assert_eq!(a, b, "{name}: heatmap changed");
    }

    let o = common::train(
        &train,
        &dir.path().join("bad/index.faiss"),
        &[TRAIN, &["--score-reweighting", "0"]].concat(),
    );
    common::assert_fails_naming(&o, &["--score-reweighting"]);
}

/// The probe's outcome read from the cache scores exactly as the probe run afresh, whatever
/// thread count filled the cache first (`src/features/probe.rs`).
#[test]
fn a_cached_batchnorm_probe_scores_exactly_as_a_fresh_one() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = common::train_small(r, 6);
    let test = r.join("test");
    common::write_images(&test, 2, 700, (96, 96), Defect::Spot);
    // Each call says whether the probe came from the cache (`probe_cached` of --timings).
    let predict = |cache: &str, threads: &str, out: &str, cached: bool| {
        let (npy, from_cache) =
            predict_cached(&r.join(cache), &index, &test, &r.join(out), threads);
        assert_eq!(from_cache, cached, "{out}: probe from the cache");
        npy
    };
    // A cache first filled with one thread, then used with two (another entry: the last
    // bits depend on the thread count); fresh caches for each.
    let one_then_two = (predict("c", "1", "a", false), predict("c", "2", "b", false));
    let fresh = (
        predict("c1", "1", "c", false),
        predict("c2", "2", "d", false),
    );
    assert_eq!(one_then_two.0, fresh.0, "one thread");
    assert_eq!(one_then_two.1, fresh.1, "two threads");
    // And second starts with a filled cache load from it.
    assert_eq!(predict("c2", "2", "e", true), fresh.1);
    assert_eq!(predict("c", "1", "f", true), fresh.0);
}

/// predict with the cache folder `cache` and `threads` threads: the heatmap of 000.png and
/// whether the BatchNorm probe's outcome came from the cache.
fn predict_cached(
    cache: &Path,
    index: &Path,
    test: &Path,
    out: &Path,
    threads: &str,
) -> (Vec<u8>, bool) {
    let timings = out.with_extension("timings.json");
    let o = common::bin()
        .env("PATCHCORE_CACHE", cache)
        .args(["predict", "-q", "--threads", threads, "-i"])
        .arg(test)
        .arg("-o")
        .arg(out)
        .arg("--index")
        .arg(index)
        .arg("--timings")
        .arg(&timings)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cached = common::json(&timings)["probe_cached"].as_bool().unwrap();
    (std::fs::read(out.join("000.npy")).unwrap(), cached)
}

/// Cache entries in `cache`'s probe folder.
fn probe_entries(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("probe")).map_or(0, |d| d.count())
}

/// resnet18 weights up to layer3 with values from `seed`, written as safetensors by tch.
fn make_weights(path: &Path, seed: i64) {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = patchcore::features::backbone::ResNet::new(
        &vs.root(),
        patchcore::features::backbone::Arch::Resnet18,
        &[2, 3],
    )
    .unwrap();
    vs.save(path).unwrap();
}

/// Two weights files of one architecture get an entry each (the key holds the weights'
/// checksum: sharing one would give the second model the first one's statistics), and a
/// second start of each loads its own.
#[test]
fn two_weights_files_of_one_architecture_get_separate_probe_entries() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    common::write_images(&r.join("train"), 2, 0, (64, 64), Defect::None);
    let test = r.join("test");
    common::write_images(&test, 1, 700, (64, 64), Defect::Spot);
    let cache = r.join("cache");
    let mut heat = Vec::new();
    for seed in [1, 2] {
        let weights = r.join(format!("w{seed}.safetensors"));
        make_weights(&weights, seed);
        let index = r.join(format!("m{seed}.faiss"));
        let mut args = TRAIN.to_vec();
        args[1] = weights.to_str().unwrap();
        let o = common::train(&r.join("train"), &index, &args);
        assert!(o.status.success(), "train: {}", common::stderr(&o));
        // Trained with the test processes' cache; predicted with a cache of its own.
        let first = predict_cached(&cache, &index, &test, &r.join(format!("a{seed}")), "1");
        assert!(!first.1, "weights {seed}: the first start runs the probe");
        assert_eq!(
            probe_entries(&cache),
            seed as usize,
            "an entry per weights file"
        );
        heat.push((index, first.0));
    }
    for (seed, (index, first)) in heat.iter().enumerate() {
        let again = predict_cached(&cache, index, &test, &r.join(format!("b{seed}")), "1");
        assert!(
            again.1,
            "weights {}: the second start loads from the cache",
            seed + 1
        );
        assert_eq!(&again.0, first, "the same heatmap from the cache");
    }
    assert_eq!(probe_entries(&cache), 2);
}
