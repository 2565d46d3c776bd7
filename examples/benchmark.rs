//! Benchmark: trains and predicts on one MVTec-style category with the real `patchcore` binary
//! and prints, per stage, wall seconds, seconds per image, peak RSS and sizes, as a table and
//! as JSON; plus the image AUROC on the test split.
//!
//!   cargo run --release --example benchmark -- CATEGORY_DIR [--out DIR] [--json FILE] \
//!       [--augment N] [--train-only] [-- extra train options, e.g. --weights random:0 -s 0.01]
//!
//! CATEGORY_DIR holds `train/good` and `test/<type>` (MVTec AD layout). Paper protocol
//! (--resize 256 --crop 224) unless the extra options say otherwise. `--augment N` trains on
//! N images made from the training images by flips and rotations (at 256 px, which the paper
//! protocol resizes to anyway), to measure large training sets; `--train-only` stops after
//! training (for large banks, whose search examples/knn_bench.rs measures).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use patchcore::commands::mvtec::metrics::auroc;
use serde_json::{json, Value};

struct Run {
    wall_s: f64,
    peak_rss_mib: f64,
}

/// Runs a command to completion and measures its wall time and peak resident memory.
fn measure(cmd: &mut Command) -> Run {
    let t = Instant::now();
    // Reaped below with wait4, which also reports the child's peak memory.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("patchcore binary runs");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is a plain C struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    Run {
        wall_s: t.elapsed().as_secs_f64(),
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

/// Writes `n` variants of the images in `from` (8 flips/rotations by 90 degrees, each also
/// turned by 30 degrees) into `to`, at 256 x 256.
fn augment(from: &Path, to: &Path, n: usize) -> PathBuf {
    use image::imageops;
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    std::fs::create_dir_all(to).unwrap();
    let bases: Vec<image::RgbImage> = files
        .iter()
        .map(|f| {
            let img = patchcore::features::images::load_rgb(f).unwrap();
            patchcore::features::images::resize_bilinear_pil(&img, 256, 256)
        })
        .collect();
    let mut written = 0;
    'outer: for variant in 0..16 {
        for (i, base) in bases.iter().enumerate() {
            if written == n {
                break 'outer;
            }
            let mut img = match variant % 8 {
                0 => base.clone(),
                1 => imageops::rotate90(base),
                2 => imageops::rotate180(base),
                3 => imageops::rotate270(base),
                4 => imageops::flip_horizontal(base),
                5 => imageops::flip_vertical(base),
                6 => imageops::rotate90(&imageops::flip_horizontal(base)),
                _ => imageops::rotate270(&imageops::flip_horizontal(base)),
            };
            if variant >= 8 {
                img = rotate(&img, 30f32.to_radians());
            }
            img.save(to.join(format!("{variant:02}_{i:03}.png")))
                .unwrap();
            written += 1;
        }
    }
    assert_eq!(written, n, "at most 16 variants per training image");
    to.to_path_buf()
}

/// Rotation about the centre, nearest sample, edges extended.
fn rotate(img: &image::RgbImage, angle: f32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let (s, c) = angle.sin_cos();
    image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let sx = (c * dx + s * dy + cx).clamp(0.0, w as f32 - 1.0) as u32;
        let sy = (-s * dx + c * dy + cy).clamp(0.0, h as f32 - 1.0) as u32;
        *img.get_pixel(sx, sy)
    })
}

