//! Sharded training and model updates: `train --shard I/N` / `--partial` write partial models
//! that predict refuses; `merge` combines the shards of one training (the greedy coreset over
//! the union, deterministic), refuses parts that disagree, a missing or a repeated shard, and
//! with `--base` grows an existing model. The held-out calibration images do not depend on N.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails_naming, json, run, s, stderr, write_images};
use ndarray::{Array2, Axis};
use patchcore::synthetic::Defect;
use patchcore::{bank, coreset};

/// Small and fast: resnet18 on 64-pixel images, a quarter of the patches.
fn opts(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<&str> = common::RESNET18_64.to_vec();
    v.extend(["-s", "0.25", "-q", "--threads", "1"]);
    v.extend(extra);
    v.into_iter().map(String::from).collect()
}

/// `patchcore train -i INPUT -o INDEX` with `opts(extra)`, which must succeed.
fn train(input: &Path, index: &Path, extra: &[&str]) {
    let args = opts(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::train_ok(input, index, &args);
}

/// `patchcore merge -q -o OUTPUT ARGS...`.
fn merge(output: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["merge", "-q", "--threads", "1", "-o", s(output)];
    all.extend_from_slice(args);
    run(&all)
}

/// Trains shards `0..n` of `input` into ROOT/NAME-I.faiss; returns their paths.
fn shards(root: &Path, input: &Path, name: &str, n: usize, extra: &[&str]) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let part = root.join(format!("{name}-{i}.faiss"));
            let shard = format!("{i}/{n}");
            train(input, &part, &[&["--shard", &shard], extra].concat());
            part
        })
        .collect()
}

/// The bank vectors of a model (`format` names its kind) as `[M, D]`.
fn vectors(index: &Path, format: &str) -> Array2<f32> {
    let info = bank::read_info_as(index, format).unwrap();
    let idx = bank::read_index(index, &info).unwrap();
    let d = info.feature_dim as usize;
    let mut v = vec![0f32; info.bank_size * d];
    faiss::Index::reconstruct_n(&idx, faiss::Idx::new(0), info.bank_size, &mut v).unwrap();
    Array2::from_shape_vec((info.bank_size, d), v).unwrap()
}

fn paths(v: &[PathBuf]) -> Vec<&str> {
    v.iter().map(|p| s(p)).collect()
}

#[test]
fn merge_of_shards_is_the_greedy_coreset_of_their_union() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    let parts = shards(tmp.path(), &input, "part", 3, &[]);

    let merged = tmp.path().join("merged.faiss");
    let o = merge(&merged, &paths(&parts));
    assert!(o.status.success(), "merge: {}", stderr(&o));
    // The parts in another order give the same files.
    let again = tmp.path().join("again.faiss");
    let reversed: Vec<PathBuf> = parts.iter().rev().cloned().collect();
    let o = merge(&again, &paths(&reversed));
    assert!(o.status.success(), "merge: {}", stderr(&o));
    assert_eq!(
        std::fs::read(&merged).unwrap(),
        std::fs::read(&again).unwrap()
    );

    // Expected: train's greedy selection over the union of the parts' banks, in shard order,
    // projected with the seed, to a quarter of the parts' training patches.
    let infos: Vec<_> = parts
        .iter()
        .map(|p| bank::read_info_as(p, bank::PARTIAL_FORMAT).unwrap())
        .collect();
    let banks: Vec<Array2<f32>> = parts
        .iter()
        .map(|p| vectors(p, bank::PARTIAL_FORMAT))
        .collect();
    let views: Vec<_> = banks.iter().map(|b| b.view()).collect();
    let union = ndarray::concatenate(Axis(0), &views).unwrap();
    let patches: usize = infos.iter().map(|i| i.training.patches).sum();
    let keep = coreset::coreset_size(patches, 0.25);
    assert!(
        keep < union.nrows(),
        "the parts over-sample: {keep} of {}",
        union.nrows()
    );
    let picked = coreset::greedy_select(coreset::project(union.view(), 0).view(), keep, 0);
    let expected = union.select(Axis(0), &picked);
    assert_eq!(vectors(&merged, bank::FORMAT), expected);

    let info = json(&bank::sidecar_path(&merged));
    assert_eq!(info["format"], "patchcore-model");
    assert!(info.get("partial").is_none());
    assert_eq!(info["bank_size"], keep);
    assert_eq!(info["training"]["patches"], patches);
    assert_eq!(info["training"]["images"], 7, "12 images, 5 held out");
    // Calibrated on the 5 held-out images, as train does; predict uses the merged model.
    assert_eq!(info["calibration"]["images"], 5);
    let test = tmp.path().join("test");
    write_images(&test, 2, 500, (64, 64), Defect::Scratch);
    let o = common::predict(&test, &tmp.path().join("out"), &merged);
    assert!(o.status.success(), "predict: {}", stderr(&o));
}

#[test]
fn predict_refuses_a_partial_model() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    let part = tmp.path().join("new.part.faiss");
    train(&input, &part, &["--partial"]);
    let side = json(&bank::sidecar_path(&part));
    assert_eq!(side["format"], "patchcore-partial-model");
    assert_eq!(side["partial"]["shards"], 1);
    let o = common::predict(&input, &tmp.path().join("out"), &part);
    assert_fails_naming(
        &o,
        &["new.part.faiss.json", "partial model", "patchcore merge"],
    );
    let o = run(&["calibrate", "-q", "-i", s(&input), "--index", s(&part)]);
    assert_fails_naming(&o, &["new.part.faiss.json", "partial model"]);
}

