//! Sharded training and model updates: `train --shard I/N` / `--partial` write partial models
//! that predict refuses; `merge` combines the shards of one training (the unsharded greedy
//! selection over every patch, each selected patch stood in for by its shard's nearest
//! candidate; deterministic), refuses parts that disagree, a missing or a repeated shard or a
//! damaged patch file, and with `--base` grows an existing model. The held-out calibration images do not depend on N.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails_naming, json, run, s, stderr, write_images};
use ndarray::{Array2, Axis};
use patchcore::model::bank;
use patchcore::training::coreset;
use patchcore::util::synthetic::Defect;

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

/// A shard's `NAME.patches.npz`: every patch's projection and nearest candidate's bank row.
fn shard_patches(index: &Path) -> (Array2<f32>, Vec<u32>) {
    let path = PathBuf::from(format!("{}.patches.npz", index.display()));
    let mut npz = ndarray_npy::NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let projected: Array2<f32> = npz.by_name("projected").unwrap();
    let nearest: ndarray::Array1<u32> = npz.by_name("nearest").unwrap();
    (projected, nearest.to_vec())
}

#[test]
fn merge_selects_every_patch_as_one_training_and_stands_in_nearest_candidates() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    // Each shard keeps the full features of twice the training ratio of its patches.
    let parts = shards(tmp.path(), &input, "part", 3, &["--shard-oversample", "2"]);

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

    // The shards' projections, one after the other, are those the unsharded training selects
    // its coreset from.
    let dumped = tmp.path().join("unsharded-projections.npy");
    let o = common::bin()
        .env("PATCHCORE_DUMP_PROJECTIONS", &dumped)
        .args([
            "train",
            "-i",
            s(&input),
            "-o",
            s(&tmp.path().join("full.faiss")),
        ])
        .args(opts(&[]))
        .output()
        .unwrap();
    assert!(o.status.success(), "train: {}", stderr(&o));
    let unsharded: Array2<f32> = ndarray_npy::read_npy(&dumped).unwrap();
    let (mut projected, mut nearest, mut banks) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0u32;
    for part in &parts {
        let bank = vectors(part, bank::PARTIAL_FORMAT);
        let (p, n) = shard_patches(part);
        assert_eq!(p.nrows(), n.len());
        // Each patch's stand-in is a candidate nearest to it (brute force over the
        // candidates' projections); a candidate stands for itself.
        let candidates = coreset::project(bank.view(), 0);
        for (i, &c) in n.iter().enumerate() {
            let d = |row: ndarray::ArrayView1<f32>| {
                coreset::squared_distance(p.row(i).as_slice().unwrap(), row.as_slice().unwrap())
            };
            let best = candidates
                .rows()
                .into_iter()
                .map(d)
                .fold(f32::INFINITY, f32::min);
            assert!(
                d(candidates.row(c as usize)) <= best * (1.0 + 1e-4) + 1e-6,
                "patch {i}: candidate {c} is not the nearest"
            );
        }
        nearest.extend(n.iter().map(|&c| offset + c));
        offset += bank.nrows() as u32;
        projected.push(p);
        banks.push(bank);
    }
    let views: Vec<_> = projected.iter().map(|p| p.view()).collect();
    let all = ndarray::concatenate(Axis(0), &views).unwrap();
    assert_eq!(all, unsharded);
    let candidates = nearest.iter().max().unwrap() + 1;
    assert!(
        (candidates as usize) < all.nrows(),
        "the shards keep some of their patches: {candidates} of {}",
        all.nrows()
    );

    // Expected: the unsharded greedy order, each patch replaced by its stand-in, until the
    // training ratio of all the patches is reached in distinct candidates.
    let keep = coreset::coreset_size(all.nrows(), 0.25);
    let mut chosen: Vec<usize> = Vec::new();
    for patch in coreset::greedy_select(all.view(), all.nrows(), 0) {
        let c = nearest[patch] as usize;
        if chosen.len() < keep && !chosen.contains(&c) {
            chosen.push(c);
        }
    }
    assert_eq!(chosen.len(), keep);
    let bank_views: Vec<_> = banks.iter().map(|b| b.view()).collect();
    let union = ndarray::concatenate(Axis(0), &bank_views).unwrap();
    assert_eq!(
        vectors(&merged, bank::FORMAT),
        union.select(Axis(0), &chosen)
    );

    let info = json(&bank::sidecar_path(&merged));
    assert_eq!(info["format"], "patchcore-model");
    assert!(info.get("partial").is_none());
    assert_eq!(info["bank_size"], keep);
    assert_eq!(info["training"]["patches"], all.nrows());
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
fn merge_refuses_disagreeing_missing_repeated_or_damaged_parts() {
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

    // A missing or damaged patch file (NAME.patches.npz), or none recorded.
    let npz = |i: usize| PathBuf::from(format!("{}.patches.npz", parts[i].display()));
    // Parts are read in shard order: first a missing file of shard 1, then a damaged one of
    // shard 0.
    std::fs::remove_file(npz(1)).unwrap();
    let o = merge(&out, &paths(&parts));
    assert_fails_naming(&o, &["part-1.faiss.patches.npz"]);
    let mut bytes = std::fs::read(npz(0)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(npz(0), bytes).unwrap();
    let o = merge(&out, &paths(&parts));
    assert_fails_naming(&o, &["part-0.faiss.patches.npz", "checksum"]);
    // A partial model of a version that wrote no patch file.
    let side = bank::sidecar_path(&parts[0]);
    let mut info = json(&side);
    info["partial"]
        .as_object_mut()
        .unwrap()
        .remove("patches_blake3");
    std::fs::write(&side, serde_json::to_string(&info).unwrap()).unwrap();
    let o = merge(&out, &paths(&parts));
    assert_fails_naming(
        &o,
        &["part-0.faiss", "older patchcore", "train the shard again"],
    );
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
        "--partial holds none out: every new image joins the bank"
    );
    assert_eq!(
        g_info["bank_size"],
        coreset::coreset_size(patches(&g_info), 0.25)
    );
    // No new image held out: the base's thresholds are kept.
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
fn a_model_update_keeps_the_base_rule_and_says_where_thresholds_come_from() {
    let tmp = tempfile::tempdir().unwrap();
    let old_images = tmp.path().join("train");
    write_images(&old_images, 12, 0, (64, 64), Defect::None);
    let new_images = tmp.path().join("new");
    write_images(&new_images, 12, 900, (64, 64), Defect::None);
    let old = tmp.path().join("old.faiss");
    train(
        &old_images,
        &old,
        &["--calibration-rule", "sigma", "--calibration-coef", "3"],
    );
    let o_info = json(&bank::sidecar_path(&old));
    let merge_loud = |out: &Path, part: &Path| {
        let o = run(&[
            "merge",
            "--threads",
            "1",
            "-o",
            s(out),
            "--base",
            s(&old),
            s(part),
        ]);
        assert!(o.status.success(), "merge --base: {}", stderr(&o));
        stderr(&o)
    };

    // By default every new image joins the bank, and the base's thresholds stay, said so.
    let all_in = tmp.path().join("all.part.faiss");
    train(&new_images, &all_in, &["--partial"]);
    let grown = tmp.path().join("grown.faiss");
    let said = merge_loud(&grown, &all_in);
    let g_info = json(&bank::sidecar_path(&grown));
    assert_eq!(g_info["training"]["images"], 7 + 12);
    assert_eq!(g_info["calibration"], o_info["calibration"]);
    assert!(
        said.contains("the base's thresholds kept") && said.contains("sigma (K = 3)"),
        "{said}"
    );
    assert!(said.contains("patchcore calibrate"), "{said}");

    // Held-out new images renew the thresholds by the base's rule (not the part's default
    // quantile), and merge says old -> new and from which images.
    let held = tmp.path().join("held.part.faiss");
    train(
        &new_images,
        &held,
        &["--partial", "--calibration-ratio", "0.4"],
    );
    let renewed = tmp.path().join("renewed.faiss");
    let said = merge_loud(&renewed, &held);
    let r_info = json(&bank::sidecar_path(&renewed));
    let (oc, rc) = (&o_info["calibration"], &r_info["calibration"]);
    assert_eq!(rc["method"], oc["method"], "{rc}");
    assert_eq!(rc["images"], 5);
    assert_ne!(rc["image_threshold"], oc["image_threshold"]);
    let arrow = format!(
        "image threshold {} -> {}",
        oc["image_threshold"], rc["image_threshold"]
    );
    assert!(said.contains(&arrow), "{arrow} not in {said}");
    assert!(
        said.contains("the 5 images held out of the new images")
            && said.contains("held.part.faiss")
            && said.contains("the base's sigma (K = 3) rule"),
        "{said}"
    );
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
    // --partial holds none out unless told (its images are for the bank of `merge --base`).
    assert_eq!(held(&["--partial"], "p0.faiss"), serde_json::json!([]));
    let whole = held(&["--partial", "--calibration-ratio", "0.1"], "p1.faiss");
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
    // By default a shard keeps every patch, so the merge's greedy selection is the unsharded
    // training's; so it is with an over-sampling of 1 / ratio (4 with -s 0.25).
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    let full = tmp.path().join("full.faiss");
    train(&input, &full, &[]);
    for (name, extra) in [("all", &[][..]), ("os4", &["--shard-oversample", "4"][..])] {
        let parts = shards(tmp.path(), &input, name, 3, extra);
        let merged = tmp.path().join(format!("{name}.faiss"));
        let o = merge(&merged, &paths(&parts));
        assert!(o.status.success(), "merge: {}", stderr(&o));
        assert_eq!(
            std::fs::read(&merged).unwrap(),
            std::fs::read(&full).unwrap(),
            "{name}"
        );
    }
    let merged = tmp.path().join("all.faiss");
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
        "knn_projection",
    ] {
        assert_eq!(m[k], f[k], "{k}");
    }
    // merge, like train, stores the pruned kNN search's projection with the model.
    assert_eq!(m["knn_projection"]["rank"], 64);
}