/// Pixel AUROC against the MVTec masks (`ground_truth/<type>/<NNN>_mask.png`; `good` images
/// have none), over the pixels the model saw (the crop), sampled every 4th row and column.
fn pixel_auroc(category: &Path, pred_dir: &Path, side: &Value) -> Option<f64> {
    let pre: patchcore::features::images::Preprocess =
        serde_json::from_value(side["preprocess"].clone()).ok()?;
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    let csv = std::fs::read_to_string(pred_dir.join("results.csv")).ok()?;
    for line in csv.lines().skip(1) {
        let rel = PathBuf::from(line.split(',').next()?);
        let heat: ndarray::Array2<f32> =
            ndarray_npy::read_npy(pred_dir.join(rel.with_extension("npy"))).ok()?;
        let (h, w) = heat.dim();
        let kind = rel.parent()?.to_str()?;
        let mask = if kind == "good" {
            None
        } else {
            let name = format!("{}_mask.png", rel.file_stem()?.to_str()?);
            Some(
                image::open(category.join("ground_truth").join(kind).join(name))
                    .ok()?
                    .to_luma8(),
            )
        };
        let g = pre.geometry((w as u32, h as u32)).ok()?;
        let (left, top, cw, ch) = g.window;
        let (sx, sy) = (w as f64 / g.resized.0 as f64, h as f64 / g.resized.1 as f64);
        let (x0, x1) = (
            (left as f64 * sx) as usize,
            ((left + cw) as f64 * sx) as usize,
        );
        let (y0, y1) = (
            (top as f64 * sy) as usize,
            ((top + ch) as f64 * sy) as usize,
        );
        for y in (y0..y1.min(h)).step_by(4) {
            for x in (x0..x1.min(w)).step_by(4) {
                scores.push(heat[[y, x]]);
                labels.push(
                    mask.as_ref()
                        .is_some_and(|m| m.get_pixel(x as u32, y as u32)[0] > 127),
                );
            }
        }
    }
    auroc(&scores, &labels)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let (ours, extra) = (&args[..split], args.get(split + 1..).unwrap_or(&[]));
    let category = PathBuf::from(ours.first().expect("usage: benchmark CATEGORY_DIR"));
    let flag = |name: &str| {
        ours.iter()
            .position(|a| a == name)
            .map(|i| PathBuf::from(&ours[i + 1]))
    };
    let out = flag("--out").unwrap_or_else(|| std::env::temp_dir().join("patchcore-benchmark"));
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/patchcore");
    std::fs::create_dir_all(&out).unwrap();
    let index = out.join("index.faiss");

    let train_dir = match flag("--augment") {
        Some(n) => augment(
            &category.join("train/good"),
            &out.join("augmented"),
            n.to_str().unwrap().parse().expect("--augment N"),
        ),
        None => category.join("train/good"),
    };
    // The paper protocol: every training image in the bank (no calibration hold-out).
    let mut train_args: Vec<String> = vec![
        "--resize".into(),
        "256".into(),
        "--crop".into(),
        "224".into(),
        "--calibration-ratio".into(),
        "0".into(),
    ];
    train_args.extend(extra.iter().cloned());
    let train = measure(
        Command::new(&bin)
            .args(["train", "-q", "-i"])
            .arg(&train_dir)
            .arg("-o")
            .arg(&index)
            .args(&train_args),
    );
    let side: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("index.faiss.json")).unwrap())
            .unwrap();

    if ours.iter().any(|a| a == "--train-only") {
        report_train_only(&category, &train_args, &train, &side, flag("--json"));
        return;
    }

    let pred_dir = out.join("predictions");
    let timings = out.join("predict-timings.json");
    let predict = measure(
        Command::new(&bin)
            .args(["predict", "-q", "-i"])
            .arg(category.join("test"))
            .arg("-o")
            .arg(&pred_dir)
            .arg("--index")
            .arg(&index)
            .arg("--timings")
            .arg(&timings),
    );
    let pt: Value = serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();

    let csv = std::fs::read_to_string(pred_dir.join("results.csv")).unwrap();
    let (mut scores, mut labels) = (vec![], vec![]);
    for line in csv.lines().skip(1) {
        let mut fields = line.split(',');
        let (path, score) = (fields.next().unwrap(), fields.next().unwrap());
        scores.push(score.parse::<f32>().unwrap());
        labels.push(!path.starts_with("good/"));
    }
    let image_auroc = auroc(&scores, &labels);
    let pixel_auroc = pixel_auroc(&category, &pred_dir, &side);

    let n_train = side["training"]["images"].as_u64().unwrap() as f64;
    let n_test = pt["images"].as_u64().unwrap() as f64;
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("| stage | wall s | s per image |");
    println!("|---|---|---|");
    let train_part = train_rows(&train, &side).map(|(name, s)| (name, s, n_train));
    let rows = train_part.into_iter().chain([
        ("predict: features", f(&pt["features_s"]), n_test),
        ("predict: kNN", f(&pt["knn_s"]), n_test),
        (
            "predict: heatmaps + writing",
            f(&pt["heatmap_and_write_s"]),
            n_test,
        ),
        ("predict: total (in process)", f(&pt["total_s"]), n_test),
        ("predict: process wall", predict.wall_s, n_test),
    ]);
    for (name, s, n) in rows {
        println!("| {name} | {s:.2} | {:.4} |", s / n);
    }
    println!(
        "\npeak RSS: train {:.0} MiB, predict {:.0} MiB; bank {} of {} patches; \
         {} train / {} test images; image AUROC {}, pixel AUROC {}",
        train.peak_rss_mib,
        predict.peak_rss_mib,
        side["bank_size"],
        side["training"]["patches"],
        n_train,
        n_test,
        image_auroc.map_or("n/a".into(), |a| format!("{a:.4}")),
        pixel_auroc.map_or("n/a".into(), |a| format!("{a:.4}"))
    );
    let mut report = train_report(&category, &train_args, &train, &side);
    report["predict"] = json!({ "wall_s": predict.wall_s, "peak_rss_mib": predict.peak_rss_mib,
                                "stages": pt, "images": n_test });
    report["image_auroc"] = json!(image_auroc);
    report["pixel_auroc"] = json!(pixel_auroc);
    print_report(&report, flag("--json"));
}