#[test]
fn merge_refuses_disagreeing_missing_or_repeated_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    let parts = shards(tmp.path(), &input, "part", 2, &[]);
    let other = tmp.path().join("other-1.faiss");
    train(&input, &other, &["--shard", "1/2", "--seed", "7"]);
    let out = tmp.path().join("merged.faiss");

    let o = merge(&out, &[s(&parts[0]), s(&other)]);
    assert_fails_naming(&o, &["other-1.faiss.json", "seed"]);
    let o = merge(&out, &[s(&parts[0])]);
    assert_fails_naming(&o, &["shard 1/2 is missing"]);
    let o = merge(&out, &[s(&parts[0]), s(&parts[1]), s(&parts[1])]);
    assert_fails_naming(&o, &["part-1.faiss", "both shard 1/2"]);
    // A complete model is no part.
    let full = tmp.path().join("full.faiss");
    train(&input, &full, &[]);
    let o = merge(&out, &[s(&full)]);
    assert_fails_naming(&o, &["full.faiss.json", "complete model"]);
    assert!(!out.exists(), "nothing written");
}

#[test]
fn merge_with_base_grows_a_model_by_new_images() {
    let tmp = tempfile::tempdir().unwrap();
    let old_images = tmp.path().join("train");
    write_images(&old_images, 12, 0, (64, 64), Defect::None);
    let new_images = tmp.path().join("new");
    write_images(&new_images, 3, 900, (64, 64), Defect::None);
    let old = tmp.path().join("old.faiss");
    train(&old_images, &old, &[]);
    let part = tmp.path().join("new.part.faiss");
    train(&new_images, &part, &["--partial"]);

    let grown = tmp.path().join("grown.faiss");
    let o = merge(&grown, &["--base", s(&old), s(&part)]);
    assert!(o.status.success(), "merge --base: {}", stderr(&o));
    let (o_info, p_info, g_info) = (
        json(&bank::sidecar_path(&old)),
        json(&bank::sidecar_path(&part)),
        json(&bank::sidecar_path(&grown)),
    );
    let patches = |v: &serde_json::Value| v["training"]["patches"].as_u64().unwrap() as usize;
    assert_eq!(patches(&g_info), patches(&o_info) + patches(&p_info));
    assert_eq!(
        g_info["training"]["images"],
        7 + 3,
        "3 new images, too few to hold any out"
    );
    assert_eq!(
        g_info["bank_size"],
        coreset::coreset_size(patches(&g_info), 0.25)
    );
    // Too few new images to hold any out: the base's thresholds are kept.
    assert_eq!(g_info["calibration"], o_info["calibration"]);
    // The new bank is chosen from the old bank and the new images' patches.
    let union = ndarray::concatenate(
        Axis(0),
        &[
            vectors(&old, bank::FORMAT).view(),
            vectors(&part, bank::PARTIAL_FORMAT).view(),
        ],
    )
    .unwrap();
    for row in vectors(&grown, bank::FORMAT).rows() {
        assert!(union.rows().into_iter().any(|u| u == row));
    }
    let o = common::predict(&new_images, &tmp.path().join("out"), &grown);
    assert!(o.status.success(), "predict: {}", stderr(&o));

    // A base trained with other options is refused, naming it.
    let other = tmp.path().join("other.faiss");
    train(&old_images, &other, &["--seed", "3"]);
    let o = merge(
        &tmp.path().join("x.faiss"),
        &["--base", s(&other), s(&part)],
    );
    assert_fails_naming(&o, &["other.faiss.json", "seed"]);
}

#[test]
fn held_out_images_do_not_depend_on_the_shard_count() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 14, 0, (64, 64), Defect::None);
    let held = |extra: &[&str], name: &str| {
        let part = tmp.path().join(name);
        train(&input, &part, extra);
        json(&bank::sidecar_path(&part))["partial"]["held_out"].clone()
    };
    let whole = held(&["--partial"], "p1.faiss");
    assert_eq!(whole.as_array().unwrap().len(), 5);
    assert_eq!(held(&["--shard", "1/2"], "p2.faiss"), whole);
    assert_eq!(held(&["--shard", "2/3"], "p3.faiss"), whole);
    // The shards together hold every other image exactly once.
    let images = |n: usize| -> usize {
        (0..n)
            .map(|i| {
                let part = tmp.path().join(format!("c{n}-{i}.faiss"));
                train(&input, &part, &["--shard", &format!("{i}/{n}")]);
                json(&bank::sidecar_path(&part))["training"]["images"]
                    .as_u64()
                    .unwrap() as usize
            })
            .sum()
    };
    assert_eq!(images(3), 14 - 5);
}

#[test]
fn shards_keeping_every_patch_merge_into_the_unsharded_model() {
    // --shard-oversample 4 with -s 0.25: every patch is a candidate, in folder order, so the
    // merge's greedy selection is the unsharded training's.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    let parts = shards(tmp.path(), &input, "all", 3, &["--shard-oversample", "4"]);
    let merged = tmp.path().join("merged.faiss");
    let o = merge(&merged, &paths(&parts));
    assert!(o.status.success(), "merge: {}", stderr(&o));
    let full = tmp.path().join("full.faiss");
    train(&input, &full, &[]);
    assert_eq!(
        std::fs::read(&merged).unwrap(),
        std::fs::read(&full).unwrap()
    );
    let (m, f) = (
        json(&bank::sidecar_path(&merged)),
        json(&bank::sidecar_path(&full)),
    );
    for k in [
        "bank_size",
        "training",
        "calibration",
        "weights",
        "preprocess",
    ] {
        assert_eq!(m[k], f[k], "{k}");
    }
}
