//! Numerical parity with the official pipeline, computed in this run by PyTorch/torchvision,
//! Pillow and SciPy (tests/reference/reference.py) with seeded random weights.
//!
//! Needs the Python environment made by scripts/setup.sh; the tests fail (not skip) without
//! it, since parity is the core promise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ndarray::{ArrayD, ArrayView2, Ix2};
use ndarray_npy::read_npy;
use patchcore::backbone::{Arch, ResNet};
use patchcore::images::{self, Preprocess};
use patchcore::{features, scoring, weights};
use tch::{nn::VarStore, Device, Tensor};

/// Runs the Python reference once per architecture; returns its output folder.
fn reference(arch: &str) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs.lock().unwrap();
    if let Some(d) = dirs.get(arch) {
        return d.clone();
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("parity-{arch}-"))
        .tempdir()
        .unwrap()
        .keep();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/reference.py");
    let py = common::python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(&dir)
        .arg(arch)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
    assert!(
        out.status.success(),
        "reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dirs.insert(arch.to_string(), dir.clone());
    dir
}

fn npy(dir: &Path, name: &str) -> ArrayD<f32> {
    read_npy(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn to_array(t: &Tensor) -> ArrayD<f32> {
    let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
    let t = t.contiguous();
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    ArrayD::from_shape_vec(shape, v).unwrap()
}

/// max |a - b| / max |b|.
fn relative_error(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale.max(1e-30)
}

fn check_backbone(arch_name: &str, weights_file: &str) {
    let dir = reference(arch_name);
    let arch = Arch::parse(arch_name).unwrap();

    // Preprocessing: our Pillow-exact resize and crop against torchvision's transforms.
    let img = images::load_rgb(&dir.join("input.png")).unwrap();
    let pre = Preprocess {
        resize: 256,
        crop: Some(224),
    };
    let (input, _) = pre.apply(&img).unwrap();
    let ours = images::normalize_chw(&input);
    let want = npy(&dir, "input.npy");
    let max_diff = ours
        .iter()
        .zip(want.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert_eq!(ours.len(), want.len());
    assert!(max_diff < 1e-6, "preprocessed input differs by {max_diff}");

    // Backbone outputs with the same weights, loaded by name.
    let mut vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root(), arch, &[2, 3]).unwrap();
    weights::load_file(&mut vs, &dir.join(weights_file)).unwrap();
    let x = Tensor::from_slice(&ours).reshape([1, 3, 224, 224]);
    let layers = tch::no_grad(|| net.forward(&x));
    for (t, name) in layers.iter().zip(["layer2.npy", "layer3.npy"]) {
        let err = relative_error(&to_array(t), &npy(&dir, name));
        eprintln!("{arch_name} {weights_file} {name}: relative error {err:.2e}");
        assert!(err <= 1e-4, "{arch_name} {name}: relative error {err}");
    }

    // Patch features: our pooled-before-upsampling map against the official order.
    let f = features::aggregate(&layers, 1024);
    assert_eq!(f.grid, (28, 28));
    let got = to_array(&f.features.reshape([-1, 1024]));
    let err = relative_error(&got, &npy(&dir, "features.npy"));
    eprintln!("{arch_name} {weights_file} features: relative error {err:.2e}, input max diff {max_diff:.1e}");
    assert!(err <= 1e-4, "{arch_name} features: relative error {err}");
}

#[test]
fn wide_resnet50_2_matches_torchvision_and_official_features() {
    check_backbone("wide_resnet50_2", "weights.safetensors");
}

#[test]
fn pytorch_state_dict_loads_like_safetensors() {
    check_backbone("wide_resnet50_2", "weights.pt");
}

#[test]
fn resnet18_matches_torchvision() {
    // Basic blocks and 128/256 channels: the pooling windows straddle channels here.
    check_backbone("resnet18", "weights.safetensors");
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