/// The train stages' rows of the table: name and wall seconds.
fn train_rows(train: &Run, side: &Value) -> [(&'static str, f64); 5] {
    let t = &side["timings"];
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    [
        ("train: feature extraction", f(&t["feature_extraction_s"])),
        ("train: coreset", f(&t["coreset_s"])),
        ("train: index write", f(&t["index_write_s"])),
        ("train: total (in process)", f(&t["total_s"])),
        ("train: process wall", train.wall_s),
    ]
}

/// The JSON report's train half (and what describes the run).
fn train_report(category: &Path, train_args: &[String], train: &Run, side: &Value) -> Value {
    json!({
        "category": category.display().to_string(),
        "train_options": train_args,
        "train": { "wall_s": train.wall_s, "peak_rss_mib": train.peak_rss_mib,
                   "stages": side["timings"],
                   "images": side["training"]["images"].as_u64().unwrap() as f64,
                   "patches": side["training"]["patches"], "bank_size": side["bank_size"] },
        "weights": side["weights"]["source"],
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// Prints the JSON report and writes it to `json_path` when given.
fn print_report(report: &Value, json_path: Option<PathBuf>) {
    let text = serde_json::to_string_pretty(report).unwrap();
    println!("\n{text}");
    if let Some(path) = json_path {
        std::fs::write(&path, text + "\n").unwrap();
    }
}

/// The train half of the report, for `--train-only`.
fn report_train_only(
    category: &Path,
    train_args: &[String],
    train: &Run,
    side: &Value,
    json_path: Option<PathBuf>,
) {
    let n_train = side["training"]["images"].as_u64().unwrap() as f64;
    println!("| stage | wall s | s per image |");
    println!("|---|---|---|");
    for (name, s) in train_rows(train, side) {
        println!("| {name} | {s:.2} | {:.4} |", s / n_train);
    }
    println!(
        "\npeak RSS: train {:.0} MiB; bank {} of {} patches; {} train images",
        train.peak_rss_mib, side["bank_size"], side["training"]["patches"], n_train
    );
    print_report(&train_report(category, train_args, train, side), json_path);
}
