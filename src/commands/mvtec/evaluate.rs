//! Evaluation of a saved model on a category's test split: every test image scored (a single
//! model's scores as they are; an ensemble's members combined over the whole test set as the
//! official code combines them), the ground-truth masks read at the scored pixels, and the
//! image and pixel metrics with their curves.

use super::*;

/// A test image's ground truth mask path (`None` for `good` images).
pub fn mask_path(category_dir: &Path, relative: &Path) -> Option<PathBuf> {
    let kind = relative.parent()?.to_str()?;
    if kind == "good" {
        return None;
    }
    let stem = relative.file_stem()?.to_string_lossy();
    Some(
        category_dir
            .join("ground_truth")
            .join(kind)
            .join(format!("{stem}_mask.png")),
    )
}

/// The mask over the pixels the model saw: resized and cropped like the image, defect where
/// the resized value is 255.
pub fn load_mask(path: &Path, preprocess: &Preprocess, size: (u32, u32)) -> Result<Array2<bool>> {
    if !path.exists() {
        bail!("ground truth mask {} is missing", path.display());
    }
    let mask = images::load_rgb(path)?;
    if mask.dimensions() != size {
        bail!(
            "ground truth mask {} is {}x{}, its image {}x{}",
            path.display(),
            mask.width(),
            mask.height(),
            size.0,
            size.1
        );
    }
    let (window, _) = preprocess.apply(&mask)?;
    let (w, h) = window.dimensions();
    Ok(Array2::from_shape_fn((h as usize, w as usize), |(y, x)| {
        window.get_pixel(x as u32, y as u32)[0] == 255
    }))
}

/// Scores the test split of `category_dir` with `model` (`Model::score_split`: one
/// backbone's scores as predict gives them, an ensemble's combined over the split) and
/// computes the metrics, with the curves they are the areas of.
pub fn evaluate(
    category_dir: &Path,
    model: &mut Model,
    t: &TrainOptions,
    config: RunConfig,
) -> Result<(RunResult, RunCurves)> {
    let mut timings = EvalTimings {
        train: train_timings(model),
        ..Default::default()
    };
    let files = test_images(category_dir)?;
    let preprocess = model.sidecar().preprocess().0;
    let mut test = test_scores(&files, &preprocess);
    let mut split = SplitTimings::default();
    model.score_split(
        &files,
        t.batch_size,
        t.quiet,
        &mut split,
        |file, size, heat, score| test.add(category_dir, &preprocess, file, size, heat, score),
    )?;
    timings.predict_features_s = split.features_s;
    timings.predict_knn_s = split.knn_s;
    timings.predict_heatmaps_s = split.heatmaps_s;
    timings.predict_per_image_s = split.per_image_s;

    let t3 = Instant::now();
    let (metrics, curves) = area_metrics(&test, config.clone());
    timings.metrics_s = t3.elapsed().as_secs_f64();
    // A single model's calibration; an ensemble's combined test-split scores have none (its
    // members' thresholds are on single images' scale, not on the split-normalised one).
    let calibration = model.calibration();
    let threshold = calibration.map(|c| c.image_threshold);
    let first = &model.members().next().expect("a model has a member").info;
    let train_counts = (
        first.training.images,
        calibration.map_or(0, |c| c.images),
        model.members().map(|m| m.info.bank_size).sum(),
    );
    let result = RunResult {
        format: RESULT_FORMAT.to_string(),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        config,
        metrics,
        counts: test.counts(train_counts, files.len()),
        timings,
        pixel_metrics_bytes: test.pixels.bytes(),
        peak_rss_bytes: None,
        calibrated_threshold: threshold,
        good_above_threshold: threshold.and_then(|th| test.good_above(th)),
    };
    Ok((result, curves))
}

/// The training times of the model: its own, or the sum of its members'.
fn train_timings(model: &Model) -> TrainTimings {
    model.members().fold(TrainTimings::default(), |mut sum, m| {
        let t = &m.info.timings;
        sum.feature_extraction_s += t.feature_extraction_s;
        sum.coreset_s += t.coreset_s;
        sum.calibration_s += t.calibration_s;
        sum.index_write_s += t.index_write_s;
        sum.total_s += t.total_s;
        sum
    })
}

