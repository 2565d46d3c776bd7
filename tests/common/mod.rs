//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use patchcore::util::synthetic::{self, BBox, Defect};

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_patchcore"));
    c.env(
        "PATCHCORE_CACHE",
        std::env::temp_dir().join("patchcore-test-cache"),
    );
    c
}

/// Runs the binary with `args`; returns the output.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

/// `patchcore train -i INPUT -o INDEX` followed by `extra` options.
pub fn train(input: &Path, index: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "-i", s(input), "-o", s(index)];
    args.extend_from_slice(extra);
    run(&args)
}

/// `patchcore predict -q -i INPUT -o OUT --index INDEX`.
pub fn predict(input: &Path, out: &Path, index: &Path) -> Output {
    predict_with(input, out, index, &["-q"])
}

/// `patchcore predict -i INPUT -o OUT --index INDEX` followed by `extra` options.
pub fn predict_with(input: &Path, out: &Path, index: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["predict", "-i", s(input), "-o", s(out), "--index", s(index)];
    args.extend_from_slice(extra);
    run(&args)
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A JSON file's contents.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The records of a CSV file (its header apart).
pub fn csv_rows(path: &Path) -> Vec<csv::StringRecord> {
    csv::Reader::from_path(path)
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The single error line of a failed run; asserts the failure is clean (no panic).
pub fn error_line(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stderr(o)
    );
    let err = stderr(o);
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line expected, got: {err}"
    );
    lines[0].to_string()
}

/// Asserts that the run failed cleanly with one error line naming each of `needles`;
/// returns the line.
pub fn assert_fails_naming(o: &Output, needles: &[&str]) -> String {
    let line = error_line(o);
    for n in needles {
        assert!(line.contains(n), "the error does not name {n:?}: {line}");
    }
    line
}

/// Whether the tests run in CI (`CI` set to anything but empty, `0` or `false`), where
/// everything the tests need is installed, so a missing piece is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Skips the calling test for want of `what` (data, a program): in CI a failure; elsewhere a
/// line on the real stderr, so it shows in `cargo test`'s output even for a passing test
/// (the harness captures only `eprintln!`).
pub fn skip(what: &str) {
    if in_ci() {
        panic!("{what}; CI=true is set, where it must be present");
    }
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {what}");
}

/// Python with torch/torchvision/scipy/faiss (set up by scripts/setup.sh).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PATCHCORE_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/patchcore/py/bin/python")
}

/// Writes `n` synthetic images of a kind into `dir`; returns their defect boxes.
pub fn write_images(
    dir: &Path,
    n: usize,
    seed: u64,
    size: (u32, u32),
    defect: Defect,
) -> Vec<Option<BBox>> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let (img, bbox) = synthetic::render(seed + i as u64, size.0, size.1, defect);
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
            bbox
        })
        .collect()
}

/// Writes test images of `size` into ROOT/test: `good` good ones and `scratch` and `spot`
/// defective ones, in folders of those names (seeds 500, 600 and 700, as every test draws
/// them); returns the defects' boxes by image name (`scratch/000`, ...).
pub fn write_test_images(
    root: &Path,
    size: (u32, u32),
    good: usize,
    scratch: usize,
    spot: usize,
) -> Vec<(String, BBox)> {
    write_images(&root.join("test/good"), good, 500, size, Defect::None);
    let mut boxes = Vec::new();
    for (kind, n, seed, defect) in [
        ("scratch", scratch, 600, Defect::Scratch),
        ("spot", spot, 700, Defect::Spot),
    ] {
        let written = write_images(&root.join("test").join(kind), n, seed, size, defect);
        for (i, b) in written.into_iter().enumerate() {
            boxes.push((format!("{kind}/{i:03}"), b.expect("a defect's box")));
        }
    }
    boxes
}

/// Quick training options: random weights, 96-pixel images, a quarter of the patches, quiet.
pub const FAST_TRAIN: &[&str] = &[
    "--weights",
    "random:0",
    "--resize",
    "96",
    "-s",
    "0.25",
    "-q",
];

/// A small resnet18 with random weights on 64-pixel images (add `-q` and the like).
pub const RESNET18_64: &[&str] = &[
    "--backbone",
    "resnet18",
    "--weights",
    "random:0",
    "--resize",
    "64",
];

/// `patchcore train -i INPUT -o INDEX ARGS`, which must succeed.
pub fn train_ok(input: &Path, index: &Path, args: &[&str]) -> Output {
    let o = train(input, index, args);
    assert!(o.status.success(), "train: {}", stderr(&o));
    o
}

/// Trains a small model (`FAST_TRAIN`) on `n` good images; returns the index.
pub fn train_small(root: &Path, n: usize) -> PathBuf {
    train_small_with(root, n, &[])
}

