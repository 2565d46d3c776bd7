//! The backbones beyond torchvision's ResNets (ResNeXt, DeepLabV3's dilated ResNet, DenseNet,
//! VGG with and without BatchNorm) against torchvision, with seeded random weights: layer
//! outputs and patch features through the official code's layer extraction (forward hooks),
//! with and without its BatchNorm probe, one representative per family at 64 px
//! (tests/reference/backbones.py); the other architectures' tensor names and shapes against
//! torchvision's state dicts; and `patchcore train` / `predict` end to end with a DenseNet.
//!
//! Needs the Python environment made by scripts/setup.sh, as tests/parity.rs.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use common::{json, relative_error, stderr, to_array, write_images};
use ndarray::ArrayD;
use ndarray_npy::read_npy;
use patchcore::features::backbone::{Arch, Backbone, Family};
use patchcore::features::{patch as features, weights};
use patchcore::util::synthetic::Defect;
use tch::{nn::VarStore, Device, Tensor};

const SIZE: i64 = 64;

fn python(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/backbones.py");
    let py = common::python();
    let out = Command::new(&py)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
    assert!(
        out.status.success(),
        "backbones.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn npy(dir: &Path, name: &str) -> ArrayD<f32> {
    read_npy(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs the reference for `arch` with each case (a name and its `--layers`), then checks
/// ours against it: every layer output and the patch features, without and with the probe.
/// The layer names are ours, which are the official code's module names.
fn check(arch_name: &str, cases: &[(&str, &[&str])], legacy_names: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut args: Vec<String> = vec![
        dir.display().to_string(),
        arch_name.into(),
        "--size".into(),
        SIZE.to_string(),
    ];
    for (name, layers) in cases {
        args.push("--case".into());
        args.push(format!("{name}={}", layers.join(",")));
    }
    if legacy_names {
        args.push("--legacy-names".into());
    }
    python(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let arch = Arch::parse(arch_name).unwrap();
    let x = Tensor::try_from(npy(dir, "input.npy")).unwrap();
    for (case, names) in cases {
        let layers: Vec<usize> = names.iter().map(|n| arch.parse_layer(n).unwrap()).collect();
        for suffix in ["", "_probe"] {
            let mut vs = VarStore::new(Device::Cpu);
            let net = Backbone::new(&vs.root(), arch, &layers).unwrap();
            weights::load_file(&mut vs, &dir.join("weights.safetensors")).unwrap();
            if !suffix.is_empty() {
                net.batchnorm_probe(SIZE, Device::Cpu);
            }
            let outputs = tch::no_grad(|| net.forward(&x));
            for (i, (t, &l)) in outputs.iter().zip(&layers).enumerate() {
                assert_eq!(t.size()[1], arch.channels(l), "{arch_name} {}", names[i]);
                let file = format!("{case}{suffix}_{i}.npy");
                let err = relative_error(&to_array(t), &npy(dir, &file));
                eprintln!("{arch_name} {} {file}: relative error {err:.2e}", names[i]);
                assert!(err <= 1e-4, "{arch_name} {file}: relative error {err}");
            }
            let f = features::aggregate(&outputs, 1024);
            let got = to_array(&f.features.reshape([-1, 1024]));
            let file = format!("{case}{suffix}_features.npy");
            let err = relative_error(&got, &npy(dir, &file));
            eprintln!("{arch_name} {case} {file}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{arch_name} {file}: relative error {err}");
        }
        // With BatchNorms the probe must matter (else the test could not tell them apart).
        let (plain, probed) = (
            npy(dir, &format!("{case}_features.npy")),
            npy(dir, &format!("{case}_probe_features.npy")),
        );
        let moved = relative_error(&plain, &probed);
        if arch_name == "vgg11" {
            assert_eq!(moved, 0.0, "VGG without BatchNorm: nothing to probe");
        } else {
            assert!(moved > 1e-2, "{arch_name}: the probe changed nothing");
        }
    }
}

/// The default layers by their names: what `--layers` would say.
fn default_names(arch: &str) -> Vec<String> {
    let a = Arch::parse(arch).unwrap();
    a.default_layers()
        .iter()
        .map(|&l| a.layer_name(l))
        .collect()
}

#[test]
fn resnext50_32x4d_matches_torchvision() {
    let names = default_names("resnext50_32x4d");
    assert_eq!(names, ["layer2", "layer3"]);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    check("resnext50_32x4d", &[("default", &names)], false);
}

/// Dilated layer3 (stride 8: the grid of layer2), tensors under `backbone.`.
#[test]
fn deeplabv3_resnet50_matches_torchvision() {
    check(
        "deeplabv3_resnet50",
        &[("default", &["backbone.layer2", "backbone.layer3"])],
        false,
    );
    let arch = Arch::Deeplabv3Resnet50;
    let vs = VarStore::new(Device::Cpu);
    let net = Backbone::new(&vs.root(), arch, &[2, 3]).unwrap();
    let x = Tensor::zeros([1, 3, SIZE, SIZE], (tch::Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| net.forward(&x));
    assert_eq!(
        out[0].size()[2..],
        out[1].size()[2..],
        "layer3 keeps layer2's grid"
    );
    assert_eq!(out[1].size()[2], SIZE / 8);
    assert!(vs.variables().keys().all(|k| k.starts_with("backbone.")));
}

/// From a file with the old DenseNet names (`denselayer1.norm.1.weight`), as torchvision's.
#[test]
fn densenet121_matches_torchvision() {
    let names = default_names("densenet121");
    assert_eq!(names, ["features.denseblock2", "features.denseblock3"]);
    check(
        "densenet121",
        &[
            ("default", &["features.denseblock2", "features.denseblock3"]),
            ("first", &["features.denseblock1"]),
        ],
        true,
    );
}

#[test]
fn vgg11_bn_matches_torchvision() {
    let names = default_names("vgg11_bn");
    assert_eq!(names, ["features.14", "features.21"]);
    check(
        "vgg11_bn",
        &[
            ("default", &["features.14", "features.21"]),
            // A BatchNorm's output, overwritten by the in-place ReLU after it.
            ("norm", &["features.12", "features.14"]),
        ],
        false,
    );
}

/// Without BatchNorm the probe changes nothing; a convolution's output is taken after the
/// in-place ReLU when the forward goes on, before it when that layer is the last.
#[test]
fn vgg11_matches_torchvision() {
    let names = default_names("vgg11");
    assert_eq!(names, ["features.10", "features.15"]);
    check(
        "vgg11",
        &[
            ("default", &["features.10", "features.15"]),
            ("relu", &["features.8", "features.10"]),
            ("conv_last", &["features.10", "features.13"]),
        ],
        false,
    );
}

/// The other architectures, without a forward: each built network (to its deepest layer)
/// holds exactly torchvision's tensors of those modules, by name and shape.
#[test]
fn other_archs_have_torchvisions_names_and_shapes() {
    let archs = [
        "resnext101_32x8d",
        "deeplabv3_resnet101",
        "densenet161",
        "densenet169",
        "densenet201",
        "vgg13",
        "vgg13_bn",
        "vgg16",
        "vgg16_bn",
        "vgg19",
        "vgg19_bn",
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shapes.json");
    let mut args = vec!["--shapes", file.to_str().unwrap()];
    args.extend(archs);
    python(&args);
    let all: BTreeMap<String, BTreeMap<String, Vec<i64>>> =
        serde_json::from_value(json(&file)).unwrap();
    for name in archs {
        let arch = Arch::parse(name).unwrap();
        let deepest = match arch.family() {
            Family::Vgg(s) => s.module_count() - 1,
            _ => 4,
        };
        let vs = VarStore::new(Device::Cpu);
        let _net = Backbone::unfilled(&vs.root(), arch, &[deepest]).unwrap();
        let ours: HashMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        // Theirs, less what comes after the last layer we can extract.
        let theirs: HashMap<&String, &Vec<i64>> = all[name]
            .iter()
            .filter(|(k, _)| {
                !k.ends_with("num_batches_tracked")
                    && !["fc.", "classifier.", "aux_classifier.", "features.norm5."]
                        .iter()
                        .any(|p| k.starts_with(p))
            })
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (k, shape) in theirs {
            assert_eq!(ours.get(k), Some(shape), "{name} {k}");
        }
        // The channels the aggregation is built for are those of each layer's last module.
        if let Family::DenseNet(_) = arch.family() {
            for b in 1..4 {
                let key = format!("features.transition{b}.norm.weight");
                assert_eq!(vec![arch.channels(b)], all[name][&key], "{name} {key}");
            }
            assert_eq!(
                vec![arch.channels(4)],
                all[name]["features.norm5.weight"],
                "{name}"
            );
        }
    }
}

/// `patchcore train --backbone densenet121` on small images with its default layers, and
/// predict from that model (which rebuilds the network from the sidecar).
#[test]
fn densenet_trains_and_predicts_end_to_end() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 6, 0, (64, 64), Defect::None);
    common::write_test_images(r, (64, 64), 1, 0, 1);
    let index = r.join("index.faiss");
    common::train_ok(
        &r.join("train"),
        &index,
        &[
            "--backbone",
            "densenet121",
            "--weights",
            "random:0",
            "--resize",
            "64",
            "--calibration-ratio",
            "0",
            "-q",
        ],
    );
    let info = json(&r.join("index.faiss.json"));
    assert_eq!(info["backbone"], "densenet121");
    assert_eq!(
        info["layers"],
        serde_json::json!(["features.denseblock2", "features.denseblock3"])
    );
    assert_eq!(info["layer_channels"], serde_json::json!([512, 1024]));
    let o = common::predict_with(
        &r.join("test"),
        &r.join("out"),
        &index,
        &["-q", "--format", "json"],
    );
    assert!(o.status.success(), "predict: {}", stderr(&o));
    let results = json(&r.join("out/results.json"));
    assert_eq!(
        results["results"].as_array().map(Vec::len),
        Some(2),
        "{results}"
    );

    // VGG layers by pool name are recorded by their index in `features`.
    let vgg = r.join("vgg.faiss");
    let o = common::train(
        &r.join("train"),
        &vgg,
        &[
            "--backbone",
            "vgg11",
            "--layers",
            "pool3,pool4",
            "--weights",
            "random:0",
            "--resize",
            "64",
            "--calibration-ratio",
            "0",
            "-q",
        ],
    );
    assert!(o.status.success(), "train vgg11: {}", stderr(&o));
    let info = json(&r.join("vgg.faiss.json"));
    assert_eq!(
        info["layers"],
        serde_json::json!(["features.10", "features.15"])
    );
    assert_eq!(info["layer_channels"], serde_json::json!([256, 512]));
    // A ResNet layer name is refused for a VGG, naming the VGG's own.
    let o = common::train(
        &r.join("train"),
        &vgg,
        &["--backbone", "vgg11", "--layers", "layer2", "-q"],
    );
    common::assert_fails_naming(&o, &["layer2", "vgg11", "features.0 .. features.20"]);
}

/// Without `--weights`, each backbone asks for its default pretrained file: DeepLabV3 its
/// COCO model, DenseNet torchvision's .pth (its only form). Offline here: the error names it.
#[test]
fn default_weights_are_the_families_own() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 2, 0, (64, 64), Defect::None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (arch, what, file) in [
        (
            "deeplabv3_resnet50",
            "no COCO",
            "deeplabv3_resnet50_coco-cd0a2569.pth",
        ),
        ("densenet121", "no ImageNet", "densenet121-a639ec97.pth"),
    ] {
        let o = common::bin()
            .env("PATCHCORE_CACHE", r.join("cache"))
            .env(
                "PATCHCORE_WEIGHTS_PTH_BASE_URL",
                format!("http://127.0.0.1:{port}"),
            )
            .args(["train", "-i", common::s(&r.join("train"))])
            .args(["-o", common::s(&r.join("index.faiss"))])
            .args(["--backbone", arch, "--resize", "64", "-q"])
            .output()
            .unwrap();
        let line = common::error_line(&o);
        assert!(line.contains(what) && line.contains(file), "{line}");
    }
}
