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

/// Scores the test split of `category_dir` with the model at `index` and computes the
/// metrics, with the curves they are the areas of.
pub fn evaluate(
    category_dir: &Path,
    index: &Path,
    info: bank::ModelInfo,
    t: &TrainOptions,
    config: RunConfig,
) -> Result<(RunResult, RunCurves)> {
    let mut timings = EvalTimings {
        train: info.timings.clone(),
        ..Default::default()
    };
    let calibration = info.calibration.clone();
    let counts_train = (info.training.images, info.bank_size);
    let mut model = SingleModel::load(index, info, None, t.device, t.quiet)?;
    let files = test_images(category_dir)?;
    let test = score_test_set(&mut model, category_dir, &files, t, &mut timings)?;

    let t3 = Instant::now();
    let (metrics, curves) = area_metrics(&test, config.clone());
    timings.metrics_s = t3.elapsed().as_secs_f64();
    let threshold = calibration.as_ref().map(|c| c.image_threshold);
    let result = RunResult {
        format: RESULT_FORMAT.to_string(),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        config,
        metrics,
        counts: test.counts(
            (
                counts_train.0,
                calibration.as_ref().map_or(0, |c| c.images),
                counts_train.1,
            ),
            files.len(),
        ),
        timings,
        pixel_metrics_bytes: test.pixels.bytes(),
        peak_rss_bytes: None,
        calibrated_threshold: threshold,
        good_above_threshold: threshold.and_then(|th| test.good_above(th)),
    };
    Ok((result, curves))
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

/// Scores `files` with `model` as predict does; hands `each` every image's file, original
/// size, heatmap (at the network input's pixels) and score, in order. Adds the time of each
/// part to `timings`.
fn score_inputs(
    model: &mut SingleModel,
    files: &[ImageFile],
    t: &TrainOptions,
    timings: &mut EvalTimings,
    mut each: impl FnMut(&ImageFile, (u32, u32), Array2<f32>, f32) -> Result<()>,
) -> Result<()> {
    let n_neighbors = model.info.n_neighbors;
    let reweighting = model.info.score_reweighting;
    let bar = progress::items(files.len() as u64, "evaluating", t.quiet);
    let mut t_batch = Instant::now();
    let t_all = Instant::now();
    let knn = &mut model.knn;
    model.extractor.extract(files, t.batch_size, |batch| {
        crate::util::interrupt::check()?;
        timings.predict_features_s += t_batch.elapsed().as_secs_f64();
        let scored = scoring::score_batch(knn, &batch, n_neighbors, reweighting)?;
        timings.predict_knn_s += scored.knn_s;
        let t2 = Instant::now();
        for (e, input) in batch.iter().zip(scored.inputs) {
            each(
                &e.file,
                e.geometry.original,
                input.heatmap,
                input.image_score,
            )?;
            bar.inc(1);
        }
        timings.predict_heatmaps_s += scored.heatmaps_s + t2.elapsed().as_secs_f64();
        t_batch = Instant::now();
        Ok(())
    })?;
    bar.finish_and_clear();
    timings.predict_per_image_s += t_all.elapsed().as_secs_f64() / files.len().max(1) as f64;
    Ok(())
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

/// Scores `files` with `model` as predict does, against their masks; adds the time of each
/// part to `timings`.
fn score_test_set(
    model: &mut SingleModel,
    category_dir: &Path,
    files: &[ImageFile],
    t: &TrainOptions,
    timings: &mut EvalTimings,
) -> Result<TestScores> {
    let preprocess = model.info.preprocess;
    let mut test = test_scores(files, &preprocess);
    score_inputs(model, files, t, timings, |file, original, heat, score| {
        test.add(category_dir, &preprocess, file, original, heat, score)
    })?;
    Ok(test)
}

/// Scores the test split of `category_dir` with every member of the ensemble at `index`,
/// combines the scores and maps over the whole test set as the official `run_patchcore.py`
/// does (`ensemble::combine_test_scores`, `combine_test_maps`) and computes the metrics.
pub fn evaluate_ensemble(
    category_dir: &Path,
    index: &Path,
    info: crate::model::ensemble::EnsembleInfo,
    t: &TrainOptions,
    config: RunConfig,
) -> Result<(RunResult, RunCurves)> {
    let mut ens = crate::model::ensemble::Ensemble::load(index, info, t.device, t.quiet)?;
    let mut timings = EvalTimings::default();
    let files = test_images(category_dir)?;
    let (mut scores, mut maps) = (Vec::new(), Vec::new());
    let mut sizes = Vec::new();
    for (i, m) in ens.members.iter_mut().enumerate() {
        let (mut s, mut h) = (Vec::new(), Vec::new());
        score_inputs(m, &files, t, &mut timings, |_, original, heat, score| {
            if i == 0 {
                sizes.push(original);
            }
            s.push(score);
            h.push(heat);
            Ok(())
        })?;
        scores.push(s);
        maps.push(h);
    }
    let t3 = Instant::now();
    let combined_scores = crate::model::ensemble::combine_test_scores(&scores);
    let combined_maps = crate::model::ensemble::combine_test_maps(&maps);
    drop(maps);
    let preprocess = ens.info.preprocess;
    let mut test = test_scores(&files, &preprocess);
    for (((file, &size), heat), score) in files
        .iter()
        .zip(&sizes)
        .zip(combined_maps)
        .zip(combined_scores)
    {
        test.add(category_dir, &preprocess, file, size, heat, score)?;
    }
    let (metrics, curves) = area_metrics(&test, config.clone());
    timings.metrics_s = t3.elapsed().as_secs_f64();
    for m in &ens.members {
        let tt = &m.info.timings;
        timings.train.feature_extraction_s += tt.feature_extraction_s;
        timings.train.coreset_s += tt.coreset_s;
        timings.train.calibration_s += tt.calibration_s;
        timings.train.index_write_s += tt.index_write_s;
        timings.train.total_s += tt.total_s;
    }
    let result = RunResult {
        format: RESULT_FORMAT.to_string(),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        config,
        metrics,
        counts: test.counts(
            (
                ens.members[0].info.training.images,
                0,
                ens.members.iter().map(|m| m.info.bank_size).sum(),
            ),
            files.len(),
        ),
        timings,
        pixel_metrics_bytes: test.pixels.bytes(),
        peak_rss_bytes: None,
        // Thresholds on single images' scale do not apply to test-set-normalised scores.
        calibrated_threshold: None,
        good_above_threshold: None,
    };
    ens.members.clear();
    Ok((result, curves))
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