/// Trains a small model (`FAST_TRAIN`, then `extra`) on `n` good 96x96 images written into
/// ROOT/train; returns the index, ROOT/model/index.faiss.
pub fn train_small_with(root: &Path, n: usize, extra: &[&str]) -> PathBuf {
    let train_dir = root.join("train");
    write_images(&train_dir, n, 0, (96, 96), Defect::None);
    let index = root.join("model/index.faiss");
    std::fs::create_dir_all(index.parent().unwrap()).unwrap();
    train_ok(&train_dir, &index, &[FAST_TRAIN, extra].concat());
    index
}

/// Asserts that the heatmap's highest pixel lies on the defect's box `(x0, y0, x1, y1)`,
/// give or take `margin` pixels.
pub fn assert_peak_on(heat: &ndarray::Array2<f32>, bbox: BBox, margin: u32, name: &str) {
    let (mut best, mut at) = (f32::MIN, (0, 0));
    for ((y, x), &v) in heat.indexed_iter() {
        if v > best {
            (best, at) = (v, (x as u32, y as u32));
        }
    }
    let (x0, y0, x1, y1) = bbox;
    assert!(
        at.0 + margin >= x0 && at.0 < x1 + margin && at.1 + margin >= y0 && at.1 < y1 + margin,
        "{name}: heatmap peak {at:?} outside the defect {bbox:?}"
    );
}

/// `../shared/REL` beside the checkout, which CI provides; absent, the test is skipped
/// (`skip`: a failure in CI) and this returns None.
pub fn shared(rel: &str) -> Option<PathBuf> {
    match shared_or_why(rel) {
        Ok(dir) => Some(dir),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// `../shared/REL` beside the checkout, or why it cannot be used (for a fixture made once
/// and shared by several tests, each of which then calls `skip` itself).
pub fn shared_or_why(rel: &str) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel);
    if dir.exists() {
        return Ok(dir);
    }
    Err(format!("{} is not there", dir.display()))
}

/// max |a - b| / max |b|: the error of `a` relative to the scale of the reference `b`.
pub fn relative_error(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale.max(1e-30)
}

/// A tensor's values as an f32 array of its shape.
pub fn to_array(t: &tch::Tensor) -> ndarray::ArrayD<f32> {
    let t = t.to_kind(tch::Kind::Float).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    ndarray::ArrayD::from_shape_vec(shape, v).unwrap()
}

/// Every `.npy` heatmap and the scores of a predict output folder, by name.
pub fn predict_outputs(dir: &std::path::Path) -> Vec<(String, f32, Vec<f32>)> {
    let text = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let mut out: Vec<(String, f32, Vec<f32>)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            let name = f.next().unwrap().to_string();
            let score = f.next().unwrap().parse().unwrap();
            let heat: ndarray::Array2<f32> =
                ndarray_npy::read_npy(dir.join(name.replace(".png", ".npy"))).unwrap();
            (name, score, heat.into_raw_vec_and_offset().0)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Image scores and heatmaps of two runs agree within `tol` relative to each image's largest.
pub fn assert_same_outputs(a: &std::path::Path, b: &std::path::Path, tol: f32, case: &str) {
    let (a, b) = (predict_outputs(a), predict_outputs(b));
    assert_eq!(a.len(), b.len());
    for ((name, sa, ha), (_, sb, hb)) in a.iter().zip(&b) {
        assert!(
            (sa - sb).abs() <= tol * sa.abs(),
            "{case} {name}: {sa} vs {sb}"
        );
        let top = ha.iter().copied().fold(0f32, f32::max);
        let worst = ha
            .iter()
            .zip(hb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tol * top,
            "{case} {name}: heatmaps differ by {worst} (max {top})"
        );
    }
}

/// resnet18 weights up to layer3 with values from `seed`, written as safetensors by tch (a
/// weights *file*, where `random:SEED` would need none).
pub fn resnet18_weights(path: &Path, seed: i64) {
    use patchcore::features::backbone::{Arch, ResNet};
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = ResNet::new(&vs.root(), Arch::Resnet18, &[2, 3]).unwrap();
    vs.save(path).unwrap();
}

/// A small calibrated resnet18 model (`RESNET18_64`, a quarter of the patches, then `extra`)
/// trained on 12 good 64x64 images written into ROOT/train; returns ROOT/model/index.faiss.
pub fn train_resnet18_small(root: &Path, extra: &[&str]) -> PathBuf {
    let train = root.join("train");
    write_images(&train, 12, 0, (64, 64), Defect::None);
    let index = root.join("model/index.faiss");
    train_ok(
        &train,
        &index,
        &[RESNET18_64, &["-s", "0.25", "-q"], extra].concat(),
    );
    index
}
