//! Numerical parity with the official pipeline, computed in this run by PyTorch/torchvision,
//! Pillow and SciPy (tests/reference/reference.py) with seeded random weights, for every
//! supported architecture.
//!
//! Needs the Python environment made by scripts/setup.sh; the tests fail (not skip) without
//! it, since parity is the core promise. The reference outputs live in temporary folders
//! removed when the test process exits (PATCHCORE_KEEP_PARITY=1 keeps them).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use common::{relative_error, to_array};
use ndarray::{ArrayD, ArrayView2, Ix2};
use ndarray_npy::read_npy;
use patchcore::features::backbone::{Arch, ResNet};
use patchcore::features::images::{self, Preprocess};
use patchcore::features::{patch as features, weights};
use patchcore::model::scoring;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Input crop per architecture: the deep ones run on a smaller image to keep the test quick
/// (the grid is then 14x14 on layer2 instead of 28x28).
fn crop(arch: &str) -> i64 {
    match arch {
        "resnet18" | "wide_resnet50_2" => 224,
        _ => 112,
    }
}

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_reference_dirs() {
    if std::env::var_os("PATCHCORE_KEEP_PARITY").is_some() {
        return;
    }
    if let Ok(dirs) = DIRS.lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs the Python reference once per architecture (concurrently for different ones); returns
/// its output folder. Only wide_resnet50_2 also gets the weights as `torch.save` files.
fn reference(arch: &str) -> PathBuf {
    static CELLS: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    static CLEANUP: std::sync::Once = std::sync::Once::new();
    CLEANUP.call_once(|| unsafe {
        libc::atexit(remove_reference_dirs);
    });
    let cell = CELLS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(arch.to_string())
        .or_default()
        .clone();
    cell.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix(&format!("parity-{arch}-"))
            .tempdir()
            .unwrap()
            .keep();
        DIRS.lock().unwrap().push(dir.clone());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/reference.py");
        let py = common::python();
        let mut cmd = Command::new(&py);
        cmd.arg(&script)
            .arg(&dir)
            .arg(arch)
            .args(["--size", &crop(arch).to_string()]);
        if arch == "wide_resnet50_2" {
            cmd.arg("--pt");
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
        assert!(
            out.status.success(),
            "reference.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .clone()
}

fn npy(dir: &Path, name: &str) -> ArrayD<f32> {
    read_npy(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Our preprocessing of the reference image, checked against torchvision's transforms.
fn input(dir: &Path, size: i64) -> Tensor {
    let img = images::load_rgb(&dir.join("input.png")).unwrap();
    let pre = Preprocess {
        resize: (size * 256 / 224) as u32,
        crop: Some(size as u32),
    };
    let (input, _) = pre.apply(&img).unwrap();
    let ours = images::normalize_chw(&input);
    let want = npy(dir, "input.npy");
    assert_eq!(ours.len(), want.len());
    let max_diff = ours
        .iter()
        .zip(want.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff < 1e-6, "preprocessed input differs by {max_diff}");
    Tensor::from_slice(&ours).reshape([1, 3, size, size])
}

/// Our backbone with the reference's weights, returning `layers`.
fn backbone(dir: &Path, arch: Arch, layers: &[usize], weights_file: &str) -> ResNet {
    let mut vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root(), arch, layers).unwrap();
    weights::load_file(&mut vs, &dir.join(weights_file)).unwrap();
    // The variables live on in the network's modules after the store is dropped.
    net
}

/// Reference file names without and with the official code's BatchNorm probe.
const PROBES: [(bool, &str); 2] = [(false, ""), (true, "_probe")];

fn check_backbone(arch_name: &str, weights_file: &str) {
    let dir = reference(arch_name);
    let arch = Arch::parse(arch_name).unwrap();
    let size = crop(arch_name);
    let x = input(&dir, size);

    for (probe, suffix) in PROBES {
        // Backbone outputs with the same weights, loaded by name.
        let net = backbone(&dir, arch, &[2, 3], weights_file);
        if probe {
            net.batchnorm_probe(size, Device::Cpu);
        }
        let layers = tch::no_grad(|| net.forward(&x));
        for (t, name) in layers.iter().zip(["layer2", "layer3"]) {
            let name = format!("{name}{suffix}.npy");
            let err = relative_error(&to_array(t), &npy(&dir, &name));
            eprintln!("{arch_name} {weights_file} {name}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{arch_name} {name}: relative error {err}");
        }

        // Patch features: our pooled-before-upsampling map against the official order.
        let f = features::aggregate(&layers, 1024);
        assert_eq!(f.grid, (size / 8, size / 8));
        let got = to_array(&f.features.reshape([-1, 1024]));
        let name = format!("features{suffix}.npy");
        let err = relative_error(&got, &npy(&dir, &name));
        eprintln!("{arch_name} {weights_file} {name}: relative error {err:.2e}");
        assert!(err <= 1e-4, "{arch_name} {name}: relative error {err}");
    }
    // The probe moves the statistics enough to matter: the two references differ.
    let (plain, probed) = (npy(&dir, "features.npy"), npy(&dir, "features_probe.npy"));
    assert!(
        relative_error(&plain, &probed) > 1e-2,
        "{arch_name}: the probe changed nothing, so the test above cannot tell them apart"
    );
}

#[test]
fn wide_resnet50_2_matches_torchvision_and_official_features() {
    check_backbone("wide_resnet50_2", "weights.safetensors");
}

#[test]
fn resnet18_matches_torchvision() {
    // Basic blocks and 128/256 channels: the pooling windows straddle channels here.
    check_backbone("resnet18", "weights.safetensors");
}

#[test]
fn resnet34_matches_torchvision() {
    check_backbone("resnet34", "weights.safetensors");
}

#[test]
fn resnet50_matches_torchvision() {
    check_backbone("resnet50", "weights.safetensors");
}

#[test]
fn resnet101_matches_torchvision() {
    check_backbone("resnet101", "weights.safetensors");
}

#[test]
fn resnet152_matches_torchvision() {
    check_backbone("resnet152", "weights.safetensors");
}

#[test]
fn wide_resnet101_2_matches_torchvision() {
    check_backbone("wide_resnet101_2", "weights.safetensors");
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    weights::read_file(path)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .collect()
}

/// torchvision's `state_dict()` saved by `torch.save`: an OrderedDict, which libtorch cannot
/// read, in the zip format and in the format before PyTorch 1.6 (torchvision's and Facebook's
/// 2019 downloads), also in half precision (torchvision's wide ResNet files). Each must give
/// exactly the values of the safetensors file, and load into the backbone.
#[test]
fn pytorch_state_dicts_load_like_safetensors() {
    let dir = reference("wide_resnet50_2");
    let want = tensors(&dir.join("weights.safetensors"));
    for (file, half) in [
        ("weights.pt", false),
        ("weights_legacy.pt", false),
        ("weights_half_legacy.pt", true),
    ] {
        let got = tensors(&dir.join(file));
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        let mut want_names: Vec<&String> = want.keys().collect();
        want_names.sort();
        assert_eq!(names, want_names, "{file}");
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(g.size(), w.size(), "{file} {name}");
            let w = if half && w.is_floating_point() {
                assert_eq!(g.kind(), Kind::Half, "{file} {name}");
                w.to_kind(Kind::Half)
            } else {
                w.shallow_clone()
            };
            assert!(g.equal(&w), "{file} {name}: values differ");
        }
        let mut vs = VarStore::new(Device::Cpu);
        let _net = ResNet::new(&vs.root(), Arch::WideResnet50_2, &[2, 3]).unwrap();
        weights::load_file(&mut vs, &dir.join(file)).unwrap();
    }
    // And the zip file through the whole network, as the safetensors one.
    check_backbone("wide_resnet50_2", "weights.pt");
}

/// `--layers` other than layer2,layer3: the first layer listed sets the grid (layer3 first
/// brings layer2 down onto layer3's grid), one layer alone is pooled to 1024 by itself.
#[test]
fn other_layer_choices_match_the_official_features() {
    for arch_name in ["resnet18", "wide_resnet50_2"] {
        let dir = reference(arch_name);
        let arch = Arch::parse(arch_name).unwrap();
        let size = crop(arch_name);
        let x = input(&dir, size);
        for (layers, file, grid) in [
            (&[1, 2][..], "features_layer1_layer2", size / 4),
            (&[3][..], "features_layer3", size / 16),
            (&[3, 2][..], "features_layer3_layer2", size / 16),
        ] {
            for (probe, suffix) in PROBES {
                // The probe stops after the deepest layer asked for, as the official one.
                let net = backbone(&dir, arch, layers, "weights.safetensors");
                if probe {
                    net.batchnorm_probe(size, Device::Cpu);
                }
                let outputs = tch::no_grad(|| net.forward(&x));
                let f = features::aggregate(&outputs, 1024);
                assert_eq!(f.grid, (grid, grid), "{arch_name} {layers:?}");
                let got = to_array(&f.features.reshape([-1, 1024]));
                let file = format!("{file}{suffix}.npy");
                let err = relative_error(&got, &npy(&dir, &file));
                eprintln!("{arch_name} layers {layers:?} {file}: relative error {err:.2e}");
                assert!(
                    err <= 1e-4,
                    "{arch_name} {layers:?} {file}: relative error {err}"
                );
            }
        }
    }
}

#[test]
fn heatmap_matches_torch_interpolate_and_scipy_gaussian() {
    let dir = reference("wide_resnet50_2");
    let map = npy(&dir, "patch_map.npy")
        .into_dimensionality::<Ix2>()
        .unwrap();
    let want = npy(&dir, "heatmap.npy");
    let got = scoring::heatmap(ArrayView2::from(&map), 224, 224).into_dyn();
    let err = relative_error(&got, &want);
    eprintln!("heatmap: relative error {err:.2e}");
    assert!(err <= 1e-6, "heatmap relative error {err}");
}

#[test]
fn weights_for_another_backbone_are_refused_by_name() {
    let dir = reference("resnet18");
    let mut vs = VarStore::new(Device::Cpu);
    let _net = ResNet::new(&vs.root(), Arch::WideResnet50_2, &[2, 3]).unwrap();
    let err = weights::load_file(&mut vs, &dir.join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("another backbone"), "{err}");
}
