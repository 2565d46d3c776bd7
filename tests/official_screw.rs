//! Parity with the official PatchCore code itself, not with our reading of it: the outputs of
//! amazon-science/patchcore-inspection run unchanged on a screw subset with seeded random
//! weights (`../shared/reference/official-screw`, its README says how they were made), once as
//! the code runs (`as-run`: with its BatchNorm probe) and once with the backbone put in eval
//! mode first (`eval-first`). We train and predict with the binary as a user would, then read
//! the finer outputs (28x28 patch scores, 224x224 segmentations, features, BatchNorm
//! statistics) from the library on the model the binary wrote.
//!
//! Tolerances are the reference README's: FAISS float32 search differs from a float64 brute
//! force by up to 1.5e-4 relative.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{relative_error, to_array};
use ndarray::{Array2, ArrayD};
use ndarray_npy::{read_npy, NpzReader};
use patchcore::features::images::ImageFile;
use patchcore::model::{bank, scoring, single::SingleModel};
use tch::Device;

/// SHA-256 of the weights `make_weights.py` writes (from the reference README).
const WEIGHTS_SHA256: &str = "47cb0feab9fe96ffb356b6e095a167ac851a725a228e4a4de1dad64ee64e35bd";

struct Fixture {
    reference: PathBuf,
    weights: PathBuf,
    train: PathBuf,
    test: PathBuf,
    root: PathBuf,
}

