//! Resampling against the references the official pipeline uses, at the ratios
//! `tests/parity.rs` does not cover: Pillow's bilinear resize when enlarging (small images,
//! tiles, `--resize` above the image size) and mixed enlarging/shrinking, and the heatmap's
//! bilinear upsampling + Gaussian (PyTorch + SciPy) at non-integer, non-square ratios.
//! Needs the Python environment made by scripts/setup.sh (fails without it).

mod common;

use std::path::Path;
use std::process::Command;

use ndarray::{Array2, Array3};
use patchcore::features::images;
use patchcore::model::scoring;

/// (input width, height) -> (output width, height).
const RESIZES: [((u32, u32), (u32, u32)); 8] = [
    ((37, 23), (80, 61)),   // enlarge both sides, non-integer ratios
    ((5, 3), (224, 150)),   // enlarge a tiny image many times
    ((50, 40), (120, 30)),  // enlarge one side, shrink the other
    ((64, 48), (64, 97)),   // only the vertical pass
    ((33, 64), (71, 64)),   // only the horizontal pass
    ((300, 200), (96, 64)), // shrinking, as a control
    ((60, 400), (48, 320)), // a tall image: Pillow 13 runs the vertical pass first
    ((40, 50), (30, 120)),  // shrink the width, enlarge the height
];

/// (patch grid rows, columns) -> (heatmap rows, columns).
const HEATMAPS: [((usize, usize), (usize, usize)); 4] = [
    ((13, 17), (100, 133)),
    ((28, 37), (224, 298)),
    ((7, 5), (61, 43)),
    ((12, 12), (96, 96)),
];

fn python(script: &str, dir: &Path) {
    let out = Command::new(common::python())
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run Python (scripts/setup.sh): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pillow_bilinear_resize_matches_when_enlarging() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<String> = RESIZES
        .iter()
        .map(|((w, h), (ow, oh))| format!("({w}, {h}, {ow}, {oh})"))
        .collect();
    let script = format!(
        r#"
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
rng = np.random.default_rng(0)
for i, (w, h, ow, oh) in enumerate([{}]):
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    np.save(f"{{out}}/in{{i}}.npy", img)
    res = Image.fromarray(img).resize((ow, oh), Image.BILINEAR)
    np.save(f"{{out}}/out{{i}}.npy", np.asarray(res))
"#,
        cases.join(", ")
    );
    python(&script, dir.path());
    for (i, (_, (ow, oh))) in RESIZES.iter().enumerate() {
        let input: Array3<u8> =
            ndarray_npy::read_npy(dir.path().join(format!("in{i}.npy"))).unwrap();
        let want: Array3<u8> =
            ndarray_npy::read_npy(dir.path().join(format!("out{i}.npy"))).unwrap();
        let (h, w, _) = input.dim();
        let img =
            image::RgbImage::from_raw(w as u32, h as u32, input.iter().copied().collect()).unwrap();
        let got = images::resize_bilinear_pil(&img, *ow, *oh);
        let differing = got
            .as_raw()
            .iter()
            .zip(want.iter())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            (got.width(), got.height()),
            (*ow, *oh),
            "case {i}: output size"
        );
        assert_eq!(
            differing,
            0,
            "case {i} {:?}: {differing} of {} values differ from Pillow",
            RESIZES[i],
            want.len()
        );
    }
}

#[test]
fn heatmap_matches_torch_and_scipy_at_non_integer_non_square_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<String> = HEATMAPS
        .iter()
        .map(|((h, w), (oh, ow))| format!("({h}, {w}, {oh}, {ow})"))
        .collect();
    let script = format!(
        r#"
import sys
import numpy as np, scipy.ndimage, torch, torch.nn.functional as F
out = sys.argv[1]
rng = np.random.default_rng(1)
for i, (h, w, oh, ow) in enumerate([{}]):
    m = rng.gamma(2.0, 1.0, size=(h, w)).astype(np.float32)
    np.save(f"{{out}}/map{{i}}.npy", m)
    # The official segmentor: bilinear upsampling, then a Gaussian of sigma 4.
    up = F.interpolate(torch.from_numpy(m)[None, None], size=(oh, ow), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    np.save(f"{{out}}/heat{{i}}.npy", scipy.ndimage.gaussian_filter(up, sigma=4))
"#,
        cases.join(", ")
    );
    python(&script, dir.path());
    for (i, (_, (oh, ow))) in HEATMAPS.iter().enumerate() {
        let map: Array2<f32> =
            ndarray_npy::read_npy(dir.path().join(format!("map{i}.npy"))).unwrap();
        let want: Array2<f32> =
            ndarray_npy::read_npy(dir.path().join(format!("heat{i}.npy"))).unwrap();
        let got = scoring::heatmap(map.view(), *oh, *ow);
        assert_eq!(got.dim(), want.dim(), "case {i}");
        let err = (&got - &want).mapv(f32::abs).fold(0f32, |a, &b| a.max(b))
            / want.fold(0f32, |a, &b| a.max(b.abs()));
        eprintln!(
            "heatmap case {i} {:?}: relative error {err:.2e}",
            HEATMAPS[i]
        );
        assert!(
            err <= 1e-6,
            "case {i} {:?}: relative error {err}",
            HEATMAPS[i]
        );
    }
}