/// The test images of `category_dir`; every defect image needs its mask, checked here,
/// before the long part.
fn test_images(category_dir: &Path) -> Result<Vec<ImageFile>> {
    let files: Vec<ImageFile> = images::find_images(&category_dir.join("test"))?.images;
    for f in &files {
        if let Some(p) = mask_path(category_dir, &f.relative) {
            if !p.exists() {
                bail!(
                    "ground truth mask {} is missing (for test image {})",
                    p.display(),
                    f.path.display()
                );
            }
        }
    }
    Ok(files)
}

/// The test set scored: per image its score and label (defect or good), and every pixel's
/// score with its mask value.
struct TestScores {
    scores: Vec<f32>,
    labels: Vec<bool>,
    pixels: PixelMetrics,
}

impl TestScores {
    /// The run's counts: the training side as given, the test side (`test_images` files)
    /// from these scores.
    fn counts(&self, train: (usize, usize, usize), test_images: usize) -> Counts {
        let (train_images, calibration_images, bank_size) = train;
        Counts {
            train_images,
            calibration_images,
            bank_size,
            test_images,
            anomalous_images: self.labels.iter().filter(|&&l| l).count(),
            pixels: self.pixels.pixels(),
            defect_regions: self.pixels.regions(),
        }
    }

    /// The share of good test images scoring above `threshold` (`None` without good images).
    fn good_above(&self, threshold: f32) -> Option<f64> {
        let good: Vec<f32> = self
            .scores
            .iter()
            .zip(&self.labels)
            .filter(|(_, &l)| !l)
            .map(|(&s, _)| s)
            .collect();
        (!good.is_empty())
            .then(|| good.iter().filter(|&&s| s > threshold).count() as f64 / good.len() as f64)
    }
}

/// An empty scored test set for `files` preprocessed by `preprocess`.
fn test_scores(files: &[ImageFile], preprocess: &Preprocess) -> TestScores {
    // With a crop every test image gives crop^2 pixels: reserve exactly that much.
    let pixels = match preprocess.crop {
        Some(c) => PixelMetrics::with_capacity(files.len() * (c as usize).pow(2)),
        None => PixelMetrics::new(),
    };
    TestScores {
        scores: Vec::new(),
        labels: Vec::new(),
        pixels,
    }
}

impl TestScores {
    /// Adds one test image's score and heatmap, compared with its mask (`original`: the
    /// image's size).
    fn add(
        &mut self,
        category_dir: &Path,
        preprocess: &Preprocess,
        file: &ImageFile,
        original: (u32, u32),
        heat: Array2<f32>,
        score: f32,
    ) -> Result<()> {
        let mask_file = mask_path(category_dir, &file.relative);
        let mask = match &mask_file {
            Some(p) => load_mask(p, preprocess, original)?,
            None => Array2::from_elem(heat.dim(), false),
        };
        self.pixels.add(heat.view(), mask.view())?;
        self.scores.push(score);
        self.labels.push(mask_file.is_some());
        Ok(())
    }
}

/// The image AUROC, pixel AUROC, AUPRO and best F1 of the scored test set, with the curves
/// the areas are taken from.
fn area_metrics(test: &TestScores, config: RunConfig) -> (Metrics, RunCurves) {
    let curves = RunCurves {
        format: CURVES_FORMAT.to_string(),
        config,
        aupro_max_fpr: AUPRO_MAX_FPR,
        image_roc: metrics::roc_curve(&test.scores, &test.labels),
        pixel_roc: test.pixels.roc_curve(),
        pro: test.pixels.pro_curve(AUPRO_MAX_FPR),
    };
    let m = Metrics {
        image_auroc: curves.image_roc.as_ref().map(|c| c.area_share(1.0)),
        pixel_auroc: curves.pixel_roc.as_ref().map(|c| c.area_share(1.0)),
        aupro: curves.pro.as_ref().map(|c| c.area_share(AUPRO_MAX_FPR)),
        best_f1: metrics::best_f1(&test.scores, &test.labels),
    };
    (m, curves)
}