/// The weights and the subset (symbolic links into the dataset: it is never copied), made
/// once per test process; why not when ../shared lacks them.
fn fixture() -> Result<&'static Fixture, &'static str> {
    static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let reference = common::shared_or_why("reference/official-screw")?;
            let data = common::shared_or_why("data/mvtec_ad/screw")?;
            // One folder under target/ per test process, emptied first: a kept temporary
            // folder per run would leave 270 MB of weights behind each time.
            let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let root = tmp.join("official-screw");
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            // The weights are kept between runs: made again only when missing or different.
            let weights = tmp.join("official-screw-wrn50_seed0.safetensors");
            let cached = patchcore::util::fsutil::sha256_file(&weights).ok();
            if cached.as_deref() != Some(WEIGHTS_SHA256) {
                let out = Command::new(common::python())
                    .arg(reference.join("make_weights.py"))
                    .arg(&weights)
                    .output()
                    .expect("python runs (scripts/setup.sh installs it)");
                assert!(
                    out.status.success(),
                    "make_weights.py failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let sha = patchcore::util::fsutil::sha256_file(&weights).unwrap();
            assert_eq!(
                sha, WEIGHTS_SHA256,
                "make_weights.py did not reproduce the reference weights (needs torch 2.13.0, \
                 torchvision 0.28.0)"
            );
            // Train: the first 20 of train/good; test: the first 5 of good and scratch_head.
            let link = |src: &Path, dst: &Path, n: usize| {
                std::fs::create_dir_all(dst).unwrap();
                let mut names: Vec<_> = std::fs::read_dir(src)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                for name in names.iter().take(n) {
                    std::os::unix::fs::symlink(src.join(name), dst.join(name)).unwrap();
                }
            };
            let (train, test) = (root.join("train"), root.join("test"));
            link(&data.join("train/good"), &train, 20);
            for kind in ["good", "scratch_head"] {
                link(&data.join("test").join(kind), &test.join(kind), 5);
            }
            Ok(Fixture {
                reference,
                weights,
                train,
                test,
                root,
            })
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Trains and predicts with the binary (paper protocol, every patch in the bank, as the
/// reference), then checks every reference file of `variant`.
fn check_variant(variant: &str, extra: &[&str]) {
    // Every test that needs the fixture says why it is skipped (a failure in CI), not only the
    // first to make it.
    let f = match fixture() {
        Ok(f) => f,
        Err(why) => return common::skip(why),
    };
    let dir = f.root.join(variant);
    let index = dir.join("index.faiss");
    let mut args = vec![
        "--weights",
        f.weights.to_str().unwrap(),
        "--resize",
        "256",
        "--crop",
        "224",
        "-s",
        "1",
        "--calibration-ratio",
        "0",
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = common::train(&f.train, &index, &args);
    assert!(o.status.success(), "train: {}", common::stderr(&o));
    let out = dir.join("predictions");
    let o = common::predict_with(&f.test, &out, &index, &["-q", "--no-report"]);
    assert!(o.status.success(), "predict: {}", common::stderr(&o));
    let reference = f.reference.join(variant);

    // Image scores, from predict's results.csv.
    let ours: HashMap<String, f64> = std::fs::read_to_string(out.join("results.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let mut cols = l.split(',');
            let path = cols.next().unwrap().to_string();
            (path, cols.next().unwrap().parse().unwrap())
        })
        .collect();
    let official = std::fs::read_to_string(reference.join("scores.csv")).unwrap();
    let mut compared = 0;
    let mut worst = [0f64; 5]; // image scores, patch scores, segmentations, features, BatchNorm
    for line in official.lines().skip(1) {
        let (path, score) = line.split_once(',').unwrap();
        let score: f64 = score.parse().unwrap();
        let key = path.strip_prefix("screw/test/").unwrap();
        let got = ours[key];
        worst[0] = worst[0].max((got - score).abs() / score.abs());
        assert!(
            (got - score).abs() <= 1e-3 * score.abs(),
            "{variant} {key}: image score {got}, official {score}"
        );
        compared += 1;
    }
    assert_eq!(compared, 10, "{variant}: every reference score compared");

    // Patch scores, segmentations and features, from the library on the model just written.
    let info = bank::read_info(&index).unwrap();
    assert_eq!(
        info.batchnorm_probe,
        (!extra.contains(&"--no-batchnorm-probe")).then_some(224),
        "{variant}: the sidecar records the probe"
    );
    let mut model = SingleModel::load(&index, info, None, Device::Cpu, true).unwrap();
    let mut files = Vec::new();
    for kind in ["good", "scratch_head"] {
        for i in 0..5 {
            let relative = PathBuf::from(format!("{kind}/{i:03}.png"));
            files.push(ImageFile {
                path: f.test.join(&relative),
                relative,
            });
        }
    }
    let mut checked = 0;
    let extractor = &model.extractor;
    let knn = &mut model.knn;
    extractor
        .extract(&files, 4, |batch| {
            for e in batch {
                let name = e
                    .file
                    .relative
                    .to_string_lossy()
                    .replace('/', "_")
                    .replace(".png", "");
                assert_eq!(e.grid, (28, 28));
                let patch = knn.patch_scores(e.features.view(), 1).unwrap();
                let patch_map = Array2::from_shape_vec((28, 28), patch.clone())
                    .unwrap()
                    .into_dyn();
                let want: ArrayD<f32> =
                    read_npy(reference.join(format!("{name}_patchscores28.npy"))).unwrap();
                let err = relative_error(&patch_map, &want);
                worst[1] = worst[1].max(err);
                assert!(err < 1e-3, "{variant} {name}: patch scores off by {err:e}");
                let heat = scoring::window_heatmap(&patch, e.grid, &e.geometry)
                    .unwrap()
                    .into_dyn();
                let want: ArrayD<f32> =
                    read_npy(reference.join(format!("{name}_segmentation.npy"))).unwrap();
                let err = relative_error(&heat, &want);
                worst[2] = worst[2].max(err);
                assert!(err < 1e-3, "{variant} {name}: segmentation off by {err:e}");
                if name == "good_000" {
                    let want: ArrayD<f32> =
                        read_npy(reference.join("features_first_test.npy")).unwrap();
                    let err = relative_error(&e.features.clone().into_dyn(), &want);
                    worst[3] = err;
                    assert!(err < 1e-4, "{variant}: features off by {err:e}");
                }
                checked += 1;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(checked, 10);

    // BatchNorm running statistics as the official code used them.
    let vars = extractor.variables();
    let mut npz =
        NpzReader::new(std::fs::File::open(reference.join("batchnorm_running_stats.npz")).unwrap())
            .unwrap();
    let names = npz.names().unwrap();
    assert_eq!(names.len(), 86, "stem + layer1..3 BatchNorms, mean and var");
    for name in names {
        let want: ArrayD<f32> = npz.by_name(&name).unwrap();
        let key = name.trim_end_matches(".npy");
        let got = to_array(
            vars.get(key)
                .unwrap_or_else(|| panic!("{variant}: no variable {key}")),
        );
        let err = relative_error(&got, &want);
        worst[4] = worst[4].max(err);
        assert!(err < 1e-5, "{variant} {key}: off by {err:e}");
    }
    eprintln!(
        "{variant}: largest relative differences from the official outputs: image scores \
         {:.1e}, patch scores {:.1e}, segmentations {:.1e}, features {:.1e}, BatchNorm \
         statistics {:.1e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
}

#[test]
fn official_code_as_it_runs_with_its_batchnorm_probe() {
    check_variant("as-run", &[]);
}

#[test]
fn official_code_with_the_backbone_in_eval_mode_first() {
    check_variant("eval-first", &["--no-batchnorm-probe"]);
}
